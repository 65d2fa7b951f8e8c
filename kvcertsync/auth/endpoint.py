"""Token failures told truly: which managed identity endpoint, what it answered, IMDS's guidance.

A poll that finds no token must not read as the vault's fault. ``EndpointWatch`` remembers what a
token endpoint answered lately (ImdsCredential feeds it directly; azure-identity's credentials
through azure-core's ``raw_request_hook``/``raw_response_hook``), and turns a failure or a timeout
into an ``ImdsAuthenticationError`` naming the endpoint and its status, or saying it did not answer.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from azure.core.exceptions import ClientAuthenticationError

from kvcertsync.errors import AuthenticationFailed

__all__ = [
    "CredentialTimeout",
    "EndpointWatch",
    "ImdsAuthenticationError",
    "imds_guidance",
    "imds_retryable",
]

# What the IMDS documentation says about each answer ("Error handling" and "Retry guidance" of
# "How to use managed identities for Azure resources on an Azure VM to acquire an access token").
_GUIDANCE: Final = {
    400: "IMDS: a request error, such as an identity not assigned to this machine; "
    "retrying does not help until that is fixed",
    404: "IMDS: the endpoint is being updated (or the identity was assigned moments ago); "
    "retry with backoff",
    410: "IMDS: the endpoint is being updated and answers again within 70 s",
    429: "IMDS: its request limit was reached; retry with backoff",
}
_SERVER_ERROR: Final = (
    "IMDS: a transient error of the managed identity service or Microsoft Entra ID; "
    "safe to retry after at least 1 s"
)
_CLIENT_ERROR: Final = "IMDS: one of the request's parameters is wrong; retrying does not help"
_NO_ANSWER: Final = (
    "is it reachable from here? IMDS (169.254.169.254) answers only on the machine itself and "
    "never through a proxy; Azure Arc's endpoint needs its agent running"
)
_RETRYABLE: Final = frozenset({404, 410, 429})
# Enough for any retry sequence a credential runs in one token request.
_REMEMBERED: Final = 64


def imds_guidance(status: int | None) -> str:
    """What IMDS's documentation says about answering ``status`` (None: no answer at all)."""
    if status is None:
        return _NO_ANSWER
    if 500 <= status <= 599:
        return _SERVER_ERROR
    if status == 401:
        return ""  # Azure Arc's key challenge: the message says what happened to it
    return _GUIDANCE.get(status, _CLIENT_ERROR if 400 <= status <= 499 else "")


def imds_retryable(status: int | None) -> bool:
    """Whether IMDS's guidance says a token request that got ``status`` may succeed if retried."""
    return status is None or status in _RETRYABLE or 500 <= status <= 599


class ImdsAuthenticationError(AuthenticationFailed, ClientAuthenticationError):
    """No token could be obtained from the managed identity endpoint.

    It is both kvcertsync's ``AuthenticationFailed`` and azure-core's ``ClientAuthenticationError``
    (what Azure SDK clients expect a credential to raise). It carries no HTTP response, so
    ``status_code`` is None; ``imds_status`` holds the endpoint's HTTP status, when there was one.
    """

    def __init__(
        self,
        message: str,
        *,
        endpoint: str,
        imds_status: int | None = None,
        retryable: bool = True,
        retry_after: float | None = None,
    ) -> None:
        ClientAuthenticationError.__init__(self, message=message)
        self.retry_after = retry_after
        self.retryable = retryable
        #: The token URL that failed (no query).
        self.endpoint = endpoint
        #: The endpoint's HTTP status, or None when it did not answer.
        self.imds_status = imds_status

    def __str__(self) -> str:
        return self.message

    def copy(self) -> ImdsAuthenticationError:
        """A new exception with the same details, to raise again elsewhere."""
        return ImdsAuthenticationError(
            self.message,
            endpoint=self.endpoint,
            imds_status=self.imds_status,
            retryable=self.retryable,
            retry_after=self.retry_after,
        )


class CredentialTimeout(AuthenticationFailed, ClientAuthenticationError):
    """A credential with no known endpoint (one of your own) gave no token in the time allowed."""

    def __init__(self, message: str) -> None:
        ClientAuthenticationError.__init__(self, message=message)
        self.retry_after = None

    def __str__(self) -> str:
        return self.message


def _without_query(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def _first_line(text: str | None) -> str:
    """The first line of a library's error message, printable and short (it reaches logs)."""
    lines = (text or "").strip().splitlines()
    return "".join(ch for ch in lines[0] if ch.isprintable())[:300] if lines else ""


class EndpointWatch:
    """What one token endpoint answered lately, to say so when a token request fails."""

    def __init__(self, url: str | None = None, *, clock: Callable[[], float] = time.monotonic):
        #: The token URL (no query): given, or learnt from the first request that goes out.
        self.url = url
        self._clock = clock
        # (when, status): status None is a request sent, a number the answer to one.
        self._events: collections.deque[tuple[float, int | None]] = collections.deque(
            maxlen=_REMEMBERED
        )

    def __repr__(self) -> str:
        return f"EndpointWatch({self.url!r})"

    def mark(self) -> float:
        """Now, on the watch's clock: pass it to ``failed``/``timed_out`` to judge what followed."""
        return self._clock()

    def sent(self, url: str | None = None) -> None:
        """A token request went out (to ``url``, when the watch has to learn it)."""
        if url is not None:
            self.url = _without_query(url)
        self._events.append((self._clock(), None))

    def answered(self, status: int) -> None:
        """The endpoint answered a token request with HTTP ``status``."""
        self._events.append((self._clock(), status))

    def hooks(self) -> dict[str, Callable[[Any], None]]:
        """azure-core pipeline options that feed this watch from every attempt, retries included."""
        return {"raw_request_hook": self._on_request, "raw_response_hook": self._on_response}

    def _on_request(self, request: Any) -> None:
        self.sent(str(request.http_request.url))

    def _on_response(self, response: Any) -> None:
        self.answered(int(response.http_response.status_code))

    def since(self, mark: float) -> tuple[int, int | None]:
        """(requests sent, the last status answered) since ``mark``."""
        events = [status for when, status in self._events if when >= mark]
        answers = [status for status in events if status is not None]
        return events.count(None), answers[-1] if answers else None

    def _where(self) -> str:
        return f"managed identity endpoint {self.url or '(no request went out)'}"

    def failed(self, error: ClientAuthenticationError, mark: float) -> ImdsAuthenticationError:
        """``error`` (from azure-identity) said truly: this endpoint, its status, IMDS's advice."""
        attempts, last = self.since(mark)
        response = getattr(error, "response", None)
        status = getattr(response, "status_code", None) if response is not None else None
        status = status if isinstance(status, int) else last
        what = "did not answer" if status is None else f"returned {status}"
        tries = f" ({attempts} attempts)" if attempts > 1 else ""
        detail = _first_line(error.message)
        advice = imds_guidance(status)
        message = f"{self._where()} {what}{tries}" + "".join(
            f": {part}" for part in (detail, advice) if part
        )
        return ImdsAuthenticationError(
            message,
            endpoint=self.url or "",
            imds_status=status,
            retryable=imds_retryable(status),
        )

    def timed_out(self, seconds: float, mark: float) -> ImdsAuthenticationError:
        """No token within ``seconds`` of ``mark``: what the endpoint did meanwhile, and advice."""
        attempts, last = self.since(mark)
        tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
        if last is None:
            what = f"did not answer within {seconds:g} s ({tries})"
        else:
            what = f"gave no token within {seconds:g} s ({tries}, the last answered {last})"
        return ImdsAuthenticationError(
            f"{self._where()} {what}: {imds_guidance(last)}",
            endpoint=self.url or "",
            imds_status=last,
            retryable=True,
        )
