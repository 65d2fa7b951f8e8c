"""Every example in examples/ runs as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_embed_example_reacts_to_a_renewal() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "embed.py")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.startswith("reloading TLS for tls:") for line in lines) == 2
    assert sum(line.startswith("reloading TLS for mtls:") for line in lines) == 1
    assert lines[-1] == "done"


def test_example_settings_pass_the_check_command() -> None:
    for name in (
        "settings.json",
        "settings-linux.json",
        "systemd/settings.json",
        "container/settings.json",
    ):
        result = subprocess.run(
            [sys.executable, "-m", "kvcertsync", "check", str(EXAMPLES / name)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert "valid" in result.stdout
