"""RedirectResolver: send chosen host names to another address, leaving Host, SNI and TLS alone."""

from __future__ import annotations

import fnmatch
import socket
from collections.abc import Mapping

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = ["RedirectResolver", "parse_target"]


def parse_target(target: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too) into its parts; the port is required."""
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"redirect target {target!r} must be host:port")
    return host.strip("[]"), int(port)


class RedirectResolver(AbstractResolver):
    """Resolve hosts matching a pattern (``*.vault.azure.net``) to a fixed ``host:port``.

    Only the connection's address changes: the URL, the Host header, TLS SNI and certificate
    verification still see the original name, so the Key Vault SDK's checks run unchanged.
    """

    def __init__(
        self, redirect: Mapping[str, str], fallback: AbstractResolver | None = None
    ) -> None:
        self._rules = [(pattern.lower(), parse_target(t)) for pattern, t in redirect.items()]
        self._fallback = fallback or DefaultResolver()

    def target(self, host: str) -> tuple[str, int] | None:
        """Where ``host`` is redirected to, or None."""
        name = host.lower().rstrip(".")
        return next((t for pattern, t in self._rules if fnmatch.fnmatchcase(name, pattern)), None)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host``, or the address it is redirected to."""
        target = self.target(host)
        if target is None:
            return await self._fallback.resolve(host, port, family)
        results = await self._fallback.resolve(target[0], target[1], family)
        return [{**result, "hostname": host, "port": target[1]} for result in results]

    async def close(self) -> None:
        """Close the fallback resolver."""
        await self._fallback.close()
