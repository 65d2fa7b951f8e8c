"""kvcertsync: keep Azure Key Vault certificates installed and current, anywhere Python runs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvcertsync._version import __version__

if TYPE_CHECKING:
    from kvcertsync.agent.compose import sync_from_settings
    from kvcertsync.engine import CertSync, InitialSyncError, SyncReport
    from kvcertsync.errors import (
        KvCertSyncError,
        MaterialError,
        SecretUriError,
        SettingsError,
        SourceError,
        StoreError,
    )
    from kvcertsync.material import CertificateMaterial
    from kvcertsync.settings import (
        AgentSettings,
        ObservedCertificate,
        load_settings,
        parse_settings,
    )
    from kvcertsync.uri import SecretUri

# Imported on first use: `kvcertsync run` must install its signal handlers before the Azure SDK,
# aiohttp and cryptography are loaded (half a second in which a SIGTERM would kill it).
_EXPORTS = {
    "AgentSettings": "kvcertsync.settings",
    "CertSync": "kvcertsync.engine",
    "CertificateMaterial": "kvcertsync.material",
    "InitialSyncError": "kvcertsync.engine",
    "KvCertSyncError": "kvcertsync.errors",
    "MaterialError": "kvcertsync.errors",
    "ObservedCertificate": "kvcertsync.settings",
    "SecretUri": "kvcertsync.uri",
    "SecretUriError": "kvcertsync.errors",
    "SettingsError": "kvcertsync.errors",
    "SourceError": "kvcertsync.errors",
    "StoreError": "kvcertsync.errors",
    "SyncReport": "kvcertsync.engine",
    "load_settings": "kvcertsync.settings",
    "parse_settings": "kvcertsync.settings",
    "sync_from_settings": "kvcertsync.agent.compose",
}

__all__ = [
    "AgentSettings",
    "CertSync",
    "CertificateMaterial",
    "InitialSyncError",
    "KvCertSyncError",
    "MaterialError",
    "ObservedCertificate",
    "SecretUri",
    "SecretUriError",
    "SettingsError",
    "SourceError",
    "StoreError",
    "SyncReport",
    "__version__",
    "load_settings",
    "parse_settings",
    "sync_from_settings",
]


def __getattr__(name: str) -> Any:
    """The public names, imported from their modules when first used."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcertsync' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """Every public name, imported or not."""
    return sorted({*globals(), *_EXPORTS})
