"""Unchanged programs against the emulator: ``kvcertsync emulator --exec`` and its proxy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvcertsync.emulator import VaultProxy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def emulator(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    # A user's own settings must not leak in: the command builds the child's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HTTPS_PROXY", "VAULT_"))}
    return subprocess.run(
        [sys.executable, "-m", "kvcertsync", "emulator", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def test_the_sync_example_runs_unchanged() -> None:
    result = emulator(
        "--vault", "demo", "--exec", sys.executable, str(EXAMPLES / "azure_sdk_unchanged.py")
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("created shop version ")
    assert lines[1] == "secret shop: application/x-pkcs12, managed=True"
    assert lines[2].startswith("backed up db-password: ")


def test_aio_code_with_default_credential_and_a_vault_url_of_its_own() -> None:
    """The aio SDK builds its own aiohttp session (trust_env on): HTTPS_PROXY reaches it."""
    code = """
        import asyncio, os
        from azure.identity.aio import DefaultAzureCredential
        from azure.keyvault.secrets.aio import SecretClient

        async def main():
            async with DefaultAzureCredential() as credential, SecretClient(
                "https://inventory.vault.azure.net", credential
            ) as client:
                await client.set_secret("count", "42")
                print((await client.get_secret("count")).value)
                print(os.environ["SSL_CERT_FILE"] != os.environ["KVCERTSYNC_EMULATOR_CA"])

        asyncio.run(main())
    """
    result = emulator("--exec", *python(code))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["42", "True"]


def test_the_programs_status_is_the_commands() -> None:
    assert emulator("--exec", *python("raise SystemExit(3)")).returncode == 3
    missing = emulator("--exec")
    assert missing.returncode == 2 and "--exec needs a command" in missing.stderr
    absent = emulator("--exec", "/nonexistent/program")
    assert absent.returncode == 127 and "cannot run" in absent.stderr


def test_state_dir_survives_a_restart(tmp_path: Path) -> None:
    state = str(tmp_path / "state")
    write = """
        import os
        from azure.identity import DefaultAzureCredential
        from azure.keyvault.secrets import SecretClient
        SecretClient(os.environ["VAULT_URL"], DefaultAzureCredential()).set_secret("kept", "yes")
        print(open(os.environ["KVCERTSYNC_EMULATOR_CA"]).read().count("BEGIN"))
    """
    read = """
        import os
        from azure.identity import DefaultAzureCredential
        from azure.keyvault.secrets import SecretClient
        client = SecretClient(os.environ["VAULT_URL"], DefaultAzureCredential())
        print(client.get_secret("kept").value)
        print(len(list(client.list_properties_of_secret_versions("demo-cert"))))
    """
    first = emulator("--vault", "demo", "--state-dir", state, "--exec", *python(write))
    assert first.returncode == 0, first.stderr
    ca = (tmp_path / "state" / "ca.pem").read_bytes()
    second = emulator("--vault", "demo", "--state-dir", state, "--exec", *python(read))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == ["yes", "1"]
    assert (tmp_path / "state" / "ca.pem").read_bytes() == ca


def test_the_renewal_example() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "emulator_renewal.py")],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[2] == "after 300 days the vault holds 2 versions"
    assert lines[3].startswith("installed ") and "(renewed, valid until" in lines[3]
    assert lines[1].split()[1] != lines[3].split()[1]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_proxy_tunnels_other_hosts_and_refuses_plain_requests(
    anyio_backend: str,
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    other = await asyncio.start_server(echo, "127.0.0.1", 0)
    other_port = other.sockets[0].getsockname()[1]
    async with other, VaultProxy(target_port=1) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(f"CONNECT 127.0.0.1:{other_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert await reader.readline() == b"HTTP/1.1 200 Connection Established\r\n"
        assert await reader.readline() == b"\r\n"
        writer.write(b"through the tunnel\n")
        assert await reader.readline() == b"through the tunnel\n"
        writer.close()

        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert (await reader.readline()).startswith(b"HTTP/1.1 405 ")
        writer.close()

        assert proxy.target("web.vault.azure.net", 443) == ("127.0.0.1", 1)
        assert proxy.target("login.microsoftonline.com", 443) == ("login.microsoftonline.com", 443)
        assert proxy.routed == 0
