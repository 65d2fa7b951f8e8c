"""Push refresh vs polling: how long after a rotation the new certificate is in the store.

Each rotation is a new version in the local Key Vault emulator; "visible" is the PEM store's
link (``<dir>/demo.web``) naming the new version, read every millisecond. Push: the agent polls
hourly and the emulator delivers Event Grid's SecretNewVersionCreated/CertificateNewVersionCreated
to a PushServer. Poll: no push, every --interval seconds (rotations land at random phases). The
extension's usual 3600 s interval is given analytically: a rotation waits U(0, 3600) s.

Run: .venv/bin/python benchmarks/bench_push.py [--rotations 20] [--interval 1] [--schema eventgrid]
Prints figures and ratios; asserts nothing (machines here are shared and noisy).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import anyio

from kvcertsync import CertSync
from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.emulator.webhooks import Schema
from kvcertsync.push import PushServer
from kvcertsync.sources import KeyVaultSource
from kvcertsync.stores import PemDirectoryStore

URL = "https://demo.vault.azure.net/secrets/web"


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(fraction * len(ordered)) - 1))]


async def visible(link: Path, version: str, started: float) -> float:
    """Seconds from ``started`` until ``link`` names ``version``."""
    with anyio.fail_after(60):
        while version not in os.readlink(link):  # noqa: ASYNC110 - a file, no event to wait on
            await anyio.sleep(0.001)
    return time.perf_counter() - started


async def measure(
    kv: LocalKeyVault, directory: Path, rotations: int, interval: float, push: Schema | None
) -> list[float]:
    """Delays of ``rotations`` rotations, with push (the schema) or polling every ``interval``."""
    source = KeyVaultSource(
        ImdsCredential(kv.imds_endpoint),
        ca_file=kv.ca_file,
        redirect=kv.redirect,
        owns_credentials=True,
    )
    store = PemDirectoryStore(directory)
    sync = CertSync([URL], store=store, source=source, polling_interval=interval)
    key = secrets.token_urlsafe(32)
    link = directory / "demo.web"
    delays: list[float] = []
    async with sync, PushServer(sync, key=key) as server:
        await sync.wait_ready()
        hook = None
        if push is not None:
            hook = await kv.add_webhook(f"{server.url}?code={key}", schema=push)
        for _ in range(rotations):
            if push is None:
                # Land at a random phase of the poll cycle, as real rotations do.
                await anyio.sleep(random.uniform(0, interval))
            started = time.perf_counter()
            version = kv.rotate("demo", "web")
            delays.append(await visible(link, version, started))
            await kv.wait_webhooks()
            await server.refresher.wait_idle()
        if hook is not None:
            kv.remove_webhook(hook.id)
    return delays


def line(name: str, delays: list[float]) -> str:
    p50, p95 = percentile(delays, 0.5), percentile(delays, 0.95)
    return (
        f"{name:<30} p50 {p50 * 1000:9.1f} ms   p95 {p95 * 1000:9.1f} ms   "
        f"max {max(delays) * 1000:9.1f} ms   mean {statistics.fmean(delays) * 1000:9.1f} ms"
    )


async def main(rotations: int, interval: float, schema: Schema) -> None:
    """Measure push and polling, then compare them with the extension's hourly poll."""
    async with LocalKeyVault() as kv:
        kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
        with tempfile.TemporaryDirectory() as tmp:
            push = await measure(kv, Path(tmp, "push"), rotations, 3600, schema)
            poll = await measure(kv, Path(tmp, "poll"), rotations, interval, None)
    print(f"{'rotations per mode':<30} {rotations} (one certificate, PEM store, emulator)")
    print(line(f"push {schema} (poll 3600 s)", push))
    print(line(f"poll every {interval:g} s", poll))
    hourly_p50, hourly_p95 = 1800.0, 0.95 * 3600
    model = "poll every 3600 s (model)"
    print(f"{model:<30} p50 {hourly_p50:9.0f} s    p95 {hourly_p95:9.0f} s")
    p50, p95 = percentile(push, 0.5), percentile(push, 0.95)
    print(
        f"{f'poll {interval:g} s / push':<30} p50 {percentile(poll, 0.5) / p50:8.0f}x"
        f"   p95 {percentile(poll, 0.95) / p95:8.0f}x"
    )
    print(f"{'poll 3600 s / push':<30} p50 {hourly_p50 / p50:8.0f}x   p95 {hourly_p95 / p95:8.0f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--interval", type=float, default=1.0, help="the polling mode's interval")
    parser.add_argument("--schema", choices=("eventgrid", "cloudevents"), default="eventgrid")
    args = parser.parse_args()
    anyio.run(main, args.rotations, args.interval, args.schema)
