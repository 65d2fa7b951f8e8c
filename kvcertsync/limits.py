"""Pacing: the per-vault adaptive token bucket and the one retry policy."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import attrs

from kvcertsync.clock import Clock

__all__ = ["THROTTLE_LADDER", "RetryPolicy", "VaultLimiter"]

# A token refilled to 1 - 1e-12 by float rounding is a whole token, not a reason to sleep 1e-14 s.
_WHOLE = 1.0 - 1e-9

#: Key Vault's recommended waits after a 429 without Retry-After, in seconds.
THROTTLE_LADDER = (1.0, 2.0, 4.0, 8.0, 16.0)


@attrs.frozen
class RetryPolicy:
    """Exponential backoff with full jitter, capped; a server's retry-after always wins.

    A retry-after is never cut short: jitter goes on top, uniform up to ``after_jitter`` of
    the wait but at least ``after_spread`` seconds and at most ``after_spread_max`` (defaults:
    20 %, 1 s, 30 s), so clients told the same wait by a throttled vault do not all return in
    the same instant.
    """

    initial: float = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    maximum: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    multiplier: float = attrs.field(default=2.0, validator=attrs.validators.ge(1))
    after_jitter: float = attrs.field(default=0.2, validator=attrs.validators.ge(0))
    after_spread: float = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    after_spread_max: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))

    def after(self, retry_after: float, rng: random.Random) -> float:
        """The wait for a server's ``retry-after``: at least that long, jittered on top."""
        wait = max(retry_after, 0.0)
        spread = min(max(self.after_spread, self.after_jitter * wait), self.after_spread_max)
        return wait + rng.uniform(0.0, spread)

    def ceiling(self, attempt: int) -> float:
        """The largest delay before retry number ``attempt`` (1-based)."""
        exponent = min(max(attempt - 1, 0), 64)
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def delay(
        self,
        attempt: int,
        retry_after: float | None,
        rng: random.Random,
        *,
        cap: float | None = None,
    ) -> float:
        """Seconds to wait before retry number ``attempt``, at most ``cap`` unless told.

        The engine caps at the polling interval: a failing certificate is never retried
        later than a healthy one is polled. A server's retry-after is obeyed, never shortened
        (jittered on top: ``after``).
        """
        if retry_after is not None and math.isfinite(retry_after):
            return self.after(retry_after, rng)
        ceiling = self.ceiling(attempt)
        return rng.uniform(0.0, ceiling if cap is None else min(ceiling, cap))


class VaultLimiter:
    """A token bucket per vault that pauses on throttling, halves its rate, then recovers.

    At each throttling episode the rate halves and falls to at most one request per pause,
    down to ``min_rate`` (default one request a minute). When the pause ends one request goes
    at once; the rate doubles with each request served and every ``recovery`` seconds
    (default 30). A fleet sharing a vault settles near its share of the vault's limit, however
    many agents it has, and an agent whose vault has room again is back to full speed in a
    few requests.
    """

    def __init__(
        self,
        clock: Clock,
        rate: float,
        burst: float,
        *,
        min_rate: float = 1 / 60,
        recovery: float = 30.0,
        jitter: Callable[[float], float] | None = None,
    ) -> None:
        self._clock = clock
        self._jitter = jitter or float
        self.configured_rate = rate
        self.burst = burst
        self.min_rate = min(min_rate, rate)
        self.recovery = recovery
        self._tokens = burst
        self._updated = clock.now()
        self._paused_until = -math.inf
        self._throttled_at = -math.inf
        self._throttled_rate = rate
        self._streak = 0
        self.throttles = 0

    @property
    def rate(self) -> float:
        """The current rate: reduced after throttling, doubling back every ``recovery`` s."""
        return self._rate_at(self._clock.now())

    def _rate_at(self, now: float) -> float:
        if self._throttled_at == -math.inf:
            return self.configured_rate  # never throttled: the common case, kept cheap
        elapsed = now - max(self._throttled_at, self._paused_until)
        if elapsed <= 0:
            return self._throttled_rate
        if self.recovery <= 0:
            return self.configured_rate
        # Multiplicative, as the decrease is: agents of a large fleet each hold a small rate,
        # and a linear climb to the configured one would throw them all back at the vault.
        doublings = min(elapsed / self.recovery, 64.0)
        return min(self.configured_rate, self._throttled_rate * math.pow(2.0, doublings))

    @property
    def paused_until(self) -> float:
        """Monotonic time until which no request may go to this vault."""
        return self._paused_until

    def _refill(self) -> float:
        """Add the tokens earned since the last refill; returns the time now."""
        now = self._clock.now()
        start = max(self._updated, self._paused_until)
        if now > start and self._tokens < self.burst:
            self._tokens = min(self.burst, self._tokens + (now - start) * self._rate_at(now))
        self._updated = max(now, self._updated)
        return now

    def delay(self) -> float:
        """Seconds until a token is available (0 when one is)."""
        now = self._refill()
        wait = max(0.0, self._paused_until - now)
        if self._tokens >= _WHOLE:
            return wait
        return wait + (1.0 - self._tokens) / self._rate_at(now)

    def try_take(self) -> bool:
        """Take a token if one is available now."""
        now = self._refill()
        if now < self._paused_until or self._tokens < _WHOLE:
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        return True

    def throttled(self, retry_after: float | None) -> float:
        """Record a 429: pause (retry-after, else the 1-2-4-8-16 s ladder), halve the rate.

        The pause that starts an episode goes through ``jitter`` (never shorter, a random
        extra on top), so processes throttled together do not come back together. Requests
        already in flight when the vault starts throttling all come back 429 at once; those
        answers belong to the same episode and only extend the pause to their retry-after.
        """
        now = self._refill()
        if now < self._paused_until:
            if retry_after is not None and math.isfinite(retry_after):
                self._paused_until = max(self._paused_until, now + max(retry_after, 0.0))
            return self._paused_until - now
        pause = retry_after
        if pause is None or not math.isfinite(pause):
            pause = THROTTLE_LADDER[min(self._streak, len(THROTTLE_LADDER) - 1)]
        pause = self._jitter(max(pause, 0.0))
        self._streak += 1
        self.throttles += 1
        # At most one request per pause, then doubling: after a pause, every certificate that
        # waited out the pause would otherwise go at once, and at once be throttled again.
        self._throttled_rate = max(self.min_rate, min(self._rate_at(now) / 2, 1 / max(pause, 1.0)))
        self._throttled_at = now
        self._paused_until = now + max(pause, 0.0)
        # One request as soon as the pause ends: it finds out whether the vault has room
        # again, rather than waiting a whole token's time at the reduced rate first.
        self._tokens = 1.0
        return pause

    def succeeded(self) -> None:
        """Record a request the vault served: the ladder starts over, a reduced rate doubles."""
        self._streak = 0
        if self._throttled_at == -math.inf:
            return  # never throttled: the common case, kept cheap
        now = self._clock.now()
        if now < self._paused_until:
            return  # sent before the pause began: it says nothing about the vault now
        self._refill()
        rate = self._rate_at(now)
        if rate * 2.0 >= self.configured_rate:
            self._throttled_at = -math.inf  # back to the configured rate
            return
        self._throttled_rate = rate * 2.0
        self._throttled_at = now
