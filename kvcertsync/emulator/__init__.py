"""A local Key Vault for demos and tests; for now, the test-certificate helpers."""

from kvcertsync.emulator.certs import TestAuthority, mint_certificate

__all__ = ["TestAuthority", "mint_certificate"]
