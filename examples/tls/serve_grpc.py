"""Recipe: a grpc.aio server whose certificate follows Key Vault.

    python examples/tls/serve_grpc.py        # then run the printed curl to rotate; Ctrl+C stops

grpc has its own TLS stack, fed PEM bytes: ``ServerTLS.grpc_server_credentials()`` gives
``grpc.dynamic_ssl_server_credentials`` whose fetcher grpc calls for each new connection, so a
renewal reaches every connection made after it. This process owns the signals.
"""

from __future__ import annotations

import signal

import anyio
import grpc
from _demo import URL, demo_sync, options, serving

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.tls import ServerTLS

#: The service, without generated code: requests and replies are raw bytes.
SERVICE, METHOD = "demo.Greeter", "Hello"


async def hello(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """The whole service."""
    return b"hello over TLS, " + request


async def main() -> None:
    """Sync the certificate, then serve grpc over TLS with it until a signal."""
    args = options(__doc__ or "")
    async with LocalKeyVault() as kv:  # the demo's Key Vault; yours: drop it
        sync = demo_sync(kv)
        async with sync, ServerTLS(sync, URL) as tls:
            await sync.wait_ready()  # installed, and tls has loaded it: serve now
            server = grpc.aio.server()
            handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
                METHOD: grpc.unary_unary_rpc_method_handler(hello)
            }
            server.add_generic_rpc_handlers(
                [grpc.method_handlers_generic_handler(SERVICE, handlers)]
            )
            port = server.add_secure_port(f"{args.host}:{args.port}", tls.grpc_server_credentials())
            await server.start()
            try:
                serving("grpcs", args.host, port, tls.certificate())
                with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
            finally:
                await server.stop(grace=5)


if __name__ == "__main__":
    anyio.run(main)
