"""Engine throughput and footprint: one pass and steady polling over many observed URLs.

Run: .venv/bin/python benchmarks/bench_engine.py [--urls 10000] [--vaults 10]
Prints figures and ratios; asserts nothing (machines here are shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import anyio
from _common import rss_mib  # run as a script: benchmarks/ is on sys.path

from kvcertsync.emulator import TestAuthority
from kvcertsync.engine import CertSync
from kvcertsync.sources import MemorySource
from kvcertsync.stores import MemoryStore


def build(urls: int, vaults: int) -> tuple[list[str], MemorySource]:
    """Observed URLs spread over ``vaults`` vaults, each holding one of 20 certificates."""
    ca = TestAuthority()
    pool = [ca.issue([f"h{i}.example"]) for i in range(20)]
    source = MemorySource()
    targets = [f"https://bench{i % vaults}x.vault.azure.net/secrets/c{i}" for i in range(urls)]
    for i, url in enumerate(targets):
        source.set(url, pool[i % len(pool)])
    return targets, source


async def main(urls: int, vaults: int, concurrency: int) -> None:
    """Measure a cold pass (parse + install), a warm pass (compare only) and idle tasks."""
    targets, source = build(urls, vaults)
    # Resident memory (/proc), not tracemalloc: tracemalloc misses the parsed keys and
    # certificates (OpenSSL's allocations) that the store keeps, about half of the total.
    gc.collect()
    before = rss_mib()
    store = MemoryStore()
    sync = CertSync(
        targets, store=store, source=source, max_concurrency=concurrency, rate_limit=1e9
    )
    t0 = time.perf_counter()
    cold = await sync.sync_once()
    cold_s = time.perf_counter() - t0
    gc.collect()
    grown = rss_mib() - before
    t0 = time.perf_counter()
    warm = await sync.sync_once()
    warm_s = time.perf_counter() - t0
    assert len(cold.updated) == urls and len(warm.unchanged) == urls

    async with sync:
        await sync.wait_ready()
        await anyio.sleep(0.5)
        idle_tasks = len(asyncio.all_tasks())

    print(f"observed URLs            {urls} over {vaults} vaults, max_concurrency {concurrency}")
    print(f"cold pass (parse+install) {cold_s:8.2f} s  {urls / cold_s:10.0f} certs/s")
    print(f"warm pass (no change)     {warm_s:8.2f} s  {urls / warm_s:10.0f} polls/s")
    print(f"warm/cold speed ratio     {cold_s / warm_s:8.1f}x")
    per_url = grown * 1024 / urls
    print(f"resident memory, cold pass {grown:7.1f} MiB  ({per_url:.1f} KiB per URL, RSS)")
    print(f"tasks alive while idle    {idle_tasks:8d}  (ratio to URLs {idle_tasks / urls:.4f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--urls", type=int, default=10_000)
    parser.add_argument("--vaults", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    anyio.run(main, args.urls, args.vaults, args.concurrency)
