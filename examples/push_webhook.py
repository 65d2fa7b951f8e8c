"""Push refresh in your own service: rotations arrive in milliseconds, not at the next poll.

The service keeps a certificate current with a poll every hour (the extension's usual interval)
and an Event Grid webhook beside it: Key Vault tells Event Grid of each new version, Event Grid
POSTs it to the webhook, and the certificate is polled at once. Runs against the local Key Vault
emulator, whose webhooks do what Event Grid does, so it needs no Azure:

    python examples/push_webhook.py

In Azure, serve the webhook behind HTTPS and subscribe it to the vault (docs/push.md).
"""

from __future__ import annotations

import secrets
import time

import anyio
from _push_demo import hourly_sync

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.push import PushServer


async def main() -> None:
    """Sync one certificate, rotate it twice, and show each renewal arrive through the webhook."""
    async with LocalKeyVault() as kv:
        sync, renewals = hourly_sync(kv)
        key = secrets.token_urlsafe(32)  # in production: a file only the agent can read
        async with sync, PushServer(sync, key=key) as push:
            await sync.wait_ready()
            # What `az eventgrid event-subscription create --endpoint URL?code=KEY` does in Azure:
            # a validation handshake, then every new version of every secret in the vault.
            await kv.add_webhook(f"{push.url}?code={key}", schema="cloudevents")
            for round_ in (1, 2):
                renewals.append(anyio.Event())
                started = time.perf_counter()
                kv.rotate("shop", "tls")
                with anyio.fail_after(10):
                    await renewals[-1].wait()
                elapsed = (time.perf_counter() - started) * 1000
                print(f"renewal {round_} installed {elapsed:.0f} ms after the rotation")
        stats = push.refresher.stats
        print(f"events {stats.events}, refreshes {stats.refreshes}, coalesced {stats.coalesced}")
        print("done")


if __name__ == "__main__":
    anyio.run(main)
