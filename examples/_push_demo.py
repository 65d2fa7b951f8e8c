"""The push examples' vault: the local emulator with one certificate, and a CertSync polling it
hourly (the extension's usual interval), so a renewal that arrives sooner came by push.

Against a real vault, drop the emulator and build the CertSync from your settings, for example
``sync = sync_from_settings(load_settings("settings.json"), store=MemoryStore())``.
"""

from __future__ import annotations

import anyio

from kvcertsync import CertSync
from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.events import CertificateUpdated
from kvcertsync.sources import KeyVaultSource
from kvcertsync.stores import MemoryStore

#: The certificate both examples follow.
URL = "https://shop.vault.azure.net/secrets/tls"


def hourly_sync(kv: LocalKeyVault) -> tuple[CertSync, list[anyio.Event]]:
    """A CertSync (not started) of ``URL``, put into ``kv``, and the Events renewals set.

    A renewal sets the list's last Event: append a fresh one before each rotation, wait on it.
    """
    kv.import_certificate("shop", "tls", kv.authority.issue(["shop.example"]))
    source = KeyVaultSource(
        ImdsCredential(kv.imds_endpoint),  # on an Azure VM: managed identity, the default
        ca_file=kv.ca_file,
        redirect=kv.redirect,
        owns_credentials=True,
    )
    sync = CertSync([URL], store=MemoryStore(), source=source, polling_interval=3600)
    renewals = [anyio.Event()]

    async def on_update(event: CertificateUpdated) -> None:
        print(f"installed {event.uri.name} version {event.version[:8]} ({event.thumbprint})")
        if event.previous_version is not None:
            renewals[-1].set()

    sync.subscribe(on_update, CertificateUpdated)  # before starting: no event is missed
    return sync, renewals
