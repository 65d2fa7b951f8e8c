"""KeyVaultSource: secrets from Azure Key Vault through the official SDK, on one shared session."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp
import anyio
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import AioHttpTransport
from azure.keyvault.secrets import KeyVaultSecret
from azure.keyvault.secrets.aio import SecretClient

from kvcertsync._http import retry_after
from kvcertsync.auth import CredentialCache
from kvcertsync.auth.shared import TOKEN_TIMEOUT, SharedCredential, share, token_use
from kvcertsync.errors import (
    AccessDenied,
    AuthenticationFailed,
    SecretNotFound,
    SourceError,
    Throttled,
    TransientSourceError,
)
from kvcertsync.sources.base import SecretVersion
from kvcertsync.sources.redirect import RedirectResolver
from kvcertsync.uri import VAULT_DNS_SUFFIXES, SecretUri

if TYPE_CHECKING:
    from kvcertsync.settings import AgentSettings

__all__ = ["KeyVaultSource", "map_error"]

logger = logging.getLogger(__name__)


def _service_error(error: HttpResponseError) -> tuple[str | None, str | None, str | None]:
    """The service's error code, inner error code and message, read from the response body."""
    response = error.response
    if response is None:
        return None, None, None
    try:
        body = json.loads(response.text())
        detail = body["error"]
        inner = detail.get("innererror") or {}
        message = detail.get("message")
        return detail.get("code"), inner.get("code"), message if isinstance(message, str) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, None, None


def _causes(error: BaseException) -> list[BaseException]:
    """The error and what it wraps (azure-core keeps the transport's error in inner_exception)."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in seen:
        seen.append(current)
        inner = getattr(current, "inner_exception", None)
        current = (
            inner if isinstance(inner, BaseException) else current.__cause__ or current.__context__
        )
    return seen


def _permanent(error: SourceError) -> SourceError:
    error.retryable = False
    return error


def map_error(uri: SecretUri, error: BaseException) -> SourceError:
    """Translate an azure-core / aiohttp / credential failure into the SourceError family."""
    if isinstance(error, SourceError):
        return error  # our own credentials already say what happened and whether to retry
    if isinstance(error, ClientAuthenticationError):
        # Raised by credentials with their token endpoint's response (an IMDS 404 is not a
        # missing secret), and by the SDK for the vault's own 401.
        return AuthenticationFailed(f"{uri}: no usable token: {error.message}")
    if isinstance(error, ResourceNotFoundError):
        return SecretNotFound(f"{uri}: secret not found (404)")
    if isinstance(error, HttpResponseError) and error.status_code is not None:
        status = error.status_code
        code, inner, _ = _service_error(error)
        headers: Mapping[str, str] = getattr(error.response, "headers", None) or {}
        detail = f"{status} {inner or code or error.reason or ''}".strip()
        if status == 403:
            return AccessDenied(
                f"{uri}: access denied ({detail})", code=inner or code or "Forbidden"
            )
        if status == 404:
            return SecretNotFound(f"{uri}: secret not found ({detail})")
        if status == 429:
            return Throttled(f"{uri}: throttled ({detail})", retry_after=retry_after(headers))
        if status >= 500 or status == 408:
            return TransientSourceError(
                f"{uri}: service error ({detail})", retry_after=retry_after(headers)
            )
        return _permanent(SourceError(f"{uri}: unexpected response ({detail})"))
    if any(isinstance(e, ssl.SSLCertVerificationError) for e in _causes(error)):
        return _permanent(
            SourceError(
                f"{uri}: TLS verification failed: the vault's certificate is not trusted "
                "(a TLS-inspecting proxy needs its CA passed as ca_file)"
            )
        )
    if isinstance(error, ServiceRequestError | ServiceResponseError):
        return TransientSourceError(f"{uri}: connection failed: {error.message}")
    if isinstance(error, aiohttp.ClientError | OSError | TimeoutError):
        return TransientSourceError(f"{uri}: connection failed: {type(error).__name__}")
    if isinstance(error, ValueError):
        # The SDK's own refusals (a challenge for another resource, say): configuration errors.
        return _permanent(SourceError(f"{uri}: {error}"))
    return _permanent(SourceError(f"{uri}: unexpected {type(error).__name__}"))


def _refused(uri: SecretUri, error: ClientAuthenticationError, note: str) -> SourceError:
    """The vault's 401 to the token it was sent, said as such, with ``note`` on what was tried."""
    code, _, message = _service_error(error)
    detail = "; ".join(part for part in (code, message) if part)
    return AuthenticationFailed(
        f"{uri}: the vault refused the token (401{': ' + detail if detail else ''}), {note}"
    )


class _TokenRefused(Exception):
    """The vault answered 401 to a token the credential gave: it no longer takes that token."""

    def __init__(self, token: str, error: ClientAuthenticationError) -> None:
        super().__init__("the vault refused the token")  # never the token itself
        self.token = token
        self.error = error


class KeyVaultSource:
    """Reads secrets with ``azure.keyvault.secrets.aio.SecretClient``: a client per vault and
    identity, all on one aiohttp session; the SDK's retries are off (the engine retries).

    ``timeout`` bounds the vault's part of each request; fetching a token has its own bound,
    ``token_timeout`` (it applies to credentials this source wraps; a SharedCredential given
    keeps its own). A 401 from the vault to a token the credential still trusts (revoked, a
    clock off) makes the source fetch a fresh token and ask once more.
    """

    def __init__(
        self,
        credential: AsyncTokenCredential,
        *,
        credentials: Mapping[SecretUri, AsyncTokenCredential] | None = None,
        ca_file: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        redirect: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        max_connections: int = 32,
        api_version: str | None = None,
        owns_credentials: bool = False,
        trust_env: bool | None = None,
        token_timeout: float | None = TOKEN_TIMEOUT,
    ) -> None:
        if ca_file is not None and ssl_context is not None:
            raise ValueError("give ca_file or ssl_context, not both")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if token_timeout is not None and not token_timeout > 0:
            raise ValueError("token_timeout must be positive (or None: unbounded)")
        self._ssl = ssl_context or ssl.create_default_context(cafile=ca_file)
        if not self._ssl.check_hostname or self._ssl.verify_mode != ssl.CERT_REQUIRED:
            raise ValueError("TLS verification must stay on (check_hostname and CERT_REQUIRED)")
        self._token_timeout = token_timeout
        self._credential = share(credential, timeout=token_timeout)
        self._overrides = {
            uri.latest: share(c, timeout=token_timeout) for uri, c in (credentials or {}).items()
        }
        self._owned: list[AsyncTokenCredential] = []
        if owns_credentials:
            self._owned = list(
                {id(c): c for c in (credential, *(credentials or {}).values())}.values()
            )
        self._cache: CredentialCache | None = None
        self._retired: list[CredentialCache] = []
        self._redirect = dict(redirect or {})
        # Proxies from the environment (HTTPS_PROXY, NO_PROXY) apply unless we redirect: a
        # proxy would then take the connection somewhere else than the redirect says.
        self._trust_env = not self._redirect if trust_env is None else trust_env
        self._timeout = timeout
        self._max_connections = max_connections
        self._api_version = api_version
        self._session: aiohttp.ClientSession | None = None
        self._clients: dict[tuple[str, int], SecretClient] = {}
        self.requests = 0

    @classmethod
    def from_settings(
        cls,
        settings: AgentSettings,
        *,
        credential: AsyncTokenCredential | None = None,
        **options: Any,
    ) -> KeyVaultSource:
        """A source authenticating as the settings say (managed identity, msiEndpoint, overrides).

        A ``credential`` given here (DefaultAzureCredential on a laptop, say) is used for every
        certificate instead, and stays the caller's to close.
        """
        if credential is not None:
            if any(o.msi_client_id for o in settings.observed):
                logger.warning("a credential was given: authenticationOverride entries are ignored")
            return cls(credential, **options)
        cache = CredentialCache(settings, token_timeout=options.get("token_timeout", TOKEN_TIMEOUT))
        source = cls(cache.get(), credentials=cache.overrides(settings.observed), **options)
        source._cache = cache
        return source

    def apply_settings(self, settings: AgentSettings) -> None:
        """Authenticate as re-read settings say; a new identity is used from the next request.

        Only for a source built by ``from_settings`` without a credential: a credential given
        by the caller stays. Credentials no longer needed are closed with the source.
        """
        cache = self._cache
        if cache is None:
            return
        if cache.settings_identity != CredentialCache(settings).settings_identity:
            self._retired.append(cache)
            cache = self._cache = CredentialCache(settings, token_timeout=self._token_timeout)
            self._credential = cache.get()
        self._overrides = {uri.latest: c for uri, c in cache.overrides(settings.observed).items()}

    def set_credential(self, uri: SecretUri, credential: AsyncTokenCredential | None) -> None:
        """Read ``uri`` as another identity from now on (None: back to the default)."""
        if credential is None:
            self._overrides.pop(uri.latest, None)
        else:
            self._overrides[uri.latest] = share(credential, timeout=self._token_timeout)

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            resolver = RedirectResolver(self._redirect) if self._redirect else None
            connector = aiohttp.TCPConnector(
                ssl=self._ssl,
                limit=self._max_connections,
                limit_per_host=self._max_connections,
                resolver=resolver,
            )
            self._session = aiohttp.ClientSession(connector=connector, trust_env=self._trust_env)
        return self._session

    def _identity(self, uri: SecretUri) -> SharedCredential:
        return self._overrides.get(uri.latest, self._credential)

    def client(self, uri: SecretUri) -> SecretClient:
        """The SecretClient for ``uri``'s vault and identity (created on first use)."""
        credential = self._identity(uri)
        key = (uri.vault_url, id(credential))
        client = self._clients.get(key)
        if client is None:
            transport = AioHttpTransport(session=self._session_for_loop(), session_owner=False)
            options: dict[str, Any] = {
                "transport": transport,
                "retry_total": 0,
                # azure-core sets per-request socket timeouts that override the session's.
                "connection_timeout": min(10.0, self._timeout),
                "read_timeout": self._timeout,
            }
            if self._api_version is not None:
                options["api_version"] = self._api_version
            if not uri.hostname.endswith(VAULT_DNS_SUFFIXES):
                # A host outside Azure's clouds was accepted on purpose (allow_any_host): the
                # challenge still names vault.azure.net, which such a host cannot match.
                options["verify_challenge_resource"] = False
            client = SecretClient(uri.vault_url, credential, **options)
            self._clients[key] = client
        return client

    async def get(self, uri: SecretUri) -> SecretVersion:
        """Fetch ``uri`` (latest when it has no version) and return it as a SecretVersion."""
        try:
            secret = await self._exchange(uri)
        except _TokenRefused as refused:
            if not self._identity(uri).reject(refused.token):
                note = "a token fetched fresh after an earlier refusal"
                raise _refused(uri, refused.error, note) from None
            logger.debug("%s: the vault refused the token; once more with a fresh one", uri)
            try:
                secret = await self._exchange(uri)
            except _TokenRefused as again:
                raise _refused(uri, again.error, "and a freshly fetched one too") from None
        props = secret.properties
        version = props.version
        if not version or secret.value is None:
            raise TransientSourceError(f"{uri}: the vault answered without a version or value")
        return SecretVersion(
            uri=uri.latest.with_version(version),
            version=version,
            value=secret.value,
            content_type=props.content_type,
            enabled=props.enabled is not False,
            not_before=props.not_before,
            expires=props.expires_on,
            updated=props.updated_on,
        )

    async def _exchange(self, uri: SecretUri) -> KeyVaultSecret:
        """One ``get_secret``: the vault's part bounded by ``timeout``, errors mapped."""
        client = self.client(uri)
        self.requests += 1
        try:
            # The token's own bound applies while it is fetched: this one stands still.
            with anyio.fail_after(self._timeout) as scope, token_use(scope) as use:
                return await client.get_secret(uri.name, uri.version)
        except TimeoutError:
            raise TransientSourceError(
                f"{uri}: the vault gave no answer within {self._timeout:g} s"
            ) from None
        except Exception as error:
            if (
                use.token is not None
                and not use.failed
                and isinstance(error, ClientAuthenticationError)
                and not isinstance(error, SourceError)
                and error.status_code == 401
            ):
                raise _TokenRefused(use.token, error) from None
            mapped = map_error(uri, error)
            logger.debug("get %s failed: %s", uri, mapped)
            raise mapped from None

    async def aclose(self) -> None:
        """Close every client, the shared session and the credentials this source owns."""
        clients, self._clients = list(self._clients.values()), {}
        try:
            for client in clients:
                await client.close()
        finally:
            try:
                if self._session is not None:
                    await self._session.close()
                    self._session = None
            finally:
                owned, self._owned = self._owned, []
                caches, self._retired = [*self._retired, self._cache], []
                for cache in caches:
                    if cache is not None:
                        await cache.aclose()
                for credential in owned:
                    try:
                        await credential.close()
                    except Exception:
                        logger.warning("closing %r failed", credential, exc_info=True)

    async def __aenter__(self) -> KeyVaultSource:
        """Nothing to open up front; connections are made on first use."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close everything."""
        await self.aclose()

    def __repr__(self) -> str:
        return f"<KeyVaultSource clients={len(self._clients)} redirect={self._redirect or None}>"
