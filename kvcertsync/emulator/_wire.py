"""HTTP answers shaped like Key Vault's: JSON bodies, its headers, error bodies and paging."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from aiohttp import web

from kvcertsync.emulator.store import VaultError, bad_parameter

__all__ = ["PAGE_SIZE", "challenge_resource", "error_response", "json_response", "page"]

PAGE_SIZE = 25


def json_response(status: int, body: Any, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON answer with the headers Key Vault sends on every response."""
    response = web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode("utf-8"),
        content_type="application/json",
        charset="utf-8",
    )
    response.headers["Cache-Control"] = "no-cache"
    response.headers["x-ms-request-id"] = str(uuid.uuid4())
    response.headers["x-ms-keyvault-service-version"] = "1.9.0.0"
    response.headers["x-ms-keyvault-region"] = "local"
    if headers:
        response.headers.update(headers)
    return response


def error_response(error: VaultError, headers: Mapping[str, str] | None = None) -> web.Response:
    """The service's error body for ``error``."""
    return json_response(error.status, error.body(), headers)


def _encode_skiptoken(offset: int) -> str:
    raw = json.dumps({"NextMarker": str(offset), "TargetLocation": 0}).encode("utf-8")
    return base64.b64encode(raw).rstrip(b"=").decode("ascii")


def _decode_skiptoken(token: str) -> int:
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), validate=True)
        offset = int(json.loads(raw)["NextMarker"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise bad_parameter("The $skiptoken is not valid.") from None
    if offset < 0:
        raise bad_parameter("The $skiptoken is not valid.")
    return offset


def page(request: web.BaseRequest, items: list[dict[str, Any]], next_base: str) -> web.Response:
    """One page of a list (``maxresults`` 1-25) with an absolute ``nextLink``, as the service."""
    raw = request.query.get("maxresults")
    size = PAGE_SIZE
    if raw is not None:
        try:
            size = int(raw)
        except ValueError:
            size = 0
        if not 1 <= size <= PAGE_SIZE:
            raise bad_parameter(f"The value of maxresults must be between 1 and {PAGE_SIZE}.")
    token = request.query.get("$skiptoken")
    offset = _decode_skiptoken(token) if token else 0
    body: dict[str, Any] = {"value": items[offset : offset + size], "nextLink": None}
    if offset + size < len(items):
        query = (
            f"api-version={quote(request.query['api-version'], safe='')}"
            f"&$skiptoken={quote(_encode_skiptoken(offset + size), safe='')}"
        )
        if raw is not None:
            query += f"&maxresults={size}"
        body["nextLink"] = f"{next_base}{request.path}?{query}"
    return json_response(200, body)


def challenge_resource(host: str) -> str:
    """The resource a vault host's 401 challenge names: the vault domain the host sits in.

    ``demo.vault.azure.net`` -> ``https://vault.azure.net`` (any cloud's ``vault.`` domain the
    same way); ``demo.vault.localhost:8443`` -> ``https://vault.localhost:8443``, the port kept
    because the SDK compares the whole authority; anything else (``localhost``) names the public
    cloud's, as the service does.
    """
    authority = host.strip().lower()
    hostname, sep, port = authority.rpartition(":")
    if not sep or "]" in port:
        hostname, port = authority, ""
    _, dot, domain = hostname.partition(".")
    if not dot or not domain.startswith("vault."):
        return "https://vault.azure.net"
    if domain.endswith("localhost") and port and port != "443":
        return f"https://{domain}:{port}"
    return f"https://{domain}"
