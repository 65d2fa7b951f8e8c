"""Event classes and the EventBus that delivers them to hooks and async iterators."""

from __future__ import annotations

import enum
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar, cast, overload

import anyio
import anyio.abc
import anyio.lowlevel
import anyio.to_thread
import attrs

from kvcertsync.uri import SecretUri

if TYPE_CHECKING:
    from kvcertsync.stores.base import InstalledCertificate

__all__ = [
    "Announcer",
    "BusStats",
    "CertificateExpiring",
    "CertificateUpdated",
    "Event",
    "EventBus",
    "EventCallback",
    "EventStream",
    "InitialSyncCompleted",
    "Subscription",
    "SyncFailed",
    "SyncRecovered",
]

logger = logging.getLogger(__name__)


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _short(value: str, length: int = 8) -> str:
    return value if len(value) <= length else f"{value[:length]}.."


def _error_repr(error: BaseException) -> str:
    # Only type and message: an exception's args or attributes may carry far more than its text.
    return repr(f"{type(error).__name__}: {error}")


def _day(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d")


def _span(delta: timedelta) -> str:
    seconds = abs(delta.total_seconds())
    if seconds >= 86400:
        text = f"{seconds / 86400:.1f} days"
    elif seconds >= 3600:
        text = f"{seconds / 3600:.1f} hours"
    else:
        text = f"{seconds / 60:.0f} minutes"
    return text


# ---------------------------------------------------------------------------------------------
# Events. None of them has a field that could hold a secret value or a private key.


@attrs.frozen
class Event:
    """Base class of every event kvcertsync publishes."""

    @property
    def at(self) -> datetime:
        """When the event happened (timezone-aware UTC); every subclass has it as a field."""
        raise NotImplementedError

    def describe(self) -> str:
        """A one-line human summary of the event."""
        return type(self).__name__


@attrs.frozen
class CertificateUpdated(Event):
    """A new version of a certificate was installed (or, replayed, is installed)."""

    #: The observed secret URL.
    uri: SecretUri
    #: The version it replaced (None for the first install, and for a replay).
    previous_version: str | None
    #: The Key Vault secret version now installed.
    version: str
    #: SHA-1 of the leaf certificate, upper-case hex.
    thumbprint: str
    #: When the leaf certificate expires (UTC).
    not_after: datetime
    #: Where it was installed (a path, a Windows store, ``memory:<url>``).
    location: str
    #: When it happened (UTC).
    at: datetime = attrs.field(factory=_utcnow)
    #: True when this tells of a certificate already installed (a replay on subscribe, or what a
    #: restarted engine found in its store), not of a new install; ``previous_version`` is None.
    replayed: bool = False

    @classmethod
    def of(
        cls,
        uri: SecretUri,
        installed: InstalledCertificate,
        previous: InstalledCertificate | None = None,
        *,
        replayed: bool = False,
    ) -> CertificateUpdated:
        """The event telling that ``installed`` replaced ``previous`` (or is there, replayed)."""
        return cls(
            uri=uri,
            previous_version=previous.version if previous is not None else None,
            version=installed.version,
            thumbprint=installed.thumbprint,
            not_after=installed.not_after,
            location=installed.location,
            replayed=replayed,
        )

    def describe(self) -> str:
        """A one-line human summary of the event."""
        if self.replayed:
            return (
                f"installed {self.uri} {_short(self.version)} "
                f"(thumbprint {_short(self.thumbprint)}, expires {_day(self.not_after)}) "
                f"at {self.location}"
            )
        previous = _short(self.previous_version) if self.previous_version else "(none)"
        return (
            f"updated {self.uri} {previous} -> {_short(self.version)} "
            f"(thumbprint {_short(self.thumbprint)}, expires {_day(self.not_after)}) "
            f"at {self.location}"
        )


@attrs.frozen
class SyncFailed(Event):
    """Fetching or installing a certificate failed; ``retry_in`` is None when no retry is due."""

    #: The observed secret URL.
    uri: SecretUri
    #: What went wrong (a KvCertSyncError subclass; no secret in its message).
    error: BaseException = attrs.field(eq=False, repr=_error_repr)
    #: Consecutive failed polls of this certificate, this one included.
    attempt: int
    #: Seconds until the next try.
    retry_in: float | None
    #: When it happened (UTC).
    at: datetime = attrs.field(factory=_utcnow)

    @property
    def message(self) -> str:
        """The error's type and message, e.g. ``SourceError: vault unreachable``."""
        return f"{type(self.error).__name__}: {self.error}"

    def describe(self) -> str:
        """A one-line human summary of the event."""
        then = "no retry scheduled" if self.retry_in is None else f"retry in {self.retry_in:.1f}s"
        return f"failed {self.uri} (attempt {self.attempt}): {self.message}; {then}"


@attrs.frozen
class SyncRecovered(Event):
    """A certificate whose polls were failing was polled successfully again."""

    #: The observed secret URL.
    uri: SecretUri
    #: How many polls in a row had failed.
    failures: int
    #: When it happened (UTC).
    at: datetime = attrs.field(factory=_utcnow)

    def describe(self) -> str:
        """A one-line human summary of the event."""
        noun = "failure" if self.failures == 1 else "failures"
        return f"recovered {self.uri} after {self.failures} {noun}"


@attrs.frozen
class InitialSyncCompleted(Event):
    """Every observed certificate has been installed at least once."""

    #: How many certificates are installed.
    count: int
    #: Seconds from the start of the run.
    duration: float
    #: When it happened (UTC).
    at: datetime = attrs.field(factory=_utcnow)

    def describe(self) -> str:
        """A one-line human summary of the event."""
        noun = "certificate" if self.count == 1 else "certificates"
        return f"initial sync completed: {self.count} {noun} in {self.duration:.2f}s"


@attrs.frozen
class CertificateExpiring(Event):
    """An installed certificate expires soon (or already has)."""

    #: The observed secret URL.
    uri: SecretUri
    #: When the installed certificate expires (UTC).
    not_after: datetime
    #: How long until then (negative once expired).
    remaining: timedelta
    #: When it was noticed (UTC).
    at: datetime = attrs.field(factory=_utcnow)

    def describe(self) -> str:
        """A one-line human summary of the event."""
        if self.remaining.total_seconds() <= 0:
            return f"expired {self.uri} on {_day(self.not_after)} ({_span(self.remaining)} ago)"
        return f"expiring {self.uri} on {_day(self.not_after)} ({_span(self.remaining)} left)"


E = TypeVar("E", bound=Event)

#: What ``subscribe`` accepts: a plain or async callable taking one event.
EventCallback = Callable[[E], Awaitable[None] | None]


# ---------------------------------------------------------------------------------------------
# Buffers


class _Mailbox:
    """A bounded FIFO of events for one subscriber that drops its oldest entry when full."""

    __slots__ = (
        "_burst",
        "_done_waiters",
        "_items",
        "_waiters",
        "accepted",
        "budget",
        "closed",
        "done",
        "dropped",
        "limit",
        "name",
        "replay",
    )

    def __init__(self, name: str, limit: int, *, replay: bool = False) -> None:
        self.name = name
        self.limit = limit
        #: The subscriber asked for replay: it also gets what the engine learns of its store.
        self.replay = replay
        self.dropped = 0
        self.closed = False
        # Events ever put, and of those how many are finished (handled, dropped or discarded).
        self.accepted = 0
        self.done = 0
        self._done_waiters: list[tuple[int, anyio.Event]] = []
        # How many more events a delivery task may deliver while the bus shuts down.
        self.budget = 0
        self._items: deque[Event] = deque()
        self._waiters: list[anyio.Event] = []
        self._burst = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, event: Event) -> int:
        """Append ``event`` without blocking; return how many events were dropped (0 or 1)."""
        if self.closed:
            return 0
        dropped = 0
        self.accepted += 1
        if len(self._items) >= self.limit:
            oldest = self._items.popleft()
            dropped = 1
            self.dropped += 1
            self.finish()
            if not self._burst:
                # One line per burst: a stalled consumer must not flood the log.
                self._burst = True
                logger.warning(
                    "%s: event buffer full (%d); dropping oldest events, first %s "
                    "(%d dropped so far)",
                    self.name,
                    self.limit,
                    type(oldest).__name__,
                    self.dropped,
                )
        self._items.append(event)
        self._wake()
        return dropped

    def take(self) -> Event | None:
        """The oldest buffered event, or None."""
        if not self._items:
            return None
        self._burst = False
        return self._items.popleft()

    async def wait(self) -> None:
        """Wait until an event is buffered or the mailbox is closed."""
        if self._items or self.closed:
            await anyio.lowlevel.checkpoint()
            return
        # A fresh anyio.Event per wait: one left over from an earlier run could belong to
        # an event loop that no longer exists.
        waiter = anyio.Event()
        self._waiters.append(waiter)
        try:
            await waiter.wait()
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def close(self, *, discard: bool) -> None:
        """Accept no more events; keep the buffered ones readable unless ``discard``."""
        self.closed = True
        if discard:
            self.finish(len(self._items))
            self._items.clear()
        self._wake()
        self._wake_done(force=True)

    def finish(self, count: int = 1) -> None:
        """Count ``count`` events as finished with and wake whoever waits for them."""
        self.done += count
        self._wake_done()

    async def wait_done(self, target: int) -> None:
        """Wait until the first ``target`` events put are finished with (or the box closes)."""
        if self.done >= target or self.closed:
            return
        entry = (target, anyio.Event())
        self._done_waiters.append(entry)
        try:
            await entry[1].wait()
        finally:
            if entry in self._done_waiters:
                self._done_waiters.remove(entry)

    def _wake_done(self, *, force: bool = False) -> None:
        waiting = []
        for target, waiter in self._done_waiters:
            if force or self.done >= target:
                waiter.set()
            else:
                waiting.append((target, waiter))
        self._done_waiters = waiting

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.set()


def _callback_name(callback: Callable[..., Any]) -> str:
    name = getattr(callback, "__qualname__", None) or getattr(callback, "__name__", None)
    return str(name) if name else repr(callback)


def _is_async_callable(callback: Callable[..., Any]) -> bool:
    # The second test catches instances of classes with an ``async def __call__``.
    return inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(
        type(callback).__call__
    )


def _check_types(event_types: tuple[type[Event], ...]) -> tuple[type[Event], ...]:
    for event_type in event_types:
        if not (isinstance(event_type, type) and issubclass(event_type, Event)):
            raise TypeError(f"{event_type!r} is not an Event subclass")
    return event_types


def _matches(event_types: tuple[type[Event], ...], event: Event) -> bool:
    return not event_types or isinstance(event, event_types)


# ---------------------------------------------------------------------------------------------
# Subscribers


@attrs.define(eq=False, repr=False)
class Subscription:
    """A callback's subscription to an EventBus; ``unsubscribe()`` or leave ``with`` to end it."""

    callback: Callable[[Any], Awaitable[None] | None]
    event_types: tuple[type[Event], ...]
    _bus: EventBus
    _mailbox: _Mailbox
    _is_async: bool
    #: Events the callback handled without raising or timing out.
    delivered: int = attrs.field(default=0, init=False)
    #: Events whose callback raised or timed out.
    failures: int = attrs.field(default=0, init=False)
    _task_running: bool = attrs.field(default=False, init=False)

    @property
    def name(self) -> str:
        """The callback's name, as logs show it."""
        return self._mailbox.name

    @property
    def dropped(self) -> int:
        """Events dropped because this subscriber's buffer was full."""
        return self._mailbox.dropped

    @property
    def pending(self) -> int:
        """Events buffered and not yet delivered."""
        return len(self._mailbox)

    @property
    def active(self) -> bool:
        """Whether the subscription still receives events."""
        return not self._mailbox.closed

    def unsubscribe(self) -> None:
        """Stop delivery: pending events are discarded; a call in progress may finish."""
        self._bus._unsubscribe(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.unsubscribe()

    def __repr__(self) -> str:
        types = ", ".join(t.__name__ for t in self.event_types) or "all events"
        state = "active" if self.active else "unsubscribed"
        return (
            f"<Subscription {self.name} ({types}) {state} delivered={self.delivered} "
            f"failures={self.failures} dropped={self.dropped}>"
        )


class EventStream(Generic[E]):
    """An async iterator over published events with its own bounded buffer."""

    def __init__(
        self, bus: EventBus, mailbox: _Mailbox, event_types: tuple[type[Event], ...]
    ) -> None:
        self._bus = bus
        self._mailbox = mailbox
        self.event_types = event_types

    @property
    def dropped(self) -> int:
        """Events dropped because the reader fell behind by more than the buffer."""
        return self._mailbox.dropped

    @property
    def pending(self) -> int:
        """Events buffered and not yet read."""
        return len(self._mailbox)

    @property
    def closed(self) -> bool:
        """Whether the stream accepts no more events (buffered ones may still be read)."""
        return self._mailbox.closed

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> E:
        while True:
            # Checkpoint first: a cancelled reader must not take (and lose) an event.
            await anyio.lowlevel.checkpoint()
            event = self._mailbox.take()
            if event is not None:
                return cast(E, event)  # put() only buffers instances of event_types
            if self._mailbox.closed:
                raise StopAsyncIteration
            await self._mailbox.wait()

    def close(self) -> None:
        """Unsubscribe now; buffered events are discarded and iteration ends."""
        self._bus._remove_stream(self)
        self._mailbox.close(discard=True)

    async def aclose(self) -> None:
        """Unsubscribe now; buffered events are discarded and iteration ends."""
        self.close()
        await anyio.lowlevel.checkpoint()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _end(self) -> None:
        # The bus shut down: stop accepting events but let the reader drain what is buffered.
        self._mailbox.close(discard=False)

    def __repr__(self) -> str:
        types = ", ".join(t.__name__ for t in self.event_types) or "all events"
        state = "closed" if self.closed else "open"
        return f"<EventStream ({types}) {state} pending={self.pending} dropped={self.dropped}>"


# ---------------------------------------------------------------------------------------------
# The bus


class _State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CLOSING = "closing"


@attrs.frozen
class BusStats:
    """Counters of an EventBus since it was created."""

    published: int
    delivered: int
    failures: int
    dropped: int
    subscribers: int
    streams: int


class EventBus:
    """Fans events out to callbacks (in delivery tasks) and async iterators, never blocking."""

    def __init__(
        self,
        *,
        hook_timeout: float | None = 30.0,
        buffer: int = 1000,
        shutdown_grace: float = 1.0,
    ) -> None:
        if buffer < 1:
            raise ValueError(f"buffer must be at least 1, not {buffer}")
        if hook_timeout is not None and hook_timeout <= 0:
            raise ValueError(f"hook_timeout must be positive, not {hook_timeout}")
        if shutdown_grace < 0:
            raise ValueError(f"shutdown_grace must not be negative, not {shutdown_grace}")
        self.hook_timeout = hook_timeout
        self.buffer = buffer
        self.shutdown_grace = shutdown_grace
        self._state = _State.IDLE
        self._task_group: anyio.abc.TaskGroup | None = None
        self._subscriptions: list[Subscription] = []
        self._streams: list[EventStream[Any]] = []
        self._active_tasks = 0
        self._all_done: anyio.Event | None = None
        self._published = 0
        self._delivered = 0
        self._failures = 0
        self._dropped = 0
        self._keep_streams = False

    # -- introspection --------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the bus is inside ``async with`` and delivering to callbacks."""
        return self._state is _State.RUNNING

    @property
    def stats(self) -> BusStats:
        """Totals since creation, including subscribers that have since unsubscribed."""
        return BusStats(
            published=self._published,
            delivered=self._delivered,
            failures=self._failures,
            dropped=self._dropped,
            subscribers=len(self._subscriptions),
            streams=len(self._streams),
        )

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """The active callback subscriptions."""
        return tuple(self._subscriptions)

    # -- subscribing ----------------------------------------------------------------------

    @overload
    def subscribe(
        self,
        callback: EventCallback[Event],
        *,
        buffer: int | None = None,
        replay: Iterable[Event] | None = None,
    ) -> Subscription: ...

    @overload
    def subscribe(
        self,
        callback: EventCallback[E],
        event_type: type[E],
        /,
        *event_types: type[E],
        buffer: int | None = None,
        replay: Iterable[Event] | None = None,
    ) -> Subscription: ...

    def subscribe(
        self,
        callback: Callable[[Any], Awaitable[None] | None],
        *event_types: type[Event],
        buffer: int | None = None,
        replay: Iterable[Event] | None = None,
    ) -> Subscription:
        """Call ``callback`` (sync or async) with each event of ``event_types`` (default: all).

        With ``replay`` (events describing the present state), the subscriber gets those
        first, and later ``publish(..., replay_only=True)`` events too.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        name = _callback_name(callback)
        types = _check_types(event_types)
        mailbox = _Mailbox(f"event hook {name}", self._limit(buffer), replay=replay is not None)
        subscription = Subscription(
            callback=callback,
            event_types=types,
            bus=self,
            mailbox=mailbox,
            is_async=_is_async_callable(callback),
        )
        self._seed(mailbox, types, replay)
        self._subscriptions.append(subscription)
        if self._state is _State.RUNNING:
            self._start(subscription)
        return subscription

    @overload
    def events(
        self, *, buffer: int | None = None, replay: Iterable[Event] | None = None
    ) -> EventStream[Event]: ...

    @overload
    def events(
        self,
        event_type: type[E],
        /,
        *event_types: type[E],
        buffer: int | None = None,
        replay: Iterable[Event] | None = None,
    ) -> EventStream[E]: ...

    def events(
        self,
        *event_types: type[Event],
        buffer: int | None = None,
        replay: Iterable[Event] | None = None,
    ) -> EventStream[Any]:
        """An async iterator over events of ``event_types`` (default: all) published from now.

        ``replay`` works as for ``subscribe``.
        """
        types = _check_types(event_types)
        mailbox = _Mailbox("event stream", self._limit(buffer), replay=replay is not None)
        stream: EventStream[Any] = EventStream(self, mailbox, types)
        self._seed(mailbox, types, replay)
        self._streams.append(stream)
        return stream

    def _seed(
        self, mailbox: _Mailbox, types: tuple[type[Event], ...], replay: Iterable[Event] | None
    ) -> None:
        for event in replay or ():
            if _matches(types, event):
                self._dropped += mailbox.put(event)

    def _limit(self, buffer: int | None) -> int:
        limit = self.buffer if buffer is None else buffer
        if limit < 1:
            raise ValueError(f"buffer must be at least 1, not {limit}")
        return limit

    def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)
        subscription._mailbox.close(discard=True)

    def _remove_stream(self, stream: EventStream[Any]) -> None:
        if stream in self._streams:
            self._streams.remove(stream)

    # -- publishing -----------------------------------------------------------------------

    def publish(self, event: Event, *, replay_only: bool = False) -> None:
        """Buffer ``event`` for every matching subscriber; never blocks, never raises for them.

        With ``replay_only``, only subscribers that asked for replay get it (present state
        learned late, which the others must not take for a change).
        Call it from the event loop's thread (or while no loop runs): buffers are not locked.
        """
        if not isinstance(event, Event):
            raise TypeError(f"can only publish Event instances, not {type(event).__name__}")
        self._published += 1
        mailboxes = [s._mailbox for s in self._subscriptions if _matches(s.event_types, event)]
        mailboxes += [s._mailbox for s in self._streams if _matches(s.event_types, event)]
        for mailbox in mailboxes:
            if mailbox.replay or not replay_only:
                self._dropped += mailbox.put(event)

    def marks(self) -> dict[Subscription, int]:
        """How many events each callback subscriber has been given so far (for ``settle``)."""
        return {s: s._mailbox.accepted for s in self._subscriptions}

    async def settle(self, marks: Mapping[Subscription, int]) -> None:
        """Wait until each subscriber in ``marks`` has finished with the events counted there.

        Returns at once when the bus is not delivering: nobody would handle them.
        """
        for subscription, target in marks.items():
            if self._state is not _State.RUNNING:
                return
            await subscription._mailbox.wait_done(target)

    # -- running --------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._state is not _State.IDLE:
            raise RuntimeError(f"the event bus is already {self._state.value}")
        task_group = anyio.create_task_group()
        await task_group.__aenter__()
        self._task_group = task_group
        self._state = _State.RUNNING
        for subscription in self._subscriptions:
            self._start(subscription)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task_group = self._task_group
        if self._state is not _State.RUNNING or task_group is None:
            raise RuntimeError("the event bus is not running")
        self._state = _State.CLOSING
        # Delivery tasks finish what is buffered now; later events wait for the next run.
        for subscription in self._subscriptions:
            subscription._mailbox.budget = len(subscription._mailbox)
            subscription._mailbox._wake()
        try:
            if self._active_tasks:
                self._all_done = anyio.Event()
                with anyio.move_on_after(self.shutdown_grace):
                    await self._all_done.wait()
        finally:
            task_group.cancel_scope.cancel()
            try:
                # The body's exception is not passed on: the task group would wrap it in an
                # ExceptionGroup, and delivery tasks never fail, so it has nothing to add.
                await task_group.__aexit__(None, None, None)
            finally:
                self._task_group = None
                self._all_done = None
                for subscription in self._subscriptions:
                    # Nobody delivers now: whoever waits in ``settle`` must not wait forever.
                    subscription._mailbox._wake_done(force=True)
                if not self._keep_streams:
                    self.end_streams()
                self._keep_streams = False
                self._state = _State.IDLE

    @asynccontextmanager
    async def delivering(self, *, end_streams: bool = True) -> AsyncIterator[Self]:
        """Like ``async with bus``, but with ``end_streams=False`` iterators outlive the run."""
        self._keep_streams = not end_streams
        async with self:
            yield self

    def end_streams(self) -> None:
        """End every async iterator once its buffered events are read."""
        for stream in tuple(self._streams):
            self._remove_stream(stream)
            stream._end()

    def _start(self, subscription: Subscription) -> None:
        if subscription._task_running or self._task_group is None:
            return
        subscription._task_running = True
        self._active_tasks += 1
        self._task_group.start_soon(
            self._run_subscription, subscription, name=f"kvcertsync {subscription.name}"
        )

    async def _run_subscription(self, subscription: Subscription) -> None:
        mailbox = subscription._mailbox
        try:
            while not mailbox.closed:
                closing = self._state is not _State.RUNNING
                if closing and mailbox.budget <= 0:
                    return
                event = mailbox.take()
                if event is None:
                    if closing:
                        return
                    await mailbox.wait()
                    continue
                if closing:
                    mailbox.budget -= 1
                try:
                    await self._deliver(subscription, event)
                finally:
                    mailbox.finish()
        finally:
            subscription._task_running = False
            self._active_tasks -= 1
            if self._active_tasks == 0 and self._all_done is not None:
                self._all_done.set()

    async def _deliver(self, subscription: Subscription, event: Event) -> None:
        callback = subscription.callback
        kind = type(event).__name__
        try:
            with anyio.fail_after(self.hook_timeout) as scope:
                if subscription._is_async:
                    result = callback(event)
                else:
                    # A worker thread, abandoned on timeout: a hanging sync hook must not
                    # block the event loop or the bus's shutdown.
                    result = await anyio.to_thread.run_sync(callback, event, abandon_on_cancel=True)
                # Also covers a plain callable that returns a coroutine (a lambda, a partial).
                if inspect.isawaitable(result):
                    await result
        except TimeoutError:
            subscription.failures += 1
            self._failures += 1
            if scope.cancelled_caught:
                logger.warning(
                    "%s timed out after %ss handling %s; continuing with the next event",
                    subscription.name,
                    self.hook_timeout,
                    kind,
                )
            else:
                logger.warning("%s raised handling %s", subscription.name, kind, exc_info=True)
        except Exception:
            subscription.failures += 1
            self._failures += 1
            logger.warning("%s raised handling %s", subscription.name, kind, exc_info=True)
        else:
            subscription.delivered += 1
            self._delivered += 1

    def __repr__(self) -> str:
        return (
            f"<EventBus {self._state.value} subscribers={len(self._subscriptions)} "
            f"streams={len(self._streams)} published={self._published}>"
        )


class Announcer:
    """``subscribe`` and ``events`` over an EventBus, with a replay of the present state.

    The base of CertSync and StoreWatcher: async callbacks run on the event loop, plain ones
    in a worker thread; with ``replay`` a subscriber first gets a ``CertificateUpdated``
    (``replayed=True``) for each certificate installed now, so one callback serves both a start
    and every renewal.
    """

    _bus: EventBus

    def _present(self) -> Iterable[Event]:
        """The events that describe the present state, for replay."""
        return ()

    async def settle(self) -> None:
        """Return once every callback has handled (or timed out on) the events published so far."""
        await self._bus.settle(self._bus.marks())

    @overload
    def subscribe(
        self,
        callback: EventCallback[Event],
        *,
        replay: bool = False,
        buffer: int | None = None,
    ) -> Subscription: ...

    @overload
    def subscribe(
        self,
        callback: EventCallback[E],
        event_type: type[E],
        /,
        *event_types: type[E],
        replay: bool = False,
        buffer: int | None = None,
    ) -> Subscription: ...

    def subscribe(
        self,
        callback: Callable[[Any], Awaitable[None] | None],
        *event_types: type[Event],
        replay: bool = False,
        buffer: int | None = None,
    ) -> Subscription:
        """Call ``callback(event)`` for each event (of ``event_types``, when given)."""
        present = list(self._present()) if replay else None
        return self._bus.subscribe(callback, *event_types, buffer=buffer, replay=present)

    @overload
    def events(self, *, replay: bool = False, buffer: int | None = None) -> EventStream[Event]: ...

    @overload
    def events(
        self,
        event_type: type[E],
        /,
        *event_types: type[E],
        replay: bool = False,
        buffer: int | None = None,
    ) -> EventStream[E]: ...

    def events(
        self, *event_types: type[Event], replay: bool = False, buffer: int | None = None
    ) -> EventStream[Any]:
        """An async iterator over events (of ``event_types``, when given)."""
        present = list(self._present()) if replay else None
        return self._bus.events(*event_types, buffer=buffer, replay=present)
