"""The composition root: choose a source and a store for extension settings.

The engine knows only the SecretSource and Store protocols; this module is the one place that
knows the implementations, so ``CertSync.from_settings`` can build a working agent from the
extension's JSON alone.
"""

from __future__ import annotations

import sys
from typing import Any

from azure.core.credentials_async import AsyncTokenCredential

from kvcertsync.settings import AgentSettings
from kvcertsync.sources.base import SecretSource
from kvcertsync.sources.keyvault import KeyVaultSource
from kvcertsync.stores.base import Store
from kvcertsync.stores.pemdir import PemDirectoryStore
from kvcertsync.stores.windows import WindowsCertStore

__all__ = ["source_from_settings", "store_from_settings"]


def source_from_settings(
    settings: AgentSettings, credential: AsyncTokenCredential | None = None, **options: Any
) -> SecretSource:
    """A KeyVaultSource authenticating as ``settings`` say (or with ``credential``)."""
    return KeyVaultSource.from_settings(settings, credential=credential, **options)


def store_from_settings(settings: AgentSettings) -> Store:
    """The store the platform and the certificates' locations call for.

    On Windows, the certificate store (crypt32). Elsewhere a PemDirectoryStore: certificates
    whose location is a directory go there, the others to the Linux extension's default
    directory, as it does.
    """
    if sys.platform == "win32":
        return WindowsCertStore.from_settings(settings)
    return PemDirectoryStore.from_settings(settings)
