"""The ceiling for Key Vault reads here: bare aiohttp GETs, beside KeyVaultSource and the naive SDK.

Run: .venv/bin/python benchmarks/bench_ceiling.py [--requests 2000] [--concurrency 32]
All three read the same secrets from the local emulator over TLS with a bearer token:
- bare aiohttp: one session, the token set by hand, no SDK (what the work costs at least);
- KeyVaultSource: kvcertsync's source (the SDK's SecretClient on one shared session);
- the naive aio SDK: one SecretClient with its default transport, the emulator's CA trusted the
  way a deployment trusts a CA (SSL_CERT_FILE), not through ``connection_verify``.
Prints requests/s, min/median/max over ``--passes`` passes; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import ssl
import statistics
import sys
from collections.abc import Awaitable, Callable

import aiohttp
import anyio
from _common import timed  # run as a script: benchmarks/ is on sys.path
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.secrets.aio import SecretClient

from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.sources import KeyVaultSource
from kvcertsync.sources.redirect import RedirectResolver
from kvcertsync.uri import SecretUri

SECRETS = 50
API_VERSION = "7.5"


async def passes(
    runs: int, count: int, concurrency: int, get: Callable[[int], Awaitable[object]]
) -> list[float]:
    """Requests/s of each of ``runs`` passes."""
    return [count / await timed(count, concurrency, get) for _ in range(runs)]


def line(name: str, rates: list[float], ceiling: list[float]) -> str:
    """One result: min/median/max requests/s and the median's share of the ceiling."""
    median = statistics.median(rates)
    share = median / statistics.median(ceiling)
    return (
        f"{name:34s} {min(rates):7.0f} {median:7.0f} {max(rates):7.0f} requests/s"
        f"  ({share:4.0%} of the bare-aiohttp ceiling)"
    )


async def main(requests: int, concurrency: int, runs: int) -> None:
    """Measure the three clients against one emulator and print them beside the ceiling."""
    async with LocalKeyVault() as kv:
        for i in range(SECRETS):
            kv.set_secret("bench", f"s{i}", "x" * 3000)
            kv.set_secret("localhost", f"s{i}", "x" * 3000)  # kv.local_url's vault
        uris = [SecretUri.parse(f"{kv.vault_url('bench')}/secrets/s{i}") for i in range(SECRETS)]

        credential = ImdsCredential(kv.imds_endpoint)
        token = (await credential.get_token("https://vault.azure.net/.default")).token
        await credential.close()
        connector = aiohttp.TCPConnector(
            limit=concurrency, ssl=kv.client_ssl_context(), resolver=RedirectResolver(kv.redirect)
        )
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

            async def bare(i: int) -> object:
                url = f"{uris[i % SECRETS].latest}/?api-version={API_VERSION}"
                async with session.get(url) as response:
                    response.raise_for_status()
                    return await response.json()

            await bare(0)
            ceiling = await passes(runs, requests, concurrency, bare)

        source = KeyVaultSource(
            ImdsCredential(kv.imds_endpoint),
            ca_file=kv.ca_file,
            redirect=kv.redirect,
            max_connections=concurrency,
            owns_credentials=True,
        )
        async with source:
            await source.get(uris[0])  # the challenge and the token out of the way
            shared = await passes(
                runs, requests, concurrency, lambda i: source.get(uris[i % SECRETS])
            )

        # The CA trusted the way a deployment trusts one: OpenSSL's default paths read
        # SSL_CERT_FILE, and aiohttp builds its default context on import, so in a new process.
        env = {
            **os.environ,
            "SSL_CERT_FILE": kv.ca_file,
            "AZURE_POD_IDENTITY_AUTHORITY_HOST": kv.imds_authority,
        }
        child = [sys.executable, __file__, "--naive", kv.local_url]
        child += ["--requests", str(requests), "--concurrency", str(concurrency)]
        result = await anyio.run_process(
            [*child, "--passes", str(runs)], env=env, check=False, stderr=None
        )
        if result.returncode != 0:
            raise SystemExit(f"the naive SDK run failed (exit {result.returncode})")
        naive = [float(rate) for rate in result.stdout.split()]

    print(f"requests {requests} x {runs} passes, concurrency {concurrency}, 3 kB secrets, TLS")
    print(f"{'':34s} {'min':>7s} {'median':>7s} {'max':>7s}")
    print(line("bare aiohttp (the ceiling)", ceiling, ceiling))
    print(line("KeyVaultSource (shared session)", shared, ceiling))
    print(line("naive aio SDK (SSL_CERT_FILE)", naive, ceiling))
    ratio = statistics.median(shared) / statistics.median(naive)
    print(f"KeyVaultSource / naive aio SDK     {ratio:7.2f}x")


async def naive_sdk(vault_url: str, requests: int, concurrency: int, runs: int) -> None:
    """Print the naive aio SDK's requests/s of each pass (run in a child process)."""
    assert ssl.create_default_context().get_ca_certs(), "SSL_CERT_FILE was not honoured"
    credential = ManagedIdentityCredential()
    client = SecretClient(vault_url, credential, verify_challenge_resource=False)
    async with client, credential:
        await client.get_secret("s0")
        rates = await passes(
            runs, requests, concurrency, lambda i: client.get_secret(f"s{i % SECRETS}")
        )
    print(" ".join(f"{rate:.1f}" for rate in rates))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--naive", metavar="VAULT_URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.naive:
        anyio.run(naive_sdk, args.naive, args.requests, args.concurrency, args.passes)
    else:
        anyio.run(main, args.requests, args.concurrency, args.passes)
