"""WindowsCertStore against the faithful fake backend, and the crypt32 binding's declarations."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from kvcertsync import CertSync, StoreError
from kvcertsync.emulator.certs import TestAuthority
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate, parse_settings
from kvcertsync.sources import MemorySource
from kvcertsync.stores import _crypt32 as binding
from kvcertsync.stores import _sddl
from kvcertsync.stores._fakewin import (
    FakeCertificate,
    FakeKey,
    FakeWindowsCertBackend,
    virtual_account_sid,
)
from kvcertsync.stores.base import InstalledCertificate, Store
from kvcertsync.stores.windows import (
    InstallIncomplete,
    Win32Error,
    WindowsCertStore,
    _grant_read_access,
)

pytestmark = pytest.mark.anyio

URL = "https://myvault.vault.azure.net/secrets/web"
OTHER_URL = "https://myvault.vault.azure.net/secrets/api"
V1, V2, V3 = "1" * 32, "2" * 32, "3" * 32
MY = "MY"
LM = "LocalMachine"
CU = "CurrentUser"
ACCESS_DENIED = "error 5 (0x00000005): Access is denied."
#: The description line kvcertsync writes, for V1 of URL, installed long ago.
OLD_IDENTITY = f"kvcertsync: {URL}/{V1} installed 2024-05-01T12:00:00.000001Z"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> TestAuthority:
    return TestAuthority("windows store test")


@pytest.fixture
def fake() -> FakeWindowsCertBackend:
    return FakeWindowsCertBackend()


@pytest.fixture
def store(fake: FakeWindowsCertBackend) -> WindowsCertStore:
    return WindowsCertStore(backend=fake)


def observed(url: str = URL, **kwargs: object) -> ObservedCertificate:
    return ObservedCertificate.of(url, **kwargs)


def der_of(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def thumbprints(fake: FakeWindowsCertBackend, location: str, name: str) -> set[str]:
    return {cert.thumbprint for cert in fake.store(location, name)}


def keys_of(fake: FakeWindowsCertBackend, material: CertificateMaterial) -> list[FakeKey]:
    """Every persisted key container holding ``material``'s key (orphans included)."""
    public = material.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return [key for key in fake.keys.values() if key.public_der == public]


# ================================================================ the binding (no Windows needed)

# Transcribed from the Windows SDK 10.0.22621.0 headers: um/wincrypt.h, um/ncrypt.h, um/winnt.h,
# shared/sddl.h, um/winbase.h, shared/winerror.h (cross-checked with mingw-w64-headers/include).
SDK_CONSTANTS = {
    # wincrypt.h
    "CERT_STORE_PROV_SYSTEM_W": 10,  # ((LPCSTR) 10)
    "CERT_SYSTEM_STORE_LOCATION_SHIFT": 16,
    "CERT_SYSTEM_STORE_CURRENT_USER_ID": 1,
    "CERT_SYSTEM_STORE_LOCAL_MACHINE_ID": 2,
    "CERT_SYSTEM_STORE_CURRENT_USER": 1 << 16,
    "CERT_SYSTEM_STORE_LOCAL_MACHINE": 2 << 16,
    "CERT_STORE_OPEN_EXISTING_FLAG": 0x00004000,
    "CERT_STORE_READONLY_FLAG": 0x00008000,
    "X509_ASN_ENCODING": 0x00000001,
    "PKCS_7_ASN_ENCODING": 0x00010000,
    "CERT_COMPARE_SHIFT": 16,
    "CERT_COMPARE_SHA1_HASH": 1,
    "CERT_FIND_SHA1_HASH": 1 << 16,  # (CERT_COMPARE_SHA1_HASH << CERT_COMPARE_SHIFT)
    "CERT_STORE_ADD_NEW": 1,
    "CERT_STORE_ADD_USE_EXISTING": 2,
    "CERT_STORE_ADD_REPLACE_EXISTING": 3,
    "CERT_STORE_ADD_ALWAYS": 4,
    "CERT_STORE_ADD_REPLACE_EXISTING_INHERIT_PROPERTIES": 5,
    "CERT_KEY_PROV_INFO_PROP_ID": 2,
    "CERT_SHA1_HASH_PROP_ID": 3,
    "CERT_FRIENDLY_NAME_PROP_ID": 11,
    "CERT_DESCRIPTION_PROP_ID": 13,
    "CERT_ACCESS_STATE_PROP_ID": 14,
    "CERT_RENEWAL_PROP_ID": 64,
    "CERT_ACCESS_STATE_WRITE_PERSIST_FLAG": 0x1,
    "CERT_ACCESS_STATE_SYSTEM_STORE_FLAG": 0x2,
    "CERT_ACCESS_STATE_LM_SYSTEM_STORE_FLAG": 0x4,
    "CERT_ACCESS_STATE_GP_SYSTEM_STORE_FLAG": 0x8,
    "CRYPT_EXPORTABLE": 0x00000001,
    "CRYPT_USER_PROTECTED": 0x00000002,
    "CRYPT_MACHINE_KEYSET": 0x00000020,
    "CRYPT_USER_KEYSET": 0x00001000,
    "PKCS12_PREFER_CNG_KSP": 0x00000100,
    "PKCS12_ALWAYS_CNG_KSP": 0x00000200,
    "PKCS12_NO_PERSIST_KEY": 0x00008000,
    "CRYPT_ACQUIRE_SILENT_FLAG": 0x00000040,
    "CRYPT_ACQUIRE_ONLY_NCRYPT_KEY_FLAG": 0x00040000,
    "CERT_NCRYPT_KEY_SPEC": 0xFFFFFFFF,
    "AT_KEYEXCHANGE": 1,
    "AT_SIGNATURE": 2,
    # ncrypt.h
    "NCRYPT_SECURITY_DESCR_PROPERTY": "Security Descr",
    "NCRYPT_SILENT_FLAG": 0x00000040,
    "NCRYPT_PERSIST_FLAG": 0x80000000,
    # winnt.h, sddl.h, winbase.h
    "DACL_SECURITY_INFORMATION": 0x00000004,
    "SDDL_REVISION_1": 1,
    "FORMAT_MESSAGE_IGNORE_INSERTS": 0x00000200,
    "FORMAT_MESSAGE_FROM_SYSTEM": 0x00001000,
    # winerror.h
    "ERROR_SUCCESS": 0,
    "ERROR_FILE_NOT_FOUND": 2,
    "ERROR_ACCESS_DENIED": 5,
    "ERROR_INVALID_HANDLE": 6,
    "ERROR_NO_MORE_FILES": 18,
    "ERROR_INVALID_PASSWORD": 86,
    "ERROR_INVALID_PARAMETER": 87,
    "ERROR_INSUFFICIENT_BUFFER": 122,
    "ERROR_CANCELLED": 1223,
    "ERROR_NONE_MAPPED": 1332,
    "NTE_PERM": 0x80090010,
    "NTE_BAD_PROVIDER": 0x80090013,
    "NTE_BAD_KEYSET": 0x80090016,
    "CRYPT_E_NOT_FOUND": 0x80092004,
    "CRYPT_E_EXISTS": 0x80092005,
    "CRYPT_E_NO_KEY_PROPERTY": 0x8009200B,
}

# The C signatures, transcribed from the SDK 10.0.22621.0 headers named beside each function and
# cross-checked with its reference page, learn.microsoft.com/windows/win32/api/<header>/nf-<header>-
# <name in lower case> ("Syntax", "Requirements: DLL"). Win32 types by width and signedness
# (windef.h, basetsd.h, winnt.h): DWORD and ULONG are unsigned 32-bit, BOOL and LONG (so
# SECURITY_STATUS) signed 32-bit, ULONG_PTR and every handle or pointer pointer-sized. Spelled out
# here rather than taken from the binding, so a BOOL where a HANDLE belongs, or a c_char_p where a
# wide string does, fails.
W_DWORD = ctypes.c_uint32
W_ULONG = ctypes.c_uint32
W_BOOL = ctypes.c_int32
W_LONG = ctypes.c_int32  # SECURITY_STATUS
W_ULONG_PTR = ctypes.c_size_t  # HCRYPTPROV_LEGACY, NCRYPT_HANDLE, NCRYPT_KEY_HANDLE
W_HANDLE = ctypes.c_void_p  # HCERTSTORE, HLOCAL
W_VOIDP = ctypes.c_void_p  # void *, LPCVOID, PSID, PSECURITY_DESCRIPTOR, PBYTE buffers
W_LPCWSTR = ctypes.c_wchar_p  # LPCWSTR and LPWSTR
W_PCCERT = ctypes.POINTER(binding.CERT_CONTEXT)  # PCCERT_CONTEXT
P = ctypes.POINTER

SDK_SIGNATURES: dict[str, tuple[str, type, tuple[type, ...]]] = {
    # wincrypt.h: HCERTSTORE CertOpenStore(LPCSTR lpszStoreProvider, DWORD dwEncodingType,
    #     HCRYPTPROV_LEGACY hCryptProv, DWORD dwFlags, const void *pvPara)
    # The provider is an integer id cast to LPCSTR, so a pointer-sized value; for
    # CERT_STORE_PROV_SYSTEM_W, pvPara is the store name as a wide string.
    "CertOpenStore": ("crypt32", W_HANDLE, (W_VOIDP, W_DWORD, W_ULONG_PTR, W_DWORD, W_LPCWSTR)),
    # wincrypt.h: BOOL CertCloseStore(HCERTSTORE hCertStore, DWORD dwFlags)
    "CertCloseStore": ("crypt32", W_BOOL, (W_HANDLE, W_DWORD)),
    # wincrypt.h: HCERTSTORE PFXImportCertStore(CRYPT_DATA_BLOB *pPFX, LPCWSTR szPassword,
    #     DWORD dwFlags)
    "PFXImportCertStore": (
        "crypt32",
        W_HANDLE,
        (P(binding.CRYPT_DATA_BLOB), W_LPCWSTR, W_DWORD),
    ),
    # wincrypt.h: PCCERT_CONTEXT CertFindCertificateInStore(HCERTSTORE hCertStore,
    #     DWORD dwCertEncodingType, DWORD dwFindFlags, DWORD dwFindType, const void *pvFindPara,
    #     PCCERT_CONTEXT pPrevCertContext)
    "CertFindCertificateInStore": (
        "crypt32",
        W_PCCERT,
        (W_HANDLE, W_DWORD, W_DWORD, W_DWORD, W_VOIDP, W_PCCERT),
    ),
    # wincrypt.h: PCCERT_CONTEXT CertEnumCertificatesInStore(HCERTSTORE hCertStore,
    #     PCCERT_CONTEXT pPrevCertContext)
    "CertEnumCertificatesInStore": ("crypt32", W_PCCERT, (W_HANDLE, W_PCCERT)),
    # wincrypt.h: BOOL CertFreeCertificateContext(PCCERT_CONTEXT pCertContext)
    "CertFreeCertificateContext": ("crypt32", W_BOOL, (W_PCCERT,)),
    # wincrypt.h: BOOL CertGetCertificateContextProperty(PCCERT_CONTEXT pCertContext,
    #     DWORD dwPropId, void *pvData, DWORD *pcbData)
    "CertGetCertificateContextProperty": (
        "crypt32",
        W_BOOL,
        (W_PCCERT, W_DWORD, W_VOIDP, P(W_DWORD)),
    ),
    # wincrypt.h: BOOL CertSetCertificateContextProperty(PCCERT_CONTEXT pCertContext,
    #     DWORD dwPropId, DWORD dwFlags, const void *pvData)
    "CertSetCertificateContextProperty": ("crypt32", W_BOOL, (W_PCCERT, W_DWORD, W_DWORD, W_VOIDP)),
    # wincrypt.h: BOOL CertAddCertificateContextToStore(HCERTSTORE hCertStore,
    #     PCCERT_CONTEXT pCertContext, DWORD dwAddDisposition, PCCERT_CONTEXT *ppStoreContext)
    "CertAddCertificateContextToStore": (
        "crypt32",
        W_BOOL,
        (W_HANDLE, W_PCCERT, W_DWORD, P(W_PCCERT)),
    ),
    # wincrypt.h: BOOL CertAddEncodedCertificateToStore(HCERTSTORE hCertStore,
    #     DWORD dwCertEncodingType, const BYTE *pbCertEncoded, DWORD cbCertEncoded,
    #     DWORD dwAddDisposition, PCCERT_CONTEXT *ppCertContext)
    # const BYTE * takes the DER bytes: c_char_p (8-bit), never c_wchar_p.
    "CertAddEncodedCertificateToStore": (
        "crypt32",
        W_BOOL,
        (W_HANDLE, W_DWORD, ctypes.c_char_p, W_DWORD, W_DWORD, P(W_PCCERT)),
    ),
    # wincrypt.h: BOOL CertDeleteCertificateFromStore(PCCERT_CONTEXT pCertContext)
    "CertDeleteCertificateFromStore": ("crypt32", W_BOOL, (W_PCCERT,)),
    # wincrypt.h: BOOL CryptAcquireCertificatePrivateKey(PCCERT_CONTEXT pCert, DWORD dwFlags,
    #     void *pvParameters, HCRYPTPROV_OR_NCRYPT_KEY_HANDLE *phCryptProvOrNCryptKey,
    #     DWORD *pdwKeySpec, BOOL *pfCallerFreeProvOrNCryptKey)
    # HCRYPTPROV_OR_NCRYPT_KEY_HANDLE is a ULONG_PTR.
    "CryptAcquireCertificatePrivateKey": (
        "crypt32",
        W_BOOL,
        (W_PCCERT, W_DWORD, W_VOIDP, P(W_ULONG_PTR), P(W_DWORD), P(W_BOOL)),
    ),
    # ncrypt.h: SECURITY_STATUS NCryptGetProperty(NCRYPT_HANDLE hObject, LPCWSTR pszProperty,
    #     PBYTE pbOutput, DWORD cbOutput, DWORD *pcbResult, DWORD dwFlags)
    "NCryptGetProperty": (
        "ncrypt",
        W_LONG,
        (W_ULONG_PTR, W_LPCWSTR, W_VOIDP, W_DWORD, P(W_DWORD), W_DWORD),
    ),
    # ncrypt.h: SECURITY_STATUS NCryptSetProperty(NCRYPT_HANDLE hObject, LPCWSTR pszProperty,
    #     PBYTE pbInput, DWORD cbInput, DWORD dwFlags)
    "NCryptSetProperty": (
        "ncrypt",
        W_LONG,
        (W_ULONG_PTR, W_LPCWSTR, W_VOIDP, W_DWORD, W_DWORD),
    ),
    # ncrypt.h: SECURITY_STATUS NCryptDeleteKey(NCRYPT_KEY_HANDLE hKey, DWORD dwFlags)
    "NCryptDeleteKey": ("ncrypt", W_LONG, (W_ULONG_PTR, W_DWORD)),
    # ncrypt.h: SECURITY_STATUS NCryptFreeObject(NCRYPT_HANDLE hObject)
    "NCryptFreeObject": ("ncrypt", W_LONG, (W_ULONG_PTR,)),
    # wincrypt.h (advapi32.dll): BOOL CryptReleaseContext(HCRYPTPROV hProv, DWORD dwFlags)
    # HCRYPTPROV is a ULONG_PTR.
    "CryptReleaseContext": ("advapi32", W_BOOL, (W_ULONG_PTR, W_DWORD)),
    # sddl.h: BOOL ConvertStringSidToSidW(LPCWSTR StringSid, PSID *Sid)
    "ConvertStringSidToSidW": ("advapi32", W_BOOL, (W_LPCWSTR, P(W_VOIDP))),
    # securitybaseapi.h (advapi32.dll): BOOL CheckTokenMembership(HANDLE TokenHandle,
    #     PSID SidToCheck, PBOOL IsMember)
    "CheckTokenMembership": ("advapi32", W_BOOL, (W_HANDLE, W_VOIDP, P(W_BOOL))),
    # winbase.h: BOOL LookupAccountNameW(LPCWSTR lpSystemName, LPCWSTR lpAccountName, PSID Sid,
    #     LPDWORD cbSid, LPWSTR ReferencedDomainName, LPDWORD cchReferencedDomainName,
    #     PSID_NAME_USE peUse)
    # SID_NAME_USE is a C enum (4 bytes).
    "LookupAccountNameW": (
        "advapi32",
        W_BOOL,
        (W_LPCWSTR, W_LPCWSTR, W_VOIDP, P(W_DWORD), W_LPCWSTR, P(W_DWORD), P(W_DWORD)),
    ),
    # sddl.h: BOOL ConvertSidToStringSidW(PSID Sid, LPWSTR *StringSid)
    "ConvertSidToStringSidW": ("advapi32", W_BOOL, (W_VOIDP, P(W_VOIDP))),
    # sddl.h: BOOL ConvertSecurityDescriptorToStringSecurityDescriptorW(
    #     PSECURITY_DESCRIPTOR SecurityDescriptor, DWORD RequestedStringSDRevision,
    #     SECURITY_INFORMATION SecurityInformation, LPWSTR *StringSecurityDescriptor,
    #     PULONG StringSecurityDescriptorLen)
    # SECURITY_INFORMATION is a DWORD (winnt.h).
    "ConvertSecurityDescriptorToStringSecurityDescriptorW": (
        "advapi32",
        W_BOOL,
        (W_VOIDP, W_DWORD, W_DWORD, P(W_VOIDP), P(W_ULONG)),
    ),
    # sddl.h: BOOL ConvertStringSecurityDescriptorToSecurityDescriptorW(
    #     LPCWSTR StringSecurityDescriptor, DWORD StringSDRevision,
    #     PSECURITY_DESCRIPTOR *SecurityDescriptor, PULONG SecurityDescriptorSize)
    "ConvertStringSecurityDescriptorToSecurityDescriptorW": (
        "advapi32",
        W_BOOL,
        (W_LPCWSTR, W_DWORD, P(W_VOIDP), P(W_ULONG)),
    ),
    # winbase.h: HLOCAL LocalFree(HLOCAL hMem)
    "LocalFree": ("kernel32", W_HANDLE, (W_HANDLE,)),
    # winbase.h: DWORD FormatMessageW(DWORD dwFlags, LPCVOID lpSource, DWORD dwMessageId,
    #     DWORD dwLanguageId, LPWSTR lpBuffer, DWORD nSize, va_list *Arguments)
    "FormatMessageW": (
        "kernel32",
        W_DWORD,
        (W_DWORD, W_VOIDP, W_DWORD, W_DWORD, W_LPCWSTR, W_DWORD, W_VOIDP),
    ),
}

_CTYPES_BASES = (
    ctypes._SimpleCData,
    ctypes._Pointer,
    ctypes.Structure,
    ctypes.Array,
)


@pytest.mark.parametrize("name", sorted(SDK_CONSTANTS))
def test_constant_matches_sdk_header(name: str) -> None:
    assert getattr(binding, name) == SDK_CONSTANTS[name]


def test_every_function_has_restype_and_argtypes() -> None:
    names = [proto.name for proto in binding.PROTOTYPES]
    assert len(names) == len(set(names))
    for proto in binding.PROTOTYPES:
        assert proto.restype is not None, proto.name
        assert isinstance(proto.argtypes, tuple), proto.name
        for argtype in (proto.restype, *proto.argtypes):
            assert isinstance(argtype, type), proto.name
            assert issubclass(argtype, _CTYPES_BASES), (proto.name, argtype)
        # ctypes itself accepts the signature (a bad type raises TypeError here).
        ctypes.CFUNCTYPE(proto.restype, *proto.argtypes)


def test_prototypes_match_sdk_signatures() -> None:
    assert {proto.name for proto in binding.PROTOTYPES} == set(SDK_SIGNATURES)
    for proto in binding.PROTOTYPES:
        dll, restype, argtypes = SDK_SIGNATURES[proto.name]
        assert proto.dll == dll, proto.name
        assert proto.restype is restype, (proto.name, proto.restype, restype)
        assert len(proto.argtypes) == len(argtypes), proto.name
        for index, (declared, expected) in enumerate(zip(proto.argtypes, argtypes, strict=True)):
            assert declared is expected, (proto.name, index, declared, expected)


def test_signature_table_tells_the_types_apart() -> None:
    # The check above compares identities, so it is only as sharp as these are distinct.
    kinds = [W_DWORD, W_BOOL, W_ULONG_PTR, W_HANDLE, W_LPCWSTR, ctypes.c_char_p, W_PCCERT]
    assert len(set(kinds)) == len(kinds)


def test_binding_calls_only_declared_functions() -> None:
    source = Path(binding.__file__).read_text(encoding="utf-8")
    called = set(re.findall(r"_api\.([A-Z]\w+)", source))
    assert called == {proto.name for proto in binding.PROTOTYPES}


def test_bind_applies_every_prototype_to_its_library() -> None:
    class Library:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getattr__(self, name: str) -> object:
            function = type("Function", (), {})()
            function.library = self.name
            object.__setattr__(self, name, function)
            return function

    opened: list[str] = []

    def open_library(name: str) -> Library:
        opened.append(name)
        return Library(name)

    api = binding.bind(open_library)
    assert sorted(opened) == ["advapi32", "crypt32", "kernel32", "ncrypt"]
    for proto in binding.PROTOTYPES:
        function = getattr(api, proto.name)
        assert function.library == proto.dll
        assert function.restype is proto.restype
        assert function.argtypes == proto.argtypes
    with pytest.raises(AttributeError, match="not in PROTOTYPES"):
        _ = api.CertOpenStoreA


def test_binding_imports_and_selects_nothing_at_import() -> None:
    # A fresh interpreter in which loading any shared library through ctypes fails loudly.
    script = (
        "import ctypes\n"
        "def refuse(self, *args, **kwargs):\n"
        "    raise AssertionError(f'library loaded at import time: {args}')\n"
        "ctypes.CDLL.__init__ = refuse\n"
        "import kvcertsync.stores, kvcertsync.stores.windows, kvcertsync.stores._fakewin\n"
        "import kvcertsync.stores._crypt32 as binding\n"
        "assert binding._loaded is None\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows path")
def test_load_outside_windows_raises_oserror() -> None:
    with pytest.raises(OSError, match=r"crypt32\.dll is a Windows library"):
        binding.load()
    assert binding._loaded is None


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows path")
def test_store_without_backend_needs_windows() -> None:
    with pytest.raises(StoreError, match="needs Windows"):
        WindowsCertStore()


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8, reason="x64 layout")
def test_struct_layouts_match_x64() -> None:
    # wincrypt.h on x64: DWORD, (pad), BYTE*, DWORD, (pad), PCERT_INFO, HCERTSTORE.
    assert ctypes.sizeof(binding.CERT_CONTEXT) == 40
    assert binding.CERT_CONTEXT.pbCertEncoded.offset == 8
    assert binding.CERT_CONTEXT.cbCertEncoded.offset == 16
    assert binding.CERT_CONTEXT.hCertStore.offset == 32
    assert ctypes.sizeof(binding.CRYPT_DATA_BLOB) == 16
    assert binding.CRYPT_DATA_BLOB.pbData.offset == 8
    assert ctypes.sizeof(binding.DWORD) == 4
    assert ctypes.sizeof(binding.ULONG_PTR) == 8


def test_win32_error_formats_codes_and_hresults() -> None:
    error = Win32Error(5, "Access is denied.", "CertOpenStore")
    assert str(error) == f"CertOpenStore failed with {ACCESS_DENIED}"
    assert error.code == error.winerror == 5
    hresult = Win32Error(-2146885628, "Cannot find object or property.")
    assert hresult.code == 0x80092004
    assert str(hresult) == "error 0x80092004: Cannot find object or property."


def test_stores_package_imports_without_windows() -> None:
    import kvcertsync.stores as stores

    assert stores.Store is Store


# ===================================================================== install: where things go


async def test_default_target_is_local_machine_my(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue(["www.example.com"])
    record = await store.install(observed(), material, V1)
    assert record == InstalledCertificate(
        uri=observed().uri,
        version=V1,
        thumbprint=material.thumbprint,
        not_after=material.not_after,
        location="LocalMachine\\MY",
    )
    (cert,) = fake.store(LM, MY)
    assert cert.thumbprint == material.thumbprint
    assert cert.friendly_name == "myvault.web"
    key = fake.key_of(cert)
    assert key is not None and key.machine and key.provider.endswith("Key Storage Provider")
    assert fake.store(CU, MY) == []


async def test_current_user_and_any_store_name(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue(["www.example.com"])
    target = observed(store_name="WebHosting", store_location=CU)
    record = await store.install(target, material, V1)
    assert record.location == "CurrentUser\\WebHosting"
    assert thumbprints(fake, CU, "WebHosting") == {material.thumbprint}
    intermediate = ca.intermediate.certificate.public_bytes(serialization.Encoding.DER)
    assert [cert.der for cert in fake.store(CU, "CA")] == [intermediate]
    assert fake.store_names(LM) == []
    (flags,) = [record.flags for record in fake.imports]
    assert flags & binding.CRYPT_USER_KEYSET and not flags & binding.CRYPT_MACHINE_KEYSET
    (cert,) = fake.store(CU, "WebHosting")
    key = fake.key_of(cert)
    assert key is not None and not key.machine


async def test_store_names_are_case_insensitive(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    await store.install(observed(store_name="my"), ca.issue(), V1)
    assert fake.store_names(LM) == ["CA", "MY"]
    current = await store.installed(observed(store_name="My"))
    assert current is not None and current.location == "LocalMachine\\My"


async def test_chain_goes_to_ca_store_and_root_never_installed(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue(["www.example.com"], include_root=True)
    root = ca.root_certificate.public_bytes(serialization.Encoding.DER)
    intermediate = ca.intermediate.certificate.public_bytes(serialization.Encoding.DER)
    await store.install(observed(), material, V1)
    assert [cert.der for cert in fake.store(LM, "CA")] == [intermediate]
    assert thumbprints(fake, LM, MY) == {material.thumbprint}
    assert "ROOT" not in fake.store_names(LM) and "AUTHROOT" not in fake.store_names(LM)
    everything = [cert.der for name in fake.store_names(LM) for cert in fake.store(LM, name)]
    assert root not in everything
    # Not even crypt32's temporary import store saw the root.
    (imported,) = fake.imports
    assert imported.thumbprints[0] == material.thumbprint
    assert len(imported.thumbprints) == 2


async def test_existing_intermediate_is_kept_as_is(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    fake.add(LM, "CA", ca.intermediate.certificate, friendly_name="set by the admin")
    await store.install(observed(), ca.issue(), V1)
    (cert,) = fake.store(LM, "CA")
    assert cert.friendly_name == "set by the admin"


@pytest.mark.parametrize("exportable", [False, True])
async def test_key_flags(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority, exportable: bool
) -> None:
    await store.install(observed(key_exportable=exportable), ca.issue(), V1)
    (imported,) = fake.imports
    assert bool(imported.flags & binding.CRYPT_EXPORTABLE) is exportable
    assert imported.flags & binding.CRYPT_MACHINE_KEYSET
    assert imported.flags & binding.PKCS12_PREFER_CNG_KSP
    assert not imported.flags & binding.PKCS12_NO_PERSIST_KEY  # keys persisted
    assert not imported.flags & binding.CRYPT_USER_PROTECTED  # no UI in a service
    (cert,) = fake.store(LM, MY)
    key = fake.key_of(cert)
    assert key is not None and key.exportable is exportable


async def test_the_pfx_handed_to_crypt32_is_protected_and_complete(
    ca: TestAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[bytes, str]] = []
    fake = FakeWindowsCertBackend()
    original = fake.import_pfx

    def spy(pfx: bytes, password: str, flags: int) -> object:
        seen.append((pfx, password))
        return original(pfx, password, flags)

    monkeypatch.setattr(fake, "import_pfx", spy)
    material = ca.issue(include_root=True)
    await WindowsCertStore(backend=fake).install(observed(), material, V1)
    ((pfx, password),) = seen
    assert password
    with pytest.raises(ValueError):
        pkcs12.load_pkcs12(pfx, b"")
    loaded = pkcs12.load_pkcs12(pfx, password.encode())
    assert loaded.cert is not None and loaded.cert.certificate == material.certificate
    assert [bag.certificate for bag in loaded.additional_certs] == [ca.intermediate.certificate]


async def test_eddsa_keys_are_refused_before_touching_windows(
    store: WindowsCertStore, fake: FakeWindowsCertBackend
) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed.example.com")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, None)
    )
    with pytest.raises(StoreError, match=r"LocalMachine\\MY: .*RSA and ECDSA"):
        await store.install(observed(), CertificateMaterial(private_key=key, certificate=cert), V1)
    assert fake.imports == []


async def test_directory_location_is_refused(store: WindowsCertStore, ca: TestAuthority) -> None:
    target = observed(store_location="/var/lib/certs")
    with pytest.raises(StoreError, match="not a Windows store location"):
        await store.install(target, ca.issue(), V1)
    with pytest.raises(StoreError, match="not a Windows store location"):
        await store.installed(target)


async def test_backend_work_runs_in_worker_threads(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    await store.install(observed(accounts=["Network Service"]), ca.issue(), V1)
    await store.installed(observed())
    loop_thread = threading.get_ident()
    assert fake.calls
    assert all(thread != loop_thread for _, thread in fake.calls)


# ========================================================================= identity and restart


async def test_identity_is_recorded_and_found_after_restart(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue()
    first = await WindowsCertStore(backend=fake).install(observed(), material, V1)
    (cert,) = fake.store(LM, MY)
    assert cert.description is not None
    assert re.fullmatch(
        rf"kvcertsync: {re.escape(URL)}/{V1} installed \d{{4}}-.*Z", cert.description
    )
    restarted = WindowsCertStore(backend=fake)
    assert await restarted.installed(observed()) == first
    assert await restarted.installed(observed(OTHER_URL)) is None


async def test_installed_on_a_missing_store_creates_nothing(
    store: WindowsCertStore, fake: FakeWindowsCertBackend
) -> None:
    assert await store.installed(observed(store_name="NeverUsed")) is None
    assert fake.store_names(LM) == []


async def test_engine_restart_reinstalls_nothing(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    source = MemorySource()
    version = source.set(URL, ca.issue())
    first = CertSync([observed()], store=WindowsCertStore(backend=fake), source=source)
    report = await first.sync_once()
    assert [r.installed.version for r in report.updated if r.installed] == [version]
    again = CertSync([observed()], store=WindowsCertStore(backend=fake), source=source)
    report = await again.sync_once()
    assert len(report.unchanged) == 1 and not report.updated
    assert len(fake.imports) == 1


async def test_old_versions_stay_and_the_newest_install_is_current(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    v1 = ca.issue()
    # Enumeration is by thumbprint: make the newer certificate enumerate first.
    v2 = ca.issue()
    while v2.thumbprint > v1.thumbprint:
        v2 = ca.issue()
    await store.install(observed(), v1, V1)
    await store.install(observed(), v2, V2)
    assert [cert.thumbprint for cert in fake.store(LM, MY)] == [v2.thumbprint, v1.thumbprint]
    current = await store.installed(observed())
    assert current is not None and (current.version, current.thumbprint) == (V2, v2.thumbprint)


async def test_same_certificate_reinstalled_is_updated_in_place(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue()
    newer = ca.issue()
    await store.install(observed(), material, V1)
    fake.set_property(LM, MY, material.thumbprint, binding.CERT_RENEWAL_PROP_ID, b"\1" * 20)
    await store.install(observed(), newer, V2)
    await store.install(observed(), material, V3)  # a rollback: a new version, the old bytes
    assert len(fake.store(LM, MY)) == 2
    cert = fake.find(LM, MY, material.thumbprint)
    assert cert is not None and cert.renewal is None  # no A -> B -> A renewal loop
    assert cert.description is not None and cert.description.count("kvcertsync:") == 1
    assert [key.name for key in keys_of(fake, material)] == [cert.key_name]
    assert len(fake.imports) == 2  # the rollback imported nothing
    current = await store.installed(observed())
    assert current is not None and (current.version, current.thumbprint) == (
        V3,
        material.thumbprint,
    )


async def test_one_certificate_shared_by_two_secrets_keeps_both_identities(
    store: WindowsCertStore, ca: TestAuthority
) -> None:
    material = ca.issue()
    await store.install(observed(), material, V1)
    await store.install(observed(OTHER_URL), material, V2)
    web = await store.installed(observed())
    api = await store.installed(observed(OTHER_URL))
    assert web is not None and web.version == V1
    assert api is not None and api.version == V2


async def test_one_certificate_for_two_secrets_keeps_one_key_with_both_grants(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    pool = fake.add_account("IIS AppPool\\Api")
    material = ca.issue()
    web = await store.install(observed(accounts=["Network Service"]), material, V1)
    (cert,) = fake.store(LM, MY)
    first_key = cert.key_name
    api = await store.install(observed(OTHER_URL, accounts=["IIS AppPool\\Api"]), material, V2)
    (cert,) = fake.store(LM, MY)
    (key,) = keys_of(fake, material)  # one container: nothing orphaned
    assert cert.key_name == key.name == first_key
    assert key.dacl == f"D:PAI(A;;FA;;;SY)(A;;FA;;;BA)(A;;FR;;;NS)(A;;FR;;;{pool})"
    assert cert.description is not None
    lines = cert.description.splitlines()
    assert [line.split(" installed ")[0] for line in lines] == [
        f"kvcertsync: {URL}/{V1}",
        f"kvcertsync: {OTHER_URL}/{V2}",
    ]
    assert cert.friendly_name == "myvault.api"
    assert len(fake.imports) == 1
    assert await store.installed(observed()) == web
    assert await store.installed(observed(OTHER_URL)) == api


async def test_certificate_imported_by_hand_is_adopted_with_its_key(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue()
    seeded = fake.add(
        LM,
        MY,
        material,
        friendly_name="by hand",
        description="renewed by hand",
        key_dacl="D:PAI(A;;FA;;;SY)(A;;FA;;;BA)(A;;GR;;;S-1-5-19)",
    )
    key = fake.key_of(seeded)
    assert key is not None
    record = await store.install(observed(accounts=["Network Service"]), material, V1)
    assert fake.imports == []
    (cert,) = fake.store(LM, MY)
    assert cert.key_name == key.name and list(fake.keys) == [key.name]
    # As Windows reads it back: the hand-made ACE and the new one both mapped and aliased.
    assert key.dacl == "D:PAI(A;;FA;;;SY)(A;;FA;;;BA)(A;;FR;;;LS)(A;;FR;;;NS)"
    assert cert.description is not None
    assert cert.description.splitlines()[0] == "renewed by hand"
    assert cert.friendly_name == "myvault.web"
    assert await store.installed(observed()) == record


@pytest.mark.parametrize("how", ["certificate only", "key container gone"])
async def test_same_certificate_without_a_usable_key_is_imported(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority, how: str
) -> None:
    material = ca.issue()
    if how == "certificate only":
        fake.add(LM, MY, material.certificate, description="cert only")
    else:
        seeded = fake.add(LM, MY, material, description="cert only")
        del fake.keys[seeded.key_name or ""]
    await store.install(observed(accounts=["Network Service"]), material, V1)
    (cert,) = fake.store(LM, MY)
    assert len(fake.imports) == 1
    key = fake.key_of(cert)
    assert key is not None and "(A;;FR;;;NS)" in key.dacl
    assert cert.description is not None and cert.description.startswith("cert only\n")


@pytest.mark.parametrize("listing", ["as the fake lists", "reversed"])
async def test_tied_identities_do_not_depend_on_the_listing_order(
    store: WindowsCertStore,
    fake: FakeWindowsCertBackend,
    ca: TestAuthority,
    monkeypatch: pytest.MonkeyPatch,
    listing: str,
) -> None:
    # The same identity line on two certificates (a description copied by hand).
    seeded = [fake.add(LM, MY, ca.issue(), description=OLD_IDENTITY) for _ in range(2)]
    if listing == "reversed":
        original = fake.certificates

        def reversed_listing(
            location: str, store: str, prop_ids: Sequence[int]
        ) -> list[binding.StoredCertificate]:
            return original(location, store, prop_ids)[::-1]

        monkeypatch.setattr(fake, "certificates", reversed_listing)
    current = await store.installed(observed())
    assert current is not None
    assert current.thumbprint == max(cert.thumbprint for cert in seeded)


async def test_foreign_descriptions_are_not_identities(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    fake.add(LM, MY, ca.issue(), description="renewed by hand")
    fake.add(LM, MY, ca.issue(), description=f"kvcertsync: {URL} installed yesterday")
    fake.add(LM, MY, ca.issue(), description=f"kvcertsync: {URL} installed 2024-01-01T00:00:00.0Z")
    assert await store.installed(observed()) is None


async def test_remove_superseded_deletes_only_our_older_versions(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    store = WindowsCertStore(backend=fake, remove_superseded=True)
    someone_elses = fake.add(LM, MY, ca.issue(["www.example.com"]))
    other_secret = ca.issue(["api.example.com"])
    await store.install(observed(OTHER_URL), other_secret, V1)
    v1 = ca.issue(["www.example.com"])
    await store.install(observed(), v1, V1)
    old_key = fake.find(LM, MY, v1.thumbprint).key_name
    v2 = ca.issue(["www.example.com"])
    await store.install(observed(), v2, V2)
    assert thumbprints(fake, LM, MY) == {
        someone_elses.thumbprint,
        other_secret.thumbprint,
        v2.thumbprint,
    }
    assert old_key not in fake.keys


async def test_remove_superseded_keeps_a_certificate_another_secret_uses(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    store = WindowsCertStore(backend=fake, remove_superseded=True)
    shared = ca.issue()
    await store.install(observed(), shared, V1)
    await store.install(observed(OTHER_URL), shared, V1)
    await store.install(observed(), ca.issue(), V2)
    cert = fake.find(LM, MY, shared.thumbprint)
    assert cert is not None and cert.description is not None
    assert OTHER_URL in cert.description and f"{URL}/" not in cert.description
    api = await store.installed(observed(OTHER_URL))
    assert api is not None and api.thumbprint == shared.thumbprint


def test_option_validation(fake: FakeWindowsCertBackend) -> None:
    with pytest.raises(ValueError, match="choose one"):
        WindowsCertStore(backend=fake, link_on_renewal=True, remove_superseded=True)
    with pytest.raises(ValueError, match="link_scope"):
        WindowsCertStore(backend=fake, link_scope="all")


def test_from_settings_reads_link_on_renewal(fake: FakeWindowsCertBackend) -> None:
    settings = parse_settings(
        {"secretsManagementSettings": {"linkOnRenewal": True, "observedCertificates": [URL]}}
    )
    store = WindowsCertStore.from_settings(settings, backend=fake, link_scope="managed")
    assert store.link_on_renewal and store.link_scope == "managed"
    assert isinstance(store, Store)


# ============================================================================== linkOnRenewal

LINK_CASES = [
    # (names on the existing certificate, linked?)
    (["www.example.com"], True),  # subset
    (["www.example.com", "example.com"], True),  # same set
    (["WWW.Example.COM"], True),  # DNS names compare case-insensitively
    (["www.example.com", "example.com", "extra.example.com"], False),  # superset
    (["www.example.com", "other.example.org"], False),  # overlap only
    (["unrelated.example.net"], False),  # disjoint
    ([], False),  # no DNS SAN at all
]


@pytest.mark.parametrize(("names", "linked"), LINK_CASES)
async def test_link_on_renewal_san_scope(
    fake: FakeWindowsCertBackend, ca: TestAuthority, names: list[str], linked: bool
) -> None:
    store = WindowsCertStore(backend=fake, link_on_renewal=True)
    existing = fake.add(LM, MY, ca.issue(names))
    elsewhere = fake.add(LM, "WebHosting", ca.issue(names))
    new = ca.issue(["www.example.com", "example.com"])
    await store.install(observed(), new, V1)
    assert existing.renewal == (new.thumbprint if linked else None)
    assert elsewhere.renewal is None  # only the target store
    assert fake.find(LM, MY, new.thumbprint).renewal is None


async def test_link_on_renewal_skips_unreadable_certificates(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    store = WindowsCertStore(backend=fake, link_on_renewal=True)
    junk = fake.add(LM, MY, b"\x30\x03\x02\x01\x00")
    await store.install(observed(), ca.issue(["www.example.com"]), V1)
    assert junk.renewal is None


async def test_link_on_renewal_skips_a_certificate_with_a_duplicated_extension(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    store = WindowsCertStore(backend=fake, link_on_renewal=True)
    der = ca.issue(["www.example.com"]).certificate.public_bytes(serialization.Encoding.DER)
    ski, san = bytes.fromhex("0603551d0e"), bytes.fromhex("0603551d11")
    assert der.count(ski) == 1 and der.count(san) == 1
    twice = fake.add(LM, MY, der.replace(ski, san))  # two subjectAltNames: none to trust
    await store.install(observed(), ca.issue(["www.example.com"]), V1)
    assert twice.renewal is None


async def test_link_on_renewal_off_links_nothing(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    existing = fake.add(LM, MY, ca.issue(["www.example.com"]))
    await store.install(observed(), ca.issue(["www.example.com"]), V1)
    assert existing.renewal is None


async def test_link_on_renewal_relinks_every_older_version(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    store = WindowsCertStore(backend=fake, link_on_renewal=True)
    versions = [ca.issue(["www.example.com"]) for _ in range(3)]
    for material, version in zip(versions, (V1, V2, V3), strict=True):
        await store.install(observed(), material, version)
    newest = versions[-1].thumbprint
    renewals = {cert.thumbprint: cert.renewal for cert in fake.store(LM, MY)}
    assert renewals == {
        versions[0].thumbprint: newest,
        versions[1].thumbprint: newest,
        newest: None,
    }


async def test_link_scope_managed_links_only_our_own_versions(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    store = WindowsCertStore(backend=fake, link_on_renewal=True, link_scope="managed")
    foreign = fake.add(LM, MY, ca.issue(["www.example.com"]))
    other_secret = ca.issue(["www.example.com"])
    await store.install(observed(OTHER_URL), other_secret, V1)
    v1 = ca.issue(["www.example.com"])
    await store.install(observed(), v1, V1)
    v2 = ca.issue(["www.example.com"])
    await store.install(observed(), v2, V2)
    assert fake.find(LM, MY, v1.thumbprint).renewal == v2.thumbprint
    assert foreign.renewal is None
    assert fake.find(LM, MY, other_secret.thumbprint).renewal is None


async def test_link_failure_after_commit_is_reported_with_the_install(
    fake: FakeWindowsCertBackend, ca: TestAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = WindowsCertStore(backend=fake, link_on_renewal=True)
    old = fake.add(LM, MY, ca.issue(["www.example.com"]))
    new = ca.issue(["www.example.com"])

    def refuse(*args: object, **kwargs: object) -> None:
        raise Win32Error(5, "Access is denied.", "CertSetCertificateContextProperty")

    # Staging sets properties on the import store; only the link writes to the system store.
    monkeypatch.setattr(fake, "set_property", refuse)
    with pytest.raises(InstallIncomplete) as caught:
        await store.install(observed(), new, V1)
    assert caught.value.installed.thumbprint == new.thumbprint
    assert f"link {old.thumbprint}" in str(caught.value)
    assert ACCESS_DENIED in str(caught.value)
    current = await store.installed(observed())
    assert current is not None and current.thumbprint == new.thumbprint
    assert old.renewal is None


# ================================================================================== key ACLs


async def test_accounts_get_read_access_and_owners_keep_full_control(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    pool = fake.add_account("IIS AppPool\\Site")
    accounts = ["Network Service", "IIS AppPool\\Site", "NT AUTHORITY\\NETWORK SERVICE"]
    await store.install(observed(accounts=accounts), ca.issue(), V1)
    (cert,) = fake.store(LM, MY)
    key = fake.key_of(cert)
    assert key is not None
    assert key.dacl == f"D:PAI(A;;FA;;;SY)(A;;FA;;;BA)(A;;FR;;;NS)(A;;FR;;;{pool})"
    assert pool == virtual_account_sid("IIS AppPool\\Site")


async def test_current_user_keys_get_no_administrators_ace(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    target = observed(store_location=CU, accounts=["Network Service"])
    await store.install(target, ca.issue(), V1)
    (cert,) = fake.store(CU, MY)
    key = fake.key_of(cert)
    assert key is not None
    assert key.dacl == f"D:PAI(A;;FA;;;SY)(A;;FA;;;{fake.user_sid})(A;;FR;;;NS)"


async def test_unknown_account_is_reported_but_the_certificate_installed(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue()
    target = observed(accounts=["IIS AppPool\\Missing", "Network Service"])
    with pytest.raises(InstallIncomplete) as caught:
        await store.install(target, material, V1)
    error = caught.value
    assert isinstance(error, StoreError)
    assert "'IIS AppPool\\\\Missing'" in str(error) and "LocalMachine\\MY" in str(error)
    assert error.installed.thumbprint == material.thumbprint
    current = await store.installed(target)
    assert current is not None and current.version == V1
    key = fake.key_of(fake.store(LM, MY)[0])
    assert key is not None and "(A;;FR;;;NS)" in key.dacl


def test_grant_keeps_aliases_inherited_order_and_other_parts() -> None:
    sddl = (
        "O:BAG:SYD:PAI(D;;FA;;;AN)(A;;FA;;;SY)(A;;0x120089;;;NS)(A;ID;FA;;;BA)S:AI(AU;SA;FA;;;WD)"
    )
    granted = _grant_read_access(sddl, ["S-1-5-20", "S-1-5-19"], full_control=["SY", "BA"])
    # NS already reads (FILE_GENERIC_READ as a mask), BA's inherited full control counts.
    assert granted == (
        "O:BAG:SYD:PAI(D;;FA;;;AN)(A;;FA;;;SY)(A;;0x120089;;;NS)(A;;GR;;;S-1-5-19)"
        "(A;ID;FA;;;BA)S:AI(AU;SA;FA;;;WD)"
    )
    assert _grant_read_access(granted, ["S-1-5-19", "S-1-5-20"]) == granted


def test_grant_adds_missing_owners_and_respects_null_dacl() -> None:
    assert _grant_read_access("D:P", ["S-1-5-20"], full_control=["SY", "BA"]) == (
        "D:P(A;;FA;;;SY)(A;;FA;;;BA)(A;;GR;;;S-1-5-20)"
    )
    assert _grant_read_access("D:NO_ACCESS_CONTROL", ["S-1-5-20"]) == "D:NO_ACCESS_CONTROL"
    with pytest.raises(ValueError, match="no DACL"):
        _grant_read_access("O:BAG:SY", ["S-1-5-20"])


def test_parse_finds_the_dacl_after_owner_aliases_ending_in_d() -> None:
    descriptor = _sddl.parse("O:DDG:DDD:P(A;;FA;;;SY)")
    assert (descriptor.prefix, descriptor.flags, descriptor.suffix) == ("O:DDG:DD", {"P"}, "")
    assert [ace.text for ace in descriptor.aces] == ["(A;;FA;;;SY)"]


# ========================================================================= failure atomicity

# (Win32 function to fail, store named in the error, accounts needed to reach it)
FAILURE_POINTS = [
    ("PFXImportCertStore", "LocalMachine\\MY", ()),
    ("CertSetCertificateContextProperty", "LocalMachine\\MY", ()),
    ("NCryptGetProperty", "LocalMachine\\MY", ("Network Service",)),
    ("NCryptSetProperty", "LocalMachine\\MY", ("Network Service",)),
    ("LookupAccountNameW", "LocalMachine\\MY", ("Network Service",)),
    ("CertAddEncodedCertificateToStore", "LocalMachine\\CA", ()),
    ("CertAddCertificateContextToStore", "LocalMachine\\MY", ()),
]


@pytest.mark.parametrize(("function", "where", "accounts"), FAILURE_POINTS)
async def test_failure_leaves_the_previous_certificate_current(
    store: WindowsCertStore,
    fake: FakeWindowsCertBackend,
    ca: TestAuthority,
    function: str,
    where: str,
    accounts: tuple[str, ...],
) -> None:
    target = observed(accounts=list(accounts))
    before = await store.install(target, ca.issue(), V1)
    keys_before = set(fake.keys)
    fake.fail(function)
    with pytest.raises(StoreError) as caught:
        await store.install(target, ca.issue(), V2)
    message = str(caught.value)
    assert not isinstance(caught.value, InstallIncomplete)
    assert message.startswith(f"{where}: cannot ")
    assert f"{function} failed with {ACCESS_DENIED}" in message
    assert await store.installed(target) == before
    assert thumbprints(fake, LM, MY) == {before.thumbprint}
    assert set(fake.keys) == keys_before  # the aborted import's key was deleted
    assert fake.open_pfx_stores == 0


# (Win32 function to fail, store named in the error, accounts of the second secret)
IN_PLACE_FAILURE_POINTS = [
    ("CertOpenStore", "LocalMachine\\MY", ()),
    ("CryptAcquireCertificatePrivateKey", "LocalMachine\\MY", ()),
    ("NCryptGetProperty", "LocalMachine\\MY", ()),
    ("NCryptSetProperty", "LocalMachine\\MY", ("Network Service",)),
    ("LookupAccountNameW", "LocalMachine\\MY", ("Network Service",)),
    ("CertAddEncodedCertificateToStore", "LocalMachine\\CA", ()),
    ("CertSetCertificateContextProperty", "LocalMachine\\MY", ()),
]


@pytest.mark.parametrize(("function", "where", "accounts"), IN_PLACE_FAILURE_POINTS)
async def test_failure_updating_in_place_changes_nothing_current(
    store: WindowsCertStore,
    fake: FakeWindowsCertBackend,
    ca: TestAuthority,
    function: str,
    where: str,
    accounts: tuple[str, ...],
) -> None:
    material = ca.issue()
    before = await store.install(observed(), material, V1)
    (cert,) = fake.store(LM, MY)
    description = cert.description
    keys_before = {name: key.dacl for name, key in fake.keys.items()}
    fake.fail(function)
    with pytest.raises(StoreError) as caught:
        await store.install(observed(OTHER_URL, accounts=list(accounts)), material, V2)
    message = str(caught.value)
    assert not isinstance(caught.value, InstallIncomplete)
    assert message.startswith(f"{where}: cannot ")
    assert f"{function} failed with {ACCESS_DENIED}" in message
    assert await store.installed(observed(OTHER_URL)) is None
    assert await store.installed(observed()) == before
    assert cert.description == description
    assert {name: key.dacl for name, key in fake.keys.items()} == keys_before
    assert len(fake.imports) == 1


async def test_failure_writing_the_description_in_place_is_the_commit_point(
    store: WindowsCertStore,
    fake: FakeWindowsCertBackend,
    ca: TestAuthority,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    material = ca.issue()
    before = await store.install(observed(), material, V1)
    original = fake.set_property

    def refuse_description(
        location: str, store: str, thumbprint: str, prop_id: int, value: bytes | None
    ) -> None:
        if prop_id == binding.CERT_DESCRIPTION_PROP_ID:
            raise Win32Error(5, "Access is denied.", "CertSetCertificateContextProperty")
        original(location, store, thumbprint, prop_id, value)

    monkeypatch.setattr(fake, "set_property", refuse_description)
    with pytest.raises(StoreError, match="friendly name and description") as caught:
        await WindowsCertStore(backend=fake).install(observed(OTHER_URL), material, V2)
    assert not isinstance(caught.value, InstallIncomplete)
    assert await store.installed(observed(OTHER_URL)) is None
    assert await store.installed(observed()) == before


async def test_failure_to_unlink_after_updating_in_place_is_reported(
    store: WindowsCertStore,
    fake: FakeWindowsCertBackend,
    ca: TestAuthority,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    material = ca.issue()
    await store.install(observed(), material, V1)
    fake.set_property(LM, MY, material.thumbprint, binding.CERT_RENEWAL_PROP_ID, b"\1" * 20)
    original = fake.set_property

    def refuse_unlink(
        location: str, store: str, thumbprint: str, prop_id: int, value: bytes | None
    ) -> None:
        if prop_id == binding.CERT_RENEWAL_PROP_ID:
            raise Win32Error(5, "Access is denied.", "CertSetCertificateContextProperty")
        original(location, store, thumbprint, prop_id, value)

    monkeypatch.setattr(fake, "set_property", refuse_unlink)
    with pytest.raises(InstallIncomplete) as caught:
        await store.install(observed(OTHER_URL), material, V2)
    assert f"remove the renewal link of {material.thumbprint}" in str(caught.value)
    assert ACCESS_DENIED in str(caught.value)
    current = await store.installed(observed(OTHER_URL))
    assert current is not None and current == caught.value.installed


async def test_failed_key_cleanup_is_logged_and_the_real_error_raised(
    store: WindowsCertStore,
    fake: FakeWindowsCertBackend,
    ca: TestAuthority,
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake.fail("CertAddCertificateContextToStore")
    fake.fail("NCryptDeleteKey")
    with (
        caplog.at_level(logging.WARNING, logger="kvcertsync.stores.windows"),
        pytest.raises(StoreError, match="CertAddCertificateContextToStore failed"),
    ):
        await store.install(observed(), ca.issue(), V1)
    assert "could not delete the key of an aborted import" in caplog.text
    assert fake.store(LM, MY) == [] and fake.open_pfx_stores == 0


async def test_not_elevated_local_machine_is_refused_before_touching_windows(
    ca: TestAuthority,
) -> None:
    fake = FakeWindowsCertBackend(elevated=False)
    store = WindowsCertStore(backend=fake)
    with pytest.raises(StoreError) as caught:
        await store.install(observed(), ca.issue(), V1)
    message = str(caught.value)
    assert message.startswith("LocalMachine\\MY: installing into LocalMachine stores needs ")
    assert "run elevated or as a service account" in message
    assert [function for function, _ in fake.calls] == ["CheckTokenMembership"]
    assert fake.keys == {} and fake.imports == []
    # Asked once per store: elevation does not change while a process runs.
    with pytest.raises(StoreError, match="administrator rights"):
        await store.install(observed(OTHER_URL), ca.issue(), V1)
    assert [function for function, _ in fake.calls] == ["CheckTokenMembership"]
    # Reading needs no elevation, and CurrentUser needs none at all.
    assert await store.installed(observed()) is None
    record = await store.install(observed(store_location=CU), ca.issue(), V1)
    assert record.location == "CurrentUser\\MY"
    # Without the check, Windows itself (and the fake) would refuse the write.
    with pytest.raises(Win32Error, match="Access is denied"):
        fake.add_encoded(LM, "CA", der_of(ca.intermediate.certificate), 2)


async def test_elevation_check_failure_names_the_step(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    fake.fail("CheckTokenMembership", binding.ERROR_INVALID_PARAMETER)
    with pytest.raises(StoreError, match=r"^LocalMachine\\MY: cannot check for administrator"):
        await store.install(observed(), ca.issue(), V1)
    assert fake.imports == []
    await store.install(observed(), ca.issue(), V1)  # a failed check is not remembered


async def test_read_failure_in_installed_names_the_store_and_code(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    await store.install(observed(), ca.issue(), V1)
    fake.fail("CertOpenStore")
    with pytest.raises(StoreError) as caught:
        await store.installed(observed())
    assert str(caught.value) == (
        f"LocalMachine\\MY: cannot list the store: CertOpenStore failed with {ACCESS_DENIED}"
    )
    fake.fail("CertOpenStore", binding.NTE_PERM)
    with pytest.raises(StoreError, match=r"^LocalMachine\\MY: .*CertOpenStore.*0x80090010"):
        await store.install(observed(), ca.issue(), V2)
    assert len(fake.imports) == 1  # the install stopped at its first read


async def test_listing_errors_name_the_store(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    await store.install(observed(), ca.issue(), V1)
    fake.fail("CertEnumCertificatesInStore", binding.CRYPT_E_EXISTS)
    with pytest.raises(StoreError, match=r"^LocalMachine\\MY: cannot list the store: .*0x80092005"):
        await store.installed(observed())


# ============================================== as strict as Windows: descriptors, CAPI, visibility


def test_descriptors_read_back_as_windows_writes_them() -> None:
    # What Wine's and Windows' converters do: well-known SIDs to aliases, generic rights mapped.
    written = (
        "D:PAI(A;;GR;;;S-1-5-20)(A;;0x120089;;;S-1-5-19)(A;;GA;;;S-1-5-32-544)(A;OICI;GR;;;WD)"
    )
    assert _sddl.normalise(written) == "D:PAI(A;;FR;;;NS)(A;;FR;;;LS)(A;;FA;;;BA)(A;OICI;FR;;;WD)"
    # Inherit-only ACEs do not apply to the object, so their generic rights stay unmapped.
    assert _sddl.normalise("D:(A;IO;GR;;;BU)") == "D:(A;IO;GR;;;BU)"
    unaliased = "D:(A;;FR;;;S-1-5-82-1-2-3-4-5)"
    assert _sddl.normalise(unaliased) == unaliased
    with pytest.raises(ValueError, match="unknown access right 'ZZ'"):
        _sddl.parse("D:(A;;ZZ;;;NS)")


@pytest.mark.parametrize(
    "ace",
    ["(A;;FR;;;NS)", "(A;;GR;;;S-1-5-20)", "(A;;0x120089;;;S-1-5-20)", "(A;;GA;;;NS)"],
)
def test_read_access_is_decided_on_meaning_not_text(ace: str) -> None:
    dacl = f"D:PAI(A;;FA;;;SY){ace}"
    assert _grant_read_access(dacl, ["S-1-5-20"]) == dacl  # nothing to add: NS can read
    denied = f"D:PAI(D;;FR;;;NS)(A;;FA;;;SY){ace}"
    assert _sddl.parse(denied).grants("S-1-5-20", _sddl.FILE_GENERIC_READ) is False


async def test_a_grant_windows_already_holds_writes_nothing(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue()
    fake.add(LM, MY, material, key_dacl="D:PAI(A;;FA;;;SY)(A;;FA;;;BA)(A;;0x120089;;;S-1-5-20)")
    await store.install(observed(accounts=["NT AUTHORITY\\Network Service"]), material, V1)
    functions = [function for function, _ in fake.calls]
    assert "NCryptGetProperty" in functions and "NCryptSetProperty" not in functions


async def test_a_permission_write_windows_refuses_is_reported(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    # Someone else's key: SYSTEM owns it, Administrators may read it but not change its DACL.
    material = ca.issue()
    fake.add(
        LM, MY, material, key_owner="SY", key_dacl="D:PAI(A;;FA;;;SY)(A;;FR;;;BA)", description="x"
    )
    with pytest.raises(StoreError) as caught:
        await store.install(observed(accounts=["Network Service"]), material, V1)
    assert str(caught.value) == (
        "LocalMachine\\MY: cannot grant accounts read access to the private key: "
        "NCryptSetProperty failed with error 0x80090010: Access denied."
    )
    (cert,) = fake.store(LM, MY)
    assert cert.description == "x"  # not committed: the install is not current
    assert await store.installed(observed()) is None


async def test_a_grant_windows_does_not_keep_is_reported(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    # A deny ACE outweighs the allow ACE added after it: the DACL read back says so.
    material = ca.issue()
    fake.add(LM, MY, material, key_dacl="D:PAI(D;;FR;;;NS)(A;;FA;;;SY)(A;;FA;;;BA)")
    with pytest.raises(StoreError, match=r"reads its DACL back without it for S-1-5-20: D:PAI"):
        await store.install(observed(accounts=["Network Service"]), material, V1)
    assert await store.installed(observed()) is None


async def test_a_key_in_microsofts_own_csp_is_adopted_through_cng(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue()
    seeded = fake.add(LM, MY, material, key_provider="capi")
    await store.install(observed(accounts=["Network Service"]), material, V1)
    assert fake.imports == []
    key = fake.key_of(seeded)
    assert key is not None and key.provider_type == 24 and "(A;;FR;;;NS)" in key.dacl


async def test_a_key_cng_cannot_open_is_refused_not_orphaned(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue()
    seeded = fake.add(LM, MY, material, key_provider="capi-only", description="by hand")
    keys = dict(fake.keys)
    with pytest.raises(StoreError) as caught:
        await store.install(observed(), material, V1)
    message = str(caught.value)
    assert message.startswith(f"LocalMachine\\MY: {material.thumbprint} is already in the store")
    assert f"Remove-Item Cert:\\LocalMachine\\MY\\{material.thumbprint} -DeleteKey" in message
    assert "Contoso Hardware Cryptographic Provider (type 1)" in message
    assert fake.imports == [] and fake.keys == keys
    assert fake.store(LM, MY) == [seeded] and seeded.description == "by hand"


@pytest.mark.parametrize("cause", ["legacy key", "acquire denied"])
async def test_superseded_removal_stops_when_the_key_cannot_be_acquired(
    fake: FakeWindowsCertBackend, ca: TestAuthority, cause: str
) -> None:
    store = WindowsCertStore(backend=fake, remove_superseded=True)
    old = ca.issue()
    provider = "capi-only" if cause == "legacy key" else "cng"
    seeded = fake.add(LM, MY, old, description=OLD_IDENTITY, key_provider=provider)
    if cause == "acquire denied":
        fake.fail("CryptAcquireCertificatePrivateKey", binding.NTE_PERM)
    new = ca.issue()
    with pytest.raises(InstallIncomplete) as caught:
        await store.install(observed(), new, V2)
    (problem,) = caught.value.problems
    assert problem.startswith(f"LocalMachine\\MY: cannot remove superseded {old.thumbprint}: ")
    assert "CryptAcquireCertificatePrivateKey failed" in problem
    assert caught.value.installed.thumbprint == new.thumbprint  # the new one is current
    assert thumbprints(fake, LM, MY) == {old.thumbprint, new.thumbprint}
    assert seeded.key_name in fake.keys  # nothing deleted: neither certificate nor key


async def test_superseded_key_delete_denied_is_reported(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    store = WindowsCertStore(backend=fake, remove_superseded=True)
    old = ca.issue()
    seeded = fake.add(
        LM, MY, old, description=OLD_IDENTITY, key_dacl="D:PAI(A;;FR;;;BA)", key_owner="SY"
    )
    with pytest.raises(InstallIncomplete) as caught:
        await store.install(observed(), ca.issue(), V2)
    (problem,) = caught.value.problems
    assert "NCryptDeleteKey failed with error 0x80090010" in problem
    assert seeded.key_name in fake.keys  # the key container is left, and the error says so


async def test_current_user_stores_show_local_machine_certificates_as_not_ours(
    store: WindowsCertStore, fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    material = ca.issue()
    machine = fake.add(LM, "WebHosting", material, description=OLD_IDENTITY)
    fake.add(LM, "CA", ca.intermediate.certificate)
    target = observed(store_name="WebHosting", store_location=CU)
    shown = fake.certificates(CU, "WebHosting", [binding.CERT_ACCESS_STATE_PROP_ID])
    (state,) = [item.properties[binding.CERT_ACCESS_STATE_PROP_ID] for item in shown]
    assert int.from_bytes(state, "little") & binding.CERT_ACCESS_STATE_LM_SYSTEM_STORE_FLAG
    assert await store.installed(target) is None  # LocalMachine's, shown here: not ours
    record = await store.install(target, material, V2)
    assert record.location == "CurrentUser\\WebHosting" and len(fake.imports) == 1
    assert thumbprints(fake, CU, "WebHosting") == {material.thumbprint}
    assert fake.store(CU, "CA") == []  # the machine's intermediate already shows there
    assert machine.description == OLD_IDENTITY  # the machine's certificate was not touched
    current = await store.installed(target)
    assert current is not None and current.version == V2
    # My is the one CurrentUser store that shows nothing of LocalMachine's.
    fake.add(LM, MY, ca.issue())
    own = fake.add(CU, MY, ca.issue())
    assert [item.der for item in fake.certificates(CU, MY, [])] == [own.der]


@pytest.mark.parametrize(("location", "name"), [(CU, "Root"), (LM, "ROOT"), (LM, "AuthRoot")])
async def test_root_stores_are_refused_up_front(
    store: WindowsCertStore,
    fake: FakeWindowsCertBackend,
    ca: TestAuthority,
    location: str,
    name: str,
) -> None:
    target = observed(store_name=name, store_location=location)
    with pytest.raises(StoreError, match=r"is a trusted root store; kvcertsync never writes"):
        await store.install(target, ca.issue(), V1)
    with pytest.raises(StoreError, match="never writes to a root store"):
        await store.installed(target)
    assert fake.calls == []


def test_the_fake_asks_for_confirmation_on_current_user_root(
    fake: FakeWindowsCertBackend, ca: TestAuthority
) -> None:
    # What a store that did write there would meet: a dialog nobody answers in a service.
    with pytest.raises(Win32Error) as caught:
        fake.add_encoded(CU, "Root", der_of(ca.root_certificate), 2)
    assert caught.value.code == binding.ERROR_CANCELLED
    fake.add_encoded(LM, "Root", der_of(ca.root_certificate), 2)  # elevated: no dialog


async def test_the_import_pfx_is_3des_sha1_for_windows_server_2016(
    ca: TestAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Windows Server 2016 / Windows 10 1607 (the oldest Windows supported) read only
    # pbeWithSHAAnd3-KeyTripleDES-CBC PFX; AES-256 (PBES2) needs Server 2019 / 10 1809.
    from asn1crypto import pkcs12 as asn1_pkcs12

    fake = FakeWindowsCertBackend()
    seen: list[bytes] = []
    original = fake.import_pfx

    def spy(pfx: bytes, password: str, flags: int) -> object:
        seen.append(pfx)
        return original(pfx, password, flags)

    monkeypatch.setattr(fake, "import_pfx", spy)
    await WindowsCertStore(backend=fake).install(observed(), ca.issue(), V1)
    (pfx,) = seen
    parsed = asn1_pkcs12.Pfx.load(pfx)
    mac = parsed["mac_data"]
    assert mac["mac"]["digest_algorithm"]["algorithm"].native == "sha1"
    algorithms = []
    for info in parsed.authenticated_safe:
        if info["content_type"].native == "encrypted_data":  # the certificate bags
            content = info["content"]["encrypted_content_info"]
            algorithms.append(("certificates", content["content_encryption_algorithm"]))
        else:
            for bag in asn1_pkcs12.SafeContents.load(info["content"].native):
                assert bag["bag_id"].native == "pkcs8_shrouded_key_bag"
                algorithms.append(("key", bag["bag_value"]["encryption_algorithm"]))
    assert sorted(what for what, _ in algorithms) == ["certificates", "key"]
    for _, algorithm in algorithms:
        assert algorithm["algorithm"].native == "pkcs12_sha1_tripledes_3key"
        assert algorithm["parameters"]["iterations"].native == 2048


# ============================================= the real binding against a simulated crypt32
#
# Crypt32Backend cannot call crypt32 here, but everything above the DLL boundary can run: each
# simulated function first converts every argument with its declared argtype (what ctypes does
# before a foreign call, so a mismatched argument fails here as it would on Windows), then
# behaves like the documented API, including the two-call size protocols, GetLastError,
# SECURITY_STATUS returns and which calls allocate what. It also counts handles, contexts and
# LocalAlloc'd buffers, so leaks show.


class SimulatedWindows:
    """crypt32, ncrypt, advapi32 and kernel32 as Python, behind binding.PROTOTYPES."""

    def __init__(self) -> None:
        self.last_error = 0  # what SetLastError received: a DWORD
        self.stores: dict[tuple[int, str], dict[str, FakeCertificate]] = {}
        self.store_handles: dict[int, dict[str, FakeCertificate]] = {}
        self.contexts: dict[int, tuple[object, object, dict[str, FakeCertificate], str]] = {}
        self.keys: dict[str, dict[str, object]] = {}
        self.key_handles: dict[int, str] = {}
        self.allocations: dict[int, object] = {}
        self.accounts = {"network service": "S-1-5-20"}
        self.failures: dict[str, int] = {}
        self.capi_handles: dict[int, str] = {}  # HCRYPTPROVs handed out, not yet released
        self.elevated = True
        self.released: list[str] = []  # which function freed each key handle, in order
        self._keep: list[object] = []  # memory that CRYPT_KEY_PROV_INFO values point into
        self._next = 0x1000

    # ---- plumbing

    def get_last_error(self) -> int:
        """ctypes.get_last_error() on Windows: the DWORD read back as a signed C int."""
        return ctypes.c_int32(self.last_error).value

    def api(self) -> binding.Api:
        return binding.Api({p.name: self._declared(p) for p in binding.PROTOTYPES})

    def _declared(self, proto: binding.Prototype) -> Callable[..., object]:
        impl = getattr(self, proto.name)

        def call(*args: object) -> object:
            assert len(args) == len(proto.argtypes), proto.name
            for argtype, arg in zip(proto.argtypes, args, strict=True):
                argtype.from_param(arg)
            if proto.name in self.failures:
                return self._fail(self.failures.pop(proto.name), proto)
            return impl(*args)

        return call

    def _fail(self, code: int, proto: binding.Prototype) -> object:
        if proto.dll == "ncrypt":  # SECURITY_STATUS: the error is the return value
            return code - (1 << 32) if code >= 1 << 31 else code
        self.last_error = code
        if proto.restype is binding.PCCERT_CONTEXT:
            return binding.PCCERT_CONTEXT()
        return None if proto.restype is binding.HCERTSTORE else 0

    def _handle(self) -> int:
        self._next += 8
        return self._next

    def _context(self, certs: dict[str, FakeCertificate], thumbprint: str) -> object:
        data = certs[thumbprint].der
        buffer = ctypes.create_string_buffer(data, len(data))
        context = binding.CERT_CONTEXT(1, ctypes.cast(buffer, binding.PBYTE), len(data), None, None)
        self.contexts[ctypes.addressof(context)] = (context, buffer, certs, thumbprint)
        return ctypes.pointer(context)

    def _cert(self, context: object) -> tuple[dict[str, FakeCertificate], FakeCertificate]:
        _, _, certs, thumbprint = self.contexts[ctypes.addressof(context.contents)]
        return certs, certs[thumbprint]

    def _alloc_text(self, text: str) -> int:
        buffer = ctypes.create_unicode_buffer(text)
        self.allocations[ctypes.addressof(buffer)] = buffer
        return ctypes.addressof(buffer)

    def _add(
        self, certs: dict[str, FakeCertificate], cert: FakeCertificate, disposition: int
    ) -> int:
        if disposition == binding.CERT_STORE_ADD_USE_EXISTING and cert.thumbprint in certs:
            return 1
        assert disposition in (
            binding.CERT_STORE_ADD_USE_EXISTING,
            binding.CERT_STORE_ADD_REPLACE_EXISTING,
        )
        certs[cert.thumbprint] = cert.copy()
        return 1

    def seed(
        self, material: CertificateMaterial, *, kind: str = "cng", description: str = ""
    ) -> FakeCertificate:
        """Put a certificate with its key into LocalMachine\\MY, as another tool would have.

        ``kind``: "cng" (Software KSP); "capi-only", a CryptoAPI provider CNG cannot open
        (acquiring with ONLY_NCRYPT fails); "capi-handle", one for which the acquire hands back
        an HCRYPTPROV regardless (which only CryptReleaseContext may free).
        """
        cert = FakeCertificate(der_of(material.certificate), key_name=f"key{len(self.keys)}")
        self.keys[cert.key_name or ""] = {"dacl": "D:PAI(A;;FA;;;SY)(A;;FA;;;BA)", "kind": kind}
        if kind != "cng":
            info = binding.CRYPT_KEY_PROV_INFO(
                cert.key_name, "Contoso Cryptographic Provider", 1, 0, 0, None, 1
            )
            self._keep.append(info)
            cert.properties[binding.CERT_KEY_PROV_INFO_PROP_ID] = bytes(info)
        if description:
            cert.properties[binding.CERT_DESCRIPTION_PROP_ID] = (description + "\0").encode(
                "utf-16-le"
            )
        key = (binding.CERT_SYSTEM_STORE_LOCAL_MACHINE, MY)
        self.stores.setdefault(key, {})[cert.thumbprint] = cert
        return cert

    @staticmethod
    def _blob(pointer: object) -> bytes:
        blob = pointer._obj
        return ctypes.string_at(blob.pbData, blob.cbData)

    # ---- crypt32

    def CertOpenStore(self, provider, encoding, prov, flags, name):
        assert provider == binding.CERT_STORE_PROV_SYSTEM_W and prov == 0
        location = flags & 0x00FF0000
        assert location in binding.LOCATION_FLAGS.values()
        key = (location, name.upper())
        if flags & binding.CERT_STORE_OPEN_EXISTING_FLAG and key not in self.stores:
            self.last_error = binding.ERROR_FILE_NOT_FOUND
            return None
        handle = self._handle()
        self.store_handles[handle] = self.stores.setdefault(key, {})
        return handle

    def CertCloseStore(self, handle, flags):
        del self.store_handles[handle]
        return 1

    def PFXImportCertStore(self, pfx, password, flags):
        loaded = pkcs12.load_pkcs12(self._blob(pfx), password.encode())
        assert loaded.cert is not None and loaded.key is not None
        certs: dict[str, FakeCertificate] = {}
        for bag in [loaded.cert, *loaded.additional_certs]:
            cert = FakeCertificate(bag.certificate.public_bytes(serialization.Encoding.DER))
            certs[cert.thumbprint] = cert
        leaf = next(iter(certs.values()))
        leaf.key_name = f"key{len(self.keys)}"
        self.keys[leaf.key_name] = {
            "dacl": "D:PAI(A;;FA;;;SY)(A;;FA;;;BA)",
            "machine": bool(flags & binding.CRYPT_MACHINE_KEYSET),
            "kind": "cng",
        }
        handle = self._handle()
        self.store_handles[handle] = certs
        return handle

    def CertFindCertificateInStore(self, store, encoding, flags, find_type, para, previous):
        assert find_type == binding.CERT_FIND_SHA1_HASH and not previous
        certs = self.store_handles[store]
        thumbprint = self._blob(para).hex().upper()
        if thumbprint not in certs:
            self.last_error = binding.CRYPT_E_NOT_FOUND
            return binding.PCCERT_CONTEXT()
        return self._context(certs, thumbprint)

    def CertEnumCertificatesInStore(self, store, previous):
        certs = self.store_handles[store]
        after = ""
        if previous:
            after = self._cert(previous)[1].thumbprint
            self.CertFreeCertificateContext(previous)
        following = [t for t in sorted(certs) if t > after]
        if not following:
            self.last_error = binding.CRYPT_E_NOT_FOUND
            return binding.PCCERT_CONTEXT()
        return self._context(certs, following[0])

    def CertFreeCertificateContext(self, context):
        if context:
            del self.contexts[ctypes.addressof(context.contents)]
        return 1

    def CertGetCertificateContextProperty(self, context, prop_id, data, size):
        value = self._cert(context)[1].properties.get(prop_id)
        if value is None:
            self.last_error = binding.CRYPT_E_NOT_FOUND
            return 0
        if data is not None:
            assert size._obj.value >= len(value)
            ctypes.memmove(data, value, len(value))
        size._obj.value = len(value)
        return 1

    def CertSetCertificateContextProperty(self, context, prop_id, flags, data):
        cert = self._cert(context)[1]
        if data is None:
            cert.properties.pop(prop_id, None)
        else:
            cert.properties[prop_id] = self._blob(data)
        return 1

    def CertAddCertificateContextToStore(self, store, context, disposition, out):
        assert out is None
        return self._add(self.store_handles[store], self._cert(context)[1], disposition)

    def CertAddEncodedCertificateToStore(self, store, encoding, data, size, disposition, out):
        assert out is None and encoding == binding.X509_ASN_ENCODING | binding.PKCS_7_ASN_ENCODING
        return self._add(self.store_handles[store], FakeCertificate(data[:size]), disposition)

    def CertDeleteCertificateFromStore(self, context):
        certs, cert = self._cert(context)
        self.CertFreeCertificateContext(context)
        del certs[cert.thumbprint]
        return 1

    def CryptAcquireCertificatePrivateKey(self, context, flags, reserved, key, spec, free):
        assert flags & binding.CRYPT_ACQUIRE_ONLY_NCRYPT_KEY_FLAG
        assert flags & binding.CRYPT_ACQUIRE_SILENT_FLAG
        cert = self._cert(context)[1]
        if cert.key_name is None or cert.key_name not in self.keys:
            self.last_error = binding.CRYPT_E_NO_KEY_PROPERTY
            return 0
        kind = self.keys[cert.key_name]["kind"]
        if kind == "capi-only":
            # The KSP finds no container of that name: the key is in the CSP's own storage.
            self.last_error = binding.NTE_BAD_KEYSET
            return 0
        handle = self._handle()
        if kind == "capi-handle":
            self.capi_handles[handle] = cert.key_name
            spec._obj.value = binding.AT_KEYEXCHANGE
        else:
            self.key_handles[handle] = cert.key_name
            spec._obj.value = binding.CERT_NCRYPT_KEY_SPEC
        key._obj.value = handle
        free._obj.value = 1
        return 1

    # ---- ncrypt

    def NCryptGetProperty(self, key, name, output, size, result, flags):
        assert name == binding.NCRYPT_SECURITY_DESCR_PROPERTY
        assert flags & binding.DACL_SECURITY_INFORMATION
        descriptor = str(self.keys[self.key_handles[key]]["dacl"]).encode("utf-16-le") + b"\0\0"
        if output is not None:
            assert size >= len(descriptor)
            ctypes.memmove(output, descriptor, len(descriptor))
        result._obj.value = len(descriptor)
        return 0

    def NCryptSetProperty(self, key, name, data, size, flags):
        assert name == binding.NCRYPT_SECURITY_DESCR_PROPERTY
        assert flags & binding.DACL_SECURITY_INFORMATION and flags & binding.NCRYPT_PERSIST_FLAG
        text = ctypes.string_at(data.value, size).decode("utf-16-le")
        # Kept in binary form, read back as Windows writes it: aliases, generic rights mapped.
        self.keys[self.key_handles[key]]["dacl"] = _sddl.normalise(text)
        return 0

    def NCryptDeleteKey(self, key, flags):
        del self.keys[self.key_handles.pop(key)]
        return 0

    def NCryptFreeObject(self, key):
        del self.key_handles[key]  # a KeyError for an HCRYPTPROV: the wrong function
        self.released.append("NCryptFreeObject")
        return 0

    # ---- advapi32 (CryptoAPI)

    def CryptReleaseContext(self, prov, flags):
        assert flags == 0
        del self.capi_handles[prov]  # a KeyError for an NCRYPT_KEY_HANDLE
        self.released.append("CryptReleaseContext")
        return 1

    # ---- advapi32, kernel32

    def LookupAccountNameW(self, system, name, sid, sid_size, domain, domain_size, use):
        text = self.accounts.get(name.lower())
        if text is None:
            self.last_error = binding.ERROR_NONE_MAPPED
            return 0
        data = text.encode("ascii") + b"\0"  # stands in for the binary SID
        if sid is None or sid_size._obj.value < len(data):
            sid_size._obj.value = len(data)
            domain_size._obj.value = len("NT AUTHORITY") + 1
            self.last_error = binding.ERROR_INSUFFICIENT_BUFFER
            return 0
        ctypes.memmove(sid, data, len(data))
        domain.value = "NT AUTHORITY"
        use._obj.value = 5
        return 1

    def ConvertStringSidToSidW(self, text, sid):
        sid._obj.value = self._alloc_text(text)  # stands in for the binary SID
        return 1

    def CheckTokenMembership(self, token, sid, member):
        assert token is None  # the caller's own token
        assert ctypes.wstring_at(sid.value) == "S-1-5-32-544"
        member._obj.value = int(self.elevated)
        return 1

    def ConvertSidToStringSidW(self, sid, text):
        text._obj.value = self._alloc_text(sid.raw.split(b"\0", 1)[0].decode("ascii"))
        return 1

    def ConvertSecurityDescriptorToStringSecurityDescriptorW(
        self, sd, revision, info, text, length
    ):
        assert revision == binding.SDDL_REVISION_1 and info == binding.DACL_SECURITY_INFORMATION
        sddl = sd.raw.decode("utf-16-le").split("\0", 1)[0]
        text._obj.value = self._alloc_text(sddl)
        return 1

    def ConvertStringSecurityDescriptorToSecurityDescriptorW(self, sddl, revision, sd, size):
        data = sddl.encode("utf-16-le")
        buffer = ctypes.create_string_buffer(data, len(data))
        self.allocations[ctypes.addressof(buffer)] = buffer
        sd._obj.value = ctypes.addressof(buffer)
        size._obj.value = len(data)
        return 1

    def LocalFree(self, pointer):
        del self.allocations[pointer.value]

    def FormatMessageW(self, flags, source, code, language, buffer, size, arguments):
        assert flags == binding.FORMAT_MESSAGE_FROM_SYSTEM | binding.FORMAT_MESSAGE_IGNORE_INSERTS
        text = {5: "Access is denied.\r\n"}.get(code, "")
        buffer.value = text
        return len(text)

    def assert_nothing_leaked(self) -> None:
        assert self.store_handles == {}
        assert self.contexts == {}
        assert self.key_handles == {}
        assert self.capi_handles == {}
        assert self.allocations == {}


class _SysOnWindows:
    """The binding's view of ``sys``, saying win32: so _last_error reads ctypes.get_last_error."""

    platform = "win32"

    def __getattr__(self, name: str) -> object:
        return getattr(sys, name)


@pytest.fixture
def simulated(monkeypatch: pytest.MonkeyPatch) -> SimulatedWindows:
    sim = SimulatedWindows()
    # Not _last_error itself: its Windows branch runs, against the value ctypes would hand it.
    monkeypatch.setattr(binding, "sys", _SysOnWindows())
    monkeypatch.setattr(ctypes, "get_last_error", sim.get_last_error, raising=False)
    return sim


def test_simulated_last_error_is_signed_and_read_unsigned(simulated: SimulatedWindows) -> None:
    simulated.last_error = binding.CRYPT_E_NOT_FOUND
    assert ctypes.get_last_error() == -2146885628
    assert binding._last_error() == 0x80092004
    simulated.last_error = binding.ERROR_ACCESS_DENIED
    assert binding._last_error() == 5


def binding_store(sim: SimulatedWindows, **options: bool) -> WindowsCertStore:
    """A WindowsCertStore over the real binding, calling the simulated DLLs."""
    return WindowsCertStore(backend=binding.Crypt32Backend(api=sim.api()), **options)


def sim_store(
    sim: SimulatedWindows, *, machine: int = binding.CERT_SYSTEM_STORE_LOCAL_MACHINE, name: str = MY
) -> dict[str, FakeCertificate]:
    return sim.stores.get((machine, name), {})


async def test_binding_installs_links_and_reads_back(
    simulated: SimulatedWindows, ca: TestAuthority
) -> None:
    store = binding_store(simulated, link_on_renewal=True)
    target = observed(accounts=["Network Service", "Nobody Here"])
    assert await store.installed(target) is None  # ERROR_FILE_NOT_FOUND: no store yet
    old = ca.issue(["www.example.com"], include_root=True)
    with pytest.raises(InstallIncomplete, match="'Nobody Here'"):
        await store.install(target, old, V1)
    new = ca.issue(["www.example.com"])
    with pytest.raises(InstallIncomplete):
        await store.install(target, new, V2)
    current = await store.installed(target)
    assert current is not None and (current.version, current.thumbprint) == (V2, new.thumbprint)
    certs = sim_store(simulated)
    assert set(certs) == {old.thumbprint, new.thumbprint}
    assert certs[old.thumbprint].renewal == new.thumbprint
    assert certs[new.thumbprint].friendly_name == "myvault.web"
    assert list(sim_store(simulated, name="CA")) == [
        hashlib.sha1(der_of(ca.intermediate.certificate)).hexdigest().upper()
    ]
    key = simulated.keys[certs[new.thumbprint].key_name or ""]
    assert key["machine"] is True
    assert key["dacl"] == "D:PAI(A;;FA;;;SY)(A;;FA;;;BA)(A;;FR;;;NS)"
    simulated.assert_nothing_leaked()


async def test_binding_failure_deletes_the_staged_key_and_closes_everything(
    simulated: SimulatedWindows, ca: TestAuthority
) -> None:
    store = binding_store(simulated)
    simulated.failures["CertAddCertificateContextToStore"] = binding.ERROR_ACCESS_DENIED
    with pytest.raises(StoreError) as caught:
        await store.install(observed(), ca.issue(), V1)
    assert str(caught.value) == (
        "LocalMachine\\MY: cannot add the certificate to the store: "
        f"CertAddCertificateContextToStore failed with {ACCESS_DENIED}"
    )
    assert simulated.keys == {} and sim_store(simulated) == {}
    simulated.assert_nothing_leaked()


async def test_binding_removes_superseded_with_their_keys(
    simulated: SimulatedWindows, ca: TestAuthority
) -> None:
    store = binding_store(simulated, remove_superseded=True)
    await store.install(observed(), ca.issue(), V1)
    newest = ca.issue()
    await store.install(observed(), newest, V2)
    certs = sim_store(simulated)
    assert list(certs) == [newest.thumbprint]
    assert list(simulated.keys) == [certs[newest.thumbprint].key_name]
    simulated.assert_nothing_leaked()


async def test_binding_updates_a_shared_certificate_in_place(
    simulated: SimulatedWindows, ca: TestAuthority
) -> None:
    simulated.accounts["local service"] = "S-1-5-19"
    store = binding_store(simulated)
    material = ca.issue()
    await store.install(observed(accounts=["Network Service"]), material, V1)
    await store.install(observed(OTHER_URL, accounts=["Local Service"]), material, V2)
    (cert,) = sim_store(simulated).values()
    assert list(simulated.keys) == [cert.key_name]  # one key container, nothing orphaned
    dacl = simulated.keys[cert.key_name or ""]["dacl"]
    assert dacl == "D:PAI(A;;FA;;;SY)(A;;FA;;;BA)(A;;FR;;;NS)(A;;FR;;;LS)"
    assert cert.description is not None
    assert [line.split(" installed ")[0] for line in cert.description.splitlines()] == [
        f"kvcertsync: {URL}/{V1}",
        f"kvcertsync: {OTHER_URL}/{V2}",
    ]
    web = await store.installed(observed())
    api = await store.installed(observed(OTHER_URL))
    assert web is not None and web.version == V1
    assert api is not None and api.version == V2
    simulated.assert_nothing_leaked()


async def test_binding_reports_hresults_from_ncrypt(
    simulated: SimulatedWindows, ca: TestAuthority
) -> None:
    store = binding_store(simulated)
    simulated.failures["NCryptSetProperty"] = binding.NTE_PERM
    with pytest.raises(StoreError, match=r"NCryptSetProperty failed with error 0x80090010"):
        await store.install(observed(accounts=["Network Service"]), ca.issue(), V1)
    assert simulated.keys == {}
    simulated.assert_nothing_leaked()


@pytest.mark.parametrize(
    ("kind", "released", "code"),
    [
        # The acquire fails: the KSP knows no such container; nothing to free.
        ("capi-only", [], "0x80090016"),
        # The acquire hands back an HCRYPTPROV all the same: freed as one, never NCryptFreeObject.
        ("capi-handle", ["CryptReleaseContext"], "0x80090013"),
    ],
)
async def test_binding_refuses_an_identical_certificate_whose_key_is_cryptoapi(
    simulated: SimulatedWindows, ca: TestAuthority, kind: str, released: list[str], code: str
) -> None:
    store = binding_store(simulated)
    material = ca.issue()
    simulated.seed(material, kind=kind)
    with pytest.raises(StoreError) as caught:
        await store.install(observed(), material, V1)
    # CERT_KEY_PROV_INFO_PROP_ID names the CryptoAPI provider.
    message = str(caught.value)
    assert "legacy CryptoAPI provider Contoso Cryptographic Provider (type 1)" in message
    assert "-DeleteKey" in message and code in message
    assert len(simulated.keys) == 1  # nothing imported beside it
    assert simulated.released == released
    simulated.assert_nothing_leaked()


async def test_binding_delete_stops_when_the_key_cannot_be_acquired(
    simulated: SimulatedWindows, ca: TestAuthority
) -> None:
    store = binding_store(simulated, remove_superseded=True)
    old = ca.issue()
    simulated.seed(old, kind="capi-only", description=OLD_IDENTITY)
    new = ca.issue()
    with pytest.raises(InstallIncomplete, match=f"cannot remove superseded {old.thumbprint}"):
        await store.install(observed(), new, V2)
    assert set(sim_store(simulated)) == {old.thumbprint, new.thumbprint}
    assert len(simulated.keys) == 2
    simulated.assert_nothing_leaked()


async def test_binding_checks_elevation_with_check_token_membership(
    simulated: SimulatedWindows, ca: TestAuthority
) -> None:
    simulated.elevated = False
    store = binding_store(simulated)
    with pytest.raises(StoreError, match="run elevated or as a service account"):
        await store.install(observed(), ca.issue(), V1)
    assert simulated.keys == {} and simulated.stores == {}
    await store.install(observed(store_location=CU), ca.issue(), V1)
    simulated.assert_nothing_leaked()
