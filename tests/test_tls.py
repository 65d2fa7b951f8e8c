"""ServerTLS and in-memory loading: real TLS handshakes on 127.0.0.1 against real contexts."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import socketserver
import ssl
import stat
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
from cryptography.hazmat.primitives import serialization

from kvcertsync import CertSync, StoreError
from kvcertsync._memfile import load_cert_chain, memfd_supported
from kvcertsync.auth import ImdsCredential
from kvcertsync.emulator import LocalKeyVault, TestAuthority
from kvcertsync.material import CertificateMaterial
from kvcertsync.sources import KeyVaultSource, MemorySource
from kvcertsync.stores import MemoryStore, PemDirectoryStore
from kvcertsync.tls import ServerTLS
from kvcertsync.uri import SecretUri
from kvcertsync.watch import StoreWatcher
from tests.helpers.stores import WriteOnlyStore

pytestmark = pytest.mark.anyio

WEB = "https://shop.vault.azure.net/secrets/web"
API = "https://shop.vault.azure.net/secrets/api"
EDGE = "https://shop.vault.azure.net/secrets/edge"
WITHIN = 30  # seconds: generous, the machine is shared


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def ca() -> TestAuthority:
    return TestAuthority()


def root_pem(ca: TestAuthority) -> str:
    return ca.root_certificate.public_bytes(serialization.Encoding.PEM).decode()


def client_context(ca: TestAuthority, *, check_hostname: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=root_pem(ca))
    context.check_hostname = check_hostname
    return context


def thumbprint(der: bytes) -> str:
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(line)
            await writer.drain()
    finally:
        writer.close()


@asynccontextmanager
async def tls_server(context: ssl.SSLContext) -> AsyncIterator[int]:
    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def handshake(
    port: int, client: ssl.SSLContext, server_name: str | None
) -> tuple[str, ssl.SSLObject]:
    """Connect, send a line and read it back; the served leaf's thumbprint and the TLS object."""
    # server_hostname="" sends no SNI at all (a client connecting by address).
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client, server_hostname=server_name or ""
    )
    try:
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        ssl_object: ssl.SSLObject = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
        assert der is not None
        return thumbprint(der), ssl_object
    finally:
        writer.close()


async def refused(port: int, client: ssl.SSLContext, server_name: str) -> bool:
    """Whether the server ends the connection instead of echoing (TLS 1.3 alerts come late)."""
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client, server_hostname=server_name
        )
    except (ssl.SSLError, ConnectionError):
        return True
    try:
        writer.write(b"ping\n")
        return await reader.readline() == b""
    except (ssl.SSLError, ConnectionError):
        return True
    finally:
        writer.close()


async def served(port: int, ca: TestAuthority, server_name: str | None = "web.shop.example") -> str:
    client = client_context(ca, check_hostname=server_name is not None)
    return (await handshake(port, client, server_name))[0]


async def until_served(
    port: int, ca: TestAuthority, want: str, server_name: str = "web.shop.example"
) -> None:
    """Wait until new connections are served the certificate with thumbprint ``want``."""
    with anyio.fail_after(WITHIN):
        while await served(port, ca, server_name) != want:  # noqa: ASYNC110 - a real handshake
            await anyio.sleep(0.02)


async def until_loaded(tls: ServerTLS, want: str) -> None:
    """Wait until ``tls`` has loaded the certificate with thumbprint ``want``."""
    with anyio.fail_after(WITHIN):
        while (c := tls.certificate()) is None or c.thumbprint != want:  # noqa: ASYNC110
            await anyio.sleep(0.005)


def memory_sync(
    source: MemorySource, store: MemoryStore | PemDirectoryStore, *urls: str
) -> CertSync:
    return CertSync(list(urls), store=store, source=source, polling_interval=3600)


# ---------------------------------------------------------------------------------------------
# Following Key Vault through the real SDK and the emulator


async def test_serves_the_current_certificate_and_follows_a_rotation(ca: TestAuthority) -> None:
    async with LocalKeyVault(authority=ca) as kv:
        kv.import_certificate("shop", "web", ca.issue(["web.shop.example"]))
        source = KeyVaultSource(
            ImdsCredential(kv.imds_endpoint),
            ca_file=kv.ca_file,
            redirect=kv.redirect,
            owns_credentials=True,
        )
        store = MemoryStore()
        sync = CertSync([WEB], store=store, source=source, polling_interval=3600)
        tls = ServerTLS(sync, WEB)
        async with tls, sync:
            await sync.wait_ready()  # tls subscribed before: its certificate is loaded by now
            assert tls.ready
            first = store.current(sync.observed[0].uri)
            assert first is not None
            async with tls_server(tls.context) as port:
                assert await served(port, ca) == first.thumbprint
                # A connection made before the renewal keeps working after it.
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=client_context(ca), server_hostname="web.shop.example"
                )
                kv.rotate("shop", "web")
                report = await sync.refresh(WEB)
                renewed = report.updated[0].installed
                assert renewed is not None and renewed.thumbprint != first.thumbprint
                await until_served(port, ca, renewed.thumbprint)
                certificate = tls.certificate()
                assert certificate is not None and certificate.thumbprint == renewed.thumbprint
                writer.write(b"still here\n")
                assert await reader.readline() == b"still here\n"
                writer.close()


# ---------------------------------------------------------------------------------------------
# A restart: the store already holds the certificate, no poll has happened


async def test_a_restarted_process_serves_its_installed_certificate_before_any_poll(
    tmp_path: Path, ca: TestAuthority
) -> None:
    material = ca.issue(["web.shop.example"])
    source = MemorySource()
    source.set(WEB, material)
    await memory_sync(source, PemDirectoryStore(tmp_path), WEB).sync_once()

    # The restarted process: its vault does not answer for a long time (every poll hangs).
    slow = MemorySource(latency=3600)
    sync = memory_sync(slow, PemDirectoryStore(tmp_path), WEB)
    early = ServerTLS(sync, WEB)  # entered before the engine starts: told through replay
    async with early, sync:
        with anyio.fail_after(WITHIN):
            await early.wait_ready()
        async with ServerTLS(sync, WEB) as late:  # entered after: reads what is installed
            assert late.ready
            for tls in (early, late):
                async with tls_server(tls.context) as port:
                    assert await served(port, ca) == material.thumbprint
    assert slow.calls <= 1  # nothing was learnt from the vault


# ---------------------------------------------------------------------------------------------
# SNI


async def test_sni_chooses_the_certificate_by_host_name(ca: TestAuthority) -> None:
    web, api, edge = (ca.issue([f"{n}.shop.example"]) for n in ("web", "api", "edge"))
    wildcard = ca.issue(["*.edge.shop.example"])
    source = MemorySource()
    for url, material in ((WEB, web), (API, api), (EDGE, wildcard)):
        source.set(url, material)
    sync = memory_sync(source, MemoryStore(), WEB, API, EDGE)
    tls = ServerTLS(sync, WEB, sni={"API.shop.example.": API, "*.edge.shop.example": EDGE})
    assert tls.uris == tuple(SecretUri.parse(url) for url in (WEB, API, EDGE))
    async with sync, tls:
        await tls.wait_ready()
        async with tls_server(tls.context) as port:
            assert await served(port, ca, "web.shop.example") == web.thumbprint
            assert await served(port, ca, "api.shop.example") == api.thumbprint
            assert await served(port, ca, "a.edge.shop.example") == wildcard.thumbprint
            # No SNI (a client connecting by address) and unknown names get the default.
            assert await served(port, ca, None) == web.thumbprint
            client = client_context(ca, check_hostname=False)
            assert (await handshake(port, client, "other.example"))[0] == web.thumbprint
            # The wildcard covers one label only.
            assert (await handshake(port, client, "a.b.edge.shop.example"))[0] == web.thumbprint
    assert edge.thumbprint != wildcard.thumbprint


@pytest.mark.parametrize(
    "name", ["", "*", "*.com", "a.*.example", "w*.example", "-a.example", "a..example", "a b"]
)
def test_sni_names_that_are_not_host_names_are_refused(name: str) -> None:
    sync = memory_sync(MemorySource(), MemoryStore(), WEB, API)
    with pytest.raises(ValueError, match=r"ServerTLS sni: .* is not a host name"):
        ServerTLS(sync, WEB, sni={name: API})


# ---------------------------------------------------------------------------------------------
# One configuration for every context: ALPN and client certificates


async def test_configure_applies_to_the_outer_and_every_version_context(ca: TestAuthority) -> None:
    def configure(context: ssl.SSLContext) -> None:
        context.set_alpn_protocols(["h2", "http/1.1"])
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=root_pem(ca))

    source = MemorySource()
    source.set(WEB, ca.issue(["web.shop.example"]))
    sync = memory_sync(source, MemoryStore(), WEB)
    client_material = ca.issue(["client.shop.example"])

    def mutual(*, with_certificate: bool) -> ssl.SSLContext:
        context = client_context(ca)
        context.set_alpn_protocols(["h2", "http/1.1"])
        if with_certificate:
            load_cert_chain(context, client_material)
        return context

    async with sync, ServerTLS(sync, WEB, configure=configure) as tls:
        await tls.wait_ready()
        async with tls_server(tls.context) as port:
            for renewal in range(2):
                _, ssl_object = await handshake(
                    port, mutual(with_certificate=True), "web.shop.example"
                )
                assert ssl_object.selected_alpn_protocol() == "h2"
                assert ssl_object.version() == "TLSv1.3"
                assert await refused(port, mutual(with_certificate=False), "web.shop.example")
                if renewal == 0:
                    fresh = ca.issue(["web.shop.example"])
                    source.set(WEB, fresh)
                    await sync.refresh(WEB)
                    await until_loaded(tls, fresh.thumbprint)


def test_configure_must_leave_the_sni_callback_to_server_tls() -> None:
    sync = memory_sync(MemorySource(), MemoryStore(), WEB)

    def configure(context: ssl.SSLContext) -> None:
        context.sni_callback = lambda *args: None

    with pytest.raises(ValueError, match="leave sni_callback unset"):
        ServerTLS(sync, WEB, configure=configure)


# ---------------------------------------------------------------------------------------------
# Before any certificate, and stores that cannot give material back


async def test_handshakes_fail_cleanly_until_a_certificate_arrives(
    ca: TestAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    source = MemorySource()  # the secret does not exist yet
    sync = CertSync(
        [WEB], store=MemoryStore(), source=source, polling_interval=3600, require_initial_sync=False
    )
    async with sync, ServerTLS(sync, WEB) as tls, tls_server(tls.context) as port:
        assert not tls.ready and tls.certificate() is None
        with caplog.at_level(logging.WARNING, logger="kvcertsync.tls"):
            for _ in range(2):
                # asyncio may drop the alert when it closes the failed connection.
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await served(port, ca)
        refused = [r for r in caplog.records if "no certificate loaded yet" in r.getMessage()]
        assert len(refused) == 1  # once, not once per handshake
        material = ca.issue(["web.shop.example"])
        source.set(WEB, material)
        await sync.refresh(WEB)
        with anyio.fail_after(WITHIN):
            await tls.wait_ready()
        assert await served(port, ca) == material.thumbprint


async def test_a_store_without_read_is_named_on_entering(ca: TestAuthority) -> None:
    source = MemorySource()
    source.set(WEB, ca.issue(["web.shop.example"]))
    sync = CertSync([WEB], store=WriteOnlyStore(), source=source, polling_interval=3600)
    async with sync:
        await sync.wait_ready()
        with pytest.raises(
            StoreError, match=r"WriteOnlyStore.* cannot give installed certificates back"
        ):
            async with ServerTLS(sync, WEB):
                pass


async def test_a_url_the_feed_does_not_observe_is_named_on_entering() -> None:
    sync = memory_sync(MemorySource(), MemoryStore(), WEB)
    with pytest.raises(ValueError, match=f"ServerTLS: {API} is not observed"):
        async with ServerTLS(sync, WEB, sni={"api.shop.example": API}):
            pass


async def test_no_secret_in_reprs(ca: TestAuthority) -> None:
    material = ca.issue(["web.shop.example"])
    source = MemorySource()
    source.set(WEB, material)
    sync = memory_sync(source, MemoryStore(), WEB)
    async with sync, ServerTLS(sync, WEB) as tls:
        await tls.wait_ready()
        certificate = tls.certificate()
        assert certificate is not None and certificate.key_pem == material.key_pem()
        key_body = material.key_pem().decode().splitlines()[1]
        for text in (repr(tls), repr(certificate), str(certificate)):
            assert "PRIVATE KEY" not in text and key_body not in text
        assert material.thumbprint in repr(certificate)
        assert "1/1 certificates loaded" in repr(tls)


async def test_entering_again_serves_and_is_ready_at_once(ca: TestAuthority) -> None:
    material = ca.issue(["web.shop.example"])
    source = MemorySource()
    source.set(WEB, material)
    sync = memory_sync(source, MemoryStore(), WEB)
    tls = ServerTLS(sync, WEB)
    async with sync:
        async with tls:
            await tls.wait_ready()
        async with tls, tls_server(tls.context) as port:
            with anyio.fail_after(WITHIN):
                await tls.wait_ready()
            assert await served(port, ca) == material.thumbprint
        with pytest.raises(RuntimeError, match="already entered"):
            async with tls, tls:
                pass


# ---------------------------------------------------------------------------------------------
# A store another process writes, through a StoreWatcher


async def test_follows_a_store_through_a_watcher(tmp_path: Path, ca: TestAuthority) -> None:
    source = MemorySource()
    first = ca.issue(["web.shop.example"])
    source.set(WEB, first)
    writer = memory_sync(source, PemDirectoryStore(tmp_path), WEB)
    await writer.sync_once()
    watcher = StoreWatcher(
        [WEB], store=PemDirectoryStore(tmp_path), use_watchfiles=False, poll_interval=0.05
    )
    async with watcher, ServerTLS(watcher, WEB) as tls, tls_server(tls.context) as port:
        assert await served(port, ca) == first.thumbprint
        second = ca.issue(["web.shop.example"])
        source.set(WEB, second)
        await writer.sync_once()
        await until_served(port, ca, second.thumbprint)


# ---------------------------------------------------------------------------------------------
# Handshakes in other threads while certificates change


class _ThreadedTLSServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


async def test_threaded_handshakes_during_rotations_never_fail(ca: TestAuthority) -> None:
    source = MemorySource()
    versions = [ca.issue(["web.shop.example"]) for _ in range(6)]
    source.set(WEB, versions[0])
    sync = memory_sync(source, MemoryStore(), WEB)
    thumbprints = {m.thumbprint for m in versions}
    failures: list[BaseException] = []

    async with sync, ServerTLS(sync, WEB) as tls:
        await tls.wait_ready()
        context = tls.context

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    with context.wrap_socket(self.request, server_side=True) as conn:
                        conn.sendall(conn.recv(16))
                except (ssl.SSLError, OSError) as error:
                    failures.append(error)

        server = _ThreadedTLSServer(("127.0.0.1", 0), Handler)
        port = server.server_address[1]
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        seen: list[str] = []
        stop = threading.Event()

        def clients() -> None:
            client = client_context(ca)
            while not stop.is_set():
                raw = socket.create_connection(("127.0.0.1", port))
                with client.wrap_socket(raw, server_hostname="web.shop.example") as conn:
                    conn.sendall(b"x")
                    conn.recv(16)
                    der = conn.getpeercert(binary_form=True)
                    assert der is not None
                    seen.append(thumbprint(der))

        try:
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(anyio.to_thread.run_sync, clients)
                for material in versions[1:]:
                    source.set(WEB, material)
                    await sync.refresh(WEB)
                    await until_loaded(tls, material.thumbprint)
                    await anyio.sleep(0.05)  # some handshakes on this version
                stop.set()
        finally:
            stop.set()
            server.shutdown()
            server.server_close()
    assert not failures
    assert len(seen) > 20 and set(seen) <= thumbprints and versions[-1].thumbprint in seen


# ---------------------------------------------------------------------------------------------
# Loading from memory


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class RecordingContext(ssl.SSLContext):
    """A real server context that notes what load_cert_chain was given, and what it found."""

    seen: list[dict[str, Any]]

    def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
        path = Path(certfile)
        text = path.read_bytes()
        info: dict[str, Any] = {"path": str(path), "encrypted": b"ENCRYPTED PRIVATE KEY" in text}
        info["plain_key"] = b"BEGIN PRIVATE KEY" in text
        if not str(path).startswith("/proc/self/fd/"):
            info["file_mode"] = stat.S_IMODE(path.stat().st_mode)
            info["dir_mode"] = stat.S_IMODE(path.parent.stat().st_mode)
        self.seen.append(info)
        super().load_cert_chain(certfile, keyfile, password)


def recording_context() -> RecordingContext:
    context = RecordingContext(ssl.PROTOCOL_TLS_SERVER)
    context.seen = []
    return context


async def _serves(
    context: ssl.SSLContext, material: CertificateMaterial, ca: TestAuthority
) -> None:
    async with tls_server(context) as port:
        assert await served(port, ca) == material.thumbprint


@pytest.mark.skipif(not memfd_supported(), reason="needs memfd_create and /proc (Linux)")
async def test_memfd_loading_leaves_no_file_and_no_descriptor(ca: TestAuthority) -> None:
    material = ca.issue(["web.shop.example"])
    before = _open_fds()
    context = recording_context()
    for _ in range(20):
        load_cert_chain(context, material)
    assert _open_fds() == before
    assert all(s["path"].startswith("/proc/self/fd/") for s in context.seen)
    assert all(s["encrypted"] and not s["plain_key"] for s in context.seen)
    await _serves(context, material, ca)


async def test_file_loading_uses_a_private_directory_removed_at_once(
    tmp_path: Path, ca: TestAuthority
) -> None:
    material = ca.issue(["web.shop.example"], key="rsa")
    before = _open_fds() if memfd_supported() else set()
    context = recording_context()
    load_cert_chain(context, material, use_memfd=False, temp_dir=tmp_path)
    (seen,) = context.seen
    assert Path(seen["path"]).parent.parent == tmp_path
    assert (seen["file_mode"], seen["dir_mode"]) == (0o600, 0o700)
    assert seen["encrypted"] and not seen["plain_key"]  # a crash leftover would be useless
    assert list(tmp_path.iterdir()) == []
    if memfd_supported():
        assert _open_fds() == before
    await _serves(context, material, ca)


def test_file_loading_removes_the_directory_when_loading_fails(
    tmp_path: Path, ca: TestAuthority
) -> None:
    material = ca.issue(["web.shop.example"])

    class Refusing(ssl.SSLContext):
        def load_cert_chain(self, certfile: Any, keyfile: Any = None, password: Any = None) -> None:
            assert Path(certfile).exists()
            raise ssl.SSLError("refused")

    with pytest.raises(ssl.SSLError, match="refused"):
        load_cert_chain(
            Refusing(ssl.PROTOCOL_TLS_SERVER), material, use_memfd=False, temp_dir=tmp_path
        )
    assert list(tmp_path.iterdir()) == []
