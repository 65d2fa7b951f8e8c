"""Test stores shared by test modules."""

from __future__ import annotations

from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.stores import InstalledCertificate, MemoryStore


class WriteOnlyStore:
    """A store that installs and says what is installed, but gives no material back (no read)."""

    def __init__(self, inner: MemoryStore | None = None) -> None:
        self.inner = inner if inner is not None else MemoryStore()

    def __repr__(self) -> str:
        return "WriteOnlyStore()"

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        """Install into the inner MemoryStore."""
        return await self.inner.install(observed, material, version)

    async def installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        """What the inner MemoryStore holds."""
        return await self.inner.installed(observed)
