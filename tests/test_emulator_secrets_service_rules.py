"""Where the emulator acts as the service: managed secrets, backup, api-version, clock, state."""

from __future__ import annotations

import json
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.certificates import CertificatePolicy
from azure.keyvault.certificates.aio import CertificateClient
from azure.keyvault.secrets.aio import SecretClient

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.emulator.versions import LATEST_API_VERSION
from kvcertsync.sources.redirect import RedirectResolver
from tests.helpers.emulator import (
    anyio_backend_fixture,  # noqa: F401  (the "anyio_backend" fixture)
    isolated_identity_fixture,  # noqa: F401  (the "isolated_identity" fixture, autouse)
    vault_fixture,  # noqa: F401  (the "kv" fixture)
)

pytestmark = pytest.mark.anyio

URL = "https://demo.vault.azure.net"


def session_for(kv: LocalKeyVault, extra: dict[str, str] | None = None) -> aiohttp.ClientSession:
    redirect = {**kv.redirect, **(extra or {})}
    connector = aiohttp.TCPConnector(
        resolver=RedirectResolver(redirect), ssl=kv.client_ssl_context()
    )
    return aiohttp.ClientSession(connector=connector)


@pytest.fixture
async def session(kv: LocalKeyVault) -> AsyncIterator[aiohttp.ClientSession]:
    async with session_for(kv) as client_session:
        yield client_session


@pytest.fixture
async def clients(
    session: aiohttp.ClientSession,
) -> AsyncIterator[tuple[SecretClient, CertificateClient]]:
    def transport() -> AioHttpTransport:
        return AioHttpTransport(session=session, session_owner=False)

    async with (
        ManagedIdentityCredential() as credential,
        SecretClient(URL, credential, transport=transport(), retry_total=0) as secrets,
        CertificateClient(URL, credential, transport=transport(), retry_total=0) as certs,
    ):
        yield secrets, certs


async def token_for(kv: LocalKeyVault, resource: str = "https://vault.azure.net") -> str:
    async with (
        aiohttp.ClientSession() as plain,
        plain.get(
            kv.imds_token_url,
            params={"api-version": "2018-02-01", "resource": resource},
            headers={"Metadata": "true"},
        ) as response,
    ):
        token: str = (await response.json())["access_token"]
        return token


async def call(
    session: aiohttp.ClientSession, method: str, url: str, token: str, **kwargs: Any
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.request(method, url, headers=headers, **kwargs) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


def code_of(error: HttpResponseError) -> tuple[int | None, str | None]:
    return error.status_code, error.error.code if error.error else None


# ---------------------------------------------------------------------- managed secrets


async def test_a_certificates_secret_refuses_writes_through_the_secrets_api(
    kv: LocalKeyVault, clients: tuple[SecretClient, CertificateClient]
) -> None:
    secrets, certificates = clients
    cert = await certificates.create_certificate("web", CertificatePolicy.get_default())
    attempts: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("set", lambda: secrets.set_secret("web", "overwritten")),
        ("update", lambda: secrets.update_secret_properties("web", enabled=False)),
        ("delete", lambda: secrets.delete_secret("web")),
        ("backup", lambda: secrets.backup_secret("web")),
    ]
    for operation, attempt in attempts:
        with pytest.raises(HttpResponseError) as caught:
            await attempt()
        assert code_of(caught.value) == (403, "Forbidden")
        assert caught.value.error is not None
        assert (
            caught.value.error.message
            == f"Operation {operation} is not allowed on a managed secret."
        )
    secret = await secrets.get_secret("web")
    assert secret.properties.version == cert.properties.version
    assert secret.properties.managed is True and secret.properties.enabled is True

    # Deleted with its certificate, it stays the certificate's: no purge through secrets.
    await certificates.delete_certificate("web", _polling_interval=0.01)
    deleted = await secrets.get_deleted_secret("web")
    assert deleted.properties.managed is True
    with pytest.raises(HttpResponseError) as caught:
        await secrets.purge_deleted_secret("web")
    assert code_of(caught.value) == (403, "Forbidden")
    with pytest.raises(ResourceExistsError):
        await secrets.set_secret("web", "reuse")


async def test_a_name_is_a_certificate_or_a_secret_never_both(
    clients: tuple[SecretClient, CertificateClient],
) -> None:
    secrets, certificates = clients
    await secrets.set_secret("plain", "value")
    with pytest.raises(ResourceExistsError):
        await certificates.create_certificate("plain", CertificatePolicy.get_default())
    policy = CertificatePolicy(issuer_name="Unknown", subject="CN=waiting")
    await certificates.create_certificate("waiting", policy)  # pending a merge, no secret yet
    with pytest.raises(HttpResponseError) as caught:
        await secrets.set_secret("waiting", "sneaked in")
    assert code_of(caught.value) == (403, "Forbidden")


# ---------------------------------------------------------------------- backup and restore


async def test_secret_backup_restores_every_version(
    kv: LocalKeyVault, clients: tuple[SecretClient, CertificateClient]
) -> None:
    secrets, _ = clients
    first = await secrets.set_secret("db", "one", content_type="text/plain")
    second = await secrets.set_secret("db", "two", tags={"env": "prod"})
    blob = await secrets.backup_secret("db")
    assert blob.startswith(b")AzureKeyVaultSecretBackupV1.microsoft.com")
    assert b"two" not in blob and b"prod" not in blob

    with pytest.raises(ResourceExistsError) as caught:
        await secrets.restore_secret_backup(blob)
    assert "already exists" in str(caught.value.message)
    await secrets.delete_secret("db", _polling_interval=0.01)
    with pytest.raises(ResourceExistsError):
        await secrets.restore_secret_backup(blob)  # a soft-deleted name is not free either
    await secrets.purge_deleted_secret("db")

    restored = await secrets.restore_secret_backup(blob)
    assert restored.version == second.properties.version
    assert restored.tags == {"env": "prod"}
    versions = [v.version async for v in secrets.list_properties_of_secret_versions("db")]
    assert versions == [first.properties.version, second.properties.version]
    assert (await secrets.get_secret("db", first.properties.version)).value == "one"

    async with LocalKeyVault() as elsewhere:
        with pytest.raises(Exception, match="not valid or was made elsewhere"):
            elsewhere.certificates.sealer.open("Secret", blob)


async def test_backup_of_a_missing_secret_is_404(
    clients: tuple[SecretClient, CertificateClient],
) -> None:
    secrets, _ = clients
    with pytest.raises(ResourceNotFoundError):
        await secrets.backup_secret("nothing")


# ---------------------------------------------------------------------- api-version


async def test_api_version_is_checked_like_the_service(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    kv.set_secret("demo", "s", "v")
    token = await token_for(kv)
    for version in ("7.0", "7.4", "7.6", "2025-07-01", LATEST_API_VERSION):
        status, body = await call(session, "GET", f"{URL}/secrets/s/?api-version={version}", token)
        assert status == 200 and body["value"] == "v", version
    for query, shown in (("", ""), ("?api-version=9.9", "9.9"), ("?api-version=", "")):
        status, body = await call(session, "GET", f"{URL}/secrets/s/{query}", token)
        assert status == 400
        assert body["error"]["code"] == "BadParameter"
        assert body["error"]["message"] == (
            f"The specified version ({shown}) is not recognized. Consider using the latest "
            f"supported version ({LATEST_API_VERSION})."
        )


async def test_the_sdks_older_api_versions_work(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    kv.set_secret("demo", "s", "v")
    async with (
        ManagedIdentityCredential() as credential,
        SecretClient(
            URL,
            credential,
            api_version="7.4",
            transport=AioHttpTransport(session=session, session_owner=False),
        ) as client,
    ):
        assert (await client.get_secret("s")).value == "v"


# ---------------------------------------------------------------------- the localhost form


async def test_a_vault_under_vault_localhost_passes_the_sdks_challenge_check(
    kv: LocalKeyVault,
) -> None:
    """``https://<vault>.vault.localhost:<port>`` with verify_challenge_resource left on."""
    url = f"https://shop.vault.localhost:{kv.port}"
    target = {"*.vault.localhost": f"127.0.0.1:{kv.port}"}
    async with (
        session_for(kv, target) as session,
        ManagedIdentityCredential() as credential,
        SecretClient(
            url, credential, transport=AioHttpTransport(session=session, session_owner=False)
        ) as client,
    ):
        created = await client.set_secret("greeting", "hello")
        assert created.id == f"{url}/secrets/greeting/{created.properties.version}"
        assert (await client.get_secret("greeting")).value == "hello"
    assert kv.secret("shop", "greeting").value == "hello"
    challenged = [r for r in kv.requests if r.vault == "shop" and r.status == 401]
    assert len(challenged) == 1


async def test_the_bare_localhost_form_cannot_pass_the_sdks_check(kv: LocalKeyVault) -> None:
    """Documented limit: the SDK wants the vault host *under* the challenge's domain."""
    async with (
        session_for(kv) as session,
        ManagedIdentityCredential() as credential,
        SecretClient(
            kv.local_url,
            credential,
            transport=AioHttpTransport(session=session, session_owner=False),
        ) as client,
    ):
        with pytest.raises(ValueError, match="does not match the requested domain"):
            await client.get_secret("anything")


# ---------------------------------------------------------------------- the clock


async def test_the_clock_drives_expiry_and_stamps(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    kv.enforce_validity = True
    expires = kv.clock.time() + 3600
    kv.set_secret("demo", "short", "v", expires=expires)
    token = await token_for(kv)
    assert (await call(session, "GET", f"{URL}/secrets/short/?api-version=7.6", token))[0] == 200

    admin = f"https://localhost:{kv.port}/_emulator/clock"
    async with session.post(admin, json={"advance": 7200}, headers=kv.admin_headers) as response:
        state = await response.json()
    assert state["offset"] == 7200 and state["tokenOffset"] == 0
    status, body = await call(session, "GET", f"{URL}/secrets/short/?api-version=7.6", token)
    assert status == 403 and body["error"]["innererror"]["code"] == "SecretExpired"

    status, body = await call(
        session, "PUT", f"{URL}/secrets/later?api-version=7.6", token, json={"value": "x"}
    )
    assert status == 200
    assert body["attributes"]["created"] >= int(expires) + 3600
    async with session.post(admin, json={"advance": -1}, headers=kv.admin_headers) as response:
        assert response.status == 400
    async with session.post(
        admin, json={"set": "2001-01-01T00:00:00Z"}, headers=kv.admin_headers
    ) as response:
        assert (await response.json())["offset"] == 7200  # never backwards


async def test_tokens_keep_their_life_unless_told_to_expire(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    kv.set_secret("demo", "s", "v")
    token = await token_for(kv)
    kv.clock.advance(timedelta(days=30))
    assert (await call(session, "GET", f"{URL}/secrets/s/?api-version=7.6", token))[0] == 200
    kv.clock.advance(3600, expire_tokens=True)
    status, body = await call(session, "GET", f"{URL}/secrets/s/?api-version=7.6", token)
    assert status == 401 and body["error"]["message"] == "The access token has expired."
    fresh = await token_for(kv)
    assert (await call(session, "GET", f"{URL}/secrets/s/?api-version=7.6", fresh))[0] == 200


# ---------------------------------------------------------------------- state across restarts


async def test_state_dir_keeps_vaults_certificates_clock_and_ca(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with LocalKeyVault(state_dir=state) as first:
        first.set_secret("demo", "db", "one")
        first.set_secret("demo", "db", "two")
        operation = first.certificates.create(
            "demo", "web", {"issuer": {"name": "Self"}, "x509_props": {"subject": "CN=w"}}, {}, None
        )
        cert, _ = first.certificates.get("demo", "web", None)
        first.clock.advance(timedelta(days=3))
        token = await token_for(first)
        ca = Path(first.ca_file).read_bytes()
        blob = first.certificates.backup("demo", "web")
        versions = first.versions("demo", "db")
        web = first.secret("demo", "web")
    assert web.version == operation.version
    private = state / "private"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert stat.S_IMODE((private / "state.json").stat().st_mode) == 0o600
    assert b"PRIVATE KEY" not in Path(state / "ca.pem").read_bytes()

    async with LocalKeyVault(state_dir=state) as second:
        assert Path(second.ca_file).read_bytes() == ca
        assert second.versions("demo", "db") == versions
        assert second.secret("demo", "db").value == "two"
        restored, entry = second.certificates.get("demo", "web", None)
        assert entry is not None and entry.version == web.version
        assert second.secret("demo", "web").value == web.value
        assert second.clock.offset >= timedelta(days=3).total_seconds()
        # The backup key survives too: a blob from before the restart opens.
        assert second.certificates.sealer.open("Certificate", blob)["certificate"]["name"] == "web"
        assert cert.name == restored.name
        # A client keeps its token across the restart, and the vault still takes it.
        async with session_for(second) as session:
            url = f"{URL}/secrets/db/?api-version={LATEST_API_VERSION}"
            status, body = await call(session, "GET", url, token)
        assert (status, body["value"]) == (200, "two")


async def test_a_broken_state_file_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "private").mkdir(mode=0o700)
    (tmp_path / "private" / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"state\.json is not valid JSON"):
        async with LocalKeyVault(state_dir=tmp_path):
            pass


async def test_issuance_delay_over_the_admin_route(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    admin = f"https://localhost:{kv.port}/_emulator/issuance"
    async with session.post(admin, json={"delay": 30}, headers=kv.admin_headers) as response:
        assert (await response.json()) == {"delay": 30}
    assert kv.certificates.issuance_delay == 30
    async with session.post(admin, json={"delay": -1}, headers=kv.admin_headers) as response:
        assert response.status == 400
    token = await token_for(kv)
    body = {"policy": {"issuer": {"name": "Self"}, "x509_props": {"subject": "CN=slow"}}}
    url = f"{URL}/certificates/slow/create?api-version={LATEST_API_VERSION}"
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 202
        assert r.headers["Retry-After"] == "30"
        assert r.headers["Location"].startswith(f"{URL}/certificates/slow/pending?api-version=")
        operation = await r.json()
    assert operation["status"] == "inProgress" and operation["request_id"] in r.headers["Location"]
