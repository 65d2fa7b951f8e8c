"""Fixtures for tests that drive the official Azure SDK clients against LocalKeyVault.

Import them into a test module (``from tests.helpers.emulator import anyio_backend_fixture,
isolated_identity_fixture, vault_fixture``, each ``# noqa: F401``); the names the tests use are
``anyio_backend``, ``isolated_identity`` (applied to every test of the module) and ``kv``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from azure.keyvault.secrets._shared import http_challenge_cache

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.sources.redirect import RedirectResolver


@pytest.fixture(name="anyio_backend")
def anyio_backend_fixture() -> str:
    """The emulator is asyncio-only."""
    return "asyncio"


@pytest.fixture(name="isolated_identity", autouse=True)
def isolated_identity_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No other managed-identity environment wins over IMDS; no challenge cached from before."""
    for name in ("IDENTITY_ENDPOINT", "IDENTITY_HEADER", "MSI_ENDPOINT", "MSI_SECRET"):
        monkeypatch.delenv(name, raising=False)
    # The SDK caches challenges per host for the whole process.
    http_challenge_cache.clear()
    yield
    http_challenge_cache.clear()


@pytest.fixture(name="kv")
async def vault_fixture(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[LocalKeyVault]:
    """A running emulator, with azure-identity's managed identity pointed at its IMDS."""
    async with LocalKeyVault() as emulator:
        monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", emulator.imds_authority)
        yield emulator


@pytest.fixture(name="session")
async def session_fixture(kv: LocalKeyVault) -> AsyncIterator[aiohttp.ClientSession]:
    """An aiohttp session that reaches the emulator's vault names and trusts its CA."""
    connector = aiohttp.TCPConnector(
        resolver=RedirectResolver(kv.redirect), ssl=kv.client_ssl_context()
    )
    async with aiohttp.ClientSession(connector=connector) as client_session:
        yield client_session
