"""PemDirectoryStore on a real file system, checked with openssl, nginx and SIGKILL."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from cryptography.hazmat.primitives import serialization

from kvcertsync.emulator import TestAuthority
from kvcertsync.engine import CertSync
from kvcertsync.errors import StoreError
from kvcertsync.events import CertificateUpdated
from kvcertsync.hooks import command_hook
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import Acl, ObservedCertificate
from kvcertsync.sources import MemorySource
from kvcertsync.stores import pemdir
from kvcertsync.stores.pemdir import PemDirectoryStore

OPENSSL = shutil.which("openssl")
SETFACL = shutil.which("setfacl")
RUNUSER = shutil.which("runuser")
SETPRIV = shutil.which("setpriv")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
V1, V2, V3, V4 = (f"{i:032x}" for i in range(1, 5))
URL = "https://myvault.vault.azure.net/secrets/web"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> TestAuthority:
    return TestAuthority(key="rsa")


@pytest.fixture(scope="module")
def material(ca: TestAuthority) -> CertificateMaterial:
    return ca.issue(["www.example.com"], key="rsa", include_root=True)


def observed(directory: Path, **options: object) -> ObservedCertificate:
    return ObservedCertificate.of(URL, store_location=str(directory), **options)  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def pem_blocks(data: bytes) -> list[str]:
    return re.findall(r"-----BEGIN ([A-Z ]+)-----", data.decode())


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)


# ------------------------------------------------------------------------- layout


@pytest.mark.anyio
async def test_kvlinux_layout_files_modes_and_links(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    store_dir = tmp_path / "store"
    store = PemDirectoryStore()
    record = await store.install(observed(store_dir, symlink_name="web-current"), material, V1)
    version_file = store_dir / f"myvault.web.{V1}"
    link = store_dir / "myvault.web"
    assert mode(store_dir) == 0o700
    assert stat.S_ISREG(version_file.lstat().st_mode) and mode(version_file) == 0o600
    assert os.readlink(link) == version_file.name  # relative: the directory can move
    assert os.readlink(store_dir / "web-current") == version_file.name
    data = link.read_bytes()
    assert pem_blocks(data) == ["CERTIFICATE"] * 3 + ["PRIVATE KEY"]  # leaf, chain, root, key last
    back = CertificateMaterial.from_secret(data)
    assert back.thumbprint == material.thumbprint
    assert [c.subject for c in back.chain] == [c.subject for c in material.chain]
    assert record.version == V1 and record.thumbprint == material.thumbprint
    assert record.location == str(link)
    assert sorted(p.name for p in store_dir.iterdir()) == sorted(
        ["myvault.web", "web-current", version_file.name]
    )


@pytest.mark.anyio
async def test_split_layout_swaps_a_whole_directory(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    store = PemDirectoryStore(layout="split", pfx=True)
    await store.install(observed(tmp_path), material, V1)
    link = tmp_path / "myvault.web"
    assert os.readlink(link) == f"myvault.web.{V1}"
    version_dir = tmp_path / f"myvault.web.{V1}"
    assert mode(version_dir) == 0o700
    names = sorted(p.name for p in version_dir.iterdir())
    assert names == [
        "bundle.pfx",
        "cert.pem",
        "chain.pem",
        "combined.pem",
        "fullchain.pem",
        "privkey.pem",
    ]
    assert all(mode(version_dir / n) == 0o600 for n in names)
    assert (link / "fullchain.pem").read_bytes() == material.fullchain_pem()
    assert (link / "privkey.pem").read_bytes() == material.key_pem()
    assert pem_blocks((link / "chain.pem").read_bytes()) == ["CERTIFICATE"] * 2


@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
@pytest.mark.anyio
@pytest.mark.parametrize("layout", ["kvlinux", "split"])
async def test_openssl_reads_and_verifies_both_layouts(
    tmp_path: Path, ca: TestAuthority, layout: str
) -> None:
    material = ca.issue(["verify.example"], key="rsa")  # chain without the root, as usual
    root = tmp_path / "root.pem"
    root.write_bytes(ca.root_certificate.public_bytes(serialization.Encoding.PEM))
    store = PemDirectoryStore(layout=layout)  # type: ignore[arg-type]
    await store.install(observed(tmp_path / "s"), material, V1)
    link = tmp_path / "s" / "myvault.web"
    if layout == "kvlinux":
        cert = key = link
        (tmp_path / "chain.pem").write_bytes(material.chain_pem())
        chain = tmp_path / "chain.pem"
    else:
        cert, key, chain = link / "cert.pem", link / "privkey.pem", link / "chain.pem"
    assert OPENSSL is not None
    verified = run(OPENSSL, "verify", "-CAfile", str(root), "-untrusted", str(chain), str(cert))
    assert verified.returncode == 0, verified.stderr
    subject = run(OPENSSL, "x509", "-in", str(cert), "-noout", "-subject")
    assert "verify.example" in subject.stdout
    key_text = run(OPENSSL, "pkey", "-in", str(key), "-pubout")
    cert_key = run(OPENSSL, "x509", "-in", str(cert), "-noout", "-pubkey")
    assert key_text.returncode == 0 and key_text.stdout == cert_key.stdout


@pytest.mark.anyio
async def test_installed_survives_a_restart_and_identical_installs_write_nothing(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    cert = observed(tmp_path)
    assert await PemDirectoryStore().installed(cert) is None
    first = await PemDirectoryStore().install(cert, material, V1)
    version_file = tmp_path / f"myvault.web.{V1}"
    before = version_file.stat()
    again = await PemDirectoryStore().install(cert, material, V1)
    after = version_file.stat()
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)
    restarted = await PemDirectoryStore().installed(cert)
    assert restarted == first == again


@pytest.mark.anyio
async def test_engine_restart_installs_nothing(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    source = MemorySource()
    source.set(URL, material)
    cert = observed(tmp_path)
    first = await CertSync([cert], store=PemDirectoryStore(), source=source).sync_once()
    second = await CertSync([cert], store=PemDirectoryStore(), source=source).sync_once()
    assert len(first.updated) == 1 and len(second.unchanged) == 1


@pytest.mark.anyio
async def test_retention_keeps_the_newest_versions(tmp_path: Path, ca: TestAuthority) -> None:
    store = PemDirectoryStore(keep_versions=2)
    cert = observed(tmp_path)
    for version in (V1, V2, V3, V4):
        await store.install(cert, ca.issue(["r.example"]), version)
        await anyio.sleep(0.01)  # distinct mtimes
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["myvault.web", f"myvault.web.{V3}", f"myvault.web.{V4}"]
    assert os.readlink(tmp_path / "myvault.web") == f"myvault.web.{V4}"


# ------------------------------------------------------------------------- hostile directories


@pytest.mark.anyio
async def test_world_writable_directory_is_refused(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    tmp_path.chmod(0o777)
    with pytest.raises(StoreError, match=re.escape(str(tmp_path)) + ".*writable"):
        await PemDirectoryStore().install(observed(tmp_path), material, V1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory's owner needs root")
@pytest.mark.anyio
async def test_directory_owned_by_someone_else_is_refused(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    os.chown(tmp_path, 65534, -1)
    with pytest.raises(StoreError, match="owned by"):
        await PemDirectoryStore().install(observed(tmp_path), material, V1)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_planted_symlinks_are_never_followed(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    store_dir = tmp_path / "store"
    store_dir.mkdir(mode=0o700)
    (store_dir / f"myvault.web.{V1}").symlink_to(victim)
    with pytest.raises(StoreError, match="refusing to replace"):
        await PemDirectoryStore().install(observed(store_dir), material, V1)
    assert victim.read_text() == "precious"

    (store_dir / f"myvault.web.{V1}").unlink()
    (store_dir / "myvault.web").symlink_to(victim)
    with pytest.raises(StoreError, match="did not write"):
        await PemDirectoryStore().install(observed(store_dir), material, V1)
    assert victim.read_text() == "precious"
    assert sorted(p.name for p in store_dir.iterdir()) == ["myvault.web"]


@pytest.mark.anyio
async def test_a_foreign_file_at_the_link_name_is_refused(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    (tmp_path / "myvault.web").write_text("someone else's file")
    with pytest.raises(StoreError, match="not a symlink"):
        await PemDirectoryStore().install(observed(tmp_path), material, V1)
    assert (tmp_path / "myvault.web").read_text() == "someone else's file"


def test_custom_link_names_cannot_escape(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        observed(tmp_path, symlink_name="../../etc/passwd")


# ------------------------------------------------------------------------- sharing


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl (package acl) not installed")
@pytest.mark.anyio
async def test_acls_grant_read_access(tmp_path: Path, material: CertificateMaterial) -> None:
    store = PemDirectoryStore()
    await store.install(observed(tmp_path, acls=[Acl(user="nobody", group=None)]), material, V1)
    acl = run("getfacl", "-p", str(tmp_path / f"myvault.web.{V1}")).stdout
    assert "user:nobody:r--" in acl
    assert "user:nobody:--x" in run("getfacl", "-p", str(tmp_path)).stdout
    assert mode(tmp_path / f"myvault.web.{V1}") & 0o007 == 0  # nobody else


@pytest.mark.anyio
async def test_acls_without_setfacl_fall_back_to_the_group_or_say_why(
    tmp_path: Path, material: CertificateMaterial, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda n, *a, **k: None if n == "setfacl" else real_which(n)
    )
    group_dir = tmp_path / "g"
    await PemDirectoryStore().install(
        observed(group_dir, acls=[Acl(user=None, group="nogroup")]), material, V1
    )
    version_file = group_dir / f"myvault.web.{V1}"
    assert mode(version_file) == 0o640 and version_file.stat().st_gid == 65534
    assert mode(group_dir) & 0o050 == 0o050
    with pytest.raises(StoreError, match="setfacl is not installed"):
        await PemDirectoryStore().install(
            observed(tmp_path / "u", acls=[Acl(user="nobody", group=None)]), material, V1
        )


@pytest.mark.anyio
async def test_unknown_acl_user_is_named(tmp_path: Path, material: CertificateMaterial) -> None:
    with pytest.raises(StoreError, match="no-such-user"):
        await PemDirectoryStore().install(
            observed(tmp_path, acls=[Acl(user="no-such-user", group=None)]), material, V1
        )


@pytest.mark.anyio
async def test_group_and_file_mode_options(tmp_path: Path, material: CertificateMaterial) -> None:
    store = PemDirectoryStore(layout="split", group="nogroup", file_mode=0o640)
    await store.install(observed(tmp_path / "s"), material, V1)
    key = tmp_path / "s" / f"myvault.web.{V1}" / "privkey.pem"
    assert mode(key) == 0o640 and key.stat().st_gid == 65534
    assert mode(key.parent) == 0o750 and mode(tmp_path / "s") & 0o050 == 0o050
    with pytest.raises(ValueError, match="file_mode"):
        PemDirectoryStore(file_mode=0o644)


# ------------------------------------------------------------------------- crash safety


@pytest.mark.parametrize("layout", ["kvlinux", "split"])
def test_sigkill_at_any_instant_leaves_complete_versions(tmp_path: Path, layout: str) -> None:
    worker = Path(__file__).parent / "helpers" / "pemdir_worker.py"
    rng = random.Random(layout)
    store_dir = tmp_path / "store"
    for _ in range(15):
        process = subprocess.Popen(
            [sys.executable, str(worker), str(store_dir), layout],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.25))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        # Every name a reader can see (links and version entries, not temporaries) is whole.
        visible = [p for p in store_dir.iterdir() if not p.name.startswith(".kvcertsync-")]
        names = {p.name for p in visible}
        assert {"crashvault.cert0", "crashvault.cert1", "alias0", "alias1"} <= names
        for target in visible:
            if layout == "kvlinux":
                material = CertificateMaterial.from_secret(target.read_bytes())
            else:
                full = (target / "fullchain.pem").read_bytes()
                key = (target / "privkey.pem").read_bytes()
                material = CertificateMaterial.from_secret(full + key)
                assert (target / "cert.pem").read_bytes() == material.cert_pem()
            assert material.dns_names[0].startswith("host")
    # The next process to open the store sweeps what the killed ones left (keys in temp files).
    # It finds the certificate installed, unless the last kill fell between moving its link and
    # its custom link: then the custom link names the older version, installed() says nothing
    # is installed, and the next install repairs both.
    reopen = (
        "import anyio, os, sys\n"
        "from kvcertsync.emulator import TestAuthority\n"
        "from kvcertsync.settings import ObservedCertificate\n"
        "from kvcertsync.stores.pemdir import PemDirectoryStore\n"
        "url = 'https://crashvault.vault.azure.net/secrets/cert0'\n"
        "observed = ObservedCertificate.of(url, symlink_name='alias0')\n"
        "store = PemDirectoryStore(sys.argv[1], layout=sys.argv[2])\n"
        "if anyio.run(store.installed, observed) is None:\n"
        "    names = ('crashvault.cert0', 'alias0')\n"
        "    links = [os.readlink(os.path.join(sys.argv[1], n)) for n in names]\n"
        "    assert links[0] != links[1], links\n"
        "    material = TestAuthority().issue(['host0.example'])\n"
        "    anyio.run(store.install, observed, material, 'f' * 32)\n"
        "    assert anyio.run(store.installed, observed).version == 'f' * 32\n"
    )
    subprocess.run([sys.executable, "-c", reopen, str(store_dir), layout], check=True, timeout=60)
    assert not [p.name for p in store_dir.iterdir() if p.name.startswith(".kvcertsync-")]


# ------------------------------------------------------------------------- nginx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def served_serial(port: int) -> int | None:
    assert OPENSSL is not None
    hello = subprocess.run(
        [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "www.example.com"],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    serial = subprocess.run(
        [OPENSSL, "x509", "-noout", "-serial"], input=hello.stdout, capture_output=True, text=True
    )
    text = serial.stdout.strip().removeprefix("serial=")
    return int(text, 16) if text else None


@pytest.mark.skipif(NGINX is None, reason="nginx not installed (apt-get install nginx)")
@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
@pytest.mark.anyio
@pytest.mark.parametrize("layout", ["kvlinux", "split"])
async def test_nginx_serves_the_store_and_reloads_on_rotation(
    tmp_path: Path, ca: TestAuthority, layout: str
) -> None:
    assert NGINX is not None
    store_dir = tmp_path / "certs"
    link = store_dir / "myvault.web"
    cert, key = (
        (link, link) if layout == "kvlinux" else (link / "fullchain.pem", link / "privkey.pem")
    )
    port = free_port()
    scratch = tmp_path / "nginx-temp"  # nginx opens its temp directories to its workers
    scratch.mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        f"""
        daemon on; pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log;
        events {{}}
        http {{
          access_log off;
          client_body_temp_path {scratch}; proxy_temp_path {scratch};
          fastcgi_temp_path {scratch}; uwsgi_temp_path {scratch}; scgi_temp_path {scratch};
          server {{
            listen 127.0.0.1:{port} ssl;
            ssl_certificate {cert}; ssl_certificate_key {key};
            return 200 "ok";
          }}
        }}
        """
    )
    nginx = [NGINX, "-p", str(tmp_path), "-c", str(conf)]
    source = MemorySource()
    first = ca.issue(["www.example.com"], key="rsa")
    source.set(URL, first)
    store = PemDirectoryStore(layout=layout)  # type: ignore[arg-type]
    sync = CertSync([observed(store_dir)], store=store, source=source)
    await sync.sync_once()
    started = run(*nginx)
    assert started.returncode == 0, started.stderr + (tmp_path / "error.log").read_text()
    try:
        assert served_serial(port) == first.serial_number
        sync.subscribe(command_hook([*nginx, "-s", "reload"]), CertificateUpdated)
        second = ca.issue(["www.example.com"], key="rsa")
        source.rotate(URL, second)
        async with sync:
            await sync.refresh()
            with anyio.fail_after(15):  # the reload is asynchronous in nginx: poll for it
                while served_serial(port) != second.serial_number:  # noqa: ASYNC110
                    await anyio.sleep(0.2)
    finally:
        run(*nginx, "-s", "quit")


# ------------------------------------------------------------------------- regressions from review


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's symlink needs root")
@pytest.mark.anyio
async def test_a_symlink_planted_in_a_shared_directory_is_not_followed(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    planted = shared / "kvstore"
    planted.symlink_to(victim)
    os.lchown(planted, 65534, 65534)  # planted by 'nobody'
    with pytest.raises(StoreError, match="others can write"):
        await PemDirectoryStore(group="nogroup", file_mode=0o640).install(
            observed(planted), material, V1
        )
    assert list(victim.iterdir()) == [] and mode(victim) == 0o700


@pytest.mark.anyio
async def test_a_symlink_in_a_trusted_directory_is_followed(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "alias").symlink_to(real)
    await PemDirectoryStore().install(observed(tmp_path / "alias"), material, V1)
    assert (real / "myvault.web").exists()


@pytest.mark.skipif(shutil.which("setfacl") is None, reason="setfacl (package acl) not installed")
@pytest.mark.anyio
async def test_acl_names_starting_with_r_survive(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    await PemDirectoryStore().install(
        observed(tmp_path, acls=[Acl(user="root", group="root")]), material, V1
    )
    assert "group:root:--x" in run("getfacl", "-p", str(tmp_path)).stdout


@pytest.mark.anyio
async def test_split_with_pfx_reuses_a_version_after_a_lost_link(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    store = PemDirectoryStore(layout="split", pfx=True)
    await store.install(observed(tmp_path), material, V1)
    (tmp_path / "myvault.web").unlink()  # a crash between the version's rename and the link
    await store.install(observed(tmp_path), material, V1)
    assert os.readlink(tmp_path / "myvault.web") == f"myvault.web.{V1}"


@pytest.mark.anyio
async def test_a_damaged_version_is_written_again(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    store = PemDirectoryStore()
    cert = observed(tmp_path)
    await store.install(cert, material, V1)
    version_file = tmp_path / f"myvault.web.{V1}"
    version_file.write_bytes(version_file.read_bytes()[:100])  # truncated behind our back
    assert await store.installed(cert) is None
    await store.install(cert, material, V1)
    assert (
        CertificateMaterial.from_secret(version_file.read_bytes()).thumbprint == material.thumbprint
    )


@pytest.mark.anyio
async def test_a_custom_link_added_later_is_created(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    source = MemorySource()
    source.set(URL, material)
    await CertSync([observed(tmp_path)], store=PemDirectoryStore(), source=source).sync_once()
    later = observed(tmp_path, symlink_name="web-current")
    report = await CertSync([later], store=PemDirectoryStore(), source=source).sync_once()
    assert report.ok
    assert os.readlink(tmp_path / "web-current") == os.readlink(tmp_path / "myvault.web")


@pytest.mark.anyio
async def test_retention_keeps_the_replaced_version_whatever_the_mtimes(
    tmp_path: Path, ca: TestAuthority
) -> None:
    store = PemDirectoryStore(keep_versions=2)
    cert = observed(tmp_path)
    for version in ("f" * 32, "e" * 32, "d" * 32):
        await store.install(cert, ca.issue(["m.example"]), version)
        for entry in tmp_path.iterdir():
            os.utime(entry, (1_000_000, 1_000_000), follow_symlinks=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["myvault.web", f"myvault.web.{'d' * 32}", f"myvault.web.{'e' * 32}"]


@pytest.mark.anyio
async def test_a_windows_path_is_refused_here(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    with pytest.raises(StoreError, match="not a path on this system"):
        await PemDirectoryStore().install(
            ObservedCertificate.of(URL, store_location="C:\\certs"), material, V1
        )


@pytest.mark.anyio
async def test_concurrent_installs_create_the_directory_once(
    tmp_path: Path, ca: TestAuthority
) -> None:
    store = PemDirectoryStore()
    target = tmp_path / "a" / "b" / "c"
    certs = [
        ObservedCertificate.of(
            f"https://v{i}x.vault.azure.net/secrets/w", store_location=str(target)
        )
        for i in range(8)
    ]
    materials = [ca.issue([f"c{i}.example"]) for i in range(8)]
    async with anyio.create_task_group() as tg:
        for cert, material in zip(certs, materials, strict=True):
            tg.start_soon(store.install, cert, material, V1)
    assert len([p for p in target.iterdir() if p.is_symlink()]) == 8


# ------------------------------------------------------------------------- readers through the path


def _known(database: str, name: str) -> bool:
    try:
        (pwd.getpwnam if database == "passwd" else grp.getgrnam)(name)
    except KeyError:
        return False
    return True


as_root = pytest.mark.skipif(os.geteuid() != 0, reason="acting as other users needs root")
with_setfacl = pytest.mark.skipif(SETFACL is None, reason="setfacl (package acl) not installed")
with_users = pytest.mark.skipif(
    not (_known("passwd", "www-data") and _known("passwd", "nobody")),
    reason="needs the users www-data and nobody",
)
with_nogroup = pytest.mark.skipif(not _known("group", "nogroup"), reason="no group nogroup")
with_switch = pytest.mark.skipif(
    RUNUSER is None and SETPRIV is None, reason="needs runuser or setpriv (util-linux)"
)
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="extended attributes: Linux")


def as_user(user: str, *argv: str) -> subprocess.CompletedProcess[bytes]:
    """Run ``argv`` as ``user`` with that user's own groups: a real other process."""
    if RUNUSER is not None:
        command = [RUNUSER, "-u", user, "--", *argv]
    else:
        assert SETPRIV is not None
        account = pwd.getpwnam(user)
        command = [
            SETPRIV,
            f"--reuid={account.pw_uid}",
            f"--regid={account.pw_gid}",
            "--init-groups",
            *argv,
        ]
    return subprocess.run(command, capture_output=True, timeout=30, check=False, cwd="/")


def getfacl(path: Path) -> str:
    return run("getfacl", "-p", str(path)).stdout


def has_acl(path: Path) -> bool:
    try:
        os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return False
    return True


@pytest.fixture
def shared_base() -> Iterator[Path]:
    """A root-owned 0711 directory others can traverse (tmp_path's parents are 0700), so a test
    sees exactly what the store creates below it."""
    base = Path(tempfile.mkdtemp(prefix="kvcertsync-test-", dir="/tmp"))
    try:
        base.chmod(0o711)
        if _known("passwd", "www-data") and as_user("www-data", "test", "-x", str(base)).returncode:
            pytest.skip(f"www-data cannot reach {base}")
        yield base
    finally:
        shutil.rmtree(base)


@as_root
@with_setfacl
@with_users
@with_switch
@pytest.mark.anyio
@pytest.mark.parametrize("layout", ["kvlinux", "split"])
async def test_an_acl_user_reads_the_key_through_directories_the_store_created(
    shared_base: Path, material: CertificateMaterial, layout: str
) -> None:
    a, b = shared_base / "a", shared_base / "a" / "b"
    store_dir = b / "store"
    cert = observed(store_dir, acls=[Acl(user="www-data", group=None)])
    await PemDirectoryStore(layout=layout).install(cert, material, V1)  # type: ignore[arg-type]
    link = store_dir / "myvault.web"
    if layout == "kvlinux":
        files = {link: material.to_pem_bundle()}
    else:
        files = {link / "privkey.pem": material.key_pem(), link / "cert.pem": material.cert_pem()}
    for path, data in files.items():
        read = as_user("www-data", "cat", str(path))
        assert read.returncode == 0, read.stderr
        assert read.stdout == data
        denied = as_user("nobody", "cat", str(path))
        assert denied.returncode != 0 and denied.stdout == b""
        assert b"Permission denied" in denied.stderr
    for directory in (a, b, store_dir):
        # Traversal only: 0710 shows the ACL mask (--x); no group or other read or write.
        assert mode(directory) & 0o067 == 0, f"{directory}: {mode(directory):04o}"
        acl = getfacl(directory)
        assert "user:www-data:--x" in acl and "other::---" in acl
        for user in ("www-data", "nobody"):
            assert as_user(user, "ls", str(directory)).returncode != 0  # never a listing
    assert "user:nobody" not in getfacl(a)


@as_root
@with_setfacl
@with_users
@with_switch
@linux_only
@pytest.mark.anyio
async def test_readers_added_later_get_through_directories_an_earlier_run_created(
    shared_base: Path, ca: TestAuthority
) -> None:
    store_dir = shared_base / "a" / "b" / "store"
    link = store_dir / "myvault.web"
    await PemDirectoryStore().install(observed(store_dir), ca.issue(["l.example"]), V1)
    for directory in (shared_base / "a", shared_base / "a" / "b", store_dir):
        assert mode(directory) == 0o700 and not has_acl(directory)  # no reader: nothing shared
    assert as_user("www-data", "cat", str(link)).returncode != 0

    renewed = ca.issue(["l.example"])
    later = observed(store_dir, acls=[Acl(user="www-data", group="ssl-cert")])
    await PemDirectoryStore().install(later, renewed, V2)  # a new store: a restarted agent
    read = as_user("www-data", "cat", str(link))
    assert read.returncode == 0, read.stderr
    assert read.stdout == renewed.to_pem_bundle()
    acl = getfacl(shared_base / "a")
    assert "user:www-data:--x" in acl and "group:ssl-cert:--x" in acl
    assert as_user("nobody", "cat", str(link)).returncode != 0


@as_root
@with_setfacl
@with_users
@with_switch
@linux_only
@pytest.mark.anyio
@pytest.mark.parametrize("layout", ["kvlinux", "split"])
async def test_installing_the_same_version_again_shares_it_with_readers_added_since(
    shared_base: Path, material: CertificateMaterial, layout: str
) -> None:
    store_dir = shared_base / "a" / "store"
    key = store_dir / "myvault.web" / ("privkey.pem" if layout == "split" else "")
    await PemDirectoryStore(layout=layout).install(observed(store_dir), material, V1)  # type: ignore[arg-type]
    before = key.stat()
    assert as_user("www-data", "cat", str(key)).returncode != 0
    later = observed(store_dir, acls=[Acl(user="www-data", group=None)])
    await PemDirectoryStore(layout=layout).install(later, material, V1)  # type: ignore[arg-type]
    read = as_user("www-data", "cat", str(key))
    assert read.returncode == 0, read.stderr
    assert read.stdout == (material.key_pem() if layout == "split" else material.to_pem_bundle())
    after = key.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not rewritten
    assert stat.S_IMODE(after.st_mode) == 0o640  # 0600 and the ACL mask (r--): nobody else
    assert as_user("nobody", "cat", str(key)).returncode != 0


@as_root
@with_setfacl
@with_users
@with_switch
@pytest.mark.anyio
async def test_directories_it_did_not_create_are_left_alone_with_a_warning(
    shared_base: Path,
    ca: TestAuthority,
    material: CertificateMaterial,
    caplog: pytest.LogCaptureFixture,
) -> None:
    system = shared_base / "waagent"  # like /var/lib/waagent: root's, 0700, not ours
    system.mkdir(mode=0o700)
    store_dir = system / "Microsoft.Azure.KeyVault" / "app1"
    link = store_dir / "myvault.web"
    cert = observed(store_dir, acls=[Acl(user="www-data", group=None)])
    with caplog.at_level(logging.WARNING, logger="kvcertsync.stores.pemdir"):
        await PemDirectoryStore().install(cert, material, V1)
    assert mode(system) == 0o700 and not has_acl(system)
    assert "user:www-data:--x" in getfacl(system / "Microsoft.Azure.KeyVault")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"user www-data cannot traverse {system} (owner root (uid 0), mode 0700)" in warnings[0]
    assert f"certificates in {store_dir}" in warnings[0]
    assert f"setfacl -m u:www-data:x {system}" in warnings[0]
    assert as_user("www-data", "cat", str(link)).returncode != 0  # the warning is true

    # The administrator follows the advice: the key is readable, and no more warnings.
    assert run("setfacl", "-m", "u:www-data:x", str(system)).returncode == 0
    read = as_user("www-data", "cat", str(link))
    assert read.returncode == 0 and read.stdout == material.to_pem_bundle()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvcertsync.stores.pemdir"):
        await PemDirectoryStore().install(cert, ca.issue(["w.example"]), V2)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@as_root
@with_users
@with_nogroup
@with_switch
@linux_only
@pytest.mark.anyio
async def test_without_setfacl_created_directories_let_the_single_group_through(
    shared_base: Path, material: CertificateMaterial, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_which = shutil.which
    monkeypatch.setattr(
        shutil, "which", lambda n, *a, **k: None if n == "setfacl" else real_which(n)
    )
    nogroup = grp.getgrnam("nogroup").gr_gid
    store_dir = shared_base / "a" / "b" / "store"
    cert = observed(store_dir, acls=[Acl(user=None, group="nogroup")])
    await PemDirectoryStore().install(cert, material, V1)
    for directory in (shared_base / "a", shared_base / "a" / "b"):
        assert mode(directory) == 0o710 and directory.stat().st_gid == nogroup  # g+x only
        assert not has_acl(directory)
    assert mode(store_dir) == 0o750 and store_dir.stat().st_gid == nogroup
    version_file = store_dir / f"myvault.web.{V1}"
    assert mode(version_file) == 0o640 and version_file.stat().st_gid == nogroup
    read = as_user("nobody", "cat", str(store_dir / "myvault.web"))  # nobody is in nogroup
    assert read.returncode == 0, read.stderr
    assert read.stdout == material.to_pem_bundle()
    assert as_user("www-data", "cat", str(version_file)).returncode != 0  # not in nogroup
    assert as_user("nobody", "ls", str(shared_base / "a")).returncode != 0
    with pytest.raises(StoreError, match="setfacl is not installed"):
        await PemDirectoryStore().install(
            observed(shared_base / "u" / "store", acls=[Acl(user="www-data", group=None)]),
            material,
            V1,
        )


@as_root
@with_setfacl
@with_users
@with_nogroup
@with_switch
@pytest.mark.anyio
async def test_the_group_option_lets_its_group_through_created_directories(
    shared_base: Path, material: CertificateMaterial
) -> None:
    store_dir = shared_base / "a" / "store"
    store = PemDirectoryStore(layout="split", group="nogroup", file_mode=0o640)
    await store.install(observed(store_dir), material, V1)
    acl = getfacl(shared_base / "a")
    assert f"group:{grp.getgrnam('nogroup').gr_gid}:--x" in acl or "group:nogroup:--x" in acl
    assert mode(shared_base / "a") & 0o067 == 0
    key = store_dir / "myvault.web" / "privkey.pem"
    read = as_user("nobody", "cat", str(key))
    assert read.returncode == 0, read.stderr
    assert read.stdout == material.key_pem()
    assert as_user("www-data", "cat", str(key)).returncode != 0


@linux_only
@pytest.mark.anyio
async def test_without_readers_created_directories_stay_0700_and_are_marked(
    tmp_path: Path, material: CertificateMaterial
) -> None:
    store_dir = tmp_path / "a" / "b" / "store"
    await PemDirectoryStore().install(observed(store_dir), material, V1)
    for directory in (tmp_path / "a", tmp_path / "a" / "b", store_dir):
        assert mode(directory) == 0o700 and not has_acl(directory)
        assert os.getxattr(directory, "user.kvcertsync.created") == b"1"
    with pytest.raises(OSError):
        os.getxattr(tmp_path, "user.kvcertsync.created")  # not created by the store


@with_setfacl
@with_users
@linux_only
@pytest.mark.anyio
async def test_concurrent_installs_let_every_reader_through_the_shared_parents(
    tmp_path: Path, ca: TestAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_setxattr = os.setxattr

    def slow_setxattr(*args: object, **kwargs: object) -> None:
        time.sleep(0.05)  # widen the window between mkdir and the mark another thread sees
        real_setxattr(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "setxattr", slow_setxattr)
    store = PemDirectoryStore()
    parent = tmp_path / "shared"
    certs = [
        ObservedCertificate.of(
            f"https://v{i}x.vault.azure.net/secrets/w",
            store_location=str(parent / f"app{i % 2}"),
            acls=[Acl(user=("www-data", "nobody")[i % 2], group=None)],
        )
        for i in range(8)
    ]
    async with anyio.create_task_group() as tg:
        for i, cert in enumerate(certs):
            tg.start_soon(store.install, cert, ca.issue([f"c{i}.example"]), V1)
    acl = getfacl(parent)
    assert "user:www-data:--x" in acl and "user:nobody:--x" in acl
    assert "user:nobody" not in getfacl(parent / "app0")
    assert mode(parent) & 0o067 == 0


# ------------------------------------------------------------------------- the installed() cache


async def installed_and_remembered(
    directory: Path, material: CertificateMaterial, layout: str = "kvlinux"
) -> tuple[PemDirectoryStore, ObservedCertificate]:
    """A store that installed V1 into ``directory`` and has answered ``installed()`` once."""
    store = PemDirectoryStore(layout=layout)  # type: ignore[arg-type]
    cert = observed(directory)
    await store.install(cert, material, V1)
    assert await store.installed(cert) is not None
    return store, cert


def replace_file(path: Path, data: bytes) -> None:
    """What another process does to a version file: write a new one and rename it over."""
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(data)
    temp.chmod(0o600)
    os.replace(temp, path)


@pytest.mark.anyio
async def test_installed_follows_a_link_moved_behind_its_back(
    tmp_path: Path, ca: TestAuthority
) -> None:
    store = PemDirectoryStore()
    cert = observed(tmp_path, symlink_name="web-current")
    first, second = ca.issue(["a.example"]), ca.issue(["b.example"])
    await store.install(cert, first, V1)
    assert (await store.installed(cert)).version == V1  # type: ignore[union-attr]
    # Another process (another store object) installs the next version.
    await PemDirectoryStore().install(cert, second, V2)
    now = await store.installed(cert)
    assert now is not None and (now.version, now.thumbprint) == (V2, second.thumbprint)
    # Someone points the link back by hand: the answer follows it.
    link = tmp_path / "myvault.web"
    (tmp_path / "back").symlink_to(f"myvault.web.{V1}")
    os.replace(tmp_path / "back", link)
    assert await store.installed(cert) is None  # the custom link still names V2
    (tmp_path / "back").symlink_to(f"myvault.web.{V1}")
    os.replace(tmp_path / "back", tmp_path / "web-current")
    now = await store.installed(cert)
    assert now is not None and (now.version, now.thumbprint) == (V1, first.thumbprint)
    link.unlink()
    assert await store.installed(cert) is None


@pytest.mark.anyio
@pytest.mark.parametrize("layout", ["kvlinux", "split"])
async def test_installed_sees_a_version_file_replaced_or_damaged(
    tmp_path: Path, ca: TestAuthority, layout: str
) -> None:
    store, cert = await installed_and_remembered(tmp_path, ca.issue(["a.example"]), layout)
    other = ca.issue(["other.example"])
    entry = tmp_path / f"myvault.web.{V1}"
    target = entry / "cert.pem" if layout == "split" else entry
    replace_file(target, other.cert_pem() if layout == "split" else other.to_pem_bundle())
    now = await store.installed(cert)
    assert now is not None and now.thumbprint == other.thumbprint
    with target.open("r+b") as handle:  # damaged in place: same inode, same name
        handle.truncate(100)
    assert await store.installed(cert) is None


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("opened", "refusal"),
    [
        ("parent/s", "writable by group or others"),  # the store directory itself
        ("parent", "others can write"),  # one on the way: anyone could swap the store (no +t)
    ],
)
async def test_installed_refuses_a_directory_opened_to_others_after_it_answered(
    tmp_path: Path, material: CertificateMaterial, opened: str, refusal: str
) -> None:
    (tmp_path / "parent").mkdir(mode=0o755)
    store, cert = await installed_and_remembered(tmp_path / "parent" / "s", material)
    (tmp_path / opened).chmod(0o777)
    # Checked again for all its certificates together, once a second at most.
    await anyio.sleep(pemdir._DIRECTORY_RECHECK_S)
    with pytest.raises(StoreError, match=refusal):
        await store.installed(cert)


@pytest.mark.anyio
@pytest.mark.parametrize("layout", ["kvlinux", "split"])
async def test_installed_sees_the_store_directory_swapped_for_one_that_links_to_the_old_files(
    tmp_path: Path, material: CertificateMaterial, layout: str
) -> None:
    directory = tmp_path / "s"
    store, cert = await installed_and_remembered(directory, material, layout)
    os.rename(directory, tmp_path / "old")
    directory.mkdir(mode=0o700)
    (directory / "myvault.web").symlink_to(f"myvault.web.{V1}")
    (directory / f"myvault.web.{V1}").symlink_to(f"../old/myvault.web.{V1}")
    # A fresh lookup takes no version reached through a link: nor may the remembered answer,
    # before the directory's own check comes round again.
    assert await PemDirectoryStore(layout=layout).installed(cert) is None  # type: ignore[arg-type]
    assert await store.installed(cert) is None


@pytest.mark.anyio
@pytest.mark.parametrize("layout", ["kvlinux", "split"])
async def test_installed_answers_from_memory_with_a_system_call_per_thing_it_proves(
    tmp_path: Path, ca: TestAuthority, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PemDirectoryStore(layout=layout)  # type: ignore[arg-type]
    certs = [ObservedCertificate.of(f"{URL}{i}", store_location=str(tmp_path)) for i in range(20)]
    for cert in certs:
        await store.install(cert, ca.issue(["a.example"]), V1)
    calls: list[str] = []
    real_stat, real_lstat, real_readlink = os.stat, os.lstat, os.readlink

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(os, "stat", counted("stat", real_stat))
    monkeypatch.setattr(os, "lstat", counted("lstat", real_lstat))
    monkeypatch.setattr(os, "readlink", counted("readlink", real_readlink))
    for _ in range(5):
        answers = [await store.installed(cert) for cert in certs]
        assert all(a is not None and a.version == V1 for a in answers)
    # A readlink of the link and an lstat of the file (and of a version directory) per answer;
    # the path to the store directory walked again once a second for all of them.
    assert calls.count("readlink") == 100, calls
    assert calls.count("lstat") == (200 if layout == "split" else 100), calls
    assert set(calls) <= {"stat", "readlink", "lstat"} and calls.count("stat") <= 20, calls


@pytest.mark.anyio
async def test_installed_sees_a_version_directory_swapped_for_a_link_to_another(
    tmp_path: Path, ca: TestAuthority
) -> None:
    store = PemDirectoryStore(layout="split")
    cert = observed(tmp_path / "s")
    await store.install(cert, ca.issue(["a.example"]), V1)
    assert (await store.installed(cert)).version == V1  # type: ignore[union-attr]
    # Another key beside the same cert.pem, reached through a link where the directory was.
    entry = tmp_path / "s" / f"myvault.web.{V1}"
    moved = tmp_path / "elsewhere"
    os.rename(entry, moved)
    forged = tmp_path / "forged"
    forged.mkdir(mode=0o700)
    (forged / "cert.pem").symlink_to(moved / "cert.pem")
    (forged / "privkey.pem").write_bytes(b"someone else's key")
    entry.symlink_to(forged)
    # A fresh lookup does not follow it (the next install writes the version again): nor may
    # the remembered answer.
    assert await PemDirectoryStore(layout="split").installed(cert) is None
    assert await store.installed(cert) is None


@pytest.mark.anyio
async def test_installed_sees_a_link_moved_to_a_renamed_entry_that_holds_the_same_files(
    tmp_path: Path, ca: TestAuthority
) -> None:
    store = PemDirectoryStore(layout="split")
    cert = observed(tmp_path)
    await store.install(cert, ca.issue(["a.example"]), V1)
    assert (await store.installed(cert)).version == V1  # type: ignore[union-attr]
    # The version directory renamed: its cert.pem is untouched (same inode, same times).
    os.rename(tmp_path / f"myvault.web.{V1}", tmp_path / f"myvault.web.{V2}")
    (tmp_path / "new").symlink_to(f"myvault.web.{V2}")
    os.replace(tmp_path / "new", tmp_path / "myvault.web")
    assert (await store.installed(cert)).version == V2  # type: ignore[union-attr]
    # Reached through a link kvcertsync did not write: refused, as a fresh lookup refuses it.
    (tmp_path / "alias").symlink_to(f"myvault.web.{V2}")
    (tmp_path / "new").symlink_to("alias")
    os.replace(tmp_path / "new", tmp_path / "myvault.web")
    with pytest.raises(StoreError, match="did not write"):
        await store.installed(cert)


# ------------------------------------------------------------------------- pruning, per certificate


@pytest.mark.anyio
async def test_pruning_touches_only_the_certificates_own_files(
    tmp_path: Path, ca: TestAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    listings: list[object] = []
    real_scandir, real_listdir = os.scandir, os.listdir

    def counting_scandir(path: object) -> object:
        listings.append(path)
        return real_scandir(path)  # type: ignore[call-overload]

    def counting_listdir(path: object) -> object:
        listings.append(path)
        return real_listdir(path)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "scandir", counting_scandir)
    monkeypatch.setattr(os, "listdir", counting_listdir)
    # Another certificate's versions (more than keep_versions), unrelated files, a link by hand.
    others = [tmp_path / f"myvault.other.{v}" for v in (V1, V2, V3)]
    for path in others:
        path.write_bytes(b"another certificate")
    (tmp_path / "myvault.other").symlink_to(others[0].name)
    unrelated = [tmp_path / "notes.txt", tmp_path / f"myvault.web.{V1}.bak"]
    for path in unrelated:
        path.write_bytes(b"mine")
    (tmp_path / "pinned").symlink_to(f"myvault.web.{V1}")  # a reader's own link to V1
    store = PemDirectoryStore(keep_versions=2)
    cert = observed(tmp_path)
    versions = [f"{i:032x}" for i in range(1, 13)]
    for version in versions:
        await store.install(cert, ca.issue(["p.example"]), version)
    assert len(listings) == 2  # once to sweep leftovers, once to index: not per install
    names = {p.name for p in tmp_path.iterdir()}
    web = {n for n in names if n.startswith("myvault.web.") and not n.endswith(".bak")}
    # The two newest, and V1 which a link still points at.
    assert web == {f"myvault.web.{v}" for v in (versions[0], versions[-2], versions[-1])}
    assert all(p.read_bytes() == b"another certificate" for p in others)
    assert all(p.read_bytes() == b"mine" for p in unrelated)
    assert os.readlink(tmp_path / "myvault.other") == others[0].name
    # Once the reader's link is gone, V1 goes with the next install.
    (tmp_path / "pinned").unlink()
    await store.install(cert, ca.issue(["p.example"]), f"{13:032x}")
    assert not (tmp_path / f"myvault.web.{V1}").exists()


@pytest.mark.anyio
async def test_versions_another_process_wrote_are_pruned_too(
    tmp_path: Path, ca: TestAuthority
) -> None:
    cert = observed(tmp_path)
    await PemDirectoryStore().install(cert, ca.issue(["o.example"]), V1)
    await PemDirectoryStore().install(cert, ca.issue(["o.example"]), V2)
    store = PemDirectoryStore()  # a new process: knows nothing of V1
    await store.install(cert, ca.issue(["o.example"]), V3)
    await store.install(cert, ca.issue(["o.example"]), V4)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "myvault.web",
        f"myvault.web.{V3}",
        f"myvault.web.{V4}",
    ]


@pytest.mark.anyio
async def test_leftovers_are_swept_again_by_a_long_running_store(
    tmp_path: Path, ca: TestAuthority, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = PemDirectoryStore()
    cert = observed(tmp_path)
    await store.install(cert, ca.issue(["l.example"]), V1)
    # Left since by another process that died mid-install, long enough ago to be dead.
    old = time.time() - 3600
    stale = tmp_path / f".kvcertsync-tmp-myvault.other.{V1}.0a1b2c3d"
    stale.write_bytes(b"a private key")
    trash = tmp_path / f".kvcertsync-trash-myvault.other.{V2}.0a1b2c3d"
    trash.mkdir()
    (trash / "privkey.pem").write_bytes(b"a private key")
    fresh = tmp_path / f".kvcertsync-tmp-myvault.third.{V1}.0a1b2c3d"
    fresh.write_bytes(b"in flight")  # recent: perhaps another process writing it now
    for path in (stale, trash):
        os.utime(path, (old, old))
    await store.install(cert, ca.issue(["l.example"]), V2)
    assert stale.exists() and trash.exists()  # not every install lists the directory
    monkeypatch.setattr(pemdir, "_RESCAN_SECONDS", 0.0)
    await store.install(cert, ca.issue(["l.example"]), V3)
    assert not stale.exists() and not trash.exists()
    assert fresh.exists()
