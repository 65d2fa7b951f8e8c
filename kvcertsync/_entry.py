"""The console script: hold stop and reload signals from the first instant, then run the CLI.

Importing the command line takes a moment (argparse, then the Azure SDK, aiohttp and
cryptography); a SIGTERM in it must not kill ``kvcertsync run`` half-started, so this module
imports only ``signal`` before it starts holding them.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

__all__ = ["HeldSignals", "main"]

# SIGTERM last: once it is caught (what a supervisor, or a test, can see), all of them are.
_HELD = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGHUP", "SIGTERM") if hasattr(signal, name)
)


class HeldSignals:
    """Stop and reload signals remembered instead of acted on, until someone handles them."""

    def __init__(self) -> None:
        self.early: list[int] = []
        self.previous: dict[int, Any] = {}

    @classmethod
    def start(cls) -> HeldSignals:
        """Hold SIGTERM, SIGINT and SIGHUP from now on."""
        held = cls()
        # Blocked while the handlers change: a SIGINT arriving between two of them would
        # otherwise meet Python's own handler and a KeyboardInterrupt mid-start.
        masked = hasattr(signal, "pthread_sigmask")
        if masked:
            before = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
        try:
            for signum in _HELD:
                held.previous[signum] = signal.signal(signum, held._remember)
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_SETMASK, before)
        return held

    def _remember(self, signum: int, frame: FrameType | None) -> None:
        self.early.append(signum)

    def release(self) -> None:
        """Back to the usual handlers, and deliver what was held (Ctrl+C stays Ctrl+C)."""
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        early, self.early[:] = list(self.early), []
        for signum in early:
            signal.raise_signal(signum)


def main() -> int:
    """The ``kvcertsync`` command."""
    held = HeldSignals.start()
    from kvcertsync.__main__ import main as command_line

    return command_line(held=held)
