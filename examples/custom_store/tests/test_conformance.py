"""PfxDirectoryStore keeps the Store contract: kvcertsync's conformance kit, rule by rule."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from cryptography.hazmat.primitives.serialization import pkcs12
from kvcertsync_pfx import PfxDirectoryStore

from kvcertsync import ObservedCertificate, parse_settings
from kvcertsync.emulator import mint_certificate
from kvcertsync.testing import MakeStore, StoreConformance

VERSION = "0123456789abcdef0123456789abcdef"


class TestPfxDirectoryStore(StoreConformance):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> MakeStore:
        return lambda: PfxDirectoryStore(tmp_path / "pfx")


@pytest.mark.anyio
async def test_the_file_is_a_private_pkcs12_naming_its_version(tmp_path: Path) -> None:
    store = PfxDirectoryStore(tmp_path / "pfx")
    observed = ObservedCertificate.of("https://myvault.vault.azure.net/secrets/web")
    record = await store.install(observed, mint_certificate(["web.example"]), VERSION)
    path = Path(record.location)
    assert path == tmp_path / "pfx" / "myvault.web.pfx"
    assert (os.stat(path).st_mode & 0o777, os.stat(path.parent).st_mode & 0o777) == (0o600, 0o700)
    loaded = pkcs12.load_pkcs12(await anyio.Path(path).read_bytes(), None)
    assert loaded.cert is not None and loaded.key is not None
    assert loaded.cert.friendly_name == f"{observed.uri}/{VERSION}".encode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_the_entry_point_needs_a_directory() -> None:
    settings = parse_settings(
        {
            "secretsManagementSettings": {
                "observedCertificates": ["https://myvault.vault.azure.net/secrets/web"]
            }
        }
    )
    with pytest.raises(ValueError, match="pfx needs a directory, as in pfx:/etc/kvcertsync/pfx"):
        PfxDirectoryStore.from_spec(None, settings)
    assert (
        PfxDirectoryStore.from_spec("relative", settings).directory == Path("relative").absolute()
    )
