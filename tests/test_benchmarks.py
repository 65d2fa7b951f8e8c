"""The benchmarks still run: each briefly (--quick), as users run it; no speed is asserted."""

from __future__ import annotations

import re

# The same runner as the reliability scripts': each script as a user runs it, with --quick.
from tests.test_reliability_scripts import run_quick


def test_bench_compare_prints_every_client_beside_the_ceiling_and_the_targets() -> None:
    out = run_quick("bench_compare.py")
    for latency in ("0 ms", "15 ms"):
        assert f"latency injected per request: {latency}" in out, out
    for client in (
        "certsync-memory",
        "certsync-pemdir",
        "source",
        "bare-aiohttp",
        "naive-aio-sdk",
        "sync-sdk-serial",
    ):
        # A figure line (min / median / max GET/s), or the reason the client failed.
        rows = re.findall(rf"^{client} +(\d+ / \d+ / \d+|failed: .+)", out, re.MULTILINE)
        assert len(rows) == 2, out
    assert re.search(r"^\(the ceiling: bare aiohttp, \d+ GET/s median", out, re.MULTILINE), out
    assert re.search(r"^rotation to install, refresh\(\): [\d.]+ / ", out, re.MULTILINE), out
    for name in (
        "CertSync / naive aio SDK, 0 ms",
        "CertSync / sync SDK serial, 15 ms",
        "engine overhead over its source",
        "PEM store / MemoryStore, 0 ms",
        "client CPU per unchanged poll",
        "emulator CPU in the busiest pass",
    ):
        assert re.search(rf"^  {re.escape(name)} .*\((target|of one core)", out, re.MULTILINE), out


def test_bench_fleet_prints_installs_throttling_challenges_and_time() -> None:
    out = run_quick("bench_fleet.py")
    assert "20 agents (10 processes x 2) x 10 certificates" in out, out
    for name in (
        "failed installs",
        "requests to the vault",
        "throttled (429) share",
        "401 challenges per process",
        "time to all installed",
        "emulator CPU",
    ):
        assert re.search(rf"^  {re.escape(name)} +\S", out, re.MULTILINE), out
    # The emulator saw the fleet: every agent's GETs answered, some of them 200.
    answers = re.search(r"answers \{'200': (\d+)", out)
    assert answers is not None and int(answers.group(1)) >= 200, out
