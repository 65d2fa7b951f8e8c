"""Embed kvcertsync in your own asyncio service: keep two certificates current, react to renewals.

Runs against the local Key Vault emulator, so it needs no Azure:

    python examples/embed.py

Against real Key Vault, drop the emulator and the ``ca_file``/``redirect`` options: the
source then authenticates with the VM's managed identity (or pass any azure-identity credential).
"""

from __future__ import annotations

import anyio

from kvcertsync import CertSync, ObservedCertificate
from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.events import CertificateUpdated
from kvcertsync.sources import KeyVaultSource
from kvcertsync.stores import MemoryStore


async def main() -> None:
    """Sync two certificates, rotate one, and show the service reacting to the renewal."""
    async with LocalKeyVault() as kv:
        kv.import_certificate("shop", "tls", kv.authority.issue(["shop.example"]))
        kv.import_certificate("shop", "mtls", kv.authority.issue(["client.shop.example"]))

        source = KeyVaultSource(
            ImdsCredential(kv.imds_endpoint),  # on a VM: omit; managed identity is the default
            ca_file=kv.ca_file,
            redirect=kv.redirect,
            owns_credentials=True,
        )
        store = MemoryStore()
        observed = [
            ObservedCertificate.of("https://shop.vault.azure.net/secrets/tls"),
            ObservedCertificate.of("https://shop.vault.azure.net/secrets/mtls"),
        ]
        renewed = anyio.Event()

        async def reload_tls(event: CertificateUpdated) -> None:
            material = store.material(event.uri)
            assert material is not None
            print(f"reloading TLS for {event.uri.name}: {material.dns_names} {event.thumbprint}")
            if event.previous_version is not None:
                renewed.set()

        sync = CertSync(observed, store=store, source=source, polling_interval=1)
        sync.subscribe(reload_tls, CertificateUpdated)  # before starting: no event is missed
        async with sync:
            await sync.wait_ready()
            kv.rotate("shop", "tls")
            with anyio.fail_after(10):
                await renewed.wait()
        print("done")


if __name__ == "__main__":
    anyio.run(main)
