"""The emulator's admin routes (``/_emulator/...`` on localhost): its Python controls over HTTP.

There is no authentication: the emulator listens on 127.0.0.1 only, and these routes answer only
requests addressed to ``localhost`` or ``127.0.0.1``, never to a vault host.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvcertsync.emulator._bulk import bulk_load
from kvcertsync.emulator._controls import CONTROL_ROUTES, control_route
from kvcertsync.emulator._json import json_object
from kvcertsync.emulator.store import VaultError
from kvcertsync.emulator.webhooks import WebhookError
from kvcertsync.errors import MaterialError
from kvcertsync.material import PKCS12_CONTENT_TYPE

if TYPE_CHECKING:
    from kvcertsync.emulator.server import LocalKeyVault

__all__ = ["AdminApi", "AdminError"]

logger = logging.getLogger(__name__)

PREFIX = "/_emulator/"


class AdminError(Exception):
    """A malformed admin request (answered 400, or ``status``)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    value = body.get(key, default)
    wanted = kind if isinstance(kind, tuple) else (kind,)
    # JSON true is a Python int too: only accept a bool where a bool is asked for.
    wrong_bool = isinstance(value, bool) and bool not in wanted
    if value is not None and value is not default and (wrong_bool or not isinstance(value, kind)):
        raise AdminError(f"'{key}' has the wrong type")
    return value


class AdminApi:
    """Dispatches ``/_emulator/...`` requests to a LocalKeyVault's Python controls."""

    def __init__(self, kv: LocalKeyVault) -> None:
        self._kv = kv

    async def handle(self, request: web.BaseRequest) -> web.Response:
        """Answer one admin request."""
        parts = request.path[len(PREFIX) :].split("/")
        try:
            result = await self._route(request, parts)
        except AdminError as error:
            return web.json_response({"error": str(error)}, status=error.status)
        except VaultError as error:
            return web.json_response(error.body(), status=error.status)
        except (MaterialError, ValueError, TypeError) as error:
            return web.json_response({"error": str(error)}, status=400)
        logger.debug("admin %s %s", request.method, request.path)
        return web.json_response(result)

    async def _route(self, request: web.BaseRequest, parts: list[str]) -> Any:
        kv = self._kv
        method = request.method
        head, rest = parts[0], parts[1:]
        if head == "stats" and method == "GET":
            return {
                "port": kv.port,
                "imdsPort": kv.imds_port,
                "caFile": kv.ca_file,
                "requestCounts": kv.request_counts,
                "responseCounts": kv.response_counts,
                "openConnections": kv.open_connections,
                "imdsRequests": kv.imds_requests,
                "vaults": kv.vaults(),
                "faults": kv.faults(),
            }
        if head == "requests" and method == "GET":
            return [
                {
                    "method": r.method,
                    "vault": r.vault,
                    "path": r.path,
                    "status": r.status,
                    "fault": r.fault,
                    "time": r.time,
                    "peerPort": r.peer_port,
                }
                for r in kv.requests
            ]
        if head == "ca" and method == "GET":
            return {"caFile": kv.ca_file, "pem": kv.ca_pem.decode("ascii")}
        if head == "faults":
            if method == "GET":
                return kv.faults()
            if method == "DELETE":
                kv.reset_faults()
                return kv.faults()
            if method == "POST":
                self._set_faults(await self._body(request))
                return kv.faults()
        if head == "bulk" and method == "POST" and not rest:
            return await bulk_load(kv, await self._body(request), AdminError)
        if head == "webhooks":
            return await self._webhook_route(request, rest)
        if head in CONTROL_ROUTES and not rest:
            return await control_route(kv, request, head, AdminError)
        if len(rest) >= 2 and head in ("secrets", "certificates", "rotate", "disable", "enable"):
            return await self._secret_route(request, head, rest)
        raise AdminError(f"no admin route {method} {request.path}", status=404)

    async def _secret_route(self, request: web.BaseRequest, head: str, rest: list[str]) -> Any:
        kv = self._kv
        method = request.method
        vault, name = rest[0], rest[1]
        version = rest[2] if len(rest) > 2 and rest[2] else None
        if head == "secrets" and method == "GET":
            records = [kv.secret(vault, name, v) for v in kv.versions(vault, name)]
            return {
                "name": name,
                "versions": [
                    {
                        "version": r.version,
                        "enabled": r.enabled,
                        "contentType": r.content_type,
                        "managed": r.managed,
                    }
                    for r in records
                ],
            }
        if head == "secrets" and method == "POST":
            body = await self._body(request)
            value = body.get("value")
            if not isinstance(value, str):
                raise AdminError("'value' (a string) is required")
            tags = _field(body, "tags", dict, None)
            new = kv.set_secret(
                vault,
                name,
                value,
                _field(body, "contentType", str, None),
                enabled=_field(body, "enabled", bool, True),
                not_before=_field(body, "nbf", (int, float), None),
                expires=_field(body, "exp", (int, float), None),
                tags=tags,
            )
            return {"version": new}
        if head == "secrets" and method == "DELETE":
            kv.delete(vault, name)
            if request.query.get("purge", "").lower() in ("1", "true", "yes"):
                kv.purge(vault, name)
            return {"deleted": name}
        if head == "certificates" and method == "POST":
            body = await self._body(request)
            dns_names = _field(body, "dnsNames", list, None) or [f"{name}.example.com"]
            days = _field(body, "days", (int, float), 90)
            key = _field(body, "key", str, "ec")
            if key not in ("ec", "rsa"):
                raise AdminError("'key' must be 'ec' or 'rsa'")
            content_type = _field(body, "contentType", str, PKCS12_CONTENT_TYPE)
            material = await asyncio.to_thread(
                kv.authority.issue, [str(n) for n in dns_names], key=key, days=days
            )
            new = kv.import_certificate(vault, name, material, content_type)
            return {"version": new, "thumbprint": material.thumbprint}
        if head == "rotate" and method == "POST":
            body = await self._body(request)
            content_type = _field(body, "contentType", str, None)
            new = await asyncio.to_thread(kv.rotate, vault, name, content_type=content_type)
            return {"version": new}
        if head in ("disable", "enable") and method == "POST":
            action: Callable[[str, str, str | None], None] = (
                kv.disable if head == "disable" else kv.enable
            )
            action(vault, name, version)
            return {"name": name, "version": version or kv.versions(vault, name)[-1]}
        raise AdminError(f"no admin route {method} {request.path}", status=404)

    async def _webhook_route(self, request: web.BaseRequest, rest: list[str]) -> Any:
        kv = self._kv
        method = request.method
        if not rest or rest == [""]:
            if method == "GET":
                return [hook.describe() for hook in kv.webhooks]
            if method == "POST":
                body = await self._body(request)
                url = body.get("url")
                if not isinstance(url, str):
                    raise AdminError("'url' (a string) is required")
                try:
                    hook = await kv.add_webhook(
                        url,
                        schema=_field(body, "schema", str, "eventgrid"),
                        event_types=_field(body, "eventTypes", list, None),
                        max_attempts=_field(body, "maxAttempts", int, 5),
                        ca_file=_field(body, "caFile", str, None),
                    )
                except WebhookError as error:
                    raise AdminError(str(error)) from None
                return hook.describe()
        elif len(rest) == 1 and method == "DELETE":
            try:
                kv.remove_webhook(rest[0])
            except KeyError:
                raise AdminError(f"no webhook {rest[0]!r}", status=404) from None
            return {"removed": rest[0]}
        raise AdminError(f"no admin route {method} {request.path}", status=404)

    def _set_faults(self, body: dict[str, Any]) -> None:
        kv = self._kv
        known = {"throttle", "fail", "latency", "drop", "imds"}
        unknown = set(body) - known
        if unknown:
            raise AdminError(f"unknown fault kinds: {sorted(unknown)}; known: {sorted(known)}")
        for kind in sorted(body):
            specs = body[kind] if isinstance(body[kind], list) else [body[kind]]
            for spec in specs:
                if not isinstance(spec, dict):
                    raise AdminError(f"'{kind}' must be an object or a list of objects")
                vault = _field(spec, "vault", str, None)
                if kind == "throttle":
                    limit = _field(spec, "limit", int, None)
                    if limit is None:
                        raise AdminError("throttle needs 'limit'")
                    kv.throttle(
                        vault,
                        limit=limit,
                        window=_field(spec, "window", (int, float), 10.0),
                        retry_after=_field(spec, "retryAfter", (bool, int, float), True),
                    )
                elif kind == "fail":
                    kv.fail(
                        vault,
                        _field(spec, "status", int, 503),
                        _field(spec, "times", int, 1),
                        code=_field(spec, "code", str, None),
                        inner_code=_field(spec, "innerCode", str, None),
                        message=_field(spec, "message", str, None),
                    )
                elif kind == "latency":
                    kv.latency(_field(spec, "seconds", (int, float), 0.0), vault)
                elif kind == "drop":
                    kv.drop_connections(_field(spec, "times", int, 1), vault)
                else:
                    status = _field(spec, "status", int, None)
                    if status is None:
                        raise AdminError("imds needs 'status'")
                    kv.fail_imds(status, _field(spec, "times", int, 1))

    @staticmethod
    async def _body(request: web.BaseRequest) -> dict[str, Any]:
        return await json_object(request, AdminError)
