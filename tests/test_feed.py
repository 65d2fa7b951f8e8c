"""What a service relies on: a restart knows its certificate, replay, material, typed events."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import pytest

from kvcertsync.emulator import TestAuthority
from kvcertsync.engine import CertSync
from kvcertsync.errors import StoreError
from kvcertsync.events import CertificateUpdated, Event, InitialSyncCompleted
from kvcertsync.feed import CertificateFeed
from kvcertsync.material import CertificateMaterial
from kvcertsync.sources import MemorySource
from kvcertsync.stores import (
    MemoryStore,
    PemDirectoryStore,
    ReadableStore,
    Store,
)
from tests.helpers.stores import WriteOnlyStore

pytestmark = pytest.mark.anyio

URL = "https://vault.vault.azure.net/secrets/web"
OTHER = "https://vault.vault.azure.net/secrets/api"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> TestAuthority:
    return TestAuthority()


@pytest.fixture(scope="module")
def first(ca: TestAuthority) -> CertificateMaterial:
    return ca.issue(["www.example.com"])


@pytest.fixture(scope="module")
def second(ca: TestAuthority) -> CertificateMaterial:
    return ca.issue(["www.example.com"])


def stores(tmp_path: Path) -> dict[str, Store]:
    return {
        "memory": MemoryStore(),
        "pem": PemDirectoryStore(tmp_path / "kvlinux"),
        "pem-split": PemDirectoryStore(tmp_path / "split", layout="split"),
    }


@pytest.mark.parametrize("kind", ["memory", "pem", "pem-split"])
async def test_a_restarted_engine_knows_its_certificate_and_tells_only_replay_subscribers(
    kind: str, tmp_path: Path, first: CertificateMaterial
) -> None:
    store = stores(tmp_path)[kind]
    source = MemorySource()
    version = source.set(URL, first)
    assert (await CertSync([URL], store=store, source=source).sync_once()).ok

    # The "restarted" process: same store, a fresh engine; the vault serves the same version.
    restarted = CertSync([URL], store=store, source=source, polling_interval=3600)
    plain: list[Event] = []
    restarted.subscribe(plain.append)
    early: list[CertificateUpdated] = []
    restarted.subscribe(early.append, CertificateUpdated, replay=True)
    assert restarted.current(URL) is None  # not running yet: nothing read
    async with restarted:
        current = restarted.current(URL)
        assert current is not None
        assert (current.version, current.thumbprint) == (version, first.thumbprint)
        late: list[CertificateUpdated] = []
        restarted.subscribe(late.append, CertificateUpdated, replay=True)
        stream = restarted.events(CertificateUpdated, replay=True)
        await restarted.wait_ready()
        streamed = await stream.__anext__()
    # One code path for start and renewal: both replay subscribers heard of the installed one.
    for seen in (early, late, [streamed]):
        assert [(e.version, e.replayed, e.previous_version) for e in seen] == [
            (version, True, None)
        ]
        assert seen[0].thumbprint == first.thumbprint
        assert seen[0].location == current.location
        assert "installed" in seen[0].describe()
    # A subscriber that did not ask for replay sees no change: nothing changed.
    assert not [e for e in plain if isinstance(e, CertificateUpdated)]
    assert [type(e) for e in plain] == [InitialSyncCompleted]


@pytest.mark.parametrize("kind", ["memory", "pem", "pem-split"])
async def test_material_reads_back_what_is_installed(
    kind: str, tmp_path: Path, first: CertificateMaterial, second: CertificateMaterial
) -> None:
    store = stores(tmp_path)[kind]
    assert isinstance(store, ReadableStore)
    source = MemorySource()
    sync = CertSync([URL], store=store, source=source)
    await sync.sync_once()
    assert await sync.material(URL) is None  # nothing in the vault: nothing installed
    source.set(URL, first)
    await sync.sync_once()
    got = await sync.material(URL)
    assert got is not None
    assert got.thumbprint == first.thumbprint
    assert got.key_pem() == first.key_pem()
    assert got.fullchain_pem() == first.fullchain_pem()
    source.set(URL, second)
    await sync.sync_once()
    renewed = await sync.material(URL)
    assert renewed is not None and renewed.thumbprint == second.thumbprint
    current = sync.current(URL)
    assert current is not None and current.thumbprint == second.thumbprint


async def test_material_names_a_store_that_cannot_give_it(first: CertificateMaterial) -> None:
    source = MemorySource()
    source.set(URL, first)
    sync = CertSync([URL], store=WriteOnlyStore(), source=source)
    await sync.sync_once()
    with pytest.raises(StoreError, match=r"WriteOnlyStore\(\) cannot give installed"):
        await sync.material(URL)
    with pytest.raises(KeyError, match="is not observed"):
        sync.current(OTHER)


async def test_replay_then_renewals_in_one_callback(
    first: CertificateMaterial, second: CertificateMaterial
) -> None:
    source = MemorySource()
    v1 = source.set(URL, first)
    sync = CertSync([URL], store=MemoryStore(), source=source, polling_interval=3600)
    async with sync:
        await sync.wait_ready()
        seen: list[tuple[str, bool]] = []
        sync.subscribe(
            lambda e: seen.append((e.version, e.replayed)), CertificateUpdated, replay=True
        )
        v2 = source.set(URL, second)
        await sync.refresh(URL)
        with anyio.fail_after(10):
            while len(seen) < 2:  # noqa: ASYNC110 - plain state
                await anyio.sleep(0.01)
    assert seen == [(v1, True), (v2, False)]


async def test_wait_ready_returns_after_callbacks_handled_the_initial_events(
    first: CertificateMaterial,
) -> None:
    source = MemorySource()
    source.set(URL, first)
    source.set(OTHER, first)
    sync = CertSync([URL, OTHER], store=MemoryStore(), source=source)
    handled_async: list[str] = []
    handled_sync: list[str] = []
    threads: set[int] = set()

    async def slow_async(event: CertificateUpdated) -> None:
        await anyio.sleep(0.3)
        handled_async.append(str(event.uri))

    def slow_sync(event: CertificateUpdated) -> None:
        threads.add(threading.get_ident())
        time.sleep(0.3)
        handled_sync.append(str(event.uri))

    sync.subscribe(slow_async, CertificateUpdated)
    sync.subscribe(slow_sync, CertificateUpdated)
    async with sync:
        await sync.wait_ready()
        # Asserted right after wait_ready: no waiting here, that is the guarantee.
        assert sorted(handled_async) == sorted([URL, OTHER])
        assert sorted(handled_sync) == sorted([URL, OTHER])
    # Plain callbacks run in a worker thread, never on the loop's.
    assert threading.get_ident() not in threads


async def test_wait_ready_does_not_wait_past_a_hook_timeout(first: CertificateMaterial) -> None:
    source = MemorySource()
    source.set(URL, first)
    sync = CertSync([URL], store=MemoryStore(), source=source, hook_timeout=0.2)

    async def hangs(event: CertificateUpdated) -> None:
        await anyio.sleep_forever()

    sync.subscribe(hangs, CertificateUpdated)
    async with sync:
        with anyio.fail_after(20):  # a safety net, not the assertion
            await sync.wait_ready()
    assert sync.stats().events.failures == 1


def test_certsync_is_a_certificate_feed(first: CertificateMaterial) -> None:
    sync = CertSync([URL], store=MemoryStore(), source=MemorySource())
    assert isinstance(sync, CertificateFeed)


TYPED = """
from kvcertsync.engine import CertSync
from kvcertsync.events import CertificateUpdated, SyncFailed
from kvcertsync.feed import CertificateFeed


async def follow(sync: CertSync) -> str:
    feed: CertificateFeed = sync
    feed.subscribe(on_update, CertificateUpdated, replay=True)
    async for event in sync.events(CertificateUpdated, replay=True):
        return event.thumbprint
    return ""


def on_update(event: CertificateUpdated) -> None:
    print(event.thumbprint, event.replayed)


def on_failure(event: SyncFailed) -> None:
    print(event.attempt)


def wrong(sync: CertSync) -> None:
    sync.subscribe(on_failure, CertificateUpdated)
"""


def test_events_and_subscribe_are_typed_for_mypy_strict(tmp_path: Path) -> None:
    sample = tmp_path / "typed_sample.py"
    sample.write_text(TYPED)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", str(sample)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in result.stdout.splitlines() if ": error:" in line]
    # Exactly one error: the SyncFailed callback subscribed to CertificateUpdated.
    assert len(errors) == 1, result.stdout + result.stderr
    line = TYPED.splitlines().index("    sync.subscribe(on_failure, CertificateUpdated)") + 1
    assert f"{sample.name}:{line}: error:" in errors[0] and "SyncFailed" in errors[0], errors
