"""Unchanged polls side by side: kvcertsync beside its source, bare aiohttp and the Azure SDKs.

Run: .venv/bin/python benchmarks/bench_compare.py [--certificates 2000] [--vaults 10] [--quick]

The emulator runs as a ``kvcertsync emulator`` process of its own. Each client runs in a fresh
process, so its CPU (getrusage, user + system) and RSS (/proc/self/status) are its own, and reads
the same certificate-backed secrets ``--passes`` times, ``--concurrency`` in flight, after one
untimed pass (challenges, token, connection pool; for CertSync, after its initial sync):

- ``certsync-memory`` / ``certsync-pemdir``: ``CertSync.sync_once()`` after an initial sync, with
  MemoryStore and with PemDirectoryStore (every poll finds the certificate unchanged);
- ``source``: its KeyVaultSource alone (``source.get``);
- ``bare-aiohttp``: one aiohttp session, a bearer token set by hand, no SDK: the ceiling;
- ``naive-aio-sdk``: one azure.keyvault.secrets.aio.SecretClient per vault, default transport,
  the CA trusted as a deployment trusts it (``SSL_CERT_FILE``, no ``connection_verify``);
- ``sync-sdk-serial``: the sync SecretClient per vault, one request after another.

All of it at 0 ms and at 15 ms of latency injected per request by the emulator. At 0 ms every
client is bound by this machine's CPU, whose speed drifts by more than the differences measured
from one minute to the next: there the clients run ``--rounds`` times, in turn (forward, then
backward), and each figure pools the passes of every round, so drift falls on all of them alike.
Beside each ratio a target is judged by, each round's own ratio (the two clients run next to
each other in every round) shows how much the machine moved it. At 15 ms they are bound by the
latency and one round suffices. Then rotation
latency (polling, and ``CertSync.refresh()``). Prints figures, the targets of issue 16 and
whether each is met; asserts nothing (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
from _common import (  # run as a script: benchmarks/ is on sys.path
    EmulatorProcess,
    admin_call,
    cpu_seconds,
    file_system_ceiling,
    process_cpu_seconds,
    rss_mib,
    secret_url,
    spread,
    timed,
    vault_urls,
    verdict,
)

# In this order (and back): CertSync with MemoryStore runs next to each client it is compared with.
CLIENTS = (
    "source",
    "certsync-memory",
    "certsync-pemdir",
    "bare-aiohttp",
    "naive-aio-sdk",
    "sync-sdk-serial",
)
LATENCIES = (0.0, 0.015)
API_VERSION = "7.5"
ROTATION_VAULT = "rotation"
ROTATION_INTERVAL = 1.0
_SCRIPT = Path(__file__).resolve()


class Meter:
    """One pass's client CPU and the emulator's CPU over the same wall time."""

    def __init__(self, emulator_pid: int) -> None:
        self.emulator_pid = emulator_pid
        self.rates: list[float] = []
        self.cpu_us: list[float] = []
        self.emulator_share: list[float] = []

    def record(self, count: int, run: Callable[[], float]) -> None:
        """Run one pass of ``count`` reads; ``run()`` returns its wall seconds."""
        cpu, emulator = cpu_seconds(), process_cpu_seconds(self.emulator_pid)
        wall = run()
        self.rates.append(count / wall)
        self.cpu_us.append((cpu_seconds() - cpu) / count * 1e6)
        self.emulator_share.append((process_cpu_seconds(self.emulator_pid) - emulator) / wall)

    async def arecord(self, count: int, run: Callable[[], Awaitable[float]]) -> None:
        """``record`` for an async pass."""
        cpu, emulator = cpu_seconds(), process_cpu_seconds(self.emulator_pid)
        wall = await run()
        self.rates.append(count / wall)
        self.cpu_us.append((cpu_seconds() - cpu) / count * 1e6)
        self.emulator_share.append((process_cpu_seconds(self.emulator_pid) - emulator) / wall)

    def result(self, **extra: Any) -> dict[str, Any]:
        """What the child prints."""
        return {
            "rates": self.rates,
            "cpu_us": self.cpu_us,
            "emulator_share": self.emulator_share,
            "rss_mib": rss_mib(),
            **extra,
        }


def resolve_vaults_locally(port: int) -> None:
    """Send ``*.vault.azure.net:443`` to the emulator, as /etc/hosts plus a port forward would."""
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, service: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, str) and host.endswith(".vault.azure.net"):
            return real("127.0.0.1", port, *args, **kwargs)
        return real(host, service, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]


def names(info: dict[str, Any]) -> list[tuple[str, str]]:
    """The (vault, name) pairs every client reads."""
    return vault_urls(info["certificates"], info["vaults"])


def kvcertsync_source(info: dict[str, Any], concurrency: int) -> Any:
    """kvcertsync's KeyVaultSource for this emulator."""
    from kvcertsync.auth import ImdsCredential
    from kvcertsync.sources import KeyVaultSource

    return KeyVaultSource(
        ImdsCredential(info["imds_endpoint"]),
        ca_file=info["ca_file"],
        redirect={"*.vault.azure.net": f"127.0.0.1:{info['port']}"},
        max_connections=concurrency,
        owns_credentials=True,
    )


async def run_certsync(info: dict[str, Any], store_kind: str, meter: Meter) -> dict[str, Any]:
    """Initial sync into the store, then unchanged ``sync_once()`` passes."""
    from kvcertsync.engine import CertSync
    from kvcertsync.stores import MemoryStore, PemDirectoryStore

    urls = [secret_url(v, n) for v, n in names(info)]
    # A directory of its own under the run's scratch root, deleted by the parent at the end only
    # (file_system_ceiling says why); the file system's own rate measured beside it first.
    directory = Path(tempfile.mkdtemp(prefix=f"{store_kind}-", dir=info["scratch"]))
    bare = file_system_ceiling(directory / "bare", len(urls)) if store_kind == "pemdir" else None
    store: Any = MemoryStore() if store_kind == "memory" else PemDirectoryStore(directory / "store")
    source = kvcertsync_source(info, info["concurrency"])
    # The rate limit is off: it paces a real fleet, here it would only hide the cost.
    sync = CertSync(
        urls,
        store=store,
        source=source,
        max_concurrency=info["concurrency"],
        rate_limit=1e9,
    )
    try:
        started = time.perf_counter()
        first = await sync.sync_once()
        initial = len(urls) / (time.perf_counter() - started)
        if len(first.updated) != len(urls):
            raise SystemExit(f"initial sync installed {len(first.updated)} of {len(urls)}")
        os.sync()  # its writeback out of the way of the polls (an agent polls much later)
        # An untimed unchanged pass, as for every client: the initial sync's garbage collected
        # here, not in the first timed pass.
        await sync.sync_once()
        unchanged: list[int] = []

        async def one_pass() -> float:
            started = time.perf_counter()
            report = await sync.sync_once()
            unchanged.append(len(report.unchanged))
            return time.perf_counter() - started

        for _ in range(info["passes"]):
            await meter.arecord(len(urls), one_pass)
    finally:
        await sync.aclose()
    if any(n != len(urls) for n in unchanged):
        raise SystemExit(f"a pass found changes or failures: unchanged {unchanged}")
    return meter.result(initial=initial, bare_file_system=bare)


async def run_source(info: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """``KeyVaultSource.get`` alone."""
    from kvcertsync.uri import SecretUri

    uris = [SecretUri.parse(secret_url(v, n)) for v, n in names(info)]
    async with kvcertsync_source(info, info["concurrency"]) as source:
        # An untimed pass first, as for every client: challenges, token, connection pool.
        await timed(len(uris), info["concurrency"], lambda i: source.get(uris[i]))
        for _ in range(info["passes"]):
            await meter.arecord(
                len(uris),
                lambda: timed(len(uris), info["concurrency"], lambda i: source.get(uris[i])),
            )
    return meter.result()


async def run_bare(info: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """Bare aiohttp GETs with a bearer token: the ceiling."""
    import ssl

    import aiohttp

    from kvcertsync.auth import ImdsCredential
    from kvcertsync.sources.redirect import RedirectResolver

    credential = ImdsCredential(info["imds_endpoint"])
    token = (await credential.get_token("https://vault.azure.net/.default")).token
    await credential.close()
    urls = [f"{secret_url(v, n)}/?api-version={API_VERSION}" for v, n in names(info)]
    connector = aiohttp.TCPConnector(
        limit=info["concurrency"],
        ssl=ssl.create_default_context(cafile=info["ca_file"]),
        resolver=RedirectResolver({"*.vault.azure.net": f"127.0.0.1:{info['port']}"}),
    )
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def get(i: int) -> object:
            async with session.get(urls[i]) as response:
                response.raise_for_status()
                return await response.json()

        await timed(len(urls), info["concurrency"], get)  # the untimed warm-up pass
        for _ in range(info["passes"]):
            await meter.arecord(len(urls), lambda: timed(len(urls), info["concurrency"], get))
    return meter.result()


def sdk_vault_url(vault: str) -> str:
    """The vault URL the SDK clients use: the real one."""
    return f"https://{vault}.vault.azure.net"


async def run_naive_aio(info: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """One aio SecretClient per vault, default transport, CA from SSL_CERT_FILE."""
    from azure.identity.aio import ManagedIdentityCredential
    from azure.keyvault.secrets.aio import SecretClient

    pairs = names(info)
    credential = ManagedIdentityCredential()
    vaults = sorted({v for v, _ in pairs})
    clients = {v: SecretClient(sdk_vault_url(v), credential) for v in vaults}
    try:

        async def get(i: int) -> object:
            return await clients[pairs[i][0]].get_secret(pairs[i][1])

        await timed(len(pairs), info["concurrency"], get)  # the untimed warm-up pass
        for _ in range(info["passes"]):
            await meter.arecord(len(pairs), lambda: timed(len(pairs), info["concurrency"], get))
    finally:
        for client in clients.values():
            await client.close()
        await credential.close()
    return meter.result()


def run_sync_serial(info: dict[str, Any], meter: Meter) -> dict[str, Any]:
    """The sync SecretClient per vault, one request after another."""
    from azure.identity import ManagedIdentityCredential
    from azure.keyvault.secrets import SecretClient

    pairs = names(info)
    credential = ManagedIdentityCredential()
    vaults = sorted({v for v, _ in pairs})
    clients = {v: SecretClient(sdk_vault_url(v), credential) for v in vaults}

    def one_pass() -> float:
        started = time.perf_counter()
        for vault, name in pairs:
            clients[vault].get_secret(name)
        return time.perf_counter() - started

    one_pass()  # the untimed warm-up pass
    for _ in range(info["passes"]):
        meter.record(len(pairs), one_pass)
    for client in clients.values():
        client.close()
    return meter.result()


async def run_rotation(info: dict[str, Any]) -> dict[str, Any]:
    """Seconds from a rotation to its install: by polling, and by ``refresh()``."""
    from kvcertsync.engine import CertSync
    from kvcertsync.events import CertificateUpdated
    from kvcertsync.stores import MemoryStore
    from kvcertsync.uri import SecretUri

    uri = SecretUri.parse(secret_url(ROTATION_VAULT, "r0"))
    store = MemoryStore()
    sync = CertSync(
        [uri],
        store=store,
        source=kvcertsync_source(info, 4),
        polling_interval=ROTATION_INTERVAL,
    )

    def version() -> str:
        installed = store.current(uri)
        return installed.version if installed else ""

    arrived: dict[str, anyio.Event] = {}

    def updated(event: CertificateUpdated) -> None:
        arrived.setdefault(event.version, anyio.Event()).set()

    sync.subscribe(updated, CertificateUpdated)

    async def rotate() -> str:
        path = f"rotate/{ROTATION_VAULT}/r0"
        call = lambda: admin_call(info["port"], info["admin_token"], None, "POST", path, {})  # noqa: E731
        answer = await anyio.to_thread.run_sync(call)
        return str(answer["version"])

    polled: list[float] = []
    refreshed: list[float] = []
    async with sync:
        await sync.wait_ready()
        for _ in range(info["rotations"]):
            new = await rotate()
            started = time.perf_counter()
            with anyio.fail_after(60):
                await arrived.setdefault(new, anyio.Event()).wait()
            polled.append(time.perf_counter() - started)
        for _ in range(info["rotations"]):
            new = await rotate()
            started = time.perf_counter()
            await sync.refresh(uri)
            refreshed.append(time.perf_counter() - started)
            if version() != new:
                raise SystemExit("refresh() returned before the new version was installed")
    return {"polled": polled, "refreshed": refreshed}


def child(kind: str, info: dict[str, Any]) -> None:
    """Run one client (in its own process) and print its figures as JSON."""
    meter = Meter(info["emulator_pid"])
    result: dict[str, Any]
    if kind in ("naive-aio-sdk", "sync-sdk-serial"):
        resolve_vaults_locally(info["port"])
    if kind == "certsync-memory":
        result = anyio.run(run_certsync, info, "memory", meter)
    elif kind == "certsync-pemdir":
        result = anyio.run(run_certsync, info, "pemdir", meter)
    elif kind == "source":
        result = anyio.run(run_source, info, meter)
    elif kind == "bare-aiohttp":
        result = anyio.run(run_bare, info, meter)
    elif kind == "naive-aio-sdk":
        result = anyio.run(run_naive_aio, info, meter)
    elif kind == "sync-sdk-serial":
        result = run_sync_serial(info, meter)
    else:
        result = anyio.run(run_rotation, info)
    print(json.dumps(result), flush=True)


def spawn(kind: str, info: dict[str, Any]) -> dict[str, Any]:
    """Run ``kind`` in a fresh process; the CA trusted the way a deployment trusts one.

    A client that fails is reported (``{"error": ...}``), not fatal: the others still count.
    """
    env = {
        **os.environ,
        "SSL_CERT_FILE": info["ca_file"],
        "REQUESTS_CA_BUNDLE": info["ca_file"],
        "AZURE_POD_IDENTITY_AUTHORITY_HOST": info["imds_authority"],
    }
    command = [sys.executable, str(_SCRIPT), "--child", kind, "--info", json.dumps(info)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {last}"}
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


def pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One client's figures over several rounds: every pass pooled; a failed round wins."""
    for r in rounds:
        if "error" in r:
            return r
    answer: dict[str, Any] = {
        key: [value for r in rounds for value in r[key]]
        for key in ("rates", "cpu_us", "emulator_share")
    }
    answer["rss_mib"] = max(r["rss_mib"] for r in rounds)
    for key in ("initial", "bare_file_system"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            answer[key] = median(values)
    return answer


def run_clients(info: dict[str, Any], rounds: int) -> dict[str, list[dict[str, Any]]]:
    """Every client ``rounds`` times, in turn, forward then backward: each round's figures."""
    figures: dict[str, list[dict[str, Any]]] = {kind: [] for kind in CLIENTS}
    for number in range(rounds):
        for kind in CLIENTS if number % 2 == 0 else reversed(CLIENTS):
            figures[kind].append(spawn(kind, info))
    return figures


def median(values: list[float]) -> float:
    """The median of ``values``."""
    return float(statistics.median(values))


class Figures:
    """Every client's results by latency, pooled and by round; a failed client's are None."""

    def __init__(self, rounds: dict[float, dict[str, list[dict[str, Any]]]]) -> None:
        self.rounds = rounds
        self.results = {
            latency: {kind: pooled(runs) for kind, runs in by_client.items()}
            for latency, by_client in rounds.items()
        }

    def median(self, latency: float, kind: str, key: str = "rates") -> float | None:
        """The median of ``key`` for ``kind`` at ``latency``, over every pass of every round."""
        values = self.results[latency][kind].get(key)
        return None if values is None else median(values)

    def round_ratios(self, latency: float, top: str, bottom: str) -> list[float] | None:
        """Each round's median rate of ``top`` over that of ``bottom``, run next to each other."""
        pairs = zip(self.rounds[latency][top], self.rounds[latency][bottom], strict=True)
        ratios = []
        for a, b in pairs:
            if "error" in a or "error" in b:
                return None
            ratios.append(median(a["rates"]) / median(b["rates"]))
        return ratios

    def ratio(self, latency: float, top: str, bottom: str) -> float | None:
        """Median rate of ``top`` over that of ``bottom``, every pass of every round pooled."""
        a, b = self.median(latency, top), self.median(latency, bottom)
        return None if a is None or b is None else a / b

    def rounds_of(self, latency: float, top: str, bottom: str, fmt: str, less: float = 0) -> str:
        """Each round's ratio (minus ``less``), for the line beside a target."""
        ratios = self.round_ratios(latency, top, bottom) or []
        return "rounds " + ", ".join(fmt.format(r - less) for r in ratios)


def target(name: str, value: float | None, fmt: str, goal: str, met: bool, beside: str) -> None:
    """One target line: the figure, the target, met or not, and the ceiling beside it."""
    shown = "n/a (a client failed)" if value is None else fmt.format(value)
    state = "" if value is None else verdict(met)
    print(f"  {name:34s} {shown:>9s}  ({goal})  {state}  [{beside}]")


def table(latency: float, by_client: dict[str, dict[str, Any]]) -> None:
    """The clients at one latency, beside the ceiling."""
    bare = by_client["bare-aiohttp"].get("rates")
    ceiling = median(bare) if bare else None
    print(f"\nlatency injected per request: {latency * 1000:.0f} ms")
    print(
        f"{'client':18s} {'GET/s min / median / max':>26s} {'of ceiling':>10s} "
        f"{'CPU us/poll min / med / max':>28s} {'RSS MiB':>8s} {'emulator CPU (max)':>18s}"
    )
    for kind in CLIENTS:
        r = by_client[kind]
        if "error" in r:
            print(f"{kind:18s} failed: {r['error']}")
            continue
        share = f"{median(r['rates']) / ceiling:.0%}" if ceiling else "n/a"
        print(
            f"{kind:18s} {spread(r['rates']):>26s} {share:>10s} {spread(r['cpu_us']):>28s} "
            f"{r['rss_mib']:>8.0f} {max(r['emulator_share']):>17.0%}"
        )
    print(f"(the ceiling: bare aiohttp, {ceiling or 0:.0f} GET/s median in this run)")
    for kind in ("certsync-memory", "certsync-pemdir"):
        if "initial" in by_client[kind]:
            rate = by_client[kind]["initial"]
            bare = by_client[kind].get("bare_file_system")
            beside = f" (the file system alone: {bare:.0f} atomic writes/s)" if bare else ""
            print(f"initial sync into {kind[9:]}: {rate:.0f} certificates/s{beside}")


def report(rounds: dict[float, dict[str, list[dict[str, Any]]]], rotation: dict[str, Any]) -> None:
    """Print every figure beside the ceiling, then the targets."""
    f = Figures(rounds)
    results = f.results
    for latency, by_client in results.items():
        table(latency, by_client)
    if "error" in rotation:
        print(f"\nrotation latency: failed: {rotation['error']}")
    else:
        print(
            f"\nrotation to install, polling every {ROTATION_INTERVAL:g} s: "
            f"{spread(rotation['polled'], '{:.3f}')} s (min / median / max)"
        )
        print(f"rotation to install, refresh(): {spread(rotation['refreshed'], '{:.3f}')} s")

    zero, slow = LATENCIES
    naive = f.ratio(zero, "certsync-memory", "naive-aio-sdk")
    serial = f.ratio(slow, "certsync-memory", "sync-sdk-serial")
    source = f.ratio(zero, "source", "certsync-memory")
    overhead = None if source is None else source - 1
    pem = f.ratio(zero, "certsync-pemdir", "certsync-memory")
    cpu = f.median(zero, "certsync-memory", "cpu_us")
    ceiling_cpu = f.median(zero, "bare-aiohttp", "cpu_us")
    shares = [
        max(r["emulator_share"]) for by in results.values() for r in by.values() if "rates" in r
    ]
    emulator = max(shares) if shares else None
    print(
        "\ntargets (issue 16), medians of this run (each round's own ratio beside, to show how "
        "much the machine moved it):"
    )
    target(
        "CertSync / naive aio SDK, 0 ms",
        naive,
        "{:.2f}x",
        "target >= 3x",
        (naive or 0) >= 3,
        f"ceiling / naive aio SDK {f.ratio(zero, 'bare-aiohttp', 'naive-aio-sdk') or 0:.2f}x",
    )
    target(
        "CertSync / sync SDK serial, 15 ms",
        serial,
        "{:.2f}x",
        "target >= 10x",
        (serial or 0) >= 10,
        f"ceiling / sync SDK serial {f.ratio(slow, 'bare-aiohttp', 'sync-sdk-serial') or 0:.2f}x",
    )
    target(
        "engine overhead over its source",
        overhead,
        "{:.1%}",
        "target <= 10 %",
        (overhead or 0) <= 0.10,
        f"{f.rounds_of(zero, 'source', 'certsync-memory', '{:+.1%}', 1)}; CertSync at "
        f"{f.ratio(zero, 'certsync-memory', 'bare-aiohttp') or 0:.0%} of the ceiling",
    )
    target(
        "PEM store / MemoryStore, 0 ms",
        pem,
        "{:.0%}",
        "target >= 90 %",
        (pem or 0) >= 0.90,
        f"{f.rounds_of(zero, 'certsync-pemdir', 'certsync-memory', '{:.0%}')}; CPU per poll "
        f"{f.median(zero, 'certsync-pemdir', 'cpu_us') or 0:.0f} against "
        f"{f.median(zero, 'certsync-memory', 'cpu_us') or 0:.0f} us; at 15 ms "
        f"{f.ratio(slow, 'certsync-pemdir', 'certsync-memory') or 0:.0%}",
    )
    target(
        "client CPU per unchanged poll",
        cpu,
        "{:.0f} us",
        "target <= 350 us",
        (cpu or 0) <= 350,
        f"the ceiling's {ceiling_cpu or 0:.0f} us",
    )
    target(
        "emulator CPU in the busiest pass",
        emulator,
        "{:.0%}",
        "of one core; near 100 % it is the bottleneck",
        (emulator or 0) < 0.9,
        "the emulator serves on one core",
    )


def main(args: argparse.Namespace) -> None:
    """Start the emulator, load it, run every client at each latency, print."""
    with EmulatorProcess() as emulator, tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        pairs = vault_urls(args.certificates, args.vaults)
        started = time.perf_counter()
        emulator.load_certificates([*pairs, (ROTATION_VAULT, "r0")])
        loaded = time.perf_counter() - started
        info = {
            **emulator.info(),
            "emulator_pid": emulator.pid,
            "certificates": args.certificates,
            "vaults": args.vaults,
            "concurrency": args.concurrency,
            "passes": args.passes,
            "rotations": args.rotations,
            "scratch": scratch,
        }
        print(
            f"{args.certificates} certificates over {args.vaults} vaults, "
            f"{args.concurrency} in flight, {args.passes} passes "
            f"(x {args.rounds} rounds at 0 ms); emulator pid {emulator.pid}, "
            f"bulk-loaded in {loaded:.1f} s, RSS {emulator.rss_mib():.0f} MiB"
        )
        results: dict[float, dict[str, list[dict[str, Any]]]] = {}
        for latency in LATENCIES:
            emulator.latency(latency)
            results[latency] = run_clients(info, args.rounds if latency == 0 else 1)
        emulator.latency(0)
        rotation = spawn("rotation", info)
        print(f"emulator RSS at the end: {emulator.rss_mib():.0f} MiB")
    report(results, rotation)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--certificates", type=int, default=2000)
    parser.add_argument("--vaults", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every client at 0 ms")
    parser.add_argument("--rotations", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a small run (CI smoke, < 60 s)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--info", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child, json.loads(options.info))
    else:
        if options.quick:
            options.certificates, options.vaults, options.rotations = 60, 2, 2
            options.rounds = min(options.rounds, 2)
        if options.passes < 3:
            parser.error("--passes must be at least 3 (min / median / max)")
        if options.rounds < 1:
            parser.error("--rounds must be at least 1")
        main(options)
