"""Recipe: an aiohttp server whose certificate follows Key Vault, renewals included.

    python examples/tls/serve_aiohttp.py     # then run the printed curl to rotate; Ctrl+C stops

aiohttp takes an ``ssl.SSLContext``; ServerTLS gives one that always presents the installed
certificate. This process owns the signals: it waits for SIGINT or SIGTERM, then stops the
server, then ``async with sync`` stops polling.
"""

from __future__ import annotations

import signal

import anyio
from _demo import URL, demo_sync, options, serving
from aiohttp import web

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.tls import ServerTLS


async def hello(request: web.Request) -> web.Response:
    """The whole application."""
    return web.Response(text="hello over TLS\n")


async def main() -> None:
    """Sync the certificate, then serve HTTPS with it until a signal arrives."""
    args = options(__doc__ or "")
    app = web.Application()
    app.router.add_get("/", hello)
    async with LocalKeyVault() as kv:  # the demo's Key Vault; yours: drop it
        sync = demo_sync(kv)
        async with sync, ServerTLS(sync, URL) as tls:
            await sync.wait_ready()  # installed, and tls has loaded it: serve now
            runner = web.AppRunner(app)
            await runner.setup()
            try:
                await web.TCPSite(runner, args.host, args.port, ssl_context=tls.context).start()
                host, port = runner.addresses[0][:2]
                serving("https", host, port, tls.certificate())
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
            finally:
                await runner.cleanup()


if __name__ == "__main__":
    anyio.run(main)
