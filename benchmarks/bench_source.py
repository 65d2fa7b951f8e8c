"""Key Vault reads per second: KeyVaultSource's shared session vs the SDK's default transport.

Run: .venv/bin/python benchmarks/bench_source.py [--requests 2000] [--concurrency 32]
Both read from the local emulator over TLS with real bearer tokens; prints figures and the ratio.
"""

from __future__ import annotations

import argparse
import os
import time

import anyio
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.secrets.aio import SecretClient

from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.sources import KeyVaultSource
from kvcertsync.uri import SecretUri


async def timed(count: int, concurrency: int, get: object) -> float:
    """Seconds for ``count`` calls of ``get(i)`` with at most ``concurrency`` in flight."""
    limiter = anyio.CapacityLimiter(concurrency)

    async def one(i: int) -> None:
        async with limiter:
            await get(i)  # type: ignore[operator]

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return time.perf_counter() - started


async def main(requests: int, concurrency: int) -> None:
    """Run both clients against the same emulator and print requests/s."""
    async with LocalKeyVault() as kv:
        for i in range(50):
            kv.set_secret("bench", f"s{i}", "x" * 3000)
            kv.set_secret("localhost", f"s{i}", "x" * 3000)

        source = KeyVaultSource(
            ImdsCredential(kv.imds_endpoint),
            ca_file=kv.ca_file,
            redirect=kv.redirect,
            max_connections=concurrency,
            owns_credentials=True,
        )
        uris = [SecretUri.parse(f"https://bench.vault.azure.net/secrets/s{i}") for i in range(50)]
        async with source:
            await source.get(uris[0])  # challenge and token out of the way
            shared = await timed(requests, concurrency, lambda i: source.get(uris[i % 50]))

        os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = kv.imds_authority
        credential = ManagedIdentityCredential()
        client = SecretClient(
            kv.local_url, credential, connection_verify=kv.ca_file, verify_challenge_resource=False
        )
        async with client, credential:
            await client.get_secret("s0")
            default = await timed(requests, concurrency, lambda i: client.get_secret(f"s{i % 50}"))

    print(f"requests {requests}, concurrency {concurrency}, 3 kB secrets, TLS, bearer tokens")
    print(f"KeyVaultSource (shared session)  {requests / shared:8.0f} requests/s")
    print(f"SecretClient default transport   {requests / default:8.0f} requests/s")
    print(f"ratio shared/default             {default / shared:8.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    anyio.run(main, args.requests, args.concurrency)
