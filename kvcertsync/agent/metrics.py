"""A Prometheus /metrics endpoint for a CertSync, built on the official ``prometheus-client``.

The client is the optional ``metrics`` extra: this module imports without it, and everything that
needs it raises ``MetricsUnavailable`` naming ``pip install 'kvcertsync[metrics]'``.

Nothing here keeps state of its own: every scrape reads ``sync.stats()`` and ``sync.states()``
(and the hook counters, when given), so the numbers can never drift from the engine's.
See docs/metrics.md for every metric.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, cast

from kvcertsync._version import __version__
from kvcertsync.errors import KvCertSyncError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

    from kvcertsync.engine import CertificateState, CertSync
    from kvcertsync.stats import LatencyHistogram

__all__ = [
    "DEFAULT_HOST",
    "INSTALL_HINT",
    "HookCounts",
    "MetricsError",
    "MetricsServer",
    "MetricsUnavailable",
    "SyncCollector",
    "metrics_registry",
    "parse_metrics_address",
    "start_metrics_server",
]

logger = logging.getLogger(__name__)

#: Where the endpoint listens when the address is only a port: metrics stay on this machine
#: unless the operator says otherwise.
DEFAULT_HOST: Final = "127.0.0.1"
INSTALL_HINT: Final = "pip install 'kvcertsync[metrics]'"

#: Hook counters by hook name: ``{name: (runs, failures)}``, read at every scrape.
HookCounts = Callable[[], Mapping[str, tuple[int, int]]]

_CERT_LABELS: Final = ("uri", "vault", "name")
# Reading the engine from the scrape thread races with update_observed() on the loop thread; a
# dict resized mid-iteration raises RuntimeError, and simply reading again gets a clean copy.
_READ_ATTEMPTS: Final = 5


class MetricsError(KvCertSyncError):
    """The metrics endpoint could not be started."""


class MetricsUnavailable(MetricsError):
    """``prometheus-client`` (the ``metrics`` extra) is not installed."""


def _require_client() -> None:
    try:
        import prometheus_client  # noqa: F401 - the optional extra, checked on use
    except ImportError as exc:
        raise MetricsUnavailable(
            f"metrics need the prometheus-client package: {INSTALL_HINT}"
        ) from exc


# --------------------------------------------------------------------------------- addresses


def parse_listen_address(text: str, what: str = "metrics address") -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``PORT`` (on 127.0.0.1) as ``(host, port)``."""
    value = text.strip()
    forms = "give HOST:PORT, [IPv6]:PORT or PORT (listens on 127.0.0.1)"
    if not value:
        raise ValueError(f"the {what} is empty: {forms}")
    if "://" in value or "/" in value:
        raise ValueError(f"{what} {text!r} is a URL or path: {forms}")
    if value.startswith("["):
        inner, bracket, rest = value[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ValueError(f"{what} {text!r}: write an IPv6 address as [ADDRESS]:PORT")
        host, port_text = inner, rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what} {text!r}: {host!r} is not an IPv6 address") from None
    elif value.count(":") > 1:
        raise ValueError(f"{what} {text!r}: put an IPv6 address in brackets, e.g. [::1]:9464")
    elif ":" in value:
        host, _, port_text = value.partition(":")
        if not host:
            raise ValueError(
                f"{what} {text!r} has no host: give PORT for 127.0.0.1, "
                "or 0.0.0.0:PORT to listen on every interface"
            )
        if not all(c.isalnum() or c in ".-_" for c in host):
            raise ValueError(f"{what} {text!r}: {host!r} is not a host name or address")
    else:
        host, port_text = DEFAULT_HOST, value
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"{what} {text!r}: port {port_text!r} is not a number: {forms}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{what} {text!r}: port {port} is above 65535")
    return host, port


# --------------------------------------------------------------------------------- collector


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``--metrics-address``: ``HOST:PORT``, ``[IPv6]:PORT`` or ``PORT`` (on 127.0.0.1)."""
    return parse_listen_address(text)


def _bound(bound: float) -> str:
    # The text format's spelling of a bucket's upper bound: 0.005, 1.0, +Inf.
    return "+Inf" if math.isinf(bound) else repr(float(bound))


class SyncCollector:
    """A prometheus-client collector that reads a CertSync (and hook counters) at scrape time.

    Register it in any registry: ``REGISTRY.register(SyncCollector(sync))``. ``collect()`` runs
    in the scrape's thread; it only reads the engine.
    """

    def __init__(self, sync: CertSync, *, hooks: HookCounts | None = None) -> None:
        _require_client()
        self.sync = sync
        self.hooks = hooks
        self._hooks_broken = False

    def describe(self) -> list[Metric]:
        """The metric families this collector yields (the registry checks names with it)."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        """Every kvcertsync metric, read from the engine now."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            InfoMetricFamily,
        )

        stats = self.sync.stats()
        states = self._states()

        yield InfoMetricFamily(
            "kvcertsync_build", "The running kvcertsync version.", value={"version": __version__}
        )
        yield CounterMetricFamily(
            "kvcertsync_polls_total",
            "Polls of observed certificates that completed (succeeded or failed).",
            value=stats.polls,
        )
        yield CounterMetricFamily(
            "kvcertsync_changes_total",
            "New certificate versions installed.",
            value=stats.changes,
        )
        failures = CounterMetricFamily(
            "kvcertsync_failures_total",
            "Failed polls by kind: auth, access_denied, not_found, throttled, network, store, "
            "material, other.",
            labels=("kind",),
        )
        for kind, count in stats.failures.items():
            failures.add_metric((kind,), count)
        yield failures
        yield CounterMetricFamily(
            "kvcertsync_throttled_total",
            "Requests a vault answered with 429 Too Many Requests.",
            value=stats.throttled,
        )
        yield CounterMetricFamily(
            "kvcertsync_throttle_retry_after_seconds_total",
            "Seconds of Retry-After that throttling vaults asked for, summed.",
            value=stats.throttle_retry_after,
        )
        yield self._histogram(
            "kvcertsync_fetch_duration_seconds",
            "How long fetching a secret from its source took (successful or not).",
            stats.fetch_latency,
        )
        yield self._histogram(
            "kvcertsync_install_duration_seconds",
            "How long installing a new version into the store took (successful or not).",
            stats.install_latency,
        )
        yield GaugeMetricFamily(
            "kvcertsync_initial_sync_done",
            "1 once the initial sync has completed (every certificate installed or given up).",
            value=int(stats.initial_sync_done),
        )
        if stats.initial_sync_duration is not None:
            yield GaugeMetricFamily(
                "kvcertsync_initial_sync_duration_seconds",
                "How long the initial sync took.",
                value=stats.initial_sync_duration,
            )
        yield GaugeMetricFamily(
            "kvcertsync_certificates",
            "Certificates observed.",
            value=stats.certificates,
        )
        yield GaugeMetricFamily(
            "kvcertsync_polling_interval_seconds",
            "Seconds between regular polls of each certificate.",
            value=stats.polling_interval,
        )
        events = stats.events
        yield CounterMetricFamily(
            "kvcertsync_events_published_total",
            "Events the engine published.",
            value=events.published,
        )
        yield CounterMetricFamily(
            "kvcertsync_events_delivered_total",
            "Events that event subscribers handled without error.",
            value=events.delivered,
        )
        yield CounterMetricFamily(
            "kvcertsync_event_subscriber_failures_total",
            "Events whose subscriber raised or timed out.",
            value=events.failures,
        )
        yield CounterMetricFamily(
            "kvcertsync_events_dropped_total",
            "Events dropped because a subscriber's or iterator's buffer was full.",
            value=events.dropped,
        )
        yield GaugeMetricFamily(
            "kvcertsync_event_subscribers",
            "Event subscribers (callbacks and iterators) now.",
            value=events.subscribers + events.streams,
        )
        yield from self._hook_families()
        yield from self._certificate_families(states)

    def _states(self) -> tuple[CertificateState, ...]:
        for _ in range(_READ_ATTEMPTS - 1):
            try:
                return self.sync.states()
            except RuntimeError:
                continue
        return self.sync.states()

    @staticmethod
    def _histogram(name: str, documentation: str, histogram: LatencyHistogram) -> Metric:
        from prometheus_client.core import HistogramMetricFamily

        buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.sum)

    def _hook_families(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        if self.hooks is None:
            return
        try:
            counts = dict(self.hooks())
        except Exception:
            # A broken provider must not take the engine's metrics down with it; say so once.
            if not self._hooks_broken:
                logger.warning("hook counters unavailable for metrics", exc_info=True)
            self._hooks_broken = True
            return
        self._hooks_broken = False
        runs = CounterMetricFamily(
            "kvcertsync_hook_runs_total", "Runs of each reload hook.", labels=("hook",)
        )
        failed = CounterMetricFamily(
            "kvcertsync_hook_failures_total",
            "Runs of each reload hook that failed (non-zero exit, timeout, could not start).",
            labels=("hook",),
        )
        for hook, (run_count, failure_count) in sorted(counts.items()):
            runs.add_metric((hook,), run_count)
            failed.add_metric((hook,), failure_count)
        yield runs
        yield failed

    @staticmethod
    def _certificate_families(states: tuple[CertificateState, ...]) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        info = InfoMetricFamily(
            "kvcertsync_certificate",
            "The installed version and thumbprint of each certificate (one series each).",
            labels=_CERT_LABELS,
        )
        not_after = GaugeMetricFamily(
            "kvcertsync_certificate_not_after_timestamp_seconds",
            "When the installed certificate expires (notAfter), as a Unix timestamp.",
            labels=_CERT_LABELS,
        )
        installed = GaugeMetricFamily(
            "kvcertsync_certificate_installed",
            "1 when a version of the certificate is installed in the store.",
            labels=_CERT_LABELS,
        )
        current = GaugeMetricFamily(
            "kvcertsync_certificate_current",
            "1 when the last poll succeeded: the installed version is the one the vault serves.",
            labels=_CERT_LABELS,
        )
        failures = GaugeMetricFamily(
            "kvcertsync_certificate_failures",
            "Consecutive failed polls of the certificate (0 after a success).",
            labels=_CERT_LABELS,
        )
        last_success = GaugeMetricFamily(
            "kvcertsync_certificate_last_success_timestamp_seconds",
            "When a poll of the certificate last succeeded, as a Unix timestamp.",
            labels=_CERT_LABELS,
        )
        for state in states:
            uri = state.uri
            labels = (str(uri), uri.vault_name, uri.name)
            cert = state.installed
            if cert is not None:
                info.add_metric(labels, {"version": cert.version, "thumbprint": cert.thumbprint})
                not_after.add_metric(labels, cert.not_after.timestamp())
            installed.add_metric(labels, int(cert is not None))
            current.add_metric(labels, int(state.current))
            failures.add_metric(labels, state.failures)
            if state.last_success is not None:
                last_success.add_metric(labels, state.last_success.timestamp())
        yield from (info, not_after, installed, current, failures, last_success)


def metrics_registry(sync: CertSync, *, hooks: HookCounts | None = None) -> CollectorRegistry:
    """A registry of its own holding only a SyncCollector for ``sync``."""
    _require_client()
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SyncCollector(sync, hooks=hooks))
    return registry


# --------------------------------------------------------------------------------- server


class MetricsServer:
    """A running /metrics endpoint (prometheus-client's own server, in a daemon thread)."""

    def __init__(
        self,
        server: WSGIServer,
        thread: threading.Thread,
        host: str,
        registry: CollectorRegistry,
    ) -> None:
        self._server = server
        self._thread = thread
        self._closed = False
        #: The address it listens on, as given (without brackets).
        self.host = host
        #: The port it listens on: the real one when 0 was asked for.
        self.port: int = server.server_port
        self.registry = registry

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    @property
    def running(self) -> bool:
        """Whether it still serves."""
        return not self._closed and self._thread.is_alive()

    def close(self) -> None:
        """Stop serving and release the port (idempotent; blocks for up to half a second)."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "closed"
        return f"<MetricsServer {self.url} {state}>"


def start_metrics_server(
    address: str, sync: CertSync, *, hooks: HookCounts | None = None
) -> MetricsServer:
    """Serve ``sync``'s metrics over plain HTTP at ``address`` (see ``parse_metrics_address``).

    It binds before returning (and resolves the host's name, so call it from a worker thread
    if the event loop must not block): MetricsError if the port is taken or the host unknown.
    """
    host, port = parse_metrics_address(address)
    registry = metrics_registry(sync, hooks=hooks)
    from prometheus_client import start_http_server

    try:
        started: object = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise MetricsError(f"cannot serve metrics on {address}: {reason}") from exc
    if not isinstance(started, tuple):  # before 0.17 it returned None and kept no handle
        raise MetricsUnavailable(f"metrics need prometheus-client 0.17 or later: {INSTALL_HINT}")
    server, thread = cast("tuple[WSGIServer, threading.Thread]", started)
    thread.name = "kvcertsync-metrics"
    metrics = MetricsServer(server, thread, host, registry)
    logger.info("serving metrics at %s", metrics.url)
    return metrics
