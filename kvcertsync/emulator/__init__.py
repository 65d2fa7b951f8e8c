"""A local Key Vault (secrets API, HTTPS) and IMDS for demos and tests; test certificates."""

from kvcertsync.emulator.certs import TestAuthority, mint_certificate
from kvcertsync.emulator.server import LocalKeyVault, RequestRecord
from kvcertsync.emulator.store import StoredSecret, VaultError

__all__ = [
    "LocalKeyVault",
    "RequestRecord",
    "StoredSecret",
    "TestAuthority",
    "VaultError",
    "mint_certificate",
]
