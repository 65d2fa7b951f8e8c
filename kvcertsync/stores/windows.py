"""WindowsCertStore: install certificates into Windows system stores as KeyVaultForWindows does.

The store logic here talks to a narrow backend (``WindowsCertBackend``): import a PFX, list a
system store, add or delete a certificate, set a property, read and write a key's DACL, look up an
account. :class:`kvcertsync.stores._crypt32.Crypt32Backend` implements it over crypt32 on Windows;
``kvcertsync.stores._fakewin.FakeWindowsCertBackend`` implements it in memory for tests.

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
raises ``InstallIncomplete``, whose ``installed`` says what is now current.

When the very same certificate (same SHA-1) is already in the target store with a private key (a
second observed secret holding it, a rollback, an administrator's import), nothing is imported:
another PFXImportCertStore would create a second key container, and replacing the certificate would
point it at that one, orphaning the old container and losing the read access granted on it. The
accounts are granted on the existing key instead, the intermediates added, the friendly name set,
and the description written last (the commit point); then its CERT_RENEWAL_PROP_ID is removed, as a
replacement would have done (keeping it could make A -> B -> A renewal loops). If that certificate's
key is in a legacy CryptoAPI provider CNG cannot open, the install is refused with a StoreError that
says how to remove it: importing again would orphan that container.

Checked up front, before Windows is touched: LocalMachine targets need administrator rights (an
elevated process or LocalSystem); Root and AuthRoot are never targets. Key access is decided on
parsed ACEs (Windows reads back ``(A;;GR;;;S-1-5-20)`` as ``(A;;FR;;;NS)``), and after a write the
DACL is read back and checked. Certificates a store only shows (a CurrentUser store shows
LocalMachine's; Group Policy's) are never taken for kvcertsync's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import secrets
import sys
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.serialization import pkcs12

from kvcertsync.errors import SecretUriError, StoreError
from kvcertsync.material import certificate_dns_names
from kvcertsync.stores import _sddl
from kvcertsync.stores._crypt32 import (
    CERT_ACCESS_STATE_GP_SYSTEM_STORE_FLAG,
    CERT_ACCESS_STATE_LM_SYSTEM_STORE_FLAG,
    CERT_ACCESS_STATE_PROP_ID,
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

_READ_PROPERTIES = (
    CERT_FRIENDLY_NAME_PROP_ID,
    CERT_DESCRIPTION_PROP_ID,
    CERT_RENEWAL_PROP_ID,
    CERT_ACCESS_STATE_PROP_ID,
)
_IDENTITY = re.compile(
    r"kvcertsync: (?P<url>\S+) installed (?P<at>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z)"
)
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"
_TICK = timedelta(microseconds=1)
#: Win32 errors that mean "this certificate has no private key at all" (rather than "cannot read
#: it"): no CERT_KEY_PROV_INFO, or a key container that is gone. Importing it again orphans nothing.
_NO_KEY = frozenset({CRYPT_E_NO_KEY_PROPERTY, NTE_BAD_KEYSET})
#: Stores kvcertsync never writes to: trust anchors are the administrator's decision (and adding to
#: CurrentUser\Root makes Windows ask the interactive user in a dialog, which a service cannot).
_ROOT_STORES = frozenset({"ROOT", "AUTHROOT"})
#: Certificates a system store shows that live elsewhere (CurrentUser stores show LocalMachine's;
#: Group Policy's are read-only): never kvcertsync's to identify, link or delete.
_ELSEWHERE = {
    "CurrentUser": CERT_ACCESS_STATE_LM_SYSTEM_STORE_FLAG | CERT_ACCESS_STATE_GP_SYSTEM_STORE_FLAG,
    "LocalMachine": CERT_ACCESS_STATE_GP_SYSTEM_STORE_FLAG,
}


# --------------------------------------------------------------------------- backend interface


class PfxImport(Protocol):
    """The in-memory store PFXImportCertStore returned; certificates are named by SHA-1."""

    def set_property(self, thumbprint: str, prop_id: int, value: bytes | None) -> None:
        """Set (None: remove) a CRYPT_DATA_BLOB property on an imported certificate."""
        ...

    def key_security(self, thumbprint: str) -> str:
        """The DACL of the certificate's persisted CNG key, as Windows reads it back ("D:...")."""
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
        """Delete a certificate from a system store, and its private key when asked.

        With ``delete_key`` the key is acquired first; if that fails (except for a certificate
        without a key) nothing is deleted.
        """
        ...

    def key_security(self, location: str, store: str, thumbprint: str) -> str:
        """The DACL of the CNG key of a certificate in a system store, as SDDL ("D:...").

        Windows' own text: SIDs as aliases, generic rights mapped. A certificate without a private
        key raises Win32Error with CRYPT_E_NO_KEY_PROPERTY or NTE_BAD_KEYSET; one whose key is in
        a legacy CryptoAPI provider CNG cannot open raises NTE_BAD_PROVIDER.
        """
        ...

    def set_key_security(self, location: str, store: str, thumbprint: str, sddl: str) -> None:
        """Replace the DACL of the CNG key of a certificate in a system store (persisted)."""
        ...

    def lookup_account(self, name: str) -> str | None:
        """The account's string SID ("S-1-5-20"), or None when no such account exists."""
        ...

    def is_elevated(self) -> bool:
        """Whether this process has administrator rights (elevated, or LocalSystem)."""
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
    return frozenset(name.lower().rstrip(".") for name in certificate_dns_names(certificate))


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

#: Who keeps full control of machine keys (the KSP's own default): LocalSystem, Administrators.
_MACHINE_KEY_OWNERS = ("SY", "BA")


def _grant_read_access(sddl: str, sids: Sequence[str], *, full_control: Sequence[str] = ()) -> str:
    """``sddl`` with an allow-read ACE for each of ``sids`` and full control for ``full_control``.

    Who has what is decided on the parsed ACEs (SIDs resolved, generic rights mapped), since
    Windows reads back ``GR`` for S-1-5-20 as ``FR`` for NS. ACEs already there are kept as they
    are; a SID that already has read (or more) gets nothing new. New ACEs go after the explicit
    ACEs and before inherited ones, keeping canonical order.
    """
    descriptor = _sddl.parse(sddl)
    if descriptor.null_dacl:
        return sddl  # a NULL DACL already lets everyone in; adding ACEs would lock people out
    wanted = [(sid, _sddl.FILE_ALL_ACCESS, "FA") for sid in full_control]
    wanted += [(sid, _sddl.FILE_GENERIC_READ, "GR") for sid in sids]
    added: list[_sddl.Ace] = []
    for sid, rights, alias in wanted:
        if not descriptor.with_explicit(added).grants(sid, rights):
            added.append(_sddl.Ace.parse(f"(A;;{alias};;;{sid})"))
    return descriptor.with_explicit(added).text() if added else sddl


def _missing_read(sddl: str, sids: Sequence[str]) -> list[str]:
    """The SIDs the key's DACL, as Windows reads it back, does not let read."""
    descriptor = _sddl.parse(sddl)
    return [sid for sid in sids if not descriptor.grants(sid, _sddl.FILE_GENERIC_READ)]


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
        self._elevated: bool | None = None

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
        self._check_elevated(location, where)
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
                        _check_granted(staged.key_security(leaf), plan, leaf)
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
        backend = self._backend
        try:
            current = backend.key_security(plan.location, plan.store, leaf)
        except Win32Error as error:
            if error.code in _NO_KEY:
                logger.info(
                    "%s: %s is there without a private key (%s); importing it",
                    plan.where,
                    leaf,
                    error,
                )
                return None
            if error.code == NTE_BAD_PROVIDER:
                raise _legacy_key(plan, leaf, error) from error
            raise StoreError(
                f"{plan.where}: cannot read the private key access of {leaf}: {error}"
            ) from error
        if plan.sids:
            with _win32(plan.where, "grant accounts read access to the private key"):
                wanted = _granted(current, plan.sids, plan.location, plan.where)
                if wanted != current:
                    backend.set_key_security(plan.location, plan.store, leaf, wanted)
                    _check_granted(
                        backend.key_security(plan.location, plan.store, leaf), plan, leaf
                    )
        self._add_intermediates(plan.material, plan.location)
        friendly = _encode_text(_friendly_name(plan.observed.uri))
        with _win32(plan.where, "set the certificate's friendly name and description"):
            backend.set_property(
                plan.location, plan.store, leaf, CERT_FRIENDLY_NAME_PROP_ID, friendly
            )
            # The commit point: from here on this install is the current one.
            backend.set_property(
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
                    backend.set_property(
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
        elsewhere = _ELSEWHERE[location]
        return [_Entry.of(item) for item in stored if not _access_state(item) & elsewhere]

    def _check_elevated(self, location: str, where: str) -> None:
        """Refuse a LocalMachine install up front, as Windows would refuse its writes."""
        if location != "LocalMachine":
            return
        if self._elevated is None:
            # Elevation cannot change while a process runs: ask Windows once.
            with _win32(where, "check for administrator rights"):
                self._elevated = self._backend.is_elevated()
        if not self._elevated:
            raise StoreError(
                f"{where}: installing into LocalMachine stores needs administrator rights, and "
                "this process has none: run elevated or as a service account (the Windows "
                "service runs as LocalSystem), or install into CurrentUser"
            )

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
    if store.upper() in _ROOT_STORES:
        raise StoreError(
            f"{observed.uri}: certificateStoreName {observed.store_name!r} is a trusted root "
            "store; kvcertsync never writes to a root store (trust anchors are for an "
            "administrator to add, and CurrentUser\\Root asks the user in a dialog): use My, or "
            "another store"
        )
    return location, store


def _granted(current: str, sids: Sequence[str], location: str, where: str) -> str:
    """The key's DACL with read for ``sids`` (and full control for the machine key owners)."""
    owners = _MACHINE_KEY_OWNERS if location == "LocalMachine" else ()
    try:
        return _grant_read_access(current, sids, full_control=owners)
    except ValueError as error:
        raise StoreError(f"{where}: {error}") from None


def _check_granted(readback: str, plan: _Plan, thumbprint: str) -> None:
    """Fail unless the DACL Windows reads back lets every account read the key."""
    try:
        missing = _missing_read(readback, plan.sids)
    except ValueError as error:
        raise StoreError(f"{plan.where}: {error}") from None
    if missing:
        raise StoreError(
            f"{plan.where}: granted read access to the private key of {thumbprint}, but Windows "
            f"reads its DACL back without it for {', '.join(missing)}: {readback}"
        )


def _legacy_key(plan: _Plan, thumbprint: str, error: Win32Error) -> StoreError:
    """Why an identical certificate with a legacy CryptoAPI key is left alone, and what to do."""
    path = f"Cert:\\{plan.location}\\{plan.store}\\{thumbprint}"
    return StoreError(
        f"{plan.where}: {thumbprint} is already in the store with a private key in a legacy "
        "CryptoAPI provider that CNG cannot open; kvcertsync leaves it alone, since importing it "
        "again would orphan that key container and the access granted on it. Remove it with its "
        f"key (PowerShell: Remove-Item {path} -DeleteKey), or re-import it into a CNG key storage "
        f"provider, and the next install puts it in ({error})"
    )


def _access_state(stored: StoredCertificate) -> int:
    # CERT_ACCESS_STATE_PROP_ID is a DWORD; a backend that does not know it reports nothing.
    value = stored.properties.get(CERT_ACCESS_STATE_PROP_ID, b"")
    return int.from_bytes(value[:4], "little")


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
