"""SharedCredential: one token request at a time per identity, and a failure shared for a while.

Many certificates of one vault and identity poll at once. azure-core's Key Vault challenge policy
asks the credential for a token per request, and azure-identity retries IMDS on its own, so a
cold start or an IMDS outage would multiply token requests by the number of polls in flight.
Wrapped in SharedCredential, concurrent callers share one request, and callers arriving just
after a failure get that failure instead of asking IMDS again.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Self

import anyio
from azure.core.credentials import AccessToken, AccessTokenInfo, TokenRequestOptions
from azure.core.credentials_async import AsyncTokenCredential

__all__ = ["SharedCredential", "share"]

_Key = tuple[Any, ...]


class _Flight:
    """One request in progress; everyone who asked for the same token waits for it."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: AccessTokenInfo | None = None
        self.error: BaseException | None = None


class SharedCredential:
    """Wraps any AsyncTokenCredential: single flight per request shape, failures remembered."""

    def __init__(
        self,
        inner: AsyncTokenCredential,
        *,
        failure_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inner = inner
        self.failure_ttl = failure_ttl
        self._clock = clock
        self._flights: dict[_Key, _Flight] = {}
        self._failures: dict[_Key, tuple[float, BaseException]] = {}

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

        async def fetch() -> AccessTokenInfo:
            token = await self.inner.get_token(
                *scopes, claims=claims, tenant_id=tenant_id, enable_cae=enable_cae, **kwargs
            )
            return AccessTokenInfo(token.token, token.expires_on)

        info = await self._shared(key, fetch)
        return AccessToken(info.token, info.expires_on)

    async def get_token_info(
        self, *scopes: str, options: TokenRequestOptions | None = None
    ) -> AccessTokenInfo:
        """The token-info form azure-core prefers, shared the same way."""
        key = ("info", scopes, tuple(sorted((options or {}).items())))
        inner_info = getattr(self.inner, "get_token_info", None)

        async def fetch() -> AccessTokenInfo:
            if inner_info is not None:
                result: AccessTokenInfo = await inner_info(*scopes, options=options)
                return result
            opts: dict[str, Any] = dict(options or {})
            token = await self.inner.get_token(*scopes, **opts)
            return AccessTokenInfo(token.token, token.expires_on)

        return await self._shared(key, fetch)

    async def _shared(
        self, key: _Key, fetch: Callable[[], Awaitable[AccessTokenInfo]]
    ) -> AccessTokenInfo:
        failed = self._failures.get(key)
        if failed is not None:
            until, error = failed
            if self._clock() < until:
                raise error
            del self._failures[key]
        flight = self._flights.get(key)
        if flight is None:
            flight = self._flights[key] = _Flight()
            try:
                flight.result = await fetch()
            except Exception as error:
                flight.error = error
                retry_after = getattr(error, "retry_after", None)
                ttl = max(
                    self.failure_ttl, retry_after if isinstance(retry_after, int | float) else 0
                )
                self._failures[key] = (self._clock() + ttl, error)
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

    async def close(self) -> None:
        """Close the wrapped credential."""
        await self.inner.close()

    async def __aenter__(self) -> Self:
        """Enter the wrapped credential too."""
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the wrapped credential."""
        await self.close()


def share(credential: AsyncTokenCredential) -> SharedCredential:
    """``credential`` wrapped in a SharedCredential (unless it already is one)."""
    return credential if isinstance(credential, SharedCredential) else SharedCredential(credential)
