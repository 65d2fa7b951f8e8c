"""Third-party stores by entry point: lookup, errors, ``kvcertsync check``, and a real plugin.

Distributions are real ones on ``sys.path`` (a ``.dist-info`` with ``entry_points.txt``, as pip
writes it); the example plugin in examples/custom_store is installed for real with pip and run by
the real ``kvcertsync run`` and ``check`` against the emulator.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import pkcs12

from kvcertsync.agent.compose import store_from_spec
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import AgentSettings, parse_settings
from kvcertsync.stores import (
    MemoryStore,
    PemDirectoryStore,
    StorePlugin,
    StorePluginError,
    installed_store_plugins,
    store_from_name,
)
from kvcertsync.stores.plugins import store_plugin_of
from kvcertsync.testing import STORE_RULES
from tests.agent_process import (
    KVCERTSYNC,
    AgentProcess,
    agent_vault_fixture,  # noqa: F401  (the "kv" fixture)
    agents_fixture,  # noqa: F401  (the "agents" fixture)
    settings_document,
    start_agent,
)

pytestmark = pytest.mark.anyio

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom_store"
PFX_PLUGIN = StorePlugin(
    "pfx", "kvcertsync_pfx:PfxDirectoryStore.from_spec", "kvcertsync-pfx-store", "0.1.0"
)

TAGGED = """
from kvcertsync.stores import MemoryStore

class TaggedStore(MemoryStore):
    def __init__(self, tag):
        super().__init__()
        self.tag = tag

def make(args, settings):
    if args is None:
        raise ValueError("tagged needs a tag, as in tagged:blue")
    return TaggedStore(args)

NOT_CALLABLE = 3

def make_text(args, settings):
    return "a string"

def make_wrongly(args):
    return TaggedStore(args)
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings() -> AgentSettings:
    return parse_settings(
        {"secretsManagementSettings": {"observedCertificates": [WEB_URL]}}, allow_any_host=True
    )


WEB_URL = "https://demo.vault.azure.net/secrets/web"

AddDistribution = Callable[..., str]


def write_distribution(
    site: Path, name: str, version: str, stores: dict[str, str], module: str, source: str
) -> None:
    """A distribution as pip installs it: its module and a .dist-info naming its entry points."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{store} = {value}\n" for store, value in stores.items())
    (info / "entry_points.txt").write_text(f"[kvcertsync.stores]\n{lines}")
    (site / f"{module}.py").write_text(source)


@pytest.fixture
def add_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[AddDistribution]:
    """Install distributions on sys.path; returns each one's module name (unique per test)."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    modules: list[str] = []

    def add(name: str, version: str, stores: dict[str, str], source: str = TAGGED) -> str:
        module = f"plugin_{secrets.token_hex(4)}"
        values = {store: value.replace("MODULE", module) for store, value in stores.items()}
        write_distribution(site, name, version, values, module, source)
        modules.append(module)
        return module

    yield add
    for module in modules:
        sys.modules.pop(module, None)


# ----------------------------------------------------------------------------- lookup


def test_a_plugin_store_is_built_by_name_and_its_provider_is_known(
    add_distribution: AddDistribution, settings: AgentSettings
) -> None:
    module = add_distribution("acme-stores", "1.2", {"tagged": "MODULE:make"})
    assert module not in sys.modules
    listed = [p for p in installed_store_plugins() if p.name == "tagged"]
    assert listed == [StorePlugin("tagged", f"{module}:make", "acme-stores", "1.2")]
    assert module not in sys.modules  # listing imports nothing
    store = store_from_name("tagged", "blue", settings)
    assert type(store).__name__ == "TaggedStore" and store.tag == "blue"  # type: ignore[attr-defined]
    assert store_plugin_of(store) == listed[0]
    assert listed[0].describe() == f"tagged from acme-stores 1.2 ({module}:make)"
    via_cli = store_from_spec("tagged:with:colons", settings)
    assert via_cli.tag == "with:colons"  # type: ignore[attr-defined]
    assert store_plugin_of(MemoryStore()) is None


def test_built_in_names_win_over_plugins_with_a_warning(
    add_distribution: AddDistribution,
    settings: AgentSettings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    module = add_distribution("acme-memory", "2.0", {"memory": "MODULE:make"})
    with caplog.at_level(logging.WARNING, logger="kvcertsync.stores.plugins"):
        store = store_from_name("memory", None, settings)
        store_from_name("memory", None, settings)
    assert type(store) is MemoryStore and store_plugin_of(store) is None
    assert module not in sys.modules
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [
        f"store plugin memory from acme-memory 2.0 ({module}:make) is not used: 'memory' is a "
        "built-in store, and built-ins come first; its distribution must choose another name"
    ]


def test_an_unknown_name_lists_the_built_ins_and_the_plugins(
    add_distribution: AddDistribution, settings: AgentSettings
) -> None:
    add_distribution("acme-stores", "1.2", {"tagged": "MODULE:make"})
    with pytest.raises(ValueError) as caught:  # store_from_spec's errors are ValueErrors
        store_from_spec("nope:x", settings)
    message = str(caught.value)
    assert message.startswith(
        "--store 'nope:x': no store is called 'nope'; built in: pem:DIR, pem-split:DIR, "
        "windows, memory; installed plugins: "
    )
    assert "tagged (acme-stores 1.2)" in message
    assert message.endswith("(a plugin registers in the 'kvcertsync.stores' entry-point group)")


def test_a_plugin_that_fails_to_import_names_distribution_entry_point_and_error(
    add_distribution: AddDistribution, settings: AgentSettings
) -> None:
    module = add_distribution(
        "acme-broken", "0.3", {"broken": "MODULE:make"}, "import acme_missing_dependency\n"
    )
    with pytest.raises(StorePluginError) as caught:
        store_from_name("broken", None, settings)
    assert str(caught.value) == (
        f"store plugin broken from acme-broken 0.3 ({module}:make) failed to load: "
        "ModuleNotFoundError: No module named 'acme_missing_dependency'"
    )
    assert isinstance(caught.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("MODULE:make", "tagged (acme-stores 1.2): tagged needs a tag, as in tagged:blue"),
        ("MODULE:absent", "failed to load: AttributeError: module 'MODULE' has no attribute"),
        ("MODULE:NOT_CALLABLE", "names an object of type int, not a factory to call as factory("),
        ("MODULE:make_text", "returned an object of type str, which is not a Store (it needs"),
        (
            "MODULE:make_wrongly",
            "failed to build its store: TypeError: make_wrongly() takes 1 positional argument",
        ),
    ],
)
def test_a_plugin_that_cannot_build_its_store_says_why(
    add_distribution: AddDistribution, settings: AgentSettings, value: str, message: str
) -> None:
    module = add_distribution("acme-stores", "1.2", {"tagged": value})
    with pytest.raises(StorePluginError) as caught:
        store_from_name("tagged", None, settings)
    assert message.replace("MODULE", module) in str(caught.value)


def test_a_name_two_distributions_provide_is_refused(
    add_distribution: AddDistribution, settings: AgentSettings
) -> None:
    first = add_distribution("acme-one", "1.0", {"twice": "MODULE:make"})
    second = add_distribution("acme-two", "2.0", {"twice": "MODULE:make"})
    with pytest.raises(StorePluginError) as caught:
        store_from_name("twice", "x", settings)
    assert str(caught.value) == (
        f"store 'twice' is provided by twice from acme-one 1.0 ({first}:make) and twice from "
        f"acme-two 2.0 ({second}:make): uninstall all but one of them"
    )


def test_the_built_in_forms_are_as_before(settings: AgentSettings, tmp_path: Path) -> None:
    store = store_from_spec(f"pem-split:{tmp_path}", settings)
    assert isinstance(store, PemDirectoryStore)
    assert (store.layout, store.directory) == ("split", tmp_path)
    assert isinstance(store_from_spec("memory", settings), MemoryStore)
    with pytest.raises(ValueError, match=r"^--store 'pem': pem needs a directory, as in pem:/etc"):
        store_from_spec("pem", settings)
    with pytest.raises(ValueError, match=r"^--store 'memory:x': memory takes no argument"):
        store_from_spec("memory:x", settings)


# ----------------------------------------------------------------------------- a real plugin


@pytest.fixture(scope="module")
def pfx_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """examples/custom_store installed by pip into a directory of its own (offline)."""
    target = tmp_path_factory.mktemp("pfx-site")
    result = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"),
            *("--no-deps", "--no-index", "--no-build-isolation", "--target", str(target)),
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return target


def with_site(site: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


async def test_run_installs_into_the_plugin_store(
    kv: LocalKeyVault, agents: list[AgentProcess], tmp_path: Path, pfx_site: Path
) -> None:
    settings = tmp_path / "settings.json"
    document = settings_document(kv, ["web", "api"], tmp_path / "unused")
    settings.write_text(json.dumps(document))
    directory = tmp_path / "pfx"
    agent = start_agent(
        agents, kv, tmp_path, str(settings), "--store", f"pfx:{directory}", "--once",
        env=with_site(pfx_site),
    )  # fmt: skip
    code, stderr = await agent.wait_exit(60)
    assert code == 0, f"{stderr}\n{agent.log_text()}"
    for name in ("web", "api"):
        path = directory / f"demo.{name}.pfx"
        assert os.stat(path).st_mode & 0o777 == 0o600
        loaded = pkcs12.load_pkcs12(path.read_bytes(), None)
        assert loaded.cert is not None
        version = kv.versions("demo", name)[-1]
        assert (
            loaded.cert.friendly_name
            == f"https://demo.vault.azure.net/secrets/{name}/{version}".encode()
        )
        stored = kv.secret("demo", name)
        expected = CertificateMaterial.from_secret(stored.value, stored.content_type)
        assert loaded.cert.certificate == expected.certificate
    assert f"{directory}/demo.web.pfx" in agent.log_text()


def test_check_names_the_plugin_that_provides_the_store(tmp_path: Path, pfx_site: Path) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps({"secretsManagementSettings": {"observedCertificates": [WEB_URL]}})
    )
    directory = tmp_path / "pfx"
    env = {**os.environ, **with_site(pfx_site)}
    command = [*KVCERTSYNC, "check", str(settings), "--store", f"pfx:{directory}"]
    text = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert text.returncode == 0, text.stderr
    assert f"store plugin {PFX_PLUGIN.describe()}" in text.stdout.splitlines()
    report = subprocess.run(
        [*command, "--json"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    store = json.loads(report.stdout)["certificates"][0]["store"]
    assert store == {
        "kind": "PfxDirectoryStore",
        "plugin": {
            "name": "pfx",
            "value": PFX_PLUGIN.value,
            "distribution": "kvcertsync-pfx-store",
            "version": "0.1.0",
        },
    }
    assert not directory.exists()  # check builds the store and touches nothing


def test_run_with_an_unknown_store_lists_the_installed_plugins(
    tmp_path: Path, pfx_site: Path
) -> None:
    settings = tmp_path / "settings.json"
    settings.write_text(
        json.dumps({"secretsManagementSettings": {"observedCertificates": [WEB_URL]}})
    )
    result = subprocess.run(
        [*KVCERTSYNC, "run", str(settings), "--store", "pkcs12:/tmp/x", "--once"],
        capture_output=True,
        text=True,
        env={**os.environ, **with_site(pfx_site)},
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "--store 'pkcs12:/tmp/x': no store is called 'pkcs12'" in result.stderr
    assert "installed plugins: pfx (kvcertsync-pfx-store 0.1.0)" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_example_passes_its_own_conformance_tests(tmp_path: Path, pfx_site: Path) -> None:
    env = {**os.environ, **with_site(pfx_site)}
    where = subprocess.run(
        [sys.executable, "-c", "import kvcertsync_pfx; print(kvcertsync_pfx.__file__)"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert where.startswith(str(pfx_site))  # the installed copy, not the source tree
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for rule in STORE_RULES:  # each rule ran as a test of its own, and held
        assert f"test_store_rule[{rule.name}] PASSED" in result.stdout
