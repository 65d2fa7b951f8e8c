"""The emulator's bulk load, its bounded grants and connections, and its per-status counters."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.secrets.aio import SecretClient

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.material import PEM_CONTENT_TYPE, PKCS12_CONTENT_TYPE, CertificateMaterial
from kvcertsync.sources.redirect import RedirectResolver
from tests.helpers.emulator import (  # noqa: F401 (fixtures)
    anyio_backend_fixture,
    isolated_identity_fixture,
    session_fixture,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
async def kv(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalKeyVault]:
    async with LocalKeyVault(max_grants=20, max_connections=4) as emulator:
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emulator.imds_authority)
        yield emulator


async def admin(
    kv: LocalKeyVault, session: aiohttp.ClientSession, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with session.request(
        method,
        f"https://localhost:{kv.port}/_emulator/{path}",
        json=body,
        headers=kv.admin_headers,
    ) as response:
        return response.status, await response.json()


async def token(kv: LocalKeyVault, session: aiohttp.ClientSession) -> str:
    params = {"api-version": "2018-02-01", "resource": "https://vault.azure.net"}
    async with session.get(kv.imds_token_url, params=params, headers={"Metadata": "true"}) as r:
        assert r.status == 200
        value: str = (await r.json())["access_token"]
        return value


async def status_of(session: aiohttp.ClientSession, bearer: str) -> int:
    async with session.get(
        "https://demo.vault.azure.net/secrets/s0/?api-version=7.5",
        headers={"Authorization": f"Bearer {bearer}"},
    ) as response:
        return response.status


async def test_bulk_load_serves_every_secret_and_certificate_to_the_sdk(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    # 400 secrets of 3 kB: a body over aiohttp's default 1 MiB limit.
    secrets = [
        {"vault": "demo", "name": f"s{i}", "value": f"{i:04d}" + "x" * 3000} for i in range(400)
    ]
    certificates = [
        {"vault": "certs", "name": "web", "dnsNames": ["www.example.com"]},
        {"vault": "certs", "name": "api", "key": "rsa", "contentType": PEM_CONTENT_TYPE},
    ]
    status, answer = await admin(
        kv, session, "POST", "bulk", {"secrets": secrets, "certificates": certificates}
    )
    assert status == 200, answer
    assert len(answer["secrets"]) == 400
    assert [c["name"] for c in answer["certificates"]] == ["web", "api"]

    credential = ManagedIdentityCredential()
    transport = AioHttpTransport(session=session, session_owner=False)
    async with (
        credential,
        SecretClient("https://demo.vault.azure.net", credential, transport=transport) as demo,
        SecretClient("https://certs.vault.azure.net", credential, transport=transport) as certs,
    ):
        last = await demo.get_secret("s399")
        assert last.value is not None and last.value.startswith("0399")
        assert last.properties.version == answer["secrets"][399]["version"]
        for entry, content_type in zip(
            answer["certificates"], (PKCS12_CONTENT_TYPE, PEM_CONTENT_TYPE), strict=True
        ):
            secret = await certs.get_secret(entry["name"])
            assert secret.properties.content_type == content_type
            assert secret.properties.version == entry["version"]
            assert secret.value is not None
            material = CertificateMaterial.from_secret(secret.value, content_type)
            assert material.thumbprint == entry["thumbprint"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            {"secrets": [{"vault": "demo", "name": "ok", "value": "v"}, {"vault": "demo"}]},
            "secrets[1].name",
        ),
        ({"certificates": [{"vault": "demo", "name": "c", "key": "dsa"}]}, "certificates[0].key"),
        ({"certificates": [{"vault": "demo", "name": "c", "days": 0}]}, "certificates[0].days"),
        (
            {"secrets": [{"vault": "demo", "name": "s", "value": "v", "colour": 1}]},
            "secrets[0] has unknown",
        ),
        ({"keys": []}, "unknown fields ['keys']"),
        ({"secrets": {"vault": "demo"}}, "'secrets' must be a list"),
    ],
)
async def test_bulk_load_names_the_bad_entry_and_loads_nothing(
    kv: LocalKeyVault, session: aiohttp.ClientSession, body: dict[str, Any], message: str
) -> None:
    status, answer = await admin(kv, session, "POST", "bulk", body)
    assert status == 400
    assert message in answer["error"]
    assert kv.vaults() == {}


async def test_token_grants_stay_bounded_and_the_newest_tokens_work(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    kv.set_secret("demo", "s0", "value")
    tokens = [await token(kv, session) for _ in range(60)]
    # The table that grew with every token issued now holds at most max_grants.
    assert kv.live_grants == 20
    assert await status_of(session, tokens[-1]) == 200
    assert await status_of(session, tokens[0]) == 401  # evicted: the oldest go first

    # Expired grants are pruned as new tokens are issued.
    kv.clock.advance(kv.token_lifetime + 1, expire_tokens=True)
    fresh = await token(kv, session)
    assert kv.live_grants == 1
    assert await status_of(session, fresh) == 200


async def test_stats_count_answers_per_vault_and_status_and_log_the_peer_port(
    kv: LocalKeyVault, session: aiohttp.ClientSession
) -> None:
    kv.set_secret("demo", "s0", "value")
    kv.throttle("demo", limit=3, retry_after=False)
    bearer = await token(kv, session)
    statuses = [await status_of(session, "") for _ in range(1)]
    statuses += [await status_of(session, bearer) for _ in range(4)]
    assert statuses == [401, 200, 200, 429, 429]

    status, stats = await admin(kv, session, "GET", "stats")
    assert status == 200
    assert stats["responseCounts"]["demo"] == {"401": 1, "200": 2, "429": 2}
    assert kv.response_counts == stats["responseCounts"]

    status, log = await admin(kv, session, "GET", "requests")
    ports = {entry["peerPort"] for entry in log}
    # One keep-alive connection of this session sent them all: one client port, a real one.
    assert len(ports) == 1 and all(isinstance(p, int) and p > 0 for p in ports)
    assert json.dumps(log).count('"status": 429') == 2


async def test_idle_connections_beyond_the_cap_are_closed_and_clients_reconnect(
    kv: LocalKeyVault,
) -> None:
    kv.set_secret("demo", "s0", "value")
    sessions = [
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                resolver=RedirectResolver(kv.redirect), ssl=kv.client_ssl_context()
            )
        )
        for _ in range(10)
    ]
    try:
        bearer = await token(kv, sessions[0])
        # Ten clients, each keeping its connection alive, as a client leaking connections would.
        assert [await status_of(s, bearer) for s in sessions] == [200] * 10
        # What grew without bound (each idle TLS connection holds ~256 KiB) stays at the cap.
        assert kv.open_connections <= 4
        # A client whose idle connection was closed just opens another.
        assert await status_of(sessions[0], bearer) == 200
    finally:
        for s in sessions:
            await s.close()
