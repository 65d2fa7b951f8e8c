"""PemDirectoryStore against MemoryStore: install cost vs population, initial sync, unchanged polls.

Run: .venv/bin/python benchmarks/bench_pemdir.py [--certs 2000] [--passes 3] [--quick]

1. Install cost with 10, 500 and 2,000 certificates already in the directory: installing a new
   version of a certificate, with the store's normal fsyncs and (to show the file-system work
   alone) with fsync made a no-op in this process.
2. Initial sync of ``--certs`` certificates through CertSync, from the emulator running in another
   process, into a fresh PemDirectoryStore and into a MemoryStore: certificates/s and ratio;
   beside them the file system's own ceiling (``_common.file_system_ceiling``: the same number of
   atomic writes, links and fsyncs with nothing else). Nothing is deleted until the end: ext4
   creates files slowly for minutes after thousands were deleted, which would measure the last
   pass's cleanup instead of the store.
3. Unchanged polls (``sync_once`` again, nothing changed) with each store, against the source
   alone (KeyVaultSource.get for every URL: the ceiling of both), GET/s and client CPU per poll.

Baseline and candidate run side by side in one process, passes alternating; min/median/max over
``--passes``. Prints figures and ratios; asserts nothing (machines here are shared and noisy).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_seconds, file_system_ceiling, timed
from _common import spread as common_spread
from reliability_common import Emulator, secret_url

from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import TestAuthority
from kvcertsync.engine import CertSync
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.sources import KeyVaultSource
from kvcertsync.stores import MemoryStore, PemDirectoryStore, Store
from kvcertsync.uri import SecretUri

CONCURRENCY = 32


def spread(values: Sequence[float]) -> str:
    """``min / median / max`` of ``values``, in columns."""
    return common_spread(list(values), "{:8.1f}")


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh 0700 directory for the whole run, on the default temp directory's file system.

    Removed only at the end: see ``file_system_ceiling`` for why nothing is deleted before a
    measurement.
    """
    base = Path(tempfile.mkdtemp(prefix="bench-pemdir-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def fsync_disabled(disabled: bool) -> Iterator[None]:
    """Make os.fsync a no-op in this process (to show the file-system work without it)."""
    real = os.fsync
    if disabled:
        os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real


def os_calls(work: Callable[[], object]) -> int:
    """How many calls of ``os`` functions (system calls, nearly one for one) ``work`` makes."""
    calls = 0

    def count(frame: object, event: str, function: object) -> None:
        nonlocal calls
        if event == "c_call" and getattr(function, "__module__", None) == "posix":
            calls += 1

    sys.setprofile(count)
    try:
        work()
    finally:
        sys.setprofile(None)
    return calls


async def gather(count: int, call: Callable[[int], Awaitable[object]]) -> None:
    """``call(i)`` for every i below ``count``, CONCURRENCY at a time."""
    await timed(count, CONCURRENCY, call)


async def fill(
    store: Store, certs: Sequence[ObservedCertificate], pool: Sequence[CertificateMaterial]
) -> None:
    """Install a first version of every one of ``certs``, CONCURRENCY at a time."""
    await gather(len(certs), lambda i: store.install(certs[i], pool[i % len(pool)], f"{1:032x}"))


async def install_cost(run: Path, populations: Sequence[int], passes: int, rotations: int) -> None:
    """Milliseconds per install of a new version, by how many certificates share the directory."""
    authority = TestAuthority()
    pool: list[CertificateMaterial] = [authority.issue([f"h{i}.example"]) for i in range(4)]
    print(f"install cost: {rotations} installs of a new version, serial; ms per install")
    print(
        "  certificates present   with fsync min / median / max   without fsync min / med / max"
        "   os calls per install"
    )
    for population in populations:
        row: dict[bool, list[float]] = {False: [], True: []}
        store = PemDirectoryStore(run / f"population{population}")
        certs = [ObservedCertificate.of(secret_url(i)) for i in range(population)]
        await fill(store, certs, pool)
        os.sync()  # the fill's writeback out of the way of what is measured
        serial = 2
        for _ in range(passes):
            for disabled in (False, True):
                with fsync_disabled(disabled):
                    started = time.perf_counter()
                    for k in range(rotations):
                        serial += 1
                        material = pool[serial % 4]
                        await store.install(certs[k % population], material, f"{serial:032x}")
                    row[disabled].append((time.perf_counter() - started) / rotations * 1e3)
        serial += 1
        # Counted in this thread (a profile hook sees only its own thread): the same work.
        one = functools.partial(store._install, certs[0], pool[serial % 4], f"{serial:032x}")
        calls = os_calls(one)
        print(f"  {population:20d}   {spread(row[False])}        {spread(row[True])}   {calls:6d}")


def source_for(emulator: Emulator) -> KeyVaultSource:
    """A KeyVaultSource reaching the emulator process, TLS verified against its CA."""
    pattern, target = emulator.info["redirect"].split("=", 1)
    return KeyVaultSource(
        ImdsCredential(emulator.info["msi_endpoint"]),
        ca_file=emulator.info["ca_file"],
        redirect={pattern: target},
        max_connections=CONCURRENCY,
        owns_credentials=True,
    )


def new_sync(urls: Sequence[str], store: Store, source: KeyVaultSource) -> CertSync:
    """A CertSync over ``urls`` with no rate limit in the way."""
    return CertSync(urls, store=store, source=source, max_concurrency=CONCURRENCY, rate_limit=1e9)


async def syncs_and_polls(run: Path, certs: int, passes: int) -> None:
    """Initial sync and unchanged polls with each store, beside the source and file system alone."""
    urls = [secret_url(i) for i in range(certs)]
    uris = [SecretUri.parse(url) for url in urls]
    initial: dict[str, list[float]] = {"pem": [], "memory": []}
    initial_cpu: dict[str, list[float]] = {"pem": [], "memory": []}
    ceiling: list[float] = []
    polls: dict[str, list[float]] = {"pem": [], "memory": [], "source": []}
    cpu: dict[str, list[float]] = {"pem": [], "memory": [], "source": []}
    with Emulator(certs, rotate_every=0) as emulator:
        source = source_for(emulator)
        async with source:
            await source.get(uris[0])  # the challenge and the token out of the way
            for n in range(passes):
                ceiling.append(file_system_ceiling(run / f"bare{n}", certs))
                stores: dict[str, Store] = {
                    "pem": PemDirectoryStore(run / f"pass{n}"),
                    "memory": MemoryStore(),
                }
                for name, store in stores.items():
                    sync = new_sync(urls, store, source)
                    started, cpu0 = time.perf_counter(), cpu_seconds()
                    report = await sync.sync_once()
                    initial[name].append(certs / (time.perf_counter() - started))
                    initial_cpu[name].append((cpu_seconds() - cpu0) / certs * 1e3)
                    assert len(report.updated) == certs, report
                    started, cpu0 = time.perf_counter(), cpu_seconds()
                    report = await sync.sync_once()
                    polls[name].append(certs / (time.perf_counter() - started))
                    cpu[name].append((cpu_seconds() - cpu0) / certs * 1e6)
                    assert len(report.unchanged) == certs, report
                started, cpu0 = time.perf_counter(), cpu_seconds()
                await gather(certs, lambda i: source.get(uris[i]))
                polls["source"].append(certs / (time.perf_counter() - started))
                cpu["source"].append((cpu_seconds() - cpu0) / certs * 1e6)
    print(
        f"initial sync of {certs} certificates from the emulator (another process), certs/s"
        "   (client CPU per certificate, ms)"
    )
    print(
        f"  PemDirectoryStore        {spread(initial['pem'])}   ({spread(initial_cpu['pem'])})"
        "   target >= 250"
    )
    memory = f"{spread(initial['memory'])}   ({spread(initial_cpu['memory'])})"
    print(f"  MemoryStore              {memory}")
    print(f"  bare file system         {spread(ceiling)}   (the ceiling: atomic writes, serial)")
    ratios = [p / m for p, m in zip(initial["pem"], initial["memory"], strict=True)]
    print(f"  ratio pem/memory         {spread(ratios)}   (per pass)")
    ratios = [p / c for p, c in zip(initial["pem"], ceiling, strict=True)]
    print(f"  ratio pem/bare           {spread(ratios)}   (per pass)")
    print(f"unchanged polls of {certs} certificates, GET/s   (client CPU per poll, us)")
    labels = {
        "source": "source alone (ceiling)",
        "memory": "CertSync + MemoryStore",
        "pem": "CertSync + PemDirStore",
    }
    for name, label in labels.items():
        print(f"  {label:24} {spread(polls[name])}   ({spread(cpu[name])})")
    ratios = [p / m for p, m in zip(polls["pem"], polls["memory"], strict=True)]
    print(f"  ratio pem/memory         {spread([r * 100 for r in ratios])} %   target >= 90 %")


async def main(certs: int, passes: int, populations: Sequence[int], rotations: int) -> None:
    """Every figure, in order."""
    print(f"bench_pemdir: {os.cpu_count()} CPUs, temp dir {tempfile.gettempdir()}")
    with scratch() as run:
        await install_cost(run, populations, passes, rotations)
        await syncs_and_polls(run, certs, passes)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--certs", type=int, default=2000)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--rotations", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="small sizes: proves it runs")
    args = parser.parse_args()
    if args.quick:
        anyio.run(main, 100, 1, (10, 100), 20)
    else:
        anyio.run(main, args.certs, args.passes, (10, 500, 2000), args.rotations)
