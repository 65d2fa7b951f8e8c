"""Reaching the emulator from unchanged programs: a CONNECT proxy and the environment to use it.

``HTTPS_PROXY`` is honoured by requests (the sync Azure SDK), by aiohttp when ``trust_env`` is on
(the aio SDK's own sessions), by curl, Go and .NET. The proxy only opens a TCP tunnel: TLS stays
end to end between the client and the emulator, so the client still verifies the emulator's
certificate for the real host name and the SDK still checks the challenge against it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["VAULT_HOSTS", "VaultProxy", "child_environment", "write_ca_bundle"]

logger = logging.getLogger(__name__)

#: Host patterns the proxy sends to the emulator; every other host is tunnelled as asked.
VAULT_HOSTS = ("*.vault.azure.net", "vault.azure.net", "*.vault.localhost", "vault.localhost")
_HEAD_LIMIT = 16 * 1024
_HEAD_TIMEOUT = 10.0
_CHUNK = 64 * 1024

#: Credential settings that would win over managed identity in DefaultAzureCredential.
_OTHER_CREDENTIALS = (
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IDENTITY_SERVER_THUMBPRINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
)


def _split_authority(authority: str) -> tuple[str, int] | None:
    host, sep, port = authority.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return None
    return host.strip("[]").lower().rstrip("."), int(port)


class VaultProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 that tunnels Key Vault host names to the emulator.

    ``async with VaultProxy(kv.port) as proxy:`` then ``HTTPS_PROXY=proxy.url``. Vault hosts
    (:data:`VAULT_HOSTS`) go to ``127.0.0.1:<target_port>``; any other host is tunnelled to where
    it asked to go, so the program's other HTTPS traffic is unchanged. Only CONNECT is served.
    """

    def __init__(
        self, target_port: int, *, port: int = 0, hosts: Iterable[str] = VAULT_HOSTS
    ) -> None:
        self.target_port = target_port
        self._want_port = port
        self._hosts = tuple(pattern.lower() for pattern in hosts)
        self._server: asyncio.Server | None = None
        self._tunnels: set[asyncio.Task[None]] = set()
        #: How many CONNECTs went to the emulator.
        self.routed = 0

    async def __aenter__(self) -> VaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Listen on 127.0.0.1."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._want_port)

    @property
    def port(self) -> int:
        """The port the proxy listens on."""
        if self._server is None:
            raise RuntimeError("VaultProxy is not running")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """The value for ``HTTPS_PROXY``."""
        return f"http://127.0.0.1:{self.port}"

    def target(self, host: str, port: int) -> tuple[str, int]:
        """Where a CONNECT to ``host:port`` is sent."""
        if any(fnmatch.fnmatchcase(host, pattern) for pattern in self._hosts):
            return "127.0.0.1", self.target_port
        return host, port

    async def aclose(self) -> None:
        """Stop listening and cut every open tunnel."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tunnels):
            task.cancel()
        await asyncio.gather(*self._tunnels, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tunnels.add(task)
        task.add_done_callback(self._tunnels.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _HEAD_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            if len(head) > _HEAD_LIMIT:
                await self._refuse(writer, 431, "Request Header Fields Too Large")
                return
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            authority = _split_authority(rest.partition(" ")[0])
            if method.upper() != "CONNECT" or authority is None:
                await self._refuse(writer, 405, "Method Not Allowed (only CONNECT host:port)")
                return
            host, port = self.target(*authority)
            try:
                up_reader, upstream = await asyncio.open_connection(host, port)
            except OSError as exc:
                logger.info("proxy: cannot reach %s:%d for %s: %s", host, port, authority[0], exc)
                await self._refuse(writer, 502, "Bad Gateway")
                return
            if port == self.target_port and host == "127.0.0.1":
                self.routed += 1
            logger.debug("proxy: %s:%d -> %s:%d", *authority, host, port)
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (ConnectionError, OSError):
            pass
        finally:
            for stream in (writer, upstream):
                if stream is not None:
                    stream.close()

    @staticmethod
    async def _refuse(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(_CHUNK):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if writer.can_write_eof():
                with contextlib.suppress(OSError):
                    writer.write_eof()

    def __repr__(self) -> str:
        state = f"port={self._server and self.port}" if self._server else "stopped"
        return f"<VaultProxy {state} -> 127.0.0.1:{self.target_port}>"


def _system_ca_file() -> str | None:
    try:
        import certifi  # requests' CA list, present wherever the sync SDK is
    except ImportError:
        return ssl.get_default_verify_paths().cafile
    return certifi.where()


def write_ca_bundle(ca_pem: bytes, path: str | os.PathLike[str]) -> str:
    """Write the system's CAs plus the emulator's into ``path``; returns the path.

    Pointing ``SSL_CERT_FILE``/``REQUESTS_CA_BUNDLE`` at the emulator's CA alone would break
    every other HTTPS connection of the program; the bundle keeps those working.
    """
    system = _system_ca_file()
    parts = [Path(system).read_bytes()] if system and Path(system).is_file() else []
    parts.append(ca_pem)
    target = Path(path)
    target.write_bytes(b"\n".join(part.rstrip(b"\n") + b"\n" for part in parts))
    return str(target)


def child_environment(
    *,
    proxy_url: str,
    ca_bundle: str,
    ca_file: str,
    imds_authority: str,
    vault_url: str | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment that runs unchanged Azure SDK code against the emulator.

    Routes HTTPS through the proxy (vault hosts to the emulator, the rest as before), trusts the
    emulator's CA next to the system's, points managed identity at the emulator's IMDS and
    makes DefaultAzureCredential choose it; ``VAULT_URL`` (the SDK samples' variable) is set
    when ``vault_url`` is given. TLS verification and the SDK's challenge checks stay on.
    """
    env = dict(os.environ if base is None else base)
    for name in _OTHER_CREDENTIALS:
        env.pop(name, None)
    no_proxy = [h for h in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if h.strip()]
    if "127.0.0.1" not in no_proxy:
        # IMDS is plain HTTP on 127.0.0.1; keep it off any proxy the user already has.
        no_proxy.append("127.0.0.1")
    env.update(
        HTTPS_PROXY=proxy_url,
        https_proxy=proxy_url,
        NO_PROXY=",".join(no_proxy),
        no_proxy=",".join(no_proxy),
        SSL_CERT_FILE=ca_bundle,
        REQUESTS_CA_BUNDLE=ca_bundle,
        CURL_CA_BUNDLE=ca_bundle,
        NODE_EXTRA_CA_CERTS=ca_file,
        AZURE_POD_IDENTITY_AUTHORITY_HOST=imds_authority,
        AZURE_TOKEN_CREDENTIALS="ManagedIdentityCredential",  # noqa: S106 (a credential type)
        KVCERTSYNC_EMULATOR_CA=ca_file,
        KVCERTSYNC_EMULATOR_PROXY=proxy_url,
    )
    if vault_url is not None:
        env["VAULT_URL"] = vault_url
        env["AZURE_KEYVAULT_URL"] = vault_url
    return env
