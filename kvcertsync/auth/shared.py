"""SharedCredential: tokens for many polls at once: shared, bounded in time, renewed when refused.

Many certificates of one vault and identity poll at once. azure-core's Key Vault challenge policy
asks the credential for a token per request, and azure-identity retries IMDS on its own, so a
cold start or an IMDS outage would multiply token requests by the number of polls in flight.
Wrapped in SharedCredential, concurrent callers share one request, and callers arriving just
after a failure get that failure instead of asking IMDS again. One request is bounded in time
(``timeout``), and a failure names the managed identity endpoint rather than the vault. When the
vault refuses a token the credential still trusts (revoked, a clock off), ``reject`` makes the
next request fetch a fresh one, once. Inside ``with token_use(scope)`` a caller learns which
token its request sent and whether the credential failed, and its deadline waits for the token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final, Self

import anyio
import attrs
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError

from kvcertsync.auth.endpoint import CredentialTimeout, EndpointWatch
from kvcertsync.errors import SourceError

__all__ = ["RENEW_PAUSE", "TOKEN_TIMEOUT", "SharedCredential", "TokenUse", "share", "token_use"]

logger = logging.getLogger(__name__)

_Key = tuple[Any, ...]

TOKEN_TIMEOUT: Final = 90.0
"""The default bound of one token request: IMDS may answer 410 for 70 s while it is updated."""
RENEW_PAUSE: Final = 5.0
"""A token fetched because the vault refused one is not renewed again for this long."""


@attrs.define
class TokenUse:
    """The tokens SharedCredentials handed out for one request (``token_use``), and its clock."""

    deadline: anyio.CancelScope | None = None
    """The request's bound: stopped while a token is fetched, as that has a bound of its own."""
    token: str | None = attrs.field(default=None, repr=False)
    """The last token handed out: the one the request sent."""
    failed: bool = False
    """Whether a token request failed: then the request's error is the credential's."""


_USE: ContextVar[TokenUse | None] = ContextVar("kvcertsync_token_use", default=None)


@contextmanager
def token_use(deadline: anyio.CancelScope | None = None) -> Iterator[TokenUse]:
    """Follow the tokens asked for in this context, one request: which was sent, what failed.

    ``deadline`` (the request's cancel scope) stands still while a token is being fetched.
    """
    use = TokenUse(deadline)
    reset = _USE.set(use)
    try:
        yield use
    finally:
        _USE.reset(reset)


class _Flight:
    """One request in progress; everyone who asked for the same token waits for it."""

    def __init__(self, renewing: bool) -> None:
        self.renewing = renewing
        self.done = anyio.Event()
        self.result: AccessTokenInfo | None = None
        self.error: BaseException | None = None


@attrs.frozen
class _Issued:
    """The token last handed out for one request shape, as a digest (no copy of the secret)."""

    digest: bytes
    renewed_at: float | None
    """When it was fetched because the vault refused the one before; None for a usual fetch."""


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _fresh_claims() -> str:
    """A claims challenge for a token issued from now on, in the form Key Vault sends (CAE).

    Passing claims is azure-core's documented way to make a credential skip its cache;
    azure-identity's managed identity credentials and ImdsCredential send nothing of it to IMDS.
    """
    nbf = {"essential": True, "value": str(int(time.time()))}
    return json.dumps({"access_token": {"nbf": nbf}}, separators=(",", ":"))


class SharedCredential:
    """Wraps any AsyncTokenCredential: single flight per request shape, failures remembered,
    each request bounded by ``timeout`` seconds (None: unbounded), refused tokens renewed once."""

    def __init__(
        self,
        inner: AsyncTokenCredential,
        *,
        failure_ttl: float = 5.0,
        timeout: float | None = TOKEN_TIMEOUT,
        renew_pause: float = RENEW_PAUSE,
        watch: EndpointWatch | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive or None, got {timeout!r}")
        self.inner = inner
        self.failure_ttl = failure_ttl
        self.timeout = timeout
        self.renew_pause = renew_pause
        inner_watch = getattr(inner, "watch", None)
        if watch is None and isinstance(inner_watch, EndpointWatch):
            watch = inner_watch  # an ImdsCredential's own
        #: What the inner credential's endpoint answered lately (None: not a managed identity).
        self.watch = watch
        self._clock = clock
        self._flights: dict[_Key, _Flight] = {}
        self._failures: dict[_Key, tuple[float, BaseException]] = {}
        self._issued: dict[_Key, _Issued] = {}
        self._renew: set[_Key] = set()

    def __repr__(self) -> str:
        return f"SharedCredential({self.inner!r})"

    async def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        """A token for ``scopes``, shared with concurrent callers asking the same."""
        key = ("token", scopes, claims, tenant_id, enable_cae, tuple(sorted(kwargs.items())))

        async def fetch(renewing: bool) -> AccessTokenInfo:
            token = await self.inner.get_token(
                *scopes,
                claims=claims or (_fresh_claims() if renewing else None),
                tenant_id=tenant_id,
                enable_cae=enable_cae,
                **kwargs,
            )
            return AccessTokenInfo(token.token, token.expires_on)

        info = await self._served(key, fetch)
        return AccessToken(info.token, info.expires_on)

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """The token-info form azure-core prefers, shared the same way."""
        # azure-core passes claims=None on one path and omits it on another: the same request.
        key = (
            "info",
            scopes,
            tuple(sorted((k, v) for k, v in (options or {}).items() if v is not None)),
        )
        inner_info = getattr(self.inner, "get_token_info", None)

        async def fetch(renewing: bool) -> AccessTokenInfo:
            asked: TokenRequestOptions = {**(options or {})}
            if renewing and not asked.get("claims"):
                asked["claims"] = _fresh_claims()
            if inner_info is not None:
                result: AccessTokenInfo = await inner_info(*scopes, options=asked)
                return result
            opts: dict[str, Any] = dict(asked)
            token = await self.inner.get_token(*scopes, **opts)
            return AccessTokenInfo(token.token, token.expires_on)

        return await self._served(key, fetch)

    def reject(self, token: str) -> bool:
        """The vault refused ``token``: the next request for it fetches a fresh one.

        Returns whether asking again can help: False when ``token`` was itself fetched this way
        less than ``renew_pause`` ago, so a vault that refuses fresh tokens too is reported
        instead of asked again and again. Concurrent rejections of one token renew it once.
        """
        digest = _digest(token)
        for key, issued in self._issued.items():
            if issued.digest != digest:
                continue
            if (
                issued.renewed_at is not None
                and self._clock() - issued.renewed_at < self.renew_pause
            ):
                return False
            flight = self._flights.get(key)
            if (flight is None or not flight.renewing) and key not in self._renew:
                logger.info("the vault refused a token from %s: fetching a fresh one", self._name())
                self._renew.add(key)
        # Not the latest token of any request shape: a newer one has been fetched since.
        return True

    async def _served(
        self, key: _Key, fetch: Callable[[bool], Awaitable[AccessTokenInfo]]
    ) -> AccessTokenInfo:
        """``_shared``, told to the request's TokenUse, whose deadline waits meanwhile."""
        use = _USE.get()
        if use is None:
            return await self._shared(key, fetch)
        scope = use.deadline
        deadline = scope.deadline if scope is not None else math.inf
        if scope is not None:
            scope.deadline = math.inf
        started = anyio.current_time()
        try:
            info = await self._shared(key, fetch)
        except Exception:
            use.failed = True
            raise
        finally:
            if scope is not None:
                scope.deadline = deadline + (anyio.current_time() - started)
        use.token = info.token
        return info

    async def _shared(
        self, key: _Key, fetch: Callable[[bool], Awaitable[AccessTokenInfo]]
    ) -> AccessTokenInfo:
        failed = self._failures.get(key)
        if failed is not None:
            until, error = failed
            if self._clock() < until:
                raise error
            del self._failures[key]
        flight = self._flights.get(key)
        if flight is None:
            renewing = key in self._renew
            self._renew.discard(key)
            flight = self._flights[key] = _Flight(renewing)
            try:
                flight.result = await self._bounded(fetch, renewing)
            except Exception as error:
                flight.error = error
                retry_after = getattr(error, "retry_after", None)
                ttl = max(
                    self.failure_ttl, retry_after if isinstance(retry_after, int | float) else 0
                )
                self._failures[key] = (self._clock() + ttl, error)
            else:
                self._remember(key, flight.result.token, renewing)
            finally:
                del self._flights[key]
                flight.done.set()
        else:
            await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        if flight.result is None:
            # The requesting task was cancelled: nothing to share, ask again.
            return await self._shared(key, fetch)
        return flight.result

    def _remember(self, key: _Key, token: str, renewing: bool) -> None:
        """Note the token handed out for ``key``; a renewed one stays marked so until replaced."""
        digest = _digest(token)
        previous = self._issued.get(key)
        renewed_at = self._clock() if renewing else None
        if not renewing and previous is not None and previous.digest == digest:
            renewed_at = previous.renewed_at
        self._issued[key] = _Issued(digest, renewed_at)

    async def _bounded(
        self, fetch: Callable[[bool], Awaitable[AccessTokenInfo]], renewing: bool
    ) -> AccessTokenInfo:
        """One fetch within ``timeout``; a failure says which endpoint failed and how."""
        watch = self.watch
        mark = watch.mark() if watch is not None else 0.0
        with anyio.move_on_after(self.timeout):
            try:
                return await fetch(renewing)
            except SourceError:
                raise  # kvcertsync's own credentials already say where and why
            except ClientAuthenticationError as error:
                if watch is None:
                    raise
                raise watch.failed(error, mark) from error
        timeout = self.timeout or 0.0
        if watch is not None:
            raise watch.timed_out(timeout, mark)
        raise CredentialTimeout(f"{self._name()} gave no token within {timeout:g} s")

    def _name(self) -> str:
        """Where tokens come from, for messages: the endpoint, else the credential's class."""
        if self.watch is not None and self.watch.url:
            return f"managed identity endpoint {self.watch.url}"
        return type(self.inner).__name__

    async def close(self) -> None:
        """Close the wrapped credential."""
        self._issued.clear()
        self._renew.clear()
        await self.inner.close()

    async def __aenter__(self) -> Self:
        """Enter the wrapped credential too."""
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the wrapped credential."""
        await self.close()


def share(
    credential: AsyncTokenCredential,
    *,
    timeout: float | None = TOKEN_TIMEOUT,
    watch: EndpointWatch | None = None,
) -> SharedCredential:
    """``credential`` wrapped in a SharedCredential (unless it already is one: kept as it is)."""
    if isinstance(credential, SharedCredential):
        return credential
    return SharedCredential(credential, timeout=timeout, watch=watch)
