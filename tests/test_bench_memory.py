"""benchmarks/bench_memory.py still runs (--quick) and prints its figures; no size is asserted."""

from __future__ import annotations

import re

from tests.test_reliability_scripts import run_quick


def test_bench_memory_prints_per_certificate_rss_the_floor_and_the_keyvault_run() -> None:
    out = run_quick("bench_memory.py")
    for size in (200, 1000):
        row = rf"^ +{size} +[\d.]+ / +[\d.]+ / +[\d.]+ +[\d.]+ / +[\d.]+ / +[\d.]+$"
        assert re.search(row, out, re.MULTILINE), out
    assert re.search(r"^linearity: per-certificate RSS at 1000 / at 200 = [\d.]+$", out, re.M), out
    keyvault = r"^KeyVaultSource vs the emulator process, 200 certificates: [\d. /]+ KiB"
    assert re.search(keyvault, out, re.MULTILINE), out
