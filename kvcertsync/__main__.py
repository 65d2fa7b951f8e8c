"""The ``kvcertsync`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kvcertsync._entry import HeldSignals
from kvcertsync._version import __version__
from kvcertsync.errors import KvCertSyncError


def _demo(args: argparse.Namespace) -> int:
    import anyio

    from kvcertsync.demo import run_demo

    try:
        return anyio.run(lambda: run_demo(Path(args.directory).resolve(), forever=args.forever))
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kvcertsync`` command."""
    parser = argparse.ArgumentParser(
        prog="kvcertsync",
        description="Keep certificates from Azure Key Vault installed and current.",
    )
    parser.add_argument("--version", action="version", version=f"kvcertsync {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log what happens (INFO), not only problems"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    # The agent's commands bring the heavy imports (the Azure SDK, aiohttp, cryptography).
    from kvcertsync.agent.cli import add_commands

    add_commands(commands)
    from kvcertsync.emulator._cli import add_emulator_command

    add_emulator_command(commands)
    demo = commands.add_parser(
        "demo", help="sync two certificates from an embedded local Key Vault, rotate one, exit"
    )
    demo.add_argument(
        "--directory", default="kvcertsync-demo", help="where certificates go (./kvcertsync-demo)"
    )
    demo.add_argument("--forever", action="store_true", help="keep running until Ctrl+C")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None, *, held: HeldSignals | None = None) -> int:
    """Run the command line; returns the process exit status.

    ``held``: the signals the console script began holding before anything was imported.
    """
    held = held or HeldSignals.start()
    early = held.early
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        held.release()
        raise
    if args.command == "run":
        args.early_signals = early  # the agent handles them once it can
    else:
        held.release()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="kvcertsync: %(levelname)s: %(message)s",
    )
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status: int = args.func(args)
    except KvCertSyncError as exc:
        print(f"kvcertsync: error: {exc}", file=sys.stderr)
        # Wrong options or files: 2, as argparse does; anything else that failed: 1.
        return 2 if getattr(exc, "usage", False) else 1
    except BrokenPipeError:
        # `kvcertsync status | head`: the reader left; no traceback at exit either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
