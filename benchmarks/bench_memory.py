"""Resident memory per observed certificate: CertSync + its engine state + MemoryStore.

Run: .venv/bin/python benchmarks/bench_memory.py [--quick] [--sizes 1000 10000] [--with-100k]
     [--passes 3] [--keyvault 10000] [--key ec|rsa]

Each figure comes from a fresh child process (so one size's garbage cannot flatter the next):
RSS (``/proc/self/status`` VmRSS, not tracemalloc, which misses OpenSSL's allocations) grown
across building CertSync + MemoryStore, an initial sync and a few unchanged polls, divided by the
number of observed certificates. The floor is what any design pays: the dict of parsed
SecretUri -> ObservedCertificate alone. ``--keyvault N`` repeats the measurement with the real
KeyVaultSource against ``kvcertsync emulator`` in another process. ``--key rsa`` uses RSA-2048
certificates (Key Vault's default): slow to set up, since cryptography validates every RSA key it
reads (about 0.1 s each here). The in-process source serves a pool of a few distinct
certificates, but every URL parses and keeps its own copy, as with distinct certificates; only
the chain (one intermediate) is shared, as it is in a real vault. Asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
from typing import Any, Literal

import anyio
from _common import EmulatorProcess, rss_mib, secret_url, vault_urls, verdict

#: The target: KiB of RSS per observed certificate.
TARGET_KIB = 10.0
#: Distinct certificates the in-process source serves (each URL still parses its own copy).
POOL = 8
VAULTS = 10
UNCHANGED_POLLS = 3


def _urls(count: int) -> list[str]:
    return [secret_url(vault, name) for vault, name in vault_urls(count, VAULTS)]


def _floor(count: int) -> float:
    """KiB per URL of a dict of parsed SecretUri -> ObservedCertificate, nothing else."""
    from kvcertsync.settings import ObservedCertificate
    from kvcertsync.uri import SecretUri

    gc.collect()
    before = rss_mib()
    observed = {}
    for url in _urls(count):
        uri = SecretUri.parse(url)
        observed[uri] = ObservedCertificate(uri=uri)
    gc.collect()
    return (rss_mib() - before) * 1024 / count


async def _whole(count: int, key: str, keyvault: dict[str, Any] | None) -> dict[str, float]:
    """KiB per URL of CertSync + MemoryStore after an initial sync and unchanged polls."""
    from kvcertsync.emulator import TestAuthority
    from kvcertsync.engine import CertSync
    from kvcertsync.sources import KeyVaultSource, MemorySource
    from kvcertsync.stores import MemoryStore

    urls = _urls(count)
    source: Any
    if keyvault is None:
        authority = TestAuthority()
        kind: Literal["ec", "rsa"] = "rsa" if key == "rsa" else "ec"
        pool = [
            authority.issue([f"h{i}.example"], key=kind).to_pem_bundle().decode()
            for i in range(POOL)
        ]
        source = MemorySource()
        for i, url in enumerate(urls):
            source.set(url, pool[i % POOL], "application/x-pem-file")
    else:
        from kvcertsync.auth import ImdsCredential

        source = KeyVaultSource(
            ImdsCredential(keyvault["imds_endpoint"]),
            ca_file=keyvault["ca_file"],
            redirect={"*.vault.azure.net": f"127.0.0.1:{keyvault['port']}"},
            max_connections=32,
            owns_credentials=True,
        )
    gc.collect()
    before = rss_mib()
    store = MemoryStore()
    sync = CertSync(urls, store=store, source=source, max_concurrency=32, rate_limit=1e9)
    first = await sync.sync_once()
    assert len(first.updated) == count, f"{len(first.updated)} of {count} installed"
    for _ in range(UNCHANGED_POLLS):
        again = await sync.sync_once()
        assert len(again.unchanged) == count
    gc.collect()
    grown = (rss_mib() - before) * 1024 / count
    await source.aclose()
    return {"kib": grown}


def _child(kind: str, count: int, key: str, keyvault: str | None) -> None:
    """One measurement in this (fresh) process, printed as JSON."""
    if kind == "floor":
        print(json.dumps({"kib": _floor(count)}))
        return
    info = json.loads(keyvault) if keyvault else None
    print(json.dumps(anyio.run(_whole, count, key, info)))


def measure(kind: str, count: int, key: str, keyvault: dict[str, Any] | None = None) -> float:
    """KiB per URL from a fresh child process."""
    command = [sys.executable, __file__, "--child", kind, "--count", str(count), "--key", key]
    if keyvault is not None:
        command += ["--keyvault-info", json.dumps(keyvault)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return float(json.loads(out.splitlines()[-1])["kib"])


def _spread(values: list[float]) -> str:
    return f"{min(values):6.1f} / {statistics.median(values):6.1f} / {max(values):6.1f}"


def report(sizes: list[int], passes: int, key: str) -> None:
    """Per-certificate RSS at each size, the floor, linearity and the target."""
    print(f"RSS per observed certificate, {key.upper()} keys, MemorySource in process")
    print(f"KiB, min / median / max of {passes} passes")
    print(f"{'certificates':>12}  {'whole (CertSync+MemoryStore)':>28}  {'floor (dict)':>22}")
    medians: dict[int, float] = {}
    for size in sizes:
        whole = [measure("whole", size, key) for _ in range(passes)]
        floor = [measure("floor", size, key) for _ in range(passes)]
        medians[size] = statistics.median(whole)
        print(f"{size:>12}  {_spread(whole):>28}  {_spread(floor):>22}")
    smallest, largest = min(sizes), max(sizes)
    if largest > smallest:
        ratio = medians[largest] / medians[smallest]
        print(f"linearity: per-certificate RSS at {largest} / at {smallest} = {ratio:.2f}")
    for size in sizes:
        if size >= 10_000:
            met = verdict(medians[size] <= TARGET_KIB)
            print(f"target <= {TARGET_KIB:.0f} KiB per certificate at {size}: {met}")
            print(f"  {size} certificates in {medians[size] * size / 1024:.0f} MiB")


def report_keyvault(count: int, passes: int, key: str) -> None:
    """The same measurement with KeyVaultSource against the emulator in its own process."""
    with EmulatorProcess() as emulator:
        emulator.load_certificates(vault_urls(count, VAULTS))
        # What the client needs, and no admin token on a command line.
        info = {k: emulator.info()[k] for k in ("port", "ca_file", "imds_endpoint")}
        values = [measure("whole", count, key, info) for _ in range(passes)]
    line = f"KeyVaultSource vs the emulator process, {count} certificates"
    print(f"{line}: {_spread(values)} KiB per certificate")


def main() -> None:
    """Parse arguments and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one pass (CI smoke)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--with-100k", action="store_true", help="add 100,000 (minutes)")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--keyvault", type=int, default=0, metavar="N")
    parser.add_argument("--key", choices=["rsa", "ec"], default="ec", help="key type (rsa: slow)")
    parser.add_argument("--child", choices=["floor", "whole"], help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--keyvault-info", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.count, args.key, args.keyvault_info)
        return
    sizes, passes, keyvault = args.sizes, args.passes, args.keyvault
    if args.quick:
        sizes, passes, keyvault = [200, 1_000], 1, 200
    if args.with_100k:
        sizes = [*sizes, 100_000]
    report(sizes, passes, args.key)
    if keyvault:
        report_keyvault(keyvault, passes, args.key)


if __name__ == "__main__":
    main()
