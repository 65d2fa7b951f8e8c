"""kvcertsync: keep Azure Key Vault certificates installed and current, anywhere Python runs."""

from kvcertsync._version import __version__
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
from kvcertsync.settings import AgentSettings, ObservedCertificate, load_settings, parse_settings
from kvcertsync.uri import SecretUri

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
