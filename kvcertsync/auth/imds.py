"""ImdsCredential: managed identity tokens from any IMDS-style endpoint (Azure Arc, proxies)."""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import random
import re
import stat
import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Final, Self
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import anyio
import anyio.to_thread
import attrs
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions

from kvcertsync._http import retry_after
from kvcertsync.auth.endpoint import (
    EndpointWatch,
    ImdsAuthenticationError,
    imds_guidance,
    imds_retryable,
)

__all__ = [
    "DEFAULT_API_VERSION",
    "DEFAULT_RESOURCE",
    "ImdsAuthenticationError",
    "ImdsCredential",
    "ImdsRetry",
    "arc_key_directory",
    "token_url",
]

logger = logging.getLogger(__name__)

DEFAULT_API_VERSION: Final = "2018-02-01"
DEFAULT_RESOURCE: Final = "https://vault.azure.net"
_TOKEN_PATH: Final = "/oauth2/token"  # noqa: S105 - a URL path
# azure-identity's limit for the Arc key file (azure/identity/_credentials/azure_arc.py).
_ARC_KEY_MAX_BYTES: Final = 4096
_ARC_CHALLENGE = re.compile(r"\s*basic\s+realm\s*=\s*(?P<realm>.+?)\s*$", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")
_GONE: Final = 410
# A token this close to its expiry is treated as expired: requests still in flight need time.
_EXPIRY_SKEW: Final = 10.0


def arc_key_directory(platform: str = sys.platform) -> str | None:
    """The directory the Azure Arc agent writes its challenge keys to on this platform, or None."""
    # Mirrors azure-identity's _get_key_file_path: these are the only places the agent uses.
    if platform.startswith("linux"):
        return "/var/opt/azcmagent/tokens"
    if platform.startswith("win"):
        program_data = os.environ.get("PROGRAMDATA")
        if program_data:
            return os.path.join(program_data, "AzureConnectedMachineAgent", "Tokens")
    return None


@attrs.frozen
class ImdsRetry:
    """How ImdsCredential retries: exponential backoff with jitter, Retry-After honoured."""

    attempts: int = attrs.field(default=6, validator=attrs.validators.ge(1))
    """Tries in all for 404, 429, 5xx and connection failures (pauses 0.5, 1, 2, 4, 8 s)."""
    backoff: float = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    """The first pause in seconds; it doubles on each retry."""
    max_delay: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    """The longest single pause, a Retry-After included."""
    gone_budget: float = attrs.field(default=70.0, validator=attrs.validators.ge(0))
    """On 410 (IMDS is being updated) keep retrying until this many seconds have passed."""
    jitter: float = attrs.field(
        default=0.2, validator=[attrs.validators.ge(0), attrs.validators.le(1)]
    )
    """Each backoff pause is spread randomly by up to this fraction either way."""
    refresh_pause: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    """After an early refresh fails, serve the cached token this long before trying again."""

    def pause(self, retry: int, rng: random.Random) -> float:
        """The pause before retry number ``retry`` (1-based), jitter included."""
        base = min(self.backoff * 2.0 ** (retry - 1), self.max_delay)
        return base * rng.uniform(1 - self.jitter, 1 + self.jitter)


@attrs.define
class _CachedToken:
    token: str = attrs.field(repr=False)
    token_type: str
    expires_on: float
    refresh_on: float
    fetched_at: float
    """Monotonic time the token arrived, to tell a forced refresh it has already happened."""
    retry_not_before: float = 0.0
    """Monotonic time before which a failed early refresh is not tried again."""

    def info(self) -> AccessTokenInfo:
        return AccessTokenInfo(
            self.token,
            int(self.expires_on),
            token_type=self.token_type,
            refresh_on=int(self.refresh_on),
        )


class _Failure(Exception):
    """One failed attempt: what to say and whether and when to try again."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        realm: str | None = None,
        answered: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.realm = realm
        self.answered = answered


def token_url(endpoint: str) -> str:
    """The token URL for an msiEndpoint: ``/oauth2/token`` appended unless already there."""
    parts = urlsplit(endpoint.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"msiEndpoint must be an http(s) URL with a host, got {endpoint!r}")
    if parts.query or parts.fragment or parts.username is not None:
        raise ValueError(
            f"msiEndpoint must not have user info, a query or a fragment, got {endpoint!r}"
        )
    path = parts.path.rstrip("/")
    if not path.lower().endswith(_TOKEN_PATH):
        path += _TOKEN_PATH
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    return urlunsplit((parts.scheme.lower(), netloc, path, "", ""))


def _is_loopback(url: str) -> bool:
    """Whether ``url`` names this machine (localhost or a loopback address)."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _resource_of(scopes: tuple[str, ...], default: str) -> str:
    """The AADv1 resource for a scope: the scope without a trailing ``/.default``."""
    if not scopes:
        return default
    if len(scopes) != 1:
        raise ValueError("ImdsCredential takes exactly one scope per token request")
    scope = scopes[0]
    if not scope or any(ch.isspace() for ch in scope):
        raise ValueError(f"invalid scope {scope!r}")
    return scope.removesuffix("/.default")


def _error_detail(body: bytes) -> str:
    """``error: error_description`` from an IMDS error body; nothing else of the body is shown."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    parts = []
    for key in ("error", "error_description"):
        value = data.get(key)
        if isinstance(value, str) and value.strip():
            # Printable and short: the text ends up in logs and status files.
            parts.append("".join(ch for ch in value.strip() if ch.isprintable())[:300])
    return ": ".join(parts)


def _int_field(data: Mapping[str, Any], key: str) -> int | None:
    """An integer field that IMDS sends as a string of digits (a number is accepted too)."""
    value = data.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _read_arc_key(realm: str, directory: str | None) -> str:
    """Read the Azure Arc challenge key named by ``realm``, after azure-identity's checks."""
    if directory is None:
        raise ValueError(
            "Azure Arc challenge keys are not supported on this platform (no key directory)"
        )
    if not realm or not os.path.isabs(realm):
        raise ValueError(f"the challenge names {realm!r}, not an absolute path")
    normalized = os.path.normcase(os.path.normpath(realm))
    if os.path.dirname(normalized) != os.path.normcase(os.path.normpath(directory)):
        raise ValueError(f"the challenge names {realm!r}, which is not in {directory!r}")
    if not realm.endswith(".key"):
        raise ValueError(f"the challenge names {realm!r}, which has no '.key' extension")
    try:
        # lstat, then O_NOFOLLOW + fstat: symlinks, FIFOs and devices are refused, and the
        # file checked is the file read.
        if not stat.S_ISREG(os.lstat(realm).st_mode):
            raise ValueError(f"the challenge names {realm!r}, which is not a regular file")
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(realm, flags)
    except FileNotFoundError:
        raise ValueError(f"the challenge names {realm!r}, which does not exist") from None
    except OSError as exc:
        raise ValueError(f"cannot open {realm!r}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"the challenge names {realm!r}, which is not a regular file")
        if info.st_size > _ARC_KEY_MAX_BYTES:
            raise ValueError(f"{realm!r} is larger than {_ARC_KEY_MAX_BYTES} bytes")
        data = file.read(_ARC_KEY_MAX_BYTES + 1)
    if len(data) > _ARC_KEY_MAX_BYTES:
        raise ValueError(f"{realm!r} is larger than {_ARC_KEY_MAX_BYTES} bytes")
    try:
        key = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError(f"{realm!r} is not UTF-8 text") from None
    # The key goes into a header: refuse anything that could split or corrupt it.
    if not key or not key.isprintable():
        raise ValueError(f"{realm!r} is empty or holds non-printable characters")
    return key


class ImdsCredential:
    """An AsyncTokenCredential speaking the IMDS token protocol to any endpoint.

    Azure Arc's ``localhost:40342``, a local emulator or a proxy. Tokens are cached per resource
    and refreshed ``refresh_margin`` seconds before they expire (halfway through the lifetime
    for tokens shorter than twice that); concurrent callers share one request.
    """

    def __init__(
        self,
        endpoint: str,
        client_id: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        resource: str = DEFAULT_RESOURCE,
        refresh_margin: float = 300.0,
        retry: ImdsRetry | None = None,
        timeout: float = 10.0,
        api_version: str = DEFAULT_API_VERSION,
        arc_key_dir: str | os.PathLike[str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if client_id is not None and not client_id.strip():
            raise ValueError("client_id must not be empty (use None for the system identity)")
        if not math.isfinite(refresh_margin) or refresh_margin < 0:
            raise ValueError(f"refresh_margin must be >= 0, got {refresh_margin!r}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout!r}")
        self._url = token_url(endpoint)
        self._client_id = client_id.strip() if client_id is not None else None
        self._resource = resource
        self._refresh_margin = refresh_margin
        self._retry = retry or ImdsRetry()
        self._timeout = timeout
        self._api_version = api_version
        self._arc_dir = os.fspath(arc_key_dir) if arc_key_dir is not None else arc_key_directory()
        self._clock = clock
        self._session = session
        self._owns_session = session is None
        self._watch = EndpointWatch(self._url)
        self._tokens: dict[str, _CachedToken] = {}
        # The last failed fetch per resource, so callers queued behind it fail with it at once.
        self._failures: dict[str, tuple[float, ImdsAuthenticationError]] = {}
        # Created lazily so that construction needs no event loop.
        self._locks: dict[str, anyio.Lock] = {}
        self._rng = random.Random()  # noqa: S311 - backoff jitter, not a secret

    @property
    def endpoint(self) -> str:
        """The token URL this credential calls (no query)."""
        return self._url

    @property
    def watch(self) -> EndpointWatch:
        """What the endpoint answered lately (read by SharedCredential when a request times out)."""
        return self._watch

    @property
    def client_id(self) -> str | None:
        """The user-assigned identity's client id, or None for the system-assigned identity."""
        return self._client_id

    def __repr__(self) -> str:
        return f"ImdsCredential(endpoint={self._url!r}, client_id={self._client_id!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Forget cached tokens and close the HTTP session if this credential created it."""
        self._tokens.clear()
        self._failures.clear()
        if self._owns_session and self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        """A token for one scope (``https://vault.azure.net/.default``); tenant_id is unused."""
        info = await self._get(scopes, claims=claims)
        return AccessToken(info.token, info.expires_on)

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """A token with its type and refresh time; ``claims`` forces a new token."""
        return await self._get(scopes, claims=(options or {}).get("claims"))

    async def _get(self, scopes: tuple[str, ...], *, claims: str | None) -> AccessTokenInfo:
        resource = _resource_of(scopes, self._resource)
        started = anyio.current_time()
        cached = self._tokens.get(resource)
        if claims is None and cached is not None and self._serve_cached(cached, resource):
            return cached.info()
        lock = self._locks.get(resource)
        if lock is None:
            lock = self._locks[resource] = anyio.Lock()
        async with lock:
            cached = self._tokens.get(resource)
            if cached is not None:
                if claims is None and self._serve_cached(cached, resource, waiting=False):
                    return cached.info()
                if claims is not None and cached.fetched_at >= started:
                    # Someone fetched a new token after this call began: it answers the claims.
                    return cached.info()
            usable = cached is not None and claims is None and self._valid(cached)
            failed = self._failures.get(resource)
            if not usable and failed is not None and failed[0] >= started:
                # The fetch this call waited for has just failed: share its verdict, don't
                # start another round of retries behind it.
                raise failed[1].copy()
            try:
                # Holding a valid token, one quick attempt; the full retry policy otherwise.
                fresh = await self._fetch(resource, retry=not usable)
            except ImdsAuthenticationError as exc:
                if cached is None or not usable:
                    self._failures[resource] = (anyio.current_time(), exc)
                    raise
                cached.retry_not_before = anyio.current_time() + self._retry.refresh_pause
                logger.warning(
                    "early token refresh failed, using the cached token (valid %.0f s more): %s",
                    cached.expires_on - self._clock(),
                    exc,
                )
                return cached.info()
            self._tokens[resource] = fresh
            self._failures.pop(resource, None)
            return fresh.info()

    def _valid(self, cached: _CachedToken) -> bool:
        return self._clock() < cached.expires_on - _EXPIRY_SKEW

    def _serve_cached(self, cached: _CachedToken, resource: str, *, waiting: bool = True) -> bool:
        """Whether the cached token answers a call without a new request."""
        if self._clock() < cached.refresh_on:
            return True
        if not self._valid(cached):
            return False
        # Due for refresh but still valid: don't retry a refresh that failed moments ago, and
        # when about to wait for the lock, don't queue behind a refresh already in flight.
        if anyio.current_time() < cached.retry_not_before:
            return True
        lock = self._locks.get(resource)
        return waiting and lock is not None and lock.locked()

    def _session_for_request(self) -> aiohttp.ClientSession:
        if self._session is None or (self._owns_session and self._session.closed):
            # trust_env stays off: IMDS is local and must never go through an HTTP proxy.
            self._session = aiohttp.ClientSession(trust_env=False)
            self._owns_session = True
        return self._session

    async def _fetch(self, resource: str, *, retry: bool) -> _CachedToken:
        """One token from the endpoint, retrying per the IMDS guidance when ``retry``."""
        params = {"api-version": self._api_version, "resource": resource}
        if self._client_id is not None:
            params["client_id"] = self._client_id
        headers = {"Metadata": "true"}
        start = anyio.current_time()
        attempt = 0
        answered_challenge = False
        while True:
            attempt += 1
            try:
                return await self._attempt(params, headers, resource)
            except _Failure as failure:
                if failure.realm is not None and not answered_challenge:
                    answered_challenge = True
                    try:
                        headers["Authorization"] = "Basic " + await self._arc_key(failure.realm)
                    except _Failure as refused:
                        raise self._error(refused, resource, attempt) from None
                    attempt -= 1
                    continue
                if failure.status == 401 and answered_challenge:
                    failure.message += " after answering the Azure Arc key challenge"
                delay = self._next_delay(failure, attempt, anyio.current_time() - start, retry)
                if delay is None:
                    raise self._error(failure, resource, attempt) from None
                logger.info(
                    "token request to %s failed (%s); retry %d in %.2f s",
                    self._url,
                    failure.message,
                    attempt,
                    delay,
                )
                await anyio.sleep(delay)

    def _next_delay(
        self, failure: _Failure, attempt: int, elapsed: float, retry: bool
    ) -> float | None:
        """The pause before the next attempt, or None to give up."""
        if not retry or not failure.retryable:
            return None
        policy = self._retry
        pause = policy.pause(attempt, self._rng)
        if failure.retry_after is not None:
            pause = min(failure.retry_after, policy.max_delay)
        if failure.status == _GONE:
            # IMDS answers 410 for up to 70 s while it is updated: wait it out within the budget.
            remaining = policy.gone_budget - elapsed
            if remaining <= 0:
                return None
            return min(pause, remaining)
        return pause if attempt < policy.attempts else None

    def _error(self, failure: _Failure, resource: str, attempts: int) -> ImdsAuthenticationError:
        who = f"client_id {self._client_id}" if self._client_id else "the system-assigned identity"
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        advice = imds_guidance(failure.status if failure.answered else None)
        if failure.status is None and failure.answered:
            advice = ""  # a reply we could not use: the message says what was wrong with it
        return ImdsAuthenticationError(
            f"managed identity endpoint {self._url} (token for {resource}, {who}) "
            f"failed{tries}: {failure.message}" + (f"; {advice}" if advice else ""),
            endpoint=self._url,
            imds_status=failure.status,
            retryable=failure.retryable,
            retry_after=failure.retry_after,
        )

    async def _arc_key(self, realm: str) -> str:
        """The Azure Arc challenge key, read in a worker thread, or a _Failure saying why not."""
        if not _is_loopback(self._url):
            # The key proves local access to the Arc agent; never send it off this machine.
            raise _Failure(
                "HTTP 401 with an Azure Arc key challenge, refused: the endpoint is not on this "
                "machine (localhost or a loopback address)",
                status=401,
            )
        try:
            return await anyio.to_thread.run_sync(_read_arc_key, realm, self._arc_dir)
        except ValueError as exc:
            message = f"HTTP 401, refused the Azure Arc key challenge: {exc}"
            raise _Failure(message, status=401) from None

    async def _attempt(
        self, params: Mapping[str, str], headers: Mapping[str, str], resource: str
    ) -> _CachedToken:
        session = self._session_for_request()
        logger.debug("requesting a token from %s for %s", self._url, resource)
        self._watch.sent()
        try:
            async with session.get(
                self._url,
                params=params,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=self._timeout),
            ) as response:
                status = response.status
                body = await response.read()
                response_headers = response.headers
        except TimeoutError:
            raise _Failure(
                f"did not answer within {self._timeout:g} s", retryable=True, answered=False
            ) from None
        except aiohttp.ClientError as exc:
            raise _Failure(
                f"connection failed ({type(exc).__name__})", retryable=True, answered=False
            ) from None
        self._watch.answered(status)
        if status == 200:
            return self._parse(body)
        detail = _error_detail(body)
        message = f"HTTP {status}" + (f" ({detail})" if detail else "")
        if status == 401:
            match = _ARC_CHALLENGE.match(response_headers.get("WWW-Authenticate", ""))
            realm = match.group("realm").strip('"') if match else None
            raise _Failure(message, status=status, realm=realm)
        if status == 400 and not detail:
            message += " (is the identity assigned to this machine?)"
        raise _Failure(
            message,
            status=status,
            retryable=imds_retryable(status),
            retry_after=retry_after(response_headers),
        )

    def _parse(self, body: bytes) -> _CachedToken:
        """A token from a 200 reply; errors name fields, never their values."""
        try:
            data = json.loads(body)
        except ValueError:
            raise _Failure("HTTP 200 but the body is not JSON") from None
        if not isinstance(data, dict):
            raise _Failure("HTTP 200 but the body is not a JSON object")
        token = data.get("access_token")
        if not isinstance(token, str) or not token or not token.isprintable():
            raise _Failure("HTTP 200 but no valid 'access_token' in the reply")
        token_type = data.get("token_type", "Bearer")
        if not isinstance(token_type, str) or not token_type:
            raise _Failure("HTTP 200 but 'token_type' is not a string")
        returned = data.get("client_id")
        if (
            self._client_id is not None
            and isinstance(returned, str)
            and returned.lower() != self._client_id.lower()
        ):
            # azure-identity checks this for Azure Arc, which returns the system identity's token
            # when asked for a user-assigned one it does not have.
            raise _Failure(
                f"asked for client_id {self._client_id} but the token is for client_id {returned}"
            )
        now = self._clock()
        expires_on = _int_field(data, "expires_on")
        expires_in = _int_field(data, "expires_in")
        if expires_on is None and expires_in is not None:
            expires_on = int(now) + expires_in
        if expires_on is None:
            raise _Failure("HTTP 200 but neither 'expires_on' nor 'expires_in' is a number")
        if expires_on <= now:
            raise _Failure(
                f"HTTP 200 but the token expired at {expires_on} (now {now:.0f}): "
                "is this machine's clock right?"
            )
        lifetime = expires_in if expires_in is not None and expires_in > 0 else expires_on - now
        margin = min(self._refresh_margin, lifetime / 2)
        return _CachedToken(
            token=token,
            token_type=token_type,
            expires_on=float(expires_on),
            refresh_on=expires_on - margin,
            fetched_at=anyio.current_time(),
        )
