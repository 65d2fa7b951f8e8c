"""KeyVaultSource, our IMDS credential and CertSync end to end, against the local emulator."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.secrets._shared import http_challenge_cache

from kvcertsync import AgentSettings, CertSync, parse_settings, sync_from_settings
from kvcertsync.agent import reconfigure
from kvcertsync.auth import ImdsCredential, ImdsRetry
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.errors import (
    AccessDenied,
    AuthenticationFailed,
    SecretNotFound,
    SourceError,
    Throttled,
    TransientSourceError,
)
from kvcertsync.events import CertificateUpdated, Event
from kvcertsync.material import CertificateMaterial
from kvcertsync.sources import KeyVaultSource
from kvcertsync.sources.redirect import RedirectResolver, parse_target
from kvcertsync.stores import MemoryStore, PemDirectoryStore
from kvcertsync.uri import SecretUri

pytestmark = pytest.mark.anyio

DEMO = "https://demo.vault.azure.net"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def kv() -> AsyncIterator[LocalKeyVault]:
    http_challenge_cache.clear()  # the SDK caches challenges per host for the whole process
    async with LocalKeyVault() as vault:
        yield vault


def source_for(kv: LocalKeyVault, **options: object) -> KeyVaultSource:
    return KeyVaultSource(
        ImdsCredential(kv.imds_endpoint),
        ca_file=kv.ca_file,
        redirect=kv.redirect,
        owns_credentials=True,
        **options,  # type: ignore[arg-type]
    )


def uri(name: str, vault: str = "demo") -> SecretUri:
    return SecretUri.parse(f"https://{vault}.vault.azure.net/secrets/{name}")


async def test_get_latest_and_by_version_through_the_redirect(kv: LocalKeyVault) -> None:
    first = kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    second = kv.rotate("demo", "web")
    async with source_for(kv) as source:
        latest = await source.get(uri("web"))
        older = await source.get(uri("web").with_version(first))
    assert latest.version == second and older.version == first
    assert str(latest.uri) == f"{DEMO}/secrets/web/{second}"
    assert latest.content_type == "application/x-pkcs12" and latest.enabled
    assert latest.not_before is not None and latest.expires is not None
    material = CertificateMaterial.from_secret(latest.value, latest.content_type)
    assert material.dns_names == ("web.example",)
    assert "value" not in repr(latest) and latest.value[:20] not in repr(latest)
    # The first request carried no token and met the bearer challenge, as against Azure.
    statuses = [r.status for r in kv.requests if r.vault == "demo"]
    assert statuses[0] == 401 and 200 in statuses


async def test_errors_map_to_the_source_error_family(kv: LocalKeyVault) -> None:
    kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    kv.set_secret("demo", "off", "x")
    kv.disable("demo", "off")
    async with source_for(kv) as source:
        with pytest.raises(SecretNotFound, match="secrets/missing"):
            await source.get(uri("missing"))
        with pytest.raises(AccessDenied) as denied:
            await source.get(uri("off"))
        assert denied.value.code == "SecretDisabled"

        kv.fail("demo", status=403, code="Forbidden", inner_code="ForbiddenByRbac")
        with pytest.raises(AccessDenied) as rbac:
            await source.get(uri("web"))
        assert rbac.value.code == "ForbiddenByRbac" and not rbac.value.retryable

        kv.fail("demo", status=503)
        with pytest.raises(TransientSourceError, match="503"):
            await source.get(uri("web"))

        kv.drop_connections(times=2, vault="demo")  # aiohttp silently resends one GET
        with pytest.raises(TransientSourceError, match="connection"):
            await source.get(uri("web"))

        kv.throttle("demo", limit=0, retry_after=7)
        with pytest.raises(Throttled) as with_header:
            await source.get(uri("web"))
        assert with_header.value.retry_after == 7
        kv.throttle("demo", limit=0, retry_after=False)
        with pytest.raises(Throttled) as without_header:
            await source.get(uri("web"))
        assert without_header.value.retry_after is None
        kv.reset_faults()
        assert (await source.get(uri("web"))).value


async def test_credential_failures_are_authentication_failures(kv: LocalKeyVault) -> None:
    kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    kv.client_ids = {"11111111-1111-1111-1111-111111111111"}
    unknown = ImdsCredential(
        kv.imds_endpoint, "22222222-2222-2222-2222-222222222222", retry=ImdsRetry(backoff=0.001)
    )
    async with KeyVaultSource(
        unknown, ca_file=kv.ca_file, redirect=kv.redirect, owns_credentials=True
    ) as source:
        with pytest.raises(AuthenticationFailed, match="Identity not found"):
            await source.get(uri("web"))
        kv.fail_imds(404, times=None)  # an IMDS 404 is not a missing secret
        with pytest.raises(AuthenticationFailed):
            await source.get(uri("other"))


async def test_tls_is_verified(kv: LocalKeyVault) -> None:
    kv.set_secret("demo", "web", "x")
    async with KeyVaultSource(
        ImdsCredential(kv.imds_endpoint), redirect=kv.redirect, owns_credentials=True
    ) as source:
        with pytest.raises(SourceError, match="TLS verification failed") as untrusted:
            await source.get(uri("web"))  # the system trust store does not know the test CA
        assert not untrusted.value.retryable
    lax = ssl.create_default_context()
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verification"):
        KeyVaultSource(ImdsCredential(kv.imds_endpoint), ssl_context=lax)


async def test_one_session_for_every_vault_and_a_client_per_vault(kv: LocalKeyVault) -> None:
    for vault in ("demo", "other"):
        kv.set_secret(vault, "s", "v")
    async with source_for(kv, max_connections=8) as source:
        await source.get(uri("s", "demo"))
        await source.get(uri("s", "other"))
        await source.get(uri("s", "demo"))
        session = source._session
        assert session is not None
        assert len(source._clients) == 2
        assert all(c._client._config is not None for c in source._clients.values())
        assert session.connector is not None and session.connector.limit == 8
    assert session.closed
    assert kv.request_counts["demo"] >= 2 and kv.request_counts["other"] >= 1


async def test_redirect_resolver_leaves_other_hosts_alone() -> None:
    resolver = RedirectResolver({"*.vault.azure.net": "127.0.0.1:8443"})
    [hit] = await resolver.resolve("demo.vault.azure.net", 443)
    assert (hit["host"], hit["port"], hit["hostname"]) == (
        "127.0.0.1",
        8443,
        "demo.vault.azure.net",
    )
    assert resolver.target("example.com") is None
    assert resolver.target("DEMO.Vault.Azure.Net.") == ("127.0.0.1", 8443)
    await resolver.close()
    with pytest.raises(ValueError, match="host:port"):
        parse_target("127.0.0.1")


async def test_imds_credential_against_the_emulator(kv: LocalKeyVault) -> None:
    credential = ImdsCredential(kv.imds_endpoint)
    async with credential:
        tokens = []

        async def get() -> None:
            tokens.append(await credential.get_token("https://vault.azure.net/.default"))

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(get)
        assert kv.imds_requests == 1  # 100 concurrent callers, one request
        assert len({t.token for t in tokens}) == 1
        await credential.get_token("https://vault.azure.net/.default")
        assert kv.imds_requests == 1  # cached
        assert tokens[0].token not in repr(credential)


async def test_imds_credential_retries_transient_failures(kv: LocalKeyVault) -> None:
    kv.fail_imds(500, times=2)
    async with ImdsCredential(kv.imds_endpoint, retry=ImdsRetry(backoff=0.01)) as credential:
        token = await credential.get_token("https://vault.azure.net/.default")
    assert token.token and kv.imds_requests == 3


async def test_azure_identity_managed_identity_works_with_the_source(
    kv: LocalKeyVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", kv.imds_authority)
    kv.set_secret("demo", "s", "value")
    credential = ManagedIdentityCredential()
    async with KeyVaultSource(
        credential, ca_file=kv.ca_file, redirect=kv.redirect, owns_credentials=True
    ) as source:
        assert (await source.get(uri("s"))).value == "value"


async def test_certsync_from_extension_settings_end_to_end(kv: LocalKeyVault) -> None:
    web = kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    api = kv.import_certificate(
        "demo", "api", kv.authority.issue(["api.example"]), content_type="application/x-pem-file"
    )
    kv.client_ids = {"aaaaaaaa-0000-0000-0000-000000000001", "aaaaaaaa-0000-0000-0000-000000000002"}
    settings = parse_settings(
        {
            "secretsManagementSettings": {
                "pollingIntervalInS": "3600",
                "requireInitialSync": True,
                "observedCertificates": [
                    f"{DEMO}/secrets/web",
                    {
                        "url": f"{DEMO}/secrets/api",
                        "authenticationOverride": {
                            "msiClientId": "aaaaaaaa-0000-0000-0000-000000000002"
                        },
                    },
                ],
            },
            "authenticationSettings": {
                "msiEndpoint": kv.imds_endpoint,
                "msiClientId": "aaaaaaaa-0000-0000-0000-000000000001",
            },
        }
    )
    store = MemoryStore()
    source = KeyVaultSource.from_settings(settings, ca_file=kv.ca_file, redirect=kv.redirect)
    sync = CertSync.from_settings(settings, store=store, source=source)
    updates: list[Event] = []
    sync.subscribe(updates.append, CertificateUpdated)
    async with sync:
        with anyio.fail_after(20):
            await sync.wait_ready()
        assert {store.current(uri("web")).version, store.current(uri("api")).version} == {web, api}  # type: ignore[union-attr]
        new = kv.rotate("demo", "web")
        report = await sync.refresh(f"{DEMO}/secrets/web")
        assert report.updated[0].installed is not None
        assert report.updated[0].installed.version == new
        assert len(source._clients) == 2  # one per identity for the same vault
    assert source._session is None  # closed on exit
    assert len(updates) == 3  # delivered before ``async with`` returned


async def test_imds_credential_refreshes_ahead_of_expiry(kv: LocalKeyVault) -> None:
    now = [1_000_000.0]
    async with ImdsCredential(kv.imds_endpoint, clock=lambda: now[0]) as credential:
        first = await credential.get_token("https://vault.azure.net/.default")
        now[0] = first.expires_on - 1000  # well inside the lifetime: cached
        await credential.get_token("https://vault.azure.net/.default")
        assert kv.imds_requests == 1
        now[0] = first.expires_on - 60  # inside the 300 s refresh margin
        second = await credential.get_token("https://vault.azure.net/.default")
    assert kv.imds_requests == 2 and second.token != first.token


async def test_timeout_bounds_each_request(kv: LocalKeyVault) -> None:
    kv.set_secret("demo", "slow", "v")
    async with source_for(kv, timeout=0.3) as source:
        await source.get(uri("slow"))  # token and challenge done
        kv.latency(5, vault="demo")
        with pytest.raises(TransientSourceError, match=r"no answer within 0\.3 s"):
            await source.get(uri("slow"))


async def test_configuration_errors_from_imds_are_not_retried(kv: LocalKeyVault) -> None:
    kv.set_secret("demo", "s", "v")
    kv.client_ids = {"11111111-1111-1111-1111-111111111111"}
    wrong = ImdsCredential(kv.imds_endpoint, "33333333-3333-3333-3333-333333333333")
    async with KeyVaultSource(
        wrong, ca_file=kv.ca_file, redirect=kv.redirect, owns_credentials=True
    ) as source:
        with pytest.raises(AuthenticationFailed) as failed:
            await source.get(uri("s"))
    assert not failed.value.retryable  # an unknown identity will not appear by retrying


async def test_concurrent_polls_share_one_token_request(
    kv: LocalKeyVault, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", kv.imds_authority)
    names = [f"s{i}" for i in range(20)]
    for name in names:
        kv.set_secret("demo", name, "v")
    async with (
        KeyVaultSource(
            ManagedIdentityCredential(),
            ca_file=kv.ca_file,
            redirect=kv.redirect,
            owns_credentials=True,
        ) as source,
        anyio.create_task_group() as tg,
    ):
        for name in names:
            tg.start_soon(source.get, uri(name))
    assert kv.imds_requests == 1


async def test_a_failed_token_request_is_shared_not_repeated(kv: LocalKeyVault) -> None:
    kv.set_secret("demo", "s", "v")
    kv.fail_imds(500, times=None)
    imds = ImdsCredential(kv.imds_endpoint, retry=ImdsRetry(attempts=1))
    failures = []
    async with KeyVaultSource(
        imds, ca_file=kv.ca_file, redirect=kv.redirect, owns_credentials=True
    ) as source:

        async def get() -> None:
            try:
                await source.get(uri("s"))
            except AuthenticationFailed as error:
                failures.append(error)

        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(get)
    assert len(failures) == 10 and kv.imds_requests == 1


async def test_from_settings_picks_the_pem_directory_store(
    kv: LocalKeyVault, tmp_path: Path
) -> None:
    kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    settings = parse_settings(
        {
            "secretsManagementSettings": {
                "observedCertificates": [
                    {"url": f"{DEMO}/secrets/web", "certificateStoreLocation": str(tmp_path)}
                ],
            },
            "authenticationSettings": {"msiEndpoint": kv.imds_endpoint},
        }
    )
    sync = sync_from_settings(settings, ca_file=kv.ca_file, redirect=kv.redirect)
    assert isinstance(sync.source, KeyVaultSource)
    assert isinstance(sync.store, PemDirectoryStore)
    async with sync:
        await sync.wait_ready()
    assert CertificateMaterial.from_secret((tmp_path / "demo.web").read_bytes()).dns_names == (
        "web.example",
    )


async def test_reconfigure_switches_identities_for_the_next_requests(kv: LocalKeyVault) -> None:
    kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    kv.import_certificate("demo", "api", kv.authority.issue(["api.example"]))
    first, second, third = (f"aaaaaaaa-0000-0000-0000-00000000000{i}" for i in (1, 2, 3))
    kv.client_ids = {first, second, third}

    def settings(client_id: str, override: str | None) -> AgentSettings:
        api: dict[str, object] = {"url": f"{DEMO}/secrets/api"}
        if override is not None:
            api["authenticationOverride"] = {"msiClientId": override}
        return parse_settings(
            {
                "secretsManagementSettings": {"observedCertificates": [f"{DEMO}/secrets/web", api]},
                "authenticationSettings": {
                    "msiEndpoint": kv.imds_endpoint,
                    "msiClientId": client_id,
                },
            }
        )

    def identities() -> set[str]:
        return {grant.client_id for grant in kv._tokens.values()}

    sync = sync_from_settings(
        settings(first, None), store=MemoryStore(), ca_file=kv.ca_file, redirect=kv.redirect
    )
    async with sync:
        with anyio.fail_after(20):
            await sync.wait_ready()
        assert identities() == {first}
        reconfigure(sync, settings(second, third))
        report = await sync.sync_once()
        assert report.ok
        assert identities() == {first, second, third}
        assert isinstance(sync.source, KeyVaultSource)
        assert len(sync.source._retired) == 1  # the first identity's, closed with the source
