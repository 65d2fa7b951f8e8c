"""The TLS recipes in examples/tls/ as users run them: real processes, real signals, real TLS.

Each recipe runs its own emulator; the test rotates the certificate through the emulator's admin
route (``kv.rotate`` from another process), watches new connections get the new certificate, and
stops the recipe with a signal: it must exit 0 with no traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import anyio
import anyio.abc
import grpc
import pytest

pytestmark = pytest.mark.anyio

RECIPES = Path(__file__).resolve().parent.parent / "examples" / "tls"
HOST_NAME = "web.shop.example"
STARTUP = 60  # seconds: imports and the initial sync on a busy machine
WITHIN = 30


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recipe:
    """One recipe process, with what it printed: where it serves and how to rotate."""

    def __init__(self, process: anyio.abc.Process, stdout: Path, stderr: Path) -> None:
        self.process = process
        self.stdout = stdout
        self.stderr = stderr
        self.port = 0
        self.ca_file = ""
        self.rotate_url = ""
        self.admin_token = ""

    async def started(self) -> None:
        """Wait for the line that says where it serves."""
        with anyio.fail_after(STARTUP):
            while not (found := re.search(r"^serving \w+://[\d.]+:(\d+) ", self.output, re.M)):
                assert self.process.returncode is None, self.errors
                await anyio.sleep(0.05)
        self.port = int(found[1])
        trust = re.search(r"^trust:\s+(\S+)$", self.output, re.M)
        rotate = re.search(
            r"^rotate: .* -H 'X-Emulator-Token: (\S+)' -X POST (\S+)$", self.output, re.M
        )
        assert trust and rotate, self.output
        self.ca_file, self.admin_token, self.rotate_url = trust[1], rotate[1], rotate[2]

    @property
    def output(self) -> str:
        return self.stdout.read_text()

    @property
    def errors(self) -> str:
        return self.stderr.read_text()

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file)
        if alpn:
            context.set_alpn_protocols(alpn)
        return context

    async def presented(self, alpn: list[str] | None = None) -> str:
        """The thumbprint of the leaf a new connection is given (verified as a client would)."""
        _, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=self.client_context(alpn), server_hostname=HOST_NAME
        )
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.close()
        return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()

    async def rotate(self) -> None:
        """Give the certificate a new version in the recipe's vault (its emulator's admin route)."""
        connector = aiohttp.TCPConnector(ssl=self.client_context())
        async with (
            aiohttp.ClientSession(connector=connector) as session,
            session.post(
                self.rotate_url, headers={"X-Emulator-Token": self.admin_token}
            ) as response,
        ):
            assert response.status == 200, await response.text()

    async def presented_other_than(self, old: str, alpn: list[str] | None = None) -> str:
        with anyio.fail_after(WITHIN):
            while (new := await self.presented(alpn)) == old:  # noqa: ASYNC110 - a real handshake
                await anyio.sleep(0.05)
        return new

    async def stop(self, signum: signal.Signals) -> int:
        self.process.send_signal(signum)
        with anyio.fail_after(WITHIN):
            return await self.process.wait()


@asynccontextmanager
async def running(name: str, tmp_path: Path) -> AsyncIterator[Recipe]:
    stdout, stderr = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        process = await anyio.open_process(
            [sys.executable, str(RECIPES / f"{name}.py")], stdout=out, stderr=err
        )
    recipe = Recipe(process, stdout, stderr)
    try:
        await recipe.started()
        yield recipe
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def https_get(recipe: Recipe) -> bytes:
    """A real HTTP/1.1 request over TLS; the response body."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", recipe.port, ssl=recipe.client_context(), server_hostname=HOST_NAME
    )
    writer.write(f"GET / HTTP/1.1\r\nHost: {HOST_NAME}\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


async def line(recipe: Recipe) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", recipe.port, ssl=recipe.client_context(), server_hostname=HOST_NAME
    )
    greeting = await reader.readline()
    writer.close()
    return greeting


def grpc_channel(recipe: Recipe) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(Path(recipe.ca_file).read_bytes())
    options = [("grpc.ssl_target_name_override", HOST_NAME)]
    return grpc.aio.secure_channel(f"127.0.0.1:{recipe.port}", credentials, options=options)


async def grpc_hello(channel: grpc.aio.Channel) -> bytes:
    hello: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        "/demo.Greeter/Hello"
    )
    return await hello(b"test", timeout=WITHIN)


def assert_clean_exit(recipe: Recipe, code: int) -> None:
    assert code == 0, recipe.errors
    assert "Traceback" not in recipe.errors, recipe.errors
    assert "CancelledError" not in recipe.errors, recipe.errors


@pytest.mark.parametrize(
    ("name", "stop"),
    [
        ("serve_aiohttp", signal.SIGTERM),
        ("serve_asyncio", signal.SIGINT),
        ("serve_uvicorn", signal.SIGTERM),
        ("serve_hypercorn", signal.SIGTERM),
    ],
)
async def test_recipe_presents_the_renewed_certificate_and_stops_cleanly(
    name: str, stop: signal.Signals, tmp_path: Path
) -> None:
    async with running(name, tmp_path) as recipe:
        ask = line if name == "serve_asyncio" else https_get
        first = await recipe.presented()
        assert f"(thumbprint {first})" in recipe.output
        assert await ask(recipe) == b"hello over TLS\n"
        await recipe.rotate()
        renewed = await recipe.presented_other_than(first)
        assert f"now presents {renewed}" in recipe.errors  # what the recipe loaded, logged
        assert await ask(recipe) == b"hello over TLS\n"
        assert_clean_exit(recipe, await recipe.stop(stop))


async def test_grpc_recipe_presents_the_renewed_certificate_to_new_connections(
    tmp_path: Path,
) -> None:
    async with running("serve_grpc", tmp_path) as recipe:
        first = await recipe.presented(alpn=["h2"])
        async with grpc_channel(recipe) as before:
            assert await grpc_hello(before) == b"hello over TLS, test"
            await recipe.rotate()
            renewed = await recipe.presented_other_than(first, alpn=["h2"])
            assert f"now presents {renewed}" in recipe.errors
            # The connection made before the renewal goes on; a new one gets the new certificate.
            assert await grpc_hello(before) == b"hello over TLS, test"
            async with grpc_channel(recipe) as after:
                assert await grpc_hello(after) == b"hello over TLS, test"
        assert_clean_exit(recipe, await recipe.stop(signal.SIGTERM))


@pytest.mark.parametrize("name", ["serve_uvicorn", "serve_hypercorn"])
async def test_servers_that_own_the_signals_stop_cleanly_on_sigint(
    name: str, tmp_path: Path
) -> None:
    async with running(name, tmp_path) as recipe:
        assert await https_get(recipe) == b"hello over TLS\n"
        assert_clean_exit(recipe, await recipe.stop(signal.SIGINT))
