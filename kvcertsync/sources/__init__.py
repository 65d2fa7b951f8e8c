"""Where secrets come from: the SecretSource protocol and its implementations."""

from kvcertsync.errors import (
    AccessDenied,
    AuthenticationFailed,
    SecretNotFound,
    SourceError,
    Throttled,
    TransientSourceError,
)
from kvcertsync.sources.base import SecretSource, SecretVersion
from kvcertsync.sources.keyvault import KeyVaultSource
from kvcertsync.sources.memory import MemorySource

__all__ = [
    "AccessDenied",
    "AuthenticationFailed",
    "KeyVaultSource",
    "MemorySource",
    "SecretNotFound",
    "SecretSource",
    "SecretVersion",
    "SourceError",
    "Throttled",
    "TransientSourceError",
]
