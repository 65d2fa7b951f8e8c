"""Recipe: a plain ``asyncio.start_server`` whose certificate follows Key Vault, via PEM files.

    python examples/tls/serve_asyncio.py     # then run the printed curl to rotate; Ctrl+C stops

The certificates are installed into a PEM directory (the Linux extension's layout) in a temporary
directory; ServerTLS reads each version back and loads it from memory. This process owns the
signals: it waits for SIGINT or SIGTERM, then closes the server.
"""

from __future__ import annotations

import asyncio
import signal
import tempfile

import anyio
from _demo import URL, demo_sync, options, serving

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.stores import PemDirectoryStore
from kvcertsync.tls import ServerTLS


async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The whole protocol: one line, then close."""
    writer.write(b"hello over TLS\n")
    await writer.drain()
    writer.close()


async def main() -> None:
    """Sync the certificate into a PEM directory, then serve TLS with it until a signal."""
    args = options(__doc__ or "")
    with tempfile.TemporaryDirectory(prefix="kvcertsync-recipe-") as directory:
        async with LocalKeyVault() as kv:  # the demo's Key Vault; yours: drop it
            sync = demo_sync(kv, PemDirectoryStore(directory))
            async with sync, ServerTLS(sync, URL) as tls:
                await sync.wait_ready()  # installed, and tls has loaded it: serve now
                server = await asyncio.start_server(greet, args.host, args.port, ssl=tls.context)
                async with server:  # closes the listening socket at the end
                    host, port = server.sockets[0].getsockname()[:2]
                    serving("tls", host, port, tls.certificate())
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        async for _ in signals:
                            break


if __name__ == "__main__":
    anyio.run(main)
