"""The Store protocol and the InstalledCertificate record every store returns."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from kvcertsync.errors import StoreError
from kvcertsync.uri import SecretUri

if TYPE_CHECKING:
    from kvcertsync.material import CertificateMaterial
    from kvcertsync.settings import ObservedCertificate

__all__ = ["InstallIncomplete", "InstalledCertificate", "Store"]


@attrs.frozen
class InstalledCertificate:
    """What a store holds for one observed secret: which version, which certificate, where."""

    uri: SecretUri
    version: str
    thumbprint: str
    not_after: datetime
    location: str


class InstallIncomplete(StoreError):
    """The certificate is installed and current, but a step after that failed; see ``problems``.

    The engine announces the installed certificate (CertificateUpdated) and reports the failure.
    """

    def __init__(self, installed: InstalledCertificate, problems: Sequence[str]) -> None:
        self.installed = installed
        self.problems = tuple(problems)
        super().__init__(
            f"{installed.location}: installed {installed.uri} version {installed.version} "
            f"(thumbprint {installed.thumbprint}), but: " + "; ".join(self.problems)
        )


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
