"""What the benchmarks share: the emulator as a process of its own, and measuring a process.

``EmulatorProcess`` runs ``kvcertsync emulator`` as a child, reads its port, CA, IMDS and admin
token from the banner, and drives its admin routes (bulk load, faults, stats). The rest measures
the calling process (``getrusage``, ``/proc/self/status``) or another one (``/proc/PID/stat``).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio

_CONSOLE = Path(sys.executable).with_name("kvcertsync")
#: The command that runs kvcertsync, as an operator would.
KVCERTSYNC = [str(_CONSOLE)] if _CONSOLE.exists() else [sys.executable, "-m", "kvcertsync"]
_BANNER = re.compile(r"\s+(https port|imds port|CA certificate|admin token):\s+(\S+)")
#: Bulk loads go in chunks of this many certificates (one admin request each).
BULK_CHUNK = 500


class EmulatorProcess:
    """``kvcertsync emulator`` as a child process, stopped (SIGTERM) on exit."""

    def __init__(self) -> None:
        self.port = 0
        self.imds_port = 0
        self.ca_file = ""
        self._token = ""
        self._process: subprocess.Popen[str] | None = None
        self._context: ssl.SSLContext | None = None

    def __enter__(self) -> EmulatorProcess:
        # SIGTERM to the benchmark unwinds through __exit__, so the emulator is not left behind.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        process = subprocess.Popen([*KVCERTSYNC, "emulator"], stdout=subprocess.PIPE, text=True)
        self._process = process
        assert process.stdout is not None
        found: dict[str, str] = {}
        for line in process.stdout:
            match = _BANNER.match(line)
            if match:
                found[match[1]] = match[2]
            if line.startswith("ready"):
                break
        else:
            raise RuntimeError(f"the emulator exited with {process.wait()} before it was ready")
        self.port = int(found["https port"])
        self.imds_port = int(found["imds port"])
        self.ca_file = found["CA certificate"]
        self._token = found["admin token"]
        self._context = ssl.create_default_context(cafile=self.ca_file)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)

    @property
    def pid(self) -> int:
        """The emulator's process id."""
        assert self._process is not None
        return self._process.pid

    @property
    def redirect(self) -> str:
        """``--redirect``'s value: every vault host to the emulator."""
        return f"*.vault.azure.net=127.0.0.1:{self.port}"

    @property
    def imds_endpoint(self) -> str:
        """The extension's ``msiEndpoint`` for this emulator."""
        return f"http://127.0.0.1:{self.imds_port}/metadata/identity"

    @property
    def imds_authority(self) -> str:
        """The value of ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` for azure-identity."""
        return f"http://127.0.0.1:{self.imds_port}"

    def info(self) -> dict[str, Any]:
        """What a client process needs to reach this emulator, as JSON-able data."""
        return {
            "port": self.port,
            "ca_file": self.ca_file,
            "imds_endpoint": self.imds_endpoint,
            "imds_authority": self.imds_authority,
            "admin_token": self._token,
        }

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        """Call ``/_emulator/<path>`` and return its JSON answer."""
        return admin_call(self.port, self._token, self._context, method, path, body)

    def load_certificates(self, names: Iterable[tuple[str, str]]) -> None:
        """Issue and import one certificate per ``(vault, name)``, in bulk requests."""
        entries = [{"vault": vault, "name": name} for vault, name in names]
        for start in range(0, len(entries), BULK_CHUNK):
            chunk = entries[start : start + BULK_CHUNK]
            self.admin("POST", "bulk", {"certificates": chunk})

    def latency(self, seconds: float) -> None:
        """Delay every vault request by ``seconds`` (0: none)."""
        self.admin("DELETE", "faults")
        if seconds:
            self.admin("POST", "faults", {"latency": {"seconds": seconds}})

    def cpu_seconds(self) -> float:
        """CPU (user + system) the emulator has used so far."""
        return process_cpu_seconds(self.pid)

    def rss_mib(self) -> float:
        """The emulator's resident set size in MiB."""
        return rss_mib(self.pid)


def admin_call(
    port: int,
    token: str,
    context: ssl.SSLContext | None,
    method: str,
    path: str,
    body: Any = None,
) -> Any:
    """One admin request to the emulator on ``port``; its JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"https://localhost:{port}/_emulator/{path}",
        data=data,
        method=method,
        headers={"X-Emulator-Token": token, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, context=context, timeout=300) as response:
        return json.loads(response.read())


def vault_urls(certificates: int, vaults: int, prefix: str = "bench") -> list[tuple[str, str]]:
    """``(vault, name)`` of ``certificates`` certificates spread over ``vaults`` vaults."""
    return [(f"{prefix}{i % vaults}", f"c{i}") for i in range(certificates)]


def secret_url(vault: str, name: str) -> str:
    """The secret URL of certificate ``name`` in ``vault``."""
    return f"https://{vault}.vault.azure.net/secrets/{name}"


async def timed(count: int, concurrency: int, get: Callable[[int], Awaitable[object]]) -> float:
    """Seconds for ``count`` calls of ``get(i)`` with at most ``concurrency`` in flight."""
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            await get(i)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return time.perf_counter() - started


def cpu_seconds() -> float:
    """CPU (user + system) this process has used so far, from getrusage."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def process_cpu_seconds(pid: int) -> float:
    """CPU (user + system) of process ``pid`` so far, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int | str = "self") -> dict[str, str]:
    """``/proc/PID/status`` as a mapping (VmRSS, Threads, ...)."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def rss_mib(pid: int | str = "self") -> float:
    """The resident set size of a process in MiB, from /proc."""
    return int(proc_status(pid)["VmRSS"].split()[0]) / 1024


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """``min / median / max`` of ``values``."""
    parts = (min(values), statistics.median(values), max(values))
    return " / ".join(fmt.format(v) for v in parts)


def verdict(met: bool) -> str:
    """How a target line ends."""
    return "met" if met else "NOT met"


def file_system_ceiling(directory: Path, count: int, size: int = 2400) -> float:
    """Atomic PEM writes per second that this file system allows: the ceiling of a PEM store.

    What any careful writer of ``count`` certificates does, serially and with nothing else: a
    0600 temp file of ``size`` bytes written and fsynced, renamed to its versioned name, a
    symlink to it, the directory fsynced. ``directory`` must be new; it is left in place,
    because deleting thousands of files just before a measurement makes ext4 slower at creating
    the next ones for minutes (it skips recently deleted inodes), so callers delete at the end.
    """
    directory.mkdir(mode=0o700)
    data = os.urandom(size // 2).hex().encode()
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        started = time.perf_counter()
        for i in range(count):
            fd = os.open(f"c{i}.tmp", flags, 0o600, dir_fd=dir_fd)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(f"c{i}.tmp", f"c{i}.1.pem", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.symlink(f"c{i}.1.pem", f"c{i}.pem", dir_fd=dir_fd)
            os.fsync(dir_fd)
        return count / (time.perf_counter() - started)
    finally:
        os.close(dir_fd)
