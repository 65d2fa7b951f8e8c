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

__all__ = ["InstallIncomplete", "InstalledCertificate", "ReadableStore", "Store", "read_material"]


@attrs.frozen
class InstalledCertificate:
    """What a store holds for one observed secret: which version, which certificate, where."""

    #: The observed secret URL (without a version).
    uri: SecretUri
    #: The Key Vault secret version installed.
    version: str
    #: SHA-1 of the leaf certificate, upper-case hex, as Windows shows it.
    thumbprint: str
    #: When the leaf certificate expires (timezone-aware UTC).
    not_after: datetime
    #: Where it is: a file path, a Windows store and thumbprint, ``memory:<url>``.
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


@runtime_checkable
class ReadableStore(Store, Protocol):
    """A store that can give back what it installed: the certificate, its chain and its key."""

    async def read(
        self, observed: ObservedCertificate
    ) -> tuple[InstalledCertificate, CertificateMaterial] | None:
        """The installed record and material of ``observed``, read together, or None."""
        ...


async def read_material(store: Store, observed: ObservedCertificate) -> CertificateMaterial | None:
    """What ``store`` holds for ``observed``, read back; StoreError if it cannot give it."""
    if not isinstance(store, ReadableStore):
        raise StoreError(f"{store!r} cannot give installed certificates back (it has no read)")
    found = await store.read(observed)
    return found[1] if found is not None else None
