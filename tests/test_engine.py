"""CertSync against MemorySource and MemoryStore, with a hand-driven clock where time matters."""

from __future__ import annotations

import itertools
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from kvcertsync.clock import FakeClock
from kvcertsync.emulator import TestAuthority
from kvcertsync.engine import CertSync, InitialSyncError, Outcome
from kvcertsync.errors import (
    AccessDenied,
    MaterialError,
    SecretNotFound,
    Throttled,
    TransientSourceError,
)
from kvcertsync.events import (
    CertificateExpiring,
    CertificateUpdated,
    Event,
    InitialSyncCompleted,
    SyncFailed,
    SyncRecovered,
)
from kvcertsync.limits import RetryPolicy, VaultLimiter
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.sources import MemorySource, SecretVersion
from kvcertsync.stores import InstalledCertificate, MemoryStore
from kvcertsync.uri import SecretUri

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> TestAuthority:
    return TestAuthority()


@pytest.fixture(scope="module")
def material(ca: TestAuthority) -> CertificateMaterial:
    return ca.issue(["www.example.com"])


def urls(count: int, vaults: int = 1, prefix: str = "cert") -> list[str]:
    return [f"https://vault{i % vaults}a.vault.azure.net/secrets/{prefix}{i}" for i in range(count)]


def collect(sync: CertSync, *types: type[Event]) -> list[Event]:
    seen: list[Event] = []
    sync.subscribe(seen.append, *types)
    return seen


async def drive(
    clock: FakeClock, done: Callable[[], bool], step: float = 0.05, limit: float = 600
) -> None:
    """Advance the fake clock in small steps until ``done()``; fail if it never happens."""
    elapsed = 0.0
    while not done():
        if elapsed > limit:
            raise AssertionError(f"condition not reached after {limit} fake seconds")
        await clock.advance(step)
        elapsed += step
        # Parsing runs in worker threads that the fake clock cannot see: give them real time.
        await anyio.sleep(0.0001)


async def settle(done: Callable[[], bool], seconds: float = 10) -> None:
    """Wait in real time (bounded) for ``done()``: a safety net, never the assertion."""
    with anyio.fail_after(seconds):
        while not done():  # noqa: ASYNC110 - conditions on plain state, nothing to wait on
            await anyio.sleep(0.005)


# ------------------------------------------------------------------------- limits


async def test_concurrency_cap_is_never_exceeded(material: CertificateMaterial) -> None:
    source = MemorySource(latency=0.01)
    for url in urls(60, vaults=3):
        source.set(url, material)
    sync = CertSync(
        urls(60, vaults=3), store=MemoryStore(), source=source, max_concurrency=4, rate_limit=10_000
    )
    report = await sync.sync_once()
    assert len(report.updated) == 60
    assert source.max_in_flight == 4


async def test_polls_run_on_at_most_max_concurrency_long_lived_tasks(
    material: CertificateMaterial,
) -> None:
    class TaskRecordingSource(MemorySource):
        tasks: set[int] = set()

        async def get(self, uri: SecretUri) -> SecretVersion:
            self.tasks.add(anyio.get_current_task().id)
            return await super().get(uri)

    source = TaskRecordingSource(latency=0.001)
    for url in urls(60, vaults=3):
        source.set(url, material)
    sync = CertSync(
        urls(60, vaults=3), store=MemoryStore(), source=source, max_concurrency=4, rate_limit=10_000
    )
    for _ in range(3):
        report = await sync.sync_once()
        assert report.ok and len(report.results) == 60
    # Not a task per poll (180 of them): each pass's four runners take poll after poll.
    assert len(source.tasks) <= 3 * 4


async def test_per_vault_rate_is_never_exceeded(material: CertificateMaterial) -> None:
    clock = FakeClock()
    source = MemorySource()
    calls: list[tuple[float, str]] = []
    source.observe(lambda uri: calls.append((clock.now(), uri.vault_name)))
    targets = urls(120, vaults=2)
    for url in targets:
        source.set(url, material)
    sync = CertSync(
        targets, store=MemoryStore(), source=source, rate_limit=10, rate_burst=5, clock=clock
    )
    reports = []

    async def run() -> None:
        reports.append(await sync.sync_once())

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await drive(clock, lambda: bool(reports))
    assert len(reports[0].updated) == 120
    for vault in ("vault0a", "vault1a"):
        times = sorted(t for t, v in calls if v == vault)
        assert len(times) == 60
        # Token bucket: in any window of w seconds at most burst + rate * w requests.
        for i, start in enumerate(times):
            in_window = [t for t in times[i:] if t - start <= 1.0]
            assert len(in_window) <= 5 + 10 * 1.0
        # And it does not crawl either: 55 requests after the burst need ~5.5 s.
        assert times[-1] - times[0] == pytest.approx(5.5, abs=0.2)


async def test_throttled_vault_does_not_slow_another(material: CertificateMaterial) -> None:
    clock = FakeClock()
    source = MemorySource()
    slow, fast = urls(10, prefix="slow"), [u.replace("vault0a", "other") for u in urls(10)]
    for url in slow + fast:
        source.set(url, material)
    # Every poll of the slow vault meets the 429: the dispatcher does not yield between polls
    # while slots and tokens are free, so all ten are in flight before the first answer, as
    # requests to a real vault are.
    source.fail(Throttled("429", retry_after=30), vault="vault0a.vault.azure.net", times=10)
    sync = CertSync(slow + fast, store=MemoryStore(), source=source, clock=clock)
    updated = collect(sync, CertificateUpdated)
    async with sync:
        await drive(clock, lambda: len(updated) >= 10, limit=2)
        assert {str(e.uri) for e in updated} == {str(SecretUri.parse(u)) for u in fast}
        assert sync.limiter("vault0a.vault.azure.net").paused_until >= 30
        assert sync.limiter("other.vault.azure.net").paused_until < 0
        # Then one request per pause, the rate doubling back: the ten follow within minutes.
        await drive(clock, lambda: len(updated) == 20, limit=600)
        assert clock.now() >= 30


async def test_backoff_honours_retry_after_then_full_jitter(material: CertificateMaterial) -> None:
    clock = FakeClock()
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, material)
    source.fail(Throttled("429", retry_after=7), uri=url)
    source.fail(TransientSourceError("503"), uri=url, times=3)
    policy = RetryPolicy(initial=2, maximum=5)
    sync = CertSync(
        [url], store=MemoryStore(), source=source, clock=clock, retry=policy, rng=random.Random(1)
    )
    failures = collect(sync, SyncFailed)
    updated = collect(sync, CertificateUpdated)
    async with sync:
        await drive(clock, lambda: bool(updated), step=0.25)
    assert [type(f.error) for f in failures] == [Throttled] + [TransientSourceError] * 3
    assert [f.attempt for f in failures] == [1, 2, 3, 4]
    # The server's 7 s, never less, jittered on top by up to max(1 s, 20 %): 8.4 s.
    assert failures[0].retry_in is not None and 7 <= failures[0].retry_in <= 7 * 1.2
    for failure in failures[1:]:
        assert failure.retry_in is not None
        assert 0 <= failure.retry_in <= policy.ceiling(failure.attempt)
    assert policy.ceiling(2) == 4 and policy.ceiling(3) == 5


async def test_backoff_never_waits_longer_than_the_polling_interval(
    material: CertificateMaterial,
) -> None:
    clock = FakeClock()
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, material)
    source.fail(TransientSourceError("503"), uri=url, times=12)
    sync = CertSync(
        [url], store=MemoryStore(), source=source, clock=clock, polling_interval=2, jitter=0
    )
    failures = collect(sync, SyncFailed)
    updated = collect(sync, CertificateUpdated)
    async with sync:
        await drive(clock, lambda: bool(updated), step=0.1)
    # The default policy would reach 300 s by the tenth attempt: capped at the 2 s interval.
    assert len(failures) == 12
    assert max(f.retry_in or 0 for f in failures) <= 2
    assert sync.retry.ceiling(10) == 300


async def test_throttle_ladder_pauses_halves_and_recovers() -> None:
    clock = FakeClock()
    limiter = VaultLimiter(clock, rate=100, burst=10, recovery=600)
    pauses = []
    for _ in range(6):
        pauses.append(limiter.throttled(None))
        await clock.advance(pauses[-1])
    assert pauses == [1, 2, 4, 8, 16, 16]
    limiter.succeeded()
    assert limiter.throttled(None) == 1
    # Answers to requests already in flight are the same episode: no new halving, no new step.
    assert limiter.throttled(None) == 1
    assert limiter.throttled(3.5) == 3.5
    assert limiter.throttles == 7
    assert limiter.rate < 100 / 2**6
    assert not limiter.try_take()
    assert limiter.delay() >= 3.5


async def test_rate_falls_to_one_request_per_pause_then_doubles_back() -> None:
    clock = FakeClock()
    limiter = VaultLimiter(clock, rate=100, burst=10, recovery=60)
    limiter.throttled(2)
    # Not half of 100: the certificates that waited out the pause would all go at once.
    assert limiter.rate == 0.5
    await clock.advance(2 + 60)
    assert limiter.rate == pytest.approx(1.0)
    await clock.advance(60)
    assert limiter.rate == pytest.approx(2.0)
    await clock.advance(60 * 6)
    assert limiter.rate == 100


async def test_after_a_pause_one_request_goes_at_once_and_each_served_doubles_the_rate() -> None:
    clock = FakeClock()
    limiter = VaultLimiter(clock, rate=100, burst=10)
    pause = limiter.throttled(10)
    assert limiter.rate == pytest.approx(0.1)
    assert limiter.delay() == pytest.approx(pause)
    await clock.advance(pause)
    # The probe: no waiting a whole token's time (10 s at 0.1/s) before it.
    assert limiter.delay() == 0 and limiter.try_take()
    assert limiter.delay() == pytest.approx(10.0)
    limiter.succeeded()
    assert limiter.rate == pytest.approx(0.2)
    rates = []
    for _ in range(9):
        limiter.succeeded()
        rates.append(limiter.rate)
    assert rates[:3] == pytest.approx([0.4, 0.8, 1.6])
    assert rates[-1] == 100  # back to the configured rate, not beyond


async def test_a_request_sent_before_the_pause_does_not_raise_the_rate() -> None:
    clock = FakeClock()
    limiter = VaultLimiter(clock, rate=100, burst=10)
    limiter.throttled(10)
    limiter.succeeded()  # answered while paused: in flight when the vault began throttling
    assert limiter.rate == pytest.approx(0.1)


async def test_a_fleet_halves_down_to_one_request_a_minute() -> None:
    clock = FakeClock()
    limiter = VaultLimiter(clock, rate=100, burst=10)
    rates = []
    for _ in range(8):
        await clock.advance(limiter.throttled(1))
        rates.append(limiter.rate)
    assert rates[:3] == [1.0, 0.5, 0.25]
    assert rates[-1] == pytest.approx(1 / 60)


# ------------------------------------------------------------------------- change detection


async def test_one_pass_over_a_thousand_urls(ca: TestAuthority) -> None:
    source = MemorySource()
    pool = [ca.issue([f"host{i}.example"]) for i in range(10)]
    targets = urls(1000, vaults=4)
    for i, url in enumerate(targets):
        source.set(url, pool[i % 10])
    store = MemoryStore()
    sync = CertSync(targets, store=store, source=source, rate_limit=100_000)
    report = await sync.sync_once()
    assert len(report.updated) == 1000 and report.ok
    assert store.installs == 1000
    assert all(store.current(SecretUri.parse(u)) for u in targets)


async def test_exactly_one_update_per_new_version(ca: TestAuthority) -> None:
    source = MemorySource()
    url = urls(1)[0]
    first = source.set(url, ca.issue(["a.example"]))
    sync = CertSync([url], store=MemoryStore(), source=source)
    updates = collect(sync, CertificateUpdated)
    for _ in range(3):
        await sync.sync_once()
    second = source.rotate(url, ca.issue(["a.example"]))
    for _ in range(3):
        await sync.sync_once()
    assert [(e.previous_version, e.version) for e in updates] == [(None, first), (first, second)]


async def test_restart_with_prefilled_store_emits_nothing(material: CertificateMaterial) -> None:
    source = MemorySource()
    targets = urls(5)
    for url in targets:
        source.set(url, material)
    store = MemoryStore()
    await CertSync(targets, store=store, source=source).sync_once()
    restarted = CertSync(targets, store=store, source=source)
    events = collect(restarted)
    async with restarted:
        await restarted.wait_ready()
    assert store.installs == 5
    assert [type(e) for e in events] == [InitialSyncCompleted]
    assert events[0].count == 5  # type: ignore[attr-defined]


async def test_failures_keep_the_last_good_certificate(material: CertificateMaterial) -> None:
    source = MemorySource()
    url = urls(1)[0]
    good = source.set(url, material)
    store = MemoryStore()
    sync = CertSync([url], store=store, source=source)
    failures = collect(sync, SyncFailed)
    uri = SecretUri.parse(url)
    await sync.sync_once()

    source.rotate(url, "definitely not a certificate", "application/x-pkcs12")
    source.fail(TransientSourceError("503 from the vault"), uri=url)
    report = await sync.sync_once()
    assert isinstance(report.errors[uri], TransientSourceError)
    report = await sync.sync_once()
    assert isinstance(report.errors[uri], MaterialError)
    source.delete(url)
    report = await sync.sync_once()
    assert isinstance(report.errors[uri], SecretNotFound)

    assert [r.version for r in store.history(uri)] == [good]
    assert [type(f.error) for f in failures] == [
        TransientSourceError,
        MaterialError,
        SecretNotFound,
    ]
    assert "definitely" not in repr(failures[1]) and "definitely" not in str(failures[1].error)


async def test_disabled_or_not_yet_valid_versions_are_not_installed(
    material: CertificateMaterial,
) -> None:
    clock = FakeClock()
    source = MemorySource()
    a, b = urls(2)
    source.set(a, material)
    source.disable(a)
    source.set(b, material, not_before=clock.utcnow() + timedelta(hours=1))
    store = MemoryStore()
    sync = CertSync([a, b], store=store, source=source, clock=clock)
    report = await sync.sync_once()
    errors = {str(k): v for k, v in report.errors.items()}
    assert isinstance(errors[a], AccessDenied) and errors[a].code == "SecretDisabled"
    assert isinstance(errors[b], AccessDenied) and "not valid before" in str(errors[b])
    assert store.installs == 0


# ------------------------------------------------------------------------- scheduling


async def test_polls_stay_on_their_interval_grid(material: CertificateMaterial) -> None:
    clock = FakeClock()
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, material)
    calls: list[float] = []
    source.observe(lambda uri: calls.append(clock.now()))
    sync = CertSync(
        [url], store=MemoryStore(), source=source, clock=clock, polling_interval=100, jitter=0.1
    )
    async with sync:
        await sync.wait_ready()  # in real time: the fake clock stays at 0 until the install
        await drive(clock, lambda: len(calls) >= 8, step=1, limit=2000)
    assert calls[0] == 0
    assert 100 <= calls[1] < 110
    gaps = [b - a for a, b in itertools.pairwise(calls[1:])]
    assert gaps == pytest.approx([100] * len(gaps), abs=1.01)  # only the step size, no drift
    assert calls[-1] - calls[1] == pytest.approx(100 * (len(calls) - 2), abs=1.01)


def recorded_sync(
    material: CertificateMaterial, clock: FakeClock, count: int, **options: Any
) -> tuple[CertSync, list[float]]:
    """A CertSync of ``count`` URLs whose source records the fake time of every read."""
    source = MemorySource()
    targets = urls(count)
    for url in targets:
        source.set(url, material)
    seconds: list[float] = []
    source.observe(lambda uri: seconds.append(clock.now()))
    options.setdefault("rate_limit", 10_000)
    sync = CertSync(targets, store=MemoryStore(), source=source, clock=clock, **options)
    return sync, seconds


async def test_jitter_spreads_the_phases(material: CertificateMaterial) -> None:
    clock = FakeClock()
    sync, seconds = recorded_sync(material, clock, 50, polling_interval=1000, jitter=0.2)
    async with sync:
        await sync.wait_ready()
        await drive(clock, lambda: len(seconds) >= 100, step=1, limit=1300)
    later = seconds[50:]  # the first 50 are the initial polls, all at once
    assert max(seconds[:50]) == 0
    assert min(later) >= 1000 and max(later) <= 1201
    assert len({int(s // 20) for s in later}) >= 5  # not one burst


async def test_start_splay_spreads_the_first_polls_and_ready_waits_for_them(
    material: CertificateMaterial,
) -> None:
    clock = FakeClock()
    sync, seconds = recorded_sync(material, clock, 50, start_splay=100)
    async with sync:
        await drive(clock, lambda: len(seconds) >= 50, step=1, limit=200)
        await sync.wait_ready()
    assert min(seconds) >= 0 and max(seconds) <= 101
    assert max(seconds) > 50  # ready only once the last, late one is in place
    assert len({int(s // 10) for s in seconds}) >= 7  # spread over the splay, not one burst


async def test_without_a_splay_every_first_poll_goes_at_once_and_sync_once_never_waits(
    material: CertificateMaterial,
) -> None:
    clock = FakeClock()
    sync, seconds = recorded_sync(material, clock, 20)
    async with sync:
        await drive(clock, lambda: len(seconds) >= 20)
        await sync.wait_ready()
    assert max(seconds) == 0
    # The splay is for a background run's start: a pass asked for now runs now.
    splayed, seconds = recorded_sync(material, clock, 20, start_splay=3600)
    with anyio.fail_after(10):  # nobody advances the fake clock: a splayed pass would hang
        report = await splayed.sync_once()
    assert len(report.updated) == 20 and len(seconds) == 20


@pytest.mark.parametrize("splay", [-1.0, math.inf, math.nan])
def test_start_splay_must_be_finite_and_not_negative(splay: float) -> None:
    with pytest.raises(ValueError, match="start_splay"):
        CertSync(urls(1), store=MemoryStore(), source=MemorySource(), start_splay=splay)


async def test_non_retryable_errors_wait_for_the_interval(material: CertificateMaterial) -> None:
    clock = FakeClock()
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, material)
    sync = CertSync(
        [url], store=MemoryStore(), source=source, clock=clock, polling_interval=600, jitter=0
    )
    failures = collect(sync, SyncFailed)
    async with sync:
        await sync.wait_ready()
        source.fail(AccessDenied("403", code="ForbiddenByRbac"), uri=url)
        source.fail(TransientSourceError("reset"), uri=url)
        await drive(clock, lambda: len(failures) >= 2, step=5, limit=1300)
    assert failures[0].retry_in == pytest.approx(600, abs=5)
    assert failures[1].retry_in is not None and failures[1].retry_in <= RetryPolicy().ceiling(2)


async def test_refresh_polls_now_and_update_observed_changes_the_set(ca: TestAuthority) -> None:
    clock = FakeClock()
    source = MemorySource()
    a, b = urls(2)
    for url in (a, b):
        source.set(url, ca.issue(["x.example"]))
    store = MemoryStore()
    sync = CertSync([a], store=store, source=source, clock=clock, polling_interval=3600)
    async with sync:
        await sync.wait_ready()
        new = source.rotate(a, ca.issue(["x.example"]))
        report = await sync.refresh(a)
        assert report.updated[0].installed is not None
        assert report.updated[0].installed.version == new
        added, removed = sync.update_observed([b])
        assert [str(u) for u in added] == [b] and [str(u) for u in removed] == [a]
        await settle(lambda: store.current(SecretUri.parse(b)) is not None)
        with pytest.raises(KeyError):
            await sync.refresh(a)
    assert [o.uri for o in sync.observed] == [SecretUri.parse(b)]


async def test_states_say_where_each_certificate_stands_and_recovery_is_announced(
    ca: TestAuthority,
) -> None:
    clock = FakeClock()
    source = MemorySource()
    a, b = urls(2)
    source.set(a, ca.issue(["a.example"]))
    sync = CertSync([a, b], store=MemoryStore(), source=source, clock=clock, polling_interval=60)
    seen = collect(sync, SyncRecovered)
    before = sync.states()
    assert [s.installed for s in before] == [None, None] and not any(s.current for s in before)
    async with sync:
        await drive(clock, lambda: sync.states()[1].failures >= 1 and sync.states()[0].current)
        first, second = sync.states()
        assert first.current and first.installed is not None and first.error is None
        assert first.last_success is not None and first.failures == 0
        assert second.installed is None and not second.current
        assert second.error is not None and second.error.startswith("SecretNotFound: ")
        assert sync.initial_sync_done == 1
        source.set(b, ca.issue(["b.example"]))
        await drive(clock, lambda: sync.states()[1].current, step=1)
        assert sync.states()[1].error is None and sync.initial_sync_done == 2
        await settle(lambda: bool(seen))  # delivered by the bus's own task, maybe not yet
        assert len(seen) == 1 and isinstance(seen[0], SyncRecovered)
        assert str(seen[0].uri) == b and seen[0].failures >= 1
        assert seen[0].describe().startswith(f"recovered {b} after ")


async def test_set_polling_interval_reschedules_waiting_polls(ca: TestAuthority) -> None:
    clock = FakeClock()
    source = MemorySource()
    (a,) = urls(1)
    source.set(a, ca.issue(["a.example"]))
    polls: list[float] = []
    source.observe(lambda uri: polls.append(clock.now()))
    sync = CertSync([a], store=MemoryStore(), source=source, clock=clock, polling_interval=3600)
    async with sync:
        await sync.wait_ready()
        sync.set_polling_interval(10)
        await drive(clock, lambda: len(polls) >= 3, step=1, limit=60)
        # Without the change the second poll would be an hour away.
        assert polls[2] - polls[0] <= 2 * 10 + 1
        with pytest.raises(ValueError, match="positive"):
            sync.set_polling_interval(0)
    assert sync.polling_interval == 10


# ------------------------------------------------------------------------- initial sync


async def test_required_initial_sync_retries_until_the_secret_exists(
    material: CertificateMaterial,
) -> None:
    clock = FakeClock()
    source = MemorySource()
    a, b = urls(2)
    source.set(a, material)
    sync = CertSync(
        [a, b],
        store=MemoryStore(),
        source=source,
        clock=clock,
        retry=RetryPolicy(initial=1, maximum=4),
    )
    ready = collect(sync, InitialSyncCompleted)
    async with sync:
        await drive(clock, lambda: sync.limiter("vault0a.vault.azure.net") is not None, limit=1)
        await clock.advance(30)
        assert not ready  # b does not exist yet; not-found is retried on backoff, not hourly
        source.set(b, material)
        await drive(clock, lambda: bool(ready), step=0.5, limit=10)
        await sync.wait_ready()
    assert ready[0].count == 2  # type: ignore[attr-defined]


async def test_initial_sync_attempts_bound_the_wait(material: CertificateMaterial) -> None:
    clock = FakeClock()
    source = MemorySource()
    a, b = urls(2)
    source.set(a, material)
    sync = CertSync(
        [a, b],
        store=MemoryStore(),
        source=source,
        clock=clock,
        initial_sync_attempts=3,
        retry=RetryPolicy(initial=1, maximum=2),
    )
    failures = collect(sync, SyncFailed)
    async with sync:
        await drive(clock, lambda: len(failures) >= 3, step=0.5)
        with pytest.raises(InitialSyncError, match="secrets/cert1"):
            await sync.wait_ready()
    assert [f.attempt for f in failures[:3]] == [1, 2, 3]


async def test_optional_initial_sync_is_ready_after_one_attempt(
    material: CertificateMaterial,
) -> None:
    source = MemorySource()
    a, b = urls(2)
    source.set(a, material)
    sync = CertSync([a, b], store=MemoryStore(), source=source, require_initial_sync=False)
    ready = collect(sync, InitialSyncCompleted)
    async with sync:
        with anyio.fail_after(10):
            await sync.wait_ready()
    assert ready[0].count == 1  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- expiry and hooks


async def test_expiring_certificate_warns_once_per_version_per_day(ca: TestAuthority) -> None:
    clock = FakeClock(wall=datetime.now(UTC))
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, ca.issue(["soon.example"], not_after=clock.utcnow() + timedelta(days=5)))
    sync = CertSync(
        [url],
        store=MemoryStore(),
        source=source,
        clock=clock,
        polling_interval=3600,
        jitter=0,
        expiry_warning=timedelta(days=14),
    )
    warnings = collect(sync, CertificateExpiring)
    async with sync:
        await drive(clock, lambda: bool(warnings), limit=60)  # the first poll's, not an hour on
        await drive(clock, lambda: clock.now() >= 20 * 3600, step=600, limit=21 * 3600)
        assert len(warnings) == 1  # 20 polls, one warning
        await drive(clock, lambda: len(warnings) == 2, step=600, limit=5 * 3600)
    first, second = warnings
    # Judged by the polls' own fake time: delivery (a worker thread) may lag drive()'s steps.
    assert timedelta(days=5) - first.remaining < timedelta(minutes=1)  # type: ignore[attr-defined]
    gap = first.remaining - second.remaining  # type: ignore[attr-defined]
    assert timedelta(hours=24) <= gap <= timedelta(hours=25)


async def test_hooks_that_raise_or_hang_do_not_stop_sync(
    ca: TestAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, ca.issue(["h.example"]))
    sync = CertSync([url], store=MemoryStore(), source=source, hook_timeout=0.2)

    def explode(event: Event) -> None:
        raise RuntimeError("hook bug")

    async def hang(event: Event) -> None:
        await anyio.sleep_forever()

    bad = sync.subscribe(explode)
    stuck = sync.subscribe(hang)
    good: list[Event] = []

    async def record(event: Event) -> None:
        good.append(event)  # on the loop: a worker thread might not start within 0.2 s

    sync.subscribe(record, CertificateUpdated)
    with caplog.at_level(logging.WARNING):
        async with sync:
            await sync.wait_ready()
            source.rotate(url, ca.issue(["h.example"]))
            await sync.refresh()
            await settle(lambda: len(good) == 2 and bad.failures >= 2 and stuck.failures >= 1)
    assert "hook bug" in caplog.text or "explode" in caplog.text


# ------------------------------------------------------------------------- shutdown


async def test_shutdown_is_prompt_and_finishes_installs(material: CertificateMaterial) -> None:
    source = MemorySource()
    fast, slow = urls(2)
    source.set(fast, material)
    source.set(slow, material)
    started = anyio.Event()

    class SlowStore(MemoryStore):
        async def install(
            self, observed: ObservedCertificate, material: CertificateMaterial, version: str
        ) -> InstalledCertificate:
            if observed.uri == SecretUri.parse(slow):
                started.set()
                await anyio.sleep(0.3)
            return await super().install(observed, material, version)

    class HangingSource(MemorySource):
        async def get(self, uri: SecretUri) -> object:  # type: ignore[override]
            if started.is_set() and uri == SecretUri.parse(fast):
                await anyio.sleep_forever()
            return await super().get(uri)

    hanging = HangingSource()
    hanging._secrets = source._secrets
    store = SlowStore()
    sync = CertSync([slow], store=store, source=hanging)
    with anyio.fail_after(5):
        async with sync:
            await started.wait()
    assert store.current(SecretUri.parse(slow)) is not None  # the install ran to the end
    assert hanging.closed


async def test_shutdown_cancels_a_hanging_fetch(material: CertificateMaterial) -> None:
    source = MemorySource(latency=3600)
    url = urls(1)[0]
    source.set(url, material)
    sync = CertSync([url], store=MemoryStore(), source=source)
    with anyio.fail_after(5):
        async with sync:
            await settle(lambda: source.in_flight == 1)
    assert source.in_flight == 0 and source.closed


async def test_events_iterator_sees_every_kind(ca: TestAuthority) -> None:
    source = MemorySource()
    a, b = urls(2)
    source.set(a, ca.issue(["i.example"]))
    seen: Counter[str] = Counter()
    sync = CertSync([a, b], store=MemoryStore(), source=source, require_initial_sync=False)
    async with sync:
        stream = sync.events()
        with anyio.fail_after(10):
            async for event in stream:
                seen[type(event).__name__] += 1
                if isinstance(event, InitialSyncCompleted):
                    break
    assert seen == {"CertificateUpdated": 1, "SyncFailed": 1, "InitialSyncCompleted": 1}


def test_constructor_validates_options(material: CertificateMaterial) -> None:
    source, store = MemorySource(), MemoryStore()
    with pytest.raises(ValueError, match="observed twice"):
        CertSync(
            [urls(1)[0], urls(1)[0].upper().replace("HTTPS", "https")], store=store, source=source
        )
    for bad in ({"polling_interval": 0}, {"max_concurrency": 0}, {"rate_limit": 0}, {"jitter": 2}):
        with pytest.raises(ValueError):
            CertSync(urls(1), store=store, source=source, **bad)  # type: ignore[arg-type]


def test_report_outcomes() -> None:
    assert {o.value for o in Outcome} == {"updated", "unchanged", "failed"}


async def test_event_iterator_outlives_one_off_passes(ca: TestAuthority) -> None:
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, ca.issue(["p.example"]))
    sync = CertSync([url], store=MemoryStore(), source=source)
    stream = sync.events(CertificateUpdated)
    await sync.sync_once()
    source.rotate(url, ca.issue(["p.example"]))
    await sync.sync_once()
    await sync.aclose()
    received = [event async for event in stream]
    assert len(received) == 2
    assert source.closed


# ------------------------------------------------------------------------- regressions from review


async def test_concurrent_one_off_passes_take_turns(material: CertificateMaterial) -> None:
    source = MemorySource(latency=0.05)
    targets = urls(3)
    for url in targets:
        source.set(url, material)
    sync = CertSync(targets, store=MemoryStore(), source=source)
    reports = []

    async def one() -> None:
        reports.append(await sync.sync_once())

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            tg.start_soon(one)
    outcomes = sorted(tuple(r.outcome.value for r in rep.results) for rep in reports)
    assert outcomes == [("unchanged",) * 3, ("updated",) * 3]
    assert source.max_in_flight <= 3


async def test_waiters_are_answered_when_their_url_is_removed_mid_poll(
    material: CertificateMaterial,
) -> None:
    source = MemorySource(latency=0.2)
    a, b = urls(2)
    source.set(a, material)
    source.set(b, material)
    sync = CertSync([a, b], store=MemoryStore(), source=source)
    async with sync:
        await sync.wait_ready()
        reports = []

        async def poll_a() -> None:
            reports.append(await sync.refresh(a))

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(poll_a)
                await settle(lambda: source.in_flight == 1)
                sync.update_observed([b])
    # The poll that was running completes and answers; nothing waits forever.
    assert len(reports) == 1 and len(reports[0].results) == 1


async def test_waiters_are_answered_when_the_engine_stops(material: CertificateMaterial) -> None:
    source = MemorySource(latency=3600)
    url = urls(1)[0]
    source.set(url, material)
    sync = CertSync([url], store=MemoryStore(), source=source)
    reports = []

    async def poll() -> None:
        reports.append(await sync.refresh())

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, sync:
            tg.start_soon(poll)
            await settle(lambda: source.in_flight == 1)
    assert "stopped" in str(reports[0].failed[0].error)


async def test_body_exceptions_are_not_wrapped_and_quick_exit_is_clean(
    material: CertificateMaterial,
) -> None:
    source = MemorySource()
    source.set(urls(1)[0], material)
    sync = CertSync(urls(1), store=MemoryStore(), source=source)
    with pytest.raises(ValueError, match="user error"):
        async with sync:
            raise ValueError("user error")
    async with sync:  # leaving before any task ran, and re-entering after exit
        pass


async def test_a_slow_vault_does_not_starve_a_healthy_one(material: CertificateMaterial) -> None:
    class SlowVault(MemorySource):
        async def get(self, uri: SecretUri) -> object:  # type: ignore[override]
            if uri.vault_name == "slow":
                await anyio.sleep(3600)
            return await super().get(uri)

    source = SlowVault()
    slow = [f"https://slow.vault.azure.net/secrets/c{i}" for i in range(50)]
    healthy = [f"https://healthy.vault.azure.net/secrets/c{i}" for i in range(50)]
    for url in slow + healthy:
        source.set(url, material)
    store = MemoryStore()
    sync = CertSync(slow + healthy, store=store, source=source, max_concurrency=8)
    async with sync:
        await settle(lambda: all(store.current(SecretUri.parse(u)) for u in healthy))
        assert source.max_in_flight <= 8


class GatedSource(MemorySource):
    """Reads of a gated URL wait until the test opens its gate; every read is recorded."""

    def __init__(self, clock: FakeClock, gated: list[str]) -> None:
        super().__init__()
        self.clock = clock
        self.gates = {SecretUri.parse(url): anyio.Event() for url in gated}
        self.reads: list[tuple[str, float]] = []

    async def get(self, uri: SecretUri) -> SecretVersion:
        self.reads.append((uri.name, self.clock.now()))
        gate = self.gates.get(uri)
        if gate is not None:
            await gate.wait()
        return await super().get(uri)

    def open(self, url: str) -> None:
        self.gates[SecretUri.parse(url)].set()


def vaults_with_polls_waiting(
    material: CertificateMaterial, **options: Any
) -> tuple[GatedSource, CertSync, list[str]]:
    """a1 and b1 hold both runners (gated); a2 and b2 are dispatched behind them, waiting.

    max_concurrency 2 and max_per_vault 2: b3 waits for one of its vault's slots.
    """
    clock = FakeClock()
    a = [f"https://vaulta.vault.azure.net/secrets/a{i}" for i in (1, 2)]
    b = [f"https://vaultb.vault.azure.net/secrets/b{i}" for i in (1, 2, 3)]
    source = GatedSource(clock, [a[0], b[0]])
    for url in a + b:
        source.set(url, material)
    options = {"store": MemoryStore(), "max_concurrency": 2, "max_per_vault": 2, **options}
    sync = CertSync(a + b, source=source, clock=clock, **options)
    return source, sync, a + b


def installed(sync: CertSync, *urls: str) -> bool:
    return all(state.installed is not None for state in sync.states() if str(state.uri) in urls)


async def test_a_poll_waiting_for_a_runner_goes_back_when_its_vault_throttles(
    material: CertificateMaterial,
) -> None:
    source, sync, (a1, a2, b1, b2, b3) = vaults_with_polls_waiting(material)
    source.fail(Throttled("429", retry_after=30), uri=b1)
    async with sync:
        await settle(lambda: len(source.reads) == 2)
        # b1 is answered 429; its runner takes a2, then b2, dispatched before the 429: b2
        # must not go.
        source.open(b1)
        await settle(lambda: installed(sync, a2))
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert [name for name, _ in source.reads] == ["a1", "b1", "a2"]
        source.open(a1)
        await drive(source.clock, lambda: installed(sync, a1, a2, b1, b2, b3))
    assert all(when >= 30 for name, when in source.reads if name.startswith("b") and name != "b1")
    assert sorted(name for name, _ in source.reads) == ["a1", "a2", "b1", "b1", "b2", "b3"]


async def test_a_poll_waiting_for_a_runner_is_dropped_when_its_url_is_removed(
    material: CertificateMaterial,
) -> None:
    source, sync, (a1, a2, b1, b2, b3) = vaults_with_polls_waiting(material)
    reports = []

    async def refresh_b2() -> None:
        reports.append(await sync.refresh(b2))

    async with sync, anyio.create_task_group() as tg:
        await settle(lambda: len(source.reads) == 2)
        tg.start_soon(refresh_b2)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()  # the refresh joins b2's dispatched poll
        sync.update_observed([a1, a2, b1, b3])
        source.open(a1)
        source.open(b1)
        await settle(lambda: installed(sync, a1, a2, b1, b3) and bool(reports))
    assert sorted(name for name, _ in source.reads) == ["a1", "a2", "b1", "b3"]
    assert "no longer observed" in str(reports[0].failed[0].error)


async def test_polls_left_waiting_for_a_runner_at_stop_give_their_vault_slots_back(
    material: CertificateMaterial,
) -> None:
    # One slot a vault: c1, left waiting at the stop, holds vault c's only one.
    source, sync, (a1, _, b1, *_) = vaults_with_polls_waiting(material, max_per_vault=1)
    c1 = "https://vaultc.vault.azure.net/secrets/c1"
    source.set(c1, material)
    sync.update_observed([a1, b1, c1])
    async with sync:
        await settle(lambda: len(source.reads) == 2)  # a1 and b1 run; c1 waits
    source.open(a1)
    source.open(b1)
    with anyio.fail_after(10):
        report = await sync.sync_once()  # vault c's slot is free again
    assert report.ok and len(report.results) == 3


async def test_an_install_that_ends_after_the_stop_starts_no_more_polls(
    material: CertificateMaterial,
) -> None:
    store = MemoryStore()
    source, sync, (a1, _, b1, b2, _) = vaults_with_polls_waiting(material, store=store)
    installing, finish = anyio.Event(), anyio.Event()
    install = store.install

    async def slow_install(
        observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        if observed.uri == SecretUri.parse(a1):
            installing.set()
            await finish.wait()
        return await install(observed, material, version)

    store.install = slow_install  # type: ignore[method-assign]

    async def run() -> None:
        async with sync:
            await settle(lambda: len(source.reads) == 2)
            source.open(a1)
            with anyio.fail_after(5):
                await installing.wait()
            sync.limiter("vaultb.vault.azure.net").throttled(30.0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        await settle(lambda: installing.is_set() and not sync.running)
        finish.set()  # the shielded install ends after the stop
    for _ in range(20):
        await anyio.lowlevel.checkpoint()
    assert [name for name, _ in source.reads] == ["a1", "b1"]  # a2 and b2 did not go
    await source.clock.advance(40)
    source.open(b1)
    with anyio.fail_after(10):
        report = await sync.refresh(b2)
    assert report.ok


async def test_a_replacement_waits_for_the_running_poll_of_its_url(
    material: CertificateMaterial,
) -> None:
    source, _, (a1, *_) = vaults_with_polls_waiting(material)
    sync = CertSync([a1], store=MemoryStore(), source=source, clock=source.clock)
    reports = []

    async def refresh_a1() -> None:
        reports.append(await sync.refresh(a1))

    async with sync, anyio.create_task_group() as tg:
        await settle(lambda: len(source.reads) == 1)  # the first entry of a1 polls (gated)
        sync.update_observed([ObservedCertificate.of(a1, store_name="Root")])
        tg.start_soon(refresh_a1)
        for _ in range(50):
            await anyio.lowlevel.checkpoint()
        assert len(source.reads) == 1  # not a second read of a1 while the first runs
        source.open(a1)
        await settle(lambda: bool(reports))
    assert len(source.reads) == 2 and reports[0].ok


async def test_a_vault_with_many_polls_waiting_does_not_hold_up_another(
    material: CertificateMaterial,
) -> None:
    slow = [f"https://slow{v}.vault.azure.net/secrets/c{i}" for v in range(3) for i in range(4)]
    fast = "https://fast.vault.azure.net/secrets/c"
    source = GatedSource(FakeClock(), slow)
    for url in [*slow, fast]:
        source.set(url, material)
    sync = CertSync([*slow, fast], store=MemoryStore(), source=source, max_concurrency=4)
    async with sync:
        # Nine slow polls (three a vault) are dispatched before the fast one; the runners take
        # a vault at a time, so the fast one is among the first four, not behind all nine.
        await settle(lambda: installed(sync, fast))
        assert [name for name, _ in source.reads].index("c") < 4, source.reads
        for url in slow:
            source.open(url)
        await settle(lambda: installed(sync, *slow))


async def test_refreshes_do_not_grow_the_timer_heap(material: CertificateMaterial) -> None:
    clock = FakeClock()
    source = MemorySource()
    targets = urls(20)
    for url in targets:
        source.set(url, material)
    sync = CertSync(targets, store=MemoryStore(), source=source, clock=clock, rate_limit=1e6)
    async with sync:
        await sync.wait_ready()
        for _ in range(100):
            await sync.sync_once()
        assert len(sync._heap) <= 2 * len(targets) + 65


async def test_failures_keep_no_traceback_with_secret_locals(material: CertificateMaterial) -> None:
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, "-----BEGIN CERTIFICATE-----\nTOPSECRETVALUE\n-----END CERTIFICATE-----\n")
    sync = CertSync([url], store=MemoryStore(), source=source)
    failures = collect(sync, SyncFailed)
    await sync.sync_once()
    error = failures[0].error
    assert isinstance(error, MaterialError)
    assert error.__traceback__ is None and error.__context__ is None
    assert "TOPSECRET" not in repr(failures[0])


async def test_expiry_is_reported_while_renewal_fails(ca: TestAuthority) -> None:
    clock = FakeClock(wall=datetime.now(UTC))
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, ca.issue(["e.example"], not_after=clock.utcnow() + timedelta(days=30)))
    sync = CertSync(
        [url], store=MemoryStore(), source=source, clock=clock, expiry_warning=timedelta(days=14)
    )
    warnings = collect(sync, CertificateExpiring)
    await sync.sync_once()
    assert not warnings
    source.fail(TransientSourceError("vault down"), uri=url, times=1000)
    await clock.advance(20 * 86400)
    await sync.sync_once()
    assert len(warnings) == 1


async def test_replacing_a_running_url_never_polls_it_twice_at_once(
    material: CertificateMaterial,
) -> None:
    source = MemorySource(latency=0.2)
    url = urls(1)[0]
    source.set(url, material)
    store = MemoryStore()
    sync = CertSync([url], store=store, source=source)
    updates = collect(sync, CertificateUpdated)
    async with sync:
        await settle(lambda: source.in_flight == 1)
        sync.update_observed([ObservedCertificate.of(url, store_name="Root")])
        await settle(lambda: source.calls >= 2 and source.in_flight == 0)
    assert source.max_in_flight == 1
    assert store.installs == 1 and len(updates) == 1


async def test_throttling_does_not_use_up_initial_attempts(material: CertificateMaterial) -> None:
    clock = FakeClock()
    source = MemorySource()
    url = urls(1)[0]
    source.set(url, material)
    source.fail(Throttled("429", retry_after=1), uri=url, times=5)
    sync = CertSync([url], store=MemoryStore(), source=source, clock=clock, initial_sync_attempts=2)
    ready = collect(sync, InitialSyncCompleted)
    async with sync:
        await drive(clock, lambda: bool(ready), step=0.5)
        await sync.wait_ready()  # does not raise: five 429s are not five failed attempts


def test_rate_burst_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="rate_burst"):
        CertSync(urls(1), store=MemoryStore(), source=MemorySource(), rate_burst=0.5)


async def test_fake_clock_forgets_cancelled_sleepers() -> None:
    clock = FakeClock()
    with anyio.move_on_after(0.01):
        await clock.sleep_until(100)
    assert clock.next_deadline is None


async def test_an_incomplete_install_is_announced_and_reported(
    material: CertificateMaterial,
) -> None:
    from kvcertsync.stores import InstallIncomplete

    class PartlyFailing(MemoryStore):
        async def install(
            self, observed: ObservedCertificate, material: CertificateMaterial, version: str
        ) -> InstalledCertificate:
            record = await super().install(observed, material, version)
            raise InstallIncomplete(record, ["account 'IIS AppPool\\\\Nope' does not exist"])

    source = MemorySource()
    url = urls(1)[0]
    version = source.set(url, material)
    sync = CertSync([url], store=PartlyFailing(), source=source)
    events = collect(sync)
    first = await sync.sync_once()
    second = await sync.sync_once()
    assert first.failed and "Nope" in str(first.failed[0].error)
    # In place, so not announced again; but the failed step is tried again, and fails again.
    assert second.failed and "Nope" in str(second.failed[0].error)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["CertificateUpdated", "SyncFailed", "InitialSyncCompleted", "SyncFailed"]
    assert events[0].version == version  # type: ignore[attr-defined]


async def test_an_incomplete_install_is_finished_by_the_next_poll(
    material: CertificateMaterial,
) -> None:
    from kvcertsync.stores import InstallIncomplete

    class FailsOnce(MemoryStore):
        calls = 0

        async def install(
            self, observed: ObservedCertificate, material: CertificateMaterial, version: str
        ) -> InstalledCertificate:
            record = await super().install(observed, material, version)
            FailsOnce.calls += 1
            if FailsOnce.calls == 1:
                raise InstallIncomplete(record, ["pruning failed"])
            return record

    source = MemorySource()
    url = urls(1)[0]
    source.set(url, material)
    sync = CertSync([url], store=FailsOnce(), source=source)
    updates = collect(sync, CertificateUpdated)
    assert (await sync.sync_once()).failed
    assert (await sync.sync_once()).unchanged  # finished: the step ran again and succeeded
    assert FailsOnce.calls == 2
    assert (await sync.sync_once()).unchanged
    assert FailsOnce.calls == 2  # and never again
    assert len(updates) == 1
