"""KeyVaultSource, our IMDS credential and CertSync end to end, against the local emulator.

Every source test runs on both paths (``mode``: the direct GET and the SDK's SecretClient), so the
two cannot drift: same answers, same SourceError types and messages.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from aiohttp import web
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
from kvcertsync.sources.keyvault import MODES, Mode
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


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Mode:
    """Each source test runs on the direct path and on the SDK's."""
    chosen: Mode = request.param
    return chosen


def source_for(kv: LocalKeyVault, mode: Mode = "direct", **options: object) -> KeyVaultSource:
    return KeyVaultSource(
        ImdsCredential(kv.imds_endpoint),
        ca_file=kv.ca_file,
        redirect=kv.redirect,
        owns_credentials=True,
        mode=mode,
        **options,  # type: ignore[arg-type]
    )


def uri(name: str, vault: str = "demo") -> SecretUri:
    return SecretUri.parse(f"https://{vault}.vault.azure.net/secrets/{name}")


async def test_get_latest_and_by_version_through_the_redirect(
    kv: LocalKeyVault, mode: Mode
) -> None:
    first = kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    second = kv.rotate("demo", "web")
    async with source_for(kv, mode) as source:
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


async def test_errors_map_to_the_source_error_family(kv: LocalKeyVault, mode: Mode) -> None:
    kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    kv.set_secret("demo", "off", "x")
    kv.disable("demo", "off")
    async with source_for(kv, mode) as source:
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


async def test_credential_failures_are_authentication_failures(
    kv: LocalKeyVault, mode: Mode
) -> None:
    kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    kv.client_ids = {"11111111-1111-1111-1111-111111111111"}
    unknown = ImdsCredential(
        kv.imds_endpoint, "22222222-2222-2222-2222-222222222222", retry=ImdsRetry(backoff=0.001)
    )
    async with KeyVaultSource(
        unknown, ca_file=kv.ca_file, redirect=kv.redirect, owns_credentials=True, mode=mode
    ) as source:
        with pytest.raises(AuthenticationFailed, match="Identity not found"):
            await source.get(uri("web"))
        kv.fail_imds(404, times=None)  # an IMDS 404 is not a missing secret
        with pytest.raises(AuthenticationFailed):
            await source.get(uri("other"))


async def test_tls_is_verified(kv: LocalKeyVault, mode: Mode) -> None:
    kv.set_secret("demo", "web", "x")
    async with KeyVaultSource(
        ImdsCredential(kv.imds_endpoint), redirect=kv.redirect, owns_credentials=True, mode=mode
    ) as source:
        with pytest.raises(SourceError, match="TLS verification failed") as untrusted:
            await source.get(uri("web"))  # the system trust store does not know the test CA
        assert not untrusted.value.retryable
    lax = ssl.create_default_context()
    lax.check_hostname = False
    lax.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="verification"):
        KeyVaultSource(ImdsCredential(kv.imds_endpoint), ssl_context=lax)


async def test_one_session_for_every_vault_and_a_client_per_vault(
    kv: LocalKeyVault, mode: Mode
) -> None:
    for vault in ("demo", "other"):
        kv.set_secret(vault, "s", "v")
    async with source_for(kv, mode, max_connections=8) as source:
        await source.get(uri("s", "demo"))
        await source.get(uri("s", "other"))
        await source.get(uri("s", "demo"))
        session = source._session
        assert session is not None
        # The direct path needs no SecretClient unless it hands a request to the SDK.
        assert len(source._clients) == (2 if mode == "sdk" else 0)
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
        used = {grant.client_id for grant in kv._tokens.values()}
        assert used == kv.client_ids  # one token per identity for the same vault
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


async def test_timeout_bounds_each_request(kv: LocalKeyVault, mode: Mode) -> None:
    kv.set_secret("demo", "slow", "v")
    # 1 s: the bound holds the first get too (a new connection, the challenge, the token).
    async with source_for(kv, mode, timeout=1) as source:
        await source.get(uri("slow"))  # token and challenge done
        kv.latency(5, vault="demo")
        with pytest.raises(TransientSourceError, match=r"no answer within 1 s"):
            await source.get(uri("slow"))


async def test_configuration_errors_from_imds_are_not_retried(
    kv: LocalKeyVault, mode: Mode
) -> None:
    kv.set_secret("demo", "s", "v")
    kv.client_ids = {"11111111-1111-1111-1111-111111111111"}
    wrong = ImdsCredential(kv.imds_endpoint, "33333333-3333-3333-3333-333333333333")
    async with KeyVaultSource(
        wrong, ca_file=kv.ca_file, redirect=kv.redirect, owns_credentials=True, mode=mode
    ) as source:
        with pytest.raises(AuthenticationFailed) as failed:
            await source.get(uri("s"))
    assert not failed.value.retryable  # an unknown identity will not appear by retrying


async def test_concurrent_polls_share_one_token_request(
    kv: LocalKeyVault, monkeypatch: pytest.MonkeyPatch, mode: Mode
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
            mode=mode,
        ) as source,
        anyio.create_task_group() as tg,
    ):
        for name in names:
            tg.start_soon(source.get, uri(name))
    assert kv.imds_requests == 1
    # The first request went alone and met the vault's one challenge; the others waited for it.
    assert [r.status for r in kv.requests].count(401) == 1


async def test_a_failed_token_request_is_shared_not_repeated(kv: LocalKeyVault, mode: Mode) -> None:
    kv.set_secret("demo", "s", "v")
    kv.fail_imds(500, times=None)
    imds = ImdsCredential(kv.imds_endpoint, retry=ImdsRetry(attempts=1))
    failures = []
    async with KeyVaultSource(
        imds, ca_file=kv.ca_file, redirect=kv.redirect, owns_credentials=True, mode=mode
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


# ------------------------------------------------- both paths, one behaviour (issue 16)


async def outcome(source: KeyVaultSource, secret: SecretUri) -> tuple[object, ...]:
    """What a get comes to, as comparable values: the answer, or the error said in full."""
    try:
        got = await source.get(secret)
    except SourceError as error:
        code = getattr(error, "code", None)
        return type(error).__name__, str(error), error.retryable, error.retry_after, code
    return "ok", got.uri, got.version, got.value, got.content_type, got.enabled, got.expires


async def test_both_paths_answer_every_vault_case_alike(kv: LocalKeyVault) -> None:
    first = kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    kv.rotate("demo", "web")
    kv.set_secret("demo", "off", "x")
    kv.disable("demo", "off")
    cases: list[tuple[str, SecretUri, Callable[[], object]]] = [
        ("latest", uri("web"), lambda: None),
        ("by version", uri("web").with_version(first), lambda: None),
        ("missing", uri("missing"), lambda: None),
        ("missing version", uri("web").with_version("0" * 32), lambda: None),
        ("disabled", uri("off"), lambda: None),
        ("rbac", uri("web"), lambda: kv.fail("demo", 403, inner_code="ForbiddenByRbac")),
        ("503", uri("web"), lambda: kv.fail("demo", status=503)),
        ("500", uri("web"), lambda: kv.fail("demo", status=500)),
        ("429 retry-after", uri("web"), lambda: kv.throttle("demo", limit=0, retry_after=7)),
        ("429 bare", uri("web"), lambda: kv.throttle("demo", limit=0, retry_after=False)),
    ]
    seen: dict[str, list[tuple[object, ...]]] = {}
    for mode in MODES:
        http_challenge_cache.clear()
        async with source_for(kv, mode) as source:
            for _, secret, arrange in cases:
                kv.reset_faults()
                arrange()
                seen.setdefault(mode, []).append(await outcome(source, secret))
            kv.reset_faults()
            if mode == "direct":
                assert source.fallbacks == 0  # nothing here needed the SDK
    for (name, _, _), direct, sdk in zip(cases, seen["direct"], seen["sdk"], strict=True):
        assert direct == sdk, name
    kinds = [result[0] for result in seen["direct"]]
    assert kinds == [
        *("ok", "ok", "SecretNotFound", "SecretNotFound", "AccessDenied", "AccessDenied"),
        *("TransientSourceError", "TransientSourceError", "Throttled", "Throttled"),
    ]


async def test_the_first_request_to_a_vault_goes_alone(kv: LocalKeyVault, mode: Mode) -> None:
    names = [f"s{i}" for i in range(12)]
    for vault in ("demo", "other"):
        for name in names:
            kv.set_secret(vault, name, "v")
    async with source_for(kv, mode) as source, anyio.create_task_group() as tg:
        for vault in ("demo", "other"):
            for name in names:
                tg.start_soon(source.get, uri(name, vault))
    challenges = {
        v: [r.status for r in kv.requests if r.vault == v].count(401) for v in ("demo", "other")
    }
    assert challenges == {"demo": 1, "other": 1}
    assert kv.request_counts == {"demo": 13, "other": 13}  # one challenge, twelve reads each


async def test_sources_in_one_process_share_each_vaults_challenge(
    kv: LocalKeyVault, mode: Mode
) -> None:
    # Ten agents embedded in one process, started together: one challenge per vault in all.
    for vault in ("demo", "other"):
        for i in range(3):
            kv.set_secret(vault, f"s{i}", "v")
    async with contextlib.AsyncExitStack() as stack:
        sources = [await stack.enter_async_context(source_for(kv, mode)) for _ in range(10)]
        async with anyio.create_task_group() as tg:
            for source in sources:
                for vault in ("demo", "other"):
                    for i in range(3):
                        tg.start_soon(source.get, uri(f"s{i}", vault))
    for vault in ("demo", "other"):
        statuses = [r.status for r in kv.requests if r.vault == vault]
        assert statuses.count(401) == 1, vault
        assert statuses.count(200) == 30, vault


async def test_an_engine_pays_one_challenge_per_vault(kv: LocalKeyVault, mode: Mode) -> None:
    vaults = ("alpha", "beta")
    pool = [kv.authority.issue([f"c{i}.example"]) for i in range(4)]
    for vault in vaults:
        for i in range(15):
            kv.import_certificate(vault, f"c{i}", pool[i % len(pool)])
    urls = [f"https://{v}.vault.azure.net/secrets/c{i}" for v in vaults for i in range(15)]
    sync = CertSync(urls, store=MemoryStore(), source=source_for(kv, mode), rate_limit=1000)
    async with sync:
        with anyio.fail_after(60):
            await sync.wait_ready()
        report = await sync.sync_once()
        assert report.ok and len(report.unchanged) == 30
    for vault in vaults:
        statuses = [r.status for r in kv.requests if r.vault == vault]
        assert statuses.count(401) == 1, vault  # the first request went alone
        assert statuses.count(200) == 30


async def test_a_failed_first_request_lets_the_others_go(kv: LocalKeyVault, mode: Mode) -> None:
    kv.set_secret("demo", "s", "v")
    kv.drop_connections(times=2, vault="demo")  # the first get fails (aiohttp resends once)
    results: list[tuple[object, ...]] = []

    async def get() -> None:
        results.append(await outcome(source, uri("s")))

    async with source_for(kv, mode) as source, anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(get)
    assert sum(1 for r in results if r[0] == "ok") >= 4
    # The failed first request met no challenge; the next one in line went alone and did.
    assert [r.status for r in kv.requests].count(401) == 1


async def test_a_bad_mode_or_api_version_is_refused_up_front(kv: LocalKeyVault) -> None:
    with pytest.raises(ValueError, match="mode must be one of direct, sdk, not 'fast'"):
        source_for(kv, "fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"api_version '6\.0' is not one .* 7\.4"):
        source_for(kv, api_version="6.0")


async def test_secrets_and_tokens_stay_out_of_errors_reprs_and_logs(
    kv: LocalKeyVault, mode: Mode, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    value = kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    secret_value = kv.secret("demo", "web").value
    texts: list[str] = []
    async with source_for(kv, mode) as source:
        got = await source.get(uri("web"))
        texts += [repr(got), repr(source), repr(source._direct)]
        kv.fail("demo", status=403, times=None, code="Forbidden", inner_code="AccessDenied")
        for _ in range(3):
            failed = await outcome(source, uri("web"))
            assert failed[0] == "AccessDenied"
            texts.append(str(failed))
        kv.reset_faults()
        kv.revoke_tokens()
        got = await source.get(uri("web"))  # healed once, with a fresh token
    assert value and got.value == secret_value
    tokens = kv.issued_tokens
    assert len(tokens) >= 2
    everything = "\n".join(texts) + caplog.text
    for leaked in (*tokens, secret_value[:40], secret_value[-40:]):
        assert leaked not in everything


# ------------------------------------ a faithful fake vault, for what the emulator never does


AUTHORITY = "https://login.microsoftonline.com/t1"


@attrs.define
class FakeVault:
    """A TLS server for ``*.vault.azure.net``: a 401 challenge, then what ``answer`` says."""

    resource: str = "https://vault.azure.net"
    claims: bool = False
    answer: Callable[[web.BaseRequest], web.Response] | None = None
    seen: list[tuple[str, str, bool]] = attrs.Factory(list)
    port: int = 0

    async def handle(self, request: web.BaseRequest) -> web.Response:
        authorized = request.headers.get("Authorization", "").startswith("Bearer ")
        self.seen.append((request.path, request.query.get("api-version", ""), authorized))
        if not authorized or (self.claims and len(self.seen) == 3):
            header = f'Bearer authorization="{AUTHORITY}", resource="{self.resource}"'
            if self.claims and authorized:
                claims = base64.urlsafe_b64encode(b'{"access_token":{"nbf":{"essential":true}}}')
                header = f'Bearer authorization="{AUTHORITY}", claims="{claims.decode()}"'
            body = {"error": {"code": "Unauthorized", "message": "AKV10000: no token."}}
            return web.json_response(body, status=401, headers={"WWW-Authenticate": header})
        if self.answer is not None:
            return self.answer(request)
        return web.json_response(SECRET_BODY)


SECRET_BODY = {
    "value": "fake-secret-value",
    "id": f"{DEMO}/secrets/s/{'a' * 32}",
    "contentType": "text/plain",
    "attributes": {"enabled": True, "exp": 2_000_000_000, "updated": 1_700_000_000},
}


@pytest.fixture
async def fake(kv: LocalKeyVault, tmp_path: Path) -> AsyncIterator[FakeVault]:
    material = kv.authority.issue(["*.vault.azure.net"])
    (tmp_path / "chain.pem").write_bytes(material.fullchain_pem())
    key = tmp_path / "key.pem"
    key.touch(mode=0o600)
    key.write_bytes(material.key_pem())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "chain.pem", key)
    vault = FakeVault()
    runner = web.ServerRunner(web.Server(vault.handle))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    vault.port = runner.addresses[0][1]
    try:
        yield vault
    finally:
        await runner.cleanup()


def fake_source(kv: LocalKeyVault, fake: FakeVault, mode: Mode, **options: Any) -> KeyVaultSource:
    return KeyVaultSource(
        ImdsCredential(kv.imds_endpoint),
        ca_file=kv.ca_file,
        redirect={"*.vault.azure.net": f"127.0.0.1:{fake.port}"},
        owns_credentials=True,
        mode=mode,
        **options,
    )


async def both(kv: LocalKeyVault, fake: FakeVault, **options: Any) -> dict[str, tuple[object, ...]]:
    """The outcome of one get on each path, each with a fresh challenge cache."""
    results: dict[str, tuple[object, ...]] = {}
    for mode in MODES:
        http_challenge_cache.clear()
        async with fake_source(kv, fake, mode, **options) as source:
            results[mode] = await outcome(source, uri("s"))
    return results


async def test_a_challenge_for_another_resource_is_refused_on_both_paths(
    kv: LocalKeyVault, fake: FakeVault
) -> None:
    fake.resource = "https://vault.evil.example"
    results = await both(kv, fake)
    assert results["direct"] == results["sdk"]
    kind, message, retryable, *_ = results["direct"]
    assert kind == "SourceError" and not retryable
    assert "'vault.evil.example' does not match the requested domain" in str(message)
    assert kv.imds_requests == 0  # no token was asked for another resource
    assert all(not authorized for _, _, authorized in fake.seen)


async def test_api_version_is_sent_on_both_paths(kv: LocalKeyVault, fake: FakeVault) -> None:
    results = await both(kv, fake, api_version="7.4")
    assert results["direct"] == results["sdk"] and results["direct"][0] == "ok"
    assert {version for _, version, _ in fake.seen} == {"7.4"}
    assert {path for path, _, _ in fake.seen} == {"/secrets/s/"}  # the SDK's trailing slash


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(
            lambda r: web.Response(status=302, headers={"Location": f"{DEMO}/elsewhere"}),
            id="redirect",
        ),
        pytest.param(lambda r: web.Response(status=200, text="not json"), id="not-json"),
        pytest.param(lambda r: web.json_response({**SECRET_BODY, "id": 5}), id="bad-id"),
        pytest.param(
            lambda r: web.json_response({"error": {"code": "BadParameter"}}, status=400), id="400"
        ),
    ],
)
async def test_what_the_direct_path_does_not_know_goes_to_the_sdk(
    kv: LocalKeyVault, fake: FakeVault, answer: Callable[[web.BaseRequest], web.Response]
) -> None:
    fake.answer = answer
    results = await both(kv, fake)
    assert results["direct"] == results["sdk"]
    http_challenge_cache.clear()
    fake.seen.clear()
    async with fake_source(kv, fake, "direct") as source:
        await outcome(source, uri("s"))
        assert source.fallbacks == 1
    # The SDK was handed the challenge the direct path learnt: the vault challenged once.
    assert [authorized for _, _, authorized in fake.seen].count(False) == 1


async def test_a_claims_challenge_goes_to_the_sdk(kv: LocalKeyVault, fake: FakeVault) -> None:
    fake.claims = True  # the second authorized request meets a CAE claims challenge
    results = await both(kv, fake)
    assert results["direct"] == results["sdk"] == ("ok", *list(results["sdk"])[1:])
