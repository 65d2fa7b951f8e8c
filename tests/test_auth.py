"""kvcertsync.auth: ImdsCredential against a small fake IMDS, and credential selection."""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import attrs
import pytest
from aiohttp import web
from azure.core.credentials import AccessTokenInfo
from azure.core.credentials_async import AsyncSupportsTokenInfo, AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.pipeline.policies import AsyncBearerTokenCredentialPolicy
from azure.core.pipeline.transport import AioHttpTransport
from azure.core.rest import HttpRequest
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.secrets.aio import SecretClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import kvcertsync.auth.factory as factory
import kvcertsync.auth.imds as imds_module
from kvcertsync import AgentSettings, parse_settings
from kvcertsync.auth import (
    ARC_API_VERSION,
    CredentialCache,
    ImdsAuthenticationError,
    ImdsCredential,
    ImdsRetry,
    SharedCredential,
    credential_from_settings,
    is_standard_imds,
)
from kvcertsync.errors import AuthenticationFailed
from kvcertsync.sources.redirect import RedirectResolver

pytestmark = pytest.mark.anyio

VAULT_SCOPE = "https://vault.azure.net/.default"
VAULT_RESOURCE = "https://vault.azure.net"
TOKEN_PATH = "/metadata/identity/oauth2/token"
FAST = ImdsRetry(backoff=0.005, max_delay=0.02, gone_budget=0.3, refresh_pause=0.2)
CLIENT_A = "11111111-aaaa-4aaa-8aaa-111111111111"
CLIENT_B = "22222222-bbbb-4bbb-8bbb-222222222222"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --------------------------------------------------------------------------- fake IMDS


@attrs.define
class Seen:
    """One request the fake IMDS received."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]


@attrs.define
class FakeImds:
    """Speaks the IMDS token protocol; ``script`` holds failures to answer before succeeding.

    A script entry is an HTTP status, ``(status, headers)``, or ``"drop"`` (close the
    connection without answering).
    """

    endpoint: str = ""
    script: list[int | tuple[int, dict[str, str]] | str] = attrs.field(factory=list)
    requests: list[Seen] = attrs.field(factory=list)
    issued: list[str] = attrs.field(factory=list)
    lifetime: int = 3600
    delay: float = 0.0
    client_ids: set[str] = attrs.field(factory=lambda: {CLIENT_A, CLIENT_B})
    arc_key_file: Path | None = None
    arc_realm: str | None = None
    api_version: str = "2018-02-01"
    body_override: dict[str, Any] | None = None

    @property
    def count(self) -> int:
        return len(self.requests)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(Seen(request.path, dict(request.query), dict(request.headers)))
        if self.delay:
            await anyio.sleep(self.delay)
        if self.script:
            action = self.script.pop(0)
            if action == "drop":
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            status, headers = action if isinstance(action, tuple) else (action, {})
            assert isinstance(status, int)
            return web.json_response(
                {"error": "scripted", "error_description": f"scripted {status}"},
                status=status,
                headers=headers,
            )
        if request.headers.get("Metadata") != "true":
            return self.error(400, "Required metadata header not specified")
        if request.query.get("api-version") != self.api_version:
            return self.error(400, "Unsupported api-version")
        resource = request.query.get("resource")
        if not resource:
            return self.error(400, "Required query variable 'resource' is missing")
        if self.arc_key_file is not None:
            expected = "Basic " + self.arc_key_file.read_text().strip()
            if request.headers.get("Authorization") != expected:
                realm = self.arc_realm or str(self.arc_key_file)
                return web.Response(
                    status=401, headers={"WWW-Authenticate": f"Basic realm={realm}"}
                )
        client_id = request.query.get("client_id")
        if client_id is not None and client_id not in self.client_ids:
            return self.error(400, "Identity not found")
        token = f"eyJ0eXAi.fake-{len(self.issued)}-{secrets.token_hex(12)}"
        self.issued.append(token)
        now = int(time.time())
        body: dict[str, Any] = {
            "access_token": token,
            "client_id": client_id or "00000000-system-0000-0000-000000000000",
            "expires_in": str(self.lifetime),
            "expires_on": str(now + self.lifetime),
            "ext_expires_in": str(self.lifetime),
            "not_before": str(now),
            "resource": resource,
            "token_type": "Bearer",
        }
        if self.body_override is not None:
            body = {
                k: v.replace("{token}", token) if isinstance(v, str) else v
                for k, v in self.body_override.items()
            }
        return web.json_response(body)

    @staticmethod
    def error(status: int, description: str) -> web.Response:
        return web.json_response(
            {"error": "invalid_request", "error_description": description}, status=status
        )


@pytest.fixture
async def imds() -> AsyncIterator[FakeImds]:
    fake = FakeImds()
    app = web.Application()
    app.router.add_get(TOKEN_PATH, fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    fake.endpoint = f"http://127.0.0.1:{port}/metadata/identity"
    try:
        yield fake
    finally:
        await runner.cleanup()


class Clock:
    """Wall time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def make(imds: FakeImds) -> AsyncIterator[Callable[..., ImdsCredential]]:
    made: list[ImdsCredential] = []

    def build(client_id: str | None = None, **kwargs: Any) -> ImdsCredential:
        kwargs.setdefault("retry", FAST)
        credential = ImdsCredential(kwargs.pop("endpoint", imds.endpoint), client_id, **kwargs)
        made.append(credential)
        return credential

    yield build
    for credential in made:
        await credential.close()


# --------------------------------------------------------------------------- protocol


async def test_request_shape(imds: FakeImds, make: Callable[..., ImdsCredential]) -> None:
    credential = make()
    token = await credential.get_token(VAULT_SCOPE)
    assert token.token == imds.issued[0]
    assert isinstance(token.expires_on, int)
    assert token.expires_on == pytest.approx(time.time() + 3600, abs=5)
    (seen,) = imds.requests
    assert seen.path == TOKEN_PATH
    assert seen.query == {"api-version": "2018-02-01", "resource": VAULT_RESOURCE}
    assert seen.headers["Metadata"] == "true"
    assert "Authorization" not in seen.headers


async def test_user_assigned_client_id_is_sent(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    await make(CLIENT_A).get_token(VAULT_SCOPE)
    assert imds.requests[0].query["client_id"] == CLIENT_A


@pytest.mark.parametrize(
    "suffix", ["/metadata/identity", "/metadata/identity/", "/metadata/identity/oauth2/token"]
)
async def test_endpoint_forms(
    imds: FakeImds, make: Callable[..., ImdsCredential], suffix: str
) -> None:
    base = imds.endpoint.removesuffix("/metadata/identity")
    credential = make(endpoint=base + suffix)
    assert credential.endpoint == base + TOKEN_PATH
    await credential.get_token(VAULT_SCOPE)
    assert imds.requests[0].path == TOKEN_PATH


async def test_scope_without_default_suffix_and_default_resource(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    credential = make()
    await credential.get_token("https://management.azure.com/.default")
    await credential.get_token()
    assert [r.query["resource"] for r in imds.requests] == [
        "https://management.azure.com",
        VAULT_RESOURCE,
    ]
    with pytest.raises(ValueError, match="exactly one scope"):
        await credential.get_token("a/.default", "b/.default")


async def test_second_call_is_served_from_cache(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    credential = make()
    first = await credential.get_token(VAULT_SCOPE)
    second = await credential.get_token(VAULT_SCOPE)
    info = await credential.get_token_info(VAULT_SCOPE)
    assert first == second
    assert info.token == first.token
    assert imds.count == 1


async def test_refresh_ahead_of_expiry(imds: FakeImds, make: Callable[..., ImdsCredential]) -> None:
    clock = Clock()
    credential = make(clock=clock, refresh_margin=300)
    first = await credential.get_token_info(VAULT_SCOPE)
    assert first.refresh_on == pytest.approx(first.expires_on - 300, abs=1)
    clock.offset = 3200  # 400 s left: still fresh
    assert (await credential.get_token(VAULT_SCOPE)).token == first.token
    assert imds.count == 1
    clock.offset = 3310  # 290 s left: inside the margin
    second = await credential.get_token(VAULT_SCOPE)
    assert imds.count == 2
    assert second.token != first.token


async def test_short_lived_token_refreshes_at_half_life(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    imds.lifetime = 100
    clock = Clock()
    credential = make(clock=clock, refresh_margin=300)
    await credential.get_token(VAULT_SCOPE)
    clock.offset = 40
    await credential.get_token(VAULT_SCOPE)
    assert imds.count == 1
    clock.offset = 55
    await credential.get_token(VAULT_SCOPE)
    assert imds.count == 2


async def test_failed_early_refresh_keeps_the_cached_token(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    clock = Clock()
    credential = make(clock=clock)
    first = await credential.get_token(VAULT_SCOPE)
    clock.offset = 3400  # due for refresh, 200 s of validity left
    imds.script = [500, 500, 500]
    assert (await credential.get_token(VAULT_SCOPE)).token == first.token
    assert imds.count == 2  # one quick attempt, no retries while a valid token is held
    assert (await credential.get_token(VAULT_SCOPE)).token == first.token
    assert imds.count == 2  # paused after the failure (refresh_pause)
    await anyio.sleep(FAST.refresh_pause + 0.05)
    imds.script = []
    second = await credential.get_token(VAULT_SCOPE)
    assert second.token != first.token
    assert imds.count == 3


async def test_expired_token_and_failing_endpoint_raise(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    clock = Clock()
    credential = make(clock=clock)
    await credential.get_token(VAULT_SCOPE)
    clock.offset = 3600
    imds.script = [403]
    with pytest.raises(ImdsAuthenticationError, match="403"):
        await credential.get_token(VAULT_SCOPE)


async def test_claims_force_a_new_token(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    credential = make()
    first = await credential.get_token_info(VAULT_SCOPE)
    second = await credential.get_token_info(VAULT_SCOPE, options={"claims": '{"access_token":{}}'})
    assert second.token != first.token
    assert imds.count == 2
    third = await credential.get_token(VAULT_SCOPE)
    assert third.token == second.token


async def test_concurrent_callers_share_one_request(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    imds.delay = 0.05
    credential = make()
    tokens: list[str] = []

    async def call() -> None:
        tokens.append((await credential.get_token(VAULT_SCOPE)).token)

    async with anyio.create_task_group() as tg:
        for _ in range(100):
            tg.start_soon(call)
    assert imds.count == 1
    assert set(tokens) == {imds.issued[0]}
    assert len(tokens) == 100


async def test_concurrent_callers_share_one_failure(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    imds.delay = 0.05
    credential = make("33333333-cccc-4ccc-8ccc-333333333333")
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await credential.get_token(VAULT_SCOPE)
        except ImdsAuthenticationError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(call)
    assert imds.count == 1
    assert len(errors) == 20
    assert all("Identity not found" in str(e) for e in errors)


# --------------------------------------------------------------------------- retries


@pytest.mark.parametrize(
    "failure",
    [404, 410, 429, 500, 503, (429, {"Retry-After": "0"}), "drop"],
    ids=["404", "410", "429", "500", "503", "429-retry-after", "connection-drop"],
)
async def test_retryable_failures_are_retried(
    imds: FakeImds, make: Callable[..., ImdsCredential], failure: Any
) -> None:
    imds.script = [failure, failure]
    token = await make().get_token(VAULT_SCOPE)
    assert token.token == imds.issued[0]
    assert imds.count == 3


async def test_connection_refused_is_retried_then_reported(
    make: Callable[..., ImdsCredential],
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    credential = make(
        endpoint=f"http://127.0.0.1:{port}/metadata/identity",
        retry=attrs.evolve(FAST, attempts=3),
    )
    with pytest.raises(ImdsAuthenticationError, match=r"after 3 attempts.*connection failed") as e:
        await credential.get_token(VAULT_SCOPE)
    assert e.value.retryable
    assert e.value.imds_status is None


async def test_retry_after_is_honoured(imds: FakeImds, make: Callable[..., ImdsCredential]) -> None:
    imds.script = [(429, {"Retry-After": "0.3"})]
    credential = make(retry=attrs.evolve(FAST, max_delay=5))
    start = anyio.current_time()
    await credential.get_token(VAULT_SCOPE)
    assert anyio.current_time() - start >= 0.28
    assert imds.count == 2


async def test_attempts_are_limited(imds: FakeImds, make: Callable[..., ImdsCredential]) -> None:
    imds.script = [500] * 10
    credential = make(retry=attrs.evolve(FAST, attempts=4))
    with pytest.raises(ImdsAuthenticationError, match=r"after 4 attempts: HTTP 500") as e:
        await credential.get_token(VAULT_SCOPE)
    assert imds.count == 4
    assert e.value.imds_status == 500
    assert e.value.retryable


async def test_410_is_retried_within_its_time_budget(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    # More 410s than `attempts` allows for other statuses: 410 has a time budget instead.
    imds.script = [410] * 12
    credential = make(retry=attrs.evolve(FAST, attempts=3, gone_budget=5))
    assert (await credential.get_token(VAULT_SCOPE)).token == imds.issued[0]
    assert imds.count == 13


async def test_410_gives_up_when_its_budget_is_spent(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    imds.script = [410] * 1000
    credential = make(retry=attrs.evolve(FAST, attempts=2, gone_budget=0.3))
    start = anyio.current_time()
    with pytest.raises(ImdsAuthenticationError, match="HTTP 410"):
        await credential.get_token(VAULT_SCOPE)
    elapsed = anyio.current_time() - start
    assert 0.25 <= elapsed < 2
    assert imds.count > 2


@pytest.mark.parametrize("status", [400, 403])
async def test_other_client_errors_fail_at_once(
    imds: FakeImds, make: Callable[..., ImdsCredential], status: int
) -> None:
    imds.script = [status]
    with pytest.raises(ImdsAuthenticationError) as e:
        await make().get_token(VAULT_SCOPE)
    assert imds.count == 1
    assert f"HTTP {status}" in str(e.value)
    assert not e.value.retryable


async def test_identity_not_found_message(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    unknown = "44444444-dddd-4ddd-8ddd-444444444444"
    credential = make(CLIENT_A)
    good = await credential.get_token(VAULT_SCOPE)  # a token exists in the process...
    other = make(unknown)
    with pytest.raises(ImdsAuthenticationError) as e:
        await other.get_token(VAULT_SCOPE)
    message = str(e.value)
    assert imds.count == 2
    assert other.endpoint in message
    assert "HTTP 400" in message
    assert "Identity not found" in message
    assert unknown in message
    assert good.token not in message  # ...and never shows up in an error
    assert isinstance(e.value, AuthenticationFailed)
    assert isinstance(e.value, ClientAuthenticationError)
    # No HTTP response attached: azure-core code reads this as a credential failure.
    assert e.value.status_code is None
    assert e.value.imds_status == 400


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({"access_token": "{token}", "token_type": "Bearer"}, "expires_on"),
        ({"access_token": "{token}", "expires_on": "soon"}, "expires_on"),
        ({"access_token": "{token}", "expires_on": "1000"}, "expired"),
        ({"expires_on": "9999999999"}, "access_token"),
        ({"access_token": "{token}", "expires_in": "60", "client_id": CLIENT_B}, "client_id"),
    ],
)
async def test_bad_token_replies_are_refused_without_showing_the_token(
    imds: FakeImds, make: Callable[..., ImdsCredential], body: dict[str, Any], complaint: str
) -> None:
    imds.body_override = body
    with pytest.raises(ImdsAuthenticationError, match=complaint) as e:
        await make(CLIENT_A).get_token(VAULT_SCOPE)
    assert imds.count == 1
    for token in imds.issued:
        assert token not in str(e.value)
        assert token not in repr(e.value)


async def test_expires_in_is_used_when_expires_on_is_missing(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    imds.body_override = {"access_token": "{token}", "expires_in": "600"}
    token = await make().get_token(VAULT_SCOPE)
    assert token.expires_on == pytest.approx(time.time() + 600, abs=5)


# --------------------------------------------------------------------------- Azure Arc


@pytest.fixture
def arc_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tokens"
    directory.mkdir()
    return directory


async def test_arc_challenge_is_answered(
    imds: FakeImds, make: Callable[..., ImdsCredential], arc_dir: Path
) -> None:
    key = secrets.token_hex(32)
    imds.arc_key_file = arc_dir / "abc123.key"
    imds.arc_key_file.write_text(key + "\n")
    credential = make(arc_key_dir=arc_dir)
    token = await credential.get_token(VAULT_SCOPE)
    assert token.token == imds.issued[0]
    first, second = imds.requests
    assert "Authorization" not in first.headers
    assert second.headers["Authorization"] == f"Basic {key}"
    assert second.headers["Metadata"] == "true"
    assert key not in repr(credential)


async def test_arc_key_rejected_twice_fails_without_showing_it(
    imds: FakeImds, make: Callable[..., ImdsCredential], arc_dir: Path
) -> None:
    key = secrets.token_hex(32)
    imds.arc_key_file = arc_dir / "abc123.key"
    imds.arc_key_file.write_text(key)
    # The realm names a valid key file, but not the one the server expects.
    decoy = arc_dir / "decoy.key"
    decoy.write_text("not-the-key")
    imds.arc_realm = str(decoy)
    with pytest.raises(ImdsAuthenticationError, match="after answering the Azure Arc") as e:
        await make(arc_key_dir=arc_dir).get_token(VAULT_SCOPE)
    assert imds.count == 2
    assert "not-the-key" not in str(e.value)


def _arc_realm(case: str, arc_dir: Path, tmp_path: Path) -> str:
    """A realm for each way a challenge can point at the wrong thing."""
    if case == "outside":
        (tmp_path / "outside.key").write_text("x")
        return str(tmp_path / "outside.key")
    if case == "extension":
        (arc_dir / "secret.txt").write_text("x")
        return str(arc_dir / "secret.txt")
    if case == "symlink":
        (tmp_path / "target.key").write_text("x")
        (arc_dir / "link.key").symlink_to(tmp_path / "target.key")
        return str(arc_dir / "link.key")
    if case == "directory":
        (arc_dir / "dir.key").mkdir()
        return str(arc_dir / "dir.key")
    if case == "fifo":
        os.mkfifo(arc_dir / "fifo.key")
        return str(arc_dir / "fifo.key")
    if case == "large":
        (arc_dir / "large.key").write_text("x" * 4097)
        return str(arc_dir / "large.key")
    if case == "missing":
        return str(arc_dir / "missing.key")
    if case == "relative":
        return "tokens/abc.key"
    if case == "traversal":
        (tmp_path / "escape.key").write_text("x")
        return str(arc_dir / ".." / "escape.key")
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "outside",
        "extension",
        "symlink",
        "directory",
        "fifo",
        "large",
        "missing",
        "relative",
        "traversal",
    ],
)
async def test_arc_challenge_with_a_bad_realm_is_refused(
    imds: FakeImds,
    make: Callable[..., ImdsCredential],
    arc_dir: Path,
    tmp_path: Path,
    case: str,
) -> None:
    if case == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    imds.arc_key_file = arc_dir / "real.key"
    imds.arc_key_file.write_text("real")
    imds.arc_realm = _arc_realm(case, arc_dir, tmp_path)
    with pytest.raises(ImdsAuthenticationError, match="refused the Azure Arc key challenge") as e:
        await make(arc_key_dir=arc_dir).get_token(VAULT_SCOPE)
    assert imds.count == 1  # nothing was sent back
    assert not e.value.retryable


async def test_arc_challenge_from_a_remote_endpoint_is_refused(
    imds: FakeImds,
    make: Callable[..., ImdsCredential],
    arc_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(imds_module, "_is_loopback", lambda url: False)
    imds.arc_key_file = arc_dir / "real.key"
    imds.arc_key_file.write_text("real")
    with pytest.raises(ImdsAuthenticationError, match="not on this machine"):
        await make(arc_key_dir=arc_dir).get_token(VAULT_SCOPE)
    assert imds.count == 1


def test_loopback_detection() -> None:
    assert imds_module._is_loopback("http://localhost:40342/metadata/identity")
    assert imds_module._is_loopback("http://127.0.0.1:40342/x")
    assert imds_module._is_loopback("http://[::1]:40342/x")
    assert not imds_module._is_loopback("http://169.254.169.254/metadata/identity")
    assert not imds_module._is_loopback("http://example.com/metadata/identity")


def test_arc_key_directory_per_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    assert imds_module.arc_key_directory("linux") == "/var/opt/azcmagent/tokens"
    monkeypatch.setenv("PROGRAMDATA", "C:\\ProgramData")
    assert imds_module.arc_key_directory("win32") == os.path.join(
        "C:\\ProgramData", "AzureConnectedMachineAgent", "Tokens"
    )
    assert imds_module.arc_key_directory("darwin") is None


# --------------------------------------------------------------------------- the credential object


def test_construction_needs_no_event_loop() -> None:
    credential = ImdsCredential("http://localhost:40342/metadata/identity", CLIENT_A)
    assert credential.endpoint == "http://localhost:40342/metadata/identity/oauth2/token"
    assert credential.client_id == CLIENT_A


@pytest.mark.parametrize(
    "endpoint",
    [
        "ftp://host/metadata/identity",
        "http:///metadata/identity",
        "http://h/x?a=b",
        "http://u:p@h/",
    ],
)
def test_bad_endpoints_are_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="msiEndpoint"):
        ImdsCredential(endpoint)


async def test_is_an_azure_core_token_provider(make: Callable[..., ImdsCredential]) -> None:
    credential = make()
    assert isinstance(credential, AsyncTokenCredential)
    assert isinstance(credential, AsyncSupportsTokenInfo)


async def test_no_token_in_repr_or_str(imds: FakeImds, make: Callable[..., ImdsCredential]) -> None:
    credential = make(CLIENT_A)
    token = await credential.get_token(VAULT_SCOPE)
    for text in (repr(credential), str(credential), repr(credential._tokens)):
        assert token.token not in text
    assert CLIENT_A in repr(credential)


async def test_borrowed_session_is_used_and_left_open(imds: FakeImds) -> None:
    async with aiohttp.ClientSession() as session:
        async with ImdsCredential(imds.endpoint, session=session, retry=FAST) as credential:
            await credential.get_token(VAULT_SCOPE)
        assert not session.closed
        async with session.get(imds.endpoint + "/oauth2/token") as response:
            assert response.status == 400  # still usable: the fake says the header is missing


async def test_own_session_is_closed_and_reopened(imds: FakeImds) -> None:
    credential = ImdsCredential(imds.endpoint, retry=FAST)
    await credential.get_token(VAULT_SCOPE)
    session = credential._session
    assert session is not None
    await credential.close()
    assert session.closed
    await credential.get_token(VAULT_SCOPE)  # usable again, with a new session
    assert imds.count == 2  # close() forgot the cached token
    await credential.close()


# --------------------------------------------------------------------------- azure-core policies


async def test_bearer_token_policy_uses_the_credential(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    policy: AsyncBearerTokenCredentialPolicy[Any, Any] = AsyncBearerTokenCredentialPolicy(
        make(), VAULT_SCOPE
    )
    for _ in range(3):
        request = PipelineRequest(
            HttpRequest("GET", "https://myvault.vault.azure.net/secrets/x/"), PipelineContext(None)
        )
        await policy.on_request(request)
        assert request.http_request.headers["Authorization"] == f"Bearer {imds.issued[0]}"
    assert imds.count == 1


async def test_key_vault_challenge_policy_options(
    imds: FakeImds, make: Callable[..., ImdsCredential]
) -> None:
    # What the Key Vault challenge policy passes: enable_cae and the challenge's tenant.
    credential = make()
    info = await credential.get_token_info(
        VAULT_SCOPE, options={"enable_cae": True, "tenant_id": "72f988bf-0000"}
    )
    assert isinstance(info, AccessTokenInfo)
    assert info.token_type == "Bearer"
    assert info.refresh_on is not None
    assert info.refresh_on < info.expires_on
    token = await credential.get_token(VAULT_SCOPE, tenant_id="72f988bf-0000", enable_cae=True)
    assert token.token == info.token
    assert imds.count == 1


def _tls_pair(tmp_path: Path, host: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for ``host``, and a client trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp_path / "vault.crt").write_bytes(cert_pem)
    (tmp_path / "vault.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp_path / "vault.crt", tmp_path / "vault.key")
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return server, client


async def test_secret_client_authenticates_with_imds_credential(
    imds: FakeImds, make: Callable[..., ImdsCredential], tmp_path: Path
) -> None:
    host = "myvault.vault.azure.net"
    secret_id = f"https://{host}/secrets/web/0123456789abcdef0123456789abcdef"
    seen_auth: list[str | None] = []

    async def get_secret(request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        seen_auth.append(auth)
        if auth is None or auth.removeprefix("Bearer ") not in imds.issued:
            return web.Response(
                status=401,
                headers={
                    "WWW-Authenticate": 'Bearer authorization="https://login.microsoftonline.com/'
                    '72f988bf-86f1-41af-91ab-2d7cd011db47", resource="https://vault.azure.net"'
                },
            )
        body = {"value": "s3cret", "id": secret_id, "attributes": {"enabled": True}}
        return web.json_response(body)

    server_tls, client_tls = _tls_pair(tmp_path, host)
    app = web.Application()
    app.router.add_get("/secrets/{name}/", get_secret)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
    await site.start()
    try:
        port = runner.addresses[0][1]
        connector = aiohttp.TCPConnector(
            resolver=RedirectResolver({"*": f"127.0.0.1:{port}"}), ssl=client_tls
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            client = SecretClient(
                f"https://{host}",
                make(),
                transport=AioHttpTransport(session=session, session_owner=False),
                retry_total=0,
            )
            async with client:
                for _ in range(3):
                    secret = await client.get_secret("web")
                    assert secret.value == "s3cret"
    finally:
        await runner.cleanup()
    assert seen_auth[0] is None  # the challenge round
    assert seen_auth[1:] == [f"Bearer {imds.issued[0]}"] * 3
    assert imds.count == 1


# --------------------------------------------------------------------------- selection


def settings(auth: dict[str, str] | None = None, overrides: tuple[str, ...] = ()) -> AgentSettings:
    certs: list[Any] = ["https://myvault.vault.azure.net/secrets/plain"]
    for index, client_id in enumerate(overrides):
        certs.append(
            {
                "url": f"https://myvault.vault.azure.net/secrets/override{index}",
                "authenticationOverride": {"msiClientId": client_id},
            }
        )
    doc: dict[str, Any] = {"secretsManagementSettings": {"observedCertificates": certs}}
    if auth is not None:
        doc["authenticationSettings"] = auth
    return parse_settings(json.dumps(doc))


class RecordingMI(ManagedIdentityCredential):
    """azure-identity's credential, remembering what it was built with."""

    built: list[dict[str, Any]] = []

    def __init__(self, **kwargs: Any) -> None:
        RecordingMI.built.append(kwargs)
        super().__init__(**kwargs)


@pytest.fixture
def recording_mi(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    for name in (
        "IDENTITY_ENDPOINT",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "AZURE_FEDERATED_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    RecordingMI.built = []
    monkeypatch.setattr(factory, "ManagedIdentityCredential", RecordingMI)
    return RecordingMI.built


IMDS = "http://169.254.169.254/metadata/identity"


@pytest.mark.parametrize(
    ("auth", "override", "client_id"),
    [
        (None, None, None),
        ({}, None, None),
        ({"msiEndpoint": IMDS}, None, None),
        ({"msiEndpoint": IMDS + "/"}, None, None),
        ({"msiEndpoint": IMDS + "/oauth2/token"}, None, None),
        ({"msiEndpoint": "http://169.254.169.254:80/metadata/identity/"}, None, None),
        ({"msiEndpoint": IMDS, "msiClientId": CLIENT_A}, None, CLIENT_A),
        ({"msiEndpoint": IMDS, "msiClientId": CLIENT_A}, CLIENT_B, CLIENT_B),
        (None, CLIENT_B, CLIENT_B),
    ],
)
async def test_standard_imds_uses_azure_identity(
    recording_mi: list[dict[str, Any]],
    auth: dict[str, str] | None,
    override: str | None,
    client_id: str | None,
) -> None:
    agent = settings(auth) if auth is not None else None
    credential = credential_from_settings(agent, override)
    try:
        assert isinstance(credential, ManagedIdentityCredential)
        assert recording_mi == [{"client_id": client_id}]
    finally:
        await credential.close()


@pytest.mark.parametrize(
    ("endpoint", "api_version"),
    [
        ("http://localhost:40342/metadata/identity", ARC_API_VERSION),
        ("http://127.0.0.1:40342/metadata/identity/", ARC_API_VERSION),
        ("http://127.0.0.1:8080/metadata/identity", "2018-02-01"),
        ("http://imds-proxy.internal/metadata/identity", "2018-02-01"),
        ("https://169.254.169.254/metadata/identity", "2018-02-01"),
        ("http://169.254.169.254:8080/metadata/identity", "2018-02-01"),
    ],
)
@pytest.mark.parametrize("client_id", [None, CLIENT_A])
async def test_other_endpoints_use_imds_credential(
    recording_mi: list[dict[str, Any]], endpoint: str, api_version: str, client_id: str | None
) -> None:
    auth = {"msiEndpoint": endpoint} | ({"msiClientId": client_id} if client_id else {})
    credential = credential_from_settings(settings(auth))
    try:
        assert isinstance(credential, ImdsCredential)
        assert credential.client_id == client_id
        assert credential._api_version == api_version
        assert credential.endpoint.endswith("/metadata/identity/oauth2/token")
        assert recording_mi == []
    finally:
        await credential.close()


async def test_override_client_id_reaches_imds_credential(imds: FakeImds) -> None:
    credential = credential_from_settings(
        settings({"msiEndpoint": imds.endpoint, "msiClientId": CLIENT_A}), CLIENT_B
    )
    assert isinstance(credential, ImdsCredential)
    async with credential:
        await credential.get_token(VAULT_SCOPE)
    assert imds.requests[0].query["client_id"] == CLIENT_B


async def test_session_is_passed_on(recording_mi: list[dict[str, Any]], imds: FakeImds) -> None:
    async with aiohttp.ClientSession() as session:
        mi = credential_from_settings(None, session=session)
        transport = recording_mi[0]["transport"]
        assert isinstance(transport, AioHttpTransport)
        assert transport.session is session
        await mi.close()
        custom = credential_from_settings(settings({"msiEndpoint": imds.endpoint}), session=session)
        assert isinstance(custom, ImdsCredential)
        await custom.get_token(VAULT_SCOPE)
        assert custom._session is session
        await custom.close()
        assert not session.closed


def test_standard_imds_detection() -> None:
    assert is_standard_imds(IMDS)
    assert is_standard_imds(IMDS + "/oauth2/token/")
    assert is_standard_imds("HTTP://169.254.169.254/Metadata/Identity")
    assert not is_standard_imds("http://169.254.169.254/metadata/instance")
    assert not is_standard_imds("http://169.254.169.254/metadata/identity?x=1")
    assert not is_standard_imds("http://localhost:40342/metadata/identity")
    assert not is_standard_imds("http://169.254.169.254:notaport/metadata/identity")


async def test_credential_cache_shares_per_identity(recording_mi: list[dict[str, Any]]) -> None:
    agent = settings({"msiEndpoint": IMDS, "msiClientId": CLIENT_A}, overrides=(CLIENT_B, CLIENT_A))
    plain, override_b, override_a = agent.observed
    async with CredentialCache(agent) as cache:
        default = cache.for_certificate(plain)
        assert cache.for_certificate(override_a) is default  # same identity as the settings
        b = cache.for_certificate(override_b)
        assert b is not default
        assert cache.get(CLIENT_B.upper()) is b  # client ids are GUIDs: case-insensitive
        assert cache.get() is default
        assert len(cache) == 2
        assert cache.overrides(agent.observed) == {
            override_b.uri: b,
            override_a.uri: default,
        }
    assert [kw["client_id"] for kw in recording_mi] == [CLIENT_A, CLIENT_B]
    with pytest.raises(RuntimeError, match="closed"):
        cache.get()


async def test_credential_cache_closes_everything(imds: FakeImds) -> None:
    agent = settings({"msiEndpoint": imds.endpoint}, overrides=(CLIENT_A, CLIENT_B))
    cache = CredentialCache(agent)
    credentials = [cache.for_certificate(cert) for cert in agent.observed]
    assert len({id(c) for c in credentials}) == 3
    sessions = []
    for shared in credentials:
        assert isinstance(shared, SharedCredential)  # single flight across certificates
        credential = shared.inner
        assert isinstance(credential, ImdsCredential)
        await shared.get_token(VAULT_SCOPE)
        sessions.append(credential._session)
    assert {r.query.get("client_id") for r in imds.requests} == {None, CLIENT_A, CLIENT_B}
    await cache.aclose()
    assert all(s is not None and s.closed for s in sessions)


async def test_credential_cache_keeps_closing_after_a_failure(
    recording_mi: list[dict[str, Any]],
) -> None:
    cache = CredentialCache(settings({"msiEndpoint": IMDS}, overrides=(CLIENT_A,)))
    first = cache.get()
    second = cache.get(CLIENT_A)
    closed: list[object] = []

    async def broken() -> None:
        raise OSError("boom")

    async def fine() -> None:
        closed.append(second)

    first.close = broken  # type: ignore[method-assign]
    second.close = fine  # type: ignore[method-assign]
    await cache.aclose()
    assert closed == [second]


def test_basic_realm_parsing() -> None:
    match = imds_module._ARC_CHALLENGE.match('Basic realm="/var/opt/azcmagent/tokens/a b.key"')
    assert match is not None
    assert match.group("realm").strip('"') == "/var/opt/azcmagent/tokens/a b.key"
    assert imds_module._ARC_CHALLENGE.match("Bearer realm=x") is None
