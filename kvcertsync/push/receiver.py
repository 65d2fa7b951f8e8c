"""The Event Grid webhook: an aiohttp handler (EventGridReceiver) and a server for it (PushServer).

Every request must carry the shared key (``?code=KEY``, as Event Grid users put it in the webhook
URL, or the ``X-Kvcertsync-Key`` header), compared in constant time; without it the answer is a
bare 401. Then OPTIONS is the CloudEvents 1.0 abuse-protection handshake, and POST carries
events: Event Grid's subscription validation is answered, Key Vault events go to a
PushRefresher, and the answer comes at once (Event Grid retries slow answers), before any poll.
"""

from __future__ import annotations

import hmac
import json
import logging
import ssl
from types import TracebackType
from typing import Any, Final, Self

import anyio
from aiohttp import web

from kvcertsync.errors import KvCertSyncError
from kvcertsync.push.events import EventBatch, MalformedEvents, Message, parse_events
from kvcertsync.push.refresher import PushRefresher, Refreshable

__all__ = [
    "KEY_HEADER",
    "KEY_QUERY",
    "MAX_BODY",
    "MIN_KEY_LENGTH",
    "EventGridReceiver",
    "PushServer",
    "PushServerError",
]

logger = logging.getLogger(__name__)

#: The query parameter that carries the shared key (Event Grid users write ``?code=``).
KEY_QUERY: Final = "code"
#: The header that may carry the shared key instead (an Event Grid delivery property).
KEY_HEADER: Final = "X-Kvcertsync-Key"
#: The largest body accepted: Event Grid batches at most 1 MiB (64 KiB per event by default).
MAX_BODY: Final = 1024 * 1024
#: The shortest shared key accepted.
MIN_KEY_LENGTH: Final = 16
#: How long a client may take to send its body.
BODY_TIMEOUT: Final = 10.0

_JSON_TYPES = frozenset(
    {
        "application/json",
        "application/cloudevents+json",
        "application/cloudevents-batch+json",
        "text/plain",
        "application/octet-stream",  # aiohttp's name for "no Content-Type"
    }
)
_ALLOW = "OPTIONS, POST"
# CloudEvents binary mode: attributes in ce-* headers, the data alone in the body.
_CE_HEADERS = ("specversion", "type", "source", "id", "subject", "time")


class PushServerError(KvCertSyncError):
    """The push receiver could not start (a bad key, an address in use)."""


class _TooLarge(Exception):
    pass


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class EventGridReceiver:
    """An aiohttp handler for Event Grid deliveries; ``handle`` is the handler.

    Mount it on your own application (``app.router.add_route("*", "/eventgrid",
    receiver.handle)``) or serve it alone with PushServer. ``refresher`` must be running.
    """

    def __init__(self, refresher: PushRefresher, *, key: str, max_body: int = MAX_BODY) -> None:
        if not isinstance(key, str) or len(key.strip()) < MIN_KEY_LENGTH:
            raise PushServerError(
                f"the push receiver's shared key must be at least {MIN_KEY_LENGTH} characters"
            )
        if max_body < 1:
            raise ValueError("max_body must be positive")
        self.refresher = refresher
        self.max_body = max_body
        self._key = key.strip().encode("utf-8")

    def __repr__(self) -> str:
        return f"<EventGridReceiver max_body={self.max_body}>"

    def authorized(self, request: web.BaseRequest) -> bool:
        """True when the request carries the shared key (query or header)."""
        offered = [request.query.get(KEY_QUERY), request.headers.get(KEY_HEADER)]
        # Every candidate is compared, so timing says nothing about which one was there.
        results = [
            hmac.compare_digest(value.encode("utf-8"), self._key) for value in offered if value
        ]
        return any(results)

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Answer one request from Event Grid (or a relay that forwards its deliveries)."""
        if not self.authorized(request):
            # Nothing more: not which part was wrong, not whether a key was there at all.
            return web.Response(status=401, text="unauthorized")
        if request.method == "OPTIONS":
            return self._abuse_protection(request)
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": _ALLOW})
        if request.content_type not in _JSON_TYPES:
            return _error(
                415,
                f"Content-Type {request.content_type!r} is not JSON: send application/json or "
                "application/cloudevents(-batch)+json",
            )
        try:
            with anyio.fail_after(BODY_TIMEOUT):
                body = await _read_body(request, self.max_body)
        except _TooLarge:
            return _error(413, f"the body is larger than {self.max_body} bytes")
        except TimeoutError:
            return _error(408, f"the body did not arrive within {BODY_TIMEOUT:g} s")
        try:
            batch = parse_events(_message(request, body), content_type=request.content_type)
        except MalformedEvents as error:
            logger.warning("push: request refused (400): %s", error)
            return _error(400, str(error))
        return self._accept(batch)

    def _accept(self, batch: EventBatch) -> web.Response:
        refreshing = self.refresher.submit(batch)
        if batch.ignored:
            logger.debug("push: ignored %s", ", ".join(sorted(set(batch.ignored))))
        if batch.validation_code is not None:
            logger.info("push: answered Event Grid's subscription validation")
            return web.json_response({"validationResponse": batch.validation_code})
        return web.json_response({"received": len(batch), "refreshing": len(refreshing)})

    @staticmethod
    def _abuse_protection(request: web.BaseRequest) -> web.Response:
        """CloudEvents 1.0 webhook validation: allow the origin that asks, at any rate."""
        origin = request.headers.get("WebHook-Request-Origin", "").strip()
        if not origin:
            return _error(
                400,
                "OPTIONS is the CloudEvents webhook validation: it needs a WebHook-Request-Origin "
                "header",
            )
        headers = {"Allow": _ALLOW, "WebHook-Allowed-Origin": origin}
        # Any rate will do: a storm of events is coalesced into one refresh per certificate.
        headers["WebHook-Allowed-Rate"] = "*"
        logger.info("push: answered the CloudEvents webhook validation of %s", origin)
        return web.Response(status=200, headers=headers)


async def _read_body(request: web.BaseRequest, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _message(request: web.BaseRequest, body: bytes) -> Message:
    """The body, or in CloudEvents binary mode the event rebuilt from its ce-* headers."""
    if "ce-specversion" not in request.headers:
        return body
    event: dict[str, Any] = {
        name: request.headers[f"ce-{name}"]
        for name in _CE_HEADERS
        if f"ce-{name}" in request.headers
    }
    try:
        event["data"] = json.loads(body) if body else None
    except ValueError as error:
        raise MalformedEvents(f"the CloudEvent's data is not valid JSON: {error}") from None
    return event


class PushServer:
    """Serves an EventGridReceiver for ``sync`` on ``host:port`` (use in ``async with``).

    ``ssl_context`` serves HTTPS (Event Grid delivers only to HTTPS URLs: without it, put a
    TLS-terminating proxy in front). ``port=0`` picks a free port: see ``port``.
    """

    def __init__(
        self,
        sync: Refreshable,
        *,
        key: str,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/",
        ssl_context: ssl.SSLContext | None = None,
        max_body: int = MAX_BODY,
    ) -> None:
        if not path.startswith("/"):
            raise ValueError(f"path {path!r} must start with /")
        self.refresher = PushRefresher(sync)
        self.receiver = EventGridReceiver(self.refresher, key=key, max_body=max_body)
        self.host = host
        self.path = path
        self._want_port = port
        self._ssl = ssl_context
        self._runner: web.AppRunner | None = None
        self._port: int | None = None

    def __repr__(self) -> str:
        where = self.url if self._port is not None else "stopped"
        return f"<PushServer {where}>"

    @property
    def port(self) -> int:
        """The port it listens on."""
        if self._port is None:
            raise RuntimeError("PushServer is not running")
        return self._port

    @property
    def url(self) -> str:
        """Where it listens (without the key: add ``?code=KEY`` for the webhook URL)."""
        scheme = "https" if self._ssl is not None else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{self.path}"

    async def __aenter__(self) -> Self:
        """Start the refresher and listen."""
        await self.refresher.__aenter__()
        try:
            app = web.Application()
            app.router.add_route("*", self.path, self.receiver.handle)
            # No access log: the webhook URL carries the key in its query string.
            runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            self._runner = runner
            site = web.TCPSite(runner, self.host, self._want_port, ssl_context=self._ssl)
            try:
                await site.start()
            except OSError as error:
                raise PushServerError(
                    f"cannot listen on {self.host}:{self._want_port}: {error.strerror or error}"
                ) from None
            self._port = runner.addresses[0][1]
        except BaseException:
            await self._close()
            await self.refresher.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop listening (open connections closed) and cancel refreshes in flight."""
        try:
            await self._close()
        finally:
            await self.refresher.__aexit__(exc_type, exc, tb)

    async def _close(self) -> None:
        runner, self._runner = self._runner, None
        self._port = None
        if runner is not None:
            await runner.cleanup()
