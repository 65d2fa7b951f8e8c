"""MemoryStore: every version's record in history, the current version's material only."""

from __future__ import annotations

import gc
import weakref

import pytest

from kvcertsync.emulator import TestAuthority
from kvcertsync.engine import CertSync
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.sources import MemorySource
from kvcertsync.stores import InstalledCertificate, MemoryStore
from kvcertsync.uri import SecretUri

pytestmark = pytest.mark.anyio

URL = "https://memvault.vault.azure.net/secrets/web"
OBSERVED = ObservedCertificate(uri=SecretUri.parse(URL))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def authority() -> TestAuthority:
    return TestAuthority()


async def test_history_keeps_every_record_and_material_only_the_current(
    authority: TestAuthority,
) -> None:
    store = MemoryStore()
    first, second = authority.issue(["a.example"]), authority.issue(["b.example"])
    one = await store.install(OBSERVED, first, "v1")
    two = await store.install(OBSERVED, second, "v2")
    assert store.history(OBSERVED.uri) == [one, two]
    assert store.current(OBSERVED.uri) == two
    assert store.material(OBSERVED.uri) is second
    assert await store.read(OBSERVED) == (two, second)
    assert await store.installed(OBSERVED) == two
    assert two.thumbprint == second.thumbprint and two.not_after == second.not_after
    assert store.installs == 2


async def test_a_replaced_version_material_is_released(authority: TestAuthority) -> None:
    store = MemoryStore()
    old = authority.issue(["old.example"])
    await store.install(OBSERVED, old, "v1")
    released = weakref.ref(old)
    del old
    await store.install(OBSERVED, authority.issue(["new.example"]), "v2")
    gc.collect()
    assert released() is None  # only the history record of v1 is left
    assert [record.version for record in store.history(OBSERVED.uri)] == ["v1", "v2"]


async def test_reinstalling_the_current_version_changes_nothing(authority: TestAuthority) -> None:
    store = MemoryStore()
    material = authority.issue()
    first = await store.install(OBSERVED, material, "v1")
    again = await store.install(OBSERVED, material, "v1")
    assert again == first
    assert store.history(OBSERVED.uri) == [first]
    assert store.installs == 1


async def test_history_is_a_copy_and_keyed_by_the_unversioned_url(
    authority: TestAuthority,
) -> None:
    store = MemoryStore()
    record = await store.install(OBSERVED, authority.issue(), "v1")
    versioned = SecretUri.parse(f"{URL}/{'a' * 32}")
    history = store.history(versioned)
    assert history == [record]
    history.clear()
    assert store.history(OBSERVED.uri) == [record]
    other = SecretUri.parse("https://memvault.vault.azure.net/secrets/other")
    assert store.history(other) == [] and store.material(other) is None
    assert store.current(other) is None


async def test_preload_seeds_a_restart_that_installs_nothing(authority: TestAuthority) -> None:
    material = authority.issue()
    source = MemorySource()
    version = source.set(URL, material)
    store = MemoryStore()
    record = InstalledCertificate(
        uri=OBSERVED.uri,
        version=version,
        thumbprint=material.thumbprint,
        not_after=material.not_after,
        location=f"memory:{OBSERVED.uri}",
    )
    store.preload(record, material)
    report = await CertSync([URL], store=store, source=source).sync_once()
    assert report.unchanged and not report.updated
    assert store.installs == 0
    assert store.history(OBSERVED.uri) == [record]
    assert store.material(OBSERVED.uri) is material


async def test_rotations_through_certsync_keep_records_in_order(authority: TestAuthority) -> None:
    source, store = MemorySource(), MemoryStore()
    sync = CertSync([URL], store=store, source=source)
    versions = []
    for name in ("one", "two", "three"):
        versions.append(source.set(URL, authority.issue([f"{name}.example"])))
        await sync.sync_once()
    assert [record.version for record in store.history(OBSERVED.uri)] == versions
    current = store.material(OBSERVED.uri)
    assert current is not None and current.dns_names == ("three.example",)
    assert isinstance(current, CertificateMaterial)
