"""VaultClock: the emulator's own time, which tests move forward to reach expiry and renewal."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from kvcertsync.clock import SystemClock

__all__ = ["VaultClock"]

Listener = Callable[[], None]


class VaultClock:
    """Real time plus an offset that only moves forward; safe to use from any thread.

    Everything the emulator stamps or compares (created/updated dates, nbf/exp, certificate
    validity, renewal triggers, issuance delays, soft-delete dates) reads :meth:`time`. Tokens
    read :meth:`token_time`, which moves only when an advance asks for it, because clients keep
    their token caches by their own clocks.
    """

    def __init__(self, offset: float = 0.0, token_offset: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._offset = float(offset)
        self._token_offset = float(token_offset)
        self._listeners: list[Listener] = []

    @property
    def offset(self) -> float:
        """Seconds the emulator's clock is ahead of the real one."""
        with self._lock:
            return self._offset

    @property
    def token_offset(self) -> float:
        """Seconds token lifetimes have been aged by (advances with ``expire_tokens=True``)."""
        with self._lock:
            return self._token_offset

    def time(self) -> float:
        """The emulator's time, in Unix seconds."""
        return time.time() + self.offset

    def utcnow(self) -> datetime:
        """The emulator's time as an aware UTC datetime."""
        return datetime.fromtimestamp(self.time(), UTC)

    def token_time(self) -> float:
        """The time tokens are checked against (real time plus the token offset)."""
        return time.time() + self.token_offset

    def advance(self, seconds: float | timedelta, *, expire_tokens: bool = False) -> None:
        """Move the clock forward; then certificates due for renewal or completion move on.

        ``expire_tokens=False`` (the default) lets tokens keep their remaining lifetime, as if
        the clients' clocks moved too; True ages them, so a jump past a token's lifetime makes
        the vault refuse it (401) the way it refuses a token held too long.
        """
        amount = seconds.total_seconds() if isinstance(seconds, timedelta) else float(seconds)
        if not math.isfinite(amount) or amount < 0:
            raise ValueError(f"the clock only moves forward: got {seconds!r} seconds")
        with self._lock:
            self._offset += amount
            if expire_tokens:
                self._token_offset += amount
            listeners = list(self._listeners)
        for listener in listeners:
            listener()

    def set(self, when: datetime | float, *, expire_tokens: bool = False) -> None:
        """Move the clock forward to ``when`` (an aware datetime or Unix seconds)."""
        target = when.timestamp() if isinstance(when, datetime) else float(when)
        if isinstance(when, datetime) and when.tzinfo is None:
            raise ValueError("set() needs a timezone-aware datetime")
        self.advance(max(0.0, target - self.time()), expire_tokens=expire_tokens)

    def resume(self, offset: float, token_offset: float) -> None:
        """Continue from saved offsets: a restart keeps the emulator's time where it was."""
        with self._lock:
            self._offset = max(self._offset, float(offset))
            self._token_offset = max(self._token_offset, float(token_offset))

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener()`` after every advance (in the advancing thread)."""
        with self._lock:
            self._listeners.append(listener)

    def certsync_clock(self) -> SystemClock:
        """A kvcertsync ``Clock`` whose wall time is this clock's, for a CertSync under test.

        The engine refuses versions whose ``nbf`` lies ahead of its wall clock; after an advance,
        the certificates the emulator issues start at the emulator's time.
        """
        return _EmulatedWallClock(self)

    def __repr__(self) -> str:
        return f"<VaultClock offset={self.offset:.0f}s token_offset={self.token_offset:.0f}s>"


class _EmulatedWallClock(SystemClock):
    """The event loop's monotonic time for scheduling; the emulator's time for validity."""

    def __init__(self, clock: VaultClock) -> None:
        self._clock = clock

    def utcnow(self) -> datetime:
        """The emulator's wall time."""
        return self._clock.utcnow()
