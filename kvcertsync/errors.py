"""The exception family: every error kvcertsync raises derives from KvCertSyncError."""

from __future__ import annotations


class KvCertSyncError(Exception):
    """Base class of every error kvcertsync raises on purpose."""


class SettingsError(KvCertSyncError, ValueError):
    """The extension settings are invalid; ``path`` names the offending JSON location."""

    def __init__(self, message: str, path: str = "") -> None:
        #: The JSON path of the bad value, e.g. ``secretsManagementSettings.pollingIntervalInS``.
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class SecretUriError(KvCertSyncError, ValueError):
    """A Key Vault secret URL is malformed or points at the wrong kind of object."""


class MaterialError(KvCertSyncError, ValueError):
    """A secret value could not be read as a certificate with its private key."""


class SourceError(KvCertSyncError):
    """Fetching a secret failed; ``retryable`` and ``retry_after`` say whether and when to retry."""

    #: Whether trying again soon may succeed (False: wait for the next regular poll).
    retryable: bool = True

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds the service asked to wait before the next request, when it said.
        self.retry_after = retry_after


class SecretNotFound(SourceError):
    """The secret (or the requested version) does not exist."""

    retryable = False


class AccessDenied(SourceError):
    """The identity may not read the secret, or the secret is disabled; ``code`` says which."""

    retryable = False

    def __init__(self, message: str, *, code: str = "Forbidden") -> None:
        super().__init__(message)
        #: Key Vault's inner error code: ``ForbiddenByRbac``, ``AccessDenied``, ``SecretDisabled``
        self.code = code


class Throttled(SourceError):
    """The vault answered 429; ``retry_after`` is its Retry-After in seconds, when it gave one."""


class TransientSourceError(SourceError):
    """A failure expected to pass: 5xx, timeout, connection reset."""


class AuthenticationFailed(SourceError):
    """No token could be obtained, or the vault rejected it."""


class StoreError(KvCertSyncError):
    """Installing or reading a certificate in a store failed."""
