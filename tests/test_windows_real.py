"""WindowsCertStore on real Windows: crypt32, the system stores, PowerShell, the SCM.

Every test here needs Windows and an elevated process (GitHub's hosted Windows runners run jobs as
an administrator with UAC off); elsewhere the module is skipped. .github/workflows/windows.yml runs
it on windows-2022 and windows-2025. Each test installs certificates under names of its own and
removes them, with their keys, afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import hashlib
import json
import re
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.emulator.certs import TestAuthority
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.stores import _crypt32 as binding
from kvcertsync.stores import _sddl
from kvcertsync.stores.windows import WindowsCertStore
from tests.agent_process import KVCERTSYNC, emulator_options

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(
        sys.platform != "win32",
        reason="needs real Windows (crypt32, the certificate stores, PowerShell, the SCM): "
        "run by .github/workflows/windows.yml",
    ),
]

LM, CU, MY = "LocalMachine", "CurrentUser", "My"
NETWORK_SERVICE = "S-1-5-20"
V1, V2 = "1" * 32, "2" * 32
SLOW = 120  # seconds: generous, the hosted runners are shared


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> TestAuthority:
    return TestAuthority("kvcertsync windows test", key="rsa")


@pytest.fixture
def installed() -> Iterator[list[tuple[str, str, str]]]:
    """(location, store, thumbprint) a test put in; removed with their keys at the end."""
    placed: list[tuple[str, str, str]] = []
    yield placed
    backend = binding.Crypt32Backend()
    for location, store, thumbprint in placed:
        with contextlib.suppress(binding.Win32Error):
            backend.delete(location, store, thumbprint, delete_key=store != "CA")


def secret_url() -> str:
    return f"https://kvcstest.vault.azure.net/secrets/t{uuid.uuid4().hex[:12]}"


def observed(location: str, url: str | None = None, **kwargs: Any) -> ObservedCertificate:
    return ObservedCertificate.of(
        url or secret_url(), store_name=MY, store_location=location, **kwargs
    )


def thumbprint(certificate: x509.Certificate) -> str:
    """SHA-1 of the DER, as Windows names certificates."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def issue(
    ca: TestAuthority,
    placed: list[tuple[str, str, str]],
    location: str,
    *,
    dns: str | None = None,
    include_root: bool = False,
) -> CertificateMaterial:
    """A new leaf of ``ca``, recorded for removal (with the intermediate) after the test.

    Its DNS name is its own unless given, so linkOnRenewal never links another test's leaves.
    """
    name = dns or f"{uuid.uuid4().hex[:12]}.kvcertsync.test"
    material = ca.issue([name], key="rsa", include_root=include_root)
    placed.append((location, MY, material.thumbprint))
    placed.append((location, "CA", thumbprint(ca.intermediate.certificate)))
    return material


def powershell(script: str) -> subprocess.CompletedProcess[str]:
    """Run Windows PowerShell 5.1 (on every supported Windows), stopping at the first error."""
    # -EncodedCommand (base64 UTF-16LE): no quoting rules between Python, CreateProcess and
    # PowerShell's own command-line parser to get wrong.
    encoded = base64.b64encode(f"$ErrorActionPreference = 'Stop'; {script}".encode("utf-16-le"))
    command = ["powershell.exe", "-NoProfile", "-NonInteractive", "-EncodedCommand"]
    return subprocess.run(
        [*command, encoded.decode("ascii")],
        capture_output=True,
        text=True,
        timeout=SLOW,
        check=False,
    )


def ps_ok(script: str) -> str:
    done = powershell(script)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def tool(*command: str) -> str:
    """The output of a Windows tool that must succeed."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=SLOW, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def cert_path(location: str, store: str, thumbprint: str) -> str:
    return f"Cert:\\{location}\\{store}\\{thumbprint}"


def key_file(location: str, thumbprint: str) -> str:
    """The CNG key file of a certificate (the Software KSP keeps one file per key)."""
    return ps_ok(
        f"$c = Get-Item -LiteralPath '{cert_path(location, MY, thumbprint)}'; "
        "$k = [System.Security.Cryptography.X509Certificates.RSACertificateExtensions]"
        "::GetRSAPrivateKey($c); $n = $k.Key.UniqueName; "
        'foreach ($r in @("$env:ProgramData\\Microsoft\\Crypto\\Keys", '
        '"$env:APPDATA\\Microsoft\\Crypto\\Keys")) { $p = Join-Path $r $n; '
        "if (Test-Path -LiteralPath $p) { $p; break } }"
    )


def handle_count() -> int:
    """GetProcessHandleCount of this process."""
    if sys.platform == "win32":
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.GetCurrentProcess.restype = ctypes.c_void_p
        kernel32.GetCurrentProcess.argtypes = ()
        kernel32.GetProcessHandleCount.restype = ctypes.c_int32
        kernel32.GetProcessHandleCount.argtypes = (
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint32),
        )
        count = ctypes.c_uint32()
        assert kernel32.GetProcessHandleCount(kernel32.GetCurrentProcess(), ctypes.byref(count))
        return count.value
    raise AssertionError("GetProcessHandleCount is a Windows function")


# ======================================================================== the store on Windows


def test_the_process_is_elevated() -> None:
    # What the LocalMachine tests rely on, said first: the hosted runners run elevated.
    assert binding.Crypt32Backend().is_elevated()


@pytest.mark.parametrize("location", [CU, LM])
async def test_install_into_my_with_the_intermediate_in_ca(
    ca: TestAuthority, installed: list[tuple[str, str, str]], location: str
) -> None:
    store = WindowsCertStore()
    target = observed(location)
    material = issue(ca, installed, location, include_root=True)
    record = await store.install(target, material, V1)
    assert record.location == f"{location}\\{MY}"
    shown = json.loads(
        ps_ok(
            f"Get-Item -LiteralPath '{cert_path(location, MY, material.thumbprint)}' | "
            "Select-Object Thumbprint, FriendlyName, HasPrivateKey | "
            "ConvertTo-Json"
        )
    )
    assert shown["Thumbprint"] == material.thumbprint
    assert shown["FriendlyName"] == f"kvcstest.{target.uri.name}"
    assert shown["HasPrivateKey"] is True
    intermediate = thumbprint(ca.intermediate.certificate)
    assert ps_ok(f"Test-Path -LiteralPath '{cert_path(location, 'CA', intermediate)}'") == "True"
    root = thumbprint(ca.root_certificate)  # in the secret, never installed
    assert ps_ok(f"Test-Path -LiteralPath '{cert_path(location, 'Root', root)}'") == "False"
    again = await WindowsCertStore().installed(target)  # a new store object: a restart
    assert again == record


async def test_key_acl_is_read_back_from_the_key_file(
    ca: TestAuthority, installed: list[tuple[str, str, str]]
) -> None:
    store = WindowsCertStore()
    material = issue(ca, installed, LM)
    await store.install(observed(LM, accounts=["NT AUTHORITY\\NETWORK SERVICE"]), material, V1)
    path = key_file(LM, material.thumbprint)
    assert path, "no CNG key file found for the certificate"
    sddl = ps_ok(f"(Get-Acl -LiteralPath '{path}').Sddl")
    descriptor = _sddl.parse(sddl)
    assert descriptor.grants(NETWORK_SERVICE, _sddl.FILE_GENERIC_READ), sddl
    assert descriptor.grants("S-1-5-18", _sddl.FILE_ALL_ACCESS), sddl
    icacls = tool("icacls", path)
    assert re.search(r"NT AUTHORITY\\NETWORK SERVICE:\S*\((R|GR|RX)\)", icacls), icacls
    # The store's own view, through NCryptGetProperty, agrees.
    backend = binding.Crypt32Backend()
    assert _sddl.parse(backend.key_security(LM, MY, material.thumbprint)).grants(
        NETWORK_SERVICE, _sddl.FILE_GENERIC_READ
    )


@pytest.mark.parametrize("exportable", [False, True])
async def test_key_exportable_is_what_export_pfx_certificate_meets(
    ca: TestAuthority, installed: list[tuple[str, str, str]], tmp_path: Path, exportable: bool
) -> None:
    material = issue(ca, installed, CU)
    await WindowsCertStore().install(observed(CU, key_exportable=exportable), material, V1)
    out = tmp_path / "out.pfx"
    done = powershell(
        "$p = ConvertTo-SecureString -String 'kvcs-test' -Force -AsPlainText; "
        f"Export-PfxCertificate -Cert '{cert_path(CU, MY, material.thumbprint)}' "
        f"-FilePath '{out}' -Password $p | Out-Null"
    )
    if exportable:
        assert done.returncode == 0, done.stderr
        assert out.stat().st_size > 0
    else:
        assert done.returncode != 0
        assert not out.exists()


async def test_link_on_renewal_is_read_back_by_crypt32_and_certutil(
    ca: TestAuthority, installed: list[tuple[str, str, str]]
) -> None:
    store = WindowsCertStore(link_on_renewal=True)
    target = observed(LM)
    old = issue(ca, installed, LM, dns="renewed.kvcertsync.test")
    new = issue(ca, installed, LM, dns="renewed.kvcertsync.test")
    await store.install(target, old, V1)
    await store.install(target, new, V2)
    listed = binding.Crypt32Backend().certificates(LM, MY, [binding.CERT_RENEWAL_PROP_ID])
    renewal = {
        thumbprint(x509.load_der_x509_certificate(item.der)): item.properties.get(
            binding.CERT_RENEWAL_PROP_ID
        )
        for item in listed
    }
    assert renewal[old.thumbprint] == bytes.fromhex(new.thumbprint)
    assert renewal[new.thumbprint] is None
    both = ps_ok(
        f"Get-ChildItem -LiteralPath 'Cert:\\{LM}\\{MY}' | "
        f"Where-Object {{ $_.Thumbprint -in @('{old.thumbprint}', '{new.thumbprint}') }} | "
        "ForEach-Object { $_.Thumbprint }"
    )
    assert set(both.split()) == {old.thumbprint, new.thumbprint}
    dump = tool("certutil", "-v", "-store", MY, old.thumbprint)
    # certutil -v dumps every context property; only CERT_RENEWAL_PROP_ID holds the new hash.
    assert new.thumbprint.lower() in re.sub(r"\s", "", dump).lower(), dump


async def test_superseded_certificates_are_removed_with_their_keys(
    ca: TestAuthority, installed: list[tuple[str, str, str]]
) -> None:
    store = WindowsCertStore(remove_superseded=True)
    target = observed(CU)
    old = issue(ca, installed, CU)
    await store.install(target, old, V1)
    old_key = key_file(CU, old.thumbprint)
    assert old_key and Path(old_key).exists()
    new = issue(ca, installed, CU)
    await store.install(target, new, V2)
    assert ps_ok(f"Test-Path -LiteralPath '{cert_path(CU, MY, old.thumbprint)}'") == "False"
    assert not Path(old_key).exists()
    assert ps_ok(f"Test-Path -LiteralPath '{cert_path(CU, MY, new.thumbprint)}'") == "True"


async def test_reinstalling_the_same_certificate_imports_nothing_new(
    ca: TestAuthority, installed: list[tuple[str, str, str]]
) -> None:
    store = WindowsCertStore()
    target = observed(LM, accounts=["Network Service"])
    material = issue(ca, installed, LM)
    await store.install(target, material, V1)
    first_key = key_file(LM, material.thumbprint)
    keys = set(Path(first_key).parent.iterdir())
    record = await store.install(target, material, V1)
    assert key_file(LM, material.thumbprint) == first_key  # the same container, not orphaned
    assert set(Path(first_key).parent.iterdir()) == keys
    assert await WindowsCertStore().installed(target) == record


async def test_no_handles_leak_across_installs(
    ca: TestAuthority, installed: list[tuple[str, str, str]]
) -> None:
    store = WindowsCertStore(remove_superseded=True)
    target = observed(CU, accounts=["Network Service"])
    await store.install(target, issue(ca, installed, CU), V1)  # warm up: worker threads, DLLs
    await store.installed(target)
    before = handle_count()
    for round_ in range(10):
        material = issue(ca, installed, CU)
        await store.install(target, material, f"{round_:032x}")
        await store.install(target, material, f"{round_ + 100:032x}")  # in place
        await store.installed(target)
    # Stores, contexts and key handles are all freed: a few handles of slack for the runtime.
    assert handle_count() - before <= 8


# ============================================================== the agent and the service


def extension_settings(kv: LocalKeyVault, url: str, location: str) -> dict[str, object]:
    """The Key Vault VM extension's own Windows settings (v1 schema), pointed at ``kv``."""
    return {
        "secretsManagementSettings": {
            "pollingIntervalInS": "3600",
            "certificateStoreName": "MY",
            "certificateStoreLocation": location,
            "linkOnRenewal": False,
            "requireInitialSync": True,
            "observedCertificates": [url],
        },
        "authenticationSettings": {"msiEndpoint": kv.imds_endpoint},
    }


async def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``kvcertsync ARGS`` in a worker thread, so the emulator on this loop keeps serving."""

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*KVCERTSYNC, *args], capture_output=True, text=True, timeout=SLOW, check=False
        )

    return await anyio.to_thread.run_sync(run)


@pytest.fixture
async def kv() -> AsyncIterator[LocalKeyVault]:
    async with LocalKeyVault() as vault:
        yield vault


async def test_run_once_with_the_extension_settings_installs_into_local_machine(
    kv: LocalKeyVault, tmp_path: Path, installed: list[tuple[str, str, str]]
) -> None:
    name = f"t{uuid.uuid4().hex[:12]}"
    material = kv.authority.issue(["www.kvcertsync.test"], key="rsa")
    installed.append((LM, "MY", material.thumbprint))
    installed.append((LM, "CA", thumbprint(kv.authority.intermediate.certificate)))
    kv.import_certificate("demo", name, material)
    url = f"https://demo.vault.azure.net/secrets/{name}"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(extension_settings(kv, url, LM)), encoding="utf-8")
    done = await run_cli(
        "run",
        str(settings),
        "--once",
        "--status-dir",
        str(tmp_path / "status"),
        "--log-file",
        str(tmp_path / "agent.log"),
        *emulator_options(kv),
    )
    assert done.returncode == 0, done.stderr + (tmp_path / "agent.log").read_text("utf-8")
    assert ps_ok(f"Test-Path -LiteralPath '{cert_path(LM, 'My', material.thumbprint)}'") == "True"
    current = await WindowsCertStore().installed(
        ObservedCertificate.of(url, store_name="MY", store_location=LM)
    )
    assert current is not None and current.thumbprint == material.thumbprint


def service_state(name: str) -> str:
    """The service's state as ``sc.exe query`` names it, or "MISSING"."""
    done = subprocess.run(
        ["sc.exe", "query", name], capture_output=True, text=True, timeout=SLOW, check=False
    )
    if done.returncode == 1060 or "1060" in done.stdout:  # ERROR_SERVICE_DOES_NOT_EXIST
        return "MISSING"
    match = re.search(r"STATE\s+:\s+\d+\s+(\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    return match[1]


def sc_start(name: str) -> subprocess.CompletedProcess[str]:
    """``sc.exe start``: it returns as soon as the SCM has started the process."""
    return subprocess.run(
        ["sc.exe", "start", name], capture_output=True, text=True, timeout=SLOW, check=False
    )


async def wait_state(name: str, wanted: str, *, within: float = SLOW) -> None:
    state = ""
    with anyio.move_on_after(within):
        # Polled: the SCM sends no event to wait on.
        while True:
            state = await anyio.to_thread.run_sync(service_state, name)
            if state == wanted:
                break
            await anyio.sleep(0.5)
    assert state == wanted, f"service {name} is {state}, not {wanted}"


async def test_windows_service_is_running_only_after_the_initial_sync(
    kv: LocalKeyVault, tmp_path: Path, installed: list[tuple[str, str, str]]
) -> None:
    service = f"kvcs{uuid.uuid4().hex[:8]}"
    name = f"t{uuid.uuid4().hex[:12]}"
    url = f"https://demo.vault.azure.net/secrets/{name}"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(extension_settings(kv, url, LM)), encoding="utf-8")
    run_options = [
        str(settings),
        "--status-dir",
        str(tmp_path / "status"),
        "--log-file",
        str(tmp_path / "agent.log"),
        *emulator_options(kv),
    ]
    done = await run_cli("service", "--name", service, "install", "--", *run_options)
    assert done.returncode == 0, done.stderr
    try:
        # sc.exe start returns at once; the secret does not exist yet, so no initial sync.
        started = await anyio.to_thread.run_sync(sc_start, service)
        assert started.returncode == 0, started.stdout + started.stderr
        with anyio.fail_after(SLOW):
            # The agent asked for the secret and was told it does not exist (polled: no event).
            while True:
                if any(r.status == 404 and name in r.path for r in kv.requests):
                    break
                await anyio.sleep(0.2)
        assert await anyio.to_thread.run_sync(service_state, service) == "START_PENDING"
        material = kv.authority.issue(["www.kvcertsync.test"], key="rsa")
        installed.append((LM, "MY", material.thumbprint))
        installed.append((LM, "CA", thumbprint(kv.authority.intermediate.certificate)))
        kv.import_certificate("demo", name, material)
        await wait_state(service, "RUNNING")
        # RUNNING came after the install: the certificate is there when it is reported.
        current = await WindowsCertStore().installed(
            ObservedCertificate.of(url, store_name="MY", store_location=LM)
        )
        assert current is not None and current.thumbprint == material.thumbprint
        stopped = await run_cli("service", "--name", service, "stop")
        assert stopped.returncode == 0, stopped.stderr
        assert service_state(service) == "STOPPED"
    finally:
        removed = await run_cli("service", "--name", service, "remove")
    assert removed.returncode == 0, removed.stderr
    await wait_state(service, "MISSING")
