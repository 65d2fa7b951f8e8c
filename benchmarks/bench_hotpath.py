"""The hot path: unchanged polls, per client, with the emulator in a process of its own.

Run: .venv/bin/python benchmarks/bench_hotpath.py [--certs 200] [--passes 3] [--latency 0]
       [--profile /tmp/hot.prof] [--quick]
Side by side in one run, each pass of each client in turn (so noise falls on all alike):
- bare aiohttp: one session, the token set by hand (the ceiling for the work);
- KeyVaultSource, ``mode="direct"`` and ``mode="sdk"``;
- CertSync.sync_once() over a MemoryStore holding every certificate (unchanged polls);
- the naive aio SDK (one SecretClient, default transport, the CA trusted through SSL_CERT_FILE)
  and, with ``--latency``, the sync SDK serial, each in a child process.
Prints GET/s and client CPU per GET (getrusage), min/median/max over the passes, and the ratios
the issue's targets name; asserts nothing (figures from a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import anyio

from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.engine import CertSync
from kvcertsync.sources import KeyVaultSource
from kvcertsync.sources.redirect import RedirectResolver
from kvcertsync.stores import MemoryStore
from kvcertsync.uri import SecretUri

VAULT = "bench"
API_VERSION = "7.5"
CONCURRENCY = 32

Measure = tuple[float, float]  # GET/s, CPU µs per GET


def cpu() -> float:
    """CPU seconds (user + system) of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_pool(count: int, get: Callable[[int], Awaitable[object]]) -> Measure:
    """``count`` calls of ``get`` by CONCURRENCY workers: GET/s and CPU µs per call."""
    cursor = iter(range(count))

    async def worker() -> None:
        for i in cursor:
            await get(i)

    started, used = time.perf_counter(), cpu()
    async with anyio.create_task_group() as tg:
        for _ in range(CONCURRENCY):
            tg.start_soon(worker)
    elapsed, used = time.perf_counter() - started, cpu() - used
    return count / elapsed, used / count * 1e6


async def measured(get: Callable[[], Awaitable[object]], count: int) -> Measure:
    """One call of ``get`` doing ``count`` GETs: GET/s and CPU µs per GET."""
    started, used = time.perf_counter(), cpu()
    await get()
    elapsed, used = time.perf_counter() - started, cpu() - used
    return count / elapsed, used / count * 1e6


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of process ``pid`` so far, from /proc."""
    with open(f"/proc/{pid}/stat") as file:
        stat = file.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(name: str, runs: list[Measure]) -> str:
    rates = [r for r, _ in runs]
    cpus = [c for _, c in runs]
    return (
        f"{name:30s} {min(rates):7.0f} {statistics.median(rates):7.0f} {max(rates):7.0f} GET/s"
        f"   CPU/GET {min(cpus):5.0f} {statistics.median(cpus):5.0f} {max(cpus):5.0f} µs"
    )


def emulator(certs: int, latency: float) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """This script's ``--serve`` in a child process, and what it printed on start."""
    command = [sys.executable, __file__, "--serve", "--certs", str(certs)]
    process = subprocess.Popen(
        [*command, "--latency", str(latency)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, json.loads(process.stdout.readline())


async def serve(certs: int, latency: float) -> None:
    """Serve ``certs`` certificates in vault ``bench`` and ``localhost`` until stdin closes."""
    async with LocalKeyVault() as kv:
        pool = [kv.authority.issue([f"c{i}.example"]) for i in range(min(certs, 20))]
        for i in range(certs):
            for vault in (VAULT, "localhost"):
                kv.import_certificate(vault, f"c{i}", pool[i % len(pool)])
        if latency:
            kv.latency(latency)
        info = {"ca_file": kv.ca_file, "redirect": kv.redirect, "imds": kv.imds_endpoint}
        info |= {"imds_authority": kv.imds_authority, "local_url": kv.local_url}
        print(json.dumps(info), flush=True)
        await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)


async def naive(vault_url: str, certs: int, count: int, passes: int, sync: bool) -> None:
    """Print the naive SDK's [GET/s, CPU µs] of each pass as JSON (a child process)."""
    from azure.identity import ManagedIdentityCredential as SyncCredential
    from azure.identity.aio import ManagedIdentityCredential
    from azure.keyvault.secrets import SecretClient as SyncClient
    from azure.keyvault.secrets.aio import SecretClient

    runs: list[Measure] = []
    if sync:
        client = SyncClient(vault_url, SyncCredential(), verify_challenge_resource=False)
        client.get_secret("c0")
        for _ in range(passes):
            started, used = time.perf_counter(), cpu()
            for i in range(count):
                client.get_secret(f"c{i % certs}")
            elapsed, used = time.perf_counter() - started, cpu() - used
            runs.append((count / elapsed, used / count * 1e6))
    else:
        credential = ManagedIdentityCredential()
        aclient = SecretClient(vault_url, credential, verify_challenge_resource=False)
        async with aclient, credential:
            await aclient.get_secret("c0")
            for _ in range(passes):
                runs.append(await run_pool(count, lambda i: aclient.get_secret(f"c{i % certs}")))
    print(json.dumps(runs))


def child(info: dict[str, Any], certs: int, count: int, passes: int, sync: bool) -> list[Measure]:
    """The naive SDK's passes, run in a child process that trusts the CA via SSL_CERT_FILE."""
    # The sync SDK's transport (requests) reads its CA bundle from REQUESTS_CA_BUNDLE instead.
    env = {**os.environ, "SSL_CERT_FILE": info["ca_file"], "REQUESTS_CA_BUNDLE": info["ca_file"]}
    env["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = info["imds_authority"]
    command = [sys.executable, __file__, "--naive", info["local_url"], "--certs", str(certs)]
    command += ["--count", str(count), "--passes", str(passes)] + (["--sync"] if sync else [])
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return [tuple(run) for run in json.loads(out)]  # type: ignore[misc]


async def main(certs: int, passes: int, latency: float, profile: str | None) -> None:
    """Measure every client against one emulator process and print them side by side."""
    process, info = emulator(certs, latency)
    try:
        await compare(info, certs, passes, latency, profile, process.pid)
    finally:
        assert process.stdin is not None
        process.stdin.close()
        process.wait(timeout=30)


async def compare(
    info: dict[str, Any], certs: int, passes: int, latency: float, profile: str | None, pid: int
) -> None:
    uris = [SecretUri.parse(f"https://{VAULT}.vault.azure.net/secrets/c{i}") for i in range(certs)]
    count = certs * 2

    def source(mode: str) -> KeyVaultSource:
        return KeyVaultSource(
            ImdsCredential(info["imds"]),
            ca_file=info["ca_file"],
            redirect=info["redirect"],
            max_connections=CONCURRENCY,
            owns_credentials=True,
            mode=mode,  # type: ignore[arg-type]
        )

    credential = ImdsCredential(info["imds"])
    token = (await credential.get_token("https://vault.azure.net/.default")).token
    await credential.close()
    import ssl

    connector = aiohttp.TCPConnector(
        limit=CONCURRENCY,
        ssl=ssl.create_default_context(cafile=info["ca_file"]),
        resolver=RedirectResolver(info["redirect"]),
    )
    session = aiohttp.ClientSession(connector=connector)
    headers = {"Authorization": f"Bearer {token}"}

    async def bare(i: int) -> object:
        url = f"{uris[i % certs]}/?api-version={API_VERSION}"
        async with session.get(url, headers=headers) as response:
            response.raise_for_status()
            return json.loads(await response.read())

    direct, sdk = source("direct"), source("sdk")
    engine_source = source("direct")
    store = MemoryStore()
    sync = CertSync(
        uris,
        store=store,
        source=engine_source,
        max_concurrency=CONCURRENCY,
        max_per_vault=CONCURRENCY,
        rate_limit=1e9,
    )
    first = await sync.sync_once()
    assert first.ok and len(first.updated) == certs, first.errors
    for client in (direct, sdk):
        await client.get(uris[0])
    await bare(0)

    results: dict[str, list[Measure]] = {}
    profiler = cProfile.Profile() if profile else None

    async def engine_pass() -> None:
        for _ in range(count // certs):
            report = await sync.sync_once()
            assert len(report.unchanged) == certs, report.errors

    emulator_cpu, emulator_gets = process_cpu(pid), 0
    for _ in range(passes):
        emulator_gets += 4 * count
        results.setdefault("bare aiohttp (ceiling)", []).append(await run_pool(count, bare))
        results.setdefault("KeyVaultSource direct", []).append(
            await run_pool(count, lambda i: direct.get(uris[i % certs]))
        )
        results.setdefault("KeyVaultSource sdk", []).append(
            await run_pool(count, lambda i: sdk.get(uris[i % certs]))
        )
        if profiler is not None:
            profiler.enable()
        results.setdefault("CertSync.sync_once (direct)", []).append(
            await measured(engine_pass, count)
        )
        if profiler is not None:
            profiler.disable()
    emulator_cpu = process_cpu(pid) - emulator_cpu
    await session.close()
    for client in (direct, sdk):
        await client.aclose()
    await sync.aclose()
    if profiler is not None and profile:
        profiler.dump_stats(profile)
    results["naive aio SDK (SSL_CERT_FILE)"] = child(info, certs, count, passes, sync=False)
    if latency:
        serial = max(20, int(2 / latency))
        results["sync SDK, serial"] = child(info, certs, serial, passes, sync=True)

    print(f"{certs} certificates, {count} GETs a pass, {passes} passes, {CONCURRENCY} in flight,")
    print(f"injected latency {latency * 1000:g} ms; emulator in another process")
    print(f"{'':30s} {'min':>7s} {'median':>7s} {'max':>7s}          {'min':>5s} {'med':>5s}")
    for name, runs in results.items():
        print(summary(name, runs))
    per_get = emulator_cpu / emulator_gets * 1e6
    print(f"the emulator's CPU per GET of the in-process clients: {per_get:.0f} µs")

    def rate(name: str) -> float:
        return statistics.median(r for r, _ in results[name])

    def cpu_of(name: str) -> float:
        return statistics.median(c for _, c in results[name])

    engine, naive_sdk = "CertSync.sync_once (direct)", "naive aio SDK (SSL_CERT_FILE)"
    ratios = [
        ("GET/s CertSync / naive aio SDK", rate(engine) / rate(naive_sdk)),
        ("GET/s source direct / sdk", rate("KeyVaultSource direct") / rate("KeyVaultSource sdk")),
        ("GET/s CertSync / its source alone", rate(engine) / rate("KeyVaultSource direct")),
        ("GET/s CertSync / bare aiohttp", rate(engine) / rate("bare aiohttp (ceiling)")),
        ("CPU/GET naive aio SDK / CertSync", cpu_of(naive_sdk) / cpu_of(engine)),
        ("CPU/GET CertSync / bare aiohttp", cpu_of(engine) / cpu_of("bare aiohttp (ceiling)")),
    ]
    if latency:
        ratios.append(("GET/s CertSync / sync SDK serial", rate(engine) / rate("sync SDK, serial")))
    for name, ratio in ratios:
        print(f"{name:36s} {ratio:6.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--certs", type=int, default=200)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--profile", help="write a cProfile of the CertSync passes here")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--naive", metavar="VAULT_URL", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--sync", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 certs, 1 pass, 5 ms")
    args = parser.parse_args()
    if args.quick:
        args.certs, args.passes, args.latency = 10, 1, 0.005
    if args.serve:
        anyio.run(serve, args.certs, args.latency)
    elif args.naive:
        anyio.run(naive, args.naive, args.certs, args.count, args.passes, args.sync)
    else:
        anyio.run(main, args.certs, args.passes, args.latency, args.profile)
