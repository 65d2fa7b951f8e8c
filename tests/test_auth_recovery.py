"""Token trouble told and healed truly (issue 15, items 4 and 5), against the emulator.

A 401 from the vault to a token the credential still trusts (revoked, a clock off) is healed by
one fresh token, shared by every poll in flight, and then fails normally; IMDS trouble is reported
as the managed identity endpoint's, with its status, never as the vault's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import pytest
from azure.core.credentials import AccessToken
from azure.keyvault.secrets._shared import http_challenge_cache

from kvcertsync import parse_settings
from kvcertsync.auth import ImdsAuthenticationError, ImdsCredential, ImdsRetry, SharedCredential
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.errors import AuthenticationFailed
from kvcertsync.sources import KeyVaultSource
from kvcertsync.sources.keyvault import MODES, Mode
from kvcertsync.uri import SecretUri

pytestmark = pytest.mark.anyio

SECRET = SecretUri.parse("https://demo.vault.azure.net/secrets/s")
CLIENT_A = "11111111-aaaa-4aaa-8aaa-111111111111"
CLIENT_B = "22222222-bbbb-4bbb-8bbb-222222222222"
QUICK = ImdsRetry(backoff=0.01, max_delay=0.05, gone_budget=0.4)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def kv() -> AsyncIterator[LocalKeyVault]:
    http_challenge_cache.clear()  # the SDK caches challenges per host for the whole process
    async with LocalKeyVault() as vault:
        vault.set_secret("demo", "s", "value")
        yield vault


@pytest.fixture
async def silent_endpoint() -> AsyncIterator[str]:
    """An IMDS that accepts connections and never answers (a hung endpoint): its msiEndpoint."""
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/metadata/identity"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.fixture
def azure_identity_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Point azure-identity's IMDS at an authority (``http://127.0.0.1:port``)."""
    for name in (
        "IDENTITY_ENDPOINT",
        "IMDS_ENDPOINT",
        "MSI_ENDPOINT",
        "AZURE_FEDERATED_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)

    def point(authority: str) -> None:
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", authority)

    yield point


def imds_source(kv: LocalKeyVault, credential: Any = None, **options: Any) -> KeyVaultSource:
    return KeyVaultSource(
        credential or ImdsCredential(kv.imds_endpoint, retry=QUICK),
        ca_file=kv.ca_file,
        redirect=kv.redirect,
        owns_credentials=True,
        **options,
    )


def settings_source(kv: LocalKeyVault, auth: dict[str, str] | None = None, **options: Any) -> Any:
    """A source built from extension settings (no msiEndpoint: azure-identity's credential)."""
    document: dict[str, Any] = {
        "secretsManagementSettings": {"observedCertificates": [str(SECRET)]}
    }
    if auth is not None:
        document["authenticationSettings"] = auth
    return KeyVaultSource.from_settings(
        parse_settings(document), ca_file=kv.ca_file, redirect=kv.redirect, **options
    )


async def concurrently(source: KeyVaultSource, count: int) -> list[str]:
    values: list[str] = []

    async def one() -> None:
        values.append((await source.get(SECRET)).value)

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(one)
    return values


async def token_failure(source: KeyVaultSource) -> ImdsAuthenticationError:
    """The ImdsAuthenticationError a get through ``source`` raises (within a generous bound)."""
    async with source:
        with anyio.fail_after(30), pytest.raises(ImdsAuthenticationError) as failed:
            await source.get(SECRET)
    return failed.value


# ---------------------------------------------------------------- item 4: a refused token


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["ImdsCredential", "azure-identity"])
async def test_a_revoked_token_is_replaced_once_for_every_poll_in_flight(
    kv: LocalKeyVault, azure_identity_at: Any, kind: str, mode: Mode
) -> None:
    azure_identity_at(kv.imds_authority)
    if kind == "ImdsCredential":
        source = imds_source(kv, mode=mode)
    else:
        source = settings_source(kv, mode=mode)
    async with source:
        assert (await source.get(SECRET)).value == "value"
        assert kv.imds_requests == 1
        assert kv.revoke_tokens() == 1  # the credential still trusts its token for an hour
        assert await concurrently(source, 20) == ["value"] * 20
        assert kv.imds_requests == 2  # one fresh token, shared by the twenty polls
        assert (await source.get(SECRET)).value == "value"
        assert kv.imds_requests == 2


@pytest.mark.parametrize("mode", MODES)
async def test_a_vault_that_refuses_the_fresh_token_too_fails_without_asking_again(
    kv: LocalKeyVault, mode: Mode
) -> None:
    now = [0.0]  # the pause's own clock: four real requests must not outlast it on a slow host
    shared = SharedCredential(
        ImdsCredential(kv.imds_endpoint, retry=QUICK), renew_pause=0.5, clock=lambda: now[0]
    )
    async with imds_source(kv, shared, mode=mode) as source:
        await source.get(SECRET)
        kv.revoke_tokens()
        await source.get(SECRET)  # healed by a fresh token
        assert kv.imds_requests == 2
        kv.revoke_tokens()  # the fresh one refused as well, moments later
        for _ in range(3):
            with pytest.raises(AuthenticationFailed) as refused:
                await source.get(SECRET)
            message = str(refused.value)
            assert message.startswith(f"{SECRET}: the vault refused the token (401: Unauthorized")
            assert "The access token has been revoked." in message
            assert "fetched fresh after an earlier refusal" in message
        assert kv.imds_requests == 2  # failed normally: no token request per poll
        now[0] += 0.6  # renew_pause over: the next refusal may ask again, once
        assert (await source.get(SECRET)).value == "value"
        assert kv.imds_requests == 3


class FixedToken:
    """A credential that always hands out one token (as a static-token credential does)."""

    def __init__(self, token: AccessToken) -> None:
        self.token = token
        self.asked = 0

    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.asked += 1
        return self.token

    async def close(self) -> None:
        pass

    async def __aenter__(self) -> FixedToken:
        return self

    async def __aexit__(self, *exc: object) -> None:
        pass


@pytest.mark.parametrize("mode", MODES)
async def test_a_credential_that_cannot_renew_is_asked_once_more_then_fails(
    kv: LocalKeyVault, mode: Mode
) -> None:
    async with ImdsCredential(kv.imds_endpoint) as imds:
        token = await imds.get_token("https://vault.azure.net/.default")
    fixed = FixedToken(token)
    async with imds_source(kv, fixed, mode=mode) as source:
        await source.get(SECRET)
        kv.revoke_tokens()
        requests = len(kv.requests)
        with pytest.raises(AuthenticationFailed, match="and a freshly fetched one too"):
            await source.get(SECRET)
    # One get, one renewal. The SDK's policy asks the credential again after every 401 (two
    # rounds of token, 401, challenge, 401); the direct path keeps a refused token only until
    # it is refused (token, 401; fresh token, 401): asked once more either way.
    assert fixed.asked == (1 + 2 if mode == "sdk" else 1 + 1)
    assert len(kv.requests) - requests <= (5 if mode == "sdk" else 2)


# ---------------------------------------------------------------- item 5: IMDS trouble named


async def test_imds_410_is_the_managed_identity_endpoints_fault(kv: LocalKeyVault) -> None:
    kv.fail_imds(410, times=None)
    error = await token_failure(imds_source(kv, timeout=0.2))
    message = str(error)
    assert message.startswith(f"managed identity endpoint {kv.imds_token_url} ")
    assert "HTTP 410" in message and "answers again within 70 s" in message
    assert "vault" not in message.replace("vault.azure.net", "")  # nothing blames the vault
    assert error.imds_status == 410 and error.retryable


async def test_a_slow_token_does_not_count_against_the_vaults_time(kv: LocalKeyVault) -> None:
    kv.fail_imds(500, times=3)  # the token arrives after about 1.4 s of IMDS retries
    credential = ImdsCredential(kv.imds_endpoint, retry=ImdsRetry(backoff=0.2, jitter=0))
    async with imds_source(kv, credential, timeout=1.0) as source:  # the token takes 1.4 s
        assert (await source.get(SECRET)).value == "value"
    assert kv.imds_requests == 4


async def test_a_hung_endpoint_is_named_not_the_vault(
    kv: LocalKeyVault, silent_endpoint: str
) -> None:
    credential = ImdsCredential(silent_endpoint, timeout=0.3, retry=ImdsRetry(attempts=2))
    error = await token_failure(imds_source(kv, credential, timeout=0.4))
    message = str(error)
    assert message.startswith(f"managed identity endpoint {silent_endpoint}/oauth2/token ")
    assert "after 2 attempts: did not answer within 0.3 s" in message
    assert "is it reachable from here?" in message
    assert error.imds_status is None


async def test_the_token_bound_ends_a_longer_credential_retry(
    kv: LocalKeyVault, silent_endpoint: str
) -> None:
    credential = ImdsCredential(silent_endpoint, timeout=30)
    error = await token_failure(imds_source(kv, credential, token_timeout=0.5))
    assert str(error).startswith(
        f"managed identity endpoint {silent_endpoint}/oauth2/token did not answer within 0.5 s"
    )


async def test_azure_identity_hung_endpoint_is_named(
    kv: LocalKeyVault, silent_endpoint: str, azure_identity_at: Any
) -> None:
    authority = silent_endpoint.removesuffix("/metadata/identity")
    azure_identity_at(authority)
    error = await token_failure(settings_source(kv, token_timeout=1))
    message = str(error)
    assert message.startswith(
        f"managed identity endpoint {authority}/metadata/identity/oauth2/token "
        "did not answer within 1 s"
    )
    assert "/secrets/" not in message


async def test_azure_identity_410_is_named_with_imds_guidance(
    kv: LocalKeyVault, azure_identity_at: Any
) -> None:
    azure_identity_at(kv.imds_authority)
    kv.fail_imds(410, times=None)  # azure-identity retries 410 for about 75 s on its own
    error = await token_failure(settings_source(kv, token_timeout=1.5))
    message = str(error)
    assert message.startswith(f"managed identity endpoint {kv.imds_token_url} gave no token")
    assert "the last answered 410" in message and "answers again within 70 s" in message
    assert error.imds_status == 410


async def test_azure_identity_unknown_identity_is_named_and_not_retried(
    kv: LocalKeyVault, azure_identity_at: Any
) -> None:
    azure_identity_at(kv.imds_authority)
    kv.client_ids = {CLIENT_A}
    auth = {"msiEndpoint": "http://169.254.169.254/metadata/identity", "msiClientId": CLIENT_B}
    error = await token_failure(settings_source(kv, auth))
    message = str(error)
    assert message.startswith(f"managed identity endpoint {kv.imds_token_url} returned 400: ")
    assert "has not been assigned" in message and "IMDS: a request error" in message
    assert not error.retryable
