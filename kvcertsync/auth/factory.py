"""Pick a credential from authenticationSettings, and share one per identity across certificates."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit

import aiohttp
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.pipeline.transport import AioHttpTransport
from azure.identity.aio import ManagedIdentityCredential

from kvcertsync.auth.endpoint import EndpointWatch
from kvcertsync.auth.imds import DEFAULT_API_VERSION, ImdsCredential, token_url
from kvcertsync.auth.shared import TOKEN_TIMEOUT, SharedCredential
from kvcertsync.settings import AgentSettings, ObservedCertificate
from kvcertsync.uri import SecretUri

__all__ = [
    "ARC_API_VERSION",
    "CredentialCache",
    "credential_from_settings",
    "is_arc_endpoint",
    "is_standard_imds",
]

logger = logging.getLogger(__name__)

_IMDS_HOST: Final = "169.254.169.254"
_IMDS_PATHS: Final = frozenset({"/metadata/identity", "/metadata/identity/oauth2/token"})
_ARC_PORT: Final = 40342
ARC_API_VERSION: Final = "2020-06-01"
"""The api-version azure-identity's AzureArcCredential sends; used for Arc's local endpoint."""


def is_standard_imds(endpoint: str) -> bool:
    """Whether ``endpoint`` is Azure's own IMDS (``http://169.254.169.254/metadata/identity``)."""
    try:
        parts = urlsplit(endpoint.strip())
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme.lower() == "http"
        and parts.hostname == _IMDS_HOST
        and port in (None, 80)
        and parts.username is None
        and not parts.query
        and not parts.fragment
        and parts.path.rstrip("/").lower() in _IMDS_PATHS
    )


def is_arc_endpoint(endpoint: str) -> bool:
    """Whether ``endpoint`` is the Azure Arc agent's local identity endpoint (port 40342)."""
    try:
        parts = urlsplit(endpoint.strip())
        port = parts.port
    except ValueError:
        return False
    host = (parts.hostname or "").lower()
    return port == _ARC_PORT and host in ("localhost", "127.0.0.1", "::1")


def credential_from_settings(
    auth: AgentSettings | None = None,
    override_client_id: str | None = None,
    *,
    session: aiohttp.ClientSession | None = None,
) -> AsyncTokenCredential:
    """The credential the settings ask for; ``override_client_id`` wins over ``msiClientId``.

    No ``msiEndpoint`` or Azure's standard IMDS endpoint: azure-identity's
    ``ManagedIdentityCredential`` (system-assigned, or user-assigned with a client id). Any other
    endpoint (Azure Arc, an emulator, a proxy): ``ImdsCredential``. A ``session`` is used,
    never closed, by the credential.
    """
    return _credential(auth, override_client_id, session, None)[0]


def _credential(
    auth: AgentSettings | None,
    override_client_id: str | None,
    session: aiohttp.ClientSession | None,
    watch: EndpointWatch | None,
) -> tuple[AsyncTokenCredential, EndpointWatch | None]:
    """The credential ``credential_from_settings`` picks, and the watch of its endpoint.

    ``watch`` is fed by an azure-identity credential's requests; an ImdsCredential has its own.
    """
    endpoint = auth.msi_endpoint if auth is not None else None
    client_id = override_client_id or (auth.msi_client_id if auth is not None else None)
    if endpoint is None or is_standard_imds(endpoint):
        # The watch learns the URL from the first request: azure-identity picks it (IMDS, or
        # what the environment names: App Service, Arc, Cloud Shell...).
        kwargs: dict[str, Any] = watch.hooks() if watch is not None else {}
        if session is not None:
            kwargs["transport"] = AioHttpTransport(session=session, session_owner=False)
        logger.debug(
            "using azure-identity ManagedIdentityCredential (%s)",
            f"client_id {client_id}" if client_id else "system-assigned",
        )
        return ManagedIdentityCredential(client_id=client_id, **kwargs), watch
    api_version = ARC_API_VERSION if is_arc_endpoint(endpoint) else DEFAULT_API_VERSION
    credential = ImdsCredential(endpoint, client_id, session=session, api_version=api_version)
    logger.debug("using %r", credential)
    return credential, credential.watch


class CredentialCache:
    """One credential per (msiEndpoint, client id), shared by every certificate with that identity.

    Each is a SharedCredential whose token requests end after ``token_timeout`` seconds, and whose
    failures name the managed identity endpoint. ``aclose()`` (or leaving ``async with``) closes
    every credential it handed out.
    """

    def __init__(
        self,
        settings: AgentSettings | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        token_timeout: float | None = TOKEN_TIMEOUT,
    ) -> None:
        self._settings = settings
        self._session = session
        self._token_timeout = token_timeout
        self._credentials: dict[tuple[str | None, str | None], SharedCredential] = {}
        self._closed = False

    def __len__(self) -> int:
        return len(self._credentials)

    def __repr__(self) -> str:
        return f"CredentialCache({len(self._credentials)} credentials)"

    @property
    def settings_identity(self) -> tuple[str | None, str | None]:
        """The (token endpoint, client id) the settings authenticate as by default."""
        return self._key(self._settings.msi_client_id if self._settings is not None else None)

    def _key(self, client_id: str | None) -> tuple[str | None, str | None]:
        endpoint = self._settings.msi_endpoint if self._settings is not None else None
        if endpoint is not None:
            endpoint = None if is_standard_imds(endpoint) else token_url(endpoint)
        # Client ids are GUIDs: case does not make a different identity.
        return endpoint, client_id.strip().lower() if client_id else None

    def get(self, client_id: str | None = None) -> SharedCredential:
        """The credential for ``client_id`` (default: the settings' ``msiClientId``)."""
        if self._closed:
            raise RuntimeError("this CredentialCache is closed")
        if client_id is None and self._settings is not None:
            client_id = self._settings.msi_client_id
        key = self._key(client_id)
        credential = self._credentials.get(key)
        if credential is None:
            inner, watch = _credential(self._settings, client_id, self._session, EndpointWatch())
            credential = SharedCredential(inner, timeout=self._token_timeout, watch=watch)
            self._credentials[key] = credential
        return credential

    def for_certificate(self, observed: ObservedCertificate) -> SharedCredential:
        """The credential for one certificate, honouring its ``authenticationOverride``."""
        return self.get(observed.msi_client_id)

    def overrides(
        self, observed: Iterable[ObservedCertificate]
    ) -> dict[SecretUri, SharedCredential]:
        """Credentials of the certificates that have an ``authenticationOverride``, by URI."""
        return {cert.uri: self.for_certificate(cert) for cert in observed if cert.msi_client_id}

    async def aclose(self) -> None:
        """Close every credential handed out; later ``get()`` calls raise RuntimeError."""
        self._closed = True
        credentials, self._credentials = list(self._credentials.values()), {}
        for credential in credentials:
            try:
                await credential.close()
            except Exception:
                # Closing is best effort: one failure must not leave the others open.
                logger.warning("closing %r failed", credential, exc_info=True)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()
