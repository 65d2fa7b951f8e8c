"""WindowsCertStore: install certificates into Windows system stores as KeyVaultForWindows does.

The store logic here talks to a narrow backend (:class:`WindowsCertBackend`): import a PFX, list a
system store, add or delete a certificate, set a property, read and write a key's DACL, look up an
account. :class:`kvcertsync.stores._crypt32.Crypt32Backend` implements it over crypt32 on Windows;
:class:`kvcertsync.stores._fakewin.FakeWindowsCertBackend` implements it in memory for tests.

What an install does, in order (nothing is visible as current until the last step):

1. import our own PFX (leaf, key, intermediates; never a root) with PFXImportCertStore, the key
   persisted in the machine or user key set, exportable only when asked;
2. set the leaf's friendly name and its identity (URL, version, install time) in the description;
3. grant the configured accounts read access to the private key;
4. add the intermediates to the ``CA`` store of the same location;
5. add the leaf to the target store, replacing an identical certificate (the commit point);
6. then, optionally, link older certificates to it (CERT_RENEWAL_PROP_ID) and remove superseded
   versions kvcertsync installed.

A failure before step 5 deletes the key the import created and raises StoreError; a failure after it
raises :class:`InstallIncomplete`, whose ``installed`` says what is now current.

When the very same certificate (same SHA-1) is already in the target store with a private key (a
second observed secret holding it, a rollback, an administrator's import), nothing is imported:
another PFXImportCertStore would create a second key container, and replacing the certificate would
point it at that one, orphaning the old container and losing the read access granted on it. The
accounts are granted on the existing key instead, the intermediates added, the friendly name set,
and the description written last (the commit point); then its CERT_RENEWAL_PROP_ID is removed, as a
replacement would have done (keeping it could make A -> B -> A renewal loops).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import secrets
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.serialization import pkcs12

from kvcertsync.errors import SecretUriError, StoreError
from kvcertsync.stores._crypt32 import (
    CERT_DESCRIPTION_PROP_ID,
    CERT_FRIENDLY_NAME_PROP_ID,
    CERT_RENEWAL_PROP_ID,
    CERT_STORE_ADD_REPLACE_EXISTING,
    CERT_STORE_ADD_USE_EXISTING,
    CRYPT_E_NO_KEY_PROPERTY,
    CRYPT_EXPORTABLE,
    CRYPT_MACHINE_KEYSET,
    CRYPT_USER_KEYSET,
    ERROR_FILE_NOT_FOUND,
    NTE_BAD_KEYSET,
    NTE_BAD_PROVIDER,
    PKCS12_PREFER_CNG_KSP,
    StoredCertificate,
    Win32Error,
)
from kvcertsync.stores.base import InstalledCertificate, InstallIncomplete
from kvcertsync.uri import SecretUri

if TYPE_CHECKING:
    from kvcertsync.material import CertificateMaterial
    from kvcertsync.settings import AgentSettings, ObservedCertificate

__all__ = [
    "INTERMEDIATE_STORE",
    "LOCATIONS",
    "InstallIncomplete",
    "LinkScope",
    "PfxImport",
    "StoredCertificate",
    "Win32Error",
    "WindowsCertBackend",
    "WindowsCertStore",
]

logger = logging.getLogger(__name__)

#: The certificateStoreLocation values that name Windows system store locations.
LOCATIONS = ("LocalMachine", "CurrentUser")
#: Where intermediates go: "Intermediate Certification Authorities" of the same location.
INTERMEDIATE_STORE = "CA"

LinkScope = Literal["san", "managed"]

_READ_PROPERTIES = (CERT_FRIENDLY_NAME_PROP_ID, CERT_DESCRIPTION_PROP_ID, CERT_RENEWAL_PROP_ID)
_IDENTITY = re.compile(
    r"kvcertsync: (?P<url>\S+) installed (?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z)"
)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_TICK = timedelta(microseconds=1)
#: Win32 errors that mean "this certificate has no private key CNG can open" (rather than "cannot
#: read it"): no CERT_KEY_PROV_INFO, a container that is gone, a key CNG does not handle.
_NO_USABLE_KEY = frozenset({CRYPT_E_NO_KEY_PROPERTY, NTE_BAD_KEYSET, NTE_BAD_PROVIDER})


# --------------------------------------------------------------------------- backend interface


class PfxImport(Protocol):
    """The in-memory store PFXImportCertStore returned; certificates are named by SHA-1."""

    def set_property(self, thumbprint: str, prop_id: int, value: bytes | None) -> None:
        """Set (None: remove) a CRYPT_DATA_BLOB property on an imported certificate."""
        ...

    def key_security(self, thumbprint: str) -> str:
        """The DACL of the certificate's persisted CNG key, as SDDL ("D:...")."""
        ...

    def set_key_security(self, thumbprint: str, sddl: str) -> None:
        """Replace the DACL of the certificate's persisted CNG key."""
        ...

    def add_to_store(self, thumbprint: str, location: str, store: str, disposition: int) -> None:
        """Add the imported certificate, with its properties, to a system store."""
        ...

    def delete_key(self, thumbprint: str) -> None:
        """Delete the key container the import persisted for the certificate."""
        ...

    def close(self) -> None:
        """Release the in-memory store (persisted keys stay)."""
        ...


class WindowsCertBackend(Protocol):
    """The narrow set of crypt32/ncrypt/advapi32 operations WindowsCertStore needs."""

    def import_pfx(self, pfx: bytes, password: str, flags: int) -> PfxImport:
        """PFXImportCertStore with ``flags``; keys are persisted unless PKCS12_NO_PERSIST_KEY."""
        ...

    def certificates(
        self, location: str, store: str, prop_ids: Sequence[int]
    ) -> list[StoredCertificate]:
        """A system store's certificates, with those properties present.

        The order is whatever the store enumerates: undocumented, so nothing may depend on it.
        A store that does not exist raises Win32Error(ERROR_FILE_NOT_FOUND).
        """
        ...

    def add_encoded(self, location: str, store: str, der: bytes, disposition: int) -> None:
        """Add a DER certificate (no key) to a system store, creating the store if needed."""
        ...

    def set_property(
        self, location: str, store: str, thumbprint: str, prop_id: int, value: bytes | None
    ) -> None:
        """Set (None: remove) a CRYPT_DATA_BLOB property of a certificate in a system store."""
        ...

    def delete(self, location: str, store: str, thumbprint: str, *, delete_key: bool) -> None:
        """Delete a certificate from a system store, and its private key when asked."""
        ...

    def key_security(self, location: str, store: str, thumbprint: str) -> str:
        """The DACL of the CNG key of a certificate in a system store, as SDDL ("D:...").

        A certificate without a private key CNG can open raises Win32Error with
        CRYPT_E_NO_KEY_PROPERTY, NTE_BAD_KEYSET or NTE_BAD_PROVIDER.
        """
        ...

    def set_key_security(self, location: str, store: str, thumbprint: str, sddl: str) -> None:
        """Replace the DACL of the CNG key of a certificate in a system store (persisted)."""
        ...

    def lookup_account(self, name: str) -> str | None:
        """The account's string SID ("S-1-5-20"), or None when no such account exists."""
        ...


# ----------------------------------------------------------------------------------- errors


@attrs.frozen
class _Plan:
    """One install: what goes where, described how, readable by whom."""

    observed: ObservedCertificate
    material: CertificateMaterial
    location: str
    store: str
    description: str
    sids: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.location}\\{self.store}"


@contextlib.contextmanager
def _win32(where: str, what: str) -> Iterator[None]:
    """Turn a Win32Error into a StoreError naming the store and the step."""
    try:
        yield
    except Win32Error as error:
        raise StoreError(f"{where}: cannot {what}: {error}") from error


# --------------------------------------------------------------------------------- identity


@attrs.frozen
class _Identity:
    """One line of the description: which secret version kvcertsync installed here, and when."""

    uri: SecretUri  # with version
    installed_at: datetime

    def line(self) -> str:
        return f"kvcertsync: {self.uri} installed {self.installed_at.strftime(_TIME_FORMAT)}"

    @classmethod
    def parse(cls, line: str) -> _Identity | None:
        match = _IDENTITY.fullmatch(line.strip())
        if match is None:
            return None
        try:
            uri = SecretUri.parse(match["url"], allow_any_host=True)
            at = datetime.strptime(match["at"], _TIME_FORMAT).replace(tzinfo=UTC)
        except (SecretUriError, ValueError):
            return None
        return cls(uri, at) if uri.version is not None else None

    def is_for(self, uri: SecretUri) -> bool:
        return self.uri.latest == uri.latest


@attrs.frozen
class _Entry:
    """A certificate in a system store, as this module reads it."""

    thumbprint: str
    der: bytes
    description: tuple[str, ...]  # lines
    identities: tuple[_Identity, ...]
    renewal: str | None

    @classmethod
    def of(cls, stored: StoredCertificate) -> _Entry:
        props = stored.properties
        lines = tuple(_decode_text(props.get(CERT_DESCRIPTION_PROP_ID)).splitlines())
        identities = tuple(i for i in map(_Identity.parse, lines) if i is not None)
        renewal = props.get(CERT_RENEWAL_PROP_ID)
        return cls(
            thumbprint=_thumbprint(stored.der),
            der=stored.der,
            description=lines,
            identities=identities,
            renewal=renewal.hex().upper() if renewal else None,
        )

    def identities_for(self, uri: SecretUri) -> list[_Identity]:
        return [identity for identity in self.identities if identity.is_for(uri)]


def _thumbprint(der: bytes) -> str:
    # SHA-1 is how Windows names certificates (CERT_SHA1_HASH_PROP_ID), not a security check.
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def _encode_text(text: str) -> bytes:
    # String properties are NUL-terminated UTF-16LE, as the certificate UI writes them.
    return (text + "\0").encode("utf-16-le")


def _decode_text(value: bytes | None) -> str:
    if not value:
        return ""
    return value.decode("utf-16-le", "replace").split("\0", 1)[0]


def _dns_names(certificate: x509.Certificate) -> frozenset[str]:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return frozenset()
    return frozenset(
        name.lower().rstrip(".") for name in san.value.get_values_for_type(x509.DNSName)
    )


def _is_self_issued(certificate: x509.Certificate) -> bool:
    return certificate.issuer == certificate.subject


def _description(existing: _Entry | None, identity: _Identity, uri: SecretUri) -> str:
    """The new description: what was there (other secrets' identities too), minus our old line."""
    kept = [
        line
        for line in (existing.description if existing else ())
        if not ((parsed := _Identity.parse(line)) and parsed.is_for(uri))
    ]
    return "\n".join([*kept, identity.line()])


# ------------------------------------------------------------------------------- key ACLs

# SDDL aliases of well-known SIDs (sddl.h), so an ACE written as "NS" matches "S-1-5-20".
_SID_ALIASES = {
    "AN": "S-1-5-7",
    "AU": "S-1-5-11",
    "BA": "S-1-5-32-544",
    "BU": "S-1-5-32-545",
    "CO": "S-1-3-0",
    "IU": "S-1-5-4",
    "LS": "S-1-5-19",
    "NS": "S-1-5-20",
    "NU": "S-1-5-2",
    "OW": "S-1-3-4",
    "PS": "S-1-5-10",
    "RC": "S-1-5-12",
    "SU": "S-1-5-6",
    "SY": "S-1-5-18",
    "WD": "S-1-1-0",
}
_READ_RIGHTS = frozenset({"GR", "GA", "FR", "FA"})
_FULL_RIGHTS = frozenset({"GA", "FA"})
_GENERIC_READ = 0x80000000  # winnt.h
_GENERIC_ALL = 0x10000000  # winnt.h
_FILE_GENERIC_READ = 0x00120089  # winnt.h (SDDL "FR")
_FILE_ALL_ACCESS = 0x001F01FF  # winnt.h (SDDL "FA")
#: Who keeps full control of machine keys (the KSP's own default): LocalSystem, Administrators.
_MACHINE_KEY_OWNERS = ("SY", "BA")


def _canonical_sid(sid: str) -> str:
    sid = sid.strip().upper()
    return _SID_ALIASES.get(sid, sid)


def _split_dacl(sddl: str) -> tuple[str, str, list[str], str]:
    """(text before the DACL, DACL flags, ACE strings, text after) of an SDDL string."""
    depth = 0
    start = -1
    for index, char in enumerate(sddl):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif depth == 0 and sddl.startswith("D:", index):
            start = index
            break
    if start < 0:
        raise ValueError(f"the key's security descriptor has no DACL: {sddl!r}")
    index = start + 2
    while index < len(sddl) and sddl[index] not in "(" and not sddl.startswith("S:", index):
        index += 1
    flags = sddl[start + 2 : index]
    aces: list[str] = []
    while index < len(sddl) and sddl[index] == "(":
        depth, end = 0, index
        for end in range(index, len(sddl)):
            depth += {"(": 1, ")": -1}.get(sddl[end], 0)
            if depth == 0:
                break
        if depth != 0:
            raise ValueError(f"unbalanced parentheses in security descriptor {sddl!r}")
        aces.append(sddl[index : end + 1])
        index = end + 1
    return sddl[:start], flags, aces, sddl[index:]


def _ace_grants(ace: str, sid: str, rights: frozenset[str], mask_bits: Iterable[int]) -> bool:
    fields = ace[1:-1].split(";")
    if len(fields) < 6 or fields[0].upper() != "A" or _canonical_sid(fields[5]) != sid:
        return False
    text = fields[2].strip().upper()
    if text.startswith("0X"):
        try:
            mask = int(text, 16)
        except ValueError:
            return False
        return any(mask & bits == bits for bits in mask_bits)
    return any(text[i : i + 2] in rights for i in range(0, len(text), 2))


def _grant_read_access(sddl: str, sids: Sequence[str], *, full_control: Sequence[str] = ()) -> str:
    """``sddl`` with an allow-read ACE for each of ``sids`` and full control for ``full_control``.

    ACEs already there are kept as they are; a SID that already has read (or more) gets nothing
    new. New ACEs go after the explicit ACEs and before inherited ones, keeping canonical order.
    """
    prefix, flags, aces, suffix = _split_dacl(sddl)
    if "NO_ACCESS_CONTROL" in flags.upper():
        return sddl  # a NULL DACL already lets everyone in; adding ACEs would lock people out
    wanted: list[str] = []
    for raw in full_control:
        sid = _canonical_sid(raw)
        if not any(
            _ace_grants(ace, sid, _FULL_RIGHTS, (_GENERIC_ALL, _FILE_ALL_ACCESS))
            for ace in [*aces, *wanted]
        ):
            wanted.append(f"(A;;FA;;;{raw})")
    for raw in sids:
        sid = _canonical_sid(raw)
        bits = (_GENERIC_READ, _GENERIC_ALL, _FILE_GENERIC_READ)
        if not any(_ace_grants(ace, sid, _READ_RIGHTS, bits) for ace in [*aces, *wanted]):
            wanted.append(f"(A;;GR;;;{raw})")
    if not wanted:
        return sddl
    position = next(
        (i for i, ace in enumerate(aces) if "ID" in ace[1:-1].split(";")[1].upper()), len(aces)
    )
    aces[position:position] = wanted
    return f"{prefix}D:{flags}{''.join(aces)}{suffix}"


# ---------------------------------------------------------------------------------- helpers


def _import_flags(location: str, exportable: bool) -> int:
    """PFXImportCertStore flags: key set by location, CNG preferred, exportable only on request."""
    flags = CRYPT_MACHINE_KEYSET if location == "LocalMachine" else CRYPT_USER_KEYSET
    flags |= PKCS12_PREFER_CNG_KSP
    if exportable:
        flags |= CRYPT_EXPORTABLE
    return flags


def _intermediates(material: CertificateMaterial) -> list[x509.Certificate]:
    """The chain without roots: the extension never installs a trust anchor."""
    return [cert for cert in material.chain if not _is_self_issued(cert)]


def _pfx_for_import(material: CertificateMaterial, friendly_name: str) -> tuple[bytes, str]:
    """A PFX for crypt32 alone, under a one-time password, in the format every Windows reads.

    Not ``material.to_pkcs12()``: its password form is AES-256/SHA-256 (Windows Server 2019+
    only) and its password-less form hands crypt32 the NULL-versus-empty password ambiguity.
    3DES/SHA-1 is what Windows itself has always exported; this PFX never leaves the process.
    """
    password = secrets.token_urlsafe(24)
    encryption = (
        serialization.PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(2048)
        .key_cert_algorithm(pkcs12.PBES.PBESv1SHA1And3KeyTripleDESCBC)
        .hmac_hash(hashes.SHA1())  # noqa: S303 - PKCS#12 MAC for compatibility, see docstring
        .build(password.encode("ascii"))
    )
    pfx = pkcs12.serialize_key_and_certificates(
        friendly_name.encode("utf-8"),
        material.private_key,
        material.certificate,
        _intermediates(material) or None,
        encryption,
    )
    return pfx, password


def _friendly_name(uri: SecretUri) -> str:
    return f"{uri.vault_name}.{uri.name}"


def _default_backend() -> WindowsCertBackend:
    if sys.platform == "win32":
        from kvcertsync.stores._crypt32 import Crypt32Backend

        try:
            return Crypt32Backend()
        except OSError as error:
            raise StoreError(f"cannot load the Windows crypto API: {error}") from error
    raise StoreError(
        f"WindowsCertStore needs Windows (crypt32.dll); this is {sys.platform}. Use a directory "
        "store here, or pass backend= (kvcertsync.stores._fakewin.FakeWindowsCertBackend "
        "for tests)"
    )


# ------------------------------------------------------------------------------------ store


class WindowsCertStore:
    """Certificates in Windows system stores, installed the way the Key Vault extension does."""

    def __init__(
        self,
        *,
        backend: WindowsCertBackend | None = None,
        link_on_renewal: bool = False,
        link_scope: LinkScope = "san",
        remove_superseded: bool = False,
    ) -> None:
        if link_scope not in ("san", "managed"):
            raise ValueError(f"link_scope must be 'san' or 'managed', not {link_scope!r}")
        if link_on_renewal and remove_superseded:
            raise ValueError(
                "remove_superseded would delete the certificates linkOnRenewal links from, and "
                "bindings that still name them would break; choose one"
            )
        self._backend = backend if backend is not None else _default_backend()
        self.link_on_renewal = link_on_renewal
        self.link_scope: LinkScope = link_scope
        self.remove_superseded = remove_superseded
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    @classmethod
    def from_settings(
        cls, settings: AgentSettings, *, backend: WindowsCertBackend | None = None, **options: Any
    ) -> WindowsCertStore:
        """A store configured as the extension settings say (linkOnRenewal)."""
        options.setdefault("link_on_renewal", settings.link_on_renewal)
        return cls(backend=backend, **options)

    @property
    def backend(self) -> WindowsCertBackend:
        """The backend doing the Windows calls."""
        return self._backend

    # ---- Store protocol

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        """Install ``material`` as ``version`` of ``observed`` into its Windows store."""
        return await anyio.to_thread.run_sync(self._install, observed, material, version)

    async def installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        """The certificate kvcertsync installed last for ``observed`` in its store, or None."""
        return await anyio.to_thread.run_sync(self._installed, observed)

    # ---- blocking work (worker threads)

    def _installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        location, store = _target(observed)
        where = f"{location}\\{store}"
        entries = self._entries(location, store, where)
        return _current(entries, observed, where)

    def _install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        location, store = _target(observed)
        where = f"{location}\\{store}"
        _check_key(material, where)
        leaf = material.thumbprint
        with self._lock(location, store):
            entries = self._entries(location, store, where)
            identity = _Identity(observed.uri.with_version(version), _next_time(entries, observed))
            same = next((entry for entry in entries if entry.thumbprint == leaf), None)
            description = _description(same, identity, observed.uri)
            sids, unknown = self._resolve(observed.accounts, where)
            record = InstalledCertificate(
                uri=observed.uri,
                version=version,
                thumbprint=leaf,
                not_after=material.not_after,
                location=where,
            )
            plan = _Plan(observed, material, location, store, description, tuple(sids))
            problems: list[str] = []
            updated = self._update_in_place(same, plan) if same is not None else None
            if updated is None:
                self._stage_and_commit(plan)
            else:
                problems += updated
            logger.info("%s: installed %s version %s (%s)", where, observed.uri, version, leaf)
            if unknown:
                names = ", ".join(repr(name) for name in unknown)
                problems.append(
                    f"account(s) {names} not found: not granted read access to the private key"
                )
            others = [entry for entry in entries if entry.thumbprint != leaf]
            if self.link_on_renewal:
                problems += self._link(others, observed, material, location, store, where)
            if self.remove_superseded:
                problems += self._remove_superseded(others, observed, location, store, where)
        if problems:
            error = InstallIncomplete(record, problems)
            logger.error("%s", error)
            raise error
        return record

    def _stage_and_commit(self, plan: _Plan) -> None:
        leaf = plan.material.thumbprint
        friendly = _friendly_name(plan.observed.uri)
        pfx, password = _pfx_for_import(plan.material, friendly)
        flags = _import_flags(plan.location, plan.observed.key_exportable)
        with _win32(plan.where, "import the certificate and its private key (PFXImportCertStore)"):
            staged = self._backend.import_pfx(pfx, password, flags)
        committed = False
        try:
            with _win32(plan.where, "set the certificate's friendly name and description"):
                staged.set_property(leaf, CERT_FRIENDLY_NAME_PROP_ID, _encode_text(friendly))
                staged.set_property(leaf, CERT_DESCRIPTION_PROP_ID, _encode_text(plan.description))
            if plan.sids:
                with _win32(plan.where, "grant accounts read access to the private key"):
                    current = staged.key_security(leaf)
                    wanted = _granted(current, plan.sids, plan.location, plan.where)
                    if wanted != current:
                        staged.set_key_security(leaf, wanted)
            self._add_intermediates(plan.material, plan.location)
            with _win32(plan.where, "add the certificate to the store"):
                staged.add_to_store(
                    leaf, plan.location, plan.store, CERT_STORE_ADD_REPLACE_EXISTING
                )
            committed = True
        finally:
            try:
                if not committed:
                    _discard(staged, leaf, plan.where)
            finally:
                staged.close()

    def _update_in_place(self, same: _Entry, plan: _Plan) -> list[str] | None:
        """Install over the identical certificate already in the store, keeping its private key.

        Returns the problems after the commit, or None when that certificate has no private key
        CNG can open: then it has to be imported (and replaced) after all.
        """
        leaf = same.thumbprint
        try:
            current = self._backend.key_security(plan.location, plan.store, leaf)
        except Win32Error as error:
            if error.code in _NO_USABLE_KEY:
                logger.info(
                    "%s: %s is there without a usable private key (%s); importing it",
                    plan.where,
                    leaf,
                    error,
                )
                return None
            raise StoreError(
                f"{plan.where}: cannot read the private key access of {leaf}: {error}"
            ) from error
        if plan.sids:
            with _win32(plan.where, "grant accounts read access to the private key"):
                wanted = _granted(current, plan.sids, plan.location, plan.where)
                if wanted != current:
                    self._backend.set_key_security(plan.location, plan.store, leaf, wanted)
        self._add_intermediates(plan.material, plan.location)
        friendly = _encode_text(_friendly_name(plan.observed.uri))
        with _win32(plan.where, "set the certificate's friendly name and description"):
            self._backend.set_property(
                plan.location, plan.store, leaf, CERT_FRIENDLY_NAME_PROP_ID, friendly
            )
            # The commit point: from here on this install is the current one.
            self._backend.set_property(
                plan.location,
                plan.store,
                leaf,
                CERT_DESCRIPTION_PROP_ID,
                _encode_text(plan.description),
            )
        problems: list[str] = []
        if same.renewal is not None:
            try:
                with _win32(plan.where, f"remove the renewal link of {leaf}"):
                    self._backend.set_property(
                        plan.location, plan.store, leaf, CERT_RENEWAL_PROP_ID, None
                    )
            except StoreError as error:
                problems.append(str(error))
        return problems

    def _add_intermediates(self, material: CertificateMaterial, location: str) -> None:
        ca_store = f"{location}\\{INTERMEDIATE_STORE}"
        for cert in _intermediates(material):
            der = cert.public_bytes(serialization.Encoding.DER)
            with _win32(ca_store, f"add intermediate {_thumbprint(der)}"):
                self._backend.add_encoded(
                    location, INTERMEDIATE_STORE, der, CERT_STORE_ADD_USE_EXISTING
                )

    def _resolve(self, accounts: Sequence[str], where: str) -> tuple[list[str], list[str]]:
        sids: list[str] = []
        unknown: list[str] = []
        for account in accounts:
            with _win32(where, f"look up account {account!r}"):
                sid = self._backend.lookup_account(account)
            if sid is None:
                unknown.append(account)
            elif sid not in sids:
                sids.append(sid)
        return sids, unknown

    def _link(
        self,
        others: Sequence[_Entry],
        observed: ObservedCertificate,
        material: CertificateMaterial,
        location: str,
        store: str,
        where: str,
    ) -> list[str]:
        """Point older certificates at the new one, so Schannel bindings follow the renewal."""
        new_names = _dns_names(material.certificate)
        new_hash = bytes.fromhex(material.thumbprint)
        problems: list[str] = []
        for entry in others:
            if self.link_scope == "managed" and not entry.identities_for(observed.uri):
                continue
            try:
                names = _dns_names(x509.load_der_x509_certificate(entry.der))
            except ValueError:
                continue  # someone else's malformed certificate: never a renewal candidate
            if not names or not names <= new_names or entry.renewal == material.thumbprint:
                continue
            try:
                with _win32(where, f"link {entry.thumbprint} to its renewal"):
                    self._backend.set_property(
                        location, store, entry.thumbprint, CERT_RENEWAL_PROP_ID, new_hash
                    )
            except StoreError as error:
                problems.append(str(error))
                continue
            logger.info("%s: linked %s to its renewal %s", where, entry.thumbprint, new_hash.hex())
        return problems

    def _remove_superseded(
        self,
        others: Sequence[_Entry],
        observed: ObservedCertificate,
        location: str,
        store: str,
        where: str,
    ) -> list[str]:
        """Delete older versions kvcertsync installed for this URL (never anyone else's)."""
        problems: list[str] = []
        for entry in others:
            if not entry.identities_for(observed.uri):
                continue
            shared = [i for i in entry.identities if not i.is_for(observed.uri)]
            try:
                if shared:
                    # Another observed secret holds the same certificate: only forget ours.
                    kept = [
                        line
                        for line in entry.description
                        if not ((parsed := _Identity.parse(line)) and parsed.is_for(observed.uri))
                    ]
                    with _win32(where, f"update the description of {entry.thumbprint}"):
                        self._backend.set_property(
                            location,
                            store,
                            entry.thumbprint,
                            CERT_DESCRIPTION_PROP_ID,
                            _encode_text("\n".join(kept)),
                        )
                else:
                    with _win32(where, f"remove superseded {entry.thumbprint}"):
                        self._backend.delete(location, store, entry.thumbprint, delete_key=True)
                    logger.info("%s: removed superseded %s", where, entry.thumbprint)
            except StoreError as error:
                problems.append(str(error))
        return problems

    def _entries(self, location: str, store: str, where: str) -> list[_Entry]:
        try:
            stored = self._backend.certificates(location, store, _READ_PROPERTIES)
        except Win32Error as error:
            if error.code == ERROR_FILE_NOT_FOUND:
                return []  # the store does not exist yet: nothing installed
            raise StoreError(f"{where}: cannot list the store: {error}") from error
        return [_Entry.of(item) for item in stored]

    def _lock(self, location: str, store: str) -> threading.Lock:
        # Store names are case-insensitive in Windows ("MY" and "My" are one store).
        key = (location, store.upper())
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())


def _target(observed: ObservedCertificate) -> tuple[str, str]:
    location = observed.store_location
    if location not in LOCATIONS:
        raise StoreError(
            f"{observed.uri}: certificateStoreLocation {location!r} is not a Windows store "
            "location (LocalMachine or CurrentUser); WindowsCertStore cannot install there"
        )
    store = observed.store_name.strip()
    if not store or "\\" in store:
        raise StoreError(
            f"{observed.uri}: certificateStoreName {observed.store_name!r} is not a store name"
        )
    return location, store


def _granted(current: str, sids: Sequence[str], location: str, where: str) -> str:
    """The key's DACL with read for ``sids`` (and full control for the machine key owners)."""
    owners = _MACHINE_KEY_OWNERS if location == "LocalMachine" else ()
    try:
        return _grant_read_access(current, sids, full_control=owners)
    except ValueError as error:
        raise StoreError(f"{where}: {error}") from None


def _check_key(material: CertificateMaterial, where: str) -> None:
    if isinstance(material.private_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise StoreError(
            f"{where}: Windows certificate stores take RSA and ECDSA keys; "
            f"{material.thumbprint} has an EdDSA key"
        )


def _next_time(entries: Sequence[_Entry], observed: ObservedCertificate) -> datetime:
    """Now, but strictly after every earlier install for this URL (coarse or skewed clocks)."""
    now = datetime.now(UTC)
    earlier = [i.installed_at for e in entries for i in e.identities_for(observed.uri)]
    return max([now, *(at + _TICK for at in earlier)])


def _current(
    entries: Sequence[_Entry], observed: ObservedCertificate, where: str
) -> InstalledCertificate | None:
    found = [
        (entry, identity) for entry in entries for identity in entry.identities_for(observed.uri)
    ]
    if not found:
        return None
    # Times are strictly increasing per URL; a tie (a description copied by hand) goes to the
    # greater thumbprint, never to the enumeration order, which nothing documents.
    entry, identity = max(found, key=lambda pair: (pair[1].installed_at, pair[0].thumbprint))
    certificate = x509.load_der_x509_certificate(entry.der)
    assert identity.uri.version is not None  # _Identity.parse only keeps versioned URLs
    return InstalledCertificate(
        uri=observed.uri,
        version=identity.uri.version,
        thumbprint=entry.thumbprint,
        not_after=certificate.not_valid_after_utc,
        location=where,
    )


def _discard(staged: PfxImport, thumbprint: str, where: str) -> None:
    """Delete the key an aborted import persisted, so failures leave no orphaned key behind."""
    try:
        staged.delete_key(thumbprint)
    except Win32Error as error:
        logger.warning("%s: could not delete the key of an aborted import: %s", where, error)


if TYPE_CHECKING:
    # Both implementations must keep satisfying the interface; mypy checks it here.
    from kvcertsync.stores._crypt32 import Crypt32Backend
    from kvcertsync.stores._fakewin import FakeWindowsCertBackend

    def _conforms(real: Crypt32Backend, fake: FakeWindowsCertBackend) -> list[WindowsCertBackend]:
        return [real, fake]
