"""FakeWindowsCertBackend: Windows certificate stores in memory, for tests of WindowsCertStore.

It implements the same backend interface as the crypt32 binding and behaves the way the real stores
do where WindowsCertStore can tell the difference:

- one store per (location, name), names case-insensitive ("MY" is "My"); opening a store for
  writing creates it, listing one that does not exist fails with ERROR_FILE_NOT_FOUND;
- every CurrentUser store but My also shows LocalMachine's store of the same name (as Windows
  does: "all current user certificate stores except Current User/Personal inherit the contents
  of the local machine stores"); those certificates carry CERT_ACCESS_STATE_LM_SYSTEM_STORE_FLAG,
  count for CERT_STORE_ADD_USE_EXISTING, and cannot be changed or deleted through CurrentUser
  (ERROR_ACCESS_DENIED); adding to CurrentUser\\Root fails with ERROR_CANCELLED, the answer to the
  confirmation dialog Windows shows there;
- certificates are identified by SHA-1; CERT_STORE_ADD_REPLACE_EXISTING replaces the certificate
  and all its properties, CERT_STORE_ADD_USE_EXISTING keeps what is there, CERT_STORE_ADD_NEW fails
  with CRYPT_E_EXISTS;
- the order a system store enumerates in is not documented, so WindowsCertStore must not rely on
  any order, and breaks ties deterministically; the fake lists in thumbprint order, which is stable
  and deliberately unrelated to the order certificates were added; a PFX import store lists in PFX
  order;
- PFXImportCertStore persists the private key at import time (unless PKCS12_NO_PERSIST_KEY) into a
  machine or user key container with the exportable flag and a default DACL, and links it only to
  the certificate the key belongs to;
- a key's security descriptor is stored the way Windows stores it and read back the way Windows
  writes it: generic rights mapped to a file's specific rights, well-known SIDs as their aliases
  (``(A;;GR;;;S-1-5-20)`` reads back as ``(A;;FR;;;NS)``); reading it needs READ_CONTROL, writing
  it WRITE_DAC and deleting the key DELETE, from the key's DACL or as its owner, for this process's
  SIDs (:attr:`FakeWindowsCertBackend.caller_sids`), else NTE_PERM;
- keys are CNG keys, or CryptoAPI keys (``add(..., key_provider=...)``): ``"capi"`` is a key in
  Microsoft's own CSP, which CNG opens (so CryptAcquireCertificatePrivateKey with ONLY_NCRYPT
  succeeds), ``"capi-only"`` one in a provider CNG cannot open (NTE_BAD_PROVIDER);
- deleting a certificate with its key acquires the key first, as the binding does: a key that
  cannot be acquired (other than no key at all) fails the delete and deletes nothing;
- writes to LocalMachine need an elevated process (``elevated=False``: ERROR_ACCESS_DENIED), and
  ``is_elevated`` says so;
- errors are :class:`Win32Error` with the real codes, messages and failing function names, and any
  call can be made to fail with :meth:`FakeWindowsCertBackend.fail`, reads included: every store
  opened, for reading or writing, goes through ``CertOpenStore``.
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections import deque
from collections.abc import Sequence
from datetime import datetime
from typing import Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from kvcertsync.material import CertificateMaterial
from kvcertsync.stores import _sddl
from kvcertsync.stores._crypt32 import (
    CERT_ACCESS_STATE_LM_SYSTEM_STORE_FLAG,
    CERT_ACCESS_STATE_PROP_ID,
    CERT_ACCESS_STATE_SYSTEM_STORE_FLAG,
    CERT_DESCRIPTION_PROP_ID,
    CERT_FRIENDLY_NAME_PROP_ID,
    CERT_KEY_PROV_INFO_PROP_ID,
    CERT_RENEWAL_PROP_ID,
    CERT_STORE_ADD_ALWAYS,
    CERT_STORE_ADD_NEW,
    CERT_STORE_ADD_REPLACE_EXISTING,
    CERT_STORE_ADD_USE_EXISTING,
    CRYPT_E_EXISTS,
    CRYPT_E_NO_KEY_PROPERTY,
    CRYPT_E_NOT_FOUND,
    CRYPT_EXPORTABLE,
    CRYPT_MACHINE_KEYSET,
    CRYPT_USER_KEYSET,
    ERROR_ACCESS_DENIED,
    ERROR_CANCELLED,
    ERROR_FILE_NOT_FOUND,
    ERROR_INVALID_HANDLE,
    ERROR_INVALID_PARAMETER,
    ERROR_INVALID_PASSWORD,
    ERROR_NONE_MAPPED,
    LOCATION_FLAGS,
    NTE_BAD_KEYSET,
    NTE_BAD_PROVIDER,
    NTE_PERM,
    PKCS12_ALWAYS_CNG_KSP,
    PKCS12_NO_PERSIST_KEY,
    PKCS12_PREFER_CNG_KSP,
    StoredCertificate,
    Win32Error,
    legacy_key_error,
)

__all__ = ["FakeCertificate", "FakeKey", "FakeWindowsCertBackend", "PfxImportRecord"]

#: The messages FormatMessageW gives for the codes the fake raises (en-US).
MESSAGES = {
    ERROR_FILE_NOT_FOUND: "The system cannot find the file specified.",
    ERROR_ACCESS_DENIED: "Access is denied.",
    ERROR_INVALID_HANDLE: "The handle is invalid.",
    ERROR_INVALID_PASSWORD: "The specified network password is not correct.",
    ERROR_INVALID_PARAMETER: "The parameter is incorrect.",
    ERROR_CANCELLED: "The operation was canceled by the user.",
    ERROR_NONE_MAPPED: "No mapping between account names and security IDs was done.",
    NTE_PERM: "Access denied.",
    NTE_BAD_PROVIDER: "Invalid provider specified.",
    NTE_BAD_KEYSET: "Keyset does not exist",
    CRYPT_E_NOT_FOUND: "Cannot find object or property.",
    CRYPT_E_EXISTS: "The object or property already exists.",
    CRYPT_E_NO_KEY_PROPERTY: "The certificate does not have a property that references a "
    "private key.",
}

CNG_PROVIDER = "Microsoft Software Key Storage Provider"
CAPI_PROVIDER = "Microsoft Enhanced RSA and AES Cryptographic Provider"
#: A CryptoAPI provider CNG cannot open (a vendor's smart card or HSM CSP, say).
FOREIGN_CAPI_PROVIDER = "Contoso Hardware Cryptographic Provider"
PROV_RSA_AES = 24  # wincrypt.h: the CryptoAPI provider type of CAPI_PROVIDER
PROV_RSA_FULL = 1  # wincrypt.h

KeyProvider = Literal["cng", "capi", "capi-only"]

#: The CurrentUser stores that do not show LocalMachine's certificates.
_PRIVATE_USER_STORES = frozenset({"MY"})
#: The store whose additions Windows confirms in a dialog (CurrentUser only).
_CONFIRMED_STORE = ("CurrentUser", "ROOT")

READ_CONTROL = 0x00020000  # winnt.h
WRITE_DAC = 0x00040000  # winnt.h
DELETE = 0x00010000  # winnt.h
#: The groups every logged-on token has: Everyone, Authenticated Users, Users.
_EVERYONE_GROUPS = ("S-1-1-0", "S-1-5-11", "S-1-5-32-545")
ADMINISTRATORS = "S-1-5-32-544"

#: Accounts every Windows Server knows, by the names LookupAccountName accepts.
WELL_KNOWN_ACCOUNTS = {
    "system": "S-1-5-18",
    "nt authority\\system": "S-1-5-18",
    "local service": "S-1-5-19",
    "nt authority\\local service": "S-1-5-19",
    "network service": "S-1-5-20",
    "nt authority\\network service": "S-1-5-20",
    "administrators": "S-1-5-32-544",
    "builtin\\administrators": "S-1-5-32-544",
    "users": "S-1-5-32-545",
    "builtin\\users": "S-1-5-32-545",
    "iis_iusrs": "S-1-5-32-568",
    "builtin\\iis_iusrs": "S-1-5-32-568",
    "everyone": "S-1-1-0",
}


def _error(code: int, function: str) -> Win32Error:
    return Win32Error(code, MESSAGES.get(code, "unknown error"), function)


def _thumbprint(der: bytes) -> str:
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def _text(value: bytes | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-16-le", "replace").split("\0", 1)[0]


def virtual_account_sid(name: str) -> str:
    """A stable S-1-5-82-... SID for a virtual account such as ``IIS AppPool\\Site``."""
    # Shaped like Windows' own (five RIDs from a SHA-1 of the name); the exact bytes do not matter.
    digest = hashlib.sha1(name.upper().encode("utf-16-le"), usedforsecurity=False).digest()
    rids = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 20, 4)]
    return "S-1-5-82-" + "-".join(str(rid) for rid in rids)


@attrs.define
class FakeKey:
    """A persisted private key container."""

    name: str
    machine: bool
    exportable: bool
    provider: str
    dacl: str  # as Windows reads it back
    public_der: bytes = attrs.field(repr=False)
    owner: str = ADMINISTRATORS
    #: 0 for a CNG key storage provider, else the CryptoAPI provider type (wincrypt.h PROV_*).
    provider_type: int = 0
    #: Whether CNG opens it (CNG keys, and keys of Microsoft's own CSPs).
    cng_opens: bool = True


@attrs.define
class FakeCertificate:
    """A certificate in a store: its DER, its properties and (by name) its key container."""

    der: bytes
    properties: dict[int, bytes] = attrs.field(factory=dict)
    key_name: str | None = None

    @property
    def thumbprint(self) -> str:
        """SHA-1 of the DER, upper-case hex."""
        return _thumbprint(self.der)

    @property
    def certificate(self) -> x509.Certificate:
        """The parsed certificate."""
        return x509.load_der_x509_certificate(self.der)

    @property
    def friendly_name(self) -> str | None:
        """CERT_FRIENDLY_NAME_PROP_ID, decoded."""
        return _text(self.properties.get(CERT_FRIENDLY_NAME_PROP_ID))

    @property
    def description(self) -> str | None:
        """CERT_DESCRIPTION_PROP_ID, decoded."""
        return _text(self.properties.get(CERT_DESCRIPTION_PROP_ID))

    @property
    def renewal(self) -> str | None:
        """CERT_RENEWAL_PROP_ID as an upper-case SHA-1 hex string."""
        value = self.properties.get(CERT_RENEWAL_PROP_ID)
        return value.hex().upper() if value is not None else None

    def copy(self) -> FakeCertificate:
        """A new context with the same certificate and a copy of its properties."""
        return FakeCertificate(self.der, dict(self.properties), self.key_name)


@attrs.frozen
class PfxImportRecord:
    """What one PFXImportCertStore call received and produced."""

    flags: int
    thumbprints: tuple[str, ...]
    key_name: str | None
    at: datetime = attrs.field(factory=datetime.now)


class FakeWindowsCertBackend:
    """System stores, key containers and accounts of one fake Windows machine, in memory."""

    def __init__(self, *, elevated: bool = True, user_sid: str | None = None) -> None:
        self.elevated = elevated
        self.user_sid = user_sid or "S-1-5-21-3623811015-3361044348-30300820-1013"
        self.accounts: dict[str, str] = dict(WELL_KNOWN_ACCOUNTS)
        self.keys: dict[str, FakeKey] = {}
        self.imports: list[PfxImportRecord] = []
        #: (Win32 function, thread id) of every call, in order.
        self.calls: list[tuple[str, int]] = []
        self.open_pfx_stores = 0
        self._stores: dict[tuple[str, str], dict[str, FakeCertificate]] = {}
        self._failures: dict[str, deque[int]] = {}
        self._lock = threading.RLock()

    @property
    def caller_sids(self) -> frozenset[str]:
        """The SIDs enabled in this process's token: Administrators only when elevated."""
        sids = {self.user_sid, *_EVERYONE_GROUPS}
        if self.elevated:
            sids.add(ADMINISTRATORS)
        return frozenset(sids)

    # ------------------------------------------------------------------ test controls

    def fail(self, function: str, code: int = ERROR_ACCESS_DENIED, *, times: int = 1) -> None:
        """Make the next ``times`` calls of Win32 ``function`` fail with ``code``."""
        with self._lock:
            self._failures.setdefault(function, deque()).extend([code] * times)

    def add_account(self, name: str, sid: str | None = None) -> str:
        """Make ``name`` a known account (virtual-account SID by default) and return its SID."""
        sid = sid or virtual_account_sid(name)
        with self._lock:
            self.accounts[name.lower()] = sid
        return sid

    def add(
        self,
        location: str,
        store: str,
        certificate: CertificateMaterial | x509.Certificate | bytes,
        *,
        friendly_name: str | None = None,
        description: str | None = None,
        renewal: str | None = None,
        key_provider: KeyProvider = "cng",
        key_dacl: str | None = None,
        key_owner: str | None = None,
    ) -> FakeCertificate:
        """Seed a store with a certificate someone else installed (with its key, if material).

        ``key_provider`` says where that key lives, ``key_dacl`` and ``key_owner`` who may use
        it (default: what the provider gives a new key).
        """
        if location not in LOCATION_FLAGS:
            raise ValueError(f"not a system store location: {location!r}")
        if isinstance(certificate, CertificateMaterial):
            der = certificate.certificate.public_bytes(serialization.Encoding.DER)
        elif isinstance(certificate, x509.Certificate):
            der = certificate.public_bytes(serialization.Encoding.DER)
        else:
            der = certificate
        entry = FakeCertificate(der)
        if friendly_name is not None:
            entry.properties[CERT_FRIENDLY_NAME_PROP_ID] = _encode(friendly_name)
        if description is not None:
            entry.properties[CERT_DESCRIPTION_PROP_ID] = _encode(description)
        if renewal is not None:
            entry.properties[CERT_RENEWAL_PROP_ID] = bytes.fromhex(renewal)
        with self._lock:
            if isinstance(certificate, CertificateMaterial):
                key = self._new_key(
                    _spki(certificate.certificate),
                    machine=location == "LocalMachine",
                    exportable=False,
                    provider=key_provider,
                )
                if key_dacl is not None:
                    key.dacl = _sddl.normalise(key_dacl)
                if key_owner is not None:
                    key.owner = _sddl.canonical_sid(key_owner)
                self.keys[key.name] = key
                _link(entry, key)
            # Seeding bypasses the access check: it stands for what an administrator did before.
            self._stores.setdefault((location, store.upper()), {})[entry.thumbprint] = entry
        return entry

    # ------------------------------------------------------------------ inspection

    def store(self, location: str, name: str) -> list[FakeCertificate]:
        """A store's own certificates in the order the fake lists them (empty if none)."""
        with self._lock:
            certs = self._stores.get((location, name.upper()), {})
            return [certs[thumbprint] for thumbprint in sorted(certs)]

    def find(self, location: str, name: str, thumbprint: str) -> FakeCertificate | None:
        """A certificate of the store itself by SHA-1 thumbprint, or None."""
        with self._lock:
            return self._stores.get((location, name.upper()), {}).get(thumbprint.upper())

    def store_names(self, location: str) -> list[str]:
        """The stores that exist at ``location`` (upper-cased names)."""
        with self._lock:
            return sorted(name for loc, name in self._stores if loc == location)

    def key_of(self, certificate: FakeCertificate) -> FakeKey | None:
        """The key container a certificate's CERT_KEY_PROV_INFO_PROP_ID points to, if present."""
        with self._lock:
            return self.keys.get(certificate.key_name) if certificate.key_name else None

    # ------------------------------------------------------------------ backend interface

    def import_pfx(self, pfx: bytes, password: str, flags: int) -> FakePfxStore:
        """PFXImportCertStore."""
        with self._lock:
            self._enter("PFXImportCertStore")
            if flags & CRYPT_MACHINE_KEYSET and flags & CRYPT_USER_KEYSET:
                raise _error(ERROR_INVALID_PARAMETER, "PFXImportCertStore")
            try:
                loaded = pkcs12.load_pkcs12(pfx, password.encode("utf-8"))
            except ValueError:
                raise _error(ERROR_INVALID_PASSWORD, "PFXImportCertStore") from None
            certs: list[FakeCertificate] = []
            if loaded.cert is not None:
                certs.append(self._bag(loaded.cert))
            certs += [self._bag(bag) for bag in loaded.additional_certs]
            key_name = None
            if loaded.key is not None:
                public = loaded.key.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                owner = next((cert for cert in certs if _spki(cert.certificate) == public), None)
                if owner is not None:
                    cng = bool(flags & (PKCS12_PREFER_CNG_KSP | PKCS12_ALWAYS_CNG_KSP))
                    key = self._new_key(
                        public,
                        machine=bool(flags & CRYPT_MACHINE_KEYSET),
                        exportable=bool(flags & CRYPT_EXPORTABLE),
                        provider="cng" if cng else "capi",
                    )
                    if not flags & PKCS12_NO_PERSIST_KEY:
                        self.keys[key.name] = key
                    _link(owner, key)
                    key_name = key.name
            self.imports.append(
                PfxImportRecord(flags, tuple(cert.thumbprint for cert in certs), key_name)
            )
            self.open_pfx_stores += 1
            return FakePfxStore(self, {cert.thumbprint: cert for cert in certs})

    def certificates(
        self, location: str, store: str, prop_ids: Sequence[int]
    ) -> list[StoredCertificate]:
        """CertOpenStore (existing, read-only) and CertEnumCertificatesInStore."""
        with self._lock:
            shown = self._view(location, store, function="CertOpenStore")
            self._enter("CertEnumCertificatesInStore")
            listed: list[StoredCertificate] = []
            for cert, home in shown:
                properties = {
                    pid: cert.properties[pid] for pid in prop_ids if pid in cert.properties
                }
                if CERT_ACCESS_STATE_PROP_ID in prop_ids:
                    state = CERT_ACCESS_STATE_SYSTEM_STORE_FLAG  # opened read-only: no PERSIST
                    if home == "LocalMachine":
                        state |= CERT_ACCESS_STATE_LM_SYSTEM_STORE_FLAG
                    properties[CERT_ACCESS_STATE_PROP_ID] = state.to_bytes(4, "little")
                listed.append(StoredCertificate(cert.der, properties))
            return listed

    def add_encoded(self, location: str, store: str, der: bytes, disposition: int) -> None:
        """CertAddEncodedCertificateToStore."""
        with self._lock:
            function = "CertAddEncodedCertificateToStore"
            self._enter(function)
            try:
                x509.load_der_x509_certificate(der)
            except ValueError:
                raise _error(ERROR_INVALID_PARAMETER, function) from None
            self._open(location, store, write=True, function="CertOpenStore")
            self._add(location, store, FakeCertificate(der), disposition, function)

    def set_property(
        self, location: str, store: str, thumbprint: str, prop_id: int, value: bytes | None
    ) -> None:
        """CertSetCertificateContextProperty on a certificate in a system store."""
        with self._lock:
            function = "CertSetCertificateContextProperty"
            self._enter(function)
            cert = self._writable(location, store, thumbprint, function)
            _set(cert, prop_id, value)

    def delete(self, location: str, store: str, thumbprint: str, *, delete_key: bool) -> None:
        """CryptAcquireCertificatePrivateKey, CertDeleteCertificateFromStore, NCryptDeleteKey."""
        # As the binding: a key that cannot be acquired stops the delete before anything goes.
        with self._lock:
            function = "CertDeleteCertificateFromStore"
            cert = self._writable(location, store, thumbprint, function)
            key = None
            if delete_key:
                try:
                    key = self._key(cert, "CryptAcquireCertificatePrivateKey")
                except Win32Error as error:
                    if error.code not in (CRYPT_E_NO_KEY_PROPERTY, NTE_BAD_KEYSET):
                        raise
            self._enter(function)
            del self._stores[(location, store.upper())][cert.thumbprint]
            if key is not None:
                self._delete_key(key)

    def key_security(self, location: str, store: str, thumbprint: str) -> str:
        """CryptAcquireCertificatePrivateKey + NCryptGetProperty on a system store's certificate."""
        with self._lock:
            cert = self._shown(location, store, thumbprint)
            return self._dacl(self._key(cert, "CryptAcquireCertificatePrivateKey"))

    def set_key_security(self, location: str, store: str, thumbprint: str, sddl: str) -> None:
        """CryptAcquireCertificatePrivateKey + NCryptSetProperty on a system store's certificate."""
        with self._lock:
            cert = self._shown(location, store, thumbprint)
            key = self._key(cert, "CryptAcquireCertificatePrivateKey")
            self._set_dacl(key, sddl)

    def lookup_account(self, name: str) -> str | None:
        """LookupAccountNameW + ConvertSidToStringSidW."""
        with self._lock:
            self._enter("LookupAccountNameW")
            return self.accounts.get(name.strip().lower())

    def is_elevated(self) -> bool:
        """CheckTokenMembership for Administrators."""
        with self._lock:
            self._enter("CheckTokenMembership")
            return self.elevated

    # ------------------------------------------------------------------ internals

    def _enter(self, function: str) -> None:
        self.calls.append((function, threading.get_ident()))
        failures = self._failures.get(function)
        if failures:
            raise _error(failures.popleft(), function)

    def _open(
        self, location: str, store: str, *, write: bool, function: str
    ) -> dict[str, FakeCertificate]:
        """A store's own certificates (CertOpenStore); writing creates it."""
        if location not in LOCATION_FLAGS:
            raise _error(ERROR_INVALID_PARAMETER, function)
        self._enter(function)
        key = (location, store.upper())
        if not write:
            if key not in self._stores:
                raise _error(ERROR_FILE_NOT_FOUND, function)
            return self._stores[key]
        if location == "LocalMachine" and not self.elevated:
            raise _error(ERROR_ACCESS_DENIED, function)
        return self._stores.setdefault(key, {})

    def _machine_part(self, location: str, store: str) -> dict[str, FakeCertificate] | None:
        """The LocalMachine store a CurrentUser store also shows, if it does and it exists."""
        if location != "CurrentUser" or store.upper() in _PRIVATE_USER_STORES:
            return None
        return self._stores.get(("LocalMachine", store.upper()))

    def _view(
        self, location: str, store: str, *, function: str
    ) -> list[tuple[FakeCertificate, str]]:
        """Everything a store shows, with where each certificate lives, in the fake's order."""
        machine = self._machine_part(location, store)
        try:
            own = self._open(location, store, write=False, function=function)
        except Win32Error as error:
            if machine is None or error.code != ERROR_FILE_NOT_FOUND:
                raise
            own = {}
        shown = [(own[t], location) for t in sorted(own)]
        if machine is not None:
            shown += [(machine[t], "LocalMachine") for t in sorted(machine)]
        return shown

    def _shown(self, location: str, store: str, thumbprint: str) -> FakeCertificate:
        """A certificate the store shows, found by SHA-1 (CertFindCertificateInStore)."""
        for cert, _ in self._view(location, store, function="CertOpenStore"):
            if cert.thumbprint == thumbprint.upper():
                return cert
        raise _error(CRYPT_E_NOT_FOUND, "CertFindCertificateInStore")

    def _writable(
        self, location: str, store: str, thumbprint: str, function: str
    ) -> FakeCertificate:
        """A certificate of the store itself, for a change; one it only shows is read-only."""
        own = self._open(location, store, write=True, function="CertOpenStore")
        cert = own.get(thumbprint.upper())
        if cert is not None:
            return cert
        machine = self._machine_part(location, store)
        if machine is not None and thumbprint.upper() in machine:
            raise _error(ERROR_ACCESS_DENIED, function)
        raise _error(CRYPT_E_NOT_FOUND, "CertFindCertificateInStore")

    def _add(
        self, location: str, store: str, cert: FakeCertificate, disposition: int, function: str
    ) -> None:
        if (location, store.upper()) == _CONFIRMED_STORE:
            # Windows asks the interactive user to confirm a new root; no one answers "yes" here.
            raise _error(ERROR_CANCELLED, function)
        certs = self._stores[(location, store.upper())]
        existing = certs.get(cert.thumbprint)
        machine = self._machine_part(location, store)
        if existing is None and machine is not None:
            existing = machine.get(cert.thumbprint)
        if disposition == CERT_STORE_ADD_NEW:
            if existing is not None:
                raise _error(CRYPT_E_EXISTS, function)
        elif disposition == CERT_STORE_ADD_USE_EXISTING:
            if existing is not None:
                return
        elif disposition not in (CERT_STORE_ADD_REPLACE_EXISTING, CERT_STORE_ADD_ALWAYS):
            raise _error(ERROR_INVALID_PARAMETER, function)
        certs[cert.thumbprint] = cert.copy()

    def _bag(self, bag: pkcs12.PKCS12Certificate) -> FakeCertificate:
        cert = FakeCertificate(bag.certificate.public_bytes(serialization.Encoding.DER))
        if bag.friendly_name is not None:
            cert.properties[CERT_FRIENDLY_NAME_PROP_ID] = _encode(
                bag.friendly_name.decode("utf-8", "replace")
            )
        return cert

    def _new_key(
        self, public_der: bytes, *, machine: bool, exportable: bool, provider: KeyProvider
    ) -> FakeKey:
        names = {"cng": CNG_PROVIDER, "capi": CAPI_PROVIDER, "capi-only": FOREIGN_CAPI_PROVIDER}
        types = {"cng": 0, "capi": PROV_RSA_AES, "capi-only": PROV_RSA_FULL}
        # The Software KSP's defaults: machine keys for SYSTEM and Administrators, owned by
        # Administrators; user keys for SYSTEM and the user, owned by the user.
        owner = ADMINISTRATORS if machine else self.user_sid
        return FakeKey(
            name=f"te-{uuid.uuid4()}",
            machine=machine,
            exportable=exportable,
            provider=names[provider],
            dacl=_sddl.normalise(f"D:PAI(A;;FA;;;SY)(A;;FA;;;{owner})"),
            public_der=public_der,
            owner=owner,
            provider_type=types[provider],
            cng_opens=provider != "capi-only",
        )

    def _key(self, cert: FakeCertificate, function: str) -> FakeKey:
        self._enter(function)
        if cert.key_name is None:
            raise _error(CRYPT_E_NO_KEY_PROPERTY, function)
        key = self.keys.get(cert.key_name)
        if key is None:
            raise _error(NTE_BAD_KEYSET, function)
        if not key.cng_opens:  # CRYPT_ACQUIRE_ONLY_NCRYPT_KEY_FLAG
            raise legacy_key_error(f"{key.provider} (type {key.provider_type})", None)
        return key

    def _check_access(self, key: FakeKey, rights: int, function: str) -> None:
        """NTE_PERM unless this process may use ``rights`` on the key (owners: its DACL)."""
        caller = self.caller_sids
        if key.owner in caller and rights & ~(READ_CONTROL | WRITE_DAC) == 0:
            return  # an owner may always read and change the DACL
        descriptor = _sddl.parse(key.dacl)
        if descriptor.null_dacl:
            return
        allowed = denied = 0
        for ace in descriptor.aces:
            if ace.sid in caller and ace.type in ("A", "D"):
                if ace.type == "A":
                    allowed |= ace.effective_mask
                else:
                    denied |= ace.effective_mask
        if (allowed & ~denied) & rights != rights:
            raise _error(NTE_PERM, function)

    def _dacl(self, key: FakeKey) -> str:
        self._enter("NCryptGetProperty")
        self._check_access(key, READ_CONTROL, "NCryptGetProperty")
        return key.dacl

    def _set_dacl(self, key: FakeKey, sddl: str) -> None:
        function = "ConvertStringSecurityDescriptorToSecurityDescriptorW"
        self._enter(function)
        try:
            descriptor = _sddl.parse(_sddl.normalise(sddl))
        except ValueError:
            raise _error(ERROR_INVALID_PARAMETER, function) from None
        self._enter("NCryptSetProperty")
        self._check_access(key, WRITE_DAC, "NCryptSetProperty")
        # DACL_SECURITY_INFORMATION: the owner, group and SACL of the text are not applied.
        key.dacl = attrs.evolve(descriptor, prefix="", suffix="").text()

    def _delete_key(self, key: FakeKey) -> None:
        self._enter("NCryptDeleteKey")
        self._check_access(key, DELETE, "NCryptDeleteKey")
        del self.keys[key.name]


class FakePfxStore:
    """The in-memory store a fake PFXImportCertStore returns."""

    def __init__(self, backend: FakeWindowsCertBackend, certs: dict[str, FakeCertificate]) -> None:
        self._backend = backend
        self._certs: dict[str, FakeCertificate] | None = certs

    def thumbprints(self) -> list[str]:
        """The imported certificates in PFX order."""
        return list(self._live("CertEnumCertificatesInStore"))

    def set_property(self, thumbprint: str, prop_id: int, value: bytes | None) -> None:
        """CertSetCertificateContextProperty on an imported certificate."""
        with self._backend._lock:
            self._backend._enter("CertSetCertificateContextProperty")
            _set(_find(self._live("CertFindCertificateInStore"), thumbprint), prop_id, value)

    def key_security(self, thumbprint: str) -> str:
        """NCryptGetProperty(NCRYPT_SECURITY_DESCR_PROPERTY, DACL_SECURITY_INFORMATION)."""
        backend = self._backend
        with backend._lock:
            cert = _find(self._live("CertFindCertificateInStore"), thumbprint)
            return backend._dacl(backend._key(cert, "CryptAcquireCertificatePrivateKey"))

    def set_key_security(self, thumbprint: str, sddl: str) -> None:
        """NCryptSetProperty(NCRYPT_SECURITY_DESCR_PROPERTY, DACL | PERSIST)."""
        backend = self._backend
        with backend._lock:
            cert = _find(self._live("CertFindCertificateInStore"), thumbprint)
            key = backend._key(cert, "CryptAcquireCertificatePrivateKey")
            backend._set_dacl(key, sddl)

    def add_to_store(self, thumbprint: str, location: str, store: str, disposition: int) -> None:
        """CertAddCertificateContextToStore: the context's properties travel with it."""
        backend = self._backend
        with backend._lock:
            function = "CertAddCertificateContextToStore"
            cert = _find(self._live("CertFindCertificateInStore"), thumbprint)
            backend._open(location, store, write=True, function="CertOpenStore")
            backend._enter(function)
            backend._add(location, store, cert, disposition, function)

    def delete_key(self, thumbprint: str) -> None:
        """CryptAcquireCertificatePrivateKey + NCryptDeleteKey."""
        backend = self._backend
        with backend._lock:
            cert = _find(self._live("CertFindCertificateInStore"), thumbprint)
            backend._delete_key(backend._key(cert, "CryptAcquireCertificatePrivateKey"))

    def close(self) -> None:
        """CertCloseStore."""
        with self._backend._lock:
            if self._certs is not None:
                self._certs = None
                self._backend.open_pfx_stores -= 1

    def _live(self, function: str) -> dict[str, FakeCertificate]:
        if self._certs is None:
            raise _error(ERROR_INVALID_HANDLE, function)
        return self._certs


def _find(certs: dict[str, FakeCertificate], thumbprint: str) -> FakeCertificate:
    cert = certs.get(thumbprint.upper())
    if cert is None:
        raise _error(CRYPT_E_NOT_FOUND, "CertFindCertificateInStore")
    return cert


def _set(cert: FakeCertificate, prop_id: int, value: bytes | None) -> None:
    if value is None:
        cert.properties.pop(prop_id, None)
    else:
        cert.properties[prop_id] = bytes(value)


def _encode(text: str) -> bytes:
    return (text + "\0").encode("utf-16-le")


def _link(cert: FakeCertificate, key: FakeKey) -> None:
    # Stands for CERT_KEY_PROV_INFO_PROP_ID: the container's name (and so its provider).
    cert.key_name = key.name
    cert.properties[CERT_KEY_PROV_INFO_PROP_ID] = key.name.encode("utf-16-le")


def _spki(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
