"""``kvcertsync emulator``: run the local Key Vault, or run a program against it (``--exec``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import signal
import sys
import tempfile
from pathlib import Path

from kvcertsync.emulator.routing import VaultProxy, child_environment, write_ca_bundle
from kvcertsync.emulator.server import LocalKeyVault
from kvcertsync.emulator.store import VaultError

__all__ = ["add_emulator_command"]


def add_emulator_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``emulator`` command to the ``kvcertsync`` parser."""
    emulator = commands.add_parser(
        "emulator",
        help="run a local Key Vault (secrets, certificates, keys) and IMDS until Ctrl+C",
        description=(
            "Run a local Key Vault and managed-identity endpoint. With --exec, run a program "
            "with the environment that sends its Key Vault traffic here (HTTPS_PROXY, the CA, "
            "IMDS) and exit with its status."
        ),
    )
    emulator.add_argument("--port", type=int, default=0, help="HTTPS port (0: any free port)")
    emulator.add_argument("--imds-port", type=int, default=0, help="IMDS port (0: any free port)")
    emulator.add_argument(
        "--proxy-port",
        type=int,
        default=0,
        help="port of the HTTPS (CONNECT) proxy that routes *.vault.azure.net here (0: any)",
    )
    emulator.add_argument(
        "--vault",
        action="append",
        default=[],
        metavar="NAME",
        help="create this vault with a demo certificate 'demo-cert' (repeatable); "
        "the first one is VAULT_URL for --exec",
    )
    emulator.add_argument(
        "--state-dir",
        help="keep the vaults' contents, the clock and the CA here across restarts",
    )
    emulator.add_argument(
        "--issuance-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep new certificate requests inProgress this long (default 0)",
    )
    emulator.add_argument(
        "--no-auth", action="store_true", help="accept requests without a bearer token"
    )
    emulator.add_argument(
        "--exec",
        nargs=argparse.REMAINDER,
        metavar="CMD",
        help="run CMD [ARGS...] against the emulator, then stop; exits with CMD's status",
    )
    emulator.set_defaults(func=run_emulator)


def _banner(kv: LocalKeyVault, proxy: VaultProxy, env: dict[str, str], demo: list[str]) -> None:
    admin = (
        f"curl --cacert {kv.ca_file} -H 'X-Emulator-Token: {kv.admin_token}' "
        f"https://localhost:{kv.port}/_emulator"
    )
    print("kvcertsync emulator: Key Vault (secrets, certificates, keys) + IMDS on 127.0.0.1")
    print(f"  https port:      {kv.port}")
    print(f"  imds port:       {kv.imds_port}")
    print(f"  CA certificate:  {kv.ca_file}")
    print(f"  admin token:     {kv.admin_token}  (X-Emulator-Token header of /_emulator/ routes)")
    print("  vault URLs:      https://<name>.vault.azure.net  (any name)")
    print(f"  redirect:        *.vault.azure.net -> 127.0.0.1:{kv.port}")
    print(f"  https proxy:     {proxy.url}  (CONNECT; vault hosts to the emulator)")
    print(f"  without DNS:     https://<name>.vault.localhost:{kv.port}  (if *.localhost resolves)")
    print(f"  azure-identity:  AZURE_POD_IDENTITY_AUTHORITY_HOST={kv.imds_authority}")
    for url in demo:
        print(f"  demo secret:     {url}")
    print(f"  admin:           {admin}/stats")
    print(f"                   {admin}/rotate/<vault>/<name> -X POST")
    print(f"                   {admin}/clock -X POST -d '{{\"advance\": 86400}}'")
    print("to run unchanged Azure SDK code against it, export:")
    for name in ("HTTPS_PROXY", "NO_PROXY", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"):
        print(f"  export {name}={shlex.quote(env[name])}")
    print(f"  export AZURE_POD_IDENTITY_AUTHORITY_HOST={kv.imds_authority}")
    print("  export AZURE_TOKEN_CREDENTIALS=ManagedIdentityCredential")
    ((pattern, target),) = kv.redirect.items()
    options = ["--ca-file", kv.ca_file, "--redirect", f"{pattern}={target}"]
    print("to sync your own settings file against it, put this in its authenticationSettings:")
    print(f"msiEndpoint: {kv.imds_endpoint}")
    print("and append this to kvcertsync run SETTINGS:")
    print(f"run with: {shlex.join(options)}")
    print("ready (Ctrl+C to stop)", flush=True)


def _add_demo_vaults(kv: LocalKeyVault, vaults: list[str]) -> list[str]:
    urls = []
    for vault in vaults:
        try:
            kv.secret(vault, "demo-cert")
        except VaultError:
            # Only once: with --state-dir the demo certificate survives restarts.
            cert = kv.authority.issue([f"{vault}.example.com", f"www.{vault}.example.com"])
            kv.import_certificate(vault, "demo-cert", cert)
        urls.append(f"{kv.vault_url(vault)}/secrets/demo-cert")
    return urls


async def _serve(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        # Windows has no add_signal_handler: Ctrl+C raises KeyboardInterrupt instead.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with (
        LocalKeyVault(
            port=args.port,
            imds_port=args.imds_port,
            state_dir=args.state_dir,
            require_auth=not args.no_auth,
            issuance_delay=args.issuance_delay,
        ) as kv,
        VaultProxy(kv.port, port=args.proxy_port) as proxy,
    ):
        demo = _add_demo_vaults(kv, args.vault)
        with tempfile.TemporaryDirectory(prefix="kvcertsync-emulator-env-") as scratch:
            bundle = write_ca_bundle(kv.ca_pem, Path(scratch) / "ca-bundle.pem")
            env = child_environment(
                proxy_url=proxy.url,
                ca_bundle=bundle,
                ca_file=kv.ca_file,
                imds_authority=kv.imds_authority,
                vault_url=kv.vault_url(args.vault[0]) if args.vault else None,
            )
            if args.exec:
                return await _run_child(args.exec, env, stop)
            _banner(kv, proxy, env, demo)
            await stop.wait()
    return 0


async def _run_child(command: list[str], env: dict[str, str], stop: asyncio.Event) -> int:
    try:
        child = await asyncio.create_subprocess_exec(*command, env=env)
    except OSError as exc:
        print(f"kvcertsync: error: cannot run {command[0]!r}: {exc}", file=sys.stderr)
        return 127
    waiting = asyncio.ensure_future(child.wait())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not waiting.done():
        # Our SIGINT/SIGTERM goes on to the program, which decides how to stop.
        child.terminate()
        await waiting
    stopping.cancel()
    code = waiting.result()
    return code if code >= 0 else 128 - code


def run_emulator(args: argparse.Namespace) -> int:
    """Run the ``kvcertsync emulator`` command."""
    if args.exec is not None and not args.exec:
        print("kvcertsync: error: --exec needs a command to run", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(args))
    except KeyboardInterrupt:
        return 130 if args.exec else 0
    except (OSError, ValueError) as exc:
        print(f"kvcertsync: error: cannot start the emulator: {exc}", file=sys.stderr)
        return 1
