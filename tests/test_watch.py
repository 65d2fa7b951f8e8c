"""StoreWatcher: a consumer following a store that another process (``kvcertsync run``) writes."""

from __future__ import annotations

import grp
import json
import os
import pwd
import secrets
import shutil
import tempfile
import traceback
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from kvcertsync.emulator import LocalKeyVault, TestAuthority
from kvcertsync.events import CertificateUpdated
from kvcertsync.feed import CertificateFeed
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.stores import InstalledCertificate, MemoryStore, PemDirectoryStore
from kvcertsync.watch import StoreWatcher
from tests.agent_process import (
    AgentProcess,
    agent_vault_fixture,  # noqa: F401  (the "kv" fixture)
    agents_fixture,  # noqa: F401  (the "agents" fixture)
    settings_document,
    start_agent,
)
from tests.test_pemdir import as_root, as_user, with_setfacl, with_switch, with_users

pytestmark = pytest.mark.anyio

URL = "https://demo.vault.azure.net/secrets/web"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> TestAuthority:
    return TestAuthority()


def version() -> str:
    return secrets.token_hex(16)


async def next_event(events: list[CertificateUpdated], count: int, within: float = 30) -> None:
    with anyio.fail_after(within):
        while len(events) < count:  # noqa: ASYNC110 - plain state
            await anyio.sleep(0.01)


@pytest.mark.parametrize("use_watchfiles", [True, False], ids=["watchfiles", "polling"])
@pytest.mark.parametrize("layout", ["kvlinux", "split"])
async def test_follows_installs_into_a_pem_directory(
    tmp_path: Path, ca: TestAuthority, use_watchfiles: bool, layout: str
) -> None:
    writer = PemDirectoryStore(tmp_path, layout=layout)  # type: ignore[arg-type]
    observed = ObservedCertificate.of(URL)
    v1 = version()
    first = ca.issue(["web.example"])
    await writer.install(observed, first, v1)

    reader = PemDirectoryStore(tmp_path, layout=layout)  # type: ignore[arg-type]
    watcher = StoreWatcher([URL], store=reader, use_watchfiles=use_watchfiles, poll_interval=0.1)
    assert watcher.uses_watchfiles is use_watchfiles
    assert isinstance(watcher, CertificateFeed)
    seen: list[CertificateUpdated] = []
    watcher.subscribe(seen.append, CertificateUpdated, replay=True)
    async with watcher:
        current = watcher.current(URL)
        assert current is not None and (current.version, current.thumbprint) == (
            v1,
            first.thumbprint,
        )
        await next_event(seen, 1)
        assert (seen[0].version, seen[0].replayed) == (v1, True)

        v2 = version()
        second = ca.issue(["web.example"])
        await writer.install(observed, second, v2)
        await next_event(seen, 2)
        assert (seen[1].version, seen[1].previous_version, seen[1].replayed) == (v2, v1, False)
        assert seen[1].thumbprint == second.thumbprint
        material = await watcher.material(URL)
        assert material is not None and material.key_pem() == second.key_pem()
        assert watcher.current(URL) == await reader.installed(observed)
    assert len(seen) == 2


async def test_a_directory_that_appears_later_is_followed(
    tmp_path: Path, ca: TestAuthority
) -> None:
    directory = tmp_path / "later" / "certs"
    observed = ObservedCertificate.of(URL, store_location=str(directory))
    watcher = StoreWatcher([observed], store=PemDirectoryStore(tmp_path), use_watchfiles=True)
    seen: list[CertificateUpdated] = []
    watcher.subscribe(seen.append, CertificateUpdated)
    async with watcher:
        assert watcher.current(URL) is None
        writer = PemDirectoryStore(tmp_path)
        v1 = version()
        await writer.install(observed, ca.issue(["web.example"]), v1)
        await next_event(seen, 1)
        v2 = version()
        await writer.install(observed, ca.issue(["web.example"]), v2)
        await next_event(seen, 2)
    assert [e.version for e in seen] == [v1, v2]


@pytest.mark.parametrize("start", ["at entry", "when the directory appears"])
async def test_a_change_just_before_a_new_watch_starts_is_read_soon_after(
    tmp_path: Path, ca: TestAuthority, start: str
) -> None:
    directory = tmp_path / "later" / "certs"
    observed = ObservedCertificate.of(URL, store_location=str(directory))
    writer = PemDirectoryStore(tmp_path)
    v1, v2 = version(), version()
    raced: list[str] = []

    class Raced(PemDirectoryStore):
        async def installed(self, one: ObservedCertificate) -> InstalledCertificate | None:
            found = await super().installed(one)
            if found is not None and found.version == v1 and not raced:
                raced.append(v2)
                # The next version lands after this read and before the watch starts: no
                # notification will ever tell of it.
                await writer.install(observed, ca.issue(["web.example"]), v2)
            return found

    if start == "at entry":  # deterministic: the first watch starts after the entry's read
        await writer.install(observed, ca.issue(["web.example"]), v1)
    # The recheck would find it a minute later: the read after the watch starts must.
    watcher = StoreWatcher([observed], store=Raced(tmp_path), use_watchfiles=True)
    assert watcher.recheck_interval == 60
    seen: list[CertificateUpdated] = []
    watcher.subscribe(seen.append, CertificateUpdated)  # no replay: v1 at entry is not told
    async with watcher:
        if start == "at entry":
            await next_event(seen, 1, within=20)
        else:  # seen as the gap only when v1's read comes before the watch is rebuilt
            await writer.install(observed, ca.issue(["web.example"]), v1)
            await next_event(seen, 2, within=20)
    assert raced and [e.version for e in seen] == ([v2] if start == "at entry" else [v1, v2])


async def test_any_store_is_followed_by_polling(ca: TestAuthority) -> None:
    store = MemoryStore()
    observed = ObservedCertificate.of(URL)
    watcher = StoreWatcher([URL], store=store, poll_interval=0.05)
    assert not watcher.uses_watchfiles  # nothing to watch in memory
    async with watcher:
        stream = watcher.events(CertificateUpdated)
        v1 = version()
        await store.install(observed, ca.issue(["web.example"]), v1)
        with anyio.fail_after(10):
            event = await stream.__anext__()
    assert (event.version, event.previous_version) == (v1, None)
    assert "memory" in repr(watcher) or "MemoryStore" in repr(watcher)


async def test_a_damaged_install_is_not_announced_and_the_good_one_stays(
    tmp_path: Path, ca: TestAuthority
) -> None:
    writer = PemDirectoryStore(tmp_path)
    observed = ObservedCertificate.of(URL)
    v1 = version()
    await writer.install(observed, ca.issue(["web.example"]), v1)
    watcher = StoreWatcher([URL], store=PemDirectoryStore(tmp_path), poll_interval=0.05)
    seen: list[CertificateUpdated] = []
    watcher.subscribe(seen.append, CertificateUpdated)
    async with watcher:
        # Someone truncates the live file: it reads as nothing installed, no event, no crash.
        target = tmp_path / os.readlink(tmp_path / "demo.web")
        target.write_bytes(b"")
        changes = await watcher.check()
        assert changes == [] and watcher.current(URL) is None
        v2 = version()
        await writer.install(observed, ca.issue(["web.example"]), v2)
        await next_event(seen, 1)
    assert [e.version for e in seen] == [v2]


async def test_a_consumer_process_follows_what_the_agent_process_installs(
    kv: LocalKeyVault,
    agents: list[AgentProcess],
    tmp_path: Path,
) -> None:
    certs = tmp_path / "certs"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(settings_document(kv, ["web"], certs, interval=1)))
    agent = start_agent(agents, kv, tmp_path, str(settings))
    await agent.wait_phase("success")

    # The consumer starts after the agent installed: it knows the certificate at once.
    watcher = StoreWatcher([URL], store=PemDirectoryStore(certs))
    seen: list[CertificateUpdated] = []
    watcher.subscribe(seen.append, CertificateUpdated, replay=True)
    async with watcher:
        assert watcher.current(URL) is not None
        await next_event(seen, 1)
        assert seen[0].replayed and seen[0].version == kv.versions("demo", "web")[-1]
        rotated = kv.rotate("demo", "web")
        await next_event(seen, 2)
        material = await watcher.material(URL)
    assert (seen[1].version, seen[1].replayed) == (rotated, False)
    served = CertificateMaterial.from_secret(kv.secret("demo", "web").value, None)
    assert material is not None and material.thumbprint == served.thumbprint == seen[1].thumbprint


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A root-owned directory others can traverse (tmp_path's parents are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="kvcertsync-watch-", dir="/tmp"))
    try:
        base.chmod(0o711)
        yield base
    finally:
        shutil.rmtree(base)


def read_as(user: str, directory: Path, url: str) -> str:
    """Follow the store in a forked child that has become ``user``: what it reads, or why not.

    Forked rather than exec'd: the venv's interpreter may sit where ``user`` cannot reach it, and
    the child needs nothing from disk but the store (every module is imported already).
    """
    account = pwd.getpwnam(user)
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]

    async def consume() -> str:
        watcher = StoreWatcher([url], store=PemDirectoryStore(directory))
        async with watcher:
            current = watcher.current(url)
            material = await watcher.material(url)
        assert current is not None and material is not None
        return f"{current.version} {material.thumbprint}"

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to ``user`` for good, read, report, leave
        try:
            os.setgroups([account.pw_gid, *groups])
            os.setgid(account.pw_gid)
            os.setuid(account.pw_uid)
            answer = "ok " + anyio.run(consume)
        except BaseException as error:
            answer = "error " + "".join(traceback.format_exception(error))[-600:]
        os.write(write_end, answer.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    return answer


@as_root
@with_setfacl
@with_users
@with_switch
async def test_a_service_user_granted_by_acl_follows_roots_store(
    kv: LocalKeyVault,
    agents: list[AgentProcess],
    tmp_path: Path,
    shared_dir: Path,
) -> None:
    certs = shared_dir / "certs"
    document = settings_document(kv, ["web"], certs)
    document["secretsManagementSettings"]["aclEnabled"] = True
    document["secretsManagementSettings"]["observedCertificates"][0]["acls"] = [
        {"user": "www-data"}
    ]
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(document))
    agent = start_agent(agents, kv, tmp_path, str(settings))
    await agent.wait_phase("success")
    # The reader really is another user: it cannot read what the ACL does not grant.
    assert as_user("www-data", "cat", str(settings)).returncode != 0
    answer = await anyio.to_thread.run_sync(read_as, "www-data", certs, URL)
    served = CertificateMaterial.from_secret(kv.secret("demo", "web").value, None)
    assert answer == f"ok {kv.versions('demo', 'web')[-1]} {served.thumbprint}"
