"""Event Grid for the emulator: Key Vault events delivered to registered webhooks.

When a secret gets a new version, each webhook registered for that event type receives it, as
Event Grid delivers: one event per request, in the Event Grid schema (a JSON array) or as a
CloudEvent 1.0 (``application/cloudevents+json``), retried with a short bounded backoff on a
connection error, a timeout, 408, 429 or 5xx. Registration first does Event Grid's validation
handshake for the schema (the SubscriptionValidationEvent, or the CloudEvents OPTIONS request).
Deliveries run in tasks on the emulator's loop, one queue per webhook, so the vault's request
handling never waits for a receiver. Webhook URLs carry keys: they are shown with query values
hidden, everywhere.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import aiohttp
import attrs

__all__ = [
    "DEFAULT_EVENT_TYPES",
    "DeliveryRecord",
    "EventHandler",
    "Webhook",
    "WebhookError",
    "Webhooks",
    "redact_url",
]

logger = logging.getLogger(__name__)

Schema = Literal["eventgrid", "cloudevents"]

SECRET_NEW_VERSION: Final = "Microsoft.KeyVault.SecretNewVersionCreated"  # noqa: S105
CERTIFICATE_NEW_VERSION: Final = "Microsoft.KeyVault.CertificateNewVersionCreated"
#: What a webhook gets unless it names its event types.
DEFAULT_EVENT_TYPES: Final = frozenset({SECRET_NEW_VERSION, CERTIFICATE_NEW_VERSION})
VALIDATION_EVENT: Final = "Microsoft.EventGrid.SubscriptionValidationEvent"
#: The origin Event Grid names in the CloudEvents validation request.
ORIGIN: Final = "eventgrid.azure.net"
#: Waits between attempts (the last repeats): 5 attempts within about 4 s.
RETRY_DELAYS: Final = (0.1, 0.3, 1.0, 2.5)
#: One attempt's longest wait for an answer.
ATTEMPT_TIMEOUT: Final = 5.0
# Events waiting for one webhook beyond this are dropped (and logged): a dead receiver must not
# grow the emulator without bound.
_QUEUE_LIMIT: Final = 10_000
_SUBSCRIPTION: Final = "00000000-0000-0000-0000-000000000000"
_RESOURCE_GROUP: Final = "kvcertsync-emulator"


class WebhookError(Exception):
    """A webhook could not be registered: bad arguments, or it failed the validation handshake."""


def redact_url(url: str) -> str:
    """``url`` with every query value replaced by ``***`` (webhook keys travel in the query)."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    hidden = urlencode([(key, "***") for key, _ in parse_qsl(parts.query, keep_blank_values=True)])
    return urlunsplit(parts._replace(query=hidden.replace("%2A", "*")))


@attrs.frozen
class DeliveryRecord:
    """How delivering one event to one webhook ended (no bodies, no keys)."""

    event_type: str
    name: str
    version: str
    #: The last answer's HTTP status; None when no answer came (connection error, timeout).
    status: int | None
    attempts: int
    delivered: bool
    error: str | None = None
    time: float = attrs.field(factory=time.time, eq=False)


#: A Python destination: gets each event as a JSON-ready dict, like Event Grid's queue handlers.
EventHandler = Callable[[dict[str, Any]], Awaitable[object]]


@attrs.define(eq=False, repr=False)
class Webhook:
    """A registered webhook (or Python event handler) and how its deliveries went."""

    id: str
    #: The webhook URL (it may carry a key: show it with redact_url); None for a handler.
    url: str | None
    schema: Schema
    event_types: frozenset[str]
    #: Attempts per event, the first included (Event Grid's max delivery attempts).
    max_attempts: int = 5
    ssl_context: ssl.SSLContext | None = None
    handler: EventHandler | None = None
    #: Events delivered (a 2xx answer).
    delivered: int = 0
    #: Events given up on (attempts used up, or a 4xx answer that is no reason to retry).
    failed: int = 0
    #: Events dropped because too many were waiting.
    dropped: int = 0
    #: The most recent deliveries, oldest first.
    history: collections.deque[DeliveryRecord] = attrs.field(
        factory=lambda: collections.deque(maxlen=1000)
    )
    queue: asyncio.Queue[dict[str, Any]] = attrs.field(factory=lambda: asyncio.Queue(_QUEUE_LIMIT))
    worker: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        """Where events go, safe to show: the URL with its query values hidden, or the handler."""
        if self.url is not None:
            return redact_url(self.url)
        return f"handler {getattr(self.handler, '__qualname__', repr(self.handler))}"

    def __repr__(self) -> str:
        return f"<Webhook {self.id} {self.schema} {self.target}>"

    def describe(self) -> dict[str, Any]:
        """JSON-ready facts (the URL with its query values hidden)."""
        return {
            "id": self.id,
            "url": self.target,
            "maxAttempts": self.max_attempts,
            "schema": self.schema,
            "eventTypes": sorted(self.event_types),
            "delivered": self.delivered,
            "failed": self.failed,
            "dropped": self.dropped,
            "pending": self.queue.qsize(),
        }


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _topic(vault: str) -> str:
    return (
        f"/subscriptions/{_SUBSCRIPTION}/resourceGroups/{_RESOURCE_GROUP}"
        f"/providers/Microsoft.KeyVault/vaults/{vault}"
    )


def _retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


class Webhooks:
    """The webhooks of one emulator, and the tasks that deliver to them."""

    def __init__(
        self, *, retry_delays: Iterable[float] = RETRY_DELAYS, timeout: float = ATTEMPT_TIMEOUT
    ) -> None:
        self.retry_delays = tuple(retry_delays)
        self.timeout = timeout
        self._hooks: dict[str, Webhook] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._in_flight = 0

    # ------------------------------------------------------------------ registration

    def registered(self) -> list[Webhook]:
        """The registered webhooks, in registration order."""
        with self._lock:
            return list(self._hooks.values())

    async def register(
        self,
        url: str,
        *,
        schema: Schema = "eventgrid",
        event_types: Iterable[str] | None = None,
        max_attempts: int = 5,
        ca_file: str | None = None,
        ca_pem: bytes | None = None,
    ) -> Webhook:
        """Validate ``url`` as Event Grid does for ``schema``, then deliver events to it.

        An https URL is verified against the system's CAs plus ``ca_file`` and ``ca_pem``.
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise WebhookError(f"webhook URL {redact_url(url)!r} must be http(s)://HOST[:PORT]/...")
        context = None
        if parts.scheme == "https":
            context = ssl.create_default_context()
            if ca_pem is not None:
                context.load_verify_locations(cadata=ca_pem.decode("ascii"))
            if ca_file is not None:
                context.load_verify_locations(cafile=ca_file)
        hook = self._new(url, None, schema, event_types, max_attempts)
        hook.ssl_context = context
        await self._validate(hook)
        return self._start(hook)

    async def register_handler(
        self,
        handler: EventHandler,
        *,
        schema: Schema = "eventgrid",
        event_types: Iterable[str] | None = None,
        max_attempts: int = 5,
    ) -> Webhook:
        """Deliver events to ``await handler(event)`` (a raise is a failed attempt, retried)."""
        if not callable(handler):
            raise WebhookError(f"the event handler must be an async callable, not {handler!r}")
        return self._start(self._new(None, handler, schema, event_types, max_attempts))

    def _new(
        self,
        url: str | None,
        handler: EventHandler | None,
        schema: Schema,
        event_types: Iterable[str] | None,
        max_attempts: int,
    ) -> Webhook:
        if schema not in ("eventgrid", "cloudevents"):
            raise WebhookError(f"schema {schema!r} must be 'eventgrid' or 'cloudevents'")
        types = DEFAULT_EVENT_TYPES if event_types is None else frozenset(event_types)
        wrong = sorted(
            repr(t)
            for t in types
            if not isinstance(t, str) or not t.startswith("Microsoft.KeyVault.")
        )
        if not types or wrong:
            raise WebhookError(
                f"event types must be Microsoft.KeyVault.* names, not {', '.join(wrong) or 'none'}"
            )
        if isinstance(max_attempts, bool) or not isinstance(max_attempts, int):
            raise WebhookError(f"max_attempts must be a whole number, not {max_attempts!r}")
        if not 1 <= max_attempts <= 30:
            raise WebhookError(
                f"max_attempts must be between 1 and 30 (as Event Grid), not {max_attempts}"
            )
        self._loop = asyncio.get_running_loop()
        return Webhook(uuid.uuid4().hex[:12], url, schema, types, max_attempts, handler=handler)

    def _start(self, hook: Webhook) -> Webhook:
        hook.worker = asyncio.create_task(self._deliver_all(hook), name=f"webhook {hook.id}")
        with self._lock:
            self._hooks[hook.id] = hook
        logger.info("webhook %s registered: %s (%s)", hook.id, hook.target, hook.schema)
        return hook

    def remove(self, webhook_id: str) -> None:
        """Stop delivering to a webhook (events still queued for it are dropped)."""
        with self._lock:
            hook = self._hooks.pop(webhook_id, None)
        if hook is None:
            raise KeyError(f"no webhook {webhook_id!r}")
        if hook.worker is not None:
            self._call(hook.worker.cancel)

    async def aclose(self) -> None:
        """Stop every delivery and close the connections."""
        with self._lock:
            hooks, self._hooks = list(self._hooks.values()), {}
        for hook in hooks:
            if hook.worker is not None:
                hook.worker.cancel()
        for hook in hooks:
            if hook.worker is not None:
                await asyncio.gather(hook.worker, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()
        self._in_flight = 0
        self._idle.set()

    async def wait_idle(self) -> None:
        """Return once every event published so far is delivered or given up on."""
        while not self._idle.is_set():
            await self._idle.wait()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _validate(self, hook: Webhook) -> None:
        assert hook.url is not None
        where = hook.target
        try:
            if hook.schema == "eventgrid":
                code = str(uuid.uuid4()).upper()
                event = {
                    "id": str(uuid.uuid4()),
                    "topic": _topic("validation"),
                    "subject": "",
                    "data": {"validationCode": code},
                    "eventType": VALIDATION_EVENT,
                    "eventTime": _now(),
                    "metadataVersion": "1",
                    "dataVersion": "2",
                }
                async with self._client().post(
                    hook.url,
                    data=json.dumps([event]),
                    headers={
                        "Content-Type": "application/json; charset=utf-8",
                        "aeg-event-type": "SubscriptionValidation",
                    },
                    ssl=hook.ssl_context or True,
                ) as response:
                    status = response.status
                    text = await response.text()
                if status != 200:
                    raise WebhookError(f"webhook {where} failed validation: answered {status}")
                try:
                    answer = json.loads(text).get("validationResponse")
                except (ValueError, AttributeError):
                    answer = None
                if answer != code:
                    raise WebhookError(
                        f"webhook {where} failed validation: the answer did not hold "
                        '{"validationResponse": <the validationCode sent>}'
                    )
            else:
                async with self._client().options(
                    hook.url,
                    headers={"WebHook-Request-Origin": ORIGIN, "WebHook-Request-Rate": "120"},
                    ssl=hook.ssl_context or True,
                ) as response:
                    status = response.status
                    allowed = response.headers.get("WebHook-Allowed-Origin", "")
                if not 200 <= status < 300:
                    raise WebhookError(f"webhook {where} failed validation: answered {status}")
                if allowed.strip() not in (ORIGIN, "*"):
                    raise WebhookError(
                        f"webhook {where} failed validation: WebHook-Allowed-Origin is "
                        f"{allowed!r}, not {ORIGIN!r} or '*'"
                    )
        except (aiohttp.ClientError, TimeoutError) as error:
            reason = type(error).__name__ if isinstance(error, TimeoutError) else str(error)
            raise WebhookError(f"webhook {where} failed validation: {reason}") from None

    # ------------------------------------------------------------------ publishing

    def publish(
        self,
        vault: str,
        vault_url: str,
        name: str,
        version: str,
        *,
        certificate: bool,
        not_before: int | None,
        expires: int | None,
    ) -> None:
        """Queue the new-version events of one secret version (from any thread; never waits)."""
        with self._lock:
            hooks = list(self._hooks.values())
        loop = self._loop
        if not hooks or loop is None:
            return
        kinds = [("Secret", "secrets")]
        if certificate:
            # A certificate's new version is a new version of its secret too.
            kinds.insert(0, ("Certificate", "certificates"))
        events = []
        for object_type, collection in kinds:
            data: dict[str, Any] = {
                "Id": f"{vault_url}/{collection}/{name}/{version}",
                "VaultName": vault,
                "ObjectType": object_type,
                "ObjectName": name,
                "Version": version,
            }
            if not_before is not None:
                data["NBF"] = not_before
            if expires is not None:
                data["EXP"] = expires
            events.append(
                {
                    "id": str(uuid.uuid4()),
                    "topic": _topic(vault),
                    "subject": name,
                    "eventType": f"Microsoft.KeyVault.{object_type}NewVersionCreated",
                    "eventTime": _now(),
                    "data": data,
                    "dataVersion": "1",
                    "metadataVersion": "1",
                }
            )
        self._call(lambda: self._enqueue(hooks, events))

    def _call(self, action: Callable[[], object]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            action()
        else:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing to do
                loop.call_soon_threadsafe(action)

    def _enqueue(self, hooks: list[Webhook], events: list[dict[str, Any]]) -> None:
        for hook in hooks:
            if hook.worker is None or hook.worker.done():
                continue
            for event in events:
                if event["eventType"] not in hook.event_types:
                    continue
                try:
                    hook.queue.put_nowait(event)
                except asyncio.QueueFull:
                    hook.dropped += 1
                    logger.warning(
                        "webhook %s: %d events waiting, one dropped", hook.id, hook.queue.qsize()
                    )
                    continue
                self._in_flight += 1
                self._idle.clear()

    async def _deliver_all(self, hook: Webhook) -> None:
        try:
            while True:
                event = await hook.queue.get()
                try:
                    record = await self._deliver(hook, event)
                finally:
                    self._settled(1)
                hook.history.append(record)
                if record.delivered:
                    hook.delivered += 1
                else:
                    hook.failed += 1
                    logger.warning(
                        "webhook %s: gave up on %s for %s after %d attempts: %s",
                        hook.id,
                        record.event_type,
                        record.name,
                        record.attempts,
                        record.error,
                    )
        finally:
            # Removed or closing: what still waits will never be delivered.
            left = 0
            while not hook.queue.empty():
                hook.queue.get_nowait()
                left += 1
            self._settled(left)

    def _settled(self, count: int) -> None:
        self._in_flight = max(0, self._in_flight - count)
        if not self._in_flight:
            self._idle.set()

    async def _deliver(self, hook: Webhook, event: Mapping[str, Any]) -> DeliveryRecord:
        status: int | None = None
        error: str | None = None
        attempts = 0
        while attempts < hook.max_attempts:
            if attempts:
                # A short, bounded backoff: 0.1, 0.3, 1, 2.5, 2.5... s.
                await asyncio.sleep(self.retry_delays[min(attempts, len(self.retry_delays)) - 1])
            attempts += 1
            status, error = await self._attempt(hook, event, attempts)
            if error is None or (status is not None and not _retryable(status)):
                break
        data = event["data"]
        return DeliveryRecord(
            event_type=str(event["eventType"]),
            name=str(data["ObjectName"]),
            version=str(data["Version"]),
            status=status,
            attempts=attempts,
            delivered=error is None,
            error=error,
        )

    async def _attempt(
        self, hook: Webhook, event: Mapping[str, Any], attempt: int
    ) -> tuple[int | None, str | None]:
        """One try: (HTTP status or None, None when delivered or why not)."""
        document, content_type = self._encode(hook, event)
        if hook.handler is not None:
            try:
                await hook.handler(document)
            except Exception as failure:
                return None, f"the handler raised {type(failure).__name__}"
            return None, None
        assert hook.url is not None
        headers = {
            "Content-Type": content_type,
            "aeg-event-type": "Notification",
            "aeg-subscription-name": f"KVCERTSYNC-{hook.id.upper()}",
            "aeg-delivery-count": str(attempt - 1),
            "aeg-data-version": "1",
            "aeg-metadata-version": "1",
        }
        body = json.dumps([document] if hook.schema == "eventgrid" else document)
        try:
            async with self._client().post(
                hook.url, data=body.encode("utf-8"), headers=headers, ssl=hook.ssl_context or True
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as failure:
            return None, type(failure).__name__
        return status, None if 200 <= status < 300 else f"answered {status}"

    @staticmethod
    def _encode(hook: Webhook, event: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
        """The event in the webhook's schema, and its Content-Type."""
        if hook.schema == "eventgrid":
            return dict(event), "application/json; charset=utf-8"
        cloud_event = {
            "specversion": "1.0",
            "id": event["id"],
            "source": event["topic"],
            "subject": event["subject"],
            "type": event["eventType"],
            "time": event["eventTime"],
            "datacontenttype": "application/json",
            "data": event["data"],
        }
        return cloud_event, "application/cloudevents+json; charset=utf-8"
