"""What the long reliability runs share: the emulator in a process of its own, rotating.

``python benchmarks/reliability_common.py emulator --certs N --rotate-every S`` serves vault
``bench`` with certificates ``c0`` .. ``c{N-1}``, prints one JSON line (ports, CA file, redirect,
msiEndpoint) and rotates one certificate every S seconds until its stdin closes or it gets
SIGTERM; then it prints ``{"rotations": n}``. ``Emulator`` runs it from another script.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
from _common import KVCERTSYNC, proc_status, rss_mib  # run as a script: benchmarks/ is on sys.path

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.material import PEM_CONTENT_TYPE, PKCS12_CONTENT_TYPE

__all__ = ["KVCERTSYNC", "VAULT", "Emulator", "open_fds", "proc_status", "rss_mib", "secret_url"]

VAULT = "bench"
_SCRIPT = Path(__file__).resolve()


def secret_url(index: int) -> str:
    """The URL of certificate ``c{index}``."""
    return f"https://{VAULT}.vault.azure.net/secrets/c{index}"


class Emulator:
    """The emulator script as a child process; ``info`` holds what it printed on start."""

    def __init__(self, certs: int, rotate_every: float) -> None:
        self.certs = certs
        self.rotate_every = rotate_every
        self.info: dict[str, Any] = {}
        self.rotations = 0
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Emulator:
        command = [sys.executable, str(_SCRIPT), "emulator", "--certs", str(self.certs)]
        command += ["--rotate-every", str(self.rotate_every)]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the emulator exited with {self._process.wait()}")
        self.info = json.loads(line)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        process = self._process
        if process is None:
            return
        out, _ = process.communicate(input="", timeout=30)  # closing stdin stops it
        last = out.strip().splitlines()[-1] if out.strip() else "{}"
        self.rotations = int(json.loads(last).get("rotations", 0))

    def run_options(self) -> list[str]:
        """The options ``kvcertsync run`` needs to reach this emulator."""
        return ["--ca-file", self.info["ca_file"], "--redirect", self.info["redirect"]]

    def settings(self, directory: Path, *, interval: float) -> dict[str, Any]:
        """Extension settings observing every certificate, installed into ``directory``."""
        observed = [
            {"url": secret_url(i), "certificateStoreLocation": str(directory)}
            for i in range(self.certs)
        ]
        return {
            "secretsManagementSettings": {
                "pollingIntervalInS": f"{interval:g}",
                "observedCertificates": observed,
            },
            "authenticationSettings": {"msiEndpoint": self.info["msi_endpoint"]},
        }


async def _serve(certs: int, rotate_every: float) -> None:
    async with LocalKeyVault() as kv:
        for i in range(certs):
            # Both of Key Vault's formats: PFX for even, PEM for odd certificates.
            kind = PKCS12_CONTENT_TYPE if i % 2 == 0 else PEM_CONTENT_TYPE
            kv.import_certificate(VAULT, f"c{i}", kv.authority.issue([f"c{i}.example"]), kind)
        ((pattern, target),) = kv.redirect.items()
        info = {
            "port": kv.port,
            "ca_file": kv.ca_file,
            "redirect": f"{pattern}={target}",
            "msi_endpoint": kv.imds_endpoint,
        }
        print(json.dumps(info), flush=True)
        stop = anyio.Event()

        async def until_stdin_closes() -> None:
            await anyio.to_thread.run_sync(sys.stdin.read, abandon_on_cancel=True)
            stop.set()

        async def until_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    stop.set()
                    return

        rotations = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(until_stdin_closes)
            tg.start_soon(until_sigterm)
            while not stop.is_set():
                with anyio.move_on_after(rotate_every if rotate_every > 0 else math.inf):
                    await stop.wait()
                if not stop.is_set():
                    kv.rotate(VAULT, f"c{rotations % certs}")
                    rotations += 1
            tg.cancel_scope.cancel()
        print(json.dumps({"rotations": rotations}), flush=True)


def open_fds(pid: int | str = "self") -> int:
    """How many file descriptors a process has open, from /proc."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("emulator", help="serve vault 'bench' and rotate")
    serve.add_argument("--certs", type=int, default=5)
    serve.add_argument("--rotate-every", type=float, default=0.1, metavar="S")
    args = parser.parse_args()
    anyio.run(_serve, args.certs, args.rotate_every)


if __name__ == "__main__":
    _main()
