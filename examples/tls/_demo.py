"""The demo's Key Vault: a local emulator with one certificate, and a CertSync that follows it.

Every recipe in this directory uses it, so each recipe shows only its server. Against a real
vault, drop the emulator and build your CertSync from your settings, for example
``sync = sync_from_settings(load_settings("settings.json"), store=MemoryStore())``.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from kvcertsync import CertSync
from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.sources import KeyVaultSource
from kvcertsync.stores import MemoryStore, Store
from kvcertsync.tls import ServedCertificate

#: The certificate every recipe serves, and the name it is issued for.
URL = "https://shop.vault.azure.net/secrets/web"
HOST_NAME = "web.shop.example"


def options(description: str) -> argparse.Namespace:
    """The recipes' command line: where to listen."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 (the default): any free port")
    args = parser.parse_args()
    # Warnings from everyone; from kvcertsync also what it installs and starts presenting.
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("kvcertsync").setLevel(logging.INFO)
    return args


def demo_sync(kv: LocalKeyVault, store: Store | None = None) -> CertSync:
    """A CertSync (not started) following ``URL``, a certificate it puts into the emulator."""
    kv.import_certificate("shop", "web", kv.authority.issue([HOST_NAME, "localhost"]))
    source = KeyVaultSource(
        ImdsCredential(kv.imds_endpoint),  # on an Azure VM: managed identity, the default
        ca_file=kv.ca_file,
        redirect=kv.redirect,
        owns_credentials=True,
    )
    print(f"trust:  {kv.ca_file}", flush=True)
    print(
        f"rotate: curl --cacert {kv.ca_file} -H 'X-Emulator-Token: {kv.admin_token}' "
        f"-X POST https://localhost:{kv.port}/_emulator/rotate/shop/web",
        flush=True,
    )
    # A one-second poll shows renewals at once; against a real vault keep the default hour.
    return CertSync([URL], store=store or MemoryStore(), source=source, polling_interval=1)


def serving(scheme: str, host: str, port: int, certificate: ServedCertificate | None) -> None:
    """Tell the user (and the tests) where the server listens and what it presents."""
    thumbprint = certificate.thumbprint if certificate is not None else "none yet"
    print(f"serving {scheme}://{host}:{port} as {HOST_NAME} (thumbprint {thumbprint})", flush=True)


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A minimal ASGI application (with lifespan), so the ASGI recipes need no framework."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b"hello over TLS\n"
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
