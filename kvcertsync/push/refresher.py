"""PushRefresher: Key Vault events in, ``sync.refresh(uri)`` out, matched and coalesced.

An event names a vault and a secret; the refresher finds the observed URL it is about and polls
it now. Event Grid delivers at least once and a rotation may send several events (the secret's
and the certificate's), so a storm of duplicates for one URL never runs two refreshes of it at
once: while one runs, any number of further events leave at most one more to run after it, and
none when they all named the version that the running refresh installed. So every event is
followed by a poll that started after it arrived, or by that version installed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

import anyio
import anyio.abc
import attrs

from kvcertsync.push.events import EventBatch, KeyVaultEvent

if TYPE_CHECKING:
    from kvcertsync.settings import ObservedCertificate
    from kvcertsync.stores.base import InstalledCertificate
    from kvcertsync.uri import SecretUri

__all__ = ["PushRefresher", "PushStats", "Refreshable"]

logger = logging.getLogger(__name__)


class Refreshable(Protocol):
    """What the refresher needs of a CertSync."""

    @property
    def observed(self) -> tuple[ObservedCertificate, ...]:
        """The certificates being kept in sync."""
        ...

    @property
    def running(self) -> bool:
        """True while it polls in the background (inside ``async with``)."""
        ...

    def current(self, uri: SecretUri | str) -> InstalledCertificate | None:
        """What is installed for ``uri`` now."""
        ...

    async def refresh(self, uri: SecretUri | str | None = None) -> object:
        """Poll ``uri`` now and wait for the result."""
        ...


@attrs.frozen
class PushStats:
    """Counters since the refresher started."""

    #: Key Vault events about a secret or certificate version.
    events: int = 0
    #: Events about no observed URL (another vault, secret, or a versioned URL).
    unobserved: int = 0
    #: Events that arrived while the agent was not polling (its start polls everything anyway).
    not_running: int = 0
    #: New-version events for the version already installed (nothing to do).
    current: int = 0
    #: Events folded into a refresh already running or queued.
    coalesced: int = 0
    #: ``sync.refresh`` calls made.
    refreshes: int = 0
    #: Refreshes that raised (the engine reports failed polls on its own).
    failures: int = 0


class PushRefresher:
    """Refreshes the observed certificates that Key Vault events name (use in ``async with``)."""

    def __init__(self, sync: Refreshable) -> None:
        self.sync = sync
        self._tg: anyio.abc.TaskGroup | None = None
        # URL being refreshed -> what events came meanwhile want: versions, None for "poll".
        self._active: dict[SecretUri, set[str | None]] = {}
        # Set while refreshes run or wait (made on the loop: anyio needs one).
        self._busy: anyio.Event | None = None
        self._counts = dict.fromkeys(attrs.fields_dict(PushStats), 0)

    @property
    def stats(self) -> PushStats:
        """The counters now."""
        return PushStats(**self._counts)

    async def __aenter__(self) -> Self:
        """Start accepting events."""
        if self._tg is not None:
            raise RuntimeError("this PushRefresher is already running")
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop: refreshes still running are cancelled (the sync is stopping too)."""
        tg, self._tg = self._tg, None
        assert tg is not None
        tg.cancel_scope.cancel()
        await tg.__aexit__(exc_type, exc, tb)
        self._active.clear()
        self._settle()

    def submit(self, events: EventBatch | Iterable[KeyVaultEvent]) -> tuple[SecretUri, ...]:
        """Refresh each observed certificate the events name; returns their URLs at once.

        Never waits for a refresh: an HTTP receiver answers before the polls end.
        """
        if self._tg is None:
            raise RuntimeError("PushRefresher.submit() outside `async with`")
        batch = events.events if isinstance(events, EventBatch) else tuple(events)
        if not batch:
            return ()
        # Read once per message: the observed set may change between messages (a reload).
        by_name: dict[str, list[SecretUri]] = {}
        for observed in self.sync.observed:
            by_name.setdefault(observed.uri.name.lower(), []).append(observed.uri)
        matched: dict[SecretUri, None] = {}
        for event in batch:
            self._counts["events"] += 1
            uri = next(
                (u for u in by_name.get(event.object_name.lower(), ()) if event.matches(u)), None
            )
            if uri is None:
                self._counts["unobserved"] += 1
                logger.debug("push: %s for %s/%s: not observed", *_describe(event))
            elif self._admit(uri, event):
                matched[uri] = None
        return tuple(matched)

    def _admit(self, uri: SecretUri, event: KeyVaultEvent) -> bool:
        if not self.sync.running:
            self._counts["not_running"] += 1
            logger.debug("push: %s for %s: not polling now", event.event_type, uri)
            return False
        installed = self.sync.current(uri)
        if event.new_version and installed is not None and installed.version == event.version:
            self._counts["current"] += 1
            logger.debug("push: %s for %s: %s is installed", event.event_type, uri, event.version)
            return False
        wanted = self._active.get(uri)
        if wanted is not None:
            self._counts["coalesced"] += 1
            wanted.add(event.version if event.new_version else None)
            return True
        logger.info("push: %s for %s: refreshing", event.event_type, uri)
        self._active[uri] = set()
        if self._busy is None:
            self._busy = anyio.Event()
        assert self._tg is not None
        self._tg.start_soon(self._refresh, uri)
        return True

    async def _refresh(self, uri: SecretUri) -> None:
        try:
            while True:
                self._active[uri] = set()
                self._counts["refreshes"] += 1
                try:
                    await self.sync.refresh(uri)
                except KeyError:
                    logger.debug("push: %s is no longer observed", uri)
                    return
                except Exception as error:
                    self._counts["failures"] += 1
                    logger.warning(
                        "push: refresh of %s failed: %s: %s", uri, type(error).__name__, error
                    )
                wanted = self._active.get(uri, set())
                installed = self.sync.current(uri)
                if installed is not None:
                    wanted.discard(installed.version)
                if not wanted:
                    return
        finally:
            self._active.pop(uri, None)
            self._settle()

    def _settle(self) -> None:
        if not self._active and self._busy is not None:
            self._busy.set()
            self._busy = None

    async def wait_idle(self) -> None:
        """Return once no refresh is running or queued."""
        while self._busy is not None:
            await self._busy.wait()


def _describe(event: KeyVaultEvent) -> tuple[str, str, str]:
    return event.event_type, event.vault_host or event.vault_name, event.object_name
