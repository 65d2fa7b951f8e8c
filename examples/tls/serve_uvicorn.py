"""Recipe: uvicorn serving an ASGI app with a certificate that follows Key Vault.

    python examples/tls/serve_uvicorn.py     # then run the printed curl to rotate; Ctrl+C stops

uvicorn (0.47 and later) takes a ready SSLContext through ``Config(ssl_context_factory=...)``;
it then serves on a socket bound here (``Server.serve(sockets=...)``), so the port is known
before it starts. uvicorn owns the signals: on SIGINT or SIGTERM it shuts down gracefully,
restores the handlers it found and raises the signal again for them.
"""

from __future__ import annotations

import signal
import socket
import ssl
from types import FrameType
from typing import Any

import anyio
import uvicorn
from _demo import URL, asgi_app, demo_sync, options, serving

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.tls import ServerTLS


def stopped(signum: int, frame: FrameType | None) -> None:
    """Where uvicorn's re-raised signal lands: the server has stopped, `async with` cleans up."""


async def main() -> None:
    """Sync the certificate, then let uvicorn serve HTTPS with it until a signal."""
    args = options(__doc__ or "")
    async with LocalKeyVault() as kv:  # the demo's Key Vault; yours: drop it
        sync = demo_sync(kv)
        async with sync, ServerTLS(sync, URL) as tls:
            await sync.wait_ready()  # installed, and tls has loaded it: serve now

            def context(config: uvicorn.Config, default: Any) -> ssl.SSLContext:
                return tls.context  # uvicorn's own factory would load files

            config = uvicorn.Config(asgi_app, ssl_context_factory=context, log_level="warning")
            listener = socket.create_server((args.host, args.port))
            host, port = listener.getsockname()[:2]
            serving("https", host, port, tls.certificate())
            # Without these, the re-raised SIGTERM would kill the process (default action)
            # before `async with` stops polling, and SIGINT would cancel it midway.
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, stopped)
            await uvicorn.Server(config).serve(sockets=[listener])


if __name__ == "__main__":
    anyio.run(main)
