"""The README's demo command, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kvcertsync", "demo", "--directory", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("event: updated https://demo.vault.azure.net/secrets/web") == 2
    assert out.count("event: updated https://demo.vault.azure.net/secrets/api") == 1
    assert "initial sync completed: 2 certificates" in out
    assert "summary: 2 certificates kept current, 3 updates, 0 failures" in out
    assert "BEGIN" not in out and "PRIVATE" not in out  # no secret material on screen
