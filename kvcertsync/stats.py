"""Engine statistics: counters and latency histograms, kept cheaply and read as frozen snapshots.

``CertSync.stats()`` returns a ``SyncStats``; the Prometheus exporter
(``kvcertsync.agent.metrics``) reads nothing else, so library users get the same numbers
without the ``metrics`` extra. Per-certificate facts are in ``CertSync.states()``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Final, Literal, get_args

import attrs

from kvcertsync.errors import (
    AccessDenied,
    AuthenticationFailed,
    MaterialError,
    SecretNotFound,
    SourceError,
    StoreError,
    Throttled,
)
from kvcertsync.events import BusStats

__all__ = [
    "FAILURE_KINDS",
    "LATENCY_BUCKETS",
    "FailureCounts",
    "FailureKind",
    "LatencyHistogram",
    "StatsRecorder",
    "SyncStats",
    "failure_kind",
]

#: Why a poll failed: a small, fixed set, so it can be a metric label.
FailureKind = Literal[
    "auth", "access_denied", "not_found", "throttled", "network", "store", "material", "other"
]
FAILURE_KINDS: Final[tuple[FailureKind, ...]] = get_args(FailureKind)

#: Upper bounds (seconds) of the latency buckets: an HTTPS request to a vault or a disk write
#: takes milliseconds; a throttled or struggling one, seconds; beyond 30 s is "too slow" anyway.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


def failure_kind(error: BaseException) -> FailureKind:
    """The failure kind of ``error``, from the kvcertsync error classes."""
    # Order matters only among SourceError subclasses; the rest are disjoint families.
    if isinstance(error, Throttled):
        return "throttled"
    if isinstance(error, AuthenticationFailed):
        return "auth"
    if isinstance(error, AccessDenied):
        return "access_denied"
    if isinstance(error, SecretNotFound):
        return "not_found"
    if isinstance(error, SourceError):
        return "network"
    if isinstance(error, StoreError):
        return "store"
    if isinstance(error, MaterialError):
        return "material"
    return "other"


@attrs.frozen
class FailureCounts:
    """Failed polls by kind since the engine was created."""

    #: No token, or the vault refused it (AuthenticationFailed).
    auth: int = 0
    #: The identity may not read the secret, or it is disabled (AccessDenied).
    access_denied: int = 0
    #: The secret or version does not exist (SecretNotFound).
    not_found: int = 0
    #: The vault answered 429 (Throttled).
    throttled: int = 0
    #: Any other fetch failure: 5xx, timeouts, connections (SourceError).
    network: int = 0
    #: Installing or reading the store failed (StoreError).
    store: int = 0
    #: The secret is not a usable certificate (MaterialError).
    material: int = 0
    #: Anything else (an unexpected error).
    other: int = 0

    @property
    def total(self) -> int:
        """Every failed poll, whatever the kind."""
        return sum(count for _, count in self.items())

    def items(self) -> Iterator[tuple[FailureKind, int]]:
        """``(kind, count)`` for every kind, in ``FAILURE_KINDS`` order, zeros included."""
        for kind in FAILURE_KINDS:
            yield kind, getattr(self, kind)

    def __getitem__(self, kind: FailureKind) -> int:
        """The count of one kind: ``stats.failures["throttled"]``."""
        if kind not in FAILURE_KINDS:
            raise KeyError(kind)
        count: int = getattr(self, kind)
        return count


@attrs.frozen
class LatencyHistogram:
    """A fixed-bucket histogram of durations in seconds."""

    #: Upper bounds of the buckets, ascending; an implicit last bucket takes everything above.
    bounds: tuple[float, ...]
    #: Observations per bucket (not cumulative): ``len(bounds) + 1`` entries, the last one
    #: for durations above ``bounds[-1]``. A value equal to a bound falls in that bound's bucket.
    counts: tuple[int, ...]
    #: The sum of every observed duration.
    sum: float

    @property
    def count(self) -> int:
        """How many durations were observed."""
        return sum(self.counts)

    def cumulative(self) -> tuple[tuple[float, int], ...]:
        """``(upper bound, observations <= bound)`` pairs ending with ``(inf, count)``."""
        pairs: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            pairs.append((bound, running))
        return tuple(pairs)


@attrs.frozen
class SyncStats:
    """A snapshot of a CertSync's counters since it was created (``CertSync.stats()``)."""

    #: Polls that completed (succeeded or failed); a poll is one fetch, plus an install when
    #: the version changed.
    polls: int
    #: New versions installed (``CertificateUpdated`` events).
    changes: int
    #: Failed polls by kind.
    failures: FailureCounts
    #: 429 answers from vaults (also counted in ``failures.throttled``).
    throttled: int
    #: The seconds of Retry-After those answers asked for, summed (answers without one add 0).
    throttle_retry_after: float
    #: Durations of ``SecretSource.get`` calls that returned or raised.
    fetch_latency: LatencyHistogram
    #: Durations of ``Store.install`` calls that returned or raised.
    install_latency: LatencyHistogram
    #: Whether the initial sync has completed (every certificate installed, or given up on).
    initial_sync_done: bool
    #: How long the initial sync took, in seconds; None until it is done.
    initial_sync_duration: float | None
    #: How many certificates are observed now.
    certificates: int
    #: The polling interval in seconds now.
    polling_interval: float
    #: The event bus's counters (published, delivered, subscriber failures, dropped, ...).
    events: BusStats


class _Histogram:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def snapshot(self) -> LatencyHistogram:
        # Count comes from the buckets, so a snapshot taken mid-observation stays consistent.
        return LatencyHistogram(self.bounds, tuple(self.counts), self.sum)


class StatsRecorder:
    """The engine's mutable counters; plain attribute adds, so the poll path stays cheap.

    Only the engine's event loop writes; any thread may call ``snapshot`` (values are read
    without a lock, so a snapshot taken mid-poll may lag one observation between fields).
    """

    __slots__ = (
        "_failures",
        "changes",
        "fetch",
        "install",
        "polls",
        "throttle_retry_after",
        "throttled",
    )

    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.polls = 0
        self.changes = 0
        self.throttled = 0
        self.throttle_retry_after = 0.0
        self._failures = dict.fromkeys(FAILURE_KINDS, 0)
        self.fetch = _Histogram(buckets)
        self.install = _Histogram(buckets)

    def failed(self, error: BaseException) -> None:
        """Count one failed poll (and, for a 429, the throttling)."""
        self.polls += 1
        self._failures[failure_kind(error)] += 1
        if isinstance(error, Throttled):
            self.throttled += 1
            if error.retry_after is not None:
                self.throttle_retry_after += error.retry_after

    def snapshot(
        self,
        *,
        initial_sync_done: bool,
        initial_sync_duration: float | None,
        certificates: int,
        polling_interval: float,
        events: BusStats,
    ) -> SyncStats:
        """The counters now, with the engine's own facts added."""
        return SyncStats(
            polls=self.polls,
            changes=self.changes,
            failures=FailureCounts(**self._failures),
            throttled=self.throttled,
            throttle_retry_after=self.throttle_retry_after,
            fetch_latency=self.fetch.snapshot(),
            install_latency=self.install.snapshot(),
            initial_sync_done=initial_sync_done,
            initial_sync_duration=initial_sync_duration,
            certificates=certificates,
            polling_interval=polling_interval,
            events=events,
        )
