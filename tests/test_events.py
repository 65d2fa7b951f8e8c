import logging
import random
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import anyio
import anyio.lowlevel
import attrs
import pytest

from kvcertsync import SecretUri, SourceError
from kvcertsync.events import (
    CertificateExpiring,
    CertificateUpdated,
    Event,
    EventBus,
    InitialSyncCompleted,
    SyncFailed,
    SyncRecovered,
)

URI = SecretUri.parse("https://myvault.vault.azure.net/secrets/web")
OTHER = SecretUri.parse("https://myvault.vault.azure.net/secrets/api")
NOT_AFTER = datetime(2027, 1, 1, tzinfo=UTC)
AT = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
LOGGER = "kvcertsync.events"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Lets hanging sync hooks' abandoned worker threads finish when the test ends."""
    event = threading.Event()
    yield event
    event.set()


def updated(i: int, uri: SecretUri = URI) -> CertificateUpdated:
    return CertificateUpdated(
        uri,
        f"{i - 1:032x}" if i else None,
        f"{i:032x}",
        f"{i:040X}",
        NOT_AFTER,
        "/etc/ssl/web",
        AT,
    )


def failed(attempt: int = 1) -> SyncFailed:
    return SyncFailed(URI, SourceError("vault unreachable"), attempt, 2.0, AT)


async def wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> None:
    with anyio.fail_after(seconds):
        # Polling: the conditions are counters and lists, which have no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await anyio.sleep(0.005)


# -- events ---------------------------------------------------------------------------------

EVENT_FIELDS = {
    CertificateUpdated: [
        "uri",
        "previous_version",
        "version",
        "thumbprint",
        "not_after",
        "location",
        "at",
        "replayed",
    ],
    SyncFailed: ["uri", "error", "attempt", "retry_in", "at"],
    SyncRecovered: ["uri", "failures", "at"],
    InitialSyncCompleted: ["count", "duration", "at"],
    CertificateExpiring: ["uri", "not_after", "remaining", "at"],
}


def test_event_fields_match_allowlist_and_hold_no_secret_material() -> None:
    assert attrs.fields(Event) == ()
    assert set(Event.__subclasses__()) == set(EVENT_FIELDS)
    for cls, names in EVENT_FIELDS.items():
        fields = attrs.fields(cls)
        assert [f.name for f in fields] == names, cls
        # `at` comes last, has a default and is timezone-aware UTC.
        assert fields[-1].default is not attrs.NOTHING
    events: list[Event] = [
        CertificateUpdated(URI, None, "v", "T", NOT_AFTER, "/x"),
        SyncFailed(URI, ValueError("x"), 1, None),
        InitialSyncCompleted(3, 1.5),
        CertificateExpiring(URI, NOT_AFTER, timedelta(days=10)),
    ]
    for event in events:
        assert event.at.tzinfo is not None
        assert event.at.utcoffset() == timedelta(0)
        assert abs(datetime.now(UTC) - event.at) < timedelta(seconds=60)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            event.at = NOT_AFTER  # type: ignore[misc]


def test_events_take_positional_arguments_and_compare_by_value() -> None:
    at = datetime(2026, 5, 1, tzinfo=UTC)
    assert updated(1) == updated(1)
    first = InitialSyncCompleted(2, 0.5, at)
    assert first == InitialSyncCompleted(2, 0.5, at)
    assert hash(first) == hash(InitialSyncCompleted(2, 0.5, at))
    # Errors are not compared: two failures of the same attempt at the same time are equal.
    assert SyncFailed(URI, ValueError("a"), 1, None, at) == SyncFailed(
        URI, ValueError("b"), 1, None, at
    )


def test_sync_failed_repr_shows_error_type_and_message_only() -> None:
    class LeakyError(Exception):
        def __repr__(self) -> str:
            return "LeakyError(internal-state-not-for-logs)"

    event = SyncFailed(URI, LeakyError("token request failed"), 3, None)
    assert event.message == "LeakyError: token request failed"
    text = repr(event)
    assert "error='LeakyError: token request failed'" in text
    assert "internal-state-not-for-logs" not in text
    assert "attempt=3" in text
    assert str(URI) in text
    assert failed().message == "SourceError: vault unreachable"


def test_describe_gives_one_line_summaries() -> None:
    event = CertificateUpdated(
        URI, "1a2b3c4d" * 4, "3c4d5e6f" * 4, "AB12CD34" * 5, NOT_AFTER, "/etc/ssl/web"
    )
    assert event.describe() == (
        f"updated {URI} 1a2b3c4d.. -> 3c4d5e6f.. "
        "(thumbprint AB12CD34.., expires 2027-01-01) at /etc/ssl/web"
    )
    assert "(none) ->" in updated(0).describe()
    assert failed().describe() == (
        f"failed {URI} (attempt 1): SourceError: vault unreachable; retry in 2.0s"
    )
    gave_up = SyncFailed(URI, ValueError("bad"), 5, None).describe()
    assert gave_up.endswith("no retry scheduled")
    assert InitialSyncCompleted(1, 0.25).describe() == (
        "initial sync completed: 1 certificate in 0.25s"
    )
    assert "2 certificates" in InitialSyncCompleted(2, 1).describe()
    expiring = CertificateExpiring(URI, NOT_AFTER, timedelta(days=10)).describe()
    assert expiring == f"expiring {URI} on 2027-01-01 (10.0 days left)"
    expired = CertificateExpiring(URI, NOT_AFTER, -timedelta(hours=3)).describe()
    assert expired == f"expired {URI} on 2027-01-01 (3.0 hours ago)"
    summaries = [e.describe() for e in (updated(1), failed(), InitialSyncCompleted(1, 1.0))]
    assert all("\n" not in text for text in summaries)


# -- callbacks ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sync_and_async_callbacks_receive_events() -> None:
    bus = EventBus()
    sync_seen: list[Event] = []
    async_seen: list[Event] = []
    threads: set[int] = set()

    def sync_hook(event: Event) -> None:
        threads.add(threading.get_ident())
        sync_seen.append(event)

    async def async_hook(event: Event) -> None:
        async_seen.append(event)

    sync_sub = bus.subscribe(sync_hook)
    async_sub = bus.subscribe(async_hook)
    events = [updated(1), failed(), InitialSyncCompleted(1, 0.1)]
    async with bus:
        for event in events:
            bus.publish(event)
        await wait_until(lambda: len(sync_seen) == len(async_seen) == 3)
    assert sync_seen == async_seen == events
    # Sync hooks run in worker threads so they cannot block the event loop.
    assert threading.get_ident() not in threads
    assert sync_sub.delivered == async_sub.delivered == 3
    assert sync_sub.failures == async_sub.failures == 0
    assert bus.stats.published == 3
    assert bus.stats.delivered == 6


@pytest.mark.anyio
async def test_callable_objects_and_coroutine_returning_lambdas_are_awaited() -> None:
    bus = EventBus()
    seen: list[str] = []

    class Hook:
        async def __call__(self, event: Event) -> None:
            await anyio.lowlevel.checkpoint()
            seen.append("object")

    async def record(event: Event) -> None:
        seen.append("lambda")

    bus.subscribe(Hook())
    bus.subscribe(lambda event: record(event))
    async with bus:
        bus.publish(updated(1))
        await wait_until(lambda: len(seen) == 2)
    assert sorted(seen) == ["lambda", "object"]


@pytest.mark.anyio
async def test_type_filtering() -> None:
    bus = EventBus()
    updates: list[CertificateUpdated] = []
    problems: list[Event] = []
    everything: list[Event] = []

    async def on_update(event: CertificateUpdated) -> None:
        updates.append(event)

    def on_problem(event: Event) -> None:
        problems.append(event)

    bus.subscribe(on_update, CertificateUpdated)
    bus.subscribe(on_problem, SyncFailed, CertificateExpiring)
    bus.subscribe(everything.append)
    events: list[Event] = [
        updated(1),
        failed(),
        InitialSyncCompleted(1, 0.1),
        CertificateExpiring(URI, NOT_AFTER, timedelta(days=3)),
        updated(2),
    ]
    async with bus:
        for event in events:
            bus.publish(event)
        await wait_until(lambda: len(everything) == 5)
        await wait_until(lambda: len(updates) == 2 and len(problems) == 2)
    assert updates == [events[0], events[4]]
    assert problems == [events[1], events[3]]
    assert everything == events


def test_subscribe_and_publish_reject_wrong_types() -> None:
    bus = EventBus()
    with pytest.raises(TypeError, match="not an Event subclass"):
        bus.subscribe(print, str)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="callable"):
        bus.subscribe("print")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="Event instances"):
        bus.publish("hello")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="buffer"):
        EventBus(buffer=0)
    with pytest.raises(ValueError, match="buffer"):
        bus.events(buffer=0)


@pytest.mark.anyio
async def test_unsubscribe_stops_delivery_and_is_idempotent() -> None:
    bus = EventBus()
    seen: list[Event] = []
    kept: list[Event] = []

    async def hook(event: Event) -> None:
        seen.append(event)

    sub = bus.subscribe(hook)
    bus.subscribe(kept.append)
    async with bus:
        bus.publish(updated(1))
        await wait_until(lambda: len(seen) == 1 and len(kept) == 1)
        sub.unsubscribe()
        sub.unsubscribe()
        assert not sub.active
        bus.publish(updated(2))
        bus.publish(updated(3))
        await wait_until(lambda: len(kept) == 3)
    assert seen == [updated(1)]
    assert sub.delivered == 1
    assert bus.stats.subscribers == 1


@pytest.mark.anyio
async def test_context_manager_unsubscribes() -> None:
    bus = EventBus()
    seen: list[Event] = []
    kept: list[Event] = []
    bus.subscribe(kept.append)
    async with bus:
        with bus.subscribe(seen.append) as sub:
            bus.publish(updated(1))
            await wait_until(lambda: len(seen) == 1)
        assert not sub.active
        bus.publish(updated(2))
        await wait_until(lambda: len(kept) == 2)
    assert seen == [updated(1)]


@pytest.mark.anyio
async def test_unsubscribe_discards_pending_events_and_works_from_inside_the_hook() -> None:
    bus = EventBus()
    seen: list[Event] = []
    kept: list[Event] = []

    async def once(event: Event) -> None:
        seen.append(event)
        sub.unsubscribe()

    sub = bus.subscribe(once)
    bus.subscribe(kept.append)
    for i in range(5):
        bus.publish(updated(i))
    async with bus:
        await wait_until(lambda: len(kept) == 5)
        await wait_until(lambda: not sub.active)
    assert seen == [updated(0)]
    assert sub.pending == 0


# -- ordering -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_500_events_arrive_in_order_at_every_subscriber() -> None:
    bus = EventBus()
    slow: list[int] = []
    threaded: list[int] = []
    streamed: list[int] = []
    rng = random.Random(1234)

    async def slow_hook(event: CertificateUpdated) -> None:
        await anyio.sleep(rng.random() / 1000)
        slow.append(int(event.version, 16))

    def sync_hook(event: CertificateUpdated) -> None:
        threaded.append(int(event.version, 16))

    slow_sub = bus.subscribe(slow_hook, CertificateUpdated)
    bus.subscribe(sync_hook, CertificateUpdated)
    async with bus, bus.events(CertificateUpdated) as stream:
        for i in range(500):
            bus.publish(updated(i))
            if i % 50 == 0:
                # Let deliveries interleave with publishing, as they do in the engine.
                await anyio.lowlevel.checkpoint()
        async for event in stream:
            streamed.append(int(event.version, 16))
            if len(streamed) == 500:
                break
        await wait_until(lambda: len(slow) == len(threaded) == 500, seconds=20)
    assert slow == threaded == streamed == list(range(500))
    assert slow_sub.delivered == 500
    assert bus.stats.dropped == 0


# -- isolation ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_raising_and_hanging_hooks_do_not_disturb_others(
    caplog: pytest.LogCaptureFixture, release: threading.Event
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    # The bound also holds the good hook's worker thread, which must start within it.
    bus = EventBus(hook_timeout=1)
    good: list[Event] = []

    async def raising_hook(event: Event) -> None:
        raise RuntimeError("hook bug")

    async def hanging_async_hook(event: Event) -> None:
        await anyio.sleep_forever()

    def hanging_sync_hook(event: Event) -> None:
        release.wait(5)

    raising = bus.subscribe(raising_hook)
    hanging_async = bus.subscribe(hanging_async_hook)
    hanging_sync = bus.subscribe(hanging_sync_hook)
    good_sub = bus.subscribe(good.append)
    events = [updated(i) for i in range(4)]
    with anyio.fail_after(30):
        async with bus:
            for event in events:
                bus.publish(event)
            await wait_until(lambda: len(good) == 4, seconds=20)
            await wait_until(
                lambda: hanging_async.failures == hanging_sync.failures == 4, seconds=20
            )
    assert good == events
    assert good_sub.failures == 0
    assert raising.failures == 4
    assert raising.delivered == hanging_async.delivered == hanging_sync.delivered == 0
    assert bus.stats.failures == 12

    raised = [r for r in caplog.records if "raising_hook" in r.getMessage()]
    assert len(raised) == 4
    assert all(r.levelno == logging.WARNING for r in raised)
    assert all("CertificateUpdated" in r.getMessage() for r in raised)
    assert raised[0].exc_info is not None
    assert isinstance(raised[0].exc_info[1], RuntimeError)
    timed_out = [r for r in caplog.records if "timed out" in r.getMessage()]
    assert {
        n
        for r in timed_out
        for n in ("hanging_async_hook", "hanging_sync_hook")
        if n in r.getMessage()
    } == {"hanging_async_hook", "hanging_sync_hook"}
    assert all(r.exc_info is None for r in timed_out)


@pytest.mark.anyio
async def test_hook_raising_timeout_error_is_a_failure_not_a_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    bus = EventBus(hook_timeout=5)

    async def hook(event: Event) -> None:
        raise TimeoutError("upstream timed out")

    sub = bus.subscribe(hook)
    async with bus:
        bus.publish(updated(1))
        await wait_until(lambda: sub.failures == 1)
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert "raised handling CertificateUpdated" in record.getMessage()
    assert record.exc_info is not None


# -- events() iterator ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_iterator_receives_in_order_and_filters() -> None:
    bus = EventBus()
    received: list[Event] = []
    async with bus:
        stream = bus.events(SyncFailed, CertificateUpdated)

        async def read() -> None:
            async for event in stream:
                received.append(event)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            await anyio.sleep(0.01)
            bus.publish(updated(1))
            bus.publish(InitialSyncCompleted(1, 0.1))
            bus.publish(failed())
            await anyio.sleep(0.01)
            bus.publish(updated(2))
            await wait_until(lambda: len(received) == 3)
            await stream.aclose()
    assert received == [updated(1), failed(), updated(2)]
    assert bus.stats.streams == 0


@pytest.mark.anyio
async def test_slow_consumer_sees_newest_events_and_drops_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    bus = EventBus()
    async with bus.events(buffer=3) as stream:
        for i in range(10):
            bus.publish(updated(i))
        assert stream.dropped == 7
        assert stream.pending == 3
        got = [await stream.__anext__() for _ in range(3)]
    assert got == [updated(7), updated(8), updated(9)]
    drops = [r for r in caplog.records if "buffer full" in r.getMessage()]
    assert len(drops) == 1
    assert drops[0].levelno == logging.WARNING
    assert bus.stats.dropped == 7


@pytest.mark.anyio
async def test_drop_warning_is_logged_once_per_burst(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    bus = EventBus()
    stream = bus.events(buffer=2)
    for burst in range(2):
        for i in range(5):
            bus.publish(updated(i))
        async for _ in stream:
            if stream.pending == 0:
                break
        assert len([r for r in caplog.records if "buffer full" in r.getMessage()]) == burst + 1
    assert stream.dropped == 6


@pytest.mark.anyio
async def test_publish_never_blocks_on_an_unread_iterator() -> None:
    bus = EventBus()
    stream = bus.events()
    other = bus.events(buffer=10)
    for i in range(10_000):
        bus.publish(updated(i))
    assert bus.stats.published == 10_000
    assert stream.pending == 1000
    assert stream.dropped == 9000
    assert other.pending == 10
    assert other.dropped == 9990
    assert await stream.__anext__() == updated(9000)
    await stream.aclose()
    await other.aclose()


@pytest.mark.anyio
async def test_closing_an_iterator_ends_it_and_unsubscribes() -> None:
    bus = EventBus()
    stream = bus.events()
    bus.publish(updated(1))
    await stream.aclose()
    bus.publish(updated(2))
    assert [event async for event in stream] == []
    assert bus.stats.streams == 0


@pytest.mark.anyio
async def test_iterator_ends_after_bus_closes_once_drained() -> None:
    bus = EventBus()
    async with bus:
        stream = bus.events()
        bus.publish(updated(1))
        bus.publish(updated(2))
    assert stream.closed
    bus.publish(updated(3))
    with anyio.fail_after(5):
        assert [event async for event in stream] == [updated(1), updated(2)]


@pytest.mark.anyio
async def test_waiting_reader_wakes_when_bus_closes() -> None:
    bus = EventBus()
    received: list[Event] = []
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg, bus:
            stream = bus.events()

            async def read() -> None:
                async for event in stream:
                    received.append(event)

            tg.start_soon(read)
            bus.publish(updated(1))
            await wait_until(lambda: len(received) == 1)
    assert received == [updated(1)]


# -- lifecycle ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_events_published_before_start_are_delivered_after_start() -> None:
    bus = EventBus()
    seen: list[Event] = []
    sub = bus.subscribe(seen.append)
    for i in range(3):
        bus.publish(updated(i))
    await anyio.sleep(0.01)
    assert seen == []
    assert sub.pending == 3
    async with bus:
        await wait_until(lambda: len(seen) == 3)
    assert seen == [updated(0), updated(1), updated(2)]


@pytest.mark.anyio
async def test_callback_buffer_drops_oldest_while_not_running() -> None:
    bus = EventBus(buffer=5)
    seen: list[Event] = []
    sub = bus.subscribe(seen.append)
    for i in range(8):
        bus.publish(updated(i))
    assert sub.dropped == 3
    async with bus:
        await wait_until(lambda: len(seen) == 5)
    assert seen == [updated(i) for i in range(3, 8)]


@pytest.mark.anyio
async def test_subscriber_added_while_running_gets_a_delivery_task() -> None:
    bus = EventBus()
    seen: list[Event] = []
    async with bus:
        bus.subscribe(seen.append)
        bus.publish(updated(1))
        await wait_until(lambda: len(seen) == 1)
    assert seen == [updated(1)]


@pytest.mark.anyio
async def test_leaving_the_bus_with_a_hanging_hook_returns() -> None:
    bus = EventBus(hook_timeout=None, shutdown_grace=0.1)
    started = anyio.Event()
    ended: list[str] = []

    async def hanging(event: Event) -> None:
        started.set()
        try:
            await anyio.sleep_forever()
        finally:
            ended.append("cancelled")

    sub = bus.subscribe(hanging)
    with anyio.fail_after(5):
        async with bus:
            bus.publish(updated(1))
            bus.publish(updated(2))
            await started.wait()
    assert not bus.running
    assert ended == ["cancelled"]
    # A hook cut off by shutdown has not failed; the undelivered event waits for the next run.
    assert sub.failures == 0
    assert sub.pending == 1


@pytest.mark.anyio
async def test_leaving_the_bus_with_a_hanging_sync_hook_returns(release: threading.Event) -> None:
    bus = EventBus(shutdown_grace=0.1)
    started = threading.Event()

    def hanging(event: Event) -> None:
        started.set()
        release.wait(5)

    bus.subscribe(hanging)
    with anyio.fail_after(5):
        async with bus:
            bus.publish(updated(1))
            await anyio.to_thread.run_sync(started.wait)
    assert not bus.running


@pytest.mark.anyio
async def test_shutdown_delivers_what_is_buffered_within_the_grace() -> None:
    bus = EventBus(shutdown_grace=5)
    seen: list[Event] = []

    async def slow(event: Event) -> None:
        await anyio.sleep(0.01)
        seen.append(event)

    bus.subscribe(slow)
    with anyio.fail_after(5):
        async with bus:
            for i in range(5):
                bus.publish(updated(i))
    assert seen == [updated(i) for i in range(5)]


@pytest.mark.anyio
async def test_bus_can_be_entered_again_and_not_twice_at_once() -> None:
    bus = EventBus()
    seen: list[Event] = []
    bus.subscribe(seen.append)
    async with bus:
        assert repr(bus).startswith("<EventBus running")
        with pytest.raises(RuntimeError, match="already running"):
            await bus.__aenter__()
        bus.publish(updated(1))
        await wait_until(lambda: len(seen) == 1)
    assert not bus.running
    bus.publish(updated(2))
    async with bus:
        await wait_until(lambda: len(seen) == 2)
        stream = bus.events()
        bus.publish(updated(3))
        await wait_until(lambda: len(seen) == 3)
    assert seen == [updated(1), updated(2), updated(3)]
    assert [e async for e in stream] == [updated(3)]


def test_bus_survives_separate_event_loops() -> None:
    # The engine may run sync_once() passes under separate anyio.run() calls.
    bus = EventBus()
    seen: list[Event] = []

    async def hook(event: Event) -> None:
        seen.append(event)

    bus.subscribe(hook)

    async def one_pass(i: int) -> None:
        async with bus:
            bus.publish(updated(i))
            await wait_until(lambda: len(seen) == i)
            await anyio.sleep(0.01)  # leave the delivery task waiting for the next event

    anyio.run(one_pass, 1)
    anyio.run(one_pass, 2)
    assert seen == [updated(1), updated(2)]


@pytest.mark.anyio
async def test_an_error_in_the_body_propagates_unwrapped() -> None:
    bus = EventBus()
    bus.subscribe(lambda event: None)
    with pytest.raises(ValueError, match="engine bug"):
        async with bus:
            raise ValueError("engine bug")
    assert not bus.running


@pytest.mark.anyio
async def test_stats_and_reprs() -> None:
    bus = EventBus(hook_timeout=1)

    def broken(event: Event) -> None:
        raise ValueError("nope")

    sub = bus.subscribe(broken, SyncFailed)
    stream = bus.events(buffer=1)
    async with bus:
        bus.publish(failed())
        bus.publish(updated(1))
        await wait_until(lambda: sub.failures == 1)
    stats = bus.stats
    assert (stats.published, stats.delivered, stats.failures, stats.dropped) == (2, 0, 1, 1)
    assert stats.subscribers == 1
    assert stats.streams == 0
    assert "broken" in repr(sub)
    assert "failures=1" in repr(sub)
    assert "dropped=1" in repr(stream)
    assert "published=2" in repr(bus)
