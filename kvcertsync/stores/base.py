"""The Store protocol and the InstalledCertificate record every store returns."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from kvcertsync.uri import SecretUri

if TYPE_CHECKING:
    from kvcertsync.material import CertificateMaterial
    from kvcertsync.settings import ObservedCertificate

__all__ = ["InstalledCertificate", "Store"]


@attrs.frozen
class InstalledCertificate:
    """What a store holds for one observed secret: which version, which certificate, where."""

    uri: SecretUri
    version: str
    thumbprint: str
    not_after: datetime
    location: str


@runtime_checkable
class Store(Protocol):
    """Where certificates go; implementations do blocking work in worker threads."""

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        """Install ``material`` as ``version`` of ``observed``, atomically, and describe it."""
        ...

    async def installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        """What is installed for ``observed`` now, or None."""
        ...
