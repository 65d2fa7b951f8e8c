"""TLS for the emulator: a server certificate for Key Vault host names, issued by a test CA."""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from kvcertsync.emulator.certs import TestAuthority

__all__ = ["SERVER_NAMES", "ServerTLS"]

# Host names the server certificate covers: the public cloud's vault domain, a loopback vault
# domain (``<vault>.vault.localhost``: OpenSSL will not match a wildcard right under a single
# label such as ``*.localhost``) and the loopback names themselves.
SERVER_NAMES = (
    "*.vault.azure.net",
    "vault.azure.net",
    "*.vault.localhost",
    "vault.localhost",
    "localhost",
    "127.0.0.1",
)


class ServerTLS:
    """The server's certificate and key on disk (for ``ssl``), and the CA file clients trust."""

    def __init__(self, authority: TestAuthority, state_dir: str | os.PathLike[str] | None) -> None:
        self.authority = authority
        # The key has to be a file for SSLContext.load_cert_chain; it lives only in a private
        # (0700) directory that is removed on close, never in the user's state_dir.
        self._private_dir = Path(tempfile.mkdtemp(prefix="kvcertsync-emulator-"))
        try:
            material = authority.issue(SERVER_NAMES, days=30)
            chain_file = self._private_dir / "server.pem"
            key_file = self._private_dir / "server-key.pem"
            chain_file.write_bytes(material.fullchain_pem())
            key_file.touch(mode=0o600)
            key_file.write_bytes(material.key_pem())
            self.ca_pem = authority.root_certificate.public_bytes(serialization.Encoding.PEM)
            ca_dir = Path(state_dir) if state_dir is not None else self._private_dir
            ca_dir.mkdir(parents=True, exist_ok=True)
            self.ca_file = str(ca_dir / "ca.pem")
            Path(self.ca_file).write_bytes(self.ca_pem)
            self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.server_context.load_cert_chain(chain_file, key_file)
        except BaseException:
            self.close()
            raise

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts only the emulator's CA, with verification on."""
        return ssl.create_default_context(cadata=self.ca_pem.decode("ascii"))

    def close(self) -> None:
        """Remove the private directory (key, chain and, without a state_dir, the CA file)."""
        shutil.rmtree(self._private_dir, ignore_errors=True)
