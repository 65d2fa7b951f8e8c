"""Admin routes for the clock and certificate issuance (``/_emulator/clock``, ``/issuance``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvcertsync.emulator._json import json_object
from kvcertsync.emulator.clock import VaultClock

if TYPE_CHECKING:
    from kvcertsync.emulator.server import LocalKeyVault

__all__ = ["CONTROL_ROUTES", "control_route"]

CONTROL_ROUTES = frozenset({"clock", "issuance"})


def clock_state(clock: VaultClock) -> dict[str, Any]:
    """What ``GET /_emulator/clock`` answers."""
    return {
        "time": round(clock.time(), 3),
        "iso": clock.utcnow().isoformat(timespec="seconds").replace("+00:00", "Z"),
        "offset": clock.offset,
        "tokenOffset": clock.token_offset,
    }


def _number(body: dict[str, Any], key: str, fail: Callable[[str], Exception]) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(f"'{key}' must be a number of seconds")
    return float(value)


async def control_route(
    kv: LocalKeyVault,
    request: web.BaseRequest,
    head: str,
    fail: Callable[[str], Exception],
) -> Any:
    """Answer ``/_emulator/clock`` and ``/_emulator/issuance``; ``fail(message)`` is a 400."""

    async def read() -> dict[str, Any]:
        return await json_object(request, fail)

    if head == "clock":
        if request.method == "POST":
            body = await read()
            expire = body.get("expireTokens", False)
            if not isinstance(expire, bool):
                raise fail("'expireTokens' must be true or false")
            advance = _number(body, "advance", fail)
            target = body.get("set")
            if (advance is None) == (target is None):
                raise fail("give one of 'advance' (seconds) or 'set' (Unix seconds or ISO 8601)")
            when: datetime | float | None = None
            if isinstance(target, str):
                try:
                    when = datetime.fromisoformat(target.replace("Z", "+00:00"))
                except ValueError:
                    raise fail(f"'set' is not an ISO 8601 time: {target!r}") from None
            elif target is not None:
                when = _number(body, "set", fail)
            # Renewals the move makes due generate keys: not on the event loop.
            if when is not None:
                await asyncio.to_thread(kv.clock.set, when, expire_tokens=expire)
            else:
                await asyncio.to_thread(kv.clock.advance, advance or 0.0, expire_tokens=expire)
        elif request.method != "GET":
            raise fail(f"no admin route {request.method} {request.path}")
        return clock_state(kv.clock)
    if request.method == "POST":
        delay = _number(await read(), "delay", fail)
        if delay is None or delay < 0:
            raise fail("'delay' (seconds, >= 0) is required")
        kv.certificates.issuance_delay = delay
    return {"delay": kv.certificates.issuance_delay}
