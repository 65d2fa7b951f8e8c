"""The direct GET: one secret over the shared aiohttp session, without the SDK's pipeline.

It does what the SDK's challenge policy does for a GET, with the SDK's own challenge parser
and resource check, and leaves everything else to the SDK: a response or a challenge it does
not fully understand raises ``Unusual``, and the caller asks again through the SDK's
SecretClient, whose answer is the reference. Transport failures are wrapped the way azure-core's
AioHttpTransport wraps them, so both paths map them to the same SourceErrors.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import attrs
from aiohttp.client_exceptions import ConnectionTimeoutError
from azure.core.credentials import AccessTokenInfo, TokenRequestOptions
from azure.core.exceptions import (
    IncompleteReadError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.keyvault.secrets._shared import http_challenge_cache
from azure.keyvault.secrets._shared.challenge_auth_policy import _validate_challenge_resource
from azure.keyvault.secrets._shared.http_challenge import HttpChallenge

from kvcertsync._version import __version__
from kvcertsync.auth.shared import SharedCredential
from kvcertsync.sources._errors import TokenRefused, status_error
from kvcertsync.sources.base import SecretVersion
from kvcertsync.uri import SecretUri

__all__ = ["DirectClient", "Unusual", "known_challenge"]

# The statuses the direct path answers itself; anything else goes to the SDK.
_MAPPED = frozenset({403, 404, 408, 429})
# The SDK asks for a new token this long before the one it holds expires.
_REFRESH_MARGIN = 300.0
_USER_AGENT = f"kvcertsync/{__version__} (direct)"


class Unusual(Exception):
    """Something the direct path leaves to the SDK: ask again through the SecretClient."""


@attrs.frozen
class Challenge:
    """What a vault's 401 challenge said: the scope to ask a token for, and the tenant."""

    scope: str
    tenant_id: str | None

    @property
    def options(self) -> TokenRequestOptions:
        """The token request the SDK's policy makes for this challenge."""
        options: TokenRequestOptions = {"enable_cae": True}
        # AD FS challenges name the tenant "adfs", which must not be asked for (as the SDK).
        if self.tenant_id and not self.tenant_id.lower().endswith("adfs"):
            options["tenant_id"] = self.tenant_id
        return options


def _parse_challenge(url: str, header: str | None, verify_resource: bool) -> Challenge:
    """The challenge in ``header``; ValueError (the SDK's) when its resource is another's."""
    if not header or " " not in header.strip():
        raise Unusual("no usable challenge")
    try:
        challenge = HttpChallenge(url, header)
    except ValueError:
        raise Unusual("a challenge the SDK's parser refuses") from None
    if challenge.claims:
        raise Unusual("a claims challenge (CAE)")
    scope = challenge.get_scope() or challenge.get_resource() + "/.default"
    if verify_resource:
        _validate_challenge_resource(scope, url)  # raises the SDK's own ValueError
    # A fallback to the SDK must not pay this vault's challenge again.
    http_challenge_cache.set_challenge_for_url(url, challenge)
    return Challenge(scope, challenge.tenant_id)


def known_challenge(vault: str) -> Challenge | None:
    """The challenge this process already learnt for ``vault`` (any source, either path).

    The SDK keeps challenges process-wide, checked as they were learnt; sharing that cache
    means a process pays one challenge per vault, however many sources it runs.
    """
    challenge = http_challenge_cache.get_challenge_for_url(vault)
    if challenge is None or challenge.claims:
        return None
    scope = challenge.get_scope() or challenge.get_resource() + "/.default"
    return Challenge(scope, challenge.tenant_id)


def _epoch(attributes: dict[str, Any], key: str) -> datetime | None:
    value = attributes.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unusual(f"attributes.{key} is not a number")
    return datetime.fromtimestamp(value, UTC)


def parse_secret(uri: SecretUri, body: bytes) -> SecretVersion:
    """The SecretVersion in a 200 body; Unusual for anything the SDK should judge."""
    try:
        data = json.loads(body)
    except ValueError:
        raise Unusual("a body that is not JSON") from None
    if not isinstance(data, dict):
        raise Unusual("a body that is not an object")
    value, ident, content_type = data.get("value"), data.get("id"), data.get("contentType")
    attributes = data.get("attributes") or {}
    if not (isinstance(value, str) and isinstance(ident, str) and isinstance(attributes, dict)):
        raise Unusual("a secret without value, id or attributes")
    if content_type is not None and not isinstance(content_type, str):
        raise Unusual("a contentType that is not a string")
    parts = ident.split("?", 1)[0].rstrip("/").split("/")
    # https: / '' / host / secrets / name / version
    if len(parts) != 6 or parts[3] != "secrets" or not parts[5]:
        raise Unusual("an id that is not /secrets/<name>/<version>")
    version = parts[5]
    enabled = attributes.get("enabled")
    if enabled is not None and not isinstance(enabled, bool):
        raise Unusual("attributes.enabled is not a boolean")
    return SecretVersion(
        uri=uri.latest.with_version(version),
        version=version,
        value=value,
        content_type=content_type,
        enabled=enabled is not False,
        not_before=_epoch(attributes, "nbf"),
        expires=_epoch(attributes, "exp"),
        updated=_epoch(attributes, "updated"),
    )


class DirectClient:
    """GET secrets as the SDK would, without its pipeline: challenge, token, one request."""

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        *,
        api_version: str,
        connection_timeout: float,
        read_timeout: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self._api_version = api_version
        self._timeout = aiohttp.ClientTimeout(
            sock_connect=connection_timeout, sock_read=read_timeout
        )
        self._clock = clock
        #: The challenge each vault (its base URL) answered with.
        self.challenges: dict[str, Challenge] = {}
        self._tokens: dict[tuple[SharedCredential, Challenge], AccessTokenInfo] = {}

    def __repr__(self) -> str:
        return f"<DirectClient vaults={len(self.challenges)} tokens={len(self._tokens)}>"

    def forget(self, token: str) -> None:
        """Stop using ``token`` (the vault refused it): the next request asks for another."""
        self._tokens = {k: v for k, v in self._tokens.items() if v.token != token}

    async def get(
        self, uri: SecretUri, credential: SharedCredential, verify_resource: bool
    ) -> SecretVersion:
        """GET ``uri``; SourceError, TokenRefused, the SDK's ValueError, or Unusual."""
        vault = uri.vault_url
        url = f"{vault}/secrets/{uri.name}/{uri.version or ''}?api-version={self._api_version}"
        challenge = self.challenges.get(vault) or known_challenge(vault)
        if challenge is None:
            status, reason, headers, body = await self._send(url, None)
            if status != 401:
                return self._answer(uri, status, reason, headers, body)
            challenge = _parse_challenge(url, headers.get("WWW-Authenticate"), verify_resource)
            self.challenges[vault] = challenge
        token = await self._token(credential, challenge)
        status, reason, headers, body = await self._send(url, token)
        if status == 401:
            fresh = _parse_challenge(url, headers.get("WWW-Authenticate"), verify_resource)
            if fresh == challenge:
                raise TokenRefused(token, body.decode("utf-8", "replace"))
            # The vault moved (another tenant, say): as the SDK, follow it once.
            self.challenges[vault] = fresh
            token = await self._token(credential, fresh)
            status, reason, headers, body = await self._send(url, token)
            if status == 401:
                raise TokenRefused(token, body.decode("utf-8", "replace"))
        return self._answer(uri, status, reason, headers, body)

    @staticmethod
    def _answer(
        uri: SecretUri, status: int, reason: str | None, headers: Any, body: bytes
    ) -> SecretVersion:
        if status == 200:
            return parse_secret(uri, body)
        if status in _MAPPED or status >= 500:
            raise status_error(uri, status, reason, body.decode("utf-8", "replace"), headers)
        raise Unusual(f"HTTP {status}")

    async def _token(self, credential: SharedCredential, challenge: Challenge) -> str:
        """The token for ``challenge``, kept while the SDK's policy would keep it."""
        key = (credential, challenge)
        info = self._tokens.get(key)
        now = self._clock()
        if (
            info is None
            or (info.refresh_on is not None and info.refresh_on <= now)
            or info.expires_on - now < _REFRESH_MARGIN
        ):
            info = await credential.get_token_info(challenge.scope, options=challenge.options)
            self._tokens[key] = info
        return info.token

    async def _send(self, url: str, token: str | None) -> tuple[int, str | None, Any, bytes]:
        """One GET, its transport failures wrapped as azure-core's AioHttpTransport does."""
        headers = {"Accept": "application/json", "User-Agent": _USER_AGENT}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._session().get(
                url, headers=headers, allow_redirects=False, timeout=self._timeout
            ) as response:
                try:
                    body = await response.read()
                except aiohttp.ClientPayloadError as err:
                    raise IncompleteReadError(err, error=err) from err
                return response.status, response.reason, response.headers, body
        except aiohttp.ClientResponseError as err:
            raise ServiceResponseError(err, error=err) from err
        except ConnectionTimeoutError as err:
            raise ServiceRequestTimeoutError(err, error=err) from err
        except TimeoutError as err:
            raise ServiceResponseTimeoutError(err, error=err) from err
        except aiohttp.ClientError as err:
            raise ServiceRequestError(err, error=err) from err
