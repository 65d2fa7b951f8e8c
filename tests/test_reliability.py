"""Reliability defects, each with a test that failed before its fix."""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kvcertsync.emulator import TestAuthority
from kvcertsync.engine import CertSync
from kvcertsync.errors import MaterialError
from kvcertsync.events import CertificateUpdated, Event, SyncFailed
from kvcertsync.material import CertificateMaterial, _pfx_iterations
from kvcertsync.settings import ObservedCertificate
from kvcertsync.sources import MemorySource
from kvcertsync.stores import MemoryStore, PemDirectoryStore

pytestmark = pytest.mark.anyio

URL = "https://vault.vault.azure.net/secrets/web"
CHATTR = shutil.which("chattr")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> TestAuthority:
    return TestAuthority()


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files a test made immutable (``chattr +i``); made mutable again at the end."""
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run([str(CHATTR), "-i", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0 or CHATTR is None, reason="chattr +i needs root")
async def test_an_update_is_announced_even_when_clean_up_after_the_swap_fails(
    tmp_path: Path, ca: TestAuthority, immutable: list[Path]
) -> None:
    source = MemorySource()
    store = PemDirectoryStore(tmp_path, keep_versions=1)
    sync = CertSync([URL], store=store, source=source)
    events: list[Event] = []
    sync.subscribe(events.append, CertificateUpdated, SyncFailed)
    v1 = source.set(URL, ca.issue(["web.example"]))
    assert (await sync.sync_once()).ok
    old = tmp_path / f"vault.web.{v1}"
    if (await anyio.run_process([str(CHATTR), "+i", str(old)], check=False)).returncode:
        pytest.skip(f"this file system does not take chattr +i ({tmp_path})")
    immutable.append(old)

    v2 = source.set(URL, ca.issue(["web.example"]))
    report = await sync.sync_once()
    # The link moved to v2: that update happened, and is announced, with the clean-up reported.
    assert os.readlink(tmp_path / "vault.web") == f"vault.web.{v2}"
    assert report.failed and "removing superseded versions failed" in str(report.failed[0].error)
    updates = [e for e in events if isinstance(e, CertificateUpdated)]
    assert [(e.previous_version, e.version) for e in updates][-1] == (v1, v2)

    # Once the obstacle is gone, the next poll finishes the clean-up, without a second event.
    await anyio.run_process([str(CHATTR), "-i", str(old)])
    assert (await sync.sync_once()).unchanged
    assert not old.exists()
    assert len([e for e in events if isinstance(e, CertificateUpdated)]) == len(updates)


async def test_a_material_error_names_the_secret_url() -> None:
    source = MemorySource()
    version = source.set(URL, "not a certificate", "application/x-pem-file")
    report = await CertSync(
        [URL], store=PemDirectoryStore("/nonexistent"), source=source
    ).sync_once()
    (error,) = report.errors.values()
    assert isinstance(error, MaterialError)
    assert str(error).startswith(f"{URL}/{version}: ")


def _tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + content


def _elements(der: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) of each element of a DER SEQUENCE's content."""
    items, offset = [], 0
    while offset < len(der):
        tag, first = der[offset], der[offset + 1]
        if first < 0x80:
            head, length = 2, first
        else:
            head = 2 + (first & 0x7F)
            length = int.from_bytes(der[offset + 2 : offset + head], "big")
        items.append((tag, der[offset + head : offset + head + length]))
        offset += head + length
    return items


def with_mac_iterations(pfx: bytes, iterations: int) -> bytes:
    """``pfx`` with its MacData iteration count replaced (the MAC itself left as it was)."""
    ((_, outer),) = _elements(pfx)
    version, auth_safe, (_, mac_data) = _elements(outer)
    digest, salt, _ = _elements(mac_data)
    count = iterations.to_bytes((iterations.bit_length() + 8) // 8, "big")
    mac = _tlv(0x30, _tlv(*digest) + _tlv(*salt) + _tlv(0x02, count))
    return _tlv(0x30, _tlv(*version) + _tlv(*auth_safe) + mac)


async def test_a_pfx_asking_for_absurd_iterations_is_refused_at_once(ca: TestAuthority) -> None:
    material = ca.issue(["web.example"])
    pfx = material.to_pkcs12()
    assert CertificateMaterial.from_secret(with_mac_iterations(pfx, 2048)).thumbprint == (
        material.thumbprint
    )  # the crafting itself keeps a valid PFX valid
    hostile = base64.b64encode(with_mac_iterations(pfx, 2**31 - 1)).decode()
    source = MemorySource()
    version = source.set(URL, hostile, "application/x-pkcs12")
    sync = CertSync([URL], store=MemoryStore(), source=source)
    # A safety net only: without the check this parse runs for hours.
    with anyio.fail_after(60):
        report = await sync.sync_once()
    (error,) = report.errors.values()
    assert isinstance(error, MaterialError)
    assert str(error) == (
        f"{URL}/{version}: the PKCS#12 (PFX) value asks for 2,147,483,647 key-derivation "
        "iterations; more than 1,000,000 are refused (Key Vault uses 2,048)"
    )


@pytest.mark.parametrize("options", [["-iter", "5000"], ["-iter", "7000", "-legacy"]])
def test_pfx_iterations_are_found_in_the_key_derivation_too(
    tmp_path: Path, ca: TestAuthority, options: list[str]
) -> None:
    material = ca.issue(["web.example"])
    (tmp_path / "key.pem").write_bytes(material.key_pem())
    (tmp_path / "cert.pem").write_bytes(material.fullchain_pem())
    key, cert = str(tmp_path / "key.pem"), str(tmp_path / "cert.pem")
    pfx = subprocess.run(
        ["openssl", "pkcs12", "-export", "-inkey", key, "-in", cert, "-passout", "pass:", *options],
        capture_output=True,
        check=True,
    ).stdout
    # openssl keeps the MAC at 2,048: the larger count is the key derivation's.
    assert _pfx_iterations(pfx) == int(options[1])


async def test_leftovers_of_a_killed_process_are_swept_when_the_store_is_opened(
    tmp_path: Path, ca: TestAuthority
) -> None:
    from kvcertsync.stores import pemdir

    observed = ObservedCertificate.of(URL)
    material = ca.issue(["web.example"])
    await PemDirectoryStore(tmp_path).install(observed, material, "a" * 32)
    # As a process killed mid-install leaves them: a temp version holding a key, a trash dir.
    old = pemdir._STARTED - 30
    stale = tmp_path / f".kvcertsync-tmp-other.cert.{'b' * 32}.0a1b2c3d"
    stale.write_bytes(material.to_pem_bundle())
    trash = tmp_path / f".kvcertsync-trash-other.cert.{'c' * 32}.0a1b2c3d"
    trash.mkdir()
    (trash / "privkey.pem").write_bytes(material.key_pem())
    # One this process could be writing right now: never touched.
    fresh = tmp_path / f".kvcertsync-tmp-third.cert.{'d' * 32}.0a1b2c3d"
    fresh.write_bytes(b"in flight")
    for path in (stale, trash):
        os.utime(path, (old, old))
    pemdir._SWEPT.clear()  # as in a new process
    assert await PemDirectoryStore(tmp_path).installed(observed) is not None
    assert not stale.exists() and not trash.exists()
    assert fresh.exists()


@pytest.mark.parametrize(
    ("layout", "name"), [("kvlinux", ""), ("split", "combined.pem")], ids=["kvlinux", "split"]
)
def test_one_file_read_once_never_pairs_two_versions(
    tmp_path: Path, ca: TestAuthority, layout: str, name: str
) -> None:
    pool = [ca.issue(["web.example"]) for _ in range(3)]
    store = PemDirectoryStore(tmp_path, layout=layout)  # type: ignore[arg-type]
    observed = ObservedCertificate.of(URL)
    store._install(observed, pool[0], secrets.token_hex(16))
    stop = threading.Event()
    installs = [0]

    def rotate() -> None:
        while not stop.is_set():
            store._install(observed, pool[installs[0] % 3], secrets.token_hex(16))
            installs[0] += 1

    path = tmp_path / "vault.web" / name if name else tmp_path / "vault.web"
    reads = mismatched = 0
    writer = threading.Thread(target=rotate)
    writer.start()
    try:
        while reads < 600 or installs[0] < 20:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # the version was pruned between the link lookup and the open
            # from_secret refuses a key that does not belong to the leaf: that is the check.
            try:
                CertificateMaterial.from_secret(data)
            except MaterialError:
                mismatched += 1
            found = store._read(observed)
            assert found is not None and found[0].thumbprint == found[1].thumbprint
            reads += 1
    finally:
        stop.set()
        writer.join()
    assert mismatched == 0, f"{mismatched} of {reads} reads paired two versions"
