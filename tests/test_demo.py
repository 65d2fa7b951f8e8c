"""The README's demo command, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvcertsync.material import CertificateMaterial


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
    # The certificates landed in the directory, in the Linux extension's layout.
    out_dir = tmp_path / "out"
    web = CertificateMaterial.from_secret((out_dir / "demo.web").read_bytes())
    api = CertificateMaterial.from_secret((out_dir / "demo.api").read_bytes())
    assert web.dns_names == ("www.contoso.example", "contoso.example")
    assert api.dns_names == ("api.contoso.example",)
    assert web.thumbprint[:8] in out.splitlines()[-3]  # the rotated version is the one in place
    assert oct((out_dir / "demo.web").stat().st_mode & 0o777) == "0o600"


def test_demo_runs_again_over_its_own_directory(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "kvcertsync", "demo", "--directory", str(tmp_path / "out")]
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rotated = next(line for line in lines if "vault: web rotated, version" in line).split()[-1]
    assert any(rotated[:8] in line and "event: updated" in line for line in lines)
    assert "summary: 2 certificates kept current, 3 updates, 0 failures" in result.stdout
