"""StoreWatcher: follow a store that another process writes, with the events a CertSync gives.

A service that only reads certificates (nginx's neighbour, a Python server running as another
user) watches the store ``kvcertsync run`` installs into. A PEM directory is watched through
inotify (or the platform's equivalent) with ``watchfiles`` when it is installed (the ``watch``
extra), else by re-reading every ``poll_interval`` seconds; either way it is re-read every
``recheck_interval`` seconds, so a missed notification only delays a change.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

import anyio
import anyio.abc

from kvcertsync.events import Announcer, CertificateUpdated, Event, EventBus
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.stores.base import InstalledCertificate, Store, read_material
from kvcertsync.stores.pemdir import PemDirectoryStore
from kvcertsync.uri import SecretUri

__all__ = ["StoreWatcher"]

logger = logging.getLogger(__name__)

#: How soon after a watch starts the store is read again (changes just before are unseen).
_SETTLE_SECONDS = 1.0


def _watchfiles_available() -> bool:
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        return False
    return True


class StoreWatcher(Announcer):
    """Tells what a store holds for each observed URL, and of every change another process makes.

    A CertificateFeed: ``current``, ``material``, ``subscribe`` and ``events`` work as on a
    CertSync, so a TLS context or a reload hook follows either the same way.
    """

    def __init__(
        self,
        observed: Iterable[ObservedCertificate | SecretUri | str],
        *,
        store: Store,
        poll_interval: float = 2.0,
        recheck_interval: float = 60.0,
        use_watchfiles: bool | None = None,
        hook_timeout: float = 30.0,
        event_buffer: int = 1000,
    ) -> None:
        if not poll_interval > 0 or not recheck_interval > 0:
            raise ValueError("poll_interval and recheck_interval must be positive")
        self.store = store
        self.poll_interval = float(poll_interval)
        self.recheck_interval = float(recheck_interval)
        available = _watchfiles_available()
        if use_watchfiles and not available:
            raise RuntimeError("use_watchfiles=True needs watchfiles: install kvcertsync[watch]")
        # Notifications need directories to watch: only a PEM directory store has them.
        self.uses_watchfiles = (
            available if use_watchfiles is None else use_watchfiles
        ) and isinstance(store, PemDirectoryStore)
        self._observed: dict[SecretUri, ObservedCertificate] = {}
        for item in observed:
            one = item if isinstance(item, ObservedCertificate) else ObservedCertificate.of(item)
            if one.uri in self._observed:
                raise ValueError(f"{one.uri} is observed twice")
            self._observed[one.uri] = one
        self._installed: dict[SecretUri, InstalledCertificate | None] = {}
        self._bus = EventBus(hook_timeout=hook_timeout, buffer=event_buffer, shutdown_grace=0.5)
        self._tg: anyio.abc.TaskGroup | None = None
        self._stop: anyio.Event | None = None

    def __repr__(self) -> str:
        how = "watchfiles" if self.uses_watchfiles else f"polling every {self.poll_interval:g}s"
        return f"<StoreWatcher {len(self._observed)} certificates in {self.store!r} ({how})>"

    @property
    def observed(self) -> tuple[ObservedCertificate, ...]:
        """The certificates being followed."""
        return tuple(self._observed.values())

    # ----------------------------------------------------------------- the feed

    def current(self, uri: SecretUri | str) -> InstalledCertificate | None:
        """What the store held for ``uri`` when last read (read on entering ``async with``)."""
        return self._installed.get(self._key(uri))

    async def material(self, uri: SecretUri | str) -> CertificateMaterial | None:
        """The certificate, chain and key the store holds for ``uri`` now, or None."""
        return await read_material(self.store, self._observed[self._key(uri)])

    async def check(self) -> list[CertificateUpdated]:
        """Read the store now and announce what changed since the last read."""
        found = await self._read_all()
        changes: list[CertificateUpdated] = []
        for uri, installed in found.items():
            previous = self._installed.get(uri)
            self._installed[uri] = installed
            if installed is None or _same(previous, installed):
                continue
            event = CertificateUpdated.of(uri, installed, previous)
            changes.append(event)
            logger.info("%s", event.describe(), extra={"uri": str(uri)})
            self._bus.publish(event)
        return changes

    # ----------------------------------------------------------------- running

    async def __aenter__(self) -> Self:
        """Read the store, then follow it in the background."""
        if self._tg is not None:
            raise RuntimeError("this StoreWatcher is already running")
        for uri, installed in (await self._read_all()).items():
            if self._installed.get(uri) is None and installed is not None:
                event = CertificateUpdated.of(uri, installed, replayed=True)
                self._bus.publish(event, replay_only=True)
            self._installed[uri] = installed
        tg = anyio.create_task_group()
        await tg.__aenter__()
        try:
            await tg.start(self._bus_running)
            self._stop = anyio.Event()
            tg.start_soon(self._follow)
        except BaseException:
            tg.cancel_scope.cancel()
            await tg.__aexit__(None, None, None)
            raise
        self._tg = tg
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop following; deliver what was announced; end event iterators."""
        tg, self._tg = self._tg, None
        if tg is None:
            return
        if self._stop is not None:
            self._stop.set()
        tg.cancel_scope.cancel()
        await tg.__aexit__(None, None, None)
        self._bus.end_streams()

    async def _bus_running(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        async with self._bus:
            task_status.started()
            await anyio.sleep_forever()

    async def _follow(self) -> None:
        if self.uses_watchfiles:
            unreadable = [d for d in self._watched() if not os.access(d, os.R_OK)]
            if not unreadable:
                try:
                    await self._follow_notifications()
                    return
                except OSError as error:
                    unreadable = [Path(f"({error})")]
            # inotify needs read access to a directory; an ACL'd reader often has only x.
            logger.info(
                "cannot watch %s for changes: polling every %gs instead",
                ", ".join(map(str, unreadable)),
                self.poll_interval,
            )
            self.uses_watchfiles = False
        await self._follow_polling()

    async def _follow_polling(self) -> None:
        while True:
            await anyio.sleep(self.poll_interval)
            await self._check_logged()

    async def _follow_notifications(self) -> None:
        from watchfiles import awatch

        # Wakes at least this often, to read the store once a new watch is surely in place.
        wake = min(self.recheck_interval, _SETTLE_SECONDS)
        while True:
            watched = self._watched()
            logger.info("watching %s for changes", ", ".join(map(str, watched)))
            # A change between the last read and the moment the watch starts sends no
            # notification: the first wake after the start reads the store again for it.
            settled, last_read = False, anyio.current_time()
            async for changes in awatch(
                *watched,
                watch_filter=None,
                recursive=False,
                debounce=200,
                step=20,
                stop_event=self._stop,
                rust_timeout=max(1, math.ceil(wake * 1000)),  # 0 would mean none at all
                yield_on_timeout=True,
            ):
                now = anyio.current_time()
                if changes or not settled or now - last_read >= self.recheck_interval:
                    settled, last_read = True, now
                    await self._check_logged()
                    if self._watched() != watched:
                        break  # a directory appeared: watch it itself from now on
            else:
                return  # stopped

    def _watched(self) -> list[Path]:
        # A directory not there yet is watched through its parent, which tells when it appears.
        directories = {self._directory(o) for o in self._observed.values()}
        return sorted({d if d.is_dir() else _existing_parent(d) for d in directories})

    async def _check_logged(self) -> None:
        try:
            await self.check()
        except Exception as error:
            # The store may be halfway through a change we cannot see: try again next time.
            logger.warning("reading %r failed: %s: %s", self.store, type(error).__name__, error)

    # ----------------------------------------------------------------- helpers

    def _directory(self, observed: ObservedCertificate) -> Path:
        assert isinstance(self.store, PemDirectoryStore)
        return self.store.directory_for(observed).absolute()

    def _key(self, uri: SecretUri | str) -> SecretUri:
        key = uri if isinstance(uri, SecretUri) else SecretUri.parse(uri, allow_any_host=True)
        if key not in self._observed:
            raise KeyError(f"{key} is not observed")
        return key

    def _present(self) -> list[Event]:
        return [
            CertificateUpdated.of(uri, installed, replayed=True)
            for uri, installed in self._installed.items()
            if installed is not None
        ]

    async def _read_all(self) -> dict[SecretUri, InstalledCertificate | None]:
        found: dict[SecretUri, InstalledCertificate | None] = {}

        async def read(observed: ObservedCertificate) -> None:
            found[observed.uri] = await self.store.installed(observed)

        async with anyio.create_task_group() as tg:
            for observed in self._observed.values():
                tg.start_soon(read, observed)
        return {uri: found[uri] for uri in self._observed}


def _same(previous: InstalledCertificate | None, installed: InstalledCertificate) -> bool:
    return (
        previous is not None
        and previous.version == installed.version
        and previous.thumbprint == installed.thumbprint
    )


def _existing_parent(path: Path) -> Path:
    while not path.is_dir() and path != path.parent:
        path = path.parent
    return path
