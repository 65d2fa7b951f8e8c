"""``kvcertsync check --probe``: read each observed secret once, install nothing, say what fails.

Each certificate is fetched with the identity the settings give it, through the same
``KeyVaultSource`` the agent uses, and its value is decoded as the store would decode it. A
failure is put in words with the change that fixes it: the identity the VM does not have, the
role or access policy to grant, the secret that does not exist, the vault name that does not
resolve.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import anyio
import attrs

from kvcertsync.agent.preflight import identity, identity_text
from kvcertsync.auth.imds import ImdsAuthenticationError
from kvcertsync.errors import (
    AccessDenied,
    AuthenticationFailed,
    MaterialError,
    SecretNotFound,
    SourceError,
    Throttled,
)
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import AgentSettings, ObservedCertificate
from kvcertsync.sources.base import SecretSource
from kvcertsync.sources.redirect import RedirectResolver
from kvcertsync.uri import SecretUri

__all__ = ["DEFAULT_CONCURRENCY", "ProbeResult", "explain", "probe"]

logger = logging.getLogger(__name__)

#: Secrets fetched at once (far below Key Vault's 4,000 GETs per vault per 10 s).
DEFAULT_CONCURRENCY = 16
_ARC_ENDPOINT = "http://localhost:40342/metadata/identity"


@attrs.frozen
class ProbeResult:
    """What fetching one observed certificate once found."""

    #: The certificate's position in ``observedCertificates``.
    index: int
    #: Its JSON path in the settings.
    path: str
    #: The secret URL.
    uri: SecretUri
    #: The identity it was read as, in words.
    identity: str
    #: The secret was read and is a certificate with its private key.
    ok: bool
    #: The vault answered (with the secret or with an error of its own).
    reachable: bool
    #: The version read (when ``ok``).
    version: str | None = None
    #: The secret's content type (when ``ok``).
    content_type: str | None = None
    #: The certificate's SHA-1 thumbprint (when ``ok``).
    thumbprint: str | None = None
    #: When the certificate expires (when ``ok``).
    not_after: datetime | None = None
    #: The certificate's DNS names (when ``ok``).
    dns_names: tuple[str, ...] = ()
    #: A stable code for the failure (``secret-not-found``, ``forbidden-by-rbac``...).
    code: str | None = None
    #: The failure in words.
    error: str | None = None
    #: What to change so it works.
    advice: str | None = None

    @property
    def expired(self) -> bool:
        """The certificate's notAfter has passed."""
        return self.not_after is not None and self.not_after <= datetime.now(UTC)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``kvcertsync check --probe --json`` prints."""
        return {
            "index": self.index,
            "path": self.path,
            "uri": str(self.uri),
            "identity": self.identity,
            "ok": self.ok,
            "reachable": self.reachable,
            "version": self.version,
            "contentType": self.content_type,
            "thumbprint": self.thumbprint,
            "notAfter": self.not_after.isoformat() if self.not_after else None,
            "expired": self.expired,
            "dnsNames": list(self.dns_names),
            "code": self.code,
            "error": self.error,
            "advice": self.advice,
        }

    def lines(self) -> list[str]:
        """The result for a person: the URL, then what was found or what failed and the fix."""
        out = [f"  {self.uri}"]
        if self.ok:
            assert self.not_after is not None
            left = self.not_after - datetime.now(UTC)
            expires = f"EXPIRED {-left.days}d ago" if self.expired else f"expires in {left.days}d"
            out.append(f"    ok:         version {self.version}, {self.content_type or '-'}")
            out.append(f"    thumbprint: {self.thumbprint}")
            out.append(f"    notAfter:   {self.not_after.isoformat()} ({expires})")
            if self.dns_names:
                out.append(f"    names:      {', '.join(self.dns_names)}")
            return out
        reach = "vault reached" if self.reachable else "vault not reached"
        out.append(f"    FAILED:     {self.error} [{self.code}; {reach}]")
        out.append(f"    as:         {self.identity}")
        if self.advice:
            out.append(f"    fix:        {self.advice}")
        return out


def _assignee(settings: AgentSettings, cert: ObservedCertificate) -> str:
    who = identity(settings, cert)
    if who["kind"] == "user-assigned":
        return f"the identity {who['clientId']}"
    return "the VM's system-assigned identity"


def _assignee_id(settings: AgentSettings, cert: ObservedCertificate) -> str:
    client_id = identity(settings, cert)["clientId"]
    return client_id or "<the VM's principal id: az vm identity show>"


def _identity_path(settings: AgentSettings, cert: ObservedCertificate, path: str) -> str:
    if cert.msi_client_id:
        return f"{path}.authenticationOverride.msiClientId"
    root = settings.json_path.rpartition(".")[0]
    return f"{root + '.' if root else ''}authenticationSettings.msiClientId"


def _explain_identity(
    error: ImdsAuthenticationError, settings: AgentSettings, cert: ObservedCertificate, path: str
) -> tuple[str, str, str]:
    text = str(error)
    lowered = text.lower()
    client_id = identity(settings, cert)["clientId"]
    if error.imds_status == 400 and "identity not found" in lowered:
        return (
            "identity-not-found",
            f"the managed identity {client_id or '(system-assigned)'} is not assigned to this "
            "machine (IMDS: 400 Identity not found)",
            "assign that user-assigned identity to the VM or scale set, or correct "
            f"{_identity_path(settings, cert, path)}",
        )
    if error.imds_status == 400 and "multiple user assigned" in lowered:
        return (
            "identity-ambiguous",
            "the machine has several user-assigned identities and the settings name none "
            "(IMDS: 400 Multiple user assigned identities exist)",
            "name one in authenticationSettings.msiClientId (with msiEndpoint), or per "
            "certificate in authenticationOverride.msiClientId",
        )
    if error.imds_status is None:
        endpoint = settings.msi_endpoint or "the VM's IMDS (169.254.169.254)"
        return (
            "no-identity-endpoint",
            f"no managed identity endpoint answered at {endpoint} ({text})",
            "run on an Azure VM or scale set with a managed identity, or set "
            "authenticationSettings.msiEndpoint (Azure Arc: "
            f"{_ARC_ENDPOINT!r})",
        )
    return (
        "identity",
        f"no token for the managed identity: {text}",
        "check that the VM has the identity the settings name (az vm identity show)",
    )


def _explain_denied(
    error: AccessDenied, settings: AgentSettings, cert: ObservedCertificate
) -> tuple[str, str, str]:
    who = _assignee(settings, cert)
    vault = cert.uri.vault_name
    if error.code == "SecretDisabled":
        return (
            "secret-disabled",
            f"the secret {cert.uri.name} (this version) is disabled (403 SecretDisabled)",
            f"enable it (az keyvault secret set-attributes --id {cert.uri} --enabled true) or "
            "create a new version",
        )
    if error.code == "ForbiddenByRbac":
        return (
            "forbidden-by-rbac",
            f"{who} may not read secrets in vault {vault} (403 ForbiddenByRbac)",
            f"assign it the 'Key Vault Secrets User' role on the vault: az role assignment create "
            f"--role 'Key Vault Secrets User' --assignee {_assignee_id(settings, cert)} "
            f"--scope $(az keyvault show --name {vault} --query id -o tsv)",
        )
    if error.code in ("ForbiddenByPolicy", "AccessDenied"):
        return (
            "forbidden-by-policy",
            f"{who} may not read secrets in vault {vault}: no access policy grants it Get on "
            f"secrets (403 {error.code})",
            f"add an access policy with the Get permission on secrets: az keyvault set-policy "
            f"--name {vault} --secret-permissions get --object-id <its principal id> (or, if "
            "the vault uses Azure RBAC, the 'Key Vault Secrets User' role)",
        )
    if error.code == "ForbiddenByFirewall":
        return (
            "forbidden-by-firewall",
            f"vault {vault}'s firewall refuses this machine's address (403 ForbiddenByFirewall)",
            "allow this machine's network or address in the vault's Networking settings, or "
            "reach the vault through a private endpoint",
        )
    return (
        "forbidden",
        f"{who} may not read {cert.uri} (403 {error.code})",
        "grant it the 'Key Vault Secrets User' role (RBAC) or Get on secrets (access policy)",
    )


def explain(
    error: BaseException,
    settings: AgentSettings,
    cert: ObservedCertificate,
    path: str,
    *,
    resolves: bool | None = None,
) -> tuple[str, bool, str, str | None]:
    """(code, vault reached, the failure in words, the fix) for a failed fetch of ``cert``.

    ``resolves`` says whether the vault's name resolves (None: not known); it tells a DNS
    failure from another connection failure.
    """
    uri = cert.uri
    if isinstance(error, ImdsAuthenticationError):
        code, text, advice = _explain_identity(error, settings, cert, path)
        return code, False, text, advice
    if isinstance(error, AuthenticationFailed):
        return (
            "token-rejected",
            True,
            f"the vault did not accept the identity's token: {error}",
            "check that the identity belongs to the vault's tenant",
        )
    if isinstance(error, AccessDenied):
        code, text, advice = _explain_denied(error, settings, cert)
        return code, True, text, advice
    if isinstance(error, SecretNotFound):
        what = (
            f"version {uri.version} of secret {uri.name}" if uri.version else f"secret {uri.name}"
        )
        return (
            "secret-not-found",
            True,
            f"vault {uri.vault_name} has no {what} (404 SecretNotFound)",
            "check the name (a certificate's secret has the certificate's name) and that it "
            f"was not deleted: az keyvault secret show --id {uri}",
        )
    if isinstance(error, Throttled):
        return (
            "throttled",
            True,
            f"the vault throttled the request (429): {error}",
            "probe again later; Key Vault allows 4,000 GETs per vault per 10 s",
        )
    if isinstance(error, MaterialError):
        return (
            "not-a-certificate",
            True,
            f"the secret is not a certificate with its private key: {error}",
            "observe the secret of a Key Vault certificate (application/x-pkcs12 or "
            "application/x-pem-file)",
        )
    if resolves is False:
        return (
            "dns",
            False,
            f"the vault's name {uri.hostname} does not resolve",
            "check the vault name in the URL (a deleted or mistyped vault has no name); "
            "behind a private endpoint, this machine needs the privatelink.vaultcore.azure.net "
            "DNS zone",
        )
    text = str(error)
    if "TLS verification failed" in text:
        return (
            "tls",
            False,
            text,
            "pass the TLS-inspecting proxy's CA with --ca-file (KVCERTSYNC_CA_FILE)",
        )
    if isinstance(error, SourceError):
        return "network", False, text, "check that this machine reaches the vault over HTTPS"
    return "error", False, f"{type(error).__name__}: {text}", None


class _Resolver:
    """Whether a vault's name resolves (through the same redirects as the source), cached."""

    def __init__(self, redirect: Mapping[str, str] | None) -> None:
        self._resolver = RedirectResolver(dict(redirect or {}))
        self._known: dict[str, bool] = {}

    async def resolves(self, host: str) -> bool:
        if host not in self._known:
            try:
                with anyio.fail_after(10):
                    await self._resolver.resolve(host, 443)
            except (OSError, TimeoutError):
                self._known[host] = False
            else:
                self._known[host] = True
        return self._known[host]

    async def aclose(self) -> None:
        await self._resolver.close()


async def _probe_one(
    settings: AgentSettings,
    index: int,
    cert: ObservedCertificate,
    source: SecretSource,
    resolver: _Resolver,
) -> ProbeResult:
    path = f"{settings.json_path}.observedCertificates[{index}]"
    who = identity_text(settings, cert)
    try:
        secret = await source.get(cert.uri)
        material = await anyio.to_thread.run_sync(
            CertificateMaterial.from_secret, secret.value, secret.content_type
        )
    except Exception as error:
        resolves = None
        if not isinstance(
            error, AuthenticationFailed | AccessDenied | SecretNotFound | Throttled | MaterialError
        ):
            resolves = await resolver.resolves(cert.uri.hostname)
        code, reachable, text, advice = explain(error, settings, cert, path, resolves=resolves)
        logger.debug("probe %s: %s (%s)", cert.uri, code, text)
        return ProbeResult(
            index, path, cert.uri, who, False, reachable, code=code, error=text, advice=advice
        )
    return ProbeResult(
        index,
        path,
        cert.uri,
        who,
        True,
        True,
        version=secret.version,
        content_type=secret.content_type,
        thumbprint=material.thumbprint,
        not_after=material.not_after,
        dns_names=tuple(material.dns_names),
    )


async def probe(
    settings: AgentSettings,
    source: SecretSource,
    *,
    redirect: Mapping[str, str] | None = None,
    concurrency: int = DEFAULT_CONCURRENCY,
    progress: Callable[[ProbeResult], None] | None = None,
) -> list[ProbeResult]:
    """Fetch every observed certificate once through ``source``; results in settings order.

    ``redirect`` is the source's (so a DNS check resolves names as the source does);
    ``progress`` is called with each result as it arrives.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    results: list[ProbeResult | None] = [None] * len(settings.observed)
    limiter = anyio.CapacityLimiter(concurrency)
    resolver = _Resolver(redirect)

    async def one(index: int, cert: ObservedCertificate) -> None:
        async with limiter:
            result = await _probe_one(settings, index, cert, source, resolver)
        results[index] = result
        if progress is not None:
            progress(result)

    try:
        async with anyio.create_task_group() as tg:
            for index, cert in enumerate(settings.observed):
                tg.start_soon(one, index, cert)
    finally:
        await resolver.aclose()
    return [result for result in results if result is not None]
