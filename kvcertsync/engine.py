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
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import attrs

from kvcertsync.clock import Clock, SystemClock
from kvcertsync.errors import AccessDenied, KvCertSyncError, MaterialError, SourceError, Throttled
from kvcertsync.events import (
    CertificateExpiring,
    CertificateUpdated,
    Event,
    EventBus,
    InitialSyncCompleted,
    Subscription,
    SyncFailed,
)
from kvcertsync.limits import RetryPolicy, VaultLimiter
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.sources.base import SecretSource, SecretVersion
from kvcertsync.stores.base import InstalledCertificate, Store
from kvcertsync.uri import SecretUri

if TYPE_CHECKING:
    from kvcertsync.settings import AgentSettings

__all__ = ["CertSync", "InitialSyncError", "PollResult", "SyncReport"]

logger = logging.getLogger(__name__)

_DAY = 86400.0


class InitialSyncError(KvCertSyncError):
    """Some certificates could not be installed within ``initial_sync_attempts``."""

    def __init__(self, failures: dict[SecretUri, BaseException]) -> None:
        self.failures = failures
        lines = "; ".join(f"{uri}: {type(e).__name__}: {e}" for uri, e in failures.items())
        super().__init__(f"initial sync failed for {len(failures)} certificate(s): {lines}")


class Outcome(enum.Enum):
    """How one poll of one certificate ended."""

    UPDATED = "updated"
    UNCHANGED = "unchanged"
    FAILED = "failed"


@attrs.frozen
class PollResult:
    """The result of one poll of one observed certificate."""

    uri: SecretUri
    outcome: Outcome
    installed: InstalledCertificate | None = None
    error: BaseException | None = attrs.field(default=None, eq=False)


@attrs.frozen
class SyncReport:
    """What one pass did: which certificates changed, which were current, which failed."""

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


class _State(enum.Enum):
    SCHEDULED = "scheduled"
    QUEUED = "queued"
    RUNNING = "running"


@attrs.define(eq=False)
class _Entry:
    observed: ObservedCertificate
    state: _State = _State.SCHEDULED
    generation: int = 0
    attempt: int = 0
    polls: int = 0
    anchor: float | None = None
    ready: bool = False
    settled: bool = False
    gave_up: bool = False
    removed: bool = False
    last_error: BaseException | None = None
    warned: tuple[str, float] | None = None
    waiters_next: list[Callable[[PollResult], None]] = attrs.Factory(list)
    waiters_now: list[Callable[[PollResult], None]] = attrs.Factory(list)

    @property
    def uri(self) -> SecretUri:
        return self.observed.uri

    @property
    def vault(self) -> str:
        return self.observed.uri.hostname


def _retryable(error: Exception) -> bool:
    if isinstance(error, SourceError):
        return error.retryable
    # A corrupt secret stays corrupt until a new version appears: no point hammering it.
    return not isinstance(error, MaterialError)


class CertSync:
    """Keeps observed Key Vault certificates installed in a store and announces every change."""

    def __init__(
        self,
        observed: Iterable[ObservedCertificate | SecretUri | str],
        *,
        store: Store,
        source: SecretSource,
        polling_interval: float = 3600.0,
        max_concurrency: int = 32,
        rate_limit: float = 100.0,
        rate_burst: float | None = None,
        jitter: float = 0.1,
        retry: RetryPolicy | None = None,
        require_initial_sync: bool = True,
        initial_sync_attempts: int | None = None,
        expiry_warning: timedelta | None = timedelta(days=14),
        hook_timeout: float = 30.0,
        event_buffer: int = 1000,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not polling_interval > 0:
            raise ValueError("polling_interval must be positive")
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if not rate_limit > 0:
            raise ValueError("rate_limit must be positive")
        if not 0 <= jitter <= 1:
            raise ValueError("jitter must be between 0 and 1")
        if initial_sync_attempts is not None and initial_sync_attempts < 1:
            raise ValueError("initial_sync_attempts must be at least 1")
        self.store = store
        self.source = source
        self.polling_interval = float(polling_interval)
        self.max_concurrency = max_concurrency
        self.rate_limit = float(rate_limit)
        self.rate_burst = float(rate_burst if rate_burst is not None else max(1.0, rate_limit))
        self.jitter = jitter
        self.retry = retry or RetryPolicy()
        self.require_initial_sync = require_initial_sync
        self.initial_sync_attempts = initial_sync_attempts
        self.expiry_warning = expiry_warning
        self.clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._bus = EventBus(hook_timeout=hook_timeout, buffer=event_buffer)
        self._entries: dict[SecretUri, _Entry] = {}
        for item in observed:
            entry = _Entry(self._as_observed(item))
            if entry.uri in self._entries:
                raise ValueError(f"{entry.uri} is observed twice")
            self._entries[entry.uri] = entry
        self._limiters: dict[str, VaultLimiter] = {}
        self._queues: dict[str, deque[_Entry]] = {}
        self._queue_wakers: dict[str, anyio.Event] = {}
        self._heap: list[tuple[float, int, int, _Entry]] = []
        self._seq = itertools.count()
        self._scheduler_wake = anyio.Event()
        self._limiter = anyio.CapacityLimiter(max_concurrency)
        self._ready = anyio.Event()
        self._ready_error: InitialSyncError | None = None
        self._initial_pending: set[_Entry] = set(self._entries.values())
        self._started_at: float | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: AsyncExitStack | None = None

    @classmethod
    def from_settings(
        cls,
        settings: AgentSettings,
        *,
        store: Store | None = None,
        source: SecretSource | None = None,
        credential: Any = None,
        **options: Any,
    ) -> CertSync:
        """A CertSync for the extension settings ``settings`` (interval, initial sync, URLs)."""
        if store is None or source is None:
            raise TypeError(
                "CertSync.from_settings needs store= and source= (for example MemoryStore() and "
                "MemorySource()); choosing them from the settings is not available yet"
            )
        del credential  # Used by the source factory once one exists; a given source has its own.
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
        return self._tg is not None

    def limiter(self, vault_host: str) -> VaultLimiter:
        """The rate limiter of one vault (created on first use)."""
        limiter = self._limiters.get(vault_host)
        if limiter is None:
            limiter = VaultLimiter(self.clock, self.rate_limit, self.rate_burst)
            self._limiters[vault_host] = limiter
        return limiter

    def subscribe(
        self, callback: Callable[[Any], Awaitable[None] | None], *event_types: type[Event]
    ) -> Subscription:
        """Call ``callback(event)`` for each event (of ``event_types``, when given)."""
        return self._bus.subscribe(callback, *event_types)

    def events(self, *event_types: type[Event], buffer: int | None = None) -> AsyncIterator[Event]:
        """An async iterator over events (of ``event_types``, when given)."""
        return self._bus.events(*event_types, buffer=buffer)

    async def __aenter__(self) -> Self:
        """Start polling in the background."""
        if self._stack is not None:
            raise RuntimeError("this CertSync is already running")
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(self._running())
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop polling (installs in progress finish), deliver pending events, close the source."""
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                await stack.__aexit__(exc_type, exc, tb)
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        """End event iterators and close the source (``async with`` does this on exit)."""
        self._bus.end_streams()
        with anyio.CancelScope(shield=True):
            await self.source.aclose()

    async def wait_ready(self) -> None:
        """Return once every observed certificate is installed (or was already current)."""
        await self._ready.wait()
        if self._ready_error is not None:
            raise self._ready_error

    async def sync_once(self) -> SyncReport:
        """Poll every observed certificate now, concurrently within the limits; report."""
        return await self.refresh()

    async def refresh(self, uri: SecretUri | str | None = None) -> SyncReport:
        """Poll ``uri`` (every certificate when None) now and wait for the result."""
        if uri is None:
            entries = list(self._entries.values())
        else:
            key = uri if isinstance(uri, SecretUri) else SecretUri.parse(uri, allow_any_host=True)
            if key not in self._entries:
                raise KeyError(f"{key} is not observed")
            entries = [self._entries[key]]
        if self._tg is not None:
            return await self._poll_now(entries)
        async with self._running(schedule=False):
            return await self._poll_now(entries)

    def update_observed(
        self, observed: Iterable[ObservedCertificate | SecretUri | str]
    ) -> tuple[tuple[SecretUri, ...], tuple[SecretUri, ...]]:
        """Replace the observed set at runtime; returns (added, removed) URLs."""
        wanted = [self._as_observed(item) for item in observed]
        keys = {o.uri for o in wanted}
        removed = tuple(uri for uri in self._entries if uri not in keys)
        for uri in removed:
            gone = self._entries.pop(uri)
            self._retire(gone)
            self._initial_pending.discard(gone)
        added: list[SecretUri] = []
        for item in wanted:
            existing = self._entries.get(item.uri)
            if existing is not None and existing.observed == item:
                continue
            if existing is not None:
                self._retire(existing)
                self._initial_pending.discard(existing)
            fresh = _Entry(item)
            self._entries[item.uri] = fresh
            if not self._ready.is_set():
                self._initial_pending.add(fresh)
            added.append(item.uri)
            if self._tg is not None:
                self._schedule(fresh, self.clock.now())
        if removed:
            self._check_ready()
        return tuple(added), removed

    @staticmethod
    def _retire(entry: _Entry) -> None:
        entry.removed = True
        entry.generation += 1
        if entry.state is not _State.RUNNING:
            # A queued poll will now never run: release whoever waits for it.
            gone = KvCertSyncError(f"{entry.uri} is no longer observed")
            waiters, entry.waiters_next = entry.waiters_next, []
            for notify in waiters:
                notify(PollResult(entry.uri, Outcome.FAILED, None, gone))

    # ----------------------------------------------------------------- lifecycle

    @asynccontextmanager
    async def _running(self, *, schedule: bool = True) -> AsyncIterator[None]:
        self._started_at = self.clock.now()
        # A one-off pass outside ``async with`` must not end the user's event iterators.
        async with self._bus.delivering(end_streams=schedule), anyio.create_task_group() as tg:
            self._tg = tg
            try:
                if schedule:
                    now = self.clock.now()
                    for entry in self._entries.values():
                        self._schedule(entry, now)
                    tg.start_soon(self._scheduler)
                yield
            finally:
                self._tg = None
                self._heap.clear()
                self._queues.clear()
                self._queue_wakers.clear()
                for entry in self._entries.values():
                    entry.state = _State.SCHEDULED
                    entry.generation += 1
                tg.cancel_scope.cancel()

    # ----------------------------------------------------------------- scheduling

    def _schedule(self, entry: _Entry, due: float) -> None:
        entry.generation += 1
        entry.state = _State.SCHEDULED
        heapq.heappush(self._heap, (due, next(self._seq), entry.generation, entry))
        if self._heap[0][3] is entry:
            self._scheduler_wake.set()

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
            wake = self._scheduler_wake = anyio.Event()
            if not self._heap:
                await wake.wait()
                continue
            async with anyio.create_task_group() as timer:
                timer.start_soon(self._alarm, self._heap[0][0], wake)
                await wake.wait()
                timer.cancel_scope.cancel()

    async def _alarm(self, deadline: float, wake: anyio.Event) -> None:
        await self.clock.sleep_until(deadline)
        wake.set()

    def _enqueue(self, entry: _Entry) -> None:
        """Queue ``entry`` for its vault now, taking it off the timer."""
        assert self._tg is not None
        entry.generation += 1
        entry.state = _State.QUEUED
        queue = self._queues.get(entry.vault)
        if queue is None:
            queue = self._queues[entry.vault] = deque()
            self._queue_wakers[entry.vault] = anyio.Event()
            self._tg.start_soon(self._dispatch, entry.vault, queue)
        queue.append(entry)
        self._queue_wakers[entry.vault].set()

    async def _dispatch(self, vault: str, queue: deque[_Entry]) -> None:
        """Feed one vault's due polls out at its rate: one waiting task per vault, not per URL."""
        assert self._tg is not None
        tg = self._tg
        limiter = self.limiter(vault)
        while True:
            while not queue:
                self._queue_wakers[vault] = anyio.Event()
                await self._queue_wakers[vault].wait()
            entry = queue[0]
            if entry.removed or entry.state is not _State.QUEUED:
                queue.popleft()
                continue
            delay = limiter.delay()
            if delay > 0:
                await self.clock.sleep_until(self.clock.now() + delay)
                continue
            slot = object()
            await self._limiter.acquire_on_behalf_of(slot)
            # The vault may have throttled while we waited for a slot: check the bucket again.
            if not limiter.try_take():
                self._limiter.release_on_behalf_of(slot)
                continue
            if queue and queue[0] is entry and entry.state is _State.QUEUED and not entry.removed:
                queue.popleft()
                entry.state = _State.RUNNING
                entry.waiters_now, entry.waiters_next = entry.waiters_next, []
                tg.start_soon(self._run, entry, slot)
            else:
                self._limiter.release_on_behalf_of(slot)

    async def _run(self, entry: _Entry, slot: object) -> None:
        try:
            result, due = await self._poll(entry)
        finally:
            self._limiter.release_on_behalf_of(slot)
        entry.state = _State.SCHEDULED
        waiters, entry.waiters_now = entry.waiters_now, []
        for notify in waiters:
            notify(result)
        if entry.removed or self._tg is None:
            return
        if entry.waiters_next:
            self._enqueue(entry)
        else:
            self._schedule(entry, due)

    async def _poll_now(self, entries: list[_Entry]) -> SyncReport:
        if not entries:
            return SyncReport(())
        results: dict[int, PollResult] = {}
        done = anyio.Event()

        def waiter(index: int) -> Callable[[PollResult], None]:
            def notify(result: PollResult) -> None:
                results[index] = result
                if len(results) == len(entries):
                    done.set()

            return notify

        for index, entry in enumerate(entries):
            entry.waiters_next.append(waiter(index))
            if entry.state is _State.SCHEDULED:
                self._enqueue(entry)
        await done.wait()
        return SyncReport(tuple(results[i] for i in range(len(entries))))

    # ----------------------------------------------------------------- one poll

    async def _poll(self, entry: _Entry) -> tuple[PollResult, float]:
        """Fetch, compare, parse and install one certificate; returns the result and next due."""
        entry.polls += 1
        limiter = self.limiter(entry.vault)
        try:
            fetched = await self.source.get(entry.uri)
            limiter.succeeded()
            result = await self._apply(entry, fetched)
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as error:
            if isinstance(error, Throttled):
                pause = limiter.throttled(error.retry_after)
                logger.warning("vault %s throttled requests; pausing it %.1f s", entry.vault, pause)
            return self._failed(entry, error)
        entry.attempt = 0
        entry.last_error = None
        entry.ready = True
        self._check_ready(entry)
        self._check_expiry(entry, result)
        return result, self._next_regular(entry, self.clock.now())

    async def _apply(self, entry: _Entry, fetched: SecretVersion) -> PollResult:
        observed = entry.observed
        reason = fetched.usable_at(self.clock.utcnow())
        if reason is not None:
            code = "SecretDisabled" if not fetched.enabled else "SecretNotYetValid"
            raise AccessDenied(f"{fetched.uri}: secret version {reason}", code=code)
        current = await self.store.installed(observed)
        if current is not None and current.version == fetched.version:
            return PollResult(entry.uri, Outcome.UNCHANGED, current)
        material = await anyio.to_thread.run_sync(
            CertificateMaterial.from_secret, fetched.value, fetched.content_type
        )
        # Shielded: leaving ``async with`` never interrupts an install halfway.
        with anyio.CancelScope(shield=True):
            installed = await self.store.install(observed, material, fetched.version)
        logger.info(
            "installed %s version %s (thumbprint %s) at %s",
            entry.uri,
            installed.version,
            installed.thumbprint,
            installed.location,
        )
        self._bus.publish(
            CertificateUpdated(
                uri=entry.uri,
                previous_version=current.version if current is not None else None,
                version=installed.version,
                thumbprint=installed.thumbprint,
                not_after=installed.not_after,
                location=installed.location,
            )
        )
        return PollResult(entry.uri, Outcome.UPDATED, installed)

    def _failed(self, entry: _Entry, error: Exception) -> tuple[PollResult, float]:
        entry.attempt += 1
        entry.last_error = error
        now = self.clock.now()
        initial = self.require_initial_sync and not entry.ready
        if initial and self.initial_sync_attempts is not None:
            entry.gave_up = entry.attempt >= self.initial_sync_attempts
        if _retryable(error) or (initial and not entry.gave_up):
            retry_after = error.retry_after if isinstance(error, SourceError) else None
            due = now + self.retry.delay(entry.attempt, retry_after, self._rng)
            if isinstance(error, Throttled):
                # Never come back before the vault's own pause ends.
                due = max(due, self.limiter(entry.vault).paused_until)
        else:
            due = self._next_regular(entry, now)
        if isinstance(error, KvCertSyncError):
            logger.warning("sync of %s failed (attempt %d): %s", entry.uri, entry.attempt, error)
        else:
            logger.warning(
                "sync of %s failed (attempt %d)", entry.uri, entry.attempt, exc_info=error
            )
        self._bus.publish(SyncFailed(entry.uri, error, entry.attempt, due - now))
        if not self.require_initial_sync:
            entry.settled = True
        self._check_ready(entry)
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
        duration = self.clock.now() - (self._started_at or self.clock.now())
        logger.info("initial sync: %d of %d certificates in place", count, len(entries))
        self._bus.publish(InitialSyncCompleted(count, duration))
        self._ready.set()

    def _check_expiry(self, entry: _Entry, result: PollResult) -> None:
        installed = result.installed
        if self.expiry_warning is None or installed is None:
            return
        remaining = installed.not_after - self.clock.utcnow()
        if remaining > self.expiry_warning:
            return
        now = self.clock.now()
        if entry.warned is not None:
            version, when = entry.warned
            if version == installed.version and now - when < _DAY:
                return
        entry.warned = (installed.version, now)
        logger.warning("%s expires %s and no newer version exists", entry.uri, installed.not_after)
        self._bus.publish(CertificateExpiring(entry.uri, installed.not_after, remaining))
