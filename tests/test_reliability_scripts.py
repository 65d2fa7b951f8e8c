"""The long reliability runs in benchmarks/ work: each runs briefly (--quick), as users run it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_quick(script: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_sigkill_rounds_report_no_torn_mismatched_or_dangling_file() -> None:
    out = run_quick("reliability_sigkill.py")
    rounds = re.findall(r"^round +\d+: ok +(\d+) ", out, re.MULTILINE)
    assert len(rounds) == 2 and all(int(ok) > 0 for ok in rounds), out
    totals = re.search(
        r"^totals: torn (\d+), mismatched (\d+), dangling (\d+); left in flight by kills (\d+), "
        r"stale after the next start (\d+); vault rotations (\d+)",
        out,
        re.MULTILINE,
    )
    assert totals is not None, out
    torn, mismatched, dangling, _, stale, rotations = map(int, totals.groups())
    assert (torn, mismatched, dangling, stale) == (0, 0, 0, 0), out
    assert rotations > 0
    assert re.search(r"^final start: stale 0, exit 0$", out, re.MULTILINE), out


def test_soak_reports_first_last_max_and_ratio_of_each_figure() -> None:
    out = run_quick("reliability_soak.py")
    for column in ("rss_mib", "tasks", "fds", "threads"):
        row = re.search(rf"^{column} +first +([\d.]+) +last +([\d.]+) +max +([\d.]+) ", out, re.M)
        assert row is not None, out
        first, last, largest = map(float, row.groups())
        assert 0 < first <= largest and last <= largest
    polls = re.search(r"^polls (\d+) ", out, re.MULTILINE)
    assert polls is not None and int(polls.group(1)) > 0, out


def test_fault_matrix_keeps_files_and_recovers() -> None:
    out = run_quick("reliability_faults.py")
    rows = re.findall(r"^(.+?) +files (\S+) +new version in place after +(\S+)", out, re.M)
    assert len(rows) == 3, out
    assert all(verdict == "byte-identical" and took != "never" for _, verdict, took in rows), out
    assert re.search(r"^totals: 3 faults, files changed under 0, ", out, re.M), out
