"""LocalKeyVault against the real Azure SDK clients (aio and sync) and azure-identity."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity import CredentialUnavailableError
from azure.identity import ManagedIdentityCredential as SyncManagedIdentityCredential
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.secrets import SecretClient as SyncSecretClient
from azure.keyvault.secrets._shared import http_challenge_cache
from azure.keyvault.secrets.aio import SecretClient
from cryptography import x509

from kvcertsync.emulator import LocalKeyVault, TestAuthority
from kvcertsync.material import PEM_CONTENT_TYPE, PKCS12_CONTENT_TYPE, CertificateMaterial
from kvcertsync.sources.redirect import RedirectResolver

pytestmark = pytest.mark.anyio

VAULT_SCOPE = "https://vault.azure.net/.default"
API = "api-version=7.6"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _isolated_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Other managed-identity environments would take precedence over IMDS; the SDK's challenge
    # cache is process-wide and would hide the first 401 of each test.
    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET"):
        monkeypatch.delenv(name, raising=False)
    http_challenge_cache.clear()
    yield
    http_challenge_cache.clear()


@pytest.fixture
async def kv(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalKeyVault]:
    async with LocalKeyVault() as emulator:
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emulator.imds_authority)
        yield emulator


@pytest.fixture
async def session(kv: LocalKeyVault) -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(
        resolver=RedirectResolver(kv.redirect), ssl=kv.client_ssl_context()
    )
    async with aiohttp.ClientSession(connector=connector) as client_session:
        yield client_session


@contextlib.asynccontextmanager
async def open_client(
    session: aiohttp.ClientSession, vault: str = "demo", credential: Any = None
) -> AsyncIterator[SecretClient]:
    """An aio SecretClient on the shared session; closes its own credential too."""
    own = ManagedIdentityCredential() if credential is None else credential
    try:
        async with SecretClient(
            f"https://{vault}.vault.azure.net",
            own,
            transport=AioHttpTransport(session=session, session_owner=False),
            retry_total=0,
        ) as secret_client:
            yield secret_client
    finally:
        await own.close()


@pytest.fixture
async def client(session: aiohttp.ClientSession) -> AsyncIterator[SecretClient]:
    async with open_client(session) as secret_client:
        yield secret_client


async def imds_token(kv: LocalKeyVault, **params: str) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as plain,
        plain.get(
            kv.imds_token_url,
            params={"api-version": "2018-02-01", "resource": "https://vault.azure.net", **params},
            headers={"Metadata": "true"},
        ) as response,
    ):
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def raw(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    token: str | None = None,
    **kwargs: Any,
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.request(method, url, headers=headers, **kwargs) as response:
        text = await response.text()
        return response.status, dict(response.headers), json.loads(text) if text else None


def error_of(exc: HttpResponseError) -> dict[str, Any]:
    assert exc.response is not None
    body: dict[str, Any] = json.loads(exc.response.text())["error"]
    return body


# ---------------------------------------------------------------------- secrets API via the SDK


async def test_set_and_get_latest_and_by_version(kv: LocalKeyVault, client: SecretClient) -> None:
    first = await client.set_secret("app-password", "one", content_type="text/plain")
    second_version = kv.set_secret("demo", "app-password", "two", tags={"env": "test"})

    latest = await client.get_secret("app-password")
    assert latest.value == "two"
    assert latest.properties.version == second_version
    assert latest.id == f"https://demo.vault.azure.net/secrets/app-password/{second_version}"
    assert latest.properties.tags == {"env": "test"}
    assert latest.properties.enabled is True

    old = await client.get_secret("app-password", first.properties.version)
    assert old.value == "one"
    assert old.properties.content_type == "text/plain"
    # Names are case-insensitive, as in Key Vault; the id keeps the original spelling.
    assert (await client.get_secret("APP-PASSWORD")).name == "app-password"
    assert kv.versions("demo", "app-password") == [first.properties.version, second_version]
    assert len(second_version) == 32
    assert int(second_version, 16) >= 0


async def test_wire_format_matches_the_service(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    version = kv.import_certificate("demo", "web", kv.authority.issue(["web.example.com"]))
    token = (await imds_token(kv))["access_token"]
    status, headers, body = await raw(
        session, "GET", f"https://demo.vault.azure.net/secrets/web/?{API}", token
    )
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    assert body["id"] == f"https://demo.vault.azure.net/secrets/web/{version}"
    assert body["kid"] == f"https://demo.vault.azure.net/keys/web/{version}"
    assert body["managed"] is True
    assert body["contentType"] == PKCS12_CONTENT_TYPE
    attributes = body["attributes"]
    assert attributes["enabled"] is True
    assert attributes["recoveryLevel"] == "Recoverable+Purgeable"
    for key in ("nbf", "exp", "created", "updated"):
        assert isinstance(attributes[key], int)

    status, _, body = await raw(
        session, "GET", f"https://demo.vault.azure.net/secrets/web/not-a-version?{API}", token
    )
    assert status == 400
    assert body["error"]["code"] == "BadParameter"
    status, _, body = await raw(
        session, "GET", f"https://demo.vault.azure.net/secrets/web/{'0' * 32}?{API}", token
    )
    assert status == 404
    assert body["error"]["code"] == "SecretNotFound"
    assert body["error"]["message"].startswith(f"A secret with (name/id) web/{'0' * 32} was not")


async def test_list_versions_follows_next_links(kv: LocalKeyVault, client: SecretClient) -> None:
    versions = [kv.set_secret("demo", "many", f"value {i}") for i in range(7)]
    listed = [
        item.version
        async for item in client.list_properties_of_secret_versions("many", max_page_size=2)
    ]
    assert listed == versions
    pages = [r for r in kv.requests if r.path == "/secrets/many/versions" and r.status == 200]
    assert len(pages) == 4

    names = {item.name async for item in client.list_properties_of_secrets(max_page_size=1)}
    assert names == {"many"}


async def test_next_link_is_absolute_with_skiptoken(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    for i in range(3):
        kv.set_secret("demo", "paged", str(i))
    token = (await imds_token(kv))["access_token"]
    url = f"https://demo.vault.azure.net/secrets/paged/versions?{API}&maxresults=2"
    status, _, body = await raw(session, "GET", url, token)
    assert status == 200
    assert len(body["value"]) == 2
    assert "value" not in body["value"][0]
    assert body["nextLink"].startswith(
        "https://demo.vault.azure.net:443/secrets/paged/versions?api-version=7.6&$skiptoken="
    )
    status, _, body = await raw(session, "GET", body["nextLink"], token)
    assert status == 200
    assert len(body["value"]) == 1
    assert body["nextLink"] is None


async def test_disabled_version_is_forbidden(kv: LocalKeyVault, client: SecretClient) -> None:
    old = kv.set_secret("demo", "rotating", "old")
    kv.set_secret("demo", "rotating", "new")
    kv.disable("demo", "rotating", old)

    with pytest.raises(HttpResponseError) as excinfo:
        await client.get_secret("rotating", old)
    assert excinfo.value.status_code == 403
    error = error_of(excinfo.value)
    assert error["code"] == "Forbidden"
    assert error["innererror"]["code"] == "SecretDisabled"
    assert error["message"] == "Operation get is not allowed on a disabled secret."
    assert (await client.get_secret("rotating")).value == "new"

    props = await client.update_secret_properties("rotating", old, enabled=True)
    assert props.enabled is True
    assert (await client.get_secret("rotating", old)).value == "old"


async def test_not_found(
    kv: LocalKeyVault, client: SecretClient, session: aiohttp.ClientSession
) -> None:
    with pytest.raises(ResourceNotFoundError) as excinfo:
        await client.get_secret("missing")
    assert error_of(excinfo.value)["code"] == "SecretNotFound"
    kv.set_secret("demo", "present", "x")
    with pytest.raises(ResourceNotFoundError):
        await client.get_secret("present", "f" * 32)
    async with open_client(session, "nowhere") as elsewhere:
        with pytest.raises(ResourceNotFoundError):
            await elsewhere.get_secret("present")


async def test_delete_and_name_reuse(kv: LocalKeyVault, client: SecretClient) -> None:
    kv.set_secret("demo", "gone", "x")
    deleted = await client.delete_secret("gone")
    assert deleted.recovery_id == "https://demo.vault.azure.net/deletedsecrets/gone"
    assert deleted.deleted_date is not None and deleted.scheduled_purge_date is not None
    with pytest.raises(ResourceNotFoundError):
        await client.get_secret("gone")
    with pytest.raises(ResourceExistsError) as excinfo:
        await client.set_secret("gone", "again")
    assert error_of(excinfo.value)["innererror"]["code"] == "ObjectIsDeletedButRecoverable"
    await client.purge_deleted_secret("gone")
    assert (await client.set_secret("gone", "again")).value == "again"


async def test_update_properties_and_recover(kv: LocalKeyVault, client: SecretClient) -> None:
    version = kv.set_secret("demo", "props", "x", "text/plain")
    props = await client.update_secret_properties(
        "props", content_type="application/json", tags={"owner": "me"}
    )
    assert props.version == version
    assert props.content_type == "application/json"
    assert props.tags == {"owner": "me"}
    stored = kv.secret("demo", "props")
    assert stored.content_type == "application/json"
    assert stored.value == "x"

    await client.delete_secret("props")
    deleted = [item.name async for item in client.list_deleted_secrets()]
    assert deleted == ["props"]
    recovered = await client.recover_deleted_secret("props")
    assert recovered.version == version
    assert (await client.get_secret("props")).value == "x"


async def test_validity_is_informational_unless_enforced() -> None:
    async with (
        LocalKeyVault(require_auth=False) as loose,
        LocalKeyVault(require_auth=False, enforce_validity=True) as strict,
    ):
        for emulator in (loose, strict):
            emulator.set_secret("localhost", "later", "v", not_before=time.time() + 3600)
            emulator.set_secret("localhost", "expired", "v", expires=time.time() - 60)
        expected = {
            loose: {"later": (200, None), "expired": (200, None)},
            strict: {"later": (403, "SecretNotYetValid"), "expired": (403, "SecretExpired")},
        }
        async with aiohttp.ClientSession() as plain:
            for emulator, outcomes in expected.items():
                for name, (status, inner) in outcomes.items():
                    url = f"{emulator.local_url}/secrets/{name}?{API}"
                    async with plain.get(url, ssl=emulator.client_ssl_context()) as response:
                        assert response.status == status
                        body = await response.json()
                        if inner:
                            assert body["error"]["innererror"]["code"] == inner


async def test_malformed_requests(kv: LocalKeyVault, session: aiohttp.ClientSession) -> None:
    token = (await imds_token(kv))["access_token"]
    vault = "https://demo.vault.azure.net"
    cases = [
        ("PUT", f"/secrets/bad_name?{API}", {"value": "x"}, 400, "BadParameter"),
        ("PUT", f"/secrets/ok?{API}", {"novalue": 1}, 400, "BadParameter"),
        ("PUT", f"/secrets/ok?{API}", {"value": "x" * 30_000}, 400, "BadParameter"),
        ("GET", "/secrets/ok", None, 400, "BadParameter"),  # no api-version
        ("GET", f"/secrets?{API}&maxresults=26", None, 400, "BadParameter"),
        ("POST", f"/secrets/ok?{API}", None, 405, "MethodNotAllowed"),
        ("GET", f"/keys/k?{API}", None, 404, "KeyNotFound"),
    ]
    for method, path, body, status, code in cases:
        got, _, answer = await raw(session, method, vault + path, token, json=body)
        assert (got, answer["error"]["code"]) == (status, code), (method, path)
    assert kv.request_counts == {"demo": len(cases)}


# ---------------------------------------------------------------------- authentication


async def test_challenge_comes_first(kv: LocalKeyVault, session: aiohttp.ClientSession) -> None:
    kv.set_secret("demo", "s", "v")
    async with open_client(session) as secret_client:
        await secret_client.get_secret("s")
        await secret_client.get_secret("s")
    assert [(r.path, r.status) for r in kv.requests] == [
        ("/secrets/s/", 401),
        ("/secrets/s/", 200),
        ("/secrets/s/", 200),
    ]
    assert kv.imds_requests == 1

    status, headers, body = await raw(
        session, "GET", f"https://demo.vault.azure.net/secrets/s?{API}"
    )
    assert status == 401
    assert headers["WWW-Authenticate"] == (
        f'Bearer authorization="https://login.microsoftonline.com/{kv.tenant_id}", '
        'resource="https://vault.azure.net"'
    )
    assert body["error"]["code"] == "Unauthorized"


class _FakeCredential:
    async def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("not-from-the-emulator", int(time.time()) + 3600)

    async def close(self) -> None:
        pass


async def test_unknown_token_is_rejected(kv: LocalKeyVault, session: aiohttp.ClientSession) -> None:
    kv.set_secret("demo", "s", "v")
    async with open_client(session, credential=_FakeCredential()) as secret_client:
        with pytest.raises(ClientAuthenticationError):
            await secret_client.get_secret("s")
    assert [r.status for r in kv.requests] == [401, 401]
    status, headers, _ = await raw(
        session, "GET", f"https://demo.vault.azure.net/secrets/s?{API}", "forged"
    )
    assert status == 401
    assert "WWW-Authenticate" in headers


async def test_without_auth() -> None:
    async with LocalKeyVault(require_auth=False) as open_kv:
        open_kv.set_secret("localhost", "s", "v")
        async with aiohttp.ClientSession() as plain:
            url = f"{open_kv.local_url}/secrets/s?{API}"
            async with plain.get(url, ssl=open_kv.client_ssl_context()) as response:
                assert response.status == 200
                assert (await response.json())["value"] == "v"


# ---------------------------------------------------------------------- faults


@pytest.mark.parametrize("retry_after", [True, 7, False])
async def test_throttling(kv: LocalKeyVault, client: SecretClient, retry_after: bool | int) -> None:
    kv.set_secret("demo", "s", "v")
    await client.get_secret("s")  # the 401 challenge happens before the rule exists
    kv.throttle("demo", limit=2, window=30, retry_after=retry_after)
    await client.get_secret("s")
    await client.get_secret("s")
    with pytest.raises(HttpResponseError) as excinfo:
        await client.get_secret("s")
    assert excinfo.value.status_code == 429
    error = error_of(excinfo.value)
    assert error["code"] == "Throttled"
    assert "VaultRequestTypeLimitReached" in error["message"]
    assert excinfo.value.response is not None
    header = excinfo.value.response.headers.get("Retry-After")
    if retry_after is False:
        assert header is None
    elif retry_after is True:
        assert header is not None and 1 <= int(header) <= 30
    else:
        assert header == "7"
    kv.reset_faults()
    assert (await client.get_secret("s")).value == "v"


async def test_throttling_is_per_vault(kv: LocalKeyVault, session: aiohttp.ClientSession) -> None:
    kv.set_secret("demo", "s", "v")
    kv.set_secret("other", "s", "w")
    kv.throttle(limit=3)  # every vault, each counted on its own
    async with open_client(session, "demo") as demo, open_client(session, "other") as other:
        await demo.get_secret("s")  # 401 + 200
        await other.get_secret("s")
        await demo.get_secret("s")
        with pytest.raises(HttpResponseError):
            await demo.get_secret("s")
        assert (await other.get_secret("s")).value == "w"


async def test_injected_failures(kv: LocalKeyVault, client: SecretClient) -> None:
    kv.set_secret("demo", "s", "v")
    await client.get_secret("s")
    kv.fail(status=503)
    with pytest.raises(HttpResponseError) as excinfo:
        await client.get_secret("s")
    assert excinfo.value.status_code == 503
    assert error_of(excinfo.value)["code"] == "ServiceUnavailable"
    assert (await client.get_secret("s")).value == "v"

    kv.fail("demo", status=403, inner_code="ForbiddenByRbac", times=None)
    for _ in range(2):
        with pytest.raises(HttpResponseError) as excinfo:
            await client.get_secret("s")
        assert error_of(excinfo.value)["innererror"]["code"] == "ForbiddenByRbac"
    kv.reset_faults()
    assert (await client.get_secret("s")).value == "v"


async def test_dropped_connection(
    kv: LocalKeyVault, client: SecretClient, session: aiohttp.ClientSession
) -> None:
    kv.set_secret("demo", "s", "v")
    await client.get_secret("s")
    # aiohttp resends an idempotent request once after a disconnect: two drops fail one GET.
    kv.drop_connections(times=2)
    with pytest.raises(ServiceRequestError):
        await client.get_secret("s")
    assert [r.status for r in kv.requests[-2:]] == [None, None]
    assert (await client.get_secret("s")).value == "v"

    kv.drop_connections(times=2)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await raw(session, "GET", f"https://demo.vault.azure.net/secrets/s?{API}")


async def test_latency(kv: LocalKeyVault, client: SecretClient) -> None:
    kv.set_secret("demo", "s", "v")
    await client.get_secret("s")
    kv.latency(0.3)
    start = time.monotonic()
    await client.get_secret("s")
    assert time.monotonic() - start >= 0.3
    kv.latency(0, "demo")
    kv.latency(0)
    start = time.monotonic()
    await client.get_secret("s")
    assert time.monotonic() - start < 0.3


async def test_request_counts_per_vault(kv: LocalKeyVault, session: aiohttp.ClientSession) -> None:
    kv.set_secret("alpha", "s", "a")
    kv.set_secret("beta", "s", "b")
    async with open_client(session, "alpha") as alpha, open_client(session, "beta") as beta:
        for _ in range(3):
            await alpha.get_secret("s")
        await beta.get_secret("s")
    assert kv.request_counts == {"alpha": 4, "beta": 2}  # each client's first GET is challenged
    assert {r.vault for r in kv.requests} == {"alpha", "beta"}


async def test_shutdown_closes_connections_promptly(monkeypatch: pytest.MonkeyPatch) -> None:
    emulator = LocalKeyVault(require_auth=False)
    await emulator.start()
    emulator.set_secret("localhost", "s", "v")
    emulator.latency(30)
    ca_file = emulator.ca_file
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=emulator.client_ssl_context())
    ) as plain:
        errors: list[BaseException] = []

        async def slow_request() -> None:
            try:
                async with plain.get(f"{emulator.local_url}/secrets/s?{API}") as response:
                    await response.read()
            except aiohttp.ClientError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_request)
            await anyio.sleep(0.2)
            start = time.monotonic()
            await emulator.aclose()
            assert time.monotonic() - start < 2
        assert errors
    assert not await anyio.Path(ca_file).exists()


# ---------------------------------------------------------------------- certificates


@pytest.mark.parametrize("content_type", [PKCS12_CONTENT_TYPE, PEM_CONTENT_TYPE])
async def test_import_certificate_round_trip(
    kv: LocalKeyVault, client: SecretClient, content_type: str
) -> None:
    material = kv.authority.issue(["shop.example.com", "www.shop.example.com"])
    version = kv.import_certificate("demo", "shop", material, content_type)
    secret = await client.get_secret("shop")
    assert secret.properties.version == version
    assert secret.properties.content_type == content_type
    assert secret.properties.managed is True
    assert secret.properties.key_id == f"https://demo.vault.azure.net/keys/shop/{version}"
    assert secret.properties.not_before == material.not_before.replace(microsecond=0)
    assert secret.properties.expires_on == material.not_after.replace(microsecond=0)
    assert secret.value is not None
    parsed = CertificateMaterial.from_secret(secret.value, secret.properties.content_type)
    assert parsed.thumbprint == material.thumbprint
    assert parsed.dns_names == material.dns_names

    other = PEM_CONTENT_TYPE if content_type == PKCS12_CONTENT_TYPE else PKCS12_CONTENT_TYPE
    converted = await client.get_secret("shop", out_content_type=other)
    assert converted.properties.content_type == other
    assert converted.value is not None
    assert CertificateMaterial.from_secret(converted.value, other).thumbprint == material.thumbprint


async def test_import_certificate_bytes(kv: LocalKeyVault) -> None:
    material = kv.authority.issue(["bytes.example.com"])
    kv.import_certificate("demo", "raw", material.to_pkcs12())
    kv.import_certificate("demo", "pem", material.to_pem_bundle(), PEM_CONTENT_TYPE)
    for name in ("raw", "pem"):
        stored = kv.secret("demo", name)
        assert stored.managed
        assert stored.expires == material.not_after.replace(microsecond=0)
        thumbprint = CertificateMaterial.from_secret(stored.value, stored.content_type).thumbprint
        assert thumbprint == material.thumbprint
        assert stored.value not in repr(stored)


async def test_rotate(kv: LocalKeyVault, client: SecretClient) -> None:
    original = kv.authority.issue(["api.example.com", "api2.example.com"], key="rsa", days=30)
    first = kv.import_certificate("demo", "api", original, PEM_CONTENT_TYPE, tags={"team": "a"})
    second = kv.rotate("demo", "api")
    assert second != first
    assert kv.versions("demo", "api") == [first, second]
    secret = await client.get_secret("api")
    assert secret.properties.version == second
    assert secret.properties.content_type == PEM_CONTENT_TYPE
    assert secret.properties.tags == {"team": "a"}
    assert secret.value is not None
    rotated = CertificateMaterial.from_secret(secret.value, secret.properties.content_type)
    assert rotated.thumbprint != original.thumbprint
    assert rotated.dns_names == original.dns_names
    assert type(rotated.private_key) is type(original.private_key)
    assert rotated.chain[-1].issuer == kv.authority.root_certificate.subject

    given = kv.authority.issue(["else.example.com"])
    kv.rotate("demo", "api", given)
    assert kv.secret("demo", "api").version == kv.versions("demo", "api")[-1]


async def test_shared_authority_and_state_dir(tmp_path: Path) -> None:
    authority = TestAuthority("shared")
    async with LocalKeyVault(authority=authority, state_dir=tmp_path / "state") as emulator:
        assert emulator.authority is authority
        assert emulator.ca_file == str(tmp_path / "state" / "ca.pem")
        ca = x509.load_pem_x509_certificate(await anyio.Path(emulator.ca_file).read_bytes())
        assert ca == authority.root_certificate
    assert await anyio.Path(tmp_path / "state" / "ca.pem").exists()


# ---------------------------------------------------------------------- IMDS


async def test_imds_token_fields(kv: LocalKeyVault) -> None:
    body = await imds_token(kv)
    assert set(body) == {
        "access_token",
        "client_id",
        "expires_in",
        "expires_on",
        "ext_expires_in",
        "not_before",
        "resource",
        "token_type",
    }
    assert all(isinstance(value, str) for value in body.values())
    assert body["token_type"] == "Bearer"
    assert body["resource"] == "https://vault.azure.net"
    assert body["expires_in"] == "3600"
    assert abs(int(body["expires_on"]) - (time.time() + 3600)) < 5
    assert body["client_id"] == kv.system_client_id
    assert (await imds_token(kv, client_id="abc"))["client_id"] == "abc"
    assert kv.imds_endpoint + "/oauth2/token" == kv.imds_token_url
    assert kv.imds_requests == 2


async def test_imds_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    async with LocalKeyVault(client_ids={"11111111-1111-1111-1111-111111111111"}) as emulator:
        async with aiohttp.ClientSession() as plain:
            params = {"api-version": "2018-02-01", "resource": "https://vault.azure.net"}
            async with plain.get(emulator.imds_token_url, params=params) as response:
                assert response.status == 400
                assert await response.json() == {
                    "error": "invalid_request",
                    "error_description": "Required metadata header not specified",
                }
            async with plain.get(
                emulator.imds_token_url,
                params={**params, "client_id": "22222222-2222-2222-2222-222222222222"},
                headers={"Metadata": "true"},
            ) as response:
                assert response.status == 400
                assert await response.json() == {
                    "error": "invalid_request",
                    "error_description": "Identity not found",
                }
            emulator.fail_imds(410)
            async with plain.get(
                emulator.imds_token_url, params=params, headers={"Metadata": "true"}
            ) as response:
                assert response.status == 410
        assert await imds_token(emulator, client_id="11111111-1111-1111-1111-111111111111")

        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emulator.imds_authority)
        async with ManagedIdentityCredential(
            client_id="33333333-3333-3333-3333-333333333333"
        ) as cred:
            with pytest.raises(CredentialUnavailableError, match="Identity not found"):
                await cred.get_token(VAULT_SCOPE)


async def test_imds_fault_is_retried_by_azure_identity(kv: LocalKeyVault) -> None:
    kv.fail_imds(500)
    async with ManagedIdentityCredential() as cred:
        token = await cred.get_token(VAULT_SCOPE)
    assert token.token
    assert kv.imds_requests == 2


# ---------------------------------------------------------------------- sync SDK, admin, CLI


async def test_sync_client_over_localhost(kv: LocalKeyVault) -> None:
    kv.set_secret("localhost", "plain", "sync value")
    material = kv.authority.issue(["sync.example.com"])
    kv.import_certificate("localhost", "cert", material)

    def use_sync_sdk() -> tuple[str | None, str | None, list[str]]:
        credential = SyncManagedIdentityCredential()
        with SyncSecretClient(
            kv.local_url,
            credential,
            connection_verify=kv.ca_file,
            verify_challenge_resource=False,
            retry_total=0,
        ) as sync_client:
            plain = sync_client.get_secret("plain").value
            cert = sync_client.get_secret("cert")
            versions = [
                p.version or "" for p in sync_client.list_properties_of_secret_versions("plain")
            ]
            return plain, cert.value, versions

    plain, cert_value, versions = await anyio.to_thread.run_sync(use_sync_sdk)
    assert plain == "sync value"
    assert cert_value is not None
    assert CertificateMaterial.from_secret(cert_value).thumbprint == material.thumbprint
    assert versions == kv.versions("localhost", "plain")
    assert set(kv.request_counts) == {"localhost"}


async def test_sync_client_sees_the_service_errors(kv: LocalKeyVault) -> None:
    kv.set_secret("localhost", "off", "x")
    kv.disable("localhost", "off")
    kv.set_secret("localhost", "busy", "x")

    def use_sync_sdk() -> dict[str, object]:
        seen: dict[str, object] = {}
        with SyncSecretClient(
            kv.local_url,
            SyncManagedIdentityCredential(),
            connection_verify=kv.ca_file,
            verify_challenge_resource=False,
            retry_total=0,
        ) as sync_client:
            try:
                sync_client.get_secret("missing")
            except ResourceNotFoundError as error:
                seen["missing"] = error.status_code
            try:
                sync_client.get_secret("off")
            except HttpResponseError as error:
                seen["off"] = (error.status_code, error.response.text())
            for retry_after in (3, False):
                kv.throttle("localhost", limit=0, retry_after=retry_after)
                try:
                    sync_client.get_secret("busy")
                except HttpResponseError as error:
                    seen[f"busy-{retry_after}"] = (
                        error.status_code,
                        error.response.headers.get("Retry-After"),
                    )
                kv.reset_faults()
        return seen

    seen = await anyio.to_thread.run_sync(use_sync_sdk)
    assert seen["missing"] == 404
    status, body = seen["off"]  # type: ignore[misc]
    assert status == 403 and "SecretDisabled" in body
    assert seen["busy-3"] == (429, "3")
    assert seen["busy-False"] == (429, None)
    # The first request of the sync client met the bearer challenge too.
    assert next(r.status for r in kv.requests if r.vault == "localhost") == 401


async def test_admin_routes(kv: LocalKeyVault, client: SecretClient) -> None:
    base = f"https://127.0.0.1:{kv.port}/_emulator"
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=kv.client_ssl_context()), headers=kv.admin_headers
    ) as admin:

        async def call(method: str, path: str, body: Any = None) -> Any:
            async with admin.request(method, f"{base}/{path}", json=body) as response:
                assert response.status == 200, await response.text()
                return await response.json()

        version = (await call("POST", "secrets/demo/greeting", {"value": "hello"}))["version"]
        assert (await client.get_secret("greeting")).properties.version == version
        created = await call("POST", "certificates/demo/site", {"dnsNames": ["site.example.com"]})
        rotated = await call("POST", "rotate/demo/site")
        assert rotated["version"] != created["version"]
        site = await client.get_secret("site")
        assert site.value is not None
        assert CertificateMaterial.from_secret(site.value).thumbprint != created["thumbprint"]
        await call("POST", "disable/demo/greeting")
        with pytest.raises(HttpResponseError):
            await client.get_secret("greeting")
        await call("POST", "enable/demo/greeting")

        faults = await call("POST", "faults", {"fail": {"status": 500, "vault": "demo"}})
        assert faults["fail"]["demo"]["status"] == 500
        with pytest.raises(HttpResponseError) as excinfo:
            await client.get_secret("greeting")
        assert excinfo.value.status_code == 500
        await call("POST", "faults", {"throttle": {"limit": 0, "retryAfter": False}})
        with pytest.raises(HttpResponseError) as excinfo:
            await client.get_secret("greeting")
        assert excinfo.value.status_code == 429
        await call("DELETE", "faults")
        assert (await client.get_secret("greeting")).value == "hello"

        stats = await call("GET", "stats")
        assert stats["port"] == kv.port
        assert set(stats["vaults"]["demo"]) == {"greeting", "site"}
        assert stats["requestCounts"]["demo"] == kv.request_counts["demo"]
        async with admin.post(f"{base}/faults", json={"bogus": {}}) as response:
            assert response.status == 400


async def test_admin_is_not_served_on_vault_hosts(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    status, _, _ = await raw(session, "GET", "https://demo.vault.azure.net/_emulator/stats")
    assert status == 401


async def test_secret_values_are_never_logged(
    kv: LocalKeyVault, client: SecretClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvcertsync")
    await client.set_secret("classified", "hunter2-do-not-log")
    await client.get_secret("classified")
    assert "classified" in caplog.text
    assert "hunter2-do-not-log" not in caplog.text
    assert "hunter2-do-not-log" not in repr(kv.requests)


def _read_until_ready(process: subprocess.Popen[str]) -> str:
    assert process.stdout is not None
    lines: list[str] = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("ready"):
            return "".join(lines)
    raise AssertionError(f"the emulator did not get ready: {lines}")


def test_cli_emulator() -> None:
    """``kvcertsync emulator`` as a real process: ready, admin stats, clean exit on SIGINT."""
    process = subprocess.Popen(
        [sys.executable, "-m", "kvcertsync", "emulator", "--port", "0", "--vault", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        text = _read_until_ready(process)
        port = int(re.search(r"https port:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
        ca_file = re.search(r"CA certificate:\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        token = re.search(r"admin token:\s+(\S+)", text).group(1)  # type: ignore[union-attr]
        assert f"*.vault.azure.net -> 127.0.0.1:{port}" in text
        assert re.search(r"msiEndpoint:\s+http://127\.0\.0\.1:\d+/metadata/identity\n", text)
        context = ssl.create_default_context(cafile=ca_file)
        url = f"https://localhost:{port}/_emulator/stats"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(url, context=context, timeout=5)  # no token: refused
        admitted = urllib.request.Request(url, headers={"X-Emulator-Token": token})
        with urllib.request.urlopen(admitted, context=context, timeout=5) as response:
            stats = json.load(response)
        assert list(stats["vaults"]["demo"]) == ["demo-cert"]
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=5) == 0
        assert not Path(ca_file).exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
