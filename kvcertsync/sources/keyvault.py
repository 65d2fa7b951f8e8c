"""KeyVaultSource: Key Vault secrets, directly or through the official SDK, on one session.

The direct path (the default) GETs each secret over the shared aiohttp session with the SDK's
own challenge parser and resource check, and hands anything unusual to the SDK's SecretClient;
``mode="sdk"`` sends every request through the SecretClient, the reference implementation.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
import anyio
import anyio.lowlevel
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError
from azure.core.pipeline.transport import AioHttpTransport
from azure.keyvault.secrets._shared import http_challenge_cache
from azure.keyvault.secrets._shared.client_base import DEFAULT_VERSION, ApiVersion
from azure.keyvault.secrets.aio import SecretClient

from kvcertsync.auth import CredentialCache
from kvcertsync.auth.shared import TOKEN_TIMEOUT, SharedCredential, share, token_use
from kvcertsync.errors import SourceError, TransientSourceError
from kvcertsync.sources._direct import DirectClient, Unusual
from kvcertsync.sources._errors import TokenRefused, map_error, refused
from kvcertsync.sources.base import SecretVersion
from kvcertsync.sources.redirect import RedirectResolver
from kvcertsync.uri import VAULT_DNS_SUFFIXES, SecretUri

if TYPE_CHECKING:
    from kvcertsync.settings import AgentSettings

__all__ = ["MODES", "KeyVaultSource", "map_error"]

logger = logging.getLogger(__name__)

#: The vaults a first request is learning the challenge of, per event loop, across every
#: source in the process (challenges are kept process-wide): the others wait for it.
_WARMING: dict[tuple[object, str], anyio.Event] = {}

Mode = Literal["direct", "sdk"]
#: How a KeyVaultSource sends its GETs: ``direct`` (lean, the default) or ``sdk`` (the reference).
MODES: tuple[Mode, ...] = ("direct", "sdk")
_SUPPORTED_VERSIONS = tuple(v.value for v in ApiVersion)


class KeyVaultSource:
    """Reads Key Vault secrets on one aiohttp session; the engine retries, never the source.

    ``mode="direct"`` (the default) GETs each secret itself, with the SDK's challenge parser
    and resource check, and asks the SDK for anything it does not fully understand;
    ``mode="sdk"`` reads every secret with ``azure.keyvault.secrets.aio.SecretClient`` (a client
    per vault and identity, the SDK's retries off). The first request to a vault goes alone:
    the others wait until its challenge is known, so a process pays one challenge per vault.

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
        mode: Mode = "direct",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if api_version is not None and api_version not in _SUPPORTED_VERSIONS:
            raise ValueError(
                f"api_version {api_version!r} is not one the Key Vault SDK supports: "
                + ", ".join(_SUPPORTED_VERSIONS)
            )
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
        self.mode: Mode = mode
        self._direct = DirectClient(
            self._session_for_loop,
            api_version=api_version or DEFAULT_VERSION.value,
            connection_timeout=min(10.0, timeout),
            read_timeout=timeout,
        )
        #: Vaults whose challenge is known; the first request to any other goes alone.
        self._warm: set[str] = set()
        #: Requests sent (fallbacks to the SDK count twice), and how many fell back.
        self.requests = 0
        self.fallbacks = 0

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

    @staticmethod
    def _verify_resource(uri: SecretUri) -> bool:
        # A host outside Azure's clouds was accepted on purpose (allow_any_host): the
        # challenge still names vault.azure.net, which such a host cannot match.
        return uri.hostname.endswith(VAULT_DNS_SUFFIXES)

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
            if not self._verify_resource(uri):
                options["verify_challenge_resource"] = False
            client = SecretClient(uri.vault_url, credential, **options)
            self._clients[key] = client
        return client

    async def get(self, uri: SecretUri) -> SecretVersion:
        """Fetch ``uri`` (latest when it has no version) and return it as a SecretVersion."""
        vault = uri.vault_url
        while vault not in self._warm:
            if self._challenge_known(vault):
                self._warm.add(vault)
                break
            warming = _WARMING.get((anyio.lowlevel.current_token(), vault))
            if warming is None:
                return await self._warm_up(uri)
            # Another request is learning this vault's challenge: go once it is known. If
            # that request failed first, the next one in line tries alone in its turn.
            await warming.wait()
        return await self._get(uri)

    async def _warm_up(self, uri: SecretUri) -> SecretVersion:
        """The first request to a vault, alone: the others wait until its challenge is known."""
        vault = uri.vault_url
        key = (anyio.lowlevel.current_token(), vault)
        warming = _WARMING[key] = anyio.Event()
        try:
            return await self._get(uri)
        finally:
            if self._challenge_known(vault):
                self._warm.add(vault)
            del _WARMING[key]
            warming.set()

    def _challenge_known(self, vault: str) -> bool:
        if self.mode == "direct" and vault in self._direct.challenges:
            return True
        return http_challenge_cache.get_challenge_for_url(vault) is not None

    async def _get(self, uri: SecretUri) -> SecretVersion:
        """One read, a refused token renewed once."""
        exchange = self._direct_exchange if self.mode == "direct" else self._sdk_exchange
        try:
            return await self._bounded(uri, exchange)
        except TokenRefused as refusal:
            self._direct.forget(refusal.token)
            if not self._identity(uri).reject(refusal.token):
                note = "a token fetched fresh after an earlier refusal"
                raise refused(uri, refusal, note) from None
            logger.debug("%s: the vault refused the token; once more with a fresh one", uri)
            try:
                return await self._bounded(uri, exchange)
            except TokenRefused as again:
                self._direct.forget(again.token)
                raise refused(uri, again, "and a freshly fetched one too") from None

    async def _direct_exchange(self, uri: SecretUri) -> SecretVersion:
        """The direct GET; what it leaves to the SDK goes there."""
        self.requests += 1
        try:
            return await self._direct.get(uri, self._identity(uri), self._verify_resource(uri))
        except Unusual as unusual:
            logger.debug("%s: %s; asking through the SDK", uri, unusual)
            self.fallbacks += 1
            return await self._sdk_exchange(uri)

    async def _bounded(
        self, uri: SecretUri, exchange: Callable[[SecretUri], Awaitable[SecretVersion]]
    ) -> SecretVersion:
        """One exchange: the vault's part bounded by ``timeout``, errors mapped."""
        try:
            # The token's own bound applies while it is fetched: this one stands still.
            with anyio.fail_after(self._timeout) as scope, token_use(scope) as use:
                return await exchange(uri)
        except TimeoutError:
            raise TransientSourceError(
                f"{uri}: the vault gave no answer within {self._timeout:g} s"
            ) from None
        except TokenRefused:
            raise
        except Exception as error:
            if (
                use.token is not None
                and not use.failed
                and isinstance(error, ClientAuthenticationError)
                and not isinstance(error, SourceError)
                and error.status_code == 401
            ):
                raise TokenRefused(use.token, _text(error)) from None
            mapped = map_error(uri, error)
            logger.debug("get %s failed: %s", uri, mapped)
            raise mapped from None

    async def _sdk_exchange(self, uri: SecretUri) -> SecretVersion:
        """One ``get_secret`` through the SDK's SecretClient."""
        client = self.client(uri)
        self.requests += 1
        secret = await client.get_secret(uri.name, uri.version)
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
        return (
            f"<KeyVaultSource mode={self.mode} clients={len(self._clients)} "
            f"redirect={self._redirect or None}>"
        )


def _text(error: ClientAuthenticationError) -> str | None:
    """The body of the vault's 401, for the service's code and message."""
    response = error.response
    try:
        return response.text() if response is not None else None
    except (ValueError, TypeError, AttributeError):
        return None
