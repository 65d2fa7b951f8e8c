"""kvcertsync's pytest plugin, as a service's own test suite uses it: real inner pytest runs."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

import kvcertsync.auth
import kvcertsync.emulator
import kvcertsync.engine
import kvcertsync.pytest_plugin
import kvcertsync.sources.keyvault
import kvcertsync.stores

# Imported above, not first by an inner run: pytester unloads what an inner run imported, and
# cryptography's bindings do not survive being imported twice.
_PRELOADED = (kvcertsync.auth, kvcertsync.emulator, kvcertsync.engine, kvcertsync.sources.keyvault)

pytest_plugins = ["pytester"]

# Plugins named explicitly, the rest not loaded: the same inner run with or without the
# pytest11 entry point installed (an editable install made before it existed lacks it).
PLUGINS = [
    *("-p", "anyio.pytest_plugin", "-p", "kvcertsync.pytest_plugin", "-p", "no:cacheprovider"),
    *("-W", "ignore::pytest.PytestAssertRewriteWarning"),  # the plugin is imported already
]

THREE_LINES = """
import pytest

@pytest.mark.anyio
async def test_the_sync_follows_a_renewal(kvcertsync_sync, rotate_and_wait):
    renewed = await rotate_and_wait()
    assert kvcertsync_sync.current(renewed.uri) == renewed
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makeconftest(
        """
import pytest

@pytest.fixture
def anyio_backend():
    return "asyncio"
"""
    )
    return pytester


def test_a_three_line_service_test_passes(inner: pytest.Pytester) -> None:
    inner.makepyfile(THREE_LINES)
    result = inner.runpytest(*PLUGINS)
    result.assert_outcomes(passed=1)


def test_callbacks_have_handled_the_renewal_when_rotate_and_wait_returns(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(
        """
import anyio
import pytest
from kvcertsync.events import CertificateUpdated

@pytest.mark.anyio
async def test_service_reloads(kvcertsync_sync, rotate_and_wait):
    seen_async, seen_thread = [], []

    async def reload(event: CertificateUpdated) -> None:
        await anyio.sleep(0.2)  # a reload that takes a while: rotate_and_wait waits for it
        seen_async.append(event.version)

    kvcertsync_sync.subscribe(reload, CertificateUpdated)
    kvcertsync_sync.subscribe(lambda event: seen_thread.append(event.version), CertificateUpdated)
    renewed = await rotate_and_wait()
    assert seen_async == [renewed.version] and seen_thread == [renewed.version]
    material = await kvcertsync_sync.material(renewed.uri)
    assert material.thumbprint == renewed.thumbprint
    assert material.dns_names == ("localhost",)  # and 127.0.0.1, an IP address SAN
"""
    )
    result = inner.runpytest(*PLUGINS)
    result.assert_outcomes(passed=1)


def test_a_failing_service_test_fails_with_its_own_assertion(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
import pytest

@pytest.mark.anyio
async def test_wrong(kvcertsync_sync, rotate_and_wait):
    renewed = await rotate_and_wait()
    assert renewed.version == "0" * 32
"""
    )
    result = inner.runpytest(*PLUGINS)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E       AssertionError: assert '*' == '000000000000*'"])


def test_a_renewal_the_sync_cannot_install_fails_saying_why(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
import pytest

@pytest.mark.anyio
async def test_denied(kvcertsync_vault, rotate_and_wait):
    kvcertsync_vault.fail(status=403, inner_code="ForbiddenByRbac", times=None)
    await rotate_and_wait()
"""
    )
    result = inner.runpytest(*PLUGINS)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: rotated https://myvault.vault.azure.net/secrets/web to version *,"
            " but the sync failed to install it: AccessDenied: *"
        ]
    )


def test_fixtures_are_overridden_for_other_stores_and_certificates(
    inner: pytest.Pytester,
) -> None:
    inner.makepyfile(
        """
import os
import pytest
from kvcertsync.stores import PemDirectoryStore

API = "https://shop.vault.azure.net/secrets/api"

@pytest.fixture
def kvcertsync_certificates():
    return ["https://shop.vault.azure.net/secrets/web", API]

@pytest.fixture
def kvcertsync_store(tmp_path):
    return PemDirectoryStore(tmp_path / "certs")

@pytest.mark.anyio
async def test_pem(kvcertsync_sync, rotate_and_wait, tmp_path):
    with pytest.raises(ValueError, match="observes 2 certificates: say which"):
        await rotate_and_wait()
    renewed = await rotate_and_wait(API)
    assert os.readlink(tmp_path / "certs" / "shop.api") == f"shop.api.{renewed.version}"
"""
    )
    result = inner.runpytest(*PLUGINS)
    result.assert_outcomes(passed=1)


def test_a_test_without_anyio_gets_a_clear_error(inner: pytest.Pytester) -> None:
    inner.makepyfile(
        """
def test_not_async(kvcertsync_vault):
    pass
"""
    )
    result = inner.runpytest(*PLUGINS)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*requested an async fixture 'kvcertsync_vault'*"])


def test_the_plugin_imports_nothing_and_hooks_nothing() -> None:
    code = (
        "import sys, kvcertsync.pytest_plugin\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kvcertsync', 'aiohttp', 'azure', 'cryptography', 'anyio')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip() == "['kvcertsync', 'kvcertsync._version', 'kvcertsync.pytest_plugin']"
    assert [name for name in vars(kvcertsync.pytest_plugin) if name.startswith("pytest_")] == []


def test_the_distribution_declares_the_plugin() -> None:
    declared = {entry.name: entry.value for entry in entry_points(group="pytest11")}
    if "kvcertsync" not in declared:
        pytest.skip("this editable install predates the entry point: pip install -e . again")
    assert declared["kvcertsync"] == "kvcertsync.pytest_plugin"
