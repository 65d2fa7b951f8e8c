"""The ``kvcertsync`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kvcertsync._version import __version__
from kvcertsync.errors import KvCertSyncError
from kvcertsync.settings import load_settings


def _check(args: argparse.Namespace) -> int:
    settings = load_settings(args.settings)
    print(f"{args.settings}: valid; polling every {settings.polling_interval:g} s")
    for cert in settings.observed:
        where = cert.store_directory or f"{cert.store_location}\\{cert.store_name}"
        print(f"  {cert.uri}  ->  {where}")
    for warning in settings.warnings:
        print(f"  warning: {warning}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``kvcertsync`` command."""
    parser = argparse.ArgumentParser(
        prog="kvcertsync",
        description="Keep certificates from Azure Key Vault installed and current.",
    )
    parser.add_argument("--version", action="version", version=f"kvcertsync {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = commands.add_parser("check", help="validate a Key Vault VM extension settings file")
    check.add_argument("settings", help="path to the extension settings JSON")
    check.set_defaults(func=_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        status: int = args.func(args)
    except KvCertSyncError as exc:
        print(f"kvcertsync: error: {exc}", file=sys.stderr)
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
