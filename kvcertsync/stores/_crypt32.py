"""ctypes binding to crypt32, ncrypt, advapi32 and kernel32: the Windows half of WindowsCertStore.

This module implements the backend interface of :mod:`kvcertsync.stores.windows` and nothing else:
no policy, no naming, no parsing. Importing it does nothing on any platform: the function prototypes
are data (``PROTOTYPES``), and :func:`load` opens the DLLs and applies the prototypes the first time
a :class:`Crypt32Backend` is built, on Windows only.

Every function gets argtypes and restype; every handle and context is released in ``finally``;
failures raise :class:`Win32Error` carrying GetLastError (or the returned SECURITY_STATUS) and the
system's message for it. Constants carry the Windows SDK header that defines them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, NamedTuple

__all__ = [
    "PROTOTYPES",
    "Api",
    "Crypt32Backend",
    "Prototype",
    "StoredCertificate",
    "Win32Error",
    "bind",
    "legacy_key_error",
    "load",
]

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- constants
# Values transcribed from the Windows SDK 10.0.22621 headers named beside each one (and checked
# against mingw-w64's copies); tests/test_windows_store.py re-checks them against its own table.

# CertOpenStore providers and flags (wincrypt.h)
CERT_STORE_PROV_SYSTEM_W: Final = 10  # wincrypt.h: ((LPCSTR) 10)
CERT_SYSTEM_STORE_LOCATION_SHIFT: Final = 16  # wincrypt.h
CERT_SYSTEM_STORE_CURRENT_USER_ID: Final = 1  # wincrypt.h
CERT_SYSTEM_STORE_LOCAL_MACHINE_ID: Final = 2  # wincrypt.h
CERT_SYSTEM_STORE_CURRENT_USER: Final = 0x00010000  # wincrypt.h: ID << LOCATION_SHIFT
CERT_SYSTEM_STORE_LOCAL_MACHINE: Final = 0x00020000  # wincrypt.h: ID << LOCATION_SHIFT
CERT_STORE_OPEN_EXISTING_FLAG: Final = 0x00004000  # wincrypt.h
CERT_STORE_READONLY_FLAG: Final = 0x00008000  # wincrypt.h

# Encodings and find types (wincrypt.h)
X509_ASN_ENCODING: Final = 0x00000001  # wincrypt.h
PKCS_7_ASN_ENCODING: Final = 0x00010000  # wincrypt.h
CERT_COMPARE_SHIFT: Final = 16  # wincrypt.h
CERT_COMPARE_SHA1_HASH: Final = 1  # wincrypt.h
CERT_FIND_SHA1_HASH: Final = 0x00010000  # wincrypt.h: CERT_COMPARE_SHA1_HASH << CERT_COMPARE_SHIFT

# dwAddDisposition (wincrypt.h)
CERT_STORE_ADD_NEW: Final = 1  # wincrypt.h
CERT_STORE_ADD_USE_EXISTING: Final = 2  # wincrypt.h
CERT_STORE_ADD_REPLACE_EXISTING: Final = 3  # wincrypt.h
CERT_STORE_ADD_ALWAYS: Final = 4  # wincrypt.h
CERT_STORE_ADD_REPLACE_EXISTING_INHERIT_PROPERTIES: Final = 5  # wincrypt.h

# Certificate context property ids (wincrypt.h)
CERT_KEY_PROV_INFO_PROP_ID: Final = 2  # wincrypt.h
CERT_SHA1_HASH_PROP_ID: Final = 3  # wincrypt.h
CERT_FRIENDLY_NAME_PROP_ID: Final = 11  # wincrypt.h
CERT_DESCRIPTION_PROP_ID: Final = 13  # wincrypt.h
CERT_ACCESS_STATE_PROP_ID: Final = 14  # wincrypt.h: a DWORD of CERT_ACCESS_STATE_* flags
CERT_RENEWAL_PROP_ID: Final = 64  # wincrypt.h

# CERT_ACCESS_STATE_PROP_ID flags (wincrypt.h): where a certificate a store shows really lives
CERT_ACCESS_STATE_WRITE_PERSIST_FLAG: Final = 0x1  # wincrypt.h
CERT_ACCESS_STATE_SYSTEM_STORE_FLAG: Final = 0x2  # wincrypt.h
CERT_ACCESS_STATE_LM_SYSTEM_STORE_FLAG: Final = 0x4  # wincrypt.h
CERT_ACCESS_STATE_GP_SYSTEM_STORE_FLAG: Final = 0x8  # wincrypt.h

# PFXImportCertStore dwFlags (wincrypt.h; the first three are shared with CryptAcquireContext)
CRYPT_EXPORTABLE: Final = 0x00000001  # wincrypt.h
CRYPT_USER_PROTECTED: Final = 0x00000002  # wincrypt.h
CRYPT_MACHINE_KEYSET: Final = 0x00000020  # wincrypt.h
CRYPT_USER_KEYSET: Final = 0x00001000  # wincrypt.h
PKCS12_PREFER_CNG_KSP: Final = 0x00000100  # wincrypt.h
PKCS12_ALWAYS_CNG_KSP: Final = 0x00000200  # wincrypt.h
PKCS12_NO_PERSIST_KEY: Final = 0x00008000  # wincrypt.h

# CryptAcquireCertificatePrivateKey (wincrypt.h)
CRYPT_ACQUIRE_SILENT_FLAG: Final = 0x00000040  # wincrypt.h
CRYPT_ACQUIRE_ONLY_NCRYPT_KEY_FLAG: Final = 0x00040000  # wincrypt.h
CERT_NCRYPT_KEY_SPEC: Final = 0xFFFFFFFF  # wincrypt.h
AT_KEYEXCHANGE: Final = 1  # wincrypt.h: a CryptoAPI (HCRYPTPROV) key's dwKeySpec
AT_SIGNATURE: Final = 2  # wincrypt.h

# CNG key properties and flags (ncrypt.h)
NCRYPT_SECURITY_DESCR_PROPERTY: Final = "Security Descr"  # ncrypt.h: L"Security Descr"
NCRYPT_SILENT_FLAG: Final = 0x00000040  # ncrypt.h
NCRYPT_PERSIST_FLAG: Final = 0x80000000  # ncrypt.h

# Security descriptors (winnt.h, sddl.h)
DACL_SECURITY_INFORMATION: Final = 0x00000004  # winnt.h
SDDL_REVISION_1: Final = 1  # sddl.h

# FormatMessageW (winbase.h)
FORMAT_MESSAGE_IGNORE_INSERTS: Final = 0x00000200  # winbase.h
FORMAT_MESSAGE_FROM_SYSTEM: Final = 0x00001000  # winbase.h

# Error codes (winerror.h)
ERROR_SUCCESS: Final = 0  # winerror.h
ERROR_FILE_NOT_FOUND: Final = 2  # winerror.h
ERROR_ACCESS_DENIED: Final = 5  # winerror.h
ERROR_INVALID_HANDLE: Final = 6  # winerror.h
ERROR_NO_MORE_FILES: Final = 18  # winerror.h
ERROR_INVALID_PASSWORD: Final = 86  # winerror.h
ERROR_INVALID_PARAMETER: Final = 87  # winerror.h
ERROR_INSUFFICIENT_BUFFER: Final = 122  # winerror.h
ERROR_CANCELLED: Final = 1223  # winerror.h
ERROR_NONE_MAPPED: Final = 1332  # winerror.h
NTE_PERM: Final = 0x80090010  # winerror.h
NTE_BAD_PROVIDER: Final = 0x80090013  # winerror.h
NTE_BAD_KEYSET: Final = 0x80090016  # winerror.h
CRYPT_E_NOT_FOUND: Final = 0x80092004  # winerror.h
CRYPT_E_EXISTS: Final = 0x80092005  # winerror.h
CRYPT_E_NO_KEY_PROPERTY: Final = 0x8009200B  # winerror.h

#: certificateStoreLocation -> CertOpenStore location flag.
LOCATION_FLAGS: Final[Mapping[str, int]] = {
    "LocalMachine": CERT_SYSTEM_STORE_LOCAL_MACHINE,
    "CurrentUser": CERT_SYSTEM_STORE_CURRENT_USER,
}

_ENCODING: Final = X509_ASN_ENCODING | PKCS_7_ASN_ENCODING

# -------------------------------------------------------------------------------------- types
# Fixed-width types rather than ctypes.wintypes: on Linux wintypes.DWORD is a 64-bit c_ulong, which
# would make the layout checks in the tests meaningless. On Windows these are the same types.

DWORD = ctypes.c_uint32
ULONG = ctypes.c_uint32
BOOL = ctypes.c_int32
SECURITY_STATUS = ctypes.c_int32  # LONG
ULONG_PTR = ctypes.c_size_t  # HCRYPTPROV_LEGACY, NCRYPT_HANDLE, NCRYPT_KEY_HANDLE
HCERTSTORE = ctypes.c_void_p
LPCWSTR = ctypes.c_wchar_p
PBYTE = ctypes.POINTER(ctypes.c_ubyte)


class CRYPT_DATA_BLOB(ctypes.Structure):  # wincrypt.h: CRYPTOAPI_BLOB
    """A counted byte buffer (CRYPT_DATA_BLOB, CRYPT_HASH_BLOB)."""

    _fields_ = (("cbData", DWORD), ("pbData", PBYTE))


class CERT_CONTEXT(ctypes.Structure):  # wincrypt.h
    """The certificate context crypt32 hands out; only the encoded bytes are read here."""

    _fields_ = (
        ("dwCertEncodingType", DWORD),
        ("pbCertEncoded", PBYTE),
        ("cbCertEncoded", DWORD),
        ("pCertInfo", ctypes.c_void_p),
        ("hCertStore", HCERTSTORE),
    )


PCCERT_CONTEXT = ctypes.POINTER(CERT_CONTEXT)


class CRYPT_KEY_PROV_INFO(ctypes.Structure):  # wincrypt.h
    """CERT_KEY_PROV_INFO_PROP_ID's value: where a certificate's key lives (dwProvType 0: CNG)."""

    _fields_ = (
        ("pwszContainerName", ctypes.c_wchar_p),
        ("pwszProvName", ctypes.c_wchar_p),
        ("dwProvType", DWORD),
        ("dwFlags", DWORD),
        ("cProvParam", DWORD),
        ("rgProvParam", ctypes.c_void_p),
        ("dwKeySpec", DWORD),
    )


#: The well-known SID of BUILTIN\Administrators (an elevated token, and LocalSystem's, has it).
ADMINISTRATORS_SID: Final = "S-1-5-32-544"


class Prototype(NamedTuple):
    """One DLL export with its C signature, applied to the function by :func:`bind`."""

    dll: str
    name: str
    restype: Any
    argtypes: tuple[Any, ...]


#: Every function this module calls, with the signature from the SDK header in the comment.
PROTOTYPES: Final[tuple[Prototype, ...]] = (
    # HCERTSTORE CertOpenStore(LPCSTR lpszStoreProvider, DWORD dwEncodingType,
    #     HCRYPTPROV_LEGACY hCryptProv, DWORD dwFlags, const void *pvPara)  -- wincrypt.h
    # The provider is an integer id cast to LPCSTR, and pvPara is always a store name here.
    Prototype(
        "crypt32", "CertOpenStore", HCERTSTORE, (ctypes.c_void_p, DWORD, ULONG_PTR, DWORD, LPCWSTR)
    ),
    # BOOL CertCloseStore(HCERTSTORE hCertStore, DWORD dwFlags)
    Prototype("crypt32", "CertCloseStore", BOOL, (HCERTSTORE, DWORD)),
    # HCERTSTORE PFXImportCertStore(CRYPT_DATA_BLOB *pPFX, LPCWSTR szPassword, DWORD dwFlags)
    Prototype(
        "crypt32",
        "PFXImportCertStore",
        HCERTSTORE,
        (ctypes.POINTER(CRYPT_DATA_BLOB), LPCWSTR, DWORD),
    ),
    # PCCERT_CONTEXT CertFindCertificateInStore(HCERTSTORE, DWORD dwCertEncodingType,
    #     DWORD dwFindFlags, DWORD dwFindType, const void *pvFindPara, PCCERT_CONTEXT pPrev)
    Prototype(
        "crypt32",
        "CertFindCertificateInStore",
        PCCERT_CONTEXT,
        (HCERTSTORE, DWORD, DWORD, DWORD, ctypes.c_void_p, PCCERT_CONTEXT),
    ),
    # PCCERT_CONTEXT CertEnumCertificatesInStore(HCERTSTORE, PCCERT_CONTEXT pPrevCertContext)
    Prototype(
        "crypt32", "CertEnumCertificatesInStore", PCCERT_CONTEXT, (HCERTSTORE, PCCERT_CONTEXT)
    ),
    # BOOL CertFreeCertificateContext(PCCERT_CONTEXT pCertContext)
    Prototype("crypt32", "CertFreeCertificateContext", BOOL, (PCCERT_CONTEXT,)),
    # BOOL CertGetCertificateContextProperty(PCCERT_CONTEXT, DWORD dwPropId, void *pvData,
    #     DWORD *pcbData)
    Prototype(
        "crypt32",
        "CertGetCertificateContextProperty",
        BOOL,
        (PCCERT_CONTEXT, DWORD, ctypes.c_void_p, ctypes.POINTER(DWORD)),
    ),
    # BOOL CertSetCertificateContextProperty(PCCERT_CONTEXT, DWORD dwPropId, DWORD dwFlags,
    #     const void *pvData)
    Prototype(
        "crypt32",
        "CertSetCertificateContextProperty",
        BOOL,
        (PCCERT_CONTEXT, DWORD, DWORD, ctypes.c_void_p),
    ),
    # BOOL CertAddCertificateContextToStore(HCERTSTORE, PCCERT_CONTEXT, DWORD dwAddDisposition,
    #     PCCERT_CONTEXT *ppStoreContext)
    Prototype(
        "crypt32",
        "CertAddCertificateContextToStore",
        BOOL,
        (HCERTSTORE, PCCERT_CONTEXT, DWORD, ctypes.POINTER(PCCERT_CONTEXT)),
    ),
    # BOOL CertAddEncodedCertificateToStore(HCERTSTORE, DWORD dwCertEncodingType,
    #     const BYTE *pbCertEncoded, DWORD cbCertEncoded, DWORD dwAddDisposition,
    #     PCCERT_CONTEXT *ppCertContext)
    Prototype(
        "crypt32",
        "CertAddEncodedCertificateToStore",
        BOOL,
        (HCERTSTORE, DWORD, ctypes.c_char_p, DWORD, DWORD, ctypes.POINTER(PCCERT_CONTEXT)),
    ),
    # BOOL CertDeleteCertificateFromStore(PCCERT_CONTEXT pCertContext)
    Prototype("crypt32", "CertDeleteCertificateFromStore", BOOL, (PCCERT_CONTEXT,)),
    # BOOL CryptAcquireCertificatePrivateKey(PCCERT_CONTEXT, DWORD dwFlags, void *pvParameters,
    #     HCRYPTPROV_OR_NCRYPT_KEY_HANDLE *phKey, DWORD *pdwKeySpec,
    #     BOOL *pfCallerFreeProvOrNCryptKey)
    Prototype(
        "crypt32",
        "CryptAcquireCertificatePrivateKey",
        BOOL,
        (
            PCCERT_CONTEXT,
            DWORD,
            ctypes.c_void_p,
            ctypes.POINTER(ULONG_PTR),
            ctypes.POINTER(DWORD),
            ctypes.POINTER(BOOL),
        ),
    ),
    # SECURITY_STATUS NCryptGetProperty(NCRYPT_HANDLE hObject, LPCWSTR pszProperty,
    #     PBYTE pbOutput, DWORD cbOutput, DWORD *pcbResult, DWORD dwFlags)  -- ncrypt.h
    Prototype(
        "ncrypt",
        "NCryptGetProperty",
        SECURITY_STATUS,
        (ULONG_PTR, LPCWSTR, ctypes.c_void_p, DWORD, ctypes.POINTER(DWORD), DWORD),
    ),
    # SECURITY_STATUS NCryptSetProperty(NCRYPT_HANDLE hObject, LPCWSTR pszProperty,
    #     PBYTE pbInput, DWORD cbInput, DWORD dwFlags)  -- ncrypt.h
    Prototype(
        "ncrypt",
        "NCryptSetProperty",
        SECURITY_STATUS,
        (ULONG_PTR, LPCWSTR, ctypes.c_void_p, DWORD, DWORD),
    ),
    # SECURITY_STATUS NCryptDeleteKey(NCRYPT_KEY_HANDLE hKey, DWORD dwFlags)  -- ncrypt.h
    Prototype("ncrypt", "NCryptDeleteKey", SECURITY_STATUS, (ULONG_PTR, DWORD)),
    # SECURITY_STATUS NCryptFreeObject(NCRYPT_HANDLE hObject)  -- ncrypt.h
    Prototype("ncrypt", "NCryptFreeObject", SECURITY_STATUS, (ULONG_PTR,)),
    # BOOL CryptReleaseContext(HCRYPTPROV hProv, DWORD dwFlags)  -- wincrypt.h (advapi32)
    # A CryptoAPI key handle is released with this, never with NCryptFreeObject.
    Prototype("advapi32", "CryptReleaseContext", BOOL, (ULONG_PTR, DWORD)),
    # BOOL ConvertStringSidToSidW(LPCWSTR StringSid, PSID *Sid)  -- sddl.h
    Prototype(
        "advapi32",
        "ConvertStringSidToSidW",
        BOOL,
        (LPCWSTR, ctypes.POINTER(ctypes.c_void_p)),
    ),
    # BOOL CheckTokenMembership(HANDLE TokenHandle, PSID SidToCheck, PBOOL IsMember)
    #     -- securitybaseapi.h
    Prototype(
        "advapi32",
        "CheckTokenMembership",
        BOOL,
        (ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(BOOL)),
    ),
    # BOOL LookupAccountNameW(LPCWSTR lpSystemName, LPCWSTR lpAccountName, PSID Sid,
    #     LPDWORD cbSid, LPWSTR ReferencedDomainName, LPDWORD cchReferencedDomainName,
    #     PSID_NAME_USE peUse)  -- winbase.h
    Prototype(
        "advapi32",
        "LookupAccountNameW",
        BOOL,
        (
            LPCWSTR,
            LPCWSTR,
            ctypes.c_void_p,
            ctypes.POINTER(DWORD),
            ctypes.c_wchar_p,
            ctypes.POINTER(DWORD),
            ctypes.POINTER(DWORD),
        ),
    ),
    # BOOL ConvertSidToStringSidW(PSID Sid, LPWSTR *StringSid)  -- sddl.h
    Prototype(
        "advapi32",
        "ConvertSidToStringSidW",
        BOOL,
        (ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)),
    ),
    # BOOL ConvertSecurityDescriptorToStringSecurityDescriptorW(PSECURITY_DESCRIPTOR,
    #     DWORD RequestedStringSDRevision, SECURITY_INFORMATION, LPWSTR *, PULONG)  -- sddl.h
    Prototype(
        "advapi32",
        "ConvertSecurityDescriptorToStringSecurityDescriptorW",
        BOOL,
        (
            ctypes.c_void_p,
            DWORD,
            DWORD,
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.POINTER(ULONG),
        ),
    ),
    # BOOL ConvertStringSecurityDescriptorToSecurityDescriptorW(LPCWSTR, DWORD StringSDRevision,
    #     PSECURITY_DESCRIPTOR *, PULONG SecurityDescriptorSize)  -- sddl.h
    Prototype(
        "advapi32",
        "ConvertStringSecurityDescriptorToSecurityDescriptorW",
        BOOL,
        (LPCWSTR, DWORD, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ULONG)),
    ),
    # HLOCAL LocalFree(HLOCAL hMem)  -- winbase.h
    Prototype("kernel32", "LocalFree", ctypes.c_void_p, (ctypes.c_void_p,)),
    # DWORD FormatMessageW(DWORD dwFlags, LPCVOID lpSource, DWORD dwMessageId,
    #     DWORD dwLanguageId, LPWSTR lpBuffer, DWORD nSize, va_list *Arguments)  -- winbase.h
    Prototype(
        "kernel32",
        "FormatMessageW",
        DWORD,
        (DWORD, ctypes.c_void_p, DWORD, DWORD, ctypes.c_wchar_p, DWORD, ctypes.c_void_p),
    ),
)


# ------------------------------------------------------------------------------------- errors


class Win32Error(OSError):
    """A Win32 error or HRESULT from a Windows API call, with the system's message for it."""

    def __init__(self, code: int, message: str, function: str = "") -> None:
        code &= 0xFFFFFFFF
        super().__init__(code, message)
        self.winerror = code
        self.function = function

    @property
    def code(self) -> int:
        """The error as an unsigned 32-bit value (Win32 error code or HRESULT)."""
        return self.winerror

    def __str__(self) -> str:
        code = self.winerror
        number = f"{code} (0x{code:08X})" if code < 0x10000 else f"0x{code:08X}"
        what = f"{self.function} failed with " if self.function else ""
        return f"{what}error {number}: {self.strerror}"


class StoredCertificate(NamedTuple):
    """A certificate as a system store holds it: its DER and the requested properties present."""

    der: bytes
    properties: dict[int, bytes]


# -------------------------------------------------------------------------------------- loading


class Api:
    """The loaded functions by name, each with its prototype applied."""

    def __init__(self, functions: Mapping[str, Callable[..., Any]]) -> None:
        self._functions = dict(functions)

    def __getattr__(self, name: str) -> Callable[..., Any]:
        try:
            return self._functions[name]
        except KeyError:
            raise AttributeError(f"{name} is not in PROTOTYPES") from None


def bind(open_library: Callable[[str], Any]) -> Api:
    """Apply every prototype to the functions of the libraries ``open_library`` returns."""
    libraries: dict[str, Any] = {}
    functions: dict[str, Callable[..., Any]] = {}
    for proto in PROTOTYPES:
        if proto.dll not in libraries:
            libraries[proto.dll] = open_library(proto.dll)
        function = getattr(libraries[proto.dll], proto.name)
        function.restype = proto.restype
        function.argtypes = proto.argtypes
        functions[proto.name] = function
    return Api(functions)


_load_lock = threading.Lock()
_loaded: Api | None = None


def load() -> Api:
    """The Windows API, loaded on first use; OSError anywhere but Windows."""
    global _loaded
    with _load_lock:
        if _loaded is None:
            _loaded = bind(_open_windows_library)
        return _loaded


def _open_windows_library(name: str) -> Any:
    if sys.platform == "win32":
        # A private WinDLL per library, not ctypes.windll: other code setting argtypes on the
        # shared ctypes.windll.crypt32 functions must not change ours, nor ours theirs.
        return ctypes.WinDLL(f"{name}.dll", use_last_error=True)
    raise OSError(f"{name}.dll is a Windows library; this is {sys.platform}")


def _last_error() -> int:
    if sys.platform == "win32":
        # ctypes hands back a signed C int: 0x80092004 would arrive as -2146885628.
        return ctypes.get_last_error() & 0xFFFFFFFF
    return 0


# ------------------------------------------------------------------------------------- backend


class _Key:
    """A key handle, whether this code still has to free it, and of which kind it is."""

    def __init__(self, handle: int, owned: bool, *, ncrypt: bool = True) -> None:
        self.handle = handle
        self.owned = owned
        self.ncrypt = ncrypt  # NCRYPT_KEY_HANDLE; else a CryptoAPI HCRYPTPROV


class Crypt32Backend:
    """The WindowsCertStore backend over the real crypt32/ncrypt/advapi32 (Windows only)."""

    def __init__(self, api: Api | None = None) -> None:
        self._api = api if api is not None else load()

    # ---- WindowsCertBackend

    def import_pfx(self, pfx: bytes, password: str, flags: int) -> _PfxStore:
        """PFXImportCertStore: an in-memory store of the PFX's certificates, keys persisted."""
        data = ctypes.create_string_buffer(pfx, len(pfx))
        try:
            blob = CRYPT_DATA_BLOB(len(pfx), ctypes.cast(data, PBYTE))
            handle = self._api.PFXImportCertStore(ctypes.byref(blob), password, flags)
            if not handle:
                raise self._error("PFXImportCertStore")
        finally:
            ctypes.memset(data, 0, len(pfx))  # the buffer holds key material
        return _PfxStore(self, handle)

    def certificates(
        self, location: str, store: str, prop_ids: Sequence[int]
    ) -> list[StoredCertificate]:
        """Every certificate in a system store (in the store's own order), with those properties."""
        found: list[StoredCertificate] = []
        with self._system_store(location, store, write=False) as handle:
            context = None
            try:
                while True:
                    # The previous context is freed by the call itself.
                    context = self._api.CertEnumCertificatesInStore(handle, context)
                    if not context:
                        context = None
                        code = _last_error()
                        if code not in (CRYPT_E_NOT_FOUND, ERROR_NO_MORE_FILES):
                            raise self._error("CertEnumCertificatesInStore", code)
                        break
                    found.append(self._describe(context, prop_ids))
            finally:
                if context:
                    self._api.CertFreeCertificateContext(context)
        return found

    def add_encoded(self, location: str, store: str, der: bytes, disposition: int) -> None:
        """CertAddEncodedCertificateToStore into a system store."""
        with self._system_store(location, store, write=True) as handle:
            ok = self._api.CertAddEncodedCertificateToStore(
                handle, _ENCODING, der, len(der), disposition, None
            )
            if not ok:
                raise self._error("CertAddEncodedCertificateToStore")

    def set_property(
        self, location: str, store: str, thumbprint: str, prop_id: int, value: bytes | None
    ) -> None:
        """Set (or with None, remove) a blob property of a certificate in a system store."""
        with (
            self._system_store(location, store, write=True) as handle,
            self._find(handle, thumbprint) as context,
        ):
            self._set_property(context, prop_id, value)

    def delete(self, location: str, store: str, thumbprint: str, *, delete_key: bool) -> None:
        """Delete a certificate from a system store and, optionally, its CNG key."""
        with self._system_store(location, store, write=True) as handle:
            context = self._find_context(handle, thumbprint)
            key: _Key | None = None
            try:
                if delete_key:
                    try:
                        key = self._acquire_key(context)
                    except Win32Error as error:
                        if error.code not in (CRYPT_E_NO_KEY_PROPERTY, NTE_BAD_KEYSET):
                            raise
                        logger.debug("%s has no private key to delete: %s", thumbprint, error)
                # CertDeleteCertificateFromStore frees the context even when it fails.
                deleting, context = context, None
                if not self._api.CertDeleteCertificateFromStore(deleting):
                    raise self._error("CertDeleteCertificateFromStore")
                if key is not None:
                    self._delete_key(key)
            finally:
                if context:
                    self._api.CertFreeCertificateContext(context)
                if key is not None:
                    self._release(key)

    def key_security(self, location: str, store: str, thumbprint: str) -> str:
        """The DACL of the CNG key of a certificate in a system store, as SDDL."""
        with (
            self._system_store(location, store, write=False) as handle,
            self._find(handle, thumbprint) as context,
            self._key(context) as key,
        ):
            return self._key_security(key)

    def set_key_security(self, location: str, store: str, thumbprint: str, sddl: str) -> None:
        """Replace the DACL of the CNG key of a certificate in a system store (persisted).

        The store is only searched, so it is opened read-only; the key's own DACL decides.
        """
        with (
            self._system_store(location, store, write=False) as handle,
            self._find(handle, thumbprint) as context,
            self._key(context) as key,
        ):
            self._set_key_security(key, sddl)

    def is_elevated(self) -> bool:
        """CheckTokenMembership for BUILTIN\\Administrators: enabled only when elevated."""
        sid = ctypes.c_void_p()
        if not self._api.ConvertStringSidToSidW(ADMINISTRATORS_SID, ctypes.byref(sid)):
            raise self._error("ConvertStringSidToSidW")
        try:
            member = BOOL(0)
            # A NULL token: the thread's impersonation token, else the process's own.
            if not self._api.CheckTokenMembership(None, sid, ctypes.byref(member)):
                raise self._error("CheckTokenMembership")
            return bool(member.value)
        finally:
            self._api.LocalFree(sid)

    def lookup_account(self, name: str) -> str | None:
        """The string SID of an account name, or None when Windows knows no such account."""
        sid_size = DWORD(0)
        domain_size = DWORD(0)
        use = DWORD(0)
        lookup = self._api.LookupAccountNameW
        sizes = (ctypes.byref(sid_size), ctypes.byref(domain_size), ctypes.byref(use))
        if not lookup(None, name, None, sizes[0], None, sizes[1], sizes[2]):
            code = _last_error()
            if code == ERROR_NONE_MAPPED:
                return None
            if code != ERROR_INSUFFICIENT_BUFFER:
                raise self._error("LookupAccountNameW", code)
        sid = ctypes.create_string_buffer(max(sid_size.value, 1))
        domain = ctypes.create_unicode_buffer(max(domain_size.value, 1))
        if not lookup(None, name, sid, sizes[0], domain, sizes[1], sizes[2]):
            code = _last_error()
            if code == ERROR_NONE_MAPPED:
                return None
            raise self._error("LookupAccountNameW", code)
        text = ctypes.c_void_p()
        if not self._api.ConvertSidToStringSidW(sid, ctypes.byref(text)):
            raise self._error("ConvertSidToStringSidW")
        try:
            return ctypes.wstring_at(text.value) if text.value else ""
        finally:
            self._api.LocalFree(text)

    # ---- helpers shared with _PfxStore

    @contextlib.contextmanager
    def _system_store(self, location: str, store: str, *, write: bool) -> Iterator[int]:
        try:
            flags = LOCATION_FLAGS[location]
        except KeyError:
            raise ValueError(f"not a system store location: {location!r}") from None
        if not write:
            flags |= CERT_STORE_OPEN_EXISTING_FLAG | CERT_STORE_READONLY_FLAG
        handle = self._api.CertOpenStore(CERT_STORE_PROV_SYSTEM_W, 0, 0, flags, store)
        if not handle:
            raise self._error("CertOpenStore")
        try:
            yield handle
        finally:
            self._api.CertCloseStore(handle, 0)

    @contextlib.contextmanager
    def _find(self, store: int, thumbprint: str) -> Iterator[Any]:
        context = self._find_context(store, thumbprint)
        try:
            yield context
        finally:
            self._api.CertFreeCertificateContext(context)

    def _find_context(self, store: int, thumbprint: str) -> Any:
        digest = bytes.fromhex(thumbprint)
        buffer = ctypes.create_string_buffer(digest, len(digest))
        blob = CRYPT_DATA_BLOB(len(digest), ctypes.cast(buffer, PBYTE))
        context = self._api.CertFindCertificateInStore(
            store, _ENCODING, 0, CERT_FIND_SHA1_HASH, ctypes.byref(blob), None
        )
        if not context:
            raise self._error("CertFindCertificateInStore")
        return context

    def _describe(self, context: Any, prop_ids: Sequence[int]) -> StoredCertificate:
        cert = context.contents
        der = ctypes.string_at(cert.pbCertEncoded, cert.cbCertEncoded)
        properties: dict[int, bytes] = {}
        for prop_id in prop_ids:
            value = self._get_property(context, prop_id)
            if value is not None:
                properties[prop_id] = value
        return StoredCertificate(der, properties)

    def _get_property(self, context: Any, prop_id: int) -> bytes | None:
        size = DWORD(0)
        get = self._api.CertGetCertificateContextProperty
        if not get(context, prop_id, None, ctypes.byref(size)):
            code = _last_error()
            if code == CRYPT_E_NOT_FOUND:
                return None
            raise self._error("CertGetCertificateContextProperty", code)
        buffer = ctypes.create_string_buffer(max(size.value, 1))
        if not get(context, prop_id, buffer, ctypes.byref(size)):
            raise self._error("CertGetCertificateContextProperty")
        return buffer.raw[: size.value]

    def _set_property(self, context: Any, prop_id: int, value: bytes | None) -> None:
        # Only CRYPT_DATA_BLOB-valued properties come through here (friendly name, description,
        # renewal hash); a NULL pvData deletes the property.
        data = None
        blob = None
        if value is not None:
            data = ctypes.create_string_buffer(value, len(value))
            blob = CRYPT_DATA_BLOB(len(value), ctypes.cast(data, PBYTE))
        pointer = ctypes.byref(blob) if blob is not None else None
        if not self._api.CertSetCertificateContextProperty(context, prop_id, 0, pointer):
            raise self._error("CertSetCertificateContextProperty")

    def _acquire_key(self, context: Any) -> _Key:
        handle = ULONG_PTR(0)
        spec = DWORD(0)
        caller_frees = BOOL(0)
        flags = CRYPT_ACQUIRE_ONLY_NCRYPT_KEY_FLAG | CRYPT_ACQUIRE_SILENT_FLAG
        ok = self._api.CryptAcquireCertificatePrivateKey(
            context,
            flags,
            None,
            ctypes.byref(handle),
            ctypes.byref(spec),
            ctypes.byref(caller_frees),
        )
        if not ok:
            error = self._error("CryptAcquireCertificatePrivateKey")
            provider = self._legacy_provider(context)
            if provider is None:
                raise error
            raise legacy_key_error(provider, error)
        ncrypt = spec.value == CERT_NCRYPT_KEY_SPEC
        key = _Key(handle.value, bool(caller_frees.value), ncrypt=ncrypt)
        if not ncrypt:
            # ONLY_NCRYPT should never hand out a CryptoAPI handle; if it does, free it as one.
            self._release(key)
            provider = self._legacy_provider(context) or "a CryptoAPI provider"
            raise legacy_key_error(provider, None)
        return key

    def _legacy_provider(self, context: Any) -> str | None:
        """The CryptoAPI provider holding the certificate's key, or None (CNG, or no key)."""
        size = DWORD(0)
        get = self._api.CertGetCertificateContextProperty
        if not get(context, CERT_KEY_PROV_INFO_PROP_ID, None, ctypes.byref(size)):
            return None
        buffer = ctypes.create_string_buffer(max(size.value, ctypes.sizeof(CRYPT_KEY_PROV_INFO)))
        if not get(context, CERT_KEY_PROV_INFO_PROP_ID, buffer, ctypes.byref(size)):
            return None
        # The structure's strings point into the same buffer: read them while it lives.
        info = CRYPT_KEY_PROV_INFO.from_buffer(buffer)
        if info.dwProvType == 0:
            return None
        return f"{info.pwszProvName or 'an unnamed provider'} (type {info.dwProvType})"

    @contextlib.contextmanager
    def _key(self, context: Any) -> Iterator[_Key]:
        key = self._acquire_key(context)
        try:
            yield key
        finally:
            self._release(key)

    def _release(self, key: _Key) -> None:
        # Each kind with its own function: NCryptFreeObject on an HCRYPTPROV corrupts nothing
        # visible at once, but leaks the provider and may free an unrelated NCrypt handle.
        if key.owned:
            key.owned = False
            if key.ncrypt:
                self._api.NCryptFreeObject(key.handle)
            else:
                self._api.CryptReleaseContext(key.handle, 0)

    def _delete_key(self, key: _Key) -> None:
        status = self._api.NCryptDeleteKey(key.handle, NCRYPT_SILENT_FLAG)
        if status != ERROR_SUCCESS:
            raise self._error("NCryptDeleteKey", status)
        key.owned = False  # a successful NCryptDeleteKey frees the handle

    def _key_security(self, key: _Key) -> str:
        flags = DACL_SECURITY_INFORMATION | NCRYPT_SILENT_FLAG
        size = DWORD(0)
        get = self._api.NCryptGetProperty
        status = get(key.handle, NCRYPT_SECURITY_DESCR_PROPERTY, None, 0, ctypes.byref(size), flags)
        if status != ERROR_SUCCESS:
            raise self._error("NCryptGetProperty", status)
        descriptor = ctypes.create_string_buffer(max(size.value, 1))
        status = get(
            key.handle,
            NCRYPT_SECURITY_DESCR_PROPERTY,
            descriptor,
            size.value,
            ctypes.byref(size),
            flags,
        )
        if status != ERROR_SUCCESS:
            raise self._error("NCryptGetProperty", status)
        text = ctypes.c_void_p()
        convert = self._api.ConvertSecurityDescriptorToStringSecurityDescriptorW
        if not convert(
            descriptor, SDDL_REVISION_1, DACL_SECURITY_INFORMATION, ctypes.byref(text), None
        ):
            raise self._error("ConvertSecurityDescriptorToStringSecurityDescriptorW")
        try:
            return ctypes.wstring_at(text.value) if text.value else ""
        finally:
            self._api.LocalFree(text)

    def _set_key_security(self, key: _Key, sddl: str) -> None:
        descriptor = ctypes.c_void_p()
        size = ULONG(0)
        convert = self._api.ConvertStringSecurityDescriptorToSecurityDescriptorW
        if not convert(sddl, SDDL_REVISION_1, ctypes.byref(descriptor), ctypes.byref(size)):
            raise self._error("ConvertStringSecurityDescriptorToSecurityDescriptorW")
        try:
            # For this property dwFlags carries the SECURITY_INFORMATION being set; PERSIST
            # writes it to the key's storage, not only to this handle.
            flags = DACL_SECURITY_INFORMATION | NCRYPT_PERSIST_FLAG | NCRYPT_SILENT_FLAG
            status = self._api.NCryptSetProperty(
                key.handle, NCRYPT_SECURITY_DESCR_PROPERTY, descriptor, size.value, flags
            )
            if status != ERROR_SUCCESS:
                raise self._error("NCryptSetProperty", status)
        finally:
            self._api.LocalFree(descriptor)

    def _error(self, function: str, code: int | None = None) -> Win32Error:
        if code is None:
            code = _last_error()
        return Win32Error(code, self._message(code), function)

    def _message(self, code: int) -> str:
        buffer = ctypes.create_unicode_buffer(512)
        length = self._api.FormatMessageW(
            FORMAT_MESSAGE_FROM_SYSTEM | FORMAT_MESSAGE_IGNORE_INSERTS,
            None,
            code & 0xFFFFFFFF,
            0,
            buffer,
            len(buffer),
            None,
        )
        return buffer.value[:length].strip() if length else "unknown error"


def legacy_key_error(provider: str, cause: Win32Error | None) -> Win32Error:
    """NTE_BAD_PROVIDER for a key in a CryptoAPI provider that CNG cannot open."""
    reason = f"; {cause}" if cause is not None else ""
    return Win32Error(
        NTE_BAD_PROVIDER,
        f"the private key is in the legacy CryptoAPI provider {provider}, which CNG cannot "
        f"open{reason}",
        "CryptAcquireCertificatePrivateKey",
    )


class _PfxStore:
    """The in-memory store PFXImportCertStore returned; close() releases it."""

    def __init__(self, backend: Crypt32Backend, handle: int) -> None:
        self._backend = backend
        self._api = backend._api
        self._handle: int | None = handle

    def _store(self) -> int:
        if self._handle is None:
            raise Win32Error(
                ERROR_INVALID_HANDLE, "The handle is invalid.", "CertFindCertificateInStore"
            )
        return self._handle

    def set_property(self, thumbprint: str, prop_id: int, value: bytes | None) -> None:
        """Set a blob property on the imported certificate ``thumbprint``."""
        with self._backend._find(self._store(), thumbprint) as context:
            self._backend._set_property(context, prop_id, value)

    def key_security(self, thumbprint: str) -> str:
        """The DACL of the certificate's CNG key, as SDDL."""
        backend = self._backend
        with backend._find(self._store(), thumbprint) as context, backend._key(context) as key:
            return backend._key_security(key)

    def set_key_security(self, thumbprint: str, sddl: str) -> None:
        """Replace the DACL of the certificate's CNG key (persisted)."""
        backend = self._backend
        with backend._find(self._store(), thumbprint) as context, backend._key(context) as key:
            backend._set_key_security(key, sddl)

    def add_to_store(self, thumbprint: str, location: str, store: str, disposition: int) -> None:
        """CertAddCertificateContextToStore: the imported certificate, its properties with it."""
        backend = self._backend
        with (
            backend._find(self._store(), thumbprint) as context,
            backend._system_store(location, store, write=True) as target,
        ):
            if not self._api.CertAddCertificateContextToStore(target, context, disposition, None):
                raise backend._error("CertAddCertificateContextToStore")

    def delete_key(self, thumbprint: str) -> None:
        """Delete the persisted key the import created for ``thumbprint``."""
        backend = self._backend
        with backend._find(self._store(), thumbprint) as context:
            key = backend._acquire_key(context)
            try:
                backend._delete_key(key)
            finally:
                backend._release(key)

    def close(self) -> None:
        """CertCloseStore; safe to call twice."""
        handle, self._handle = self._handle, None
        if handle is not None:
            self._api.CertCloseStore(handle, 0)
