"""CertSync: scheduling, concurrency, rate limits, retries, initial sync and change detection."""

from __future__ import annotations

import enum
import heapq
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime, timedelta
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import attrs

from kvcertsync.clock import Clock, SystemClock
from kvcertsync.errors import (
    AccessDenied,
    KvCertSyncError,
    MaterialError,
    SourceError,
    Throttled,
)
from kvcertsync.events import (
    Announcer,
    CertificateExpiring,
    CertificateUpdated,
    Event,
    EventBus,
    InitialSyncCompleted,
    Subscription,
    SyncFailed,
    SyncRecovered,
)
from kvcertsync.limits import RetryPolicy, VaultLimiter
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.sources.base import SecretSource, SecretVersion
from kvcertsync.stats import StatsRecorder, SyncStats
from kvcertsync.stores.base import InstalledCertificate, InstallIncomplete, Store, read_material
from kvcertsync.uri import SecretUri

if TYPE_CHECKING:
    from kvcertsync.settings import AgentSettings

__all__ = ["CertSync", "CertificateState", "InitialSyncError", "PollResult", "SyncReport"]

logger = logging.getLogger(__name__)

_DAY = 86400.0
# How long parsing one secret may take: milliseconds normally, so only a hostile one gets near.
_PARSE_TIMEOUT = 30.0


class InitialSyncError(KvCertSyncError):
    """Some certificates could not be installed within ``initial_sync_attempts``."""

    def __init__(self, failures: dict[SecretUri, BaseException]) -> None:
        #: The last error of each certificate that was never installed.
        self.failures = failures
        lines = "; ".join(f"{uri}: {type(e).__name__}: {e}" for uri, e in failures.items())
        super().__init__(f"initial sync failed for {len(failures)} certificate(s): {lines}")


class Outcome(enum.Enum):
    """How one poll of one certificate ended."""

    #: A new version was installed.
    UPDATED = "updated"
    #: The installed version is the one the vault serves.
    UNCHANGED = "unchanged"
    #: Fetching, parsing or installing failed (``PollResult.error`` says why).
    FAILED = "failed"


@attrs.frozen
class PollResult:
    """The result of one poll of one observed certificate."""

    #: The observed secret URL.
    uri: SecretUri
    #: How the poll ended.
    outcome: Outcome
    #: What is installed after the poll (None when nothing is).
    installed: InstalledCertificate | None = None
    #: Why it failed, when it did.
    error: BaseException | None = attrs.field(default=None, eq=False)


@attrs.frozen
class SyncReport:
    """What one pass did: which certificates changed, which were current, which failed."""

    #: One result per certificate polled, in the order asked.
    results: tuple[PollResult, ...]

    @property
    def updated(self) -> tuple[PollResult, ...]:
        """Polls that installed a new version."""
        return tuple(r for r in self.results if r.outcome is Outcome.UPDATED)

    @property
    def unchanged(self) -> tuple[PollResult, ...]:
        """Polls that found the installed version current."""
        return tuple(r for r in self.results if r.outcome is Outcome.UNCHANGED)

    @property
    def failed(self) -> tuple[PollResult, ...]:
        """Polls that failed; the installed certificate, if any, was left untouched."""
        return tuple(r for r in self.results if r.outcome is Outcome.FAILED)

    @property
    def errors(self) -> dict[SecretUri, BaseException]:
        """The error of each failed poll, by URL."""
        return {r.uri: r.error for r in self.failed if r.error is not None}

    @property
    def ok(self) -> bool:
        """True when nothing failed."""
        return not self.failed


@attrs.frozen
class CertificateState:
    """Where one observed certificate stands now: what is installed and how its polls go."""

    #: The certificate as observed (URL, store, location and the rest of its settings).
    observed: ObservedCertificate
    #: What is installed for it now (known from the store as soon as a run starts).
    installed: InstalledCertificate | None
    #: The last poll succeeded: ``installed`` is the version the vault serves.
    current: bool
    #: Failed polls since the last success.
    failures: int
    #: The last failure as ``Type: message``; None once a poll succeeds.
    error: str | None
    #: The initial sync gave up on it (``initial_sync_attempts`` used up).
    gave_up: bool
    #: When a poll of it last succeeded (UTC), None before the first.
    last_success: datetime | None

    @property
    def uri(self) -> SecretUri:
        """The observed secret URL."""
        return self.observed.uri


class _State(enum.Enum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"
    #: A replacement whose URL's previous entry is still polling: it starts when that ends.
    BEHIND = "behind"


_Waiter = Callable[[PollResult], None]


@attrs.define(eq=False)
class _Entry:
    observed: ObservedCertificate
    state: _State = _State.SCHEDULED
    generation: int = 0
    attempt: int = 0
    initial_failures: int = 0
    polls: int = 0
    anchor: float | None = None
    ready: bool = False
    settled: bool = False
    gave_up: bool = False
    removed: bool = False
    successor: _Entry | None = None
    installed: InstalledCertificate | None = None
    #: A version installed with a later step failed (InstallIncomplete): the next poll finishes it.
    unfinished: str | None = None
    last_error: BaseException | None = None
    last_success: datetime | None = None
    warned: tuple[str, float] | None = None
    waiters_next: list[_Waiter] = attrs.Factory(list)
    waiters_now: list[_Waiter] = attrs.Factory(list)
    #: The vault's host, asked on every poll: worked out once.
    vault: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.vault = self.observed.uri.hostname

    @property
    def uri(self) -> SecretUri:
        return self.observed.uri

    def release(self, waiters: list[_Waiter], error: BaseException) -> None:
        """Answer ``waiters`` with a failure: the poll they wait for will not happen."""
        for notify in waiters:
            notify(PollResult(self.uri, Outcome.FAILED, None, error))


async def _acquire(slots: anyio.CapacityLimiter, token: object) -> None:
    """Take a slot for ``token``; without a trip through the event loop when one is free.

    ``acquire_on_behalf_of`` always yields, even with slots free: two loop iterations per
    poll, a large share of an unchanged poll's cost. The dispatcher yields anyway when it
    runs out of slots or queued polls, so the others still get their turn.
    """
    try:
        slots.acquire_on_behalf_of_nowait(token)
    except anyio.WouldBlock:
        await slots.acquire_on_behalf_of(token)


class _Runners:
    """Long-lived tasks that run the dispatched polls, at most ``limit`` of them.

    A task spawned per poll (anyio's task group: about 11 µs, with its cancel scope) was a
    third of the engine's cost of an unchanged poll. The runners are the global concurrency
    limit: a runner that finishes a poll takes the next dispatched one at once, where a global
    slot would wake a dispatcher and then a runner, two trips through the event loop a poll.
    The waiting polls are taken a vault at a time in turn, so a vault with many waiting does
    not make another's wait behind all of them.
    """

    def __init__(
        self, tg: anyio.abc.TaskGroup, run: Callable[..., Awaitable[None]], limit: int
    ) -> None:
        self._tg = tg
        self._run = run
        self._limit = limit
        self._count = 0
        self._waiting: dict[str, deque[tuple[Any, ...]]] = {}
        #: The vaults' queues that hold waiting jobs, in the order of their turns.
        self._turns: deque[deque[tuple[Any, ...]]] = deque()
        self._idle: list[anyio.Event] = []

    def drop_waiting(self) -> list[tuple[Any, ...]]:
        """Take back the jobs no runner has started: the run is ending."""
        jobs = [job for queue in self._turns for job in queue]
        for queue in self._turns:
            queue.clear()
        self._turns.clear()
        return jobs

    def submit(self, vault: str, *job: Any) -> None:
        """Run ``run(*job)`` on an idle runner, or a new one while fewer than ``limit`` run."""
        queue = self._waiting.get(vault)
        if queue is None:
            queue = self._waiting[vault] = deque()
        if not queue:
            self._turns.append(queue)
        queue.append(job)
        if self._idle:
            self._idle.pop().set()
        elif self._count < self._limit:
            self._count += 1
            self._tg.start_soon(self._work)

    async def _work(self) -> None:
        turns = self._turns
        while True:
            while turns:
                queue = turns.popleft()
                job = queue.popleft()
                if queue:
                    turns.append(queue)
                await self._run(*job)
            idle = anyio.Event()
            self._idle.append(idle)
            await idle.wait()


def _retryable(error: Exception) -> bool:
    if isinstance(error, SourceError):
        return error.retryable
    # A corrupt secret stays corrupt until a new version appears: no point hammering it.
    return not isinstance(error, MaterialError)


def _scrub(error: Exception) -> Exception:
    """Drop the traceback and chained errors: their frames hold secret values as locals."""
    error.__traceback__ = None
    error.__context__ = None
    error.__cause__ = None
    return error


class CertSync(Announcer):
    """Keeps observed Key Vault certificates installed in a store and announces every change."""

    def __init__(
        self,
        observed: Iterable[ObservedCertificate | SecretUri | str],
        *,
        store: Store,
        source: SecretSource,
        polling_interval: float = 3600.0,
        max_concurrency: int = 32,
        max_per_vault: int | None = None,
        rate_limit: float = 100.0,
        rate_burst: float | None = None,
        jitter: float = 0.1,
        start_splay: float = 0.0,
        retry: RetryPolicy | None = None,
        require_initial_sync: bool = True,
        initial_sync_attempts: int | None = None,
        expiry_warning: timedelta | None = timedelta(days=14),
        hook_timeout: float = 30.0,
        event_buffer: int = 1000,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        burst = float(rate_burst if rate_burst is not None else max(1.0, rate_limit))
        per_vault = max_per_vault if max_per_vault is not None else max(1, 3 * max_concurrency // 4)
        problems = [
            (not polling_interval > 0, "polling_interval must be positive"),
            (max_concurrency < 1, "max_concurrency must be at least 1"),
            (per_vault < 1, "max_per_vault must be at least 1"),
            (not rate_limit > 0, "rate_limit must be positive"),
            (not burst >= 1, "rate_burst must be at least 1"),
            (not 0 <= jitter <= 1, "jitter must be between 0 and 1"),
            (
                not (start_splay >= 0 and math.isfinite(start_splay)),
                "start_splay must be a finite number of seconds, zero or more",
            ),
            (
                initial_sync_attempts is not None and initial_sync_attempts < 1,
                "initial_sync_attempts must be at least 1",
            ),
        ]
        for wrong, message in problems:
            if wrong:
                raise ValueError(message)
        self.store = store
        self.source = source
        self.polling_interval = float(polling_interval)
        self.max_concurrency = max_concurrency
        self.max_per_vault = min(per_vault, max_concurrency)
        self.rate_limit = float(rate_limit)
        self.rate_burst = burst
        self.jitter = jitter
        self.start_splay = float(start_splay)
        self.retry = retry or RetryPolicy()
        self.require_initial_sync = require_initial_sync
        self.initial_sync_attempts = initial_sync_attempts
        self.expiry_warning = expiry_warning
        self.clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._bus = EventBus(hook_timeout=hook_timeout, buffer=event_buffer, shutdown_grace=0.5)
        self._entries: dict[SecretUri, _Entry] = {}
        for item in observed:
            entry = _Entry(self._as_observed(item))
            if entry.uri in self._entries:
                raise ValueError(f"{entry.uri} is observed twice")
            self._entries[entry.uri] = entry
        self._limiters: dict[str, VaultLimiter] = {}
        self._vault_slots: dict[str, anyio.CapacityLimiter] = {}
        self._queues: dict[str, deque[_Entry]] = {}
        self._queue_wakers: dict[str, anyio.Event] = {}
        self._heap: list[tuple[float, int, int, _Entry]] = []
        self._seq = itertools.count()
        self._wake_scope: anyio.CancelScope | None = None
        self._runners: _Runners | None = None
        self._ready = anyio.Event()
        self._ready_error: InitialSyncError | None = None
        self._ready_marks: dict[Subscription, int] = {}
        self._initial_pending: set[_Entry] = set(self._entries.values())
        self._started_at: float | None = None
        self._initial_sync_duration: float | None = None
        self._stats = StatsRecorder()
        self._tg: anyio.abc.TaskGroup | None = None
        self._background = False
        self._run_lock = anyio.Lock()
        self._run_changed = anyio.Event()
        self._context: AbstractAsyncContextManager[None] | None = None

    @classmethod
    def from_settings(
        cls,
        settings: AgentSettings,
        *,
        store: Store,
        source: SecretSource,
        **options: Any,
    ) -> CertSync:
        """A CertSync with the interval, initial-sync rule and URLs of extension settings.

        The engine knows only the protocols: for the platform's store and Key Vault chosen
        from the settings alone, use ``kvcertsync.sync_from_settings``.
        """
        options.setdefault("polling_interval", settings.polling_interval)
        options.setdefault("require_initial_sync", settings.require_initial_sync)
        return cls(settings.observed, store=store, source=source, **options)

    @staticmethod
    def _as_observed(item: ObservedCertificate | SecretUri | str) -> ObservedCertificate:
        return item if isinstance(item, ObservedCertificate) else ObservedCertificate.of(item)

    # ----------------------------------------------------------------- public API

    @property
    def observed(self) -> tuple[ObservedCertificate, ...]:
        """The certificates being kept in sync."""
        return tuple(entry.observed for entry in self._entries.values())

    @property
    def running(self) -> bool:
        """True inside ``async with``."""
        return self._background

    def states(self) -> tuple[CertificateState, ...]:
        """Where every observed certificate stands now, in observed order."""
        return tuple(
            CertificateState(
                observed=entry.observed,
                installed=entry.installed,
                current=entry.ready and entry.attempt == 0,
                failures=entry.attempt,
                error=(
                    f"{type(entry.last_error).__name__}: {entry.last_error}"
                    if entry.last_error is not None
                    else None
                ),
                gave_up=entry.gave_up,
                last_success=entry.last_success,
            )
            for entry in self._entries.values()
        )

    def stats(self) -> SyncStats:
        """Counters and latency histograms since creation, as a frozen snapshot (any thread)."""
        return self._stats.snapshot(
            initial_sync_done=self._ready.is_set(),
            initial_sync_duration=self._initial_sync_duration,
            certificates=len(self._entries),
            polling_interval=self.polling_interval,
            events=self._bus.stats,
        )

    @property
    def initial_sync_done(self) -> int:
        """How many certificates the initial sync has finished with (installed or given up)."""
        if self._ready.is_set():
            return len(self._entries)
        return len(self._entries) - len(self._initial_pending)

    def set_polling_interval(self, polling_interval: float) -> None:
        """Poll every ``polling_interval`` seconds from now on (retries keep their backoff)."""
        if not polling_interval > 0:
            raise ValueError("polling_interval must be positive")
        if polling_interval == self.polling_interval:
            return
        self.polling_interval = float(polling_interval)
        if self._tg is None:
            return
        now = self.clock.now()
        for entry in self._entries.values():
            waiting = entry.state is _State.SCHEDULED and entry.anchor is not None
            if waiting and entry.attempt == 0 and not entry.removed:
                self._schedule(entry, self._next_regular(entry, now))

    def limiter(self, vault_host: str) -> VaultLimiter:
        """The rate limiter of one vault (created on first use)."""
        limiter = self._limiters.get(vault_host)
        if limiter is None:
            limiter = VaultLimiter(
                self.clock, self.rate_limit, self.rate_burst, jitter=self._pause_jitter
            )
            self._limiters[vault_host] = limiter
        return limiter

    def _pause_jitter(self, pause: float) -> float:
        # A vault's pause ends at a random moment past the one asked, as each poll's retry does.
        return self.retry.after(pause, self._rng)

    def current(self, uri: SecretUri | str) -> InstalledCertificate | None:
        """What is installed for ``uri`` now (known from the store as soon as a run starts)."""
        return self._entry(uri).installed

    async def material(self, uri: SecretUri | str) -> CertificateMaterial | None:
        """The installed certificate, chain and key of ``uri``, read back from the store.

        None when nothing is installed; StoreError when the store cannot give material back.
        """
        return await read_material(self.store, self._entry(uri).observed)

    def _entry(self, uri: SecretUri | str) -> _Entry:
        key = uri if isinstance(uri, SecretUri) else SecretUri.parse(uri, allow_any_host=True)
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(f"{key} is not observed")
        return entry

    def _present(self) -> list[Event]:
        return [
            CertificateUpdated.of(entry.uri, entry.installed, replayed=True)
            for entry in self._entries.values()
            if entry.installed is not None
        ]

    async def __aenter__(self) -> Self:
        """Start polling in the background."""
        if self._context is not None:
            raise RuntimeError("this CertSync is already running")
        context = self._running(background=True)
        await context.__aenter__()
        self._context = context
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop polling (installs in progress finish), deliver pending events, close the source."""
        context, self._context = self._context, None
        try:
            if context is not None:
                # The body's own exception goes on as itself, not wrapped in an ExceptionGroup.
                await context.__aexit__(None, None, None)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """End event iterators and close the source (``async with`` does this on exit)."""
        self._bus.end_streams()
        with anyio.CancelScope(shield=True):
            await self.source.aclose()

    async def wait_ready(self) -> None:
        """Return once every observed certificate is installed (or was already current).

        By then every callback subscribed before the initial sync completed has finished
        handling (or timed out on) the events published until it did.
        """
        await self._ready.wait()
        await self._bus.settle(self._ready_marks)
        if self._ready_error is not None:
            raise self._ready_error

    async def sync_once(self) -> SyncReport:
        """Poll every observed certificate now, concurrently within the limits; report."""
        return await self.refresh()

    async def refresh(self, uri: SecretUri | str | None = None) -> SyncReport:
        """Poll ``uri`` (every certificate when None) now and wait for the result."""
        entries = list(self._entries.values()) if uri is None else [self._entry(uri)]
        while True:
            if self._background:
                return await self._poll_now(entries)
            if not self._run_lock.locked():
                # Outside ``async with``: a one-off pass with its own, short-lived machinery.
                async with self._running(background=False):
                    return await self._poll_now(entries)
            # Another one-off pass is running: take our turn after it (or join a background run).
            await self._run_changed.wait()

    def update_observed(
        self, observed: Iterable[ObservedCertificate | SecretUri | str]
    ) -> tuple[tuple[SecretUri, ...], tuple[SecretUri, ...]]:
        """Replace the observed set at runtime; returns (added, removed) URLs."""
        wanted = [self._as_observed(item) for item in observed]
        keys = {o.uri for o in wanted}
        removed = tuple(uri for uri in self._entries if uri not in keys)
        for uri in removed:
            self._retire(self._entries.pop(uri))
        added: list[SecretUri] = []
        for item in wanted:
            existing = self._entries.get(item.uri)
            if existing is not None and existing.observed == item:
                continue
            fresh = _Entry(item)
            self._entries[item.uri] = fresh
            added.append(item.uri)
            if not self._ready.is_set():
                self._initial_pending.add(fresh)
            if existing is not None:
                self._retire(existing)
                if existing.state is _State.RUNNING:
                    # Never two polls of one URL at once: the new entry starts when the old ends.
                    existing.successor = fresh
                    fresh.state = _State.BEHIND
                    continue
            if self._tg is not None:
                self._schedule(fresh, self.clock.now())
        if removed:
            self._check_ready()
        return tuple(added), removed

    def _retire(self, entry: _Entry) -> None:
        entry.removed = True
        entry.generation += 1
        self._initial_pending.discard(entry)
        if entry.state is not _State.RUNNING:
            # A queued poll will now never run: release whoever waits for it.
            waiters, entry.waiters_next = entry.waiters_next, []
            entry.release(waiters, KvCertSyncError(f"{entry.uri} is no longer observed"))

    # ----------------------------------------------------------------- lifecycle

    @asynccontextmanager
    async def _running(self, *, background: bool) -> AsyncIterator[None]:
        async with self._run_lock:
            self._started_at = self.clock.now()
            # A one-off pass outside ``async with`` must not end the user's event iterators.
            async with (
                self._bus.delivering(end_streams=background),
                anyio.create_task_group() as tg,
            ):
                self._tg = tg
                self._runners = _Runners(tg, self._run, self.max_concurrency)
                self._background = background
                self._signal_run_changed()
                try:
                    if background:
                        await self._learn_installed()
                        now = self.clock.now()
                        splay = self.start_splay
                        for entry in self._entries.values():
                            # A fleet started together reaches its vault spread out, not at once.
                            self._schedule(
                                entry, now + self._rng.uniform(0.0, splay) if splay else now
                            )
                        tg.start_soon(self._scheduler)
                    yield
                finally:
                    self._stop()
                    tg.cancel_scope.cancel()
        self._signal_run_changed()

    async def _learn_installed(self) -> None:
        """Read what the store holds for each certificate, so a restart knows it at once.

        Replay subscribers hear of what is found; the others do not (nothing changed).
        """

        async def learn(entry: _Entry) -> None:
            async with slots:
                try:
                    installed = await self.store.installed(entry.observed)
                except Exception as error:
                    # The first poll reads it again and reports the failure properly.
                    logger.warning(
                        "could not read what is installed for %s: %s",
                        entry.uri,
                        f"{type(error).__name__}: {error}",
                        extra={"uri": str(entry.uri)},
                    )
                    return
            if installed is None or entry.installed is not None or entry.removed:
                return
            entry.installed = installed
            event = CertificateUpdated.of(entry.uri, installed, replayed=True)
            self._bus.publish(event, replay_only=True)

        slots = anyio.CapacityLimiter(self.max_concurrency)
        async with anyio.create_task_group() as tg:
            for entry in list(self._entries.values()):
                if entry.installed is None:
                    tg.start_soon(learn, entry)

    def _signal_run_changed(self) -> None:
        self._run_changed.set()
        self._run_changed = anyio.Event()

    def _stop(self) -> None:
        """Forget the run's queues and timers; answer everyone still waiting for a poll."""
        self._tg = None
        if self._runners is not None:
            # Polls dispatched but never started hold their vault's slot: the next run needs it.
            for _entry, token, vault_slots, _limiter in self._runners.drop_waiting():
                vault_slots.release_on_behalf_of(token)
        self._runners = None
        self._background = False
        self._heap.clear()
        self._queues.clear()
        self._queue_wakers.clear()
        stopped = KvCertSyncError("the sync engine stopped before this poll completed")
        for entry in self._entries.values():
            entry.state = _State.SCHEDULED
            entry.generation += 1
            waiters = entry.waiters_now + entry.waiters_next
            entry.waiters_now, entry.waiters_next = [], []
            entry.release(waiters, stopped)

    # ----------------------------------------------------------------- scheduling

    def _schedule(self, entry: _Entry, due: float) -> None:
        entry.generation += 1
        entry.state = _State.SCHEDULED
        if len(self._heap) > 2 * len(self._entries) + 64:
            # Rescheduling leaves stale items behind; drop them before they pile up.
            self._heap = [item for item in self._heap if item[2] == item[3].generation]
            heapq.heapify(self._heap)
        heapq.heappush(self._heap, (due, next(self._seq), entry.generation, entry))
        if self._heap[0][3] is entry and self._wake_scope is not None:
            self._wake_scope.cancel()

    def _next_regular(self, entry: _Entry, now: float) -> float:
        interval = self.polling_interval
        if entry.anchor is None:
            # Each certificate gets its own phase so a burst at start-up does not repeat forever.
            entry.anchor = now + self._rng.uniform(0.0, self.jitter * interval)
            return entry.anchor + interval
        # Due times stay on the anchor's grid, so a late poll never shifts the ones after it.
        due = entry.anchor + (math.floor((now - entry.anchor) / interval) + 1) * interval
        # Rounding can land the next slot on ``now`` itself: that slot was this poll.
        return due if due - now > interval * 1e-9 else due + interval

    async def _scheduler(self) -> None:
        """The one timer: moves due certificates into their vault's queue."""
        while True:
            now = self.clock.now()
            while self._heap and self._heap[0][0] <= now:
                _, _, generation, entry = heapq.heappop(self._heap)
                if generation == entry.generation and not entry.removed:
                    self._enqueue(entry)
            with anyio.CancelScope() as scope:
                self._wake_scope = scope
                if self._heap:
                    await self.clock.sleep_until(self._heap[0][0])
                else:
                    await anyio.sleep_forever()
            self._wake_scope = None

    def _enqueue(self, entry: _Entry) -> None:
        """Queue ``entry`` for its vault now, taking it off the timer."""
        tg, runners = self._tg, self._runners
        if tg is None or runners is None:
            raise RuntimeError("the sync engine is not running")
        entry.generation += 1
        entry.state = _State.QUEUED
        vault = entry.vault
        queue = self._queues.get(vault)
        if queue is None:
            queue = self._queues[vault] = deque()
            self._queue_wakers[vault] = anyio.Event()
            tg.start_soon(self._dispatch, runners, vault, queue)
        queue.append(entry)
        self._queue_wakers[vault].set()

    def _vault_slots_for(self, vault: str) -> anyio.CapacityLimiter:
        slots = self._vault_slots.get(vault)
        if slots is None:
            slots = self._vault_slots[vault] = anyio.CapacityLimiter(self.max_per_vault)
        return slots

    async def _dispatch(self, runners: _Runners, vault: str, queue: deque[_Entry]) -> None:
        """Feed one vault's due polls out at its rate: one waiting task per vault, not per URL.

        It waits for the vault's bucket, then one of the vault's own slots (so a slow vault
        stalls only itself), and checks the bucket again last: the vault may have throttled
        meanwhile. The poll then waits for a runner (the global limit) holding its vault slot.
        """
        limiter = self.limiter(vault)
        vault_slots = self._vault_slots_for(vault)
        while True:
            while not queue:
                waker = self._queue_wakers[vault] = anyio.Event()
                await waker.wait()
            entry = queue[0]
            if entry.removed or entry.state is not _State.QUEUED:
                queue.popleft()
                continue
            delay = limiter.delay()
            if delay > 0:
                await self.clock.sleep_until(self.clock.now() + delay)
                continue
            token = object()
            await _acquire(vault_slots, token)
            # No await from here on: queue, entry and bucket cannot change under us.
            still_first = queue and queue[0] is entry and entry.state is _State.QUEUED
            if not (still_first and not entry.removed and limiter.try_take()):
                vault_slots.release_on_behalf_of(token)
                continue
            queue.popleft()
            entry.state = _State.RUNNING
            entry.waiters_now, entry.waiters_next = entry.waiters_next, []
            runners.submit(vault, entry, token, vault_slots, limiter)

    async def _run(
        self,
        entry: _Entry,
        token: object,
        vault_slots: anyio.CapacityLimiter,
        limiter: VaultLimiter,
    ) -> None:
        if self._overtaken(entry, token, vault_slots, limiter):
            return
        try:
            result, due = await self._poll(entry)
        finally:
            vault_slots.release_on_behalf_of(token)
        entry.state = _State.SCHEDULED
        waiters, entry.waiters_now = entry.waiters_now, []
        for notify in waiters:
            notify(result)
        if entry.removed:
            self._let_go(entry)
            return
        if self._tg is None:
            return  # the run is ending; _stop() answers any waiters
        if entry.waiters_next:
            self._enqueue(entry)
        else:
            self._schedule(entry, due)

    def _overtaken(
        self,
        entry: _Entry,
        token: object,
        vault_slots: anyio.CapacityLimiter,
        limiter: VaultLimiter,
    ) -> bool:
        """True (and the slot given back) when a poll must not run now after all.

        Removed while it waited for a runner, it must install nothing; with its vault
        throttled meanwhile, it goes back to the head of the vault's queue.
        """
        if entry.removed:
            vault_slots.release_on_behalf_of(token)
            entry.state = _State.SCHEDULED
            self._let_go(entry)
            return True
        if limiter.paused_until > self.clock.now():
            vault_slots.release_on_behalf_of(token)
            entry.waiters_next = entry.waiters_now + entry.waiters_next
            entry.waiters_now = []
            # A run that is ending has no queue for it: _stop() left it scheduled, as all.
            entry.state = _State.SCHEDULED
            if self._tg is not None:
                entry.state = _State.QUEUED
                self._queues[entry.vault].appendleft(entry)
                self._queue_wakers[entry.vault].set()
            return True
        return False

    def _let_go(self, entry: _Entry) -> None:
        """A removed entry's poll is over: answer its waiters, start its successor."""
        waiters = entry.waiters_now + entry.waiters_next
        entry.waiters_now, entry.waiters_next = [], []
        entry.release(waiters, KvCertSyncError(f"{entry.uri} is no longer observed"))
        successor = entry.successor
        if successor is not None:
            if self._tg is not None:
                self._schedule(successor, self.clock.now())
            else:
                successor.state = _State.SCHEDULED

    async def _poll_now(self, entries: list[_Entry]) -> SyncReport:
        if not entries:
            return SyncReport(())
        results: list[PollResult | None] = [None] * len(entries)
        remaining = len(entries)
        done = anyio.Event()
        registered: list[tuple[_Entry, _Waiter]] = []

        def deliver(index: int, result: PollResult) -> None:
            nonlocal remaining
            if results[index] is None:
                remaining -= 1
            results[index] = result
            if not remaining:
                done.set()

        for index, entry in enumerate(entries):
            # A partial, not a closure per entry: a pass over thousands makes one each.
            notify: _Waiter = partial(deliver, index)
            registered.append((entry, notify))
            entry.waiters_next.append(notify)
            if entry.state is _State.SCHEDULED and not entry.removed:
                self._enqueue(entry)
            elif entry.removed:
                entry.waiters_next.remove(notify)
                entry.release([notify], KvCertSyncError(f"{entry.uri} is no longer observed"))
        try:
            await done.wait()
        finally:
            if remaining:
                # A caller that gave up (cancelled) must not leave its waiters behind.
                for entry, waiter in registered:
                    for waiters in (entry.waiters_next, entry.waiters_now):
                        if waiter in waiters:
                            waiters.remove(waiter)
        return SyncReport(tuple(r for r in results if r is not None))

    # ----------------------------------------------------------------- one poll

    async def _poll(self, entry: _Entry) -> tuple[PollResult, float]:
        """Fetch, compare, parse and install one certificate; returns the result and next due."""
        entry.polls += 1
        limiter = self.limiter(entry.vault)
        stats = self._stats
        started = self.clock.now()
        fetched_ok = False
        try:
            fetched = await self.source.get(entry.uri)
            fetched_ok = True
            stats.fetch.observe(self.clock.now() - started)
            limiter.succeeded()
            # One reading of the wall clock serves the whole poll: each costs a datetime.
            wall = self.clock.utcnow()
            result = await self._apply(entry, fetched, wall)
        except Exception as error:
            if not fetched_ok:
                stats.fetch.observe(self.clock.now() - started)
            if isinstance(error, Throttled):
                pause = limiter.throttled(error.retry_after)
                logger.warning("vault %s throttled requests; pausing it %.1f s", entry.vault, pause)
            return self._failed(entry, error)
        if entry.attempt:
            logger.info(
                "%s polled successfully again after %d failures",
                entry.uri,
                entry.attempt,
                extra={"uri": str(entry.uri)},
            )
            self._bus.publish(SyncRecovered(entry.uri, entry.attempt))
        stats.polls += 1
        entry.attempt = 0
        entry.last_error = None
        entry.last_success = wall
        entry.installed = result.installed
        entry.ready = True
        self._check_ready(entry)
        self._check_expiry(entry, wall)
        return result, self._next_regular(entry, self.clock.now())

    async def _apply(self, entry: _Entry, fetched: SecretVersion, wall: datetime) -> PollResult:
        observed = entry.observed
        reason = fetched.usable_at(wall)
        if reason is not None:
            code = "SecretDisabled" if not fetched.enabled else "SecretNotYetValid"
            raise AccessDenied(f"{fetched.uri}: secret version {reason}", code=code)
        current = await self.store.installed(observed)
        entry.installed = current
        if current is not None and current.version == fetched.version:
            if entry.unfinished != current.version:
                return PollResult(entry.uri, Outcome.UNCHANGED, current)
            # Live since the last poll, with a step after that undone: finish it (installing
            # the same version again is idempotent). Announced then, so not again now.
            await self._install(entry, await self._parse(fetched), fetched.version)
            entry.unfinished = None
            logger.info(
                "finished installing %s version %s",
                entry.uri,
                current.version,
                extra={"uri": str(entry.uri), "version": current.version},
            )
            return PollResult(entry.uri, Outcome.UNCHANGED, current)
        material = await self._parse(fetched)
        try:
            installed = await self._install(entry, material, fetched.version)
        except InstallIncomplete as incomplete:
            # In place and current, with a later step failed: announce it, then report. It
            # counts as installed for the initial sync; the failed step is retried and reported.
            entry.installed = incomplete.installed
            entry.ready = True
            self._announce(entry, current, incomplete.installed)
            raise
        entry.installed = installed
        self._announce(entry, current, installed)
        return PollResult(entry.uri, Outcome.UPDATED, installed)

    @staticmethod
    async def _parse(fetched: SecretVersion) -> CertificateMaterial:
        try:
            # Bounded, and abandoned when over: one hostile secret must not hold a worker
            # thread's result hostage, nor hold up a stop.
            with anyio.fail_after(_PARSE_TIMEOUT):
                return await anyio.to_thread.run_sync(
                    CertificateMaterial.from_secret,
                    fetched.value,
                    fetched.content_type,
                    abandon_on_cancel=True,
                )
        except TimeoutError:
            raise MaterialError(
                f"{fetched.uri}: reading the secret took over {_PARSE_TIMEOUT:g} s; given up"
            ) from None
        except MaterialError as error:
            # The exception alone must say which certificate was bad.
            raise MaterialError(f"{fetched.uri}: {error}") from None

    async def _install(
        self, entry: _Entry, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        # Shielded: leaving ``async with`` never interrupts an install halfway.
        with anyio.CancelScope(shield=True):
            started = self.clock.now()
            try:
                installed = await self.store.install(entry.observed, material, version)
            except InstallIncomplete as incomplete:
                entry.unfinished = incomplete.installed.version
                raise
            finally:
                self._stats.install.observe(self.clock.now() - started)
        return installed

    def _announce(
        self, entry: _Entry, previous: InstalledCertificate | None, installed: InstalledCertificate
    ) -> None:
        logger.info(
            "installed %s version %s (thumbprint %s) at %s",
            entry.uri,
            installed.version,
            installed.thumbprint,
            installed.location,
            extra={
                "uri": str(entry.uri),
                "version": installed.version,
                "thumbprint": installed.thumbprint,
            },
        )
        self._stats.changes += 1
        self._bus.publish(CertificateUpdated.of(entry.uri, installed, previous))

    def _failed(self, entry: _Entry, error: Exception) -> tuple[PollResult, float]:
        if isinstance(error, KvCertSyncError):
            logger.warning(
                "sync of %s failed (attempt %d): %s",
                entry.uri,
                entry.attempt + 1,
                error,
                extra={"uri": str(entry.uri)},
            )
        else:
            logger.warning(
                "sync of %s failed (attempt %d)",
                entry.uri,
                entry.attempt + 1,
                exc_info=error,
                extra={"uri": str(entry.uri)},
            )
        error = _scrub(error)
        self._stats.failed(error)
        entry.attempt += 1
        entry.last_error = error
        now = self.clock.now()
        initial = self.require_initial_sync and not entry.ready
        if initial and not isinstance(error, Throttled):
            # A throttled vault is busy, not broken: 429s do not use up the initial attempts.
            entry.initial_failures += 1
            limit = self.initial_sync_attempts
            entry.gave_up = limit is not None and entry.initial_failures >= limit
        if _retryable(error) or (initial and not entry.gave_up):
            retry_after = error.retry_after if isinstance(error, SourceError) else None
            delay = self.retry.delay(
                entry.attempt, retry_after, self._rng, cap=self.polling_interval
            )
            due = now + delay
            if isinstance(error, Throttled):
                # Never come back before the vault's own pause ends.
                due = max(due, self.limiter(entry.vault).paused_until)
        else:
            due = self._next_regular(entry, now)
        self._bus.publish(SyncFailed(entry.uri, error, entry.attempt, due - now))
        if not self.require_initial_sync:
            entry.settled = True
        self._check_ready(entry)
        # The certificate in place may be running out while we cannot renew it: say so.
        self._check_expiry(entry)
        return PollResult(entry.uri, Outcome.FAILED, None, error), due

    def _check_ready(self, entry: _Entry | None = None) -> None:
        """Declare the initial sync complete once every certificate is in place (or given up)."""
        if self._ready.is_set():
            return
        # A set, not a scan: this runs after every poll of a cold start over thousands of URLs.
        if entry is not None and (entry.ready or entry.settled or entry.gave_up or entry.removed):
            self._initial_pending.discard(entry)
        if self._initial_pending:
            return
        entries = self._entries.values()
        failures = {e.uri: e.last_error for e in entries if not e.ready and e.last_error}
        if failures and self.require_initial_sync:
            self._ready_error = InitialSyncError(failures)
        count = sum(1 for e in entries if e.ready)
        started = self._started_at if self._started_at is not None else self.clock.now()
        duration = self.clock.now() - started
        self._initial_sync_duration = duration
        logger.info("initial sync: %d of %d certificates in place", count, len(entries))
        self._bus.publish(InitialSyncCompleted(count, duration))
        self._ready_marks = self._bus.marks()
        self._ready.set()

    def _check_expiry(self, entry: _Entry, wall: datetime | None = None) -> None:
        installed = entry.installed
        if self.expiry_warning is None or installed is None:
            return
        remaining = installed.not_after - (self.clock.utcnow() if wall is None else wall)
        if remaining > self.expiry_warning:
            return
        now = self.clock.now()
        if entry.warned is not None:
            version, when = entry.warned
            if version == installed.version and now - when < _DAY:
                return
        entry.warned = (installed.version, now)
        logger.warning(
            "%s expires %s and no newer version is installed",
            entry.uri,
            installed.not_after,
            extra={
                "uri": str(entry.uri),
                "version": installed.version,
                "thumbprint": installed.thumbprint,
            },
        )
        self._bus.publish(CertificateExpiring(entry.uri, installed.not_after, remaining))
