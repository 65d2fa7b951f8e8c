"""A local fake of the few Azure Storage Queue REST operations a queue reader needs.

Create queue (PUT), Put Message (POST), Get Messages (GET) and Delete Message (DELETE), with the
service's XML bodies, visibility timeouts, pop receipts and error codes, and Shared Key
authorization checked as the service checks it (REST docs: "Authorize with Shared Key"), so the
real azure-storage-queue SDK runs against it unchanged. Everything else answers 501.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from email.utils import formatdate
from urllib.parse import unquote
from xml.etree import ElementTree

import attrs
from aiohttp import web

ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key: public, for local use only.
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_SIGNED_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


@attrs.define
class _Message:
    id: str
    text: str
    inserted: float
    expires: float
    visible_at: float
    dequeue_count: int = 0
    pop_receipt: str = ""


def _http_date(when: float) -> str:
    return formatdate(when, usegmt=True)


def string_to_sign(request: web.Request, account: str) -> str:
    """The Shared Key string-to-sign of a request (Blob, Queue and File services, 2009-09-19+)."""
    headers = {name.lower(): value for name, value in request.headers.items()}
    if headers.get("content-length") == "0":
        headers["content-length"] = ""
    lines = [request.method, *(headers.get(name, "") for name in _SIGNED_HEADERS)]
    canonical_headers = "".join(
        f"{name}:{value.strip()}\n"
        for name, value in sorted(headers.items())
        if name.startswith("x-ms-")
    )
    resource = f"/{account}{request.raw_path.split('?', 1)[0]}"
    query: dict[str, list[str]] = {}
    for name, value in request.query.items():
        query.setdefault(name.lower(), []).append(unquote(value))
    for name in sorted(query):
        resource += f"\n{name}:{','.join(sorted(query[name]))}"
    return "\n".join(lines) + "\n" + canonical_headers + resource


class StorageQueueFake:
    """``async with StorageQueueFake() as fake:`` then ``fake.connection_string``."""

    def __init__(self) -> None:
        self.queues: dict[str, list[_Message]] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def connection_string(self) -> str:
        """A connection string for the SDK, Azurite-style (path-style account, plain HTTP)."""
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"QueueEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def aclose(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        response = await self._answer(request)
        response.headers["x-ms-request-id"] = str(uuid.uuid4())
        response.headers["x-ms-version"] = request.headers.get("x-ms-version", "2021-02-12")
        self.requests.append((request.method, request.path, response.status))
        return response

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        body = (
            '<?xml version="1.0" encoding="utf-8"?>'
            f"<Error><Code>{code}</Code><Message>{message}\nRequestId:{uuid.uuid4()}\n"
            f"Time:{time.strftime('%Y-%m-%dT%H:%M:%S.0000000Z', time.gmtime())}</Message></Error>"
        )
        return web.Response(
            status=status,
            body=body.encode(),
            content_type="application/xml",
            headers={"x-ms-error-code": code},
        )

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        account, _, signature = credential.partition(":")
        if scheme != "SharedKey" or account != ACCOUNT:
            return False
        digest = hmac.new(
            base64.b64decode(ACCOUNT_KEY),
            string_to_sign(request, ACCOUNT).encode("utf-8"),
            hashlib.sha256,
        ).digest()
        return hmac.compare_digest(base64.b64encode(digest).decode("ascii"), signature)

    async def _answer(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(
                403,
                "AuthenticationFailed",
                "Server failed to authenticate the request. Make sure the value of Authorization "
                "header is formed correctly including the signature.",
            )
        parts = request.path.strip("/").split("/")
        if parts[:1] != [ACCOUNT] or len(parts) < 2:
            return self._error(
                400, "InvalidUri", "The requested URI does not represent any resource."
            )
        queue = parts[1]
        method = request.method
        if len(parts) == 2 and method == "PUT":
            if queue in self.queues:
                return web.Response(status=204)
            self.queues[queue] = []
            return web.Response(status=201)
        if queue not in self.queues:
            return self._error(404, "QueueNotFound", "The specified queue does not exist.")
        if len(parts) == 3 and parts[2] == "messages":
            if method == "POST":
                return await self._put_message(request, queue)
            if method == "GET":
                return self._get_messages(request, queue)
        if len(parts) == 4 and parts[2] == "messages" and method == "DELETE":
            return self._delete_message(request, queue, parts[3])
        return self._error(501, "NotImplemented", f"{method} {request.path} is not in this fake.")

    async def _put_message(self, request: web.Request, queue: str) -> web.Response:
        try:
            text = ElementTree.fromstring(await request.read()).findtext("MessageText")
        except ElementTree.ParseError:
            text = None
        if text is None:
            return self._error(
                400, "InvalidXmlDocument", "XML specified is not syntactically valid."
            )
        now = time.time()
        ttl = int(request.query.get("messagettl", 7 * 86400))
        message = _Message(
            uuid.uuid4().hex,
            text,
            now,
            now + ttl,
            now + int(request.query.get("visibilitytimeout", 0)),
        )
        message.pop_receipt = base64.b64encode(uuid.uuid4().bytes).decode("ascii")
        self.queues[queue].append(message)
        item = (
            f"<QueueMessage><MessageId>{message.id}</MessageId>"
            f"<InsertionTime>{_http_date(message.inserted)}</InsertionTime>"
            f"<ExpirationTime>{_http_date(message.expires)}</ExpirationTime>"
            f"<PopReceipt>{message.pop_receipt}</PopReceipt>"
            f"<TimeNextVisible>{_http_date(message.visible_at)}</TimeNextVisible></QueueMessage>"
        )
        return self._list(201, item)

    def _get_messages(self, request: web.Request, queue: str) -> web.Response:
        count = int(request.query.get("numofmessages", 1))
        if not 1 <= count <= 32:
            return self._error(400, "OutOfRangeQueryParameterValue", "numofmessages must be 1-32.")
        visibility = int(request.query.get("visibilitytimeout", 30))
        now = time.time()
        self.queues[queue] = [m for m in self.queues[queue] if m.expires > now]
        items = []
        for message in [m for m in self.queues[queue] if m.visible_at <= now][:count]:
            message.dequeue_count += 1
            message.visible_at = now + visibility
            message.pop_receipt = base64.b64encode(uuid.uuid4().bytes).decode("ascii")
            items.append(
                f"<QueueMessage><MessageId>{message.id}</MessageId>"
                f"<InsertionTime>{_http_date(message.inserted)}</InsertionTime>"
                f"<ExpirationTime>{_http_date(message.expires)}</ExpirationTime>"
                f"<PopReceipt>{message.pop_receipt}</PopReceipt>"
                f"<TimeNextVisible>{_http_date(message.visible_at)}</TimeNextVisible>"
                f"<DequeueCount>{message.dequeue_count}</DequeueCount>"
                f"<MessageText>{message.text}</MessageText></QueueMessage>"
            )
        return self._list(200, "".join(items))

    def _delete_message(self, request: web.Request, queue: str, message_id: str) -> web.Response:
        receipt = request.query.get("popreceipt")
        for message in self.queues[queue]:
            if message.id == message_id:
                if message.pop_receipt != receipt:
                    return self._error(
                        400,
                        "PopReceiptMismatch",
                        "The specified pop receipt did not match the pop receipt for a dequeued "
                        "message.",
                    )
                self.queues[queue].remove(message)
                return web.Response(status=204)
        return self._error(404, "MessageNotFound", "The specified message does not exist.")

    @staticmethod
    def _list(status: int, items: str) -> web.Response:
        body = (
            f'<?xml version="1.0" encoding="utf-8"?><QueueMessagesList>{items}</QueueMessagesList>'
        )
        return web.Response(status=status, body=body.encode(), content_type="application/xml")


@asynccontextmanager
async def storage_queue_fake() -> AsyncIterator[StorageQueueFake]:
    """A running StorageQueueFake, stopped on exit."""
    fake = StorageQueueFake()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.aclose()
