"""The stats snapshot, and the Prometheus exporter scraped over HTTP and parsed by the client."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from kvcertsync.agent.metrics import (
    INSTALL_HINT,
    HookCounts,
    MetricsError,
    MetricsServer,
    MetricsUnavailable,
    SyncCollector,
    metrics_registry,
    parse_metrics_address,
    start_metrics_server,
)
from kvcertsync.clock import FakeClock
from kvcertsync.emulator import TestAuthority
from kvcertsync.engine import CertSync
from kvcertsync.errors import (
    AccessDenied,
    AuthenticationFailed,
    SecretNotFound,
    StoreError,
    Throttled,
    TransientSourceError,
)
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.sources import MemorySource, SecretVersion
from kvcertsync.stats import FAILURE_KINDS, LATENCY_BUCKETS, StatsRecorder, failure_kind
from kvcertsync.stores import InstalledCertificate, MemoryStore
from kvcertsync.uri import SecretUri

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "examples" / "prometheus" / "kvcertsync-alerts.yml"
WEB = "https://myvault.vault.azure.net/secrets/web"
API = "https://othervault.vault.azure.net/secrets/api"
CERT_FAMILIES = (
    "kvcertsync_certificate_info",
    "kvcertsync_certificate_not_after_timestamp_seconds",
    "kvcertsync_certificate_installed",
    "kvcertsync_certificate_current",
    "kvcertsync_certificate_failures",
    "kvcertsync_certificate_last_success_timestamp_seconds",
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> TestAuthority:
    return TestAuthority()


@pytest.fixture
def exporter() -> Iterator[Callable[..., MetricsServer]]:
    """Start exporters on 127.0.0.1:0; every one is closed at the end of the test."""
    servers: list[MetricsServer] = []

    def start(sync: CertSync, hooks: HookCounts | None = None) -> MetricsServer:
        server = start_metrics_server("127.0.0.1:0", sync, hooks=hooks)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


class Scrape:
    """One parsed scrape: samples by sample name (``foo_total``, ``foo_bucket``, ...)."""

    def __init__(self, text: str, content_type: str) -> None:
        self.text = text
        self.content_type = content_type
        self.types: dict[str, str] = {}
        self.samples: dict[str, list[Sample]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for sample in family.samples:
                self.samples[sample.name].append(sample)

    def value(self, name: str, **labels: str) -> float:
        """The one sample of ``name`` whose labels include ``labels``."""
        found = [s.value for s in self.samples[name] if labels.items() <= s.labels.items()]
        assert len(found) == 1, (name, labels, self.samples[name])
        return found[0]

    def by_uri(self, name: str) -> dict[str, float]:
        return {s.labels["uri"]: s.value for s in self.samples[name]}

    @property
    def series(self) -> int:
        return sum(len(samples) for samples in self.samples.values())


async def scrape(server: MetricsServer) -> Scrape:
    """GET the endpoint with a real HTTP client (off the event loop) and parse it."""

    def get() -> tuple[str, str]:
        with urllib.request.urlopen(server.url, timeout=10) as response:
            return response.read().decode(), response.headers["Content-Type"]

    text, content_type = await anyio.to_thread.run_sync(get)
    return Scrape(text, content_type)


class FlakyStore(MemoryStore):
    """A MemoryStore whose next install raises ``fail_next`` (once)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next: Exception | None = None

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        error, self.fail_next = self.fail_next, None
        if error is not None:
            raise error
        return await super().install(observed, material, version)


# ------------------------------------------------------------------------- the exporter


async def test_certificate_gauges_match_what_is_installed(
    ca: TestAuthority, exporter: Callable[..., MetricsServer]
) -> None:
    source = MemorySource()
    source.set(WEB, ca.issue(["web.example.com"]))
    source.set(API, ca.issue(["api.example.com"], days=30))
    sync = CertSync([WEB, API], store=MemoryStore(), source=source)
    assert (await sync.sync_once()).ok
    server = exporter(sync)
    assert server.port != 0
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"

    got = await scrape(server)
    assert got.content_type.startswith("text/plain")
    states = {str(state.uri): state for state in sync.states()}
    assert got.by_uri("kvcertsync_certificate_not_after_timestamp_seconds") == {
        uri: state.installed.not_after.timestamp()
        for uri, state in states.items()
        if state.installed is not None
    }
    for uri, state in states.items():
        installed = state.installed
        assert installed is not None and state.last_success is not None
        info = [s for s in got.samples["kvcertsync_certificate_info"] if s.labels["uri"] == uri]
        assert [s.labels for s in info] == [
            {
                "uri": uri,
                "vault": state.uri.vault_name,
                "name": state.uri.name,
                "version": installed.version,
                "thumbprint": installed.thumbprint,
            }
        ]
        assert got.value("kvcertsync_certificate_installed", uri=uri) == 1
        assert got.value("kvcertsync_certificate_current", uri=uri) == 1
        assert got.value("kvcertsync_certificate_failures", uri=uri) == 0
        assert got.value(
            "kvcertsync_certificate_last_success_timestamp_seconds", uri=uri
        ) == pytest.approx(state.last_success.timestamp())
    assert got.value("kvcertsync_polls_total") == 2
    assert got.value("kvcertsync_changes_total") == 2
    assert got.value("kvcertsync_initial_sync_done") == 1
    assert got.value("kvcertsync_certificates") == 2
    assert got.value("kvcertsync_polling_interval_seconds") == 3600
    assert got.types["kvcertsync_polls"] == "counter"
    assert got.types["kvcertsync_fetch_duration_seconds"] == "histogram"
    # Two fetches and two installs, each in some bucket; +Inf holds them all.
    assert got.value("kvcertsync_fetch_duration_seconds_count") == 2
    assert got.value("kvcertsync_fetch_duration_seconds_bucket", le="+Inf") == 2
    assert got.value("kvcertsync_install_duration_seconds_count") == 2
    les = [s.labels["le"] for s in got.samples["kvcertsync_install_duration_seconds_bucket"]]
    assert les == [*(repr(b) for b in LATENCY_BUCKETS), "+Inf"]
    assert all(f"# HELP {name}" in got.text for name in CERT_FAMILIES)


async def test_failures_are_counted_by_kind_and_match_the_snapshot(
    ca: TestAuthority, exporter: Callable[..., MetricsServer]
) -> None:
    source = MemorySource()
    store = FlakyStore()
    source.set(WEB, ca.issue(["web.example.com"]))
    source.set(API, ca.issue(["api.example.com"]))
    # API is in another vault: the last pass throttles both, and neither pause blocks the other.
    sync = CertSync([WEB, API], store=store, source=source)
    server = exporter(sync)

    async def one_pass() -> None:
        await sync.sync_once()

    await one_pass()  # both installed
    for error in (
        AuthenticationFailed("no token"),
        AccessDenied("403", code="ForbiddenByRbac"),
        SecretNotFound("404"),
        TransientSourceError("connection reset"),
    ):
        source.fail(error, WEB)
        await one_pass()
    source.set(WEB, "not a certificate", "application/x-pem-file")
    await one_pass()  # material
    source.set(WEB, ca.issue(["web.example.com"]))
    store.fail_next = StoreError("disk full")
    await one_pass()  # store
    store.fail_next = RuntimeError("something unexpected")
    await one_pass()  # other
    await one_pass()  # the new version goes in
    source.fail(Throttled("429", retry_after=7), WEB)
    source.fail(Throttled("429"), API)
    await one_pass()

    expected = {
        "auth": 1,
        "access_denied": 1,
        "not_found": 1,
        "throttled": 2,
        "network": 1,
        "store": 1,
        "material": 1,
        "other": 1,
    }
    stats = sync.stats()
    assert dict(stats.failures.items()) == expected
    assert stats.failures.total == 9
    assert stats.failures["store"] == 1
    assert stats.polls == 20
    assert stats.changes == 3
    assert stats.throttled == 2
    assert stats.throttle_retry_after == 7.0
    assert stats.fetch_latency.count == 20
    # Installs: two at first, then the store failure, the unexpected one, the success.
    assert stats.install_latency.count == 5

    got = await scrape(server)
    for kind in FAILURE_KINDS:
        assert got.value("kvcertsync_failures_total", kind=kind) == expected[kind]
    assert got.value("kvcertsync_polls_total") == stats.polls
    assert got.value("kvcertsync_changes_total") == stats.changes
    assert got.value("kvcertsync_throttled_total") == 2
    assert got.value("kvcertsync_throttle_retry_after_seconds_total") == 7.0
    assert got.value("kvcertsync_fetch_duration_seconds_count") == 20
    assert got.value("kvcertsync_fetch_duration_seconds_sum") == pytest.approx(
        stats.fetch_latency.sum
    )
    assert got.value("kvcertsync_install_duration_seconds_count") == 5
    for state in sync.states():
        uri = str(state.uri)
        assert got.value("kvcertsync_certificate_failures", uri=uri) == state.failures == 1
        assert got.value("kvcertsync_certificate_current", uri=uri) == 0
        # The last good certificate stays installed and keeps its expiry series.
        assert got.value("kvcertsync_certificate_installed", uri=uri) == 1
    assert got.value("kvcertsync_events_published_total") == stats.events.published > 0


async def test_label_sets_stay_one_per_certificate_across_rotations(
    ca: TestAuthority, exporter: Callable[..., MetricsServer]
) -> None:
    source = MemorySource()
    source.set(WEB, ca.issue(["web.example.com"]))
    source.set(API, ca.issue(["api.example.com"]))
    sync = CertSync([WEB, API], store=MemoryStore(), source=source)
    server = exporter(sync)
    uris = {str(SecretUri.parse(WEB)), str(SecretUri.parse(API))}
    series: set[int] = set()
    versions_seen: set[str] = set()
    for _ in range(4):
        assert (await sync.sync_once()).ok
        got = await scrape(server)
        series.add(got.series)
        for name in CERT_FAMILIES:
            labels = [s.labels["uri"] for s in got.samples[name]]
            assert sorted(labels) == sorted(uris), name
        info = got.samples["kvcertsync_certificate_info"]
        web_info = [s for s in info if s.labels["name"] == "web"]
        assert [s.labels["version"] for s in web_info] == [source.versions(WEB)[-1]]
        versions_seen.add(web_info[0].labels["version"])
        # Only the info metrics name a version; nothing else grows with rotations.
        versioned = {
            s.name for found in got.samples.values() for s in found if "version" in s.labels
        }
        assert versioned == {"kvcertsync_certificate_info", "kvcertsync_build_info"}
        source.rotate(WEB, ca.issue(["web.example.com"]))
    assert len(versions_seen) == 4
    assert len(series) == 1
    assert sync.stats().changes == 2 + 3


async def test_hook_counters_come_from_the_provider(
    ca: TestAuthority, exporter: Callable[..., MetricsServer], caplog: pytest.LogCaptureFixture
) -> None:
    source = MemorySource()
    source.set(WEB, ca.issue(["web.example.com"]))
    sync = CertSync([WEB], store=MemoryStore(), source=source)
    counts: dict[str, tuple[int, int]] = {"systemctl reload nginx": (3, 1), "haproxy": (1, 0)}
    server = exporter(sync, hooks=lambda: counts)
    got = await scrape(server)
    assert got.value("kvcertsync_hook_runs_total", hook="systemctl reload nginx") == 3
    assert got.value("kvcertsync_hook_failures_total", hook="systemctl reload nginx") == 1
    assert got.value("kvcertsync_hook_runs_total", hook="haproxy") == 1
    assert got.value("kvcertsync_hook_failures_total", hook="haproxy") == 0

    def broken() -> Mapping[str, tuple[int, int]]:
        raise RuntimeError("hook table unavailable")

    broken_server = exporter(sync, hooks=broken)
    with caplog.at_level(logging.WARNING, "kvcertsync.agent.metrics"):
        first, second = await scrape(broken_server), await scrape(broken_server)
    # The engine's metrics still come; the broken provider is logged once, not every scrape.
    assert first.value("kvcertsync_certificates") == second.value("kvcertsync_certificates") == 1
    assert "kvcertsync_hook_runs_total" not in first.samples
    assert len([r for r in caplog.records if "hook counters" in r.getMessage()]) == 1


async def test_server_closes_and_a_taken_port_is_a_clear_error(ca: TestAuthority) -> None:
    sync = CertSync([WEB], store=MemoryStore(), source=MemorySource())
    server = start_metrics_server("0", sync)
    try:
        assert server.host == "127.0.0.1" and server.running
        with pytest.raises(MetricsError, match=rf"cannot serve metrics on 127.0.0.1:{server.port}"):
            start_metrics_server(f"127.0.0.1:{server.port}", sync)
        # Before the first poll: the certificate is known but nothing is installed yet.
        got = await scrape(server)
        assert got.value("kvcertsync_certificate_installed") == 0
        assert got.value("kvcertsync_initial_sync_done") == 0
        assert "kvcertsync_certificate_not_after_timestamp_seconds" not in got.samples
        assert "kvcertsync_initial_sync_duration_seconds" not in got.samples
    finally:
        server.close()
    server.close()  # idempotent
    assert not server.running
    with pytest.raises(urllib.error.URLError):
        await scrape(server)


def test_ipv6_loopback_is_served_when_the_machine_has_it() -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    sync = CertSync([WEB], store=MemoryStore(), source=MemorySource())
    with start_metrics_server("[::1]:0", sync) as server:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        with urllib.request.urlopen(server.url, timeout=10) as response:
            assert b"kvcertsync_polls_total" in response.read()


def test_collector_registers_in_a_users_own_registry() -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry, DuplicateTimeseries

    sync = CertSync([WEB], store=MemoryStore(), source=MemorySource())
    registry = CollectorRegistry()
    collector = SyncCollector(sync)
    registry.register(collector)
    with pytest.raises(DuplicateTimeseries):
        registry.register(SyncCollector(sync))
    assert b"kvcertsync_certificate_current" in generate_latest(registry)
    assert b"kvcertsync_polls_total 0.0" in generate_latest(metrics_registry(sync))


async def test_docs_and_alert_rules_name_only_real_metrics_and_document_all(
    ca: TestAuthority, exporter: Callable[..., MetricsServer]
) -> None:
    source = MemorySource()
    source.set(WEB, ca.issue(["web.example.com"]))
    sync = CertSync([WEB], store=MemoryStore(), source=source)
    await sync.sync_once()
    got = await scrape(exporter(sync, hooks=lambda: {"nginx": (1, 0)}))
    real = set(got.samples) | set(got.types)
    docs = (ROOT / "docs" / "metrics.md").read_text()
    for text in (docs, ALERTS.read_text()):
        named = set(re.findall(r"kvcertsync_[a-z_]*[a-z]", text))
        assert named <= real, named - real
    undocumented = {name for name in got.types if f"`{name}`" not in docs}
    # Counters are documented by their sample name (``..._total``).
    undocumented -= {name for name in undocumented if f"`{name}_total`" in docs}
    assert not undocumented


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_alert_rules_pass_promtool() -> None:
    folder = ALERTS.parent
    for argv in (
        ["promtool", "check", "rules", ALERTS.name],
        ["promtool", "test", "rules", "kvcertsync-alerts.test.yml"],
    ):
        done = subprocess.run(argv, cwd=folder, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------------------- the snapshot API


class ClockedSource(MemorySource):
    """A MemorySource whose reads take ``delay`` seconds of the fake clock."""

    def __init__(self, clock: FakeClock, delay: float) -> None:
        super().__init__()
        self.clock = clock
        self.delay = delay

    async def get(self, uri: SecretUri) -> SecretVersion:
        await self.clock.sleep_until(self.clock.now() + self.delay)
        return await super().get(uri)


class ClockedStore(MemoryStore):
    def __init__(self, clock: FakeClock, delay: float) -> None:
        super().__init__()
        self.clock = clock
        self.delay = delay

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        await self.clock.sleep_until(self.clock.now() + self.delay)
        return await super().install(observed, material, version)


async def test_stats_measure_with_the_engines_clock(ca: TestAuthority) -> None:
    # Not at 0: the engine treats a start time of 0.0 as unset.
    clock = FakeClock(start=1000.0)
    source = ClockedSource(clock, 0.2)
    source.set(WEB, ca.issue(["web.example.com"]))
    sync = CertSync([WEB], store=ClockedStore(clock, 0.03), source=source, clock=clock)
    before = sync.stats()
    assert (before.polls, before.changes, before.failures.total) == (0, 0, 0)
    assert not before.initial_sync_done and before.initial_sync_duration is None
    assert before.certificates == 1

    async with sync:
        with anyio.fail_after(10):
            while not sync.stats().initial_sync_done:
                await clock.advance(0.01)
                # Parsing runs in a worker thread the fake clock cannot see.
                await anyio.sleep(0.001)
        stats = sync.stats()

    assert stats.polls == 1 and stats.changes == 1
    fetch, install = stats.fetch_latency, stats.install_latency
    assert fetch.count == 1 and fetch.sum == pytest.approx(0.2)
    assert fetch.counts[LATENCY_BUCKETS.index(0.25)] == 1
    assert install.count == 1 and install.sum == pytest.approx(0.03)
    assert install.counts[LATENCY_BUCKETS.index(0.05)] == 1
    assert dict(install.cumulative())[0.025] == 0
    assert dict(install.cumulative())[float("inf")] == 1
    assert stats.initial_sync_duration is not None
    assert stats.initial_sync_duration >= 0.23
    assert stats.events.published == 2  # CertificateUpdated, InitialSyncCompleted


def test_histogram_buckets_are_upper_bounds_inclusive() -> None:
    recorder = StatsRecorder(buckets=(0.1, 1.0))
    for seconds in (0.1, 0.5, 1.0, 7.0):
        recorder.fetch.observe(seconds)
    snapshot = recorder.fetch.snapshot()
    assert snapshot.counts == (1, 2, 1)
    assert snapshot.cumulative() == ((0.1, 1), (1.0, 3), (float("inf"), 4))
    assert snapshot.sum == pytest.approx(8.6)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (AuthenticationFailed("x"), "auth"),
        (AccessDenied("x"), "access_denied"),
        (SecretNotFound("x"), "not_found"),
        (Throttled("x"), "throttled"),
        (TransientSourceError("x"), "network"),
        (StoreError("x"), "store"),
        (ValueError("x"), "other"),
    ],
)
def test_failure_kinds(error: Exception, kind: str) -> None:
    assert failure_kind(error) == kind


# ------------------------------------------------------------------------- without the extra


def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "prometheus_client" or name.startswith("prometheus_client."):
            monkeypatch.setitem(sys.modules, name, None)
    sync = CertSync([WEB], store=MemoryStore(), source=MemorySource())
    for attempt in (
        lambda: start_metrics_server("127.0.0.1:0", sync),
        lambda: SyncCollector(sync),
        lambda: metrics_registry(sync),
    ):
        with pytest.raises(MetricsUnavailable) as caught:
            attempt()
        assert INSTALL_HINT in str(caught.value)
        assert "pip install 'kvcertsync[metrics]'" in str(caught.value)
    # The library's own snapshot needs no extra.
    assert sync.stats().polls == 0


def test_the_module_and_the_engine_import_without_the_client() -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "import kvcertsync.agent.metrics as m, kvcertsync.engine\n"
        "assert m.parse_metrics_address('9464') == ('127.0.0.1', 9464)\n"
        "assert 'prometheus_client' not in [k for k, v in sys.modules.items() if v]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        ("0", ("127.0.0.1", 0)),
        (" 127.0.0.1:9464 ", ("127.0.0.1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),
        ("localhost:9464", ("localhost", 9464)),
        ("metrics-host.internal:80", ("metrics-host.internal", 80)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:0", ("::", 0)),
    ],
)
def test_metrics_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_address(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        (":9464", "has no host: give PORT for 127.0.0.1, or 0.0.0.0:PORT"),
        ("::1:9464", r"brackets, e.g. \[::1\]:9464"),
        ("[::1]", r"\[ADDRESS\]:PORT"),
        ("[example.com]:80", "not an IPv6 address"),
        ("localhost:http", "port 'http' is not a number"),
        ("localhost:", "port '' is not a number"),
        ("-1", "port '-1' is not a number"),
        ("127.0.0.1:70000", "above 65535"),
        ("http://127.0.0.1:9464/metrics", "is a URL or path"),
        ("bad host:80", "is not a host name or address"),
    ],
)
def test_bad_metrics_addresses_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_metrics_address(text)
