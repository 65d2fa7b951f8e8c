"""Command hooks run real processes with the event in their environment."""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import anyio
import pytest

from kvcertsync.errors import TransientSourceError
from kvcertsync.events import CertificateUpdated, EventBus, SyncFailed
from kvcertsync.hooks import CommandFailed, command_hook, event_environment
from kvcertsync.uri import SecretUri

pytestmark = pytest.mark.anyio

URI = SecretUri.parse("https://myvault.vault.azure.net/secrets/web")
UPDATED = CertificateUpdated(
    URI, None, "ab" * 16, "AB" * 20, datetime(2027, 1, 1, tzinfo=UTC), "/store/myvault.web"
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_environment_names_every_field() -> None:
    env = event_environment(UPDATED)
    assert env["KVCERTSYNC_EVENT"] == "CertificateUpdated"
    assert env["KVCERTSYNC_URI"] == str(URI)
    assert env["KVCERTSYNC_VERSION"] == "ab" * 16
    assert env["KVCERTSYNC_THUMBPRINT"] == "AB" * 20
    assert env["KVCERTSYNC_NOT_AFTER"] == "2027-01-01T00:00:00+00:00"
    assert env["KVCERTSYNC_LOCATION"] == "/store/myvault.web"
    assert "KVCERTSYNC_PREVIOUS_VERSION" not in env  # None is left out
    failed = event_environment(SyncFailed(URI, TransientSourceError("503"), 2, 4.0))
    assert failed["KVCERTSYNC_ERROR"] == "TransientSourceError: 503"


async def test_a_shell_command_sees_the_event(tmp_path: Path) -> None:
    out = tmp_path / "seen.json"
    hook = command_hook(
        [
            sys.executable,
            "-c",
            f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))",
        ]
    )
    await hook(UPDATED)
    seen = json.loads(out.read_text())
    assert (
        seen["KVCERTSYNC_URI"] == str(URI) and seen["KVCERTSYNC_LOCATION"] == "/store/myvault.web"
    )


async def test_failure_is_raised_with_the_output() -> None:
    with pytest.raises(CommandFailed, match="status 3: nginx: configuration test failed"):
        await command_hook("echo 'nginx: configuration test failed' >&2; exit 3")(UPDATED)


async def test_the_bus_counts_failures_and_kills_hung_commands(tmp_path: Path) -> None:
    bus = EventBus(hook_timeout=2)  # long enough for the hung one to write its pid first
    failing = bus.subscribe(command_hook("exit 1"))
    hanging = bus.subscribe(command_hook(f"sleep 30 & echo $! > {tmp_path}/pid; wait"))
    async with bus:
        bus.publish(UPDATED)
        with anyio.fail_after(10):
            while failing.failures < 1 or hanging.failures < 1:  # noqa: ASYNC110
                await anyio.sleep(0.05)
    pid = int((tmp_path / "pid").read_text())
    # Killed with its group; its exit is the kernel's to finish, so give it (bounded) time.
    with anyio.fail_after(5):
        while _alive(pid):  # noqa: ASYNC110
            await anyio.sleep(0.01)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    if Path("/proc/self/stat").exists():
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] not in ("Z", "X")
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_output_is_bounded_and_daemons_do_not_hold_the_hook() -> None:
    # 50 MB of output: only the tail is kept (the message stays short).
    with pytest.raises(CommandFailed) as failed:
        await command_hook("head -c 50000000 /dev/zero | tr '\\0' x; echo END; exit 1")(UPDATED)
    assert str(failed.value).endswith("xEND") and len(str(failed.value)) < 3000
    # A hook that starts a background process returns when the hook itself exits.
    with anyio.fail_after(10):
        await command_hook("sleep 30 & exit 0")(UPDATED)  # holds the pipes for 30 s
