"""A certificate renews itself in the emulator and kvcertsync installs the renewal.

    python examples/emulator_renewal.py

Key Vault renews a certificate by its policy's lifetime action (AutoRenew at 80 % of its life by
default). Waiting ten months is not a test, so the emulator's clock is moved instead; CertSync
takes its wall time from that clock, so it sees the renewed version as valid.
"""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

import aiohttp
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.certificates import CertificatePolicy
from azure.keyvault.certificates.aio import CertificateClient

from kvcertsync import CertSync, ObservedCertificate, SecretUri
from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.sources import KeyVaultSource
from kvcertsync.sources.redirect import RedirectResolver
from kvcertsync.stores import MemoryStore

VAULT = "https://demo.vault.azure.net"


async def create_certificate(kv: LocalKeyVault) -> None:
    """Create a self-signed certificate through the certificates API, as an app would."""
    os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = kv.imds_authority
    connector = aiohttp.TCPConnector(
        resolver=RedirectResolver(kv.redirect), ssl=kv.client_ssl_context()
    )
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        ManagedIdentityCredential() as credential,
        CertificateClient(
            VAULT, credential, transport=AioHttpTransport(session=session, session_owner=False)
        ) as client,
    ):
        policy = CertificatePolicy(issuer_name="Self", subject="CN=web.example")
        certificate = await client.create_certificate("web", policy)
        print(f"created web, version {certificate.properties.version}")


async def main() -> None:
    async with LocalKeyVault() as kv:
        await create_certificate(kv)
        observed = ObservedCertificate(uri=SecretUri.parse(f"{VAULT}/secrets/web"))
        store = MemoryStore()
        source = KeyVaultSource(
            ImdsCredential(kv.imds_endpoint),
            ca_file=kv.ca_file,
            redirect=kv.redirect,
            owns_credentials=True,
        )
        sync = CertSync([observed], store=store, source=source, clock=kv.clock.certsync_clock())
        async with sync:
            await sync.wait_ready()
            first = await store.installed(observed)
            assert first is not None
            print(f"installed {first.version}")
            # Renewal generates a key: let it happen off the event loop.
            await asyncio.to_thread(kv.clock.advance, timedelta(days=300))
            print(f"after 300 days the vault holds {len(kv.versions('demo', 'web'))} versions")
            await sync.refresh()
            installed = await store.installed(observed)
            assert installed is not None
            until = f"{installed.not_after:%Y-%m-%d}"
            print(f"installed {installed.version} (renewed, valid until {until})")


if __name__ == "__main__":
    asyncio.run(main())
