"""CertificateFeed: what code that follows certificates needs, from a CertSync or a watcher."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from kvcertsync.events import CertificateUpdated, EventStream, Subscription
    from kvcertsync.material import CertificateMaterial
    from kvcertsync.stores.base import InstalledCertificate
    from kvcertsync.uri import SecretUri

__all__ = ["CertificateFeed"]


@runtime_checkable
class CertificateFeed(Protocol):
    """Tells what certificate is installed for a URL now, and of every change after.

    ``kvcertsync.CertSync`` (the process that installs) and ``kvcertsync.watch.StoreWatcher``
    (a process that reads a store another one writes) both are one.
    """

    def current(self, uri: SecretUri | str) -> InstalledCertificate | None:
        """What is installed for ``uri`` now, or None."""
        ...

    async def material(self, uri: SecretUri | str) -> CertificateMaterial | None:
        """The installed certificate, chain and key of ``uri``, or None."""
        ...

    def subscribe(
        self,
        callback: Callable[[CertificateUpdated], Awaitable[None] | None],
        event_type: type[CertificateUpdated],
        /,
        *,
        replay: bool = False,
        buffer: int | None = None,
    ) -> Subscription:
        """Call ``callback`` for each change (first for what is installed, with ``replay``)."""
        ...

    def events(
        self,
        event_type: type[CertificateUpdated],
        /,
        *,
        replay: bool = False,
        buffer: int | None = None,
    ) -> EventStream[CertificateUpdated]:
        """An async iterator over changes (first what is installed, with ``replay``)."""
        ...
