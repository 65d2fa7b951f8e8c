"""MemorySource: an in-process secret source for tests, examples and benchmarks."""

from __future__ import annotations

import secrets
import threading
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime

import anyio
import attrs

from kvcertsync.errors import AccessDenied, SecretNotFound, SourceError
from kvcertsync.material import CertificateMaterial
from kvcertsync.sources.base import SecretVersion
from kvcertsync.uri import SecretUri

__all__ = ["MemorySource"]

PEM_CONTENT_TYPE = "application/x-pem-file"


@attrs.define
class _Stored:
    version: SecretVersion
    enabled: bool = True


def _as_uri(uri: SecretUri | str) -> SecretUri:
    return uri if isinstance(uri, SecretUri) else SecretUri.parse(uri, allow_any_host=True)


class MemorySource:
    """Secrets held in memory, with controls to rotate, disable, delete and inject failures."""

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.closed = False
        self._lock = threading.Lock()
        self._secrets: dict[SecretUri, list[_Stored]] = {}
        self._failures: dict[SecretUri | str | None, deque[SourceError]] = {}
        self._observers: list[Callable[[SecretUri], None]] = []

    def set(
        self,
        uri: SecretUri | str,
        value: str | bytes | CertificateMaterial,
        content_type: str | None = None,
        *,
        enabled: bool = True,
        not_before: datetime | None = None,
        expires: datetime | None = None,
    ) -> str:
        """Add a new version of ``uri`` (it becomes the latest) and return its version id."""
        latest = _as_uri(uri).latest
        if isinstance(value, CertificateMaterial):
            value, content_type = value.to_pem_bundle().decode(), PEM_CONTENT_TYPE
        elif isinstance(value, bytes):
            value = value.decode()
        version = secrets.token_hex(16)
        stored = SecretVersion(
            uri=latest.with_version(version),
            version=version,
            value=value,
            content_type=content_type,
            enabled=enabled,
            not_before=not_before,
            expires=expires,
            updated=datetime.now(UTC),
        )
        with self._lock:
            self._secrets.setdefault(latest, []).append(_Stored(stored, enabled))
        return version

    rotate = set

    def _set_enabled(self, uri: SecretUri | str, version: str | None, enabled: bool) -> None:
        key = _as_uri(uri)
        with self._lock:
            versions = self._secrets.get(key.latest)
            if not versions:
                raise KeyError(str(key))
            wanted = version or key.version
            for stored in versions if wanted else versions[-1:]:
                if wanted is None or stored.version.version == wanted.lower():
                    stored.enabled = enabled
                    stored.version = attrs.evolve(stored.version, enabled=enabled)

    def disable(self, uri: SecretUri | str, version: str | None = None) -> None:
        """Disable a version (default: the latest); reading it then raises AccessDenied."""
        self._set_enabled(uri, version, False)

    def enable(self, uri: SecretUri | str, version: str | None = None) -> None:
        """Enable a version again (default: the latest)."""
        self._set_enabled(uri, version, True)

    def delete(self, uri: SecretUri | str) -> None:
        """Delete the secret with all its versions."""
        with self._lock:
            self._secrets.pop(_as_uri(uri).latest, None)

    def versions(self, uri: SecretUri | str) -> list[str]:
        """Every version id of ``uri``, oldest first."""
        with self._lock:
            return [s.version.version for s in self._secrets.get(_as_uri(uri).latest, [])]

    def fail(
        self,
        error: SourceError,
        uri: SecretUri | str | None = None,
        *,
        vault: str | None = None,
        times: int = 1,
    ) -> None:
        """Make the next ``times`` reads of ``uri`` (else ``vault``, else any) raise ``error``."""
        if uri is not None and vault is not None:
            raise ValueError("give uri or vault, not both")
        key: SecretUri | str | None = _as_uri(uri).latest if uri is not None else None
        if vault is not None:
            key = vault.lower()
        with self._lock:
            self._failures.setdefault(key, deque()).extend([error] * times)

    def observe(self, callback: Callable[[SecretUri], None]) -> None:
        """Call ``callback(uri)`` at the start of every read (instrumentation for tests)."""
        self._observers.append(callback)

    def _next_failure(self, key: SecretUri) -> SourceError | None:
        with self._lock:
            for slot in (key, key.hostname, None):
                queue = self._failures.get(slot)
                if queue:
                    return queue.popleft()
        return None

    def _lookup(self, uri: SecretUri) -> SecretVersion:
        with self._lock:
            versions = self._secrets.get(uri.latest)
            if not versions:
                raise SecretNotFound(f"{uri}: secret not found")
            if uri.version is None:
                stored = versions[-1]
            else:
                match = [s for s in versions if s.version.version == uri.version]
                if not match:
                    raise SecretNotFound(f"{uri}: secret version not found")
                stored = match[0]
            if not stored.enabled:
                raise AccessDenied(
                    f"{uri}: operation get is not allowed on a disabled secret",
                    code="SecretDisabled",
                )
            return stored.version

    async def get(self, uri: SecretUri) -> SecretVersion:
        """Return the latest (or requested) version of ``uri``."""
        self.calls += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            for observer in self._observers:
                observer(uri)
            if self.latency:
                await anyio.sleep(self.latency)
            else:
                await anyio.lowlevel.checkpoint()
            failure = self._next_failure(uri.latest)
            if failure is not None:
                raise failure
            return self._lookup(uri)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        """Mark the source closed."""
        self.closed = True
