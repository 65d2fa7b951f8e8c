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

    uri: SecretUri
    version: str
    value: str = attrs.field(repr=False)
    content_type: str | None = None
    enabled: bool = True
    not_before: datetime | None = None
    expires: datetime | None = None
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
