"""MemoryStore: an in-process store for tests and embedding.

It keeps the record of every installed version (history) but the material of the current one
only: a store watching 100,000 certificates should not also hold every renewal's key.
"""

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


class _Slot:
    """What the store holds for one URL: every record, oldest first, and the current material."""

    __slots__ = ("material", "records")

    def __init__(self, record: InstalledCertificate, material: CertificateMaterial) -> None:
        self.records = [record]
        self.material = material

    def push(self, record: InstalledCertificate, material: CertificateMaterial) -> None:
        self.records.append(record)
        self.material = material


class MemoryStore:
    """Certificates kept in memory (every record, the current material); thread-safe to inspect."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._history: dict[SecretUri, _Slot] = {}
        self.installs = 0

    def _put(self, record: InstalledCertificate, material: CertificateMaterial) -> None:
        slot = self._history.get(record.uri.latest)
        if slot is None:
            self._history[record.uri.latest] = _Slot(record, material)
        else:
            slot.push(record, material)

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
            slot = self._history.get(key)
            if slot is not None and slot.records[-1] == record:
                return record
            self._put(record, material)
            self.installs += 1
        await anyio.lowlevel.checkpoint()
        return record

    async def installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        """The current record for ``observed``, or None."""
        # No checkpoint: a dictionary lookup, answered at once like PemDirectoryStore's cached
        # answer; a trip through the event loop here was a tenth of an unchanged poll.
        return self.current(observed.uri)

    async def read(
        self, observed: ObservedCertificate
    ) -> tuple[InstalledCertificate, CertificateMaterial] | None:
        """The current record and material of ``observed``, or None."""
        await anyio.lowlevel.checkpoint()
        with self._lock:
            slot = self._history.get(observed.uri.latest)
            return (slot.records[-1], slot.material) if slot is not None else None

    def current(self, uri: SecretUri) -> InstalledCertificate | None:
        """The latest installed record for ``uri`` (synchronous, for inspection)."""
        with self._lock:
            slot = self._history.get(uri.latest)
            return slot.records[-1] if slot is not None else None

    def material(self, uri: SecretUri) -> CertificateMaterial | None:
        """The latest installed material for ``uri``."""
        with self._lock:
            slot = self._history.get(uri.latest)
            return slot.material if slot is not None else None

    def history(self, uri: SecretUri) -> list[InstalledCertificate]:
        """Every record installed for ``uri``, oldest first."""
        with self._lock:
            slot = self._history.get(uri.latest)
            return list(slot.records) if slot is not None else []

    def preload(self, record: InstalledCertificate, material: CertificateMaterial) -> None:
        """Seed the store as if ``record`` had been installed earlier (a restart in tests)."""
        with self._lock:
            self._put(record, material)
