"""Run the real ``kvcertsync run`` as a subprocess against an in-process emulator, and watch it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvcertsync.emulator import LocalKeyVault

STATUS_NAMES = ("transitioning", "success", "warning", "error")
# The console script, as operators run it (it holds signals from its first instant).
_SCRIPT = Path(sys.executable).with_name("kvcertsync")
KVCERTSYNC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kvcertsync"]


def emulator_options(kv: LocalKeyVault) -> list[str]:
    """The options ``kvcertsync emulator`` prints after ``run with:``."""
    ((pattern, target),) = kv.redirect.items()
    return ["--ca-file", kv.ca_file, "--redirect", f"{pattern}={target}"]


def settings_document(
    kv: LocalKeyVault,
    names: Sequence[str],
    directory: Path,
    *,
    vault: str = "demo",
    interval: int = 2,
    require_initial_sync: bool = True,
) -> dict[str, Any]:
    """Extension settings observing ``names`` in ``vault``, installed into ``directory``."""
    return {
        "secretsManagementSettings": {
            "pollingIntervalInS": str(interval),
            "requireInitialSync": require_initial_sync,
            "observedCertificates": [
                {
                    "url": f"https://{vault}.vault.azure.net/secrets/{name}",
                    "certificateStoreLocation": str(directory),
                }
                for name in names
            ],
        },
        "authenticationSettings": {"msiEndpoint": kv.imds_endpoint},
    }


class AgentProcess:
    """One ``kvcertsync run`` process with its own log file and status directory."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        tmp: Path,
        env: dict[str, str] | None = None,
        stdin: bytes | None = None,
        keep_stdin_open: bool = False,
        umask: int = -1,
    ) -> None:
        self.log = tmp / "agent.log"
        self.status_dir = tmp / "status"
        command = [*KVCERTSYNC, "run", *args]
        if "--handler-environment" not in args:  # a handler logs into its logFolder
            if "--log-file" not in args:
                command += ["--log-file", str(self.log)]
            if "--status-dir" not in args:
                command += ["--status-dir", str(self.status_dir)]
        self.command = command
        self.process = subprocess.Popen(
            command,
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE if stdin is not None or keep_stdin_open else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            umask=umask,
        )
        if stdin is not None:
            assert self.process.stdin is not None
            self.process.stdin.write(stdin)
            self.process.stdin.close()
            self.process.stdin = None

    @property
    def status_file(self) -> Path:
        """The plain-mode status file."""
        return self.status_dir / "status.json"

    def read_status(self, path: Path | None = None) -> dict[str, Any] | None:
        """The status object (the array's one element), or None before the first write."""
        try:
            document = json.loads((path or self.status_file).read_bytes())
        except FileNotFoundError:
            return None
        assert isinstance(document, list) and len(document) == 1
        status = document[0]
        assert isinstance(status, dict)
        return status

    async def wait_status(
        self,
        check: Callable[[dict[str, Any]], bool],
        *,
        within: float = 30,
        path: Path | None = None,
    ) -> dict[str, Any]:
        """Wait until the status file satisfies ``check``; fail with the last one seen."""
        last: dict[str, Any] | None = None
        with anyio.move_on_after(within):
            while True:
                self.assert_running()
                last = self.read_status(path)
                if last is not None and check(last):
                    return last
                await anyio.sleep(0.1)
        raise AssertionError(f"status never matched; last: {last}\nlog:\n{self.log_text()}")

    async def wait_phase(self, phase: str, **kwargs: Any) -> dict[str, Any]:
        """Wait for the top-level status ``phase``."""
        return await self.wait_status(lambda s: s["status"]["status"] == phase, **kwargs)

    async def wait_log(self, text: str, *, within: float = 30) -> None:
        """Wait until the log holds ``text``."""
        with anyio.move_on_after(within):
            while text not in self.log_text():
                self.assert_running()
                await anyio.sleep(0.1)
            return
        raise AssertionError(f"{text!r} never logged; log:\n{self.log_text()}")

    def log_text(self) -> str:
        """Everything logged so far."""
        try:
            return self.log.read_text()
        except FileNotFoundError:
            return ""

    def assert_running(self) -> None:
        """Fail if the process has exited."""
        code = self.process.poll()
        if code is not None:
            _, err = self.process.communicate()
            raise AssertionError(
                f"agent exited with {code}\nstderr:\n{err.decode()}\nlog:\n{self.log_text()}"
            )

    async def wait_catching(self, signum: int) -> None:
        """Wait until the process catches ``signum`` (its handler is installed)."""
        status = Path(f"/proc/{self.process.pid}/status")
        if not status.parent.parent.joinpath("self", "status").exists():
            pytest.skip("reads the caught-signal mask (SigCgt) from /proc: Linux only")
        with anyio.fail_after(30):
            while True:
                self.assert_running()
                caught = next(
                    line for line in status.read_text().splitlines() if line.startswith("SigCgt")
                )
                if int(caught.split()[1], 16) & (1 << (signum - 1)):
                    return
                await anyio.sleep(0.001)

    def send(self, signum: int) -> None:
        """Send ``signum`` to the agent."""
        self.process.send_signal(signum)

    async def wait_exit(self, within: float) -> tuple[int, str]:
        """Wait for the exit; returns (status, stderr)."""
        with anyio.move_on_after(within):
            while self.process.poll() is None:  # noqa: ASYNC110 - a child process, no event
                await anyio.sleep(0.05)
        code = self.process.poll()
        if code is None:
            self.kill()
            raise AssertionError(f"agent still running after {within} s; log:\n{self.log_text()}")
        _, err = self.process.communicate()
        return code, err.decode()

    def kill(self) -> None:
        """Kill the agent and whatever it started."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


def substatus(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The substatus entries by name."""
    return {entry["name"]: entry for entry in status["status"]["substatus"]}


def write_handler_environment(handler: Path) -> Path:
    """Lay out a handler directory as the VM agent does; returns its HandlerEnvironment.json."""
    for folder in ("config", "status", "logs"):
        (handler / folder).mkdir(parents=True)
    path = handler / "HandlerEnvironment.json"
    environment = {
        "logFolder": str(handler / "logs"),
        "configFolder": str(handler / "config"),
        "statusFolder": str(handler / "status"),
        "heartbeatFile": str(handler / "heartbeat.log"),
    }
    name = "Microsoft.Azure.KeyVault.KeyVaultForLinux"
    path.write_text(json.dumps([{"name": name, "version": 1.0, "handlerEnvironment": environment}]))
    return path


@pytest.fixture(name="kv")
async def agent_vault_fixture() -> AsyncIterator[LocalKeyVault]:
    """An emulator with vault "demo": ``web`` (PKCS#12) and ``api`` (PEM)."""
    async with LocalKeyVault() as vault:
        vault.import_certificate("demo", "web", vault.authority.issue(["web.example"]))
        vault.import_certificate(
            "demo", "api", vault.authority.issue(["api.example"]), "application/x-pem-file"
        )
        yield vault


@pytest.fixture(name="agents")
def agents_fixture() -> Iterator[list[AgentProcess]]:
    """Agents a test starts; every one (and whatever it started) is killed at the end."""
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.kill()


def start_agent(
    agents: list[AgentProcess], kv: LocalKeyVault, tmp: Path, *args: str, **kwargs: Any
) -> AgentProcess:
    """``kvcertsync run ARGS`` pointed at ``kv`` (the emulator options appended), recorded."""
    agent = AgentProcess([*args, *emulator_options(kv)], tmp=tmp, **kwargs)
    agents.append(agent)
    return agent
