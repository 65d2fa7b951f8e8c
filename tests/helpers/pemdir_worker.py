"""Install certificate versions into a PemDirectoryStore forever (killed by the crash test)."""

from __future__ import annotations

import secrets
import sys

import anyio

from kvcertsync.emulator import TestAuthority
from kvcertsync.settings import ObservedCertificate
from kvcertsync.stores.pemdir import PemDirectoryStore


async def main(directory: str, layout: str) -> None:
    """Alternate between a few certificates, a new version each time, and say when one landed."""
    authority = TestAuthority()
    pool = [authority.issue([f"host{i}.example"], include_root=True) for i in range(3)]
    store = PemDirectoryStore(directory, layout=layout, keep_versions=2)  # type: ignore[arg-type]
    observed = [
        ObservedCertificate.of(
            f"https://crashvault.vault.azure.net/secrets/cert{i}", symlink_name=f"alias{i}"
        )
        for i in range(2)
    ]
    round_ = 0
    while True:
        for item in observed:
            await store.install(item, pool[round_ % len(pool)], secrets.token_hex(16))
        round_ += 1
        if round_ == 1:
            print("ready", flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2])
