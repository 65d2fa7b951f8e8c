"""LocalKeyVault: Azure Key Vault's data plane over HTTPS plus an IMDS token endpoint, locally."""

from __future__ import annotations

import asyncio
import base64
import collections
import hmac
import ipaddress
import json
import logging
import math
import os
import secrets
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

import attrs
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from kvcertsync.emulator._backup import BackupSealer
from kvcertsync.emulator._certificate_api import CertificateApi
from kvcertsync.emulator._connections import ConnectionLimit
from kvcertsync.emulator._encoding import CONTENT_TYPES as _CERT_TYPES
from kvcertsync.emulator._encoding import convert as _convert
from kvcertsync.emulator._encoding import encode_certificate
from kvcertsync.emulator._json import json_object
from kvcertsync.emulator._persist import StateDir
from kvcertsync.emulator._wire import challenge_resource
from kvcertsync.emulator._wire import error_response as _error_response
from kvcertsync.emulator._wire import json_response as _json_response
from kvcertsync.emulator._wire import page as _page
from kvcertsync.emulator.admin import AdminApi
from kvcertsync.emulator.certificates import CertificateVault
from kvcertsync.emulator.certs import KeyKind, TestAuthority
from kvcertsync.emulator.clock import VaultClock
from kvcertsync.emulator.store import (
    StoredSecret,
    VaultError,
    VaultStore,
    _Version,
    bad_parameter,
    deleted_bundle,
    deleted_item,
    secret_bundle,
    secret_item,
)
from kvcertsync.emulator.store import tags_of as _tags
from kvcertsync.emulator.tls import ServerTLS
from kvcertsync.emulator.versions import check_api_version
from kvcertsync.emulator.webhooks import EventHandler, Schema, Webhook, Webhooks
from kvcertsync.material import PKCS12_CONTENT_TYPE, CertificateMaterial

__all__ = ["DEFAULT_TENANT_ID", "LOCAL_VAULT", "LocalKeyVault", "RequestRecord"]

logger = logging.getLogger(__name__)

DEFAULT_TENANT_ID = "7b5c2e9a-0d3f-4c61-9e8a-6f1d2b3c4a50"
LOCAL_VAULT = "localhost"
IMDS_TOKEN_PATH = "/metadata/identity/oauth2/token"  # noqa: S105 (a URL path)
THROTTLED_MESSAGE = (
    "Request was not processed because too many requests were received. "
    "Reason: VaultRequestTypeLimitReached"
)

_LOOPBACK = frozenset({"localhost", "127.0.0.1"})
_SHUTDOWN_TIMEOUT = 1.0
_TICK = 1.0
_MAX_BODY = 64 * 2**20
_SERVICE_ERRORS = {
    500: ("InternalServerError", "The server encountered an internal error. Please retry."),
    502: ("BadGateway", "The server received an invalid response from an upstream server."),
    503: ("ServiceUnavailable", "The service is temporarily unavailable. Please retry."),
    504: ("GatewayTimeout", "The server did not respond in time. Please retry."),
    403: ("Forbidden", "The user, group or application does not have secrets get permission."),
    401: ("Unauthorized", "AKV10000: Request is missing a Bearer or PoP token."),
    404: ("SecretNotFound", "A secret with (name/id) was not found in this key vault."),
    429: ("Throttled", THROTTLED_MESSAGE),
}
_IMDS_ERRORS = {
    400: ("invalid_request", "Bad request"),
    404: ("not_found", "The IMDS endpoint is updating; retry later"),
    410: ("gone", "The IMDS endpoint is restarting; retry later"),
    429: ("too_many_requests", "Too many requests to the IMDS endpoint"),
    500: ("unknown_error", "An unexpected error occurred in the IMDS endpoint"),
}

Timestamp = datetime | float | int


@attrs.frozen
class RequestRecord:
    """One secrets API request, without bodies or values; ``status`` None: connection dropped."""

    method: str
    vault: str
    path: str
    status: int | None
    fault: str | None = None
    time: float = attrs.field(factory=time.time, eq=False)
    #: The client's TCP port: which connection, so which client process, sent it.
    peer_port: int | None = attrs.field(default=None, eq=False)


@attrs.frozen
class _Grant:
    resource: str
    client_id: str
    expires_on: float


@attrs.frozen
class _Throttle:
    limit: int
    window: float
    retry_after: bool | float


@attrs.define
class _Countdown:
    remaining: int | None  # None: until reset_faults()
    status: int = 0
    code: str | None = None
    inner_code: str | None = None
    message: str | None = None

    def take(self) -> bool:
        if self.remaining is None:
            return True
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True


def _port(request: web.BaseRequest) -> int | None:
    transport = request.transport
    peer = transport.get_extra_info("peername") if transport is not None else None
    return int(peer[1]) if isinstance(peer, tuple) and len(peer) >= 2 else None


def _epoch(value: Timestamp | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return int(value.timestamp())
    return int(value)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _norm_resource(resource: str) -> str:
    resource = resource.strip().lower().rstrip("/")
    return resource.removesuffix("/.default").rstrip("/")


def _host_parts(request: web.BaseRequest) -> tuple[str, str, str]:
    """(host name, base URL for ids, base URL for nextLink) from the Host the client used."""
    host = (request.host or "").strip().lower()
    name, sep, port = host.rpartition(":")
    if not sep or "]" in port:
        name, port = host, ""
    if port == "443":
        host, port = name, ""
    # Key Vault's nextLinks name the port even when it is the default one.
    next_host = host if port else f"{host}:443"
    return name, f"https://{host}", f"https://{next_host}"


def _opt(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = body.get(key)
    # bool is an int: an "enabled" of 1 or a "nbf" of true are both malformed.
    if value is not None and (
        not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    ):
        raise bad_parameter(f"The property '{key}' must be {what}.")
    return value


class LocalKeyVault:
    """A local Azure Key Vault (secrets, certificates, keys over HTTPS) and IMDS, for tests.

    ``async with LocalKeyVault() as kv:`` serves every ``<name>.vault.azure.net`` host (vault chosen
    by the Host header; ``localhost``/``127.0.0.1`` is the vault named ``localhost``) on
    ``127.0.0.1:kv.port``, and managed-identity tokens on ``http://127.0.0.1:kv.imds_port``.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        imds_port: int = 0,
        require_auth: bool = True,
        token_lifetime: float = 3600,
        client_ids: Iterable[str] | None = None,
        tenant_id: str = DEFAULT_TENANT_ID,
        authority: TestAuthority | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        enforce_validity: bool = False,
        request_log_size: int = 10_000,
        issuance_delay: float = 0.0,
        clock: VaultClock | None = None,
        admin_token: str | None = None,
        max_grants: int = 100_000,
        max_connections: int = 1024,
    ) -> None:
        #: What the admin routes (``/_emulator/...``) require, in ``X-Emulator-Token`` or as a
        #: bearer token: they can read every secret, so no other local process may use them.
        self.admin_token = admin_token or secrets.token_urlsafe(24)
        self._want_port = port
        self._want_imds_port = imds_port
        self.require_auth = require_auth
        self.token_lifetime = token_lifetime
        self.client_ids = None if client_ids is None else {c.lower() for c in client_ids}
        self.tenant_id = tenant_id
        self.enforce_validity = enforce_validity
        self._authority = authority
        self._state_dir = state_dir
        self.system_client_id = str(uuid.uuid4())
        #: The emulator's time (advance it to reach expiry and renewal): a VaultClock.
        self.clock = clock or VaultClock()
        self._store = VaultStore(self.clock)
        self._state = StateDir(state_dir) if state_dir is not None else None
        #: The certificates, their keys and their secrets' links; issuers and contacts.
        self.certificates = CertificateVault(
            self._store, self.clock, lambda: self.authority, self._published, BackupSealer()
        )
        self.certificates.issuance_delay = issuance_delay
        self._certificate_api = CertificateApi(self.certificates, self._store)
        self._ticker: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        self._tokens: dict[str, _Grant] = {}
        self._revoked: set[str] = set()
        self._issued: collections.deque[str] = collections.deque(maxlen=request_log_size)
        self._request_counts: collections.Counter[str] = collections.Counter()
        self._response_counts: collections.Counter[tuple[str, int | None]] = collections.Counter()
        self._max_grants = max_grants
        self._connections = ConnectionLimit(max_connections)
        self._requests: collections.deque[RequestRecord] = collections.deque(
            maxlen=request_log_size
        )
        self._imds_requests = 0
        self._throttles: dict[str | None, _Throttle] = {}
        self._windows: dict[str, collections.deque[float]] = {}
        self._failures: dict[str | None, _Countdown] = {}
        self._drops: dict[str | None, _Countdown] = {}
        self._latency: dict[str | None, float] = {}
        self._imds_failure: _Countdown | None = None
        self._tls: ServerTLS | None = None
        self._runners: list[web.AppRunner] = []
        self._port: int | None = None
        self._imds_port: int | None = None
        self._closing = asyncio.Event()
        self._admin = AdminApi(self)
        self._webhooks = Webhooks()

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> LocalKeyVault:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Create the CA and server certificate, then listen on 127.0.0.1 (HTTPS and IMDS)."""
        if self._runners:
            raise RuntimeError("LocalKeyVault is already running")
        self._closing = asyncio.Event()
        try:
            # Key generation and file writes: off the event loop the caller's code runs on.
            saved = await asyncio.to_thread(self._state.read) if self._state else None
            if saved is not None:
                authority, grants = StateDir.apply(
                    saved, self._store, self.certificates, self.clock
                )
                self._authority = self._authority or authority
                with self._lock:
                    self._tokens.update({t: _Grant(**g) for t, g in grants.items()})
            if self._authority is None:
                self._authority = await asyncio.to_thread(TestAuthority, "kvcertsync emulator")
            self._tls = await asyncio.to_thread(ServerTLS, self._authority, self._state_dir)
            self._ticker = asyncio.create_task(self._tick_forever())
            self._port = await self._serve(
                self._dispatch, self._want_port, self._tls.server_context
            )
            self._imds_port = await self._serve(self._imds, self._want_imds_port, None)
        except BaseException:
            await self.aclose()
            raise
        logger.info(
            "Key Vault emulator on https://127.0.0.1:%d, IMDS on http://127.0.0.1:%d",
            self._port,
            self._imds_port,
        )

    async def _tick_forever(self) -> None:
        # Requests whose delay passed complete, due certificates renew, and the state file
        # follows changes, without anyone having to ask.
        saved: dict[str, Any] | None = None
        while True:
            await asyncio.sleep(_TICK)
            try:
                await asyncio.to_thread(self.certificates.tick)
                saved = await asyncio.to_thread(self._save_state, saved)
            except Exception:
                logger.exception("emulator background tick failed")

    def _save_state(self, last: dict[str, Any] | None = None) -> dict[str, Any] | None:
        if self._state is None or self._authority is None:
            return None
        with self._lock:
            grants = {token: attrs.asdict(grant) for token, grant in self._tokens.items()}
        state = StateDir.gather(self._authority, self._store, self.certificates, self.clock, grants)
        if state != last:
            self._state.write(state)
        return state

    async def _serve(
        self,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        port: int,
        ssl_context: ssl.SSLContext | None,
    ) -> int:
        # Bulk loads (``POST /_emulator/bulk``) carry thousands of secrets in one body.
        app = web.Application(client_max_size=_MAX_BODY)
        # One catch-all route: vault, auth and faults come before any path matching.
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=ssl_context)
        await site.start()
        bound: int = runner.addresses[0][1]
        return bound

    async def aclose(self) -> None:
        """Stop serving, close every connection (keep-alive ones too) and remove temporary files."""
        self._closing.set()
        runners, self._runners = self._runners, []
        try:
            if self._ticker is not None:
                self._ticker.cancel()
                await asyncio.gather(self._ticker, return_exceptions=True)
                self._ticker = None
                await asyncio.to_thread(self._save_state)
            await self._webhooks.aclose()
            for runner in reversed(runners):
                await runner.cleanup()
        finally:
            self._port = self._imds_port = None
            if self._tls is not None:
                self._tls.close()
                self._tls = None

    # ------------------------------------------------------------------ addresses

    @property
    def port(self) -> int:
        """The HTTPS port of the secrets API."""
        if self._port is None:
            raise RuntimeError("LocalKeyVault is not running")
        return self._port

    @property
    def imds_port(self) -> int:
        """The plain-HTTP port of the IMDS endpoint."""
        if self._imds_port is None:
            raise RuntimeError("LocalKeyVault is not running")
        return self._imds_port

    @property
    def imds_authority(self) -> str:
        """The value for ``AZURE_POD_IDENTITY_AUTHORITY_HOST`` (azure-identity and MSAL)."""
        return f"http://127.0.0.1:{self.imds_port}"

    @property
    def imds_endpoint(self) -> str:
        """The extension's ``msiEndpoint`` form: append ``/oauth2/token`` for the token URL."""
        return f"{self.imds_authority}/metadata/identity"

    @property
    def imds_token_url(self) -> str:
        """The full IMDS token URL."""
        return f"{self.imds_authority}{IMDS_TOKEN_PATH}"

    @property
    def local_url(self) -> str:
        """``https://localhost:<port>``: the vault named ``localhost``, no redirect needed."""
        return f"https://localhost:{self.port}"

    @staticmethod
    def vault_url(vault: str) -> str:
        """The real-looking URL of a vault; clients reach it through a redirecting resolver."""
        return f"https://{vault.lower()}.vault.azure.net"

    @property
    def redirect(self) -> dict[str, str]:
        """The host pattern and target a redirecting resolver needs."""
        return {"*.vault.azure.net": f"127.0.0.1:{self.port}"}

    @property
    def ca_file(self) -> str:
        """Path of the CA certificate (PEM) that issued the server certificate."""
        if self._tls is None:
            raise RuntimeError("LocalKeyVault is not running")
        return self._tls.ca_file

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate as PEM bytes."""
        if self._tls is None:
            raise RuntimeError("LocalKeyVault is not running")
        return self._tls.ca_pem

    def client_ssl_context(self) -> ssl.SSLContext:
        """A new ``ssl.SSLContext`` trusting the emulator's CA, with verification on."""
        if self._tls is None:
            raise RuntimeError("LocalKeyVault is not running")
        return self._tls.client_context()

    @property
    def authority(self) -> TestAuthority:
        """The TestAuthority behind the server certificate and rotate(): a known root."""
        if self._authority is None:
            self._authority = TestAuthority("kvcertsync emulator")
        return self._authority

    # ------------------------------------------------------------------ statistics

    @property
    def request_counts(self) -> dict[str, int]:
        """Secrets API requests per vault, 401 challenges and injected faults included."""
        with self._lock:
            return dict(self._request_counts)

    @property
    def response_counts(self) -> dict[str, dict[str, int]]:
        """Secrets API answers per vault and status (``"dropped"``: connection closed)."""
        with self._lock:
            counts = list(self._response_counts.items())
        result: dict[str, dict[str, int]] = {}
        for (vault, status), count in counts:
            result.setdefault(vault, {})[str(status) if status else "dropped"] = count
        return result

    @property
    def requests(self) -> list[RequestRecord]:
        """The most recent secrets API requests, oldest first (no bodies, no values)."""
        with self._lock:
            return list(self._requests)

    @property
    def open_connections(self) -> int:
        """Client connections to the HTTPS port open now: at most ``max_connections``."""
        return self._connections.open

    @property
    def live_grants(self) -> int:
        """Tokens the vault holds grants for (issued, not yet pruned): at most ``max_grants``."""
        with self._lock:
            return len(self._tokens)

    @property
    def imds_requests(self) -> int:
        """Requests the IMDS endpoint received, failed ones included."""
        with self._lock:
            return self._imds_requests

    # ------------------------------------------------------------------ secrets

    def set_secret(
        self,
        vault: str,
        name: str,
        value: str,
        content_type: str | None = None,
        *,
        enabled: bool = True,
        not_before: Timestamp | None = None,
        expires: Timestamp | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Add a version of a secret (creating vault and secret as needed); returns the version."""
        secret, record = self._store.set(
            vault.lower(),
            name,
            value,
            content_type,
            enabled=enabled,
            not_before=_epoch(not_before),
            expires=_epoch(expires),
            tags=tags,
        )
        self._published(vault.lower(), secret.name, record)
        return record.version

    def import_certificate(
        self,
        vault: str,
        name: str,
        certificate: CertificateMaterial | bytes | str,
        content_type: str = PKCS12_CONTENT_TYPE,
        *,
        enabled: bool = True,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """Store a certificate as a certificate-backed secret (``kid``, ``managed``, nbf/exp set).

        CertificateMaterial is encoded per ``content_type`` (base64 PFX or PEM); bytes are DER PFX
        (base64-encoded here) or PEM text; a str is stored as given. Returns the version. It
        becomes a certificate (issuer ``Unknown``) with its key, as an import through the
        certificates API does.
        """
        material, value = encode_certificate(certificate, content_type)
        record = self.certificates.add_material(
            vault.lower(),
            name,
            material,
            enabled=enabled,
            tags=tags,
            value=value,
            content_type=content_type,
        )
        return record.version

    def rotate(
        self,
        vault: str,
        name: str,
        material: CertificateMaterial | bytes | str | None = None,
        *,
        content_type: str | None = None,
        enabled: bool = True,
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """A new certificate version; without ``material``, a fresh leaf like the current one.

        The fresh leaf has the current one's DNS names, key type and validity length and is
        issued by ``authority``; content type and tags default to the current version's.
        """
        _, current = self._store.get(vault.lower(), name)
        kind = content_type or current.content_type or PKCS12_CONTENT_TYPE
        if material is None:
            old = CertificateMaterial.from_secret(current.value, current.content_type)
            names = old.dns_names or ((old.common_name,) if old.common_name else ())
            key: KeyKind = "rsa" if isinstance(old.private_key, rsa.RSAPrivateKey) else "ec"
            days = max((old.not_after - old.not_before).total_seconds() / 86400, 1.0)
            start = self.clock.utcnow() - timedelta(minutes=5)
            material = self.authority.issue(names, key=key, days=days, not_before=start)
        return self.import_certificate(
            vault,
            name,
            material,
            kind,
            enabled=enabled,
            tags=tags if tags is not None else current.tags,
        )

    def secret(self, vault: str, name: str, version: str | None = None) -> StoredSecret:
        """One version of a live secret (latest by default), disabled ones included."""
        secret, record = self._store.get(vault.lower(), name, version)
        return self._store.snapshot(vault.lower(), secret, record)

    def vaults(self) -> dict[str, dict[str, list[str]]]:
        """Every vault's live secrets and their versions (oldest first); no values."""
        return self._store.overview()

    def versions(self, vault: str, name: str) -> list[str]:
        """A live secret's versions, oldest first (the last one is the latest)."""
        _, records = self._store.list_versions(vault.lower(), name)
        return [record.version for record in records]

    def disable(self, vault: str, name: str, version: str | None = None) -> None:
        """Disable a version (the latest by default): GET then answers 403 SecretDisabled."""
        self._store.update(vault.lower(), name, version, enabled=False, managed_ok=True)

    def enable(self, vault: str, name: str, version: str | None = None) -> None:
        """Enable a version (the latest by default)."""
        self._store.update(vault.lower(), name, version, enabled=True, managed_ok=True)

    def delete(self, vault: str, name: str) -> None:
        """Soft-delete a secret, as DELETE /secrets/{name} does."""
        self._store.delete(vault.lower(), name)

    def purge(self, vault: str, name: str) -> None:
        """Remove a soft-deleted secret for good, so its name can be used again."""
        self._store.purge(vault.lower(), name)

    # ------------------------------------------------------------------ webhooks (Event Grid)

    async def add_webhook(
        self,
        url: str,
        *,
        schema: Schema = "eventgrid",
        event_types: Iterable[str] | None = None,
        max_attempts: int = 5,
        ca_file: str | None = None,
    ) -> Webhook:
        """Deliver Key Vault events to ``url`` as Event Grid does, once it passes validation.

        ``schema``: ``eventgrid`` or ``cloudevents``; ``event_types``: the default is
        Secret- and CertificateNewVersionCreated. An https URL is verified against the system's
        CAs, this emulator's CA and ``ca_file``. Raises WebhookError.
        """
        return await self._webhooks.register(
            url,
            schema=schema,
            event_types=event_types,
            max_attempts=max_attempts,
            ca_file=ca_file,
            ca_pem=self.ca_pem,
        )

    async def add_event_handler(
        self,
        handler: EventHandler,
        *,
        schema: Schema = "eventgrid",
        event_types: Iterable[str] | None = None,
        max_attempts: int = 5,
    ) -> Webhook:
        """Deliver Key Vault events to ``await handler(event)``: a queue, as Event Grid can."""
        return await self._webhooks.register_handler(
            handler, schema=schema, event_types=event_types, max_attempts=max_attempts
        )

    def remove_webhook(self, webhook_id: str) -> None:
        """Stop delivering to a webhook (KeyError if there is none of that id)."""
        self._webhooks.remove(webhook_id)

    @property
    def webhooks(self) -> list[Webhook]:
        """The registered webhooks, with their delivery counts and recent deliveries."""
        return self._webhooks.registered()

    async def wait_webhooks(self) -> None:
        """Return once every event so far is delivered to its webhooks or given up on."""
        await self._webhooks.wait_idle()

    def _published(self, vault: str, name: str, record: _Version) -> None:
        url = self.local_url if vault == LOCAL_VAULT and self._port else self.vault_url(vault)
        self._webhooks.publish(
            vault,
            url,
            name,
            record.version,
            certificate=record.managed,
            not_before=record.not_before,
            expires=record.expires,
        )

    # ------------------------------------------------------------------ faults

    def throttle(
        self,
        vault: str | None = None,
        *,
        limit: int,
        window: float = 10.0,
        retry_after: bool | float = True,
    ) -> None:
        """Answer 429 Throttled once a vault gets more than ``limit`` requests in ``window`` s.

        Counted per vault (``vault=None``: the rule applies to every vault). ``retry_after``:
        True sends Retry-After with the seconds until the window frees a slot, a number sends
        that many seconds, False sends none (the service does both).
        """
        if limit < 0 or window <= 0:
            raise ValueError("limit must be >= 0 and window > 0")
        key = vault.lower() if vault else None
        with self._lock:
            self._throttles[key] = _Throttle(limit, window, retry_after)
            self._windows.clear()

    def fail(
        self,
        vault: str | None = None,
        status: int = 503,
        times: int | None = 1,
        *,
        code: str | None = None,
        inner_code: str | None = None,
        message: str | None = None,
    ) -> None:
        """Answer the next ``times`` requests (None: all, until reset) with ``status``.

        The body is service-like (``ServiceUnavailable`` for 503...); ``code``, ``inner_code``
        and ``message`` override it, e.g. ``fail(status=403, inner_code="ForbiddenByRbac")``.
        """
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        key = vault.lower() if vault else None
        with self._lock:
            self._failures[key] = _Countdown(times, status, code, inner_code, message)

    def latency(self, seconds: float, vault: str | None = None) -> None:
        """Delay every secrets API answer by ``seconds`` (0 removes the delay)."""
        key = vault.lower() if vault else None
        with self._lock:
            if seconds > 0:
                self._latency[key] = seconds
            else:
                self._latency.pop(key, None)

    def drop_connections(self, times: int | None = 1, vault: str | None = None) -> None:
        """Close the connection of the next ``times`` requests without answering.

        aiohttp clients resend an idempotent request once when a reused connection drops, so
        use ``times=2`` to make a single GET through aiohttp fail.
        """
        key = vault.lower() if vault else None
        with self._lock:
            self._drops[key] = _Countdown(times)

    def revoke_tokens(self) -> int:
        """Make the vault refuse every token issued so far (clients still trust theirs)."""
        with self._lock:
            revoked = len(self._tokens)
            self._revoked.update(self._tokens)
            self._tokens.clear()
        return revoked

    @property
    def issued_tokens(self) -> list[str]:
        """The tokens IMDS issued (the last ``request_log_size``), to check that none leaks."""
        with self._lock:
            return list(self._issued)

    def fail_imds(self, status: int, times: int | None = 1) -> None:
        """Answer the next ``times`` IMDS requests with ``status`` (404, 410, 429, 500...)."""
        if not 400 <= status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        with self._lock:
            self._imds_failure = _Countdown(times, status)

    def reset_faults(self) -> None:
        """Remove every throttle, failure, latency and drop rule."""
        with self._lock:
            self._throttles.clear()
            self._windows.clear()
            self._failures.clear()
            self._drops.clear()
            self._latency.clear()
            self._imds_failure = None

    def faults(self) -> dict[str, Any]:
        """The active fault rules, as JSON-ready data."""

        def name(key: str | None) -> str:
            return key or "*"

        with self._lock:
            return {
                "throttle": {
                    name(k): {"limit": t.limit, "window": t.window, "retryAfter": t.retry_after}
                    for k, t in self._throttles.items()
                },
                "fail": {
                    name(k): {"status": c.status, "remaining": c.remaining}
                    for k, c in self._failures.items()
                },
                "drop": {name(k): {"remaining": c.remaining} for k, c in self._drops.items()},
                "latency": {name(k): v for k, v in self._latency.items()},
                "imds": (
                    {"status": self._imds_failure.status, "remaining": self._imds_failure.remaining}
                    if self._imds_failure
                    else None
                ),
            }

    # ------------------------------------------------------------------ HTTPS: dispatch

    async def _dispatch(self, request: web.BaseRequest) -> web.StreamResponse:
        with self._connections.request(request.transport):
            return await self._answer(request)

    async def _answer(self, request: web.BaseRequest) -> web.StreamResponse:
        hostname, base, next_base = _host_parts(request)
        if hostname in _LOOPBACK and request.path.startswith("/_emulator/"):
            refused = self._admin_refusal(request)
            return refused if refused is not None else await self._admin.handle(request)
        vault = LOCAL_VAULT if hostname in _LOOPBACK else hostname.split(".", 1)[0]
        with self._lock:
            self._request_counts[vault] += 1
            delay = self._latency.get(vault, self._latency.get(None, 0.0))
        fault: str | None = None
        if delay:
            fault = "latency"
            try:
                await asyncio.wait_for(self._closing.wait(), delay)
            except TimeoutError:
                pass
            else:
                return self._drop(request, vault, "shutdown")
        if self._take(self._drops, vault) is not None:
            return self._drop(request, vault, "dropped")
        response = self._injected_failure(vault)
        if response is not None:
            fault = "fail"
        else:
            response = self._throttled(vault)
            if response is not None:
                fault = "throttled"
        if response is None and self.require_auth:
            response = self._authenticate(request, hostname)
        if response is None:
            try:
                response = await self._route(request, vault, base, next_base)
            except VaultError as error:
                response = _error_response(error)
        self._log(
            RequestRecord(
                request.method,
                vault,
                request.path,
                response.status,
                fault,
                peer_port=_port(request),
            )
        )
        return response

    @property
    def admin_headers(self) -> dict[str, str]:
        """The header that admits a request to the admin routes."""
        return {"X-Emulator-Token": self.admin_token}

    def _admin_refusal(self, request: web.BaseRequest) -> web.Response | None:
        remote = request.remote or ""
        try:
            loopback = ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            return web.json_response({"error": "the admin routes answer loopback only"}, status=403)
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        given = request.headers.get("X-Emulator-Token") or (
            bearer.strip() if scheme.lower() == "bearer" else ""
        )
        if hmac.compare_digest(given.encode(), self.admin_token.encode()):
            return None
        message = (
            "the admin routes need the emulator's admin token in X-Emulator-Token (printed by "
            "`kvcertsync emulator`; LocalKeyVault.admin_token in Python)"
        )
        return web.json_response({"error": message}, status=401)

    def _log(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)
            self._response_counts[record.vault, record.status] += 1
        logger.debug(
            "%s %s %s -> %s%s",
            record.vault,
            record.method,
            record.path,
            record.status if record.status is not None else "dropped",
            f" ({record.fault})" if record.fault else "",
        )

    def _take(self, rules: dict[str | None, _Countdown], vault: str) -> _Countdown | None:
        with self._lock:
            for key in (vault, None):
                rule = rules.get(key)
                if rule is not None and rule.take():
                    return rule
        return None

    def _drop(self, request: web.BaseRequest, vault: str, why: str) -> web.Response:
        transport = request.transport
        if transport is not None:
            # abort(), not close(): no TLS close_notify, so the client sees the connection die
            # mid-request, as with a reset or a crashed front end.
            transport.abort()
        self._log(
            RequestRecord(request.method, vault, request.path, None, why, peer_port=_port(request))
        )
        # aiohttp cannot write this to the aborted transport; the client never sees it.
        return web.Response(status=503)

    def _injected_failure(self, vault: str) -> web.Response | None:
        rule = self._take(self._failures, vault)
        if rule is None:
            return None
        code, message = _SERVICE_ERRORS.get(rule.status, ("ServiceError", "Injected failure."))
        error = VaultError(rule.status, rule.code or code, rule.message or message, rule.inner_code)
        return _error_response(error)

    def _throttled(self, vault: str) -> web.Response | None:
        with self._lock:
            rule = self._throttles.get(vault) or self._throttles.get(None)
            if rule is None:
                return None
            now = time.monotonic()
            window = self._windows.setdefault(vault, collections.deque())
            while window and window[0] <= now - rule.window:
                window.popleft()
            if len(window) < rule.limit:
                window.append(now)
                return None
            headers: dict[str, str] = {}
            if rule.retry_after is True:
                wait = window[0] + rule.window - now if window else rule.window
                headers["Retry-After"] = str(max(1, math.ceil(wait)))
            elif rule.retry_after is not False:
                headers["Retry-After"] = str(max(0, math.ceil(rule.retry_after)))
        return _error_response(VaultError(429, "Throttled", THROTTLED_MESSAGE), headers)

    def _authenticate(self, request: web.BaseRequest, hostname: str) -> web.Response | None:
        resource = challenge_resource(request.host or hostname)
        scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return self._challenge(resource, "AKV10000: Request is missing a Bearer or PoP token.")
        with self._lock:
            grant = self._tokens.get(token)
            revoked = token in self._revoked
        if revoked:
            return self._challenge(resource, "The access token has been revoked.")
        if grant is None:
            return self._challenge(
                resource, "The bearer token was not issued by this emulator's IMDS endpoint."
            )
        if grant.expires_on <= self.clock.token_time():
            return self._challenge(resource, "The access token has expired.")
        if _norm_resource(grant.resource) != _norm_resource(resource):
            return self._challenge(
                resource, f"Invalid audience: the token is for {grant.resource}, not {resource}."
            )
        return None

    def _challenge(self, resource: str, message: str) -> web.Response:
        header = (
            f'Bearer authorization="https://login.microsoftonline.com/{self.tenant_id}", '
            f'resource="{resource}"'
        )
        return _error_response(
            VaultError(401, "Unauthorized", message), {"WWW-Authenticate": header}
        )

    # ------------------------------------------------------------------ HTTPS: REST API

    async def _route(
        self, request: web.BaseRequest, vault: str, base: str, next_base: str
    ) -> web.Response:
        check_api_version(request.query.get("api-version"))
        answer = await self._certificate_api.route(request, vault, base, next_base)
        if answer is not None:
            return answer
        parts = request.path.split("/")[1:]
        method = request.method
        collection = parts[0] if parts else ""
        if collection == "secrets":
            if len(parts) == 1 or (len(parts) == 2 and parts[1] == ""):
                if method == "GET":
                    items = [
                        secret_item(base, s, s.current(), versioned=False)
                        for s in self._store.list_secrets(vault)
                    ]
                    return _page(request, items, next_base)
            elif len(parts) == 2:
                name = parts[1]
                if method == "GET":
                    return self._get(request, vault, base, name, None)
                if method == "PUT":
                    return await self._put(request, vault, base, name)
                if method == "PATCH":
                    return await self._patch(request, vault, base, name, None)
                if method == "DELETE":
                    return _json_response(
                        200, deleted_bundle(base, self._store.delete(vault, name))
                    )
            elif len(parts) == 3:
                name, version = parts[1], parts[2]
                if version == "versions" and method == "GET":
                    secret, records = self._store.list_versions(vault, name)
                    items = [secret_item(base, secret, r, versioned=True) for r in records]
                    return _page(request, items, next_base)
                if method == "GET":
                    return self._get(request, vault, base, name, version)
                if method == "PATCH":
                    return await self._patch(request, vault, base, name, version)
        elif collection == "deletedsecrets":
            if len(parts) == 1 or (len(parts) == 2 and parts[1] == ""):
                if method == "GET":
                    items = [
                        deleted_item(base, s) for s in self._store.list_secrets(vault, deleted=True)
                    ]
                    return _page(request, items, next_base)
            elif len(parts) == 2:
                if method == "GET":
                    return _json_response(
                        200, deleted_bundle(base, self._store.get_deleted(vault, parts[1]))
                    )
                if method == "DELETE":
                    self._store.purge(vault, parts[1])
                    return web.Response(status=204)
            elif len(parts) == 3 and parts[2] == "recover" and method == "POST":
                secret = self._store.recover(vault, parts[1])
                return _json_response(
                    200, secret_bundle(base, secret, secret.current(), include_value=False)
                )
        known = (collection == "secrets" and len(parts) <= 3) or (
            collection == "deletedsecrets"
            and (len(parts) <= 2 or (len(parts) == 3 and parts[2] == "recover"))
        )
        if known:
            raise VaultError(
                405, "MethodNotAllowed", f"The method {method} is not allowed on {request.path}."
            )
        raise VaultError(404, "NotFound", f"The path {request.path} does not exist.")

    def _get(
        self, request: web.BaseRequest, vault: str, base: str, name: str, version: str | None
    ) -> web.Response:
        secret, record = self._store.get(vault, name, version)
        if not record.enabled:
            raise VaultError(
                403,
                "Forbidden",
                "Operation get is not allowed on a disabled secret.",
                "SecretDisabled",
            )
        if self.enforce_validity:
            now = self.clock.time()
            if record.not_before is not None and now < record.not_before:
                raise VaultError(
                    403,
                    "Forbidden",
                    "Operation get is not allowed on a secret that is not yet valid.",
                    "SecretNotYetValid",
                )
            if record.expires is not None and now >= record.expires:
                raise VaultError(
                    403,
                    "Forbidden",
                    "Operation get is not allowed on a expired secret.",
                    "SecretExpired",
                )
        body = secret_bundle(base, secret, record)
        out = request.query.get("outContentType")
        if out and record.managed and out.lower() != (record.content_type or "").lower():
            if out.lower() not in _CERT_TYPES:
                raise bad_parameter(f"The outContentType '{out}' is not supported.")
            body["value"] = _convert(record.value, record.content_type, out.lower())
            body["contentType"] = out.lower()
        return _json_response(200, body)

    async def _put(
        self, request: web.BaseRequest, vault: str, base: str, name: str
    ) -> web.Response:
        body = await self._body(request)
        value = body.get("value")
        if not isinstance(value, str):
            raise bad_parameter("The property 'value' is required and must be a string.")
        attributes = _opt(body, "attributes", dict, "an object") or {}
        enabled = _opt(attributes, "enabled", bool, "a boolean")
        secret, record = self._store.set(
            vault,
            name,
            value,
            _opt(body, "contentType", str, "a string"),
            enabled=True if enabled is None else enabled,
            not_before=_opt(attributes, "nbf", int, "a number of seconds"),
            expires=_opt(attributes, "exp", int, "a number of seconds"),
            tags=_tags(body),
        )
        self._published(vault, secret.name, record)
        return _json_response(200, secret_bundle(base, secret, record))

    async def _patch(
        self, request: web.BaseRequest, vault: str, base: str, name: str, version: str | None
    ) -> web.Response:
        body = await self._body(request)
        attributes = _opt(body, "attributes", dict, "an object") or {}
        changes: dict[str, Any] = {}
        content_type = _opt(body, "contentType", str, "a string")
        if content_type is not None:
            changes["content_type"] = content_type
        for key, field, kind, what in (
            ("enabled", "enabled", bool, "a boolean"),
            ("nbf", "not_before", int, "a number of seconds"),
            ("exp", "expires", int, "a number of seconds"),
        ):
            value = _opt(attributes, key, kind, what)
            if value is not None:
                changes[field] = value
        if "tags" in body:
            changes["tags"] = _tags(body)
        secret, record = self._store.update(vault, name, version or None, **changes)
        return _json_response(200, secret_bundle(base, secret, record, include_value=False))

    @staticmethod
    async def _body(request: web.BaseRequest) -> dict[str, Any]:
        return await json_object(request, lambda reason: bad_parameter(f"The request {reason}."))

    # ------------------------------------------------------------------ IMDS

    async def _imds(self, request: web.BaseRequest) -> web.StreamResponse:
        with self._lock:
            self._imds_requests += 1
            failure = self._imds_failure
            failed = failure is not None and failure.take()
        if failure is not None and failed:
            error, description = _IMDS_ERRORS.get(failure.status, ("error", "Injected failure"))
            return self._imds_error(failure.status, error, description)
        if request.path.rstrip("/") != IMDS_TOKEN_PATH:
            return self._imds_error(404, "not_found", "The requested path was not found")
        if request.method != "GET":
            return self._imds_error(405, "invalid_request", "Only GET is supported")
        if request.headers.get("Metadata", "").lower() != "true":
            return self._imds_error(
                400, "invalid_request", "Required metadata header not specified"
            )
        query = request.query
        for required in ("api-version", "resource"):
            if not query.get(required):
                return self._imds_error(
                    400, "invalid_request", f"Required query variable '{required}' is missing"
                )
        client_id = query.get("client_id")
        selector = query.get("msi_res_id") or query.get("mi_res_id") or query.get("object_id")
        if client_id:
            if self.client_ids is not None and client_id.lower() not in self.client_ids:
                return self._imds_error(400, "invalid_request", "Identity not found")
        elif selector:
            client_id = str(uuid.uuid5(uuid.NAMESPACE_URL, selector.lower()))
        else:
            client_id = self.system_client_id
        return _json_response(200, self._issue(query["resource"], client_id))

    @staticmethod
    def _imds_error(status: int, error: str, description: str) -> web.Response:
        return web.json_response({"error": error, "error_description": description}, status=status)

    def _issue(self, resource: str, client_id: str) -> dict[str, str]:
        now = int(time.time())
        lifetime = int(self.token_lifetime)
        expires_on = now + lifetime
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": expires_on,
            "appid": client_id,
            "oid": str(uuid.uuid5(uuid.NAMESPACE_OID, client_id)),
            "tid": self.tenant_id,
            "jti": uuid.uuid4().hex,
        }
        # Shaped like a JWT for code that peeks at claims; unsigned, so useless anywhere else.
        token = ".".join(
            (
                _b64url(b'{"typ":"JWT","alg":"none"}'),
                _b64url(json.dumps(claims, separators=(",", ":")).encode("utf-8")),
                "",
            )
        )
        # The client keeps the real clock; the grant ages with the clock's token time.
        token_now = self.clock.token_time()
        with self._lock:
            # Grants expire in the order they were issued (one lifetime, one clock), so pruning
            # from the oldest keeps issuing O(1); the cap bounds a flood of fresh tokens within
            # one lifetime (each grant is ~700 bytes) by evicting the oldest.
            while self._tokens:
                oldest = next(iter(self._tokens))
                if (
                    self._tokens[oldest].expires_on > token_now
                    and len(self._tokens) < self._max_grants
                ):
                    break
                del self._tokens[oldest]
            self._tokens[token] = _Grant(resource, client_id, token_now + lifetime)
            self._issued.append(token)
        logger.debug("IMDS issued a token for %s (client %s)", resource, client_id)
        return {
            "access_token": token,
            "client_id": client_id,
            "expires_in": str(lifetime),
            "expires_on": str(expires_on),
            "ext_expires_in": str(lifetime),
            "not_before": str(now),
            "resource": resource,
            "token_type": "Bearer",
        }

    def __repr__(self) -> str:
        state = f"port={self._port} imds_port={self._imds_port}" if self._runners else "stopped"
        return f"<LocalKeyVault {state}>"
