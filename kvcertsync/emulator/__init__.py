"""A local Key Vault (secrets, certificates, keys; HTTPS) and IMDS for demos and tests."""

from kvcertsync.emulator.certs import TestAuthority, mint_certificate
from kvcertsync.emulator.clock import VaultClock
from kvcertsync.emulator.routing import VaultProxy, child_environment
from kvcertsync.emulator.server import LocalKeyVault, RequestRecord
from kvcertsync.emulator.store import StoredSecret, VaultError

__all__ = [
    "LocalKeyVault",
    "RequestRecord",
    "StoredSecret",
    "TestAuthority",
    "VaultClock",
    "VaultError",
    "VaultProxy",
    "child_environment",
    "mint_certificate",
]
