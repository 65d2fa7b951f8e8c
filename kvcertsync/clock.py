"""Clocks: the engine reads time and sleeps only through one, so tests can drive time by hand."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from datetime import UTC, datetime, timedelta
from typing import Protocol

import anyio
import anyio.lowlevel

__all__ = ["Clock", "FakeClock", "SystemClock"]


class Clock(Protocol):
    """Monotonic seconds for scheduling, wall time for certificate validity."""

    def now(self) -> float:
        """Monotonic time in seconds."""
        ...

    def utcnow(self) -> datetime:
        """Wall-clock time, timezone-aware UTC."""
        ...

    async def sleep_until(self, deadline: float) -> None:
        """Sleep until ``now() >= deadline``."""
        ...


class SystemClock:
    """The event loop's clock and the system's wall clock."""

    def now(self) -> float:
        """The event loop's monotonic time."""
        try:
            # anyio.current_time() finds the backend on every call: a tenth of a poll's CPU.
            return asyncio.get_running_loop().time()
        except RuntimeError:  # trio, or no loop
            return anyio.current_time()

    def utcnow(self) -> datetime:
        """The system's wall clock in UTC."""
        return datetime.now(UTC)

    async def sleep_until(self, deadline: float) -> None:
        """Sleep on the event loop until ``deadline``."""
        await anyio.sleep_until(deadline)


class FakeClock:
    """A clock that moves only when told to: ``await clock.advance(seconds)``."""

    def __init__(self, start: float = 0.0, wall: datetime | None = None) -> None:
        self._now = start
        self._start = start
        self._wall = wall or datetime(2026, 1, 1, tzinfo=UTC)
        self._sleepers: list[tuple[float, int, anyio.Event]] = []
        self._seq = itertools.count()
        self.settle_turns = 50

    def now(self) -> float:
        """The fake monotonic time."""
        return self._now

    def utcnow(self) -> datetime:
        """The fake wall time, moving with ``now()``."""
        return self._wall + timedelta(seconds=self._now - self._start)

    async def sleep_until(self, deadline: float) -> None:
        """Block until the clock has been advanced to ``deadline``."""
        if deadline <= self._now:
            await anyio.lowlevel.checkpoint()
            return
        wake = anyio.Event()
        item = (deadline, next(self._seq), wake)
        heapq.heappush(self._sleepers, item)
        try:
            await wake.wait()
        finally:
            if not wake.is_set():
                # Cancelled: a stale sleeper would make advance() stop at a dead deadline.
                self._sleepers.remove(item)
                heapq.heapify(self._sleepers)

    @property
    def next_deadline(self) -> float | None:
        """The earliest deadline anyone sleeps on, or None."""
        return self._sleepers[0][0] if self._sleepers else None

    async def advance(self, seconds: float) -> None:
        """Move time forward, waking each sleeper in deadline order and letting tasks settle."""
        target = self._now + seconds
        await self.settle()
        while self._sleepers and self._sleepers[0][0] <= target:
            deadline, _, wake = heapq.heappop(self._sleepers)
            self._now = max(self._now, deadline)
            wake.set()
            await self.settle()
        self._now = target
        await self.settle()

    async def settle(self) -> None:
        """Let woken tasks run on before time moves again.

        A fixed number of event-loop turns rather than anyio.wait_all_tasks_blocked(), which
        polls every 0.1 s of real time and would make long fake timelines slow.
        """
        for _ in range(self.settle_turns):
            await anyio.lowlevel.checkpoint()
