"""A cap on the client connections the emulator keeps open (least recently used idle ones close).

Each TLS connection costs the server about 256 KiB (asyncio's TLS read buffer alone), and a
client that opens a connection per request without closing the last (azure-core with
``connection_verify=<file>`` does) would otherwise leave thousands idle for aiohttp's 75 s
keep-alive: that grew an emulator from 361 MiB to 1.95 GiB during one benchmark.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Iterator

__all__ = ["ConnectionLimit"]


class ConnectionLimit:
    """Keeps at most ``limit`` connections open by closing the least recently used idle ones."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the connection limit must be at least 1")
        self.limit = limit
        #: Connections closed to stay within the limit.
        self.shed = 0
        # transport -> requests in flight on it, least recently used first
        self._recent: collections.OrderedDict[asyncio.BaseTransport, int] = (
            collections.OrderedDict()
        )

    @property
    def open(self) -> int:
        """Connections open now (as far as requests on them tell)."""
        return sum(1 for transport in self._recent if not transport.is_closing())

    @contextlib.contextmanager
    def request(self, transport: asyncio.BaseTransport | None) -> Iterator[None]:
        """Count a request on ``transport`` while it runs; shed idle connections beyond the cap."""
        if transport is None:
            yield
            return
        self._recent[transport] = self._recent.get(transport, 0) + 1
        self._recent.move_to_end(transport)
        if len(self._recent) > self.limit:
            self._shed()
        try:
            yield
        finally:
            if transport in self._recent:
                self._recent[transport] -= 1

    def _shed(self) -> None:
        # Oldest first: those are mostly closed by their clients already, or idle.
        for transport, busy in list(self._recent.items()):
            if len(self._recent) <= self.limit:
                return
            if transport.is_closing():
                del self._recent[transport]
            elif not busy:
                del self._recent[transport]
                transport.close()
                self.shed += 1
