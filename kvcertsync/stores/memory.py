"""MemoryStore: an in-process store that keeps every installed version, for tests and embedding."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import anyio

from kvcertsync.stores.base import InstalledCertificate

if TYPE_CHECKING:
    from kvcertsync.material import CertificateMaterial
    from kvcertsync.settings import ObservedCertificate
    from kvcertsync.uri import SecretUri

__all__ = ["MemoryStore"]


class MemoryStore:
    """Certificates kept in memory, every version in order; safe to inspect from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._history: dict[SecretUri, list[tuple[InstalledCertificate, CertificateMaterial]]] = {}
        self.installs = 0

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._history)} certificates)"

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        """Record ``material`` as the current version of ``observed``."""
        key = observed.uri.latest
        record = InstalledCertificate(
            uri=key,
            version=version,
            thumbprint=material.thumbprint,
            not_after=material.not_after,
            location=f"memory:{key}",
        )
        with self._lock:
            history = self._history.setdefault(key, [])
            if history and history[-1][0] == record:
                return record
            history.append((record, material))
            self.installs += 1
        await anyio.lowlevel.checkpoint()
        return record

    async def installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        """The current record for ``observed``, or None."""
        await anyio.lowlevel.checkpoint()
        return self.current(observed.uri)

    async def read(
        self, observed: ObservedCertificate
    ) -> tuple[InstalledCertificate, CertificateMaterial] | None:
        """The current record and material of ``observed``, or None."""
        await anyio.lowlevel.checkpoint()
        with self._lock:
            history = self._history.get(observed.uri.latest)
            return history[-1] if history else None

    def current(self, uri: SecretUri) -> InstalledCertificate | None:
        """The latest installed record for ``uri`` (synchronous, for inspection)."""
        with self._lock:
            history = self._history.get(uri.latest)
            return history[-1][0] if history else None

    def material(self, uri: SecretUri) -> CertificateMaterial | None:
        """The latest installed material for ``uri``."""
        with self._lock:
            history = self._history.get(uri.latest)
            return history[-1][1] if history else None

    def history(self, uri: SecretUri) -> list[InstalledCertificate]:
        """Every record installed for ``uri``, oldest first."""
        with self._lock:
            return [record for record, _ in self._history.get(uri.latest, [])]

    def preload(self, record: InstalledCertificate, material: CertificateMaterial) -> None:
        """Seed the store as if ``record`` had been installed earlier (a restart in tests)."""
        with self._lock:
            self._history.setdefault(record.uri.latest, []).append((record, material))
