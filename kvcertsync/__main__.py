"""The ``kvcertsync`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from kvcertsync._entry import HeldSignals
from kvcertsync._version import __version__
from kvcertsync.errors import KvCertSyncError


def _emulator(args: argparse.Namespace) -> int:
    import asyncio
    import contextlib
    import shlex

    from kvcertsync.emulator import LocalKeyVault

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # Windows has no add_signal_handler: Ctrl+C raises KeyboardInterrupt instead.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        async with LocalKeyVault(
            port=args.port,
            imds_port=args.imds_port,
            state_dir=args.state_dir,
            require_auth=not args.no_auth,
        ) as kv:
            demo = []
            for vault in args.vault:
                cert = kv.authority.issue([f"{vault}.example.com", f"www.{vault}.example.com"])
                kv.import_certificate(vault, "demo-cert", cert)
                demo.append(f"{kv.vault_url(vault)}/secrets/demo-cert")
            admin = f"curl --cacert {kv.ca_file} https://localhost:{kv.port}/_emulator"
            print("kvcertsync emulator: Key Vault secrets API + IMDS on 127.0.0.1")
            print(f"  https port:      {kv.port}")
            print(f"  imds port:       {kv.imds_port}")
            print(f"  CA certificate:  {kv.ca_file}")
            print("  vault URLs:      https://<name>.vault.azure.net  (any name)")
            print(f"  redirect:        *.vault.azure.net -> 127.0.0.1:{kv.port}")
            print(f"  without DNS:     {kv.local_url}  (the vault named 'localhost')")
            print(f"  azure-identity:  AZURE_POD_IDENTITY_AUTHORITY_HOST={kv.imds_authority}")
            for url in demo:
                print(f"  demo secret:     {url}")
            print(f"  admin:           {admin}/stats")
            print(f"                   {admin}/rotate/<vault>/<name> -X POST")
            print(f'                   {admin}/faults -X POST -d \'{{"fail": {{"status": 503}}}}\'')
            ((pattern, target),) = kv.redirect.items()
            options = ["--ca-file", kv.ca_file, "--redirect", f"{pattern}={target}"]
            print(
                "to sync your own settings file against it, put this in its authenticationSettings:"
            )
            print(f"msiEndpoint: {kv.imds_endpoint}")
            print("and append this to kvcertsync run SETTINGS:")
            print(f"run with: {shlex.join(options)}")
            print("ready (Ctrl+C to stop)", flush=True)
            await stop.wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"kvcertsync: error: cannot start the emulator: {exc}", file=sys.stderr)
        return 1
    return 0


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
    emulator = commands.add_parser(
        "emulator", help="run a local Key Vault (secrets API) and IMDS until Ctrl+C"
    )
    emulator.add_argument("--port", type=int, default=0, help="HTTPS port (0: any free port)")
    emulator.add_argument("--imds-port", type=int, default=0, help="IMDS port (0: any free port)")
    emulator.add_argument(
        "--vault",
        action="append",
        default=[],
        metavar="NAME",
        help="create this vault with a demo certificate secret 'demo-cert' (repeatable)",
    )
    emulator.add_argument("--state-dir", help="write the CA certificate (ca.pem) here")
    emulator.add_argument(
        "--no-auth", action="store_true", help="accept requests without a bearer token"
    )
    emulator.set_defaults(func=_emulator)
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
