"""Issue 16's fleet behaviour: Retry-After waits jittered, never shortened."""

from __future__ import annotations

import random

import pytest

from kvcertsync.clock import FakeClock
from kvcertsync.emulator import TestAuthority
from kvcertsync.engine import CertSync
from kvcertsync.errors import Throttled
from kvcertsync.events import Event, SyncFailed
from kvcertsync.limits import RetryPolicy
from kvcertsync.sources import MemorySource
from kvcertsync.stores import MemoryStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.parametrize("asked", [0.0, 1.0, 7.0, 60.0, 3600.0])
def test_a_retry_after_is_never_shortened_and_jittered_within_bounds(asked: float) -> None:
    policy = RetryPolicy()
    rng = random.Random(7)
    waits = [policy.delay(1, asked, rng, cap=1.0) for _ in range(500)]
    spread = min(max(1.0, 0.2 * asked), 30.0)
    assert min(waits) >= asked  # never sooner than the server asked, whatever the cap
    assert max(waits) <= asked + spread
    # Spread over the window, not bunched: both of its halves are used.
    assert min(waits) < asked + spread / 2 < max(waits)


def test_jitter_on_top_of_retry_after_can_be_turned_off() -> None:
    exact = RetryPolicy(after_jitter=0, after_spread=0)
    assert exact.delay(3, 7.0, random.Random()) == 7.0
    with pytest.raises(ValueError, match="after_jitter"):
        RetryPolicy(after_jitter=-1)


async def test_agents_told_the_same_retry_after_come_back_at_different_times() -> None:
    """Twenty agents of ten certificates each, throttled with Retry-After: 10 by one vault."""
    ca = TestAuthority()
    material = ca.issue(["fleet.example"])
    urls = [f"https://fleet.vault.azure.net/secrets/c{i}" for i in range(10)]
    clock = FakeClock()
    agents: list[CertSync] = []
    failures: list[Event] = []

    async def record(event: Event) -> None:
        # On the event loop: a plain callback's worker thread could outlast sync_once's grace.
        failures.append(event)

    for agent in range(20):
        source = MemorySource()
        for url in urls:
            source.set(url, material)
        source.fail(Throttled("429", retry_after=10), vault="fleet.vault.azure.net", times=10)
        sync = CertSync(
            urls, store=MemoryStore(), source=source, clock=clock, rng=random.Random(agent)
        )
        sync.subscribe(record, SyncFailed)
        agents.append(sync)
    for sync in agents:
        await sync.sync_once()
    assert len(failures) == 200
    waits = [f.retry_in for f in failures if isinstance(f, SyncFailed)]
    assert all(w is not None and 10 <= w <= 12 for w in waits)
    # Not one instant: the agents' returns spread over the jitter window (within one agent,
    # polls never return before their vault's own jittered pause ends).
    assert len({round(w, 3) for w in waits if w is not None}) >= 40
    pauses = [sync.limiter("fleet.vault.azure.net").paused_until for sync in agents]
    assert all(10 <= p <= 12 for p in pauses) and len({round(p, 3) for p in pauses}) == 20
