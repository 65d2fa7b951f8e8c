"""The emulator's certificates API through the official clients (aio and sync), keys included."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import aiohttp
import anyio
import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity import ManagedIdentityCredential as SyncManagedIdentityCredential
from azure.identity.aio import ManagedIdentityCredential
from azure.keyvault.certificates import (
    AdministratorContact,
    CertificateContact,
    CertificateContentType,
    CertificatePolicy,
    CertificatePolicyAction,
    KeyCurveName,
    KeyType,
    KeyUsageType,
    LifetimeAction,
    WellKnownIssuerNames,
)
from azure.keyvault.certificates import CertificateClient as SyncCertificateClient
from azure.keyvault.certificates.aio import CertificateClient
from azure.keyvault.keys.aio import KeyClient
from azure.keyvault.secrets import SecretClient as SyncSecretClient
from azure.keyvault.secrets.aio import SecretClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvcertsync import CertSync, ObservedCertificate, SecretUri
from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault, VaultProxy, child_environment
from kvcertsync.emulator.routing import write_ca_bundle
from kvcertsync.material import PEM_CONTENT_TYPE, PKCS12_CONTENT_TYPE, CertificateMaterial
from kvcertsync.sources import KeyVaultSource
from kvcertsync.sources.redirect import RedirectResolver
from kvcertsync.stores import MemoryStore
from tests.helpers.emulator import (
    anyio_backend_fixture,  # noqa: F401  (the "anyio_backend" fixture)
    isolated_identity_fixture,  # noqa: F401  (the "isolated_identity" fixture, autouse)
    vault_fixture,  # noqa: F401  (the "kv" fixture)
)

pytestmark = pytest.mark.anyio

URL = "https://demo.vault.azure.net"
FAST = {"_polling_interval": 0.01}


class Clients:
    """The three aio clients on one session, as real-URL clients of vault ``demo``."""

    def __init__(self, certificates: CertificateClient, secrets: SecretClient, keys: KeyClient):
        self.certificates = certificates
        self.secrets = secrets
        self.keys = keys


@pytest.fixture
async def aio(kv: LocalKeyVault) -> AsyncIterator[Clients]:
    connector = aiohttp.TCPConnector(
        resolver=RedirectResolver(kv.redirect), ssl=kv.client_ssl_context()
    )
    async with aiohttp.ClientSession(connector=connector) as session:

        def transport() -> AioHttpTransport:
            return AioHttpTransport(session=session, session_owner=False)

        options: dict[str, Any] = {"retry_total": 0}
        async with (
            ManagedIdentityCredential() as credential,
            CertificateClient(URL, credential, transport=transport(), **options) as certs,
            SecretClient(URL, credential, transport=transport(), **options) as secrets,
            KeyClient(URL, credential, transport=transport(), **options) as keys,
        ):
            yield Clients(certs, secrets, keys)


@pytest.fixture
async def routed(
    kv: LocalKeyVault, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> AsyncIterator[VaultProxy]:
    """The environment ``kvcertsync emulator --exec`` gives a program, for in-process sync code."""
    async with VaultProxy(kv.port) as proxy:
        env = child_environment(
            proxy_url=proxy.url,
            ca_bundle=write_ca_bundle(kv.ca_pem, tmp_path / "bundle.pem"),
            ca_file=kv.ca_file,
            imds_authority=kv.imds_authority,
            base={},
        )
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        yield proxy


def leaf_of(cer: bytes | None) -> x509.Certificate:
    assert cer is not None
    return x509.load_der_x509_certificate(cer)


async def create(clients: Clients, name: str, policy: CertificatePolicy) -> Any:
    return await clients.certificates.create_certificate(name, policy, **FAST)


# ---------------------------------------------------------------------- create, read, keys


async def test_self_signed_default_policy_is_three_consistent_objects(
    kv: LocalKeyVault, aio: Clients
) -> None:
    cert = await create(aio, "web", CertificatePolicy.get_default())
    version = cert.properties.version
    assert cert.id == f"{URL}/certificates/web/{version}"
    assert cert.key_id == f"{URL}/keys/web/{version}"
    assert cert.secret_id == f"{URL}/secrets/web/{version}"
    leaf = leaf_of(cert.cer)
    assert cert.properties.x509_thumbprint == hashlib.sha1(cert.cer).digest()
    assert leaf.subject == leaf.issuer  # Self
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "DefaultPolicy"
    policy = cert.policy
    assert (policy.key_type, policy.key_size, policy.exportable) == (KeyType.rsa, 2048, True)
    assert policy.content_type == CertificateContentType.pkcs12
    assert policy.validity_in_months == 12
    assert policy.lifetime_actions[0].action == CertificatePolicyAction.auto_renew
    assert policy.lifetime_actions[0].lifetime_percentage == 80

    secret = await aio.secrets.get_secret("web")
    assert secret.properties.managed is True
    assert secret.properties.version == version
    assert secret.properties.key_id == cert.key_id
    assert secret.properties.content_type == PKCS12_CONTENT_TYPE
    assert secret.properties.not_before == leaf.not_valid_before_utc
    assert secret.properties.expires_on == leaf.not_valid_after_utc == cert.properties.expires_on
    assert secret.value is not None
    material = CertificateMaterial.from_secret(secret.value, PKCS12_CONTENT_TYPE)
    assert material.certificate == leaf
    # Key Vault backdates nbf by ten minutes and gives twelve calendar months.
    created = cert.properties.created_on
    assert leaf.not_valid_before_utc == created - timedelta(minutes=10)
    assert leaf.not_valid_after_utc.month == created.month

    key = await aio.keys.get_key("web")
    assert key.id == cert.key_id
    assert key.properties.managed is True
    public = leaf.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    assert int.from_bytes(key.key.n, "big") == public.public_numbers().n
    assert key.key.d is None  # the private half is never shown
    assert set(key.key_operations) >= {"sign", "verify", "wrapKey", "unwrapKey"}
    same = await aio.keys.get_key("web", version)
    assert same.id == key.id

    by_version = await aio.certificates.get_certificate_version("web", version)
    assert by_version.cer == cert.cer


@pytest.mark.parametrize(
    ("key_type", "size", "curve"),
    [
        (KeyType.rsa, 3072, None),
        (KeyType.rsa, 4096, None),
        (KeyType.ec, None, KeyCurveName.p_256),
        (KeyType.ec, None, KeyCurveName.p_384),
        (KeyType.ec, None, KeyCurveName.p_521),
    ],
)
async def test_key_types(
    aio: Clients, key_type: KeyType, size: int | None, curve: KeyCurveName | None
) -> None:
    policy = CertificatePolicy(
        issuer_name=WellKnownIssuerNames.self,
        subject="CN=kinds",
        key_type=key_type,
        key_size=size,
        key_curve_name=curve,
    )
    cert = await create(aio, "kinds", policy)
    public = leaf_of(cert.cer).public_key()
    key = await aio.keys.get_key("kinds")
    if key_type == KeyType.rsa:
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == size
        assert cert.policy.key_size == size
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert (
            public.curve.key_size
            == {"P-256": 256, "P-384": 384, "P-521": 521}[curve.value if curve else ""]
        )
        assert key.key.crv == curve and key.key.kty == "EC"
        point = public.public_numbers()
        assert int.from_bytes(key.key.x, "big") == point.x
        assert cert.policy.key_curve_name == curve


async def test_subject_sans_usages_validity_and_pem(aio: Clients) -> None:
    policy = CertificatePolicy(
        issuer_name="Self",
        subject="CN=shop.example, O=Contoso, C=US",
        san_dns_names=["shop.example", "www.shop.example"],
        san_emails=["ops@shop.example"],
        san_user_principal_names=["svc@shop.example"],
        key_usage=[KeyUsageType.digital_signature],
        enhanced_key_usage=[ExtendedKeyUsageOID.CODE_SIGNING.dotted_string],
        validity_in_months=3,
        content_type=CertificateContentType.pem,
    )
    cert = await create(aio, "shop", policy)
    leaf = leaf_of(cert.cer)
    assert leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Contoso"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["shop.example", "www.shop.example"]
    assert sans.get_values_for_type(x509.RFC822Name) == ["ops@shop.example"]
    upn = sans.get_values_for_type(x509.OtherName)[0]
    assert upn.value.endswith(b"svc@shop.example")
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_encipherment
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CODE_SIGNING]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert timedelta(days=89) < life < timedelta(days=93)
    assert cert.policy.san_user_principal_names == ["svc@shop.example"]

    secret = await aio.secrets.get_secret("shop")
    assert secret.properties.content_type == PEM_CONTENT_TYPE
    assert secret.value is not None and secret.value.startswith("-----BEGIN PRIVATE KEY-----")
    assert CertificateMaterial.from_secret(secret.value, PEM_CONTENT_TYPE).certificate == leaf


async def test_non_exportable_key_leaves_the_secret_without_it(aio: Clients) -> None:
    # The SDK sends key_props only with a key type: False alone is dropped as "unset".
    policy = CertificatePolicy(
        issuer_name="Self", subject="CN=locked", exportable=False, key_type=KeyType.rsa
    )
    await create(aio, "locked", policy)
    secret = await aio.secrets.get_secret("locked")
    assert secret.value is not None
    from cryptography.hazmat.primitives.serialization import pkcs12

    loaded = pkcs12.load_pkcs12(base64.b64decode(secret.value), None)
    certificates = [bag.certificate for bag in loaded.additional_certs]
    assert loaded.key is None and len(certificates) == 1
    assert (await aio.certificates.get_certificate_policy("locked")).exportable is False


async def test_bad_policies_get_the_services_400(aio: Clients) -> None:
    bad = [
        CertificatePolicy(issuer_name="Self", subject="CN=x", key_type=KeyType.rsa, key_size=1024),
        CertificatePolicy(issuer_name="Self", subject="not a name"),
        CertificatePolicy(issuer_name="NoSuchIssuer", subject="CN=x"),
    ]
    for policy in bad:
        with pytest.raises(HttpResponseError) as caught:
            await create(aio, "bad", policy)
        assert caught.value.status_code == 400
        assert caught.value.error is not None and caught.value.error.code == "BadParameter"


# ---------------------------------------------------------------------- pending operations


async def test_pending_then_completed_and_polled(kv: LocalKeyVault) -> None:
    """The sync poller polls /pending until the clock lets the request complete."""
    kv.certificates.issuance_delay = 600
    results: list[str] = []

    def run() -> None:
        client = SyncCertificateClient(
            kv.local_url.replace("localhost", "demo.vault.localhost"),
            SyncManagedIdentityCredential(),
            connection_verify=kv.ca_file,
        )
        # *.vault.localhost does not resolve here: send it through the emulator's own proxy.
        poller = client.begin_create_certificate("slow", CertificatePolicy.get_default(), **FAST)
        operation = client.get_certificate_operation("slow")
        results.append(operation.status)
        kv.clock.advance(600)
        cert = poller.result()
        results.append(cert.properties.version)

    async with VaultProxy(kv.port, hosts=("*.vault.localhost",)) as proxy:
        with _environment(HTTPS_PROXY=proxy.url, NO_PROXY="127.0.0.1"):
            await anyio.to_thread.run_sync(run)
    assert results[0] == "inProgress"
    assert results[1] == kv.versions("demo", "slow")[-1]


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield


async def test_cancel_and_delete_a_pending_request(kv: LocalKeyVault, aio: Clients) -> None:
    kv.certificates.issuance_delay = 3600
    client = aio.certificates
    await kv_create_pending(kv, "later")
    operation = await client.cancel_certificate_operation("later")
    assert operation.cancellation_requested is True and operation.status == "inProgress"
    kv.clock.advance(3600)
    assert (await client.get_certificate_operation("later")).status == "cancelled"
    with pytest.raises(ResourceNotFoundError):
        await client.get_certificate("later")
    deleted = await client.delete_certificate_operation("later")
    assert deleted.status == "cancelled"
    with pytest.raises(ResourceNotFoundError) as caught:
        await client.get_certificate_operation("later")
    assert caught.value.error is not None
    assert caught.value.error.code == "PendingCertificateNotFound"


async def kv_create_pending(kv: LocalKeyVault, name: str) -> None:
    policy = {"issuer": {"name": "Self"}, "x509_props": {"subject": f"CN={name}"}}
    operation = await anyio.to_thread.run_sync(
        lambda: kv.certificates.create("demo", name, policy, {}, None)
    )
    assert operation.status == "inProgress"


async def test_unknown_issuer_waits_for_a_merge(kv: LocalKeyVault, aio: Clients) -> None:
    client = aio.certificates
    policy = CertificatePolicy(issuer_name=WellKnownIssuerNames.unknown, subject="CN=merged")
    operation = await client.create_certificate("merged", policy, **FAST)
    assert operation.status == "inProgress" and operation.csr is not None
    csr = x509.load_der_x509_csr(operation.csr)
    assert csr.is_signature_valid
    with pytest.raises(HttpResponseError) as caught:
        await client.create_certificate("merged", policy, **FAST)
    assert caught.value.status_code == 409

    # A CA elsewhere signs the CSR; the merge completes the certificate with its chain.
    signer_name, signer_key = kv.authority.signer
    now = kv.clock.utcnow()
    signed = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(signer_name)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(signer_key, hashes.SHA256())
    )
    chain = [c.public_bytes(serialization.Encoding.DER) for c in (signed, *kv.authority.chain)]
    merged = await client.merge_certificate("merged", chain)
    assert leaf_of(merged.cer) == signed
    assert (await client.get_certificate_operation("merged")).status == "completed"
    secret = await aio.secrets.get_secret("merged")
    assert secret.value is not None
    material = CertificateMaterial.from_secret(secret.value, secret.properties.content_type)
    assert material.certificate == signed and material.chain == kv.authority.chain


async def test_a_registered_issuer_issues_from_the_emulators_ca(
    kv: LocalKeyVault, aio: Clients
) -> None:
    client = aio.certificates
    issuer = await client.create_issuer(
        "corp",
        "Test",
        account_id="keyvaultuser",
        password="not-shown",
        admin_contacts=[AdministratorContact(first_name="Ada", email="ada@example.com")],
    )
    assert issuer.provider == "Test" and issuer.account_id == "keyvaultuser"
    assert issuer.password is None
    updated = await client.update_issuer("corp", account_id="other")
    assert updated.account_id == "other"
    assert [i.name async for i in client.list_properties_of_issuers()] == ["corp"]
    cert = await create(aio, "corp-web", CertificatePolicy(issuer_name="corp", subject="CN=w"))
    assert leaf_of(cert.cer).issuer == kv.authority.chain[0].subject
    assert (await client.get_issuer("corp")).admin_contacts[0].email == "ada@example.com"
    await client.delete_issuer("corp")
    with pytest.raises(ResourceNotFoundError):
        await client.get_issuer("corp")


async def test_contacts(aio: Clients) -> None:
    client = aio.certificates
    with pytest.raises(ResourceNotFoundError):
        await client.get_contacts()
    contacts = [CertificateContact(email="a@example.com", name="A", phone="1")]
    assert [c.email for c in await client.set_contacts(contacts)] == ["a@example.com"]
    assert [c.name for c in await client.get_contacts()] == ["A"]
    assert [c.phone for c in await client.delete_contacts()] == ["1"]
    with pytest.raises(ResourceNotFoundError):
        await client.get_contacts()


# ---------------------------------------------------------------------- import, list, update


async def test_import_pfx_with_and_without_password_and_pem(
    kv: LocalKeyVault, aio: Clients
) -> None:
    client = aio.certificates
    material = kv.authority.issue(["imported.example"])
    plain = await client.import_certificate("plain", material.to_pkcs12())
    assert leaf_of(plain.cer) == material.certificate
    assert plain.policy.issuer_name == "Unknown"
    assert plain.policy.san_dns_names == ["imported.example"]
    locked = await client.import_certificate(
        "locked", material.to_pkcs12(b"s3cret"), password="s3cret", tags={"from": "pfx"}
    )
    assert locked.properties.tags == {"from": "pfx"}
    with pytest.raises(HttpResponseError) as caught:
        await client.import_certificate("wrong", material.to_pkcs12(b"s3cret"), password="no")
    assert caught.value.status_code == 400
    pem = CertificatePolicy(issuer_name="Unknown", content_type=CertificateContentType.pem)
    imported = await client.import_certificate("pem", material.to_pem_bundle(), policy=pem)
    assert imported.policy.content_type == CertificateContentType.pem
    secret = await aio.secrets.get_secret("pem")
    assert secret.properties.content_type == PEM_CONTENT_TYPE
    assert secret.value is not None
    assert CertificateMaterial.from_secret(secret.value).chain == material.chain


async def test_list_versions_update_and_policy(kv: LocalKeyVault, aio: Clients) -> None:
    client = aio.certificates
    first = await create(aio, "many", CertificatePolicy.get_default())
    second = await create(aio, "many", CertificatePolicy.get_default())
    await create(aio, "other", CertificatePolicy.get_default())
    names = [p.name async for p in client.list_properties_of_certificates()]
    assert names == ["many", "other"]
    versions = [
        p.version
        async for p in client.list_properties_of_certificate_versions("many", max_page_size=1)
    ]
    assert versions == [first.properties.version, second.properties.version]
    secret = await aio.secrets.get_secret("many")
    assert secret.properties.previous_version == first.properties.version

    changed = await client.update_certificate_properties(
        "many", first.properties.version, enabled=False, tags={"env": "test"}
    )
    assert changed.properties.enabled is False and changed.properties.tags == {"env": "test"}
    stored = kv.secret("demo", "many", first.properties.version)
    assert stored.enabled is False and stored.tags == {"env": "test"}

    policy = CertificatePolicy(
        validity_in_months=6,
        lifetime_actions=[
            LifetimeAction(CertificatePolicyAction.auto_renew, days_before_expiry=30)
        ],
    )
    updated = await client.update_certificate_policy("many", policy)
    assert updated.validity_in_months == 6
    assert updated.lifetime_actions[0].days_before_expiry == 30
    third = await client.create_certificate(
        "many", await client.get_certificate_policy("many"), **FAST
    )
    life = leaf_of(third.cer).not_valid_after_utc - leaf_of(third.cer).not_valid_before_utc
    assert timedelta(days=180) < life < timedelta(days=186)


# ---------------------------------------------------------------------- soft delete, backup


async def test_delete_recover_purge_take_key_and_secret_along(
    kv: LocalKeyVault, aio: Clients
) -> None:
    client = aio.certificates
    cert = await create(aio, "gone", CertificatePolicy.get_default())
    poller = await client.delete_certificate("gone", **FAST)
    assert poller.recovery_id == f"{URL}/deletedcertificates/gone"
    with pytest.raises(ResourceNotFoundError):
        await aio.secrets.get_secret("gone")
    with pytest.raises(ResourceNotFoundError):
        await aio.keys.get_key("gone")
    deleted = await client.get_deleted_certificate("gone")
    assert deleted.properties.version == cert.properties.version
    assert [d.name async for d in client.list_deleted_certificates()] == ["gone"]
    with pytest.raises(ResourceExistsError):
        await create(aio, "gone", CertificatePolicy.get_default())

    recovered = await client.recover_deleted_certificate("gone", **FAST)
    assert recovered.properties.version == cert.properties.version
    assert (await aio.secrets.get_secret("gone")).properties.version == cert.properties.version

    await client.delete_certificate("gone", **FAST)
    await client.purge_deleted_certificate("gone")
    with pytest.raises(ResourceNotFoundError):
        await client.get_deleted_certificate("gone")
    assert "gone" not in kv.vaults().get("demo", {})
    again = await create(aio, "gone", CertificatePolicy.get_default())
    assert again.properties.version != cert.properties.version


async def test_certificate_backup_restores_every_version(kv: LocalKeyVault, aio: Clients) -> None:
    client = aio.certificates
    first = await create(aio, "kept", CertificatePolicy.get_default())
    second = await create(aio, "kept", CertificatePolicy.get_default())
    blob = await client.backup_certificate("kept")
    assert b"PRIVATE KEY" not in blob and b"AzureKeyVaultCertificateBackupV1" in blob
    with pytest.raises(ResourceExistsError):
        await client.restore_certificate_backup(blob)
    await client.delete_certificate("kept", **FAST)
    await client.purge_deleted_certificate("kept")
    restored = await client.restore_certificate_backup(blob)
    assert restored.properties.version == second.properties.version
    versions = [p.version async for p in client.list_properties_of_certificate_versions("kept")]
    assert versions == [first.properties.version, second.properties.version]
    secret = await aio.secrets.get_secret("kept", first.properties.version)
    assert secret.properties.managed is True
    with pytest.raises(HttpResponseError) as caught:
        await client.restore_certificate_backup(blob[:-10] + b"0" * 10)
    assert caught.value.status_code == 400


# ---------------------------------------------------------------------- sync client, renewal


async def test_sync_clients_walk_the_whole_lifecycle(kv: LocalKeyVault, routed: VaultProxy) -> None:
    """Unchanged sync code (requests) on the real URL, through the --exec environment."""

    def run() -> dict[str, Any]:
        credential = SyncManagedIdentityCredential()
        certificates = SyncCertificateClient(URL, credential)
        secrets = SyncSecretClient(URL, credential)
        seen: dict[str, Any] = {}
        cert = certificates.begin_create_certificate(
            "sync", CertificatePolicy.get_default(), **FAST
        ).result()
        secret = secrets.get_secret("sync")
        seen["created"] = (cert.properties.version, secret.properties.version)
        seen["managed"] = secret.properties.managed
        with pytest.raises(HttpResponseError) as refused:
            secrets.set_secret("sync", "overwrite")
        seen["put"] = refused.value.status_code

        material = kv.authority.issue(["sync-import.example"])
        pfx = certificates.import_certificate("pfx", material.to_pkcs12(b"pw"), password="pw")
        pem_policy = CertificatePolicy(issuer_name="Unknown", content_type="application/x-pem-file")
        pem = certificates.import_certificate("pem", material.to_pem_bundle(), policy=pem_policy)
        seen["imported"] = (leaf_of(pfx.cer), leaf_of(pem.cer)) == (material.certificate,) * 2

        kv.clock.advance(timedelta(days=300))
        seen["renewed"] = len(list(certificates.list_properties_of_certificate_versions("sync")))

        blob = certificates.backup_certificate("pfx")
        certificates.begin_delete_certificate("pfx", **FAST).result()
        seen["deleted"] = certificates.get_deleted_certificate("pfx").name
        certificates.begin_recover_deleted_certificate("pfx", **FAST).result()
        certificates.begin_delete_certificate("pfx", **FAST).result()
        certificates.purge_deleted_certificate("pfx")
        seen["restored"] = certificates.restore_certificate_backup(blob).name

        secrets.set_secret("plain", "one")
        secret_blob = secrets.backup_secret("plain")
        secrets.begin_delete_secret("plain", **FAST).result()
        secrets.begin_recover_deleted_secret("plain", **FAST).result()
        secrets.begin_delete_secret("plain", **FAST).result()
        secrets.purge_deleted_secret("plain")
        seen["secret restored"] = secrets.restore_secret_backup(secret_blob).name

        with pytest.raises(HttpResponseError) as old:
            SyncSecretClient(URL, credential, api_version="9.9").get_secret("plain")
        seen["bad version"] = (old.value.status_code, old.value.error and old.value.error.code)
        return seen

    seen = await anyio.to_thread.run_sync(run)
    created, secret_version = seen["created"]
    assert secret_version == created and seen["managed"] is True
    assert seen["put"] == 403
    assert seen["imported"] is True
    assert seen["renewed"] == 2
    assert seen["deleted"] == "pfx" and seen["restored"] == "pfx"
    assert seen["secret restored"] == "plain"
    assert seen["bad version"] == (400, "BadParameter")
    assert routed.routed >= 1


async def test_auto_renewal_is_installed_by_certsync(kv: LocalKeyVault, aio: Clients) -> None:
    cert = await create(aio, "renewing", CertificatePolicy.get_default())
    store = MemoryStore()
    observed = ObservedCertificate(uri=SecretUri.parse(f"{URL}/secrets/renewing"))
    source = KeyVaultSource(
        ImdsCredential(kv.imds_endpoint),
        ca_file=kv.ca_file,
        redirect=kv.redirect,
        owns_credentials=True,
    )
    sync = CertSync([observed], store=store, source=source, clock=kv.clock.certsync_clock())
    async with sync:
        await sync.wait_ready()
        # 80 % of twelve months: day 292. Nothing renews at day 200, then it does.
        kv.clock.advance(timedelta(days=200))
        assert kv.versions("demo", "renewing") == [cert.properties.version]
        await anyio.to_thread.run_sync(kv.clock.advance, timedelta(days=100))
        renewed = kv.versions("demo", "renewing")
        assert len(renewed) == 2
        await sync.refresh()
        installed = await store.installed(observed)
        assert installed is not None and installed.version == renewed[-1]
    operation = await aio.certificates.get_certificate_operation("renewing")
    assert operation.status == "completed"
    secret = await aio.secrets.get_secret("renewing")
    assert secret.properties.previous_version == cert.properties.version


async def test_renewal_by_days_before_expiry_with_the_key_kept(kv: LocalKeyVault) -> None:
    policy = {
        "issuer": {"name": "Self"},
        "key_props": {"kty": "EC", "crv": "P-256", "reuse_key": True},
        "x509_props": {"subject": "CN=short", "validity_months": 1},
        "lifetime_actions": [
            {"trigger": {"days_before_expiry": 10}, "action": {"action_type": "AutoRenew"}}
        ],
    }
    kv.certificates.create("demo", "short", policy, {}, {"team": "a"})
    _, first = kv.certificates.get("demo", "short", None)
    assert first is not None
    kv.clock.advance(timedelta(days=15))
    assert len(kv.versions("demo", "short")) == 1
    kv.clock.advance(timedelta(days=6))
    _, second = kv.certificates.get("demo", "short", None)
    assert second is not None and second.version != first.version
    assert second.key.public_key() == first.key.public_key()  # reuse_key
    assert kv.secret("demo", "short").tags == {"team": "a"}
    kv.clock.advance(timedelta(days=1))
    assert len(kv.versions("demo", "short")) == 2  # the new version is not due yet
