"""kvcertsync's pytest plugin: a local Key Vault, a CertSync against it, and ``rotate_and_wait``.

Loaded by pytest through the ``pytest11`` entry point wherever kvcertsync is installed; it defines
fixtures only, and imports nothing of kvcertsync's until a test uses one. The fixtures are async:
tests that use them run under anyio's pytest plugin (``@pytest.mark.anyio``) on asyncio.

    @pytest.mark.anyio
    async def test_my_service_follows_a_renewal(kvcertsync_sync, rotate_and_wait):
        service = MyService(kvcertsync_sync)
        renewed = await rotate_and_wait()
        assert service.thumbprint == renewed.thumbprint
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING, Protocol

import pytest

if TYPE_CHECKING:
    from kvcertsync.emulator import LocalKeyVault
    from kvcertsync.engine import CertSync
    from kvcertsync.material import CertificateMaterial
    from kvcertsync.stores.base import InstalledCertificate, Store
    from kvcertsync.uri import SecretUri

__all__ = [
    "DEFAULT_CERTIFICATES",
    "DNS_NAMES",
    "RotateAndWait",
    "kvcertsync_certificates",
    "kvcertsync_store",
    "kvcertsync_sync",
    "kvcertsync_vault",
    "rotate_and_wait",
]

#: What ``kvcertsync_certificates`` gives by default: one certificate.
DEFAULT_CERTIFICATES = ("https://myvault.vault.azure.net/secrets/web",)
#: The names the certificates the vault starts with (and their renewals) are issued for.
DNS_NAMES = ("localhost", "127.0.0.1")


class RotateAndWait(Protocol):
    """The ``rotate_and_wait`` fixture: ``await rotate_and_wait(uri=None, material=None)``."""

    def __call__(
        self,
        uri: SecretUri | str | None = None,
        material: CertificateMaterial | None = None,
        *,
        within: float = 60.0,
    ) -> Awaitable[InstalledCertificate]:
        """Rotate ``uri`` (the only one by default) and return once the new version is in."""
        ...


def _require_asyncio(fixture: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pytest.fail(
            f"{fixture} needs the asyncio event loop (the emulator is asyncio-only): mark the "
            'test @pytest.mark.anyio and give it an anyio_backend fixture returning "asyncio"',
            pytrace=False,
        )


@pytest.fixture
def kvcertsync_certificates() -> Sequence[str]:
    """Override: the secret URLs the vault holds a certificate for and the sync observes."""
    return DEFAULT_CERTIFICATES


@pytest.fixture
async def kvcertsync_vault(kvcertsync_certificates: Sequence[str]) -> AsyncIterator[LocalKeyVault]:
    """A started LocalKeyVault with a certificate for localhost at each of the URLs."""
    _require_asyncio("kvcertsync_vault")
    from kvcertsync.emulator import LocalKeyVault
    from kvcertsync.uri import SecretUri

    async with LocalKeyVault() as vault:
        for url in kvcertsync_certificates:
            uri = SecretUri.parse(url)
            vault.import_certificate(uri.vault_name, uri.name, vault.authority.issue(DNS_NAMES))
        yield vault


@pytest.fixture
def kvcertsync_store() -> Store:
    """Override: the store ``kvcertsync_sync`` installs into (a MemoryStore by default)."""
    from kvcertsync.stores.memory import MemoryStore

    return MemoryStore()


@pytest.fixture
async def kvcertsync_sync(
    kvcertsync_vault: LocalKeyVault,
    kvcertsync_store: Store,
    kvcertsync_certificates: Sequence[str],
) -> AsyncIterator[CertSync]:
    """A running CertSync over the vault's certificates, every one installed (``wait_ready``)."""
    _require_asyncio("kvcertsync_sync")
    from kvcertsync.auth import ImdsCredential
    from kvcertsync.engine import CertSync
    from kvcertsync.sources.keyvault import KeyVaultSource

    source = KeyVaultSource(
        ImdsCredential(kvcertsync_vault.imds_endpoint),
        ca_file=kvcertsync_vault.ca_file,
        redirect=kvcertsync_vault.redirect,
        owns_credentials=True,
    )
    # Renewals come through rotate_and_wait (which polls at once), not the timer.
    sync = CertSync(kvcertsync_certificates, store=kvcertsync_store, source=source)
    async with sync:
        await sync.wait_ready()
        yield sync


@pytest.fixture
def rotate_and_wait(kvcertsync_vault: LocalKeyVault, kvcertsync_sync: CertSync) -> RotateAndWait:
    """``await rotate_and_wait()``: a new version in the vault, installed and announced."""
    from kvcertsync.testing.vault import rotate_and_wait as rotate

    return functools.partial(rotate, kvcertsync_vault, kvcertsync_sync)
