"""Push refresh without inbound HTTP: Event Grid -> Azure Storage Queue -> this host.

For hosts that no webhook can reach: an Event Grid subscription on the vault delivers each event
to a Storage Queue (docs/push.md), and the host reads the queue with the official SDK:

    pip install 'kvcertsync[queue]'
    AZURE_STORAGE_CONNECTION_STRING='...' python examples/push_storage_queue.py [QUEUE]

Any queue works, Azurite's too (``azurite-queue``; connection string
``UseDevelopmentStorage=true``). The vault is the local Key Vault emulator, and one of its event
handlers stands in for Event Grid's Storage Queue delivery (base64 JSON, one event per message),
so the only thing this needs besides Python is a queue.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
from _push_demo import hourly_sync
from azure.core.exceptions import ResourceExistsError
from azure.storage.queue import BinaryBase64DecodePolicy, BinaryBase64EncodePolicy
from azure.storage.queue.aio import QueueClient

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.push import refresh_from_messages


async def queue_messages(queue: QueueClient, *, idle: float = 0.5) -> AsyncIterator[bytes]:
    """Each message's content; deleted once taken, the queue polled again while it is empty."""
    while True:
        async for message in queue.receive_messages(messages_per_page=32, visibility_timeout=60):
            yield message.content
            # Taken means parsed and its refresh started; a crash loses nothing: a restarted
            # agent polls every certificate first. Shielded, so a stop that comes while the
            # delete is in flight does not leave a handled message to come back; bounded, so a
            # queue that hangs does not hold the stop.
            with anyio.move_on_after(10, shield=True):
                await queue.delete_message(message)
            # A stop held off by the shield lands here, not after the rest of the page (the
            # page is in memory: taking its next message would never suspend).
            await anyio.lowlevel.checkpoint()
        await anyio.sleep(idle)


async def main(connection_string: str, queue_name: str) -> None:
    """Sync a certificate polled hourly, rotate it, and see the queued event bring it at once."""
    async with (
        LocalKeyVault() as kv,
        QueueClient.from_connection_string(
            connection_string,
            queue_name,
            # Event Grid writes base64 of the event's JSON; the SDK decodes it to bytes.
            message_encode_policy=BinaryBase64EncodePolicy(),
            message_decode_policy=BinaryBase64DecodePolicy(),
        ) as queue,
    ):
        with contextlib.suppress(ResourceExistsError):
            await queue.create_queue()
        sync, renewals = hourly_sync(kv)

        async def to_queue(event: dict[str, Any]) -> None:
            # The stand-in for Event Grid's Storage Queue delivery; not needed in Azure.
            await queue.send_message(json.dumps(event).encode("utf-8"))

        await kv.add_event_handler(to_queue)
        async with sync, anyio.create_task_group() as tg:
            await sync.wait_ready()
            tg.start_soon(refresh_from_messages, queue_messages(queue), sync)
            kv.rotate("shop", "tls")
            with anyio.fail_after(30):
                await renewals[-1].wait()
            tg.cancel_scope.cancel()
        print("done")


if __name__ == "__main__":
    connection = os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if not connection:
        sys.exit("set AZURE_STORAGE_CONNECTION_STRING (Azurite: UseDevelopmentStorage=true)")
    anyio.run(main, connection, sys.argv[1] if len(sys.argv) > 1 else "keyvault-events")
