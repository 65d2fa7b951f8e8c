"""The SecretSource protocol and the SecretVersion it returns."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

import attrs

from kvcertsync.uri import SecretUri

__all__ = ["SecretSource", "SecretVersion"]


@attrs.frozen
class SecretVersion:
    """One version of a secret as fetched; ``value`` is secret and never shown in reprs."""

    #: The secret URL that was asked for.
    uri: SecretUri
    #: The version fetched (32 hexadecimal characters), from the secret's ``id``.
    version: str
    #: The secret value: base64 PKCS#12 or PEM text for a certificate's secret.
    value: str = attrs.field(repr=False)
    #: ``application/x-pkcs12``, ``application/x-pem-file``, or what the vault says.
    content_type: str | None = None
    #: False when this version is disabled; such a version is never installed.
    enabled: bool = True
    #: The version's ``nbf``: it must not be installed before then (UTC).
    not_before: datetime | None = None
    #: The version's ``exp`` (UTC).
    expires: datetime | None = None
    #: When the version was last updated in the vault (UTC).
    updated: datetime | None = None

    def usable_at(self, now: datetime) -> str | None:
        """Why this version must not be installed at ``now`` (None when it may be)."""
        if not self.enabled:
            return "is disabled"
        if self.not_before is not None and now < self.not_before:
            return f"is not valid before {self.not_before.isoformat()}"
        return None


@runtime_checkable
class SecretSource(Protocol):
    """Where secrets come from: one async ``get`` per poll, raising SourceError subclasses."""

    async def get(self, uri: SecretUri) -> SecretVersion:
        """Fetch ``uri`` (its latest version when ``uri.version`` is None)."""
        ...

    async def aclose(self) -> None:
        """Release connections and credentials."""
        ...
