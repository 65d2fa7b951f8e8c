"""benchmarks/bench_hotpath.py runs (--quick): every client it compares reads the emulator."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_hotpath.py"


def test_the_hot_path_benchmark_runs_every_client() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=SCRIPT.parent.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for client in (
        "bare aiohttp",
        "KeyVaultSource direct",
        "KeyVaultSource sdk",
        "CertSync.sync_once",
        "naive aio SDK",
        "sync SDK, serial",
    ):
        assert re.search(rf"^{re.escape(client)}.* GET/s +CPU/GET", out, re.MULTILINE), out
    assert re.search(r"^CPU/GET naive aio SDK / CertSync +\d+\.\d+x$", out, re.MULTILINE), out
