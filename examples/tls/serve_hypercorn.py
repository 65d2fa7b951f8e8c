"""Recipe: hypercorn serving an ASGI app (HTTP/2 and 1.1) with a certificate that follows Key Vault.

    python examples/tls/serve_hypercorn.py   # then run the printed curl to rotate; Ctrl+C stops

hypercorn builds its SSLContext in ``Config.create_ssl_context()`` and serves TLS when
``Config.ssl_enabled``: a Config subclass overrides both to hand it ServerTLS's context. The
socket is bound here and passed as ``fd://N``. hypercorn owns the signals (``serve`` without a
``shutdown_trigger``): SIGINT or SIGTERM shuts it down gracefully.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import anyio
from _demo import URL, asgi_app, demo_sync, options, serving
from hypercorn.asyncio import serve
from hypercorn.config import Config

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.tls import ServerTLS


class TLSConfig(Config):
    """A hypercorn Config whose TLS context is ServerTLS's (hypercorn's would load files)."""

    def __init__(self, tls: ServerTLS) -> None:
        self.tls = tls

    @property
    def ssl_enabled(self) -> bool:
        return True

    def create_ssl_context(self) -> ssl.SSLContext:
        return self.tls.context


def like_hypercorn(context: ssl.SSLContext) -> None:
    """What hypercorn's own create_ssl_context sets, applied to every context ServerTLS makes."""
    context.set_ciphers(Config.ciphers)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(Config.alpn_protocols)


async def main() -> None:
    """Sync the certificate, then let hypercorn serve HTTPS with it until a signal."""
    args = options(__doc__ or "")
    async with LocalKeyVault() as kv:  # the demo's Key Vault; yours: drop it
        sync = demo_sync(kv)
        async with sync, ServerTLS(sync, URL, configure=like_hypercorn) as tls:
            await sync.wait_ready()  # installed, and tls has loaded it: serve now
            config = TLSConfig(tls)
            listener = socket.create_server((args.host, args.port))
            host, port = listener.getsockname()[:2]
            config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns the socket now
            serving("https", host, port, tls.certificate())
            # Its own task: on Python < 3.13 the asyncio.TaskGroup inside serve() leaves the
            # calling task marked as being cancelled, and `async with sync` would then end in
            # CancelledError (see docs/tls.md). The mark dies with this task.
            await asyncio.create_task(serve(asgi_app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    anyio.run(main)
