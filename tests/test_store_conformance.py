"""The Store conformance kit against the built-in stores, and stores that break its rules."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from kvcertsync.emulator.certs import mint_certificate
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import ObservedCertificate
from kvcertsync.stores import InstalledCertificate, MemoryStore, PemDirectoryStore, Store
from kvcertsync.stores._fakewin import FakeWindowsCertBackend
from kvcertsync.stores.windows import WindowsCertStore
from kvcertsync.testing import (
    STORE_RULES,
    MakeStore,
    RuleNotApplicable,
    StoreConformance,
    check_store,
    check_store_rule,
)
from tests.helpers.stores import WriteOnlyStore

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store_factory(self) -> MakeStore:
        store = MemoryStore()  # its storage is the object: a "restart" keeps the object
        return lambda: store


class TestPemDirectoryStore(StoreConformance):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> MakeStore:
        return lambda: PemDirectoryStore(tmp_path / "certs")


class TestPemDirectorySplitStore(StoreConformance):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> MakeStore:
        return lambda: PemDirectoryStore(tmp_path / "certs", layout="split", pfx=True)


class TestWindowsCertStore(StoreConformance):
    @pytest.fixture
    def store_factory(self) -> MakeStore:
        backend = FakeWindowsCertBackend()  # the machine's stores, across store objects
        return lambda: WindowsCertStore(backend=backend)


async def test_check_store_passes_a_conforming_store(tmp_path: Path) -> None:
    await check_store(lambda: PemDirectoryStore(tmp_path))


# ----------------------------------------------------------------------------- broken stores


class DictStore:
    """A small correct store over a dict; subclasses below each break one rule."""

    def __init__(self, data: dict[str, tuple[InstalledCertificate, CertificateMaterial]]) -> None:
        self.data = data

    def record(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        return InstalledCertificate(
            uri=observed.uri.latest,
            version=version,
            thumbprint=material.thumbprint,
            not_after=material.not_after,
            location=f"dict:{observed.uri.name}",
        )

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        record = self.record(observed, material, version)
        # Serialising the key first, as a store writing files does: a key that cannot be
        # exported fails the install before anything changes.
        material.key_pem()
        await anyio.lowlevel.checkpoint()
        self.data[str(observed.uri)] = (record, material)
        return record

    async def installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        await anyio.lowlevel.checkpoint()
        found = self.data.get(str(observed.uri))
        return found[0] if found else None

    async def read(
        self, observed: ObservedCertificate
    ) -> tuple[InstalledCertificate, CertificateMaterial] | None:
        await anyio.lowlevel.checkpoint()
        return self.data.get(str(observed.uri))


class ForgetfulStore(DictStore):
    """Keeps what it installed in the object, not in the storage: a restart finds nothing."""

    def __init__(self, data: dict[str, tuple[InstalledCertificate, CertificateMaterial]]) -> None:
        super().__init__({})


class WrongVersionStore(DictStore):
    def record(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        return super().record(observed, material, version.upper())


class RemovesFirstStore(DictStore):
    """Removes the old version before writing the new one, and fails in between."""

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        self.data.pop(str(observed.uri), None)
        return await super().install(observed, material, version)


class NonIdempotentStore(DictStore):
    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        found = self.data.get(str(observed.uri))
        if found is not None and found[0].version == version:
            raise FileExistsError(f"dict:{observed.uri.name}: version {version} exists")
        return await super().install(observed, material, version)


class BlockingStore(DictStore):
    """Writes a file and sleeps on the event loop's thread."""

    def __init__(
        self,
        data: dict[str, tuple[InstalledCertificate, CertificateMaterial]],
        directory: Path,
    ) -> None:
        super().__init__(data)
        self.directory = directory

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        record = await super().install(observed, material, version)
        (self.directory / f"{observed.uri.name}.pem").write_bytes(material.cert_pem())
        time.sleep(0.001)  # noqa: ASYNC251 - the blocking call this store is caught making
        return record


class LeakyStore(DictStore):
    def __repr__(self) -> str:
        keys = b"".join(material.key_pem() for _, material in self.data.values())
        return f"LeakyStore({keys.decode()})"


class MixingStore(DictStore):
    """Replaces a version in two steps with a window between them where nothing is there."""

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        self.data.pop(str(observed.uri), None)
        for _ in range(5):
            await anyio.lowlevel.checkpoint()
        return await super().install(observed, material, version)


class DecoyStore(DictStore):
    """Reads back some other certificate than the one installed."""

    decoy = mint_certificate(["decoy.example"])

    async def read(
        self, observed: ObservedCertificate
    ) -> tuple[InstalledCertificate, CertificateMaterial] | None:
        found = await super().read(observed)
        return None if found is None else (found[0], self.decoy)


def factory(kind: type[DictStore]) -> MakeStore:
    data: dict[str, tuple[InstalledCertificate, CertificateMaterial]] = {}
    return lambda: kind(data)


async def test_the_correct_dict_store_passes() -> None:
    await check_store(factory(DictStore))


@pytest.mark.parametrize(
    ("kind", "rule", "message"),
    [
        (ForgetfulStore, "survives-restart", "a store made again by make_store() (a restart)"),
        (WrongVersionStore, "install-describes", "has version '"),
        (
            RemovesFirstStore,
            "failed-install-keeps-previous",
            "installed() after an install of version",
        ),
        (NonIdempotentStore, "reinstall-is-idempotent", "raised FileExistsError"),
        (LeakyStore, "no-secrets-exposed", "repr(store) shows the private key"),
        (MixingStore, "readers-see-whole-versions", "installed() reported None"),
        (DecoyStore, "read-gives-back", "read() gives certificate"),
    ],
)
async def test_a_broken_store_fails_the_rule_it_breaks_with_a_clear_message(
    kind: type[DictStore], rule: str, message: str
) -> None:
    with pytest.raises(AssertionError) as caught:
        await check_store_rule(rule, factory(kind))
    text = str(caught.value)
    assert text.startswith(f"{rule}: ")
    assert message in text
    assert "the rule: " in text
    assert "BEGIN PRIVATE KEY" not in text  # the kit itself never shows the key


async def test_blocking_work_on_the_event_loop_is_named(tmp_path: Path) -> None:
    data: dict[str, tuple[InstalledCertificate, CertificateMaterial]] = {}
    with pytest.raises(AssertionError) as caught:
        await check_store_rule("loop-not-blocked", lambda: BlockingStore(data, tmp_path))
    text = str(caught.value)
    assert "blocking work on the event loop's thread" in text
    # The file it wrote is named (time.sleep too, on Python 3.13+ which audits it).
    assert f"open('{tmp_path}/loop-not-blocked-cert-" in text


async def test_check_store_lists_every_broken_rule_and_only_those() -> None:
    with pytest.raises(AssertionError) as caught:
        await check_store(factory(ForgetfulStore))
    lines = str(caught.value).splitlines()
    broken = [line.split(":")[0][2:] for line in lines if line.startswith("- ")]
    # Forgetting on restart also loses the version a failed install had to keep.
    assert broken == ["survives-restart", "failed-install-keeps-previous"]
    assert lines[0] == f"2 of {len(STORE_RULES)} store rules broken:"


async def test_a_store_without_read_skips_only_the_read_rule() -> None:
    memory = MemoryStore()  # one storage for every "restart"

    def make() -> Store:
        return WriteOnlyStore(memory)

    with pytest.raises(RuleNotApplicable, match="WriteOnlyStore is not a ReadableStore"):
        await check_store_rule("read-gives-back", make)
    await check_store(make)


async def test_a_factory_that_returns_no_store_is_named() -> None:
    with pytest.raises(AssertionError, match="make_store\\(\\) returned a dict, which is not a"):
        await check_store_rule("install-describes", lambda: {})  # type: ignore[arg-type,return-value]


async def test_an_unknown_rule_name_lists_the_rules() -> None:
    with pytest.raises(ValueError, match="no store rule is called 'atomic'; there are install-"):
        await check_store_rule("atomic", factory(DictStore))
