"""Reading JSON request bodies, shared by the vault routes and the admin routes."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web


async def json_object(request: web.BaseRequest, fail: Callable[[str], Exception]) -> dict[str, Any]:
    """The request body as a JSON object (empty body: {}); ``fail(reason)`` builds the error."""
    raw = await request.read()
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        raise fail("the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise fail("the body must be a JSON object")
    return body
