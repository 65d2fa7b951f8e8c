"""Push refresh: Event Grid and CloudEvents parsing, the webhook receiver (handshakes, key,
coalescing, malformed input) against a real CertSync and the emulator, the pull adapter, the
``kvcertsync run --push-address`` agent end to end, and the push examples."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from kvcertsync import CertSync
from kvcertsync.agent.cli import agent_options, run_parser
from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.errors import KvCertSyncError
from kvcertsync.push import (
    KEY_HEADER,
    VALIDATION_EVENT_TYPE,
    EventGridReceiver,
    MalformedEvents,
    PushRefresher,
    PushServer,
    PushServerError,
    parse_events,
    refresh_from_messages,
)
from kvcertsync.sources import KeyVaultSource
from kvcertsync.stores import MemoryStore
from kvcertsync.uri import SecretUri
from tests.agent_process import (
    AgentProcess,
    agents_fixture,  # noqa: F401  (the "agents" fixture)
    settings_document,
    start_agent,
)
from tests.storage_queue_fake import storage_queue_fake

pytestmark = pytest.mark.anyio

WEB = "https://demo.vault.azure.net/secrets/web"
API = "https://demo.vault.azure.net/secrets/api"
KEY = "k3y-" + "0123456789abcdef" * 2
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# The service's own sample, as the docs print it: note "ObjectName " and " ee05...".
DOCS_SAMPLE = """[{
  "id":"00eccf70-95a7-4e7c-8299-2eb17ee9ad64",
  "topic":"/subscriptions/{subscription-id}/resourceGroups/sample-rg/providers/Microsoft.KeyVault/vaults/sample-kv",
  "subject":"newsecret",
  "eventType":"Microsoft.KeyVault.SecretNewVersionCreated",
  "eventTime":"2019-07-25T01:08:33.1036736Z",
  "data":{
     "Id":"https://sample-kv.vault.azure.net/secrets/newsecret/ee059b2bb5bc48398a53b168c6cdcb10",
     "VaultName":"sample-kv",
     "ObjectType":"Secret",
     "ObjectName ":"newsecret",
     "Version":" ee059b2bb5bc48398a53b168c6cdcb10",
     "NBF":"1559081980",
     "EXP":"1559082102"
  },
  "dataVersion":"1",
  "metadataVersion":"1"
}]"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def key_vault_data(vault: str, name: str, version: str, kind: str = "Secret") -> dict[str, Any]:
    collection = "certificates" if kind == "Certificate" else "secrets"
    return {
        "Id": f"https://{vault}.vault.azure.net/{collection}/{name}/{version}",
        "VaultName": vault,
        "ObjectType": kind,
        "ObjectName": name,
        "Version": version,
    }


def grid_event(
    vault: str, name: str, version: str, what: str = "SecretNewVersionCreated"
) -> dict[str, Any]:
    """One event in the Event Grid schema, as Event Grid delivers it."""
    kind = "Certificate" if what.startswith("Certificate") else "Secret"
    return {
        "id": str(uuid.uuid4()),
        "topic": f"/subscriptions/x/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/{vault}",
        "subject": name,
        "eventType": f"Microsoft.KeyVault.{what}",
        "eventTime": "2026-01-01T00:00:00Z",
        "data": key_vault_data(vault, name, version, kind),
        "dataVersion": "1",
        "metadataVersion": "1",
    }


def cloud_event(vault: str, name: str, version: str) -> dict[str, Any]:
    """The same event as a CloudEvent 1.0."""
    return {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": f"/subscriptions/x/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/{vault}",
        "subject": name,
        "type": "Microsoft.KeyVault.SecretNewVersionCreated",
        "time": "2026-01-01T00:00:00Z",
        "data": key_vault_data(vault, name, version),
    }


# --------------------------------------------------------------------------------- parsing


def test_the_services_own_sample_parses_with_its_quirks() -> None:
    batch = parse_events(DOCS_SAMPLE.encode())
    (event,) = batch.events
    assert event.event_type == "Microsoft.KeyVault.SecretNewVersionCreated"
    assert (event.vault_name, event.vault_host) == ("sample-kv", "sample-kv.vault.azure.net")
    assert (event.object_type, event.object_name) == ("Secret", "newsecret")
    assert event.version == "ee059b2bb5bc48398a53b168c6cdcb10"
    assert event.not_before is not None and int(event.not_before.timestamp()) == 1559081980
    assert event.expires is not None and int(event.expires.timestamp()) == 1559082102
    assert event.schema == "eventgrid" and event.new_version
    assert event.matches(SecretUri.parse("https://SAMPLE-kv.vault.azure.net/secrets/NewSecret"))
    assert not event.matches(SecretUri.parse("https://sample-kv.vault.azure.cn/secrets/newsecret"))
    assert not event.matches(SecretUri.parse("https://other.vault.azure.net/secrets/newsecret"))
    pinned = "https://sample-kv.vault.azure.net/secrets/newsecret/" + "0" * 32
    assert not event.matches(SecretUri.parse(pinned))


def test_cloudevents_structured_batch_and_a_missing_id_host() -> None:
    single = cloud_event("demo", "web", "a" * 32)
    (event,) = parse_events(json.dumps(single), content_type="application/cloudevents+json").events
    assert event.schema == "cloudevents" and event.vault_host == "demo.vault.azure.net"
    batch = parse_events([single, cloud_event("demo", "api", "b" * 32)])
    assert [e.object_name for e in batch.events] == ["web", "api"]
    # Without data.Id nor VaultName the vault comes from the source; matched by name then.
    bare = cloud_event("demo", "web", "c" * 32)
    bare["data"] = {"ObjectName": "web"}
    (event,) = parse_events(bare).events
    assert (event.vault_name, event.vault_host, event.version) == ("demo", None, None)
    assert event.matches(SecretUri.parse(WEB))


def test_validation_and_other_event_types() -> None:
    validation = [
        {
            "id": "1",
            "topic": "t",
            "subject": "",
            "eventType": VALIDATION_EVENT_TYPE,
            "data": {"validationCode": "512D38B6-C7B8-40C8-89FE-F46F9E9622B6"},
            "eventTime": "2026-01-01T00:00:00Z",
        }
    ]
    assert parse_events(validation).validation_code == "512D38B6-C7B8-40C8-89FE-F46F9E9622B6"
    others = [
        grid_event("demo", "web", "a" * 32, "KeyNewVersionCreated"),
        {"eventType": "Microsoft.KeyVault.VaultAccessPolicyChanged", "data": {}},
        {"eventType": "Microsoft.Storage.BlobCreated", "data": {"url": "x"}},
    ]
    batch = parse_events(others)
    assert batch.events == () and len(batch.ignored) == 3


@pytest.mark.parametrize(
    ("message", "content_type", "expected"),
    [
        (b'[{"eventType": ', None, "not valid JSON: Expecting value: line 1 column 16"),
        (b"\xff\xfe", None, "not UTF-8"),
        ("42", None, "not a number"),
        ('["x"]', None, "event [0]: expected a JSON object, not a string"),
        ("[{}, {}]", None, "event [0]: neither an Event Grid event"),
        ('{"specversion": "0.3", "type": "t"}', None, "specversion '0.3' is not supported"),
        ('{"specversion": "1.0", "type": "t", "id": "1"}', None, "'source' must be a non-empty"),
        ("{}", "application/cloudevents-batch+json", "must be a JSON array"),
        ("[]", "application/cloudevents+json; charset=utf-8", "must be one CloudEvent"),
    ],
)
def test_malformed_messages_say_what_and_where(
    message: str | bytes, content_type: str | None, expected: str
) -> None:
    with pytest.raises(MalformedEvents, match=expected.replace("[", r"\[").replace("(", r"\(")):
        parse_events(message, content_type=content_type)


def test_malformed_key_vault_data_names_the_event() -> None:
    good = grid_event("demo", "web", "a" * 32)
    no_data = {**grid_event("demo", "api", "b" * 32), "data": None}
    with pytest.raises(MalformedEvents, match=r"event \[1\] \(Microsoft.KeyVault.Secret.*'data'"):
        parse_events([good, no_data])
    bad_name = grid_event("demo", "web", "a" * 32)
    bad_name["data"]["ObjectName"] = "no/slashes"
    bad_name["subject"] = ""
    with pytest.raises(MalformedEvents, match="no valid 'ObjectName'"):
        parse_events(bad_name)


# --------------------------------------------------------------------------------- receiver


@pytest.fixture(name="kv")
async def kv_fixture() -> AsyncIterator[LocalKeyVault]:
    async with LocalKeyVault() as kv:
        kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
        kv.import_certificate("demo", "api", kv.authority.issue(["api.example"]))
        yield kv


def hourly_sync(kv: LocalKeyVault, *urls: str) -> CertSync:
    """A CertSync of ``urls`` in the emulator, polling hourly, into memory."""
    source = KeyVaultSource(
        ImdsCredential(kv.imds_endpoint),
        ca_file=kv.ca_file,
        redirect=kv.redirect,
        owns_credentials=True,
    )
    return CertSync(urls, store=MemoryStore(), source=source, polling_interval=3600)


@pytest.fixture(name="sync")
async def sync_fixture(kv: LocalKeyVault) -> AsyncIterator[CertSync]:
    """A CertSync polling hourly, so anything installed sooner came by push."""
    sync = hourly_sync(kv, WEB, API)
    async with sync:
        await sync.wait_ready()
        yield sync


@pytest.fixture(name="push")
async def push_fixture(sync: CertSync) -> AsyncIterator[PushServer]:
    async with PushServer(sync, key=KEY) as push:
        yield push


@pytest.fixture(name="client")
async def client_fixture() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture(name="logs")
def logs_fixture(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Everything logged, at every level: no key may ever be in it."""
    caplog.set_level(logging.DEBUG)
    yield caplog
    assert KEY not in caplog.text


async def wait_installed(sync: CertSync, uri: str, version: str) -> None:
    with anyio.fail_after(30):
        while (current := sync.current(uri)) is None or current.version != version:  # noqa: ASYNC110
            await anyio.sleep(0.01)


def gets(kv: LocalKeyVault, name: str) -> int:
    """GET requests for secret ``name`` so far."""
    return sum(
        1 for r in kv.requests if r.method == "GET" and r.path.startswith(f"/secrets/{name}/")
    )


async def post(
    client: aiohttp.ClientSession,
    push: PushServer,
    body: Any,
    *,
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    url = push.url if key is None else f"{push.url}?code={key}"
    data = body if isinstance(body, bytes | str) else json.dumps(body)
    async with client.post(url, data=data, headers=headers or {}) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


async def test_the_key_is_required_and_reveals_nothing(
    kv: LocalKeyVault,
    sync: CertSync,
    push: PushServer,
    client: aiohttp.ClientSession,
    logs: pytest.LogCaptureFixture,
) -> None:
    version = kv.rotate("demo", "web")
    event = [grid_event("demo", "web", version)]
    answers = [
        await post(client, push, event, key=None),
        await post(client, push, event, key="wrong"),
        await post(client, push, event, key=KEY[:-1] + "X"),
        await post(client, push, event, key=None, headers={KEY_HEADER: "wrong"}),
    ]
    assert answers == [(401, "unauthorized")] * 4
    async with client.options(push.url, headers={"WebHook-Request-Origin": "x"}) as response:
        assert response.status == 401 and "WebHook-Allowed-Origin" not in response.headers
    await push.refresher.wait_idle()
    assert sync.current(WEB).version != version and push.refresher.stats.events == 0
    # The key by header (an Event Grid delivery property) is as good as the query.
    status, body = await post(client, push, event, key=None, headers={KEY_HEADER: KEY})
    assert (status, body) == (200, {"received": 1, "refreshing": 1})
    await wait_installed(sync, WEB, version)
    assert repr(push.receiver) == f"<EventGridReceiver max_body={push.receiver.max_body}>"


async def test_event_grid_validation_handshake(
    push: PushServer, client: aiohttp.ClientSession
) -> None:
    code = str(uuid.uuid4()).upper()
    event = {
        "id": str(uuid.uuid4()),
        "topic": "/subscriptions/x/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/demo",
        "subject": "",
        "data": {"validationCode": code, "validationUrl": "https://rp.eventgrid.azure.net/x"},
        "eventType": VALIDATION_EVENT_TYPE,
        "eventTime": "2026-01-01T00:00:00Z",
        "metadataVersion": "1",
        "dataVersion": "2",
    }
    headers = {"aeg-event-type": "SubscriptionValidation"}
    assert await post(client, push, [event], headers=headers) == (200, {"validationResponse": code})


async def test_cloudevents_abuse_protection_handshake(
    push: PushServer, client: aiohttp.ClientSession
) -> None:
    url = f"{push.url}?code={KEY}"
    headers = {"WebHook-Request-Origin": "eventgrid.azure.net", "WebHook-Request-Rate": "120"}
    async with client.options(url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
        assert response.headers["WebHook-Allowed-Rate"] == "*"
        assert "POST" in response.headers["Allow"]
    async with client.options(url) as response:
        assert response.status == 400
        assert "WebHook-Request-Origin" in (await response.json())["error"]


@pytest.mark.parametrize("form", ["eventgrid", "cloudevents", "cloudevents-batch", "binary"])
async def test_both_schemas_refresh_the_named_certificate(
    kv: LocalKeyVault,
    sync: CertSync,
    push: PushServer,
    client: aiohttp.ClientSession,
    form: str,
) -> None:
    version = kv.rotate("demo", "web")
    headers: dict[str, str] = {}
    body: Any
    if form == "eventgrid":
        body = [grid_event("demo", "web", version)]
    elif form == "cloudevents":
        body = cloud_event("demo", "web", version)
        headers["Content-Type"] = "application/cloudevents+json; charset=utf-8"
    elif form == "cloudevents-batch":
        body = [cloud_event("demo", "web", version)]
        headers["Content-Type"] = "application/cloudevents-batch+json"
    else:
        event = cloud_event("demo", "web", version)
        headers = {f"ce-{k}": v for k, v in event.items() if k != "data"}
        headers["Content-Type"] = "application/json"
        body = event["data"]
    status, answer = await post(client, push, body, headers=headers)
    assert (status, answer) == (200, {"received": 1, "refreshing": 1})
    await wait_installed(sync, WEB, version)
    assert (
        sync.current(API) is not None and sync.current(API).version == kv.versions("demo", "api")[0]
    )


async def test_unobserved_urls_are_ignored(
    kv: LocalKeyVault, sync: CertSync, push: PushServer, client: aiohttp.ClientSession
) -> None:
    kv.import_certificate("demo", "other", kv.authority.issue(["other.example"]))
    kv.import_certificate("elsewhere", "web", kv.authority.issue(["web.example"]))
    before = len(kv.requests)
    events = [
        grid_event("demo", "other", kv.versions("demo", "other")[-1]),
        grid_event("elsewhere", "web", kv.versions("elsewhere", "web")[-1]),
        # Same vault name, another cloud: not this vault.
        {
            **grid_event("demo", "web", "f" * 32),
            "data": {
                **key_vault_data("demo", "web", "f" * 32),
                "Id": f"https://demo.vault.azure.cn/secrets/web/{'f' * 32}",
            },
        },
    ]
    assert await post(client, push, events) == (200, {"received": 3, "refreshing": 0})
    await push.refresher.wait_idle()
    assert push.refresher.stats.unobserved == 3 and push.refresher.stats.refreshes == 0
    assert len(kv.requests) == before


async def test_a_storm_of_duplicates_runs_one_refresh(
    kv: LocalKeyVault, sync: CertSync, push: PushServer, client: aiohttp.ClientSession
) -> None:
    version = kv.rotate("demo", "web")
    before = gets(kv, "web")
    kv.latency(0.5, "demo")  # a slow vault: the storm arrives while the refresh runs
    events = [grid_event("demo", "web", version, "CertificateNewVersionCreated")] + [
        grid_event("demo", "web", version) for _ in range(49)
    ]
    answers: list[tuple[int, Any]] = []

    async def deliver(event: dict[str, Any]) -> None:
        answers.append(await post(client, push, [event]))

    async with anyio.create_task_group() as tg:
        for event in events:
            tg.start_soon(deliver, event)
    assert [status for status, _ in answers] == [200] * 50
    await push.refresher.wait_idle()
    await wait_installed(sync, WEB, version)
    stats = push.refresher.stats
    assert stats.refreshes == 1 and stats.coalesced + stats.current == 49
    assert gets(kv, "web") == before + 1
    # A duplicate after the fact finds the version installed: no request at all.
    kv.latency(0)
    assert await post(client, push, [grid_event("demo", "web", version)]) == (
        200,
        {"received": 1, "refreshing": 0},
    )
    assert gets(kv, "web") == before + 1


async def test_a_newer_version_during_a_refresh_gets_one_more(
    kv: LocalKeyVault, sync: CertSync, push: PushServer, client: aiohttp.ClientSession
) -> None:
    kv.latency(0.3, "demo")
    first = kv.rotate("demo", "web")
    assert (await post(client, push, [grid_event("demo", "web", first)]))[0] == 200
    second = kv.rotate("demo", "web")
    for _ in range(10):
        assert (await post(client, push, [grid_event("demo", "web", second)]))[0] == 200
    await push.refresher.wait_idle()
    await wait_installed(sync, WEB, second)
    assert 1 <= push.refresher.stats.refreshes <= 2


async def test_malformed_requests_get_a_clear_error(
    sync: CertSync, push: PushServer, client: aiohttp.ClientSession
) -> None:
    status, body = await post(client, push, b'[{"eventType": "x", ')
    assert status == 400 and "not valid JSON" in body["error"] and "line 1" in body["error"]
    status, body = await post(client, push, [{"eventType": "Microsoft.KeyVault.SecretExpired"}])
    assert status == 400 and body["error"].startswith(
        "event [0] (Microsoft.KeyVault.SecretExpired)"
    )
    status, body = await post(
        client, push, "x=1", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 415 and "not JSON" in body["error"]
    async with client.get(f"{push.url}?code={KEY}") as response:
        assert response.status == 405 and response.headers["Allow"] == "OPTIONS, POST"
    async with PushServer(sync, key=KEY, max_body=256) as small:
        status, body = await post(client, small, [grid_event("demo", "web", "a" * 32)] * 3)
        assert status == 413 and "larger than 256 bytes" in body["error"]
    assert push.refresher.stats.events == 0


async def test_receiver_refuses_a_short_key_and_a_busy_port(
    sync: CertSync, push: PushServer
) -> None:
    with pytest.raises(PushServerError, match="at least 16 characters"):
        EventGridReceiver(PushRefresher(sync), key="short")
    with pytest.raises(PushServerError, match=f"cannot listen on 127.0.0.1:{push.port}"):
        async with PushServer(sync, key=KEY, port=push.port):
            pass


async def test_events_while_not_polling_are_left_to_the_start(kv: LocalKeyVault) -> None:
    sync = hourly_sync(kv, WEB)
    async with PushRefresher(sync) as refresher:
        assert refresher.submit(parse_events([grid_event("demo", "web", "a" * 32)])) == ()
        assert refresher.stats.not_running == 1
    await sync.source.aclose()


# --------------------------------------------------------------------------------- pull


async def test_pull_adapter_refreshes_from_an_async_iterator(
    kv: LocalKeyVault, sync: CertSync, logs: pytest.LogCaptureFixture
) -> None:
    version = kv.rotate("demo", "api")

    async def messages() -> AsyncIterator[Any]:
        yield b"not json"  # a poison message is skipped, not fatal
        yield json.dumps(grid_event("demo", "api", version)).encode()  # Storage Queue: bytes
        yield cloud_event("demo", "api", version)  # Service Bus: a decoded body
        yield json.dumps([grid_event("demo", "nope", version)])

    report = await refresh_from_messages(messages(), sync)
    assert (report.messages, report.malformed) == (4, 1)
    assert report.stats.events == 3 and report.stats.unobserved == 1
    assert sync.current(API) is not None and sync.current(API).version == version
    assert "message 1 skipped: the message is not valid JSON" in logs.text


async def test_storage_queue_example_with_the_real_sdk() -> None:
    async with storage_queue_fake() as fake:
        result = await anyio.run_process(
            [sys.executable, str(EXAMPLES / "push_storage_queue.py"), "kv-events"],
            env={**os.environ, "AZURE_STORAGE_CONNECTION_STRING": fake.connection_string},
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout.decode().splitlines()[-1] == "done"
        operations = {
            (method, path.rsplit("/", 1)[0] if method == "DELETE" else path)
            for method, path, _ in fake.requests
        }
        assert operations == {
            ("PUT", "/devstoreaccount1/kv-events"),
            ("POST", "/devstoreaccount1/kv-events/messages"),
            ("GET", "/devstoreaccount1/kv-events/messages"),
            ("DELETE", "/devstoreaccount1/kv-events/messages"),
        }
        assert all(status < 300 for _, _, status in fake.requests)


async def test_the_fake_queue_checks_the_shared_key() -> None:
    from azure.core.exceptions import ClientAuthenticationError
    from azure.storage.queue.aio import QueueClient

    async with storage_queue_fake() as fake:
        wrong = fake.connection_string.replace("AccountKey=Eby8", "AccountKey=Xby8")
        async with QueueClient.from_connection_string(wrong, "q") as queue:
            with pytest.raises(ClientAuthenticationError):
                await queue.create_queue()


def test_webhook_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "push_webhook.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum("after the rotation" in line for line in lines) == 2
    assert lines[-1] == "done"


# --------------------------------------------------------------------------------- the agent


def run_options(*args: str, environ: dict[str, str] | None = None) -> Any:
    return agent_options(run_parser().parse_args(["settings.json", *args]), environ or {})


def test_run_options_keep_the_key_off_the_command_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(KvCertSyncError, match="--push-key-file FILE or KVCERTSYNC_PUSH_KEY"):
        run_options("--push-address", "8470")
    options = run_options("--push-address", "8470", environ={"KVCERTSYNC_PUSH_KEY": f" {KEY}\n"})
    assert options.push_key == KEY and KEY not in repr(options)
    key_file = tmp_path / "push.key"
    key_file.write_text(f"{KEY}\n")
    key_file.chmod(0o644)
    options = run_options("--push-address", "0.0.0.0:8470", "--push-key-file", str(key_file))
    assert options.push_key == KEY and "chmod 600" in caplog.text
    key_file.write_text("short\n")
    with pytest.raises(KvCertSyncError, match="at least 16 characters"):
        run_options("--push-address", "8470", "--push-key-file", str(key_file))
    with pytest.raises(KvCertSyncError, match="cannot read"):
        run_options("--push-address", "8470", "--push-key-file", str(tmp_path / "missing"))
    with pytest.raises(KvCertSyncError, match="--push-key-file needs --push-address"):
        run_options("--push-key-file", str(key_file))
    with pytest.raises(KvCertSyncError, match="cannot go with --once"):
        run_options("--push-address", "8470", "--once", environ={"KVCERTSYNC_PUSH_KEY": KEY})
    with pytest.raises(KvCertSyncError, match=r"--push-address .*port 'x' is not a number"):
        run_options("--push-address", "host:x", environ={"KVCERTSYNC_PUSH_KEY": KEY})


async def test_agent_with_push_installs_a_rotation_long_before_the_hourly_poll(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    certs = tmp_path / "certs"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(settings_document(kv, ["web"], certs, interval=3600)))
    # The receiver serves HTTPS itself, with a certificate the emulator's webhooks trust.
    served = kv.authority.issue(["localhost"])
    (tmp_path / "push.pem").write_bytes(served.fullchain_pem() + served.key_pem())
    key_file = tmp_path / "push.key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    agent = start_agent(
        agents,
        kv,
        tmp_path,
        str(settings),
        "--push-address",
        "127.0.0.1:0",
        "--push-key-file",
        str(key_file),
        "--push-tls-cert",
        str(tmp_path / "push.pem"),
    )
    await agent.wait_phase("success")
    await agent.wait_log("Event Grid webhook at https://127.0.0.1:")
    port = agent.log_text().split("Event Grid webhook at https://127.0.0.1:", 1)[1].split("/", 1)[0]
    await kv.add_webhook(f"https://localhost:{port}/?code={KEY}")
    link = certs / "demo.web"
    before = os.readlink(link)
    version = kv.rotate("demo", "web")
    with anyio.fail_after(30):
        while os.readlink(link) == before:  # noqa: ASYNC110 - another process's files
            await anyio.sleep(0.05)
    assert version in os.readlink(link)
    await agent.wait_log(
        f"push: Microsoft.KeyVault.CertificateNewVersionCreated for {WEB}: refreshing"
    )
    agent.send(signal.SIGTERM)
    code, _ = await agent.wait_exit(within=30)
    assert code == 0
    assert KEY not in agent.log_text()


def test_agent_refuses_push_without_a_key(tmp_path: Path) -> None:
    from tests.agent_process import KVCERTSYNC

    result = subprocess.run(
        [*KVCERTSYNC, "run", str(tmp_path / "settings.json"), "--push-address", "8470"],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "KVCERTSYNC_PUSH_KEY"},
    )
    assert result.returncode == 2
    assert "--push-address needs the webhook's shared key" in result.stderr
