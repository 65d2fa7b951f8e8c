"""The composition root: choose a source and a store for extension settings.

The engine knows only the SecretSource and Store protocols; this module is the one place that
knows the implementations, so ``CertSync.from_settings`` can build a working agent from the
extension's JSON alone.
"""

from __future__ import annotations

from typing import Any

from azure.core.credentials_async import AsyncTokenCredential

from kvcertsync.errors import StoreError
from kvcertsync.settings import AgentSettings
from kvcertsync.sources.base import SecretSource
from kvcertsync.sources.keyvault import KeyVaultSource
from kvcertsync.stores.base import Store

__all__ = ["source_from_settings", "store_from_settings"]


def source_from_settings(
    settings: AgentSettings, credential: AsyncTokenCredential | None = None, **options: Any
) -> SecretSource:
    """A KeyVaultSource authenticating as ``settings`` say (or with ``credential``)."""
    return KeyVaultSource.from_settings(settings, credential=credential, **options)


def store_from_settings(settings: AgentSettings) -> Store:
    """The store the observed certificates' locations call for."""
    locations = sorted({cert.store_location for cert in settings.observed})
    raise StoreError(
        f"no store implementation for certificateStoreLocation {', '.join(locations)} yet: "
        "pass store= (for example kvcertsync.stores.MemoryStore())"
    )
