"""ServerTLS: an ``ssl.SSLContext`` for servers that always presents the current certificate.

Go has ``tls.Config.GetCertificate``; Python's ``ssl`` has ``sni_callback``, which OpenSSL calls
for every ClientHello (with ``server_name`` None when the client sends no SNI) before it picks a
certificate, and which may hand the connection another context (``ssl_object.context = ...``).
So the server gets one outer context that never changes; every certificate version gets a fresh
context of its own, built in a worker thread and handed over on the event loop by replacing one
reference, which the callback reads for each handshake. No context in use is ever mutated, so
handshakes in flight (in any thread) are never raced.
"""

from __future__ import annotations

import logging
import re
import ssl
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from types import TracebackType
from typing import TYPE_CHECKING, Self, cast

import anyio
import anyio.to_thread
import attrs

from kvcertsync._memfile import load_cert_chain
from kvcertsync.events import CertificateUpdated, Subscription
from kvcertsync.uri import SecretUri

if TYPE_CHECKING:
    import grpc

    from kvcertsync.feed import CertificateFeed
    from kvcertsync.material import CertificateMaterial
    from kvcertsync.stores.base import InstalledCertificate

__all__ = ["ContextHook", "ServedCertificate", "ServerTLS"]

logger = logging.getLogger(__name__)

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")

#: Configures a fresh ``ssl.SSLContext`` (ALPN, ciphers, minimum version, client certificates).
ContextHook = Callable[[ssl.SSLContext], None]


@attrs.frozen(repr=False)
class ServedCertificate:
    """One certificate version as ServerTLS serves it: what it is, its PEM and its SSLContext."""

    #: The observed secret URL it was installed from.
    uri: SecretUri
    #: SHA-1 of the leaf, upper-case hex (as ``CertificateUpdated.thumbprint``).
    thumbprint: str
    not_after: datetime
    dns_names: tuple[str, ...]
    #: The leaf followed by its chain, PEM.
    fullchain_pem: bytes
    #: The unencrypted PKCS#8 private key, PEM, for TLS stacks that take bytes (grpc).
    key_pem: bytes = attrs.field(eq=False)
    #: A server context holding this certificate, configured by the ContextHook.
    context: ssl.SSLContext = attrs.field(eq=False)

    def __repr__(self) -> str:
        expires = self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"<ServedCertificate {self.uri} thumbprint={self.thumbprint} not_after={expires}>"


def _uri(value: SecretUri | str, where: str) -> SecretUri:
    if isinstance(value, SecretUri):
        return value
    try:
        return SecretUri.parse(value, allow_any_host=True)
    except ValueError as error:
        raise ValueError(f"ServerTLS {where}: {error}") from None


def _host(name: str) -> str:
    return name.rstrip(".").lower()


def _route_name(name: str) -> str:
    host = _host(name)
    labels = host.split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]  # a wildcard stands for exactly one label, under a real domain
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError(
            f"ServerTLS sni: {name!r} is not a host name or a wildcard like '*.example.com'"
        )
    return host


class ServerTLS:
    """Gives servers an SSLContext that presents the current certificate of observed URLs.

    ``uri`` is served by default; ``sni`` maps host names (or ``*.example.com`` wildcards, one
    label) to other observed URLs, chosen by the name the client asks for. ``configure`` is
    applied to every context made (the outer one and each certificate version's), so ALPN,
    ciphers, minimum version and client-certificate verification agree between them; it runs in
    a worker thread. ``feed`` is any CertificateFeed: a CertSync, or a StoreWatcher following a
    store another process writes. Use it inside ``async with``: entering loads what is installed
    now and follows every later change.
    """

    def __init__(
        self,
        feed: CertificateFeed,
        uri: SecretUri | str,
        *,
        sni: Mapping[str, SecretUri | str] | None = None,
        configure: ContextHook | None = None,
    ) -> None:
        self._feed = feed
        self._default = _uri(uri, "uri")
        self._routes = {
            _route_name(name): _uri(value, f"sni[{name!r}]") for name, value in (sni or {}).items()
        }
        self._uris = tuple(dict.fromkeys([self._default, *self._routes.values()]))
        self._configure = configure
        # Replaced (never mutated) on the event loop; read by handshakes in any thread.
        self._served: dict[SecretUri, ServedCertificate] = {}
        self._warned: set[SecretUri] = set()
        self._subscription: Subscription | None = None
        self._locks: dict[SecretUri, anyio.Lock] = {}
        self._ready: anyio.Event | None = None
        self._context = self.new_context()
        if self._context.sni_callback is not None:
            raise ValueError("ServerTLS configure: leave sni_callback unset; ServerTLS uses it")
        self._context.sni_callback = self._select

    def __repr__(self) -> str:
        loaded = sum(uri in self._served for uri in self._uris)
        return f"<ServerTLS {self._default} ({loaded}/{len(self._uris)} certificates loaded)>"

    # ----------------------------------------------------------------- what servers use

    @property
    def context(self) -> ssl.SSLContext:
        """The server context to give a server; it always presents the current certificate."""
        return self._context

    @property
    def uris(self) -> tuple[SecretUri, ...]:
        """The URLs served: the default first, then those that ``sni`` names."""
        return self._uris

    @property
    def ready(self) -> bool:
        """Whether every URL has a certificate loaded."""
        return all(uri in self._served for uri in self._uris)

    def certificate(self, server_name: str | None = None) -> ServedCertificate | None:
        """What a client asking for ``server_name`` (None: no SNI) is served now (any thread)."""
        return self._served.get(self._route(server_name))

    @property
    def certificates(self) -> tuple[ServedCertificate, ...]:
        """Every certificate loaded now, the default first (any thread)."""
        served = self._served
        return tuple(served[uri] for uri in self._uris if uri in served)

    def new_context(self) -> ssl.SSLContext:
        """A fresh server context with the ContextHook applied and no certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if self._configure is not None:
            self._configure(context)
        return context

    async def wait_ready(self) -> None:
        """Return once every URL has a certificate loaded (inside ``async with``)."""
        if self._ready is None:
            raise RuntimeError("ServerTLS.wait_ready() needs `async with tls:` around it")
        await self._ready.wait()

    def grpc_server_credentials(
        self, *, root_certificates: bytes | None = None, require_client_auth: bool = False
    ) -> grpc.ServerCredentials:
        """grpc server credentials that present the current certificates (grpc has its own TLS).

        grpc asks for them at each new connection, in one of its own threads; a renewal is
        handed over then. With ``sni``, grpc picks among the certificates by the names they
        carry, the default first. ``root_certificates`` verify client certificates.
        """
        try:
            import grpc
        except ImportError:
            raise ImportError(
                "grpc_server_credentials needs grpcio: pip install 'kvcertsync[servers]'"
            ) from None

        if not self.ready:
            raise RuntimeError(
                "ServerTLS has no certificate for "
                + ", ".join(str(uri) for uri in self._uris if uri not in self._served)
                + " yet: await tls.wait_ready() first"
            )

        def configuration(
            certificates: tuple[ServedCertificate, ...],
        ) -> grpc.ServerCertificateConfiguration:
            pairs = [(c.key_pem, c.fullchain_pem) for c in certificates]
            return grpc.ssl_server_certificate_configuration(pairs, root_certificates)

        lock = threading.Lock()
        initial = self.certificates
        last = [tuple(c.thumbprint for c in initial)]

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # None keeps grpc's current configuration: it rebuilds its context only on a change.
            certificates = self.certificates
            thumbprints = tuple(c.thumbprint for c in certificates)
            with lock:
                if thumbprints == last[0]:
                    return None
                last[0] = thumbprints
            logger.info("grpc credentials now present %s", ", ".join(thumbprints))
            return configuration(certificates)

        # The stubs say the fetcher must return a configuration; grpc documents None as "same".
        fetcher = cast(Callable[[], grpc.ServerCertificateConfiguration], fetch)
        return grpc.dynamic_ssl_server_credentials(
            configuration(initial), fetcher, require_client_authentication=require_client_auth
        )

    # ----------------------------------------------------------------- following the feed

    async def __aenter__(self) -> Self:
        """Load what is installed now, and follow every change until the block ends."""
        if self._subscription is not None:
            raise RuntimeError("this ServerTLS is already entered")
        installed: dict[SecretUri, InstalledCertificate | None] = {}
        for uri in self._uris:
            try:
                installed[uri] = self._feed.current(uri)
            except KeyError:
                raise ValueError(f"ServerTLS: {uri} is not observed by {self._feed!r}") from None
        self._locks = {uri: anyio.Lock() for uri in self._uris}
        self._ready = anyio.Event()
        # Subscribe first so that no change slips between reading the present and following.
        self._subscription = self._feed.subscribe(self._on_update, CertificateUpdated, replay=True)
        try:
            for uri, record in installed.items():
                if record is not None:
                    await self._load(uri, record.thumbprint)
        except BaseException:
            self._unsubscribe()
            raise
        if self.ready:  # everything was loaded before (a second `async with`)
            self._ready.set()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop following changes; the certificates loaded stay served."""
        self._unsubscribe()

    def _unsubscribe(self) -> None:
        subscription, self._subscription = self._subscription, None
        if subscription is not None:
            subscription.unsubscribe()

    async def _on_update(self, event: CertificateUpdated) -> None:
        # Runs on the event loop, in the feed's delivery task for this subscription.
        if event.uri not in self._locks:
            return
        try:
            await self._load(event.uri, event.thumbprint)
        except Exception as error:
            served = self._served.get(event.uri)
            still = f"still serving {served.thumbprint}" if served else "nothing to serve"
            logger.error(
                "could not load %s %s for TLS: %s: %s; %s",
                event.uri,
                event.thumbprint,
                type(error).__name__,
                error,
                still,
                extra={"uri": str(event.uri)},
            )

    async def _load(self, uri: SecretUri, thumbprint: str) -> None:
        async with self._locks[uri]:
            served = self._served.get(uri)
            if served is not None and served.thumbprint == thumbprint:
                return
            material = await self._feed.material(uri)
            if material is None or (
                served is not None and served.thumbprint == material.thumbprint
            ):
                return
            fresh = await anyio.to_thread.run_sync(self._build, uri, material)
            # The hand-over: one reference replaced on the loop; handshakes read it.
            self._served = {**self._served, uri: fresh}
            self._warned.discard(uri)
        logger.info(
            "TLS for %s now presents %s (expires %s)",
            uri,
            fresh.thumbprint,
            fresh.not_after.strftime("%Y-%m-%d"),
            extra={"uri": str(uri)},
        )
        if self.ready and self._ready is not None:
            self._ready.set()

    def _build(self, uri: SecretUri, material: CertificateMaterial) -> ServedCertificate:
        context = self.new_context()
        load_cert_chain(context, material)
        return ServedCertificate(
            uri=uri,
            thumbprint=material.thumbprint,
            not_after=material.not_after,
            dns_names=material.dns_names,
            fullchain_pem=material.fullchain_pem(),
            key_pem=material.key_pem(),
            context=context,
        )

    # ----------------------------------------------------------------- the handshake

    def _route(self, server_name: str | None) -> SecretUri:
        if server_name is None:
            return self._default
        host = _host(server_name)
        uri = self._routes.get(host)
        if uri is None and "." in host:
            uri = self._routes.get("*." + host.split(".", 1)[1])
        return self._default if uri is None else uri

    def _select(
        self, ssl_object: ssl.SSLObject, server_name: str | None, _context: ssl.SSLContext
    ) -> int | None:
        # Called by OpenSSL for every ClientHello, in the thread doing the handshake. It must
        # not raise: ssl would print the error and fail the handshake without saying why.
        uri = self._route(server_name)
        served = self._served.get(uri)
        if served is None:
            if uri not in self._warned:
                self._warned.add(uri)
                logger.warning("TLS handshake refused: no certificate loaded yet for %s", uri)
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        ssl_object.context = served.context
        return None
