"""benchmarks/bench_pemdir.py runs (--quick) and prints every figure; nothing about speed."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NUMBER = r"[0-9.]+"
SPREAD = rf"{NUMBER} +/ +{NUMBER} +/ +{NUMBER}"


def test_quick_run_prints_every_figure() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_pemdir.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for population in (10, 100):
        assert re.search(rf"^ +{population} +{SPREAD} +{SPREAD} +\d+$", out, re.MULTILINE), out
    for label in (
        "PemDirectoryStore",
        "MemoryStore",
        "ratio pem/memory",
        r"source alone \(ceiling\)",
        "CertSync \\+ MemoryStore",
        "CertSync \\+ PemDirStore",
    ):
        assert re.search(rf"^  {label} +{SPREAD}", out, re.MULTILINE), (label, out)
    assert "target >= 250" in out and "target >= 90 %" in out
    assert "os calls per install" in out and "client CPU" in out
