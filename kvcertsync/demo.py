"""The demo: a local Key Vault, the extension's own settings, and the sync engine at work."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import anyio

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.engine import CertSync
from kvcertsync.events import CertificateUpdated, Event, SyncFailed
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import parse_settings
from kvcertsync.sources.keyvault import KeyVaultSource
from kvcertsync.stores.base import Store
from kvcertsync.stores.pemdir import PemDirectoryStore

__all__ = ["run_demo"]

VAULT = "demo"
POLLING_INTERVAL = 2


def _printer(stream: TextIO) -> Callable[[str], None]:
    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.2f}s] {line}", file=stream, flush=True)

    return say


def _mint(kv: LocalKeyVault) -> tuple[CertificateMaterial, CertificateMaterial]:
    web = kv.authority.issue(["www.contoso.example", "contoso.example"], key="rsa")
    return web, kv.authority.issue(["api.contoso.example"], key="ec")


async def run_demo(
    directory: Path,
    *,
    forever: bool = False,
    stream: TextIO = sys.stdout,
    store: Store | None = None,
) -> int:
    """Run the demo with certificates going to ``directory`` (absolute); returns the exit status."""
    say = _printer(stream)
    async with LocalKeyVault() as kv:
        say(f"local Key Vault on https://127.0.0.1:{kv.port}, IMDS on {kv.imds_endpoint}")
        say(f"every https://*.vault.azure.net connection goes there; its CA: {kv.ca_file}")
        web, api = await anyio.to_thread.run_sync(_mint, kv)
        say(f"vault: web as PKCS#12, version {kv.import_certificate(VAULT, 'web', web)}")
        version = kv.import_certificate(VAULT, "api", api, content_type="application/x-pem-file")
        say(f"vault: api as PEM, version {version}")

        location = str(directory)
        document = {
            "secretsManagementSettings": {
                "pollingIntervalInS": str(POLLING_INTERVAL),
                "requireInitialSync": True,
                "observedCertificates": [
                    {
                        "url": f"https://{VAULT}.vault.azure.net/secrets/web",
                        "certificateStoreLocation": location,
                    },
                    {
                        "url": f"https://{VAULT}.vault.azure.net/secrets/api",
                        "certificateStoreLocation": location,
                    },
                ],
            },
            "authenticationSettings": {"msiEndpoint": kv.imds_endpoint},
        }
        settings = parse_settings(document)
        say("extension settings:")
        for line in json.dumps(document, indent=2).splitlines():
            print(f"           {line}", file=stream)

        source = KeyVaultSource.from_settings(settings, ca_file=kv.ca_file, redirect=kv.redirect)
        target = store if store is not None else PemDirectoryStore(directory)
        sync = CertSync.from_settings(settings, store=target, source=source)
        arrived: dict[str, anyio.Event] = {}
        failures: list[SyncFailed] = []
        updates: list[CertificateUpdated] = []

        async def show(event: Event) -> None:
            say(f"event: {event.describe()}")
            if isinstance(event, CertificateUpdated):
                updates.append(event)
                arrived.setdefault(event.version, anyio.Event()).set()
            elif isinstance(event, SyncFailed):
                failures.append(event)

        sync.subscribe(show)
        async with sync:
            with anyio.fail_after(15):
                await sync.wait_ready()
            say("initial sync done; rotating web in the vault")
            # Minting an RSA key takes a while: not on the loop the sync runs on.
            rotated = await anyio.to_thread.run_sync(kv.rotate, VAULT, "web")
            say(f"vault: web rotated, version {rotated}")
            with anyio.fail_after(15):  # the next poll (every 2 s) brings it
                await arrived.setdefault(rotated, anyio.Event()).wait()
            if forever:
                say(
                    "running until Ctrl-C; rotate from another shell with: curl --cacert "
                    f"{kv.ca_file} -H 'X-Emulator-Token: {kv.admin_token}' -X POST "
                    f"https://localhost:{kv.port}/_emulator/rotate/{VAULT}/web"
                )
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
        files = sorted(await anyio.to_thread.run_sync(os.listdir, directory))
        say(f"files in {directory}: {', '.join(files)}")
        say(
            f"summary: {len(sync.observed)} certificates kept current, {len(updates)} updates, "
            f"{len(failures)} failures, {kv.request_counts.get(VAULT, 0)} vault requests"
        )
    return 0 if not failures else 1
