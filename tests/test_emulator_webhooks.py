"""The emulator's Event Grid: webhooks validated at registration, events on every new version
(Python controls, the REST API, the admin API), both schemas, retries, never blocking the vault."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anyio
import pytest
from aiohttp import web

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.emulator.webhooks import WebhookError, redact_url
from kvcertsync.push import parse_events

pytestmark = pytest.mark.anyio

KEY = "webhook-key-0123456789abcdef"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Receiver:
    """A webhook on 127.0.0.1 that records what it gets and answers as it is told."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes, str]] = []
        self.statuses: list[int] = []  # answers to give, in order, then 200
        self.validation: Callable[[list[Any]], Any] = lambda body: {
            "validationResponse": body[0]["data"]["validationCode"]
        }
        self.allowed_origin: str | None = None
        self.gate: anyio.Event | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?code={KEY}"

    def notifications(self) -> list[tuple[dict[str, str], Any]]:
        return [
            (headers, json.loads(body))
            for method, headers, body, _ in self.requests
            if method == "POST" and headers.get("aeg-event-type") == "Notification"
        ]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request.method, dict(request.headers), body, request.query_string))
        if request.method == "OPTIONS":
            origin = self.allowed_origin or request.headers.get("WebHook-Request-Origin", "")
            return web.Response(headers={"WebHook-Allowed-Origin": origin})
        if request.headers.get("aeg-event-type") == "SubscriptionValidation":
            return web.json_response(self.validation(json.loads(body)))
        if self.gate is not None:
            await self.gate.wait()
        if self.statuses:
            return web.Response(status=self.statuses.pop(0))
        return web.json_response({})


@pytest.fixture(name="receiver")
async def receiver_fixture() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_route("*", "/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.port = runner.addresses[0][1]
    yield receiver
    if receiver.gate is not None:
        receiver.gate.set()
    await runner.cleanup()


@pytest.fixture(name="kv")
async def kv_fixture() -> AsyncIterator[LocalKeyVault]:
    async with LocalKeyVault() as kv:
        yield kv


async def until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(20):
        while not check():  # noqa: ASYNC110 - another party's state, no event to wait on
            await anyio.sleep(0.01)


async def test_event_grid_schema_validated_then_delivered(
    kv: LocalKeyVault, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    hook = await kv.add_webhook(receiver.url)
    method, headers, body, query = receiver.requests[0]
    assert (method, headers["aeg-event-type"], query) == (
        "POST",
        "SubscriptionValidation",
        f"code={KEY}",
    )
    (validation,) = json.loads(body)
    assert validation["eventType"] == "Microsoft.EventGrid.SubscriptionValidationEvent"
    kv.set_secret("demo", "db-password", "s3cret-value")
    version = kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    await kv.wait_webhooks()
    deliveries = receiver.notifications()
    types = [events[0]["eventType"] for _, events in deliveries]
    assert types == [
        "Microsoft.KeyVault.SecretNewVersionCreated",
        "Microsoft.KeyVault.CertificateNewVersionCreated",
        "Microsoft.KeyVault.SecretNewVersionCreated",
    ]
    headers, events = deliveries[1]
    assert headers["Content-Type"].startswith("application/json")
    assert headers["aeg-delivery-count"] == "0"
    (event,) = events
    assert event["subject"] == "web" and event["topic"].endswith("/Microsoft.KeyVault/vaults/demo")
    assert event["data"]["Id"] == f"https://demo.vault.azure.net/certificates/web/{version}"
    assert event["data"]["VaultName"] == "demo" and event["data"]["Version"] == version
    assert isinstance(event["data"]["EXP"], int) and isinstance(event["data"]["NBF"], int)
    # kvcertsync's own parser reads what the emulator sends.
    (parsed,) = parse_events(json.dumps(events)).events
    assert (parsed.object_name, parsed.version, parsed.object_type) == (
        "web",
        version,
        "Certificate",
    )
    assert (hook.delivered, hook.failed) == (3, 0)
    assert KEY not in repr(hook) and KEY not in json.dumps(hook.describe())
    assert KEY not in caplog.text and "s3cret-value" not in str(receiver.requests)


async def test_cloudevents_schema_and_event_type_filter(
    kv: LocalKeyVault, receiver: Receiver
) -> None:
    await kv.add_webhook(
        receiver.url,
        schema="cloudevents",
        event_types=["Microsoft.KeyVault.CertificateNewVersionCreated"],
    )
    method, headers, _, _ = receiver.requests[0]
    assert method == "OPTIONS" and headers["WebHook-Request-Origin"] == "eventgrid.azure.net"
    kv.set_secret("demo", "plain", "value")  # a plain secret: no certificate event
    kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    await kv.wait_webhooks()
    (post,) = [r for r in receiver.requests if r[0] == "POST"]
    assert post[1]["Content-Type"] == "application/cloudevents+json; charset=utf-8"
    event = json.loads(post[2])
    assert event["specversion"] == "1.0" and event["type"].endswith("CertificateNewVersionCreated")
    assert event["data"]["ObjectName"] == "web"
    (parsed,) = parse_events(post[2], content_type=post[1]["Content-Type"]).events
    assert parsed.schema == "cloudevents"


async def test_a_failed_handshake_refuses_the_webhook(
    kv: LocalKeyVault, receiver: Receiver
) -> None:
    receiver.validation = lambda body: {"validationResponse": "something else"}
    with pytest.raises(WebhookError, match=r"failed validation: the answer did not hold"):
        await kv.add_webhook(receiver.url)
    receiver.allowed_origin = "someone.else"
    with pytest.raises(WebhookError, match=r"WebHook-Allowed-Origin is 'someone\.else'") as caught:
        await kv.add_webhook(receiver.url, schema="cloudevents")
    assert KEY not in str(caught.value) and "code=***" in str(caught.value)
    with pytest.raises(WebhookError, match=r"failed validation: .*Cannot connect"):
        await kv.add_webhook(f"http://127.0.0.1:1/?code={KEY}")
    with pytest.raises(WebhookError, match="schema 'xml'"):
        await kv.add_webhook(receiver.url, schema="xml")  # type: ignore[arg-type]
    with pytest.raises(WebhookError, match=r"Microsoft\.KeyVault\.\* names"):
        await kv.add_webhook(receiver.url, event_types=["Microsoft.Storage.BlobCreated"])
    assert kv.webhooks == []


async def test_retries_with_backoff_then_gives_up(kv: LocalKeyVault, receiver: Receiver) -> None:
    hook = await kv.add_webhook(receiver.url)
    receiver.statuses = [503, 429]  # then 200
    kv.set_secret("demo", "a", "1")
    await kv.wait_webhooks()
    counts = [h["aeg-delivery-count"] for h, _ in receiver.notifications()]
    assert counts == ["0", "1", "2"] and (hook.delivered, hook.failed) == (1, 0)
    assert hook.history[-1].attempts == 3 and hook.history[-1].status == 200
    receiver.statuses = [400]  # a client error is no reason to retry
    kv.set_secret("demo", "a", "2")
    await kv.wait_webhooks()
    assert hook.failed == 1 and hook.history[-1].attempts == 1
    receiver.statuses = [500] * 10
    limited = await kv.add_webhook(receiver.url, max_attempts=2)
    kv.remove_webhook(hook.id)
    kv.set_secret("demo", "a", "3")
    await kv.wait_webhooks()
    assert limited.failed == 1 and limited.history[-1].attempts == 2
    assert limited.history[-1].error == "answered 500"


async def test_deliveries_never_block_the_vault(kv: LocalKeyVault, receiver: Receiver) -> None:
    hook = await kv.add_webhook(receiver.url)
    receiver.gate = anyio.Event()  # the receiver hangs until released
    kv.set_secret("demo", "a", "1")
    await until(lambda: len(receiver.notifications()) == 1)
    # While the delivery hangs, the vault answers and takes writes, from threads too.
    async with (
        aiohttp.ClientSession() as client,
        client.get(
            f"https://127.0.0.1:{kv.port}/_emulator/stats",
            ssl=kv.client_ssl_context(),
            headers=kv.admin_headers,
        ) as r,
    ):
        assert r.status == 200
    await anyio.to_thread.run_sync(kv.set_secret, "demo", "a", "2")
    assert len(kv.versions("demo", "a")) == 2 and hook.delivered == 0
    receiver.gate.set()
    await kv.wait_webhooks()
    assert hook.delivered == 2


async def test_admin_routes_register_list_and_remove(kv: LocalKeyVault, receiver: Receiver) -> None:
    base = f"https://127.0.0.1:{kv.port}/_emulator/webhooks"
    async with aiohttp.ClientSession(headers=kv.admin_headers) as client:
        ssl = kv.client_ssl_context()
        async with client.post(
            base, json={"url": receiver.url, "schema": "cloudevents"}, ssl=ssl
        ) as r:
            assert r.status == 200
            created = await r.json()
        assert created["url"] == f"http://127.0.0.1:{receiver.port}/hook?code=***"
        async with client.post(base, json={"url": receiver.url, "schema": "soap"}, ssl=ssl) as r:
            assert r.status == 400 and "schema 'soap'" in (await r.json())["error"]
        async with client.post(
            f"https://127.0.0.1:{kv.port}/_emulator/secrets/demo/db", json={"value": "x"}, ssl=ssl
        ) as r:
            version = (await r.json())["version"]
        await kv.wait_webhooks()
        async with client.get(base, ssl=ssl) as r:
            (listed,) = await r.json()
        assert listed["delivered"] == 1 and KEY not in json.dumps(listed)
        async with client.delete(f"{base}/{created['id']}", ssl=ssl) as r:
            assert (await r.json()) == {"removed": created["id"]}
        async with client.delete(f"{base}/{created['id']}", ssl=ssl) as r:
            assert r.status == 404
    (post,) = [json.loads(body) for method, _, body, _ in receiver.requests if method == "POST"]
    assert post["data"]["Version"] == version and post["subject"] == "db"


async def test_sdk_writes_through_the_rest_api_are_published(
    kv: LocalKeyVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azure.identity import ManagedIdentityCredential
    from azure.keyvault.secrets import SecretClient

    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", kv.imds_authority)
    seen: list[dict[str, Any]] = []

    async def handler(event: dict[str, Any]) -> None:
        seen.append(event)

    await kv.add_event_handler(handler)

    def write() -> str | None:
        client = SecretClient(
            kv.local_url,
            ManagedIdentityCredential(),
            connection_verify=kv.ca_file,
            verify_challenge_resource=False,
        )
        return client.set_secret("from-sdk", "value").properties.version

    version = await anyio.to_thread.run_sync(write)
    await kv.wait_webhooks()
    (event,) = seen
    assert event["data"]["Version"] == version
    assert event["data"]["Id"] == f"https://localhost:{kv.port}/secrets/from-sdk/{version}"


async def test_event_handlers_are_retried_when_they_raise(kv: LocalKeyVault) -> None:
    calls: list[str] = []

    async def flaky(event: dict[str, Any]) -> None:
        calls.append(event["id"])
        if len(calls) < 3:
            raise ConnectionError("queue unavailable")

    hook = await kv.add_event_handler(flaky, schema="cloudevents")
    kv.set_secret("demo", "a", "1")
    await kv.wait_webhooks()
    assert len(calls) == 3 and len(set(calls)) == 1 and hook.delivered == 1
    assert hook.target.startswith("handler ") and "flaky" in hook.target


def test_redact_url_hides_every_query_value() -> None:
    assert redact_url(f"https://h/x?code={KEY}&a=b") == "https://h/x?code=***&a=***"
    assert redact_url("https://h/x") == "https://h/x"
    assert str(uuid.uuid4()) not in redact_url("https://h/?k=" + str(uuid.uuid4()))


async def test_removing_a_webhook_drops_what_waits_for_it(
    kv: LocalKeyVault, receiver: Receiver
) -> None:
    hook = await kv.add_webhook(receiver.url)
    receiver.gate = anyio.Event()
    for value in "123":
        kv.set_secret("demo", "a", value)
    await until(lambda: len(receiver.notifications()) == 1)
    kv.remove_webhook(hook.id)
    with anyio.fail_after(10):
        await kv.wait_webhooks()  # the hanging delivery was cancelled, the queued ones dropped
    assert kv.webhooks == [] and len(receiver.notifications()) == 1
    with pytest.raises(KeyError):
        kv.remove_webhook(hook.id)
