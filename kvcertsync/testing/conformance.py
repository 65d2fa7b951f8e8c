"""The Store contract as rules a store is run against, each failing with a message of its own.

Every rule works on certificates of its own (secret URLs named after the rule), so rules can share
one storage. ``make_store`` is called again wherever a rule needs "the same storage, after a
restart": it must return a new store object over the same storage each time.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import secrets
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from types import FrameType
from typing import Any

import anyio
import attrs
from cryptography import utils
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kvcertsync.emulator.certs import TestAuthority
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.stores.base import InstalledCertificate, ReadableStore, Store
from kvcertsync.uri import SecretUri

__all__ = [
    "STORE_RULES",
    "InjectedFailure",
    "MakeObserved",
    "MakeStore",
    "RuleNotApplicable",
    "StoreRule",
    "check_store",
    "check_store_rule",
]

#: Returns a store; called again, a new store object over the same storage (a restart).
MakeStore = Callable[[], Store]
#: Turns a secret URL into the ObservedCertificate a rule installs (locations, ACLs...).
MakeObserved = Callable[[SecretUri], ObservedCertificate]

_VAULT = "https://conformance.vault.azure.net/secrets"
_CONCURRENT = 8


class RuleNotApplicable(Exception):
    """The rule checks an optional part (``ReadableStore.read``) this store does not have."""


class InjectedFailure(Exception):
    """Raised by the key of the material a rule hands a store to make its install fail."""


@attrs.frozen
class StoreRule:
    """One rule of the Store contract: its name, what it requires, and its check."""

    name: str
    summary: str
    check: Callable[[_Trial], Awaitable[None]] = attrs.field(repr=False)


# --------------------------------------------------------------------------- the trial


class _Trial:
    """Fresh certificates, URLs and versions for one rule, and the stores it is run against."""

    def __init__(self, rule: str, make_store: MakeStore, make_observed: MakeObserved) -> None:
        self.rule = rule
        self._make_store = make_store
        self._make_observed = make_observed
        self._tag = secrets.token_hex(3)
        self._authority: TestAuthority | None = None

    def store(self) -> Store:
        store = self._make_store()
        if not isinstance(store, Store):
            raise AssertionError(
                f"make_store() returned a {type(store).__name__}, which is not a Store "
                "(it needs async install() and installed())"
            )
        return store

    def observed(self, label: str = "cert") -> ObservedCertificate:
        uri = SecretUri.parse(f"{_VAULT}/{self.rule}-{label}-{self._tag}")
        observed = self._make_observed(uri)
        if observed.uri != uri:
            raise AssertionError(f"make_observed({uri}) returned one for {observed.uri}")
        return observed

    def material(self, label: str = "cert") -> CertificateMaterial:
        if self._authority is None:
            self._authority = TestAuthority("kvcertsync conformance")
        return self._authority.issue([f"{label}.conformance.example"], days=30)

    @staticmethod
    def version() -> str:
        return secrets.token_hex(16)  # Key Vault's form: 32 lower-case hex digits


# --------------------------------------------------------------------------- helpers


def _show(record: InstalledCertificate | None) -> str:
    if record is None:
        return "None"
    return f"version {record.version} (thumbprint {record.thumbprint}, at {record.location})"


async def _install(
    store: Store, observed: ObservedCertificate, material: CertificateMaterial, version: str
) -> InstalledCertificate:
    try:
        record = await store.install(observed, material, version)
    except Exception as exc:
        raise AssertionError(
            f"install() of version {version} of {observed.uri} raised {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(record, InstalledCertificate):
        raise AssertionError(
            f"install() returned a {type(record).__name__}, not an InstalledCertificate"
        )
    return record


async def _installed(store: Store, observed: ObservedCertificate) -> InstalledCertificate | None:
    try:
        record = await store.installed(observed)
    except Exception as exc:
        raise AssertionError(
            f"installed() for {observed.uri} raised {type(exc).__name__}: {exc}"
        ) from exc
    if record is not None and not isinstance(record, InstalledCertificate):
        raise AssertionError(
            f"installed() returned a {type(record).__name__}, not an InstalledCertificate or None"
        )
    return record


def _expected(
    observed: ObservedCertificate, material: CertificateMaterial, version: str
) -> dict[str, Any]:
    return {
        "uri": observed.uri.latest,
        "version": version,
        "thumbprint": material.thumbprint,
        "not_after": material.not_after,
    }


def _check_record(
    record: InstalledCertificate,
    observed: ObservedCertificate,
    material: CertificateMaterial,
    version: str,
    what: str,
) -> None:
    for field, want in _expected(observed, material, version).items():
        got = getattr(record, field)
        if got != want:
            raise AssertionError(f"{what} has {field} {got!r}; it must be {want!r}")
    if record.not_after.tzinfo is None:
        raise AssertionError(f"{what} has a naive not_after; it must be timezone-aware (UTC)")
    if not isinstance(record.location, str) or not record.location:
        raise AssertionError(f"{what} has location {record.location!r}; it must say where it is")


def _same_record(got: InstalledCertificate | None, want: InstalledCertificate, what: str) -> None:
    if got != want:
        raise AssertionError(f"{what} reports {_show(got)}; it must report {_show(want)}")


def _key_der(material: CertificateMaterial) -> bytes:
    return material.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _sha1s(material: CertificateMaterial) -> list[str]:
    return [cert.fingerprint(hashes.SHA1()).hex() for cert in material.chain]  # noqa: S303


async def _check_read(
    store: Store,
    observed: ObservedCertificate,
    record: InstalledCertificate,
    material: CertificateMaterial,
    what: str,
) -> None:
    """When ``store`` can read back, it gives ``record`` and ``material`` (key and chain)."""
    if not isinstance(store, ReadableStore):
        return
    try:
        found = await store.read(observed)
    except Exception as exc:
        raise AssertionError(f"{what}: read() raised {type(exc).__name__}: {exc}") from exc
    if found is None:
        raise AssertionError(f"{what}: read() gives None; it must give {_show(record)}")
    got, back = found
    _same_record(got, record, f"{what}: read()")
    if not isinstance(back, CertificateMaterial):
        raise AssertionError(f"{what}: read() gives a {type(back).__name__} as material")
    if back.thumbprint != material.thumbprint:
        raise AssertionError(
            f"{what}: read() gives certificate {back.thumbprint}; it must be {material.thumbprint}"
        )
    if _key_der(back) != _key_der(material):
        raise AssertionError(f"{what}: read() gives a private key other than the one installed")
    if _sha1s(back) != _sha1s(material):
        raise AssertionError(
            f"{what}: read() gives a chain of {len(back.chain)} certificate(s) other than the "
            f"{len(material.chain)} installed (issuer of the leaf first)"
        )


# --------------------------------------------------------------------------- injected failure


class _UnexportableKey(ec.EllipticCurvePrivateKey):
    """An EC key whose every export raises InjectedFailure: any install that needs it fails."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        return self._key.exchange(algorithm, peer_public_key)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._key.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._key.curve

    @property
    def key_size(self) -> int:
        return self._key.key_size

    def sign(
        self, data: utils.Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes:
        return self._key.sign(data, signature_algorithm)

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise InjectedFailure("kvcertsync.testing: this key refuses to be exported")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise InjectedFailure("kvcertsync.testing: this key refuses to be exported")

    def __copy__(self) -> ec.EllipticCurvePrivateKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> ec.EllipticCurvePrivateKey:
        return self


def _unexportable(material: CertificateMaterial) -> CertificateMaterial:
    key = material.private_key
    assert isinstance(key, ec.EllipticCurvePrivateKey)  # the trial mints EC keys
    return CertificateMaterial(
        private_key=_UnexportableKey(key), certificate=material.certificate, chain=material.chain
    )


# --------------------------------------------------------------------------- blocking watch

# Audit events of work that blocks: file system, processes, foreign calls, and sleeping (Python
# 3.13 and later raise time.sleep).
_BLOCKING_EVENTS = frozenset(
    {
        "open",
        "os.chmod",
        "os.chown",
        "os.exec",
        "os.getxattr",
        "os.link",
        "os.listdir",
        "os.listxattr",
        "os.mkdir",
        "os.posix_spawn",
        "os.remove",
        "os.removexattr",
        "os.rename",
        "os.rmdir",
        "os.scandir",
        "os.setxattr",
        "os.spawn",
        "os.symlink",
        "os.system",
        "os.truncate",
        "os.utime",
        "shutil.copyfile",
        "shutil.rmtree",
        "subprocess.Popen",
        "time.sleep",
        "ctypes.call_function",
    }
)


def _importing() -> bool:
    """Whether the import system is on the calling thread's stack."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


class _LoopWatch:
    """Records blocking audit events raised on one thread (the event loop's) while armed."""

    def __init__(self) -> None:
        self.thread: int | None = None
        self.seen: list[str] = []
        self._hooked = False

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if self.thread != threading.get_ident() or event not in _BLOCKING_EVENTS:
            return
        first = args[0] if args else None
        if isinstance(first, os.PathLike):
            first = os.fspath(first)
        if event == "open" and not isinstance(first, str | bytes):
            return  # a descriptor already open
        if event == "time.sleep" and not first:
            return
        if _importing():
            return  # a module imported on first use: once per process, not the store's work
        # Only a path or a program name: arguments may hold what a command line passes.
        shown = str(first)[:120] if isinstance(first, str | bytes) else ""
        self.seen.append(f"{event}({shown!r})" if shown else event)

    @contextlib.contextmanager
    def armed(self) -> Iterator[list[str]]:
        if not self._hooked:
            sys.addaudithook(self)  # permanent; costs one comparison per event while disarmed
            self._hooked = True
        self.seen = []
        self.thread = threading.get_ident()
        try:
            yield self.seen
        finally:
            self.thread = None


_WATCH = _LoopWatch()


# --------------------------------------------------------------------------- secrets watch


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception:  # a record that cannot be formatted shows nothing
            self.lines.append(f"{record.name}: unformattable {record.msg!r}")


@contextlib.contextmanager
def _captured_logs() -> Iterator[list[str]]:
    """Every log line (with tracebacks) emitted meanwhile, at DEBUG and up."""
    root = logging.getLogger()
    handler = _Records()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler.lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def _key_fragments(material: CertificateMaterial) -> list[str]:
    """Text that would betray the private key: PEM lines, DER in base64 and hex, its number."""
    der = _key_der(material)
    body = [line for line in material.key_pem().decode().splitlines() if "-----" not in line]
    fragments = [*body, base64.b64encode(der).decode(), der.hex()]
    key = material.private_key
    number = None
    if isinstance(key, ec.EllipticCurvePrivateKey):
        number = key.private_numbers().private_value
    elif isinstance(key, rsa.RSAPrivateKey):
        number = key.private_numbers().d
    if number is not None:
        raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
        fragments += [str(number), f"{number:x}", f"{number:X}", base64.b64encode(raw).decode()]
        fragments.append(repr(raw)[2:42])
    return [fragment for fragment in fragments if len(fragment) >= 16]


def _leaks(text: str, materials: Sequence[CertificateMaterial]) -> bool:
    compact = "".join(text.split())  # PEM or base64 wrapped over lines
    return any(
        fragment in text or fragment in compact
        for material in materials
        for fragment in _key_fragments(material)
    )


# --------------------------------------------------------------------------- the rules


async def _install_describes(trial: _Trial) -> None:
    store = trial.store()
    observed, material, version = trial.observed(), trial.material(), trial.version()
    record = await _install(store, observed, material, version)
    _check_record(record, observed, material, version, "the record install() returned")


async def _nothing_installed(trial: _Trial) -> None:
    store = trial.store()
    observed = trial.observed()
    record = await _installed(store, observed)
    if record is not None:
        raise AssertionError(
            f"installed() for {observed.uri}, never installed, reports {_show(record)}; "
            "it must be None"
        )
    if isinstance(store, ReadableStore):
        found = await store.read(observed)
        if found is not None:
            raise AssertionError(f"read() for {observed.uri}, never installed, is not None")


async def _installed_matches(trial: _Trial) -> None:
    store = trial.store()
    observed, material, version = trial.observed(), trial.material(), trial.version()
    record = await _install(store, observed, material, version)
    _same_record(await _installed(store, observed), record, "installed() after install()")
    await _check_read(store, observed, record, material, "after install()")


async def _replaces(trial: _Trial) -> None:
    store = trial.store()
    observed = trial.observed()
    await _install(store, observed, trial.material(), trial.version())
    material, version = trial.material(), trial.version()
    record = await _install(store, observed, material, version)
    _check_record(record, observed, material, version, "install() of a new version")
    _same_record(await _installed(store, observed), record, "installed() after a new version")
    await _check_read(store, observed, record, material, "after a new version")


async def _idempotent(trial: _Trial) -> None:
    store = trial.store()
    observed, material, version = trial.observed(), trial.material(), trial.version()
    first = await _install(store, observed, material, version)
    again = await _install(store, observed, material, version)
    _same_record(again, first, f"install() of version {version} again (already in place)")
    _same_record(await _installed(store, observed), first, "installed() after installing again")
    await _check_read(store, observed, first, material, "after installing again")


async def _survives_restart(trial: _Trial) -> None:
    observed, material, version = trial.observed(), trial.material(), trial.version()
    record = await _install(trial.store(), observed, material, version)
    restarted = trial.store()
    got = await _installed(restarted, observed)
    if got is None:
        raise AssertionError(
            f"a store made again by make_store() (a restart) finds nothing installed for "
            f"{observed.uri}; installed() must find {_show(record)} in the storage itself, and "
            "make_store() must return a store over the same storage each time"
        )
    _same_record(got, record, "installed() after a restart")
    await _check_read(restarted, observed, record, material, "after a restart")


async def _independent(trial: _Trial) -> None:
    store = trial.store()
    one, other = trial.observed("one"), trial.observed("other")
    kept = await _install(store, one, trial.material("one"), trial.version())
    await _install(store, other, trial.material("other"), trial.version())
    await _install(store, other, trial.material("other"), trial.version())
    _same_record(
        await _installed(store, one), kept, f"installed() for {one.uri} after {other.uri} changed"
    )


async def _shared_certificate(trial: _Trial) -> None:
    store = trial.store()
    one, other = trial.observed("one"), trial.observed("other")
    material = trial.material()
    first = await _install(store, one, material, trial.version())
    second_version = trial.version()
    second = await _install(store, other, material, second_version)
    _check_record(second, other, material, second_version, "the second URL's record")
    _same_record(await _installed(store, one), first, f"installed() for {one.uri}")
    _same_record(await _installed(store, other), second, f"installed() for {other.uri}")
    replaced = await _install(store, other, trial.material("new"), trial.version())
    _same_record(await _installed(store, one), first, f"installed() for {one.uri} after the other")
    _same_record(await _installed(store, other), replaced, f"installed() for {other.uri}")


async def _failure_keeps_previous(trial: _Trial) -> None:
    store = trial.store()
    observed, material = trial.observed(), trial.material()
    first = await _install(store, observed, material, trial.version())
    broken, version = _unexportable(trial.material("broken")), trial.version()
    try:
        claimed = await store.install(observed, broken, version)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        if _leaks(f"{exc} {exc!r}", [material]):
            raise AssertionError(
                f"the failed install's {type(exc).__name__} shows the private key"
            ) from None
    else:
        # A store that never needs the key succeeded; then it must stand by what it said.
        _same_record(await _installed(store, observed), claimed, "installed() after install()")
        return
    what = f"installed() after an install of version {version} failed ({error})"
    _same_record(await _installed(store, observed), first, what)
    _same_record(await _installed(trial.store(), observed), first, f"after a restart, {what}")
    await _check_read(store, observed, first, material, "after a failed install")
    material, version = trial.material("next"), trial.version()
    record = await _install(store, observed, material, version)
    _same_record(await _installed(store, observed), record, "installed() after the next install")


async def _concurrent(trial: _Trial) -> None:
    store = trial.store()
    wanted = [
        (trial.observed(f"c{i}"), trial.material(f"c{i}"), trial.version())
        for i in range(_CONCURRENT)
    ]
    records: dict[SecretUri, InstalledCertificate] = {}
    failures: list[AssertionError] = []

    async def install(observed: ObservedCertificate, material: CertificateMaterial, v: str) -> None:
        try:
            records[observed.uri] = await _install(store, observed, material, v)
        except AssertionError as exc:  # raised after the group, not inside an ExceptionGroup
            failures.append(exc)

    async with anyio.create_task_group() as tg:
        for observed, material, version in wanted:
            tg.start_soon(install, observed, material, version)
    if failures:
        raise AssertionError(f"{len(failures)} concurrent install(s) failed: {failures[0]}")
    for observed, material, version in wanted:
        record = records[observed.uri]
        _check_record(
            record, observed, material, version, f"the concurrent install of {observed.uri}"
        )
        _same_record(await _installed(store, observed), record, f"installed() for {observed.uri}")
        await _check_read(store, observed, record, material, f"{observed.uri} after concurrency")


async def _readers_see_whole_versions(trial: _Trial) -> None:
    store = trial.store()
    observed = trial.observed()
    old = await _install(store, observed, trial.material("old"), trial.version())
    material, version = trial.material("new"), trial.version()
    seen: list[InstalledCertificate | None] = []
    failures: list[AssertionError] = []
    done = anyio.Event()
    new: list[InstalledCertificate] = []

    async def replace() -> None:
        try:
            new.append(await _install(store, observed, material, version))
        except AssertionError as exc:
            failures.append(exc)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(replace)
        while not done.is_set() and not failures:
            try:
                seen.append(await _installed(store, observed))
            except AssertionError as exc:
                failures.append(exc)
            await anyio.lowlevel.checkpoint()  # a store that never yields must not starve it
    if failures:
        raise failures[0]
    allowed = [old, *new]
    for record in seen:
        if record not in allowed:
            raise AssertionError(
                f"while version {version} was being installed, installed() reported "
                f"{_show(record)}; a reader must find the old version or the new one, whole"
            )


async def _exercise(trial: _Trial, store: Store) -> list[CertificateMaterial]:
    """Every path of the protocol once: nothing, install, again, replace, failure, restart."""
    observed = trial.observed()
    first, second = trial.material("one"), trial.material("two")
    await _installed(store, observed)
    version = trial.version()
    record = await _install(store, observed, first, version)
    await _install(store, observed, first, version)
    await _installed(store, observed)
    await _check_read(store, observed, record, first, "read()")
    record = await _install(store, observed, second, trial.version())
    with contextlib.suppress(Exception):
        await store.install(observed, _unexportable(trial.material("broken")), trial.version())
    restarted = trial.store()
    await _installed(restarted, observed)
    if isinstance(restarted, ReadableStore):
        await restarted.read(observed)
    return [first, second]


async def _loop_not_blocked(trial: _Trial) -> None:
    store = trial.store()
    with _WATCH.armed() as seen:
        await _exercise(trial, store)
    if seen:
        shown = ", ".join(dict.fromkeys(seen))
        raise AssertionError(
            f"the store did blocking work on the event loop's thread: {shown}; run it in a "
            "worker thread (anyio.to_thread.run_sync)"
        )


async def _no_secrets(trial: _Trial) -> None:
    store = trial.store()
    with _captured_logs() as lines:
        materials = await _exercise(trial, store)
        record = await _install(store, trial.observed("last"), materials[0], trial.version())
    texts = {
        "repr(store)": repr(store),
        "str(store)": str(store),
        "repr() of its record": repr(record),
        "its record's location": record.location,
    }
    for what, text in texts.items():
        if _leaks(text, materials):
            raise AssertionError(f"{what} shows the private key")
    for line in lines:
        if _leaks(line, materials):
            source = " ".join(line.split(" ", 2)[:2])  # logger and level; the rest is secret
            raise AssertionError(f"a log line ({source}) shows the private key")


async def _read_gives_back(trial: _Trial) -> None:
    store = trial.store()
    if not isinstance(store, ReadableStore):
        raise RuleNotApplicable(f"{type(store).__name__} is not a ReadableStore (it has no read)")
    observed, material, version = trial.observed(), trial.material(), trial.version()
    record = await _install(store, observed, material, version)
    await _check_read(store, observed, record, material, "after install()")


#: The Store contract, rule by rule, in the order check_store runs them.
STORE_RULES: tuple[StoreRule, ...] = (
    StoreRule(
        "install-describes",
        "install() returns an InstalledCertificate of the URL (no version), the version given, "
        "the leaf's thumbprint and not_after (timezone-aware), and a location",
        _install_describes,
    ),
    StoreRule(
        "nothing-installed",
        "installed() (and read()) give None for a certificate never installed",
        _nothing_installed,
    ),
    StoreRule(
        "installed-matches-install",
        "installed() reports exactly the record install() returned",
        _installed_matches,
    ),
    StoreRule(
        "replaces-version",
        "installing a new version replaces the old one: installed() reports the new one",
        _replaces,
    ),
    StoreRule(
        "reinstall-is-idempotent",
        "installing the version already in place succeeds and changes nothing",
        _idempotent,
    ),
    StoreRule(
        "survives-restart",
        "a new store over the same storage reports what was installed (a restart installs "
        "nothing and fires no event)",
        _survives_restart,
    ),
    StoreRule(
        "certificates-independent",
        "installing one certificate never changes what is installed for another",
        _independent,
    ),
    StoreRule(
        "shared-certificate",
        "two URLs may hold the very same certificate; each keeps its own version",
        _shared_certificate,
    ),
    StoreRule(
        "failed-install-keeps-previous",
        "an install that fails raises and leaves the previous version installed, intact and "
        "usable, and the store can install again after it",
        _failure_keeps_previous,
    ),
    StoreRule(
        "concurrent-installs",
        f"installs of different certificates may run concurrently ({_CONCURRENT} here); each "
        "lands whole",
        _concurrent,
    ),
    StoreRule(
        "readers-see-whole-versions",
        "while a new version is being installed, installed() reports the old or the new one, "
        "never nothing and never a mix (atomic replacement)",
        _readers_see_whole_versions,
    ),
    StoreRule(
        "loop-not-blocked",
        "blocking work (files, processes, sleeps, foreign calls) runs in worker threads, never "
        "on the event loop",
        _loop_not_blocked,
    ),
    StoreRule(
        "no-secrets-exposed",
        "the private key never appears in the store's repr, its records, its log lines or its "
        "exceptions",
        _no_secrets,
    ),
    StoreRule(
        "read-gives-back",
        "a ReadableStore's read() gives the installed record with its certificate, chain and key",
        _read_gives_back,
    ),
)

_BY_NAME = {rule.name: rule for rule in STORE_RULES}


def _default_observed(uri: SecretUri) -> ObservedCertificate:
    return ObservedCertificate(uri)


def _find(rule: str | StoreRule) -> StoreRule:
    if isinstance(rule, StoreRule):
        return rule
    try:
        return _BY_NAME[rule]
    except KeyError:
        raise ValueError(
            f"no store rule is called {rule!r}; there are {', '.join(_BY_NAME)}"
        ) from None


async def check_store_rule(
    rule: str | StoreRule, make_store: MakeStore, *, observed: MakeObserved | None = None
) -> None:
    """Check one rule; AssertionError saying what broke it, RuleNotApplicable to skip it."""
    found = _find(rule)
    trial = _Trial(found.name, make_store, observed or _default_observed)
    try:
        await found.check(trial)
    except AssertionError as exc:
        raise AssertionError(f"{found.name}: {exc}\n  the rule: {found.summary}") from exc


async def check_store(
    make_store: MakeStore,
    *,
    observed: MakeObserved | None = None,
    rules: Iterable[str] | None = None,
) -> None:
    """Check every rule (or those named); one AssertionError lists each rule that broke."""
    chosen = [_find(name) for name in rules] if rules is not None else list(STORE_RULES)
    broken: list[str] = []
    for rule in chosen:
        try:
            await check_store_rule(rule, make_store, observed=observed)
        except RuleNotApplicable:
            continue
        except AssertionError as exc:
            broken.append(str(exc))
    if broken:
        count = f"{len(broken)} of {len(chosen)} store rules broken"
        raise AssertionError(f"{count}:\n" + "\n".join(f"- {text}" for text in broken))
