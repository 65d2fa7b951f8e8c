"""How Key Vault failures become SourceErrors: one mapping for the SDK path and the direct one."""

from __future__ import annotations

import json
import ssl
from collections.abc import Mapping

import aiohttp
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from kvcertsync._http import retry_after
from kvcertsync.errors import (
    AccessDenied,
    AuthenticationFailed,
    SecretNotFound,
    SourceError,
    Throttled,
    TransientSourceError,
)
from kvcertsync.uri import SecretUri

__all__ = ["TokenRefused", "map_error", "refused", "service_error", "status_error"]


def service_error(text: str | None) -> tuple[str | None, str | None, str | None]:
    """The service's error code, inner error code and message, read from a response body."""
    if text is None:
        return None, None, None
    try:
        detail = json.loads(text)["error"]
        inner = detail.get("innererror") or {}
        message = detail.get("message")
        return detail.get("code"), inner.get("code"), message if isinstance(message, str) else None
    except (ValueError, TypeError, KeyError, AttributeError):
        return None, None, None


def _response_text(error: HttpResponseError) -> str | None:
    response = error.response
    if response is None:
        return None
    try:
        return response.text()
    except (ValueError, TypeError, AttributeError):
        return None


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


def status_error(
    uri: SecretUri, status: int, reason: str | None, text: str | None, headers: Mapping[str, str]
) -> SourceError:
    """The SourceError for the vault's HTTP error ``status`` with body ``text``."""
    code, inner, _ = service_error(text)
    detail = f"{status} {inner or code or reason or ''}".strip()
    if status == 403:
        return AccessDenied(f"{uri}: access denied ({detail})", code=inner or code or "Forbidden")
    if status == 404:
        return SecretNotFound(f"{uri}: secret not found (404)")
    if status == 429:
        return Throttled(f"{uri}: throttled ({detail})", retry_after=retry_after(headers))
    if status >= 500 or status == 408:
        return TransientSourceError(
            f"{uri}: service error ({detail})", retry_after=retry_after(headers)
        )
    return _permanent(SourceError(f"{uri}: unexpected response ({detail})"))


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
        headers: Mapping[str, str] = getattr(error.response, "headers", None) or {}
        return status_error(uri, error.status_code, error.reason, _response_text(error), headers)
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


class TokenRefused(Exception):
    """The vault answered 401 to a token the credential gave: it no longer takes that token."""

    def __init__(self, token: str, text: str | None) -> None:
        super().__init__("the vault refused the token")  # never the token itself
        self.token = token
        #: The 401's body, for the service's code and message.
        self.text = text

    def __repr__(self) -> str:
        return "TokenRefused()"


def refused(uri: SecretUri, error: TokenRefused, note: str) -> SourceError:
    """The vault's 401 to the token it was sent, said as such, with ``note`` on what was tried."""
    code, _, message = service_error(error.text)
    detail = "; ".join(part for part in (code, message) if part)
    return AuthenticationFailed(
        f"{uri}: the vault refused the token (401{': ' + detail if detail else ''}), {note}"
    )
