"""Secret hygiene: no secret value, private key or token anywhere a person or a machine reads.

The real ``kvcertsync run --log-level debug`` (text logs; test_agent_run checks the JSON ones) runs
against the emulator through rotations and faults of every kind (revoked tokens, IMDS failures,
5xx, dropped connections, 403, 429, a secret that is only a private key) with metrics and a status
directory; then its DEBUG log, stderr, every status file and the /metrics text are scanned. The
same faults in-process: every event a subscriber got (repr and describe()), every error (message,
repr, traceback), the reprs of the objects a user handles, and every DEBUG log record. The scan
looks for every 40-character piece of every secret the emulator served (base64 PFX, private-key
PEM bodies, the keys as kvcertsync writes them) and of every token its IMDS issued, in the text as
it is and with whitespace and escapes removed. Zero hits is the assertion.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import traceback
from collections.abc import Iterable
from pathlib import Path

import aiohttp
import pytest
from azure.keyvault.secrets._shared import http_challenge_cache

from kvcertsync import parse_settings, sync_from_settings
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.events import Event, SyncFailed
from kvcertsync.material import CertificateMaterial
from kvcertsync.sources import KeyVaultSource
from kvcertsync.stores import MemoryStore
from kvcertsync.uri import SecretUri
from tests.agent_process import (
    AgentProcess,
    agent_vault_fixture,  # noqa: F401  (the "kv" fixture)
    agents_fixture,  # noqa: F401  (the "agents" fixture)
    settings_document,
    start_agent,
    substatus,
)

pytestmark = pytest.mark.anyio

WEB = "https://demo.vault.azure.net/secrets/web"
API = "https://demo.vault.azure.net/secrets/api"
KEY_ONLY = "https://demo.vault.azure.net/secrets/keyonly"
WINDOW = 40
_PEM_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----(.*?)-----END", re.DOTALL)
_NOISE = re.compile(r"\s|\\[nrt]")  # whitespace, and the escapes JSON writes for it


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class SecretScan:
    """Every 40-character piece of the secrets given; ``hits`` finds any of them in a text."""

    def __init__(self) -> None:
        self.pieces: set[str] = set()

    def add(self, secret: str) -> None:
        for variant in {secret, _NOISE.sub("", secret)}:
            for start in range(len(variant) - WINDOW + 1):
                self.pieces.add(variant[start : start + WINDOW])

    def add_served(self, kv: LocalKeyVault) -> None:
        """Every version of every secret in vault "demo", and every token IMDS issued."""
        for name in kv.vaults()["demo"]:
            for version in kv.versions("demo", name):
                value = kv.secret("demo", name, version).value
                keys = _PEM_KEY.findall(value)
                for secret in keys or [value]:  # a PEM's certificates are public
                    self.add(secret)
                try:
                    material = CertificateMaterial.from_secret(value)
                except ValueError:
                    continue
                self.add(_PEM_KEY.findall(material.key_pem().decode())[0])  # as it is written
        assert kv.issued_tokens
        for token in kv.issued_tokens:
            self.add(token)

    def hits(self, text: str) -> list[str]:
        found = []
        for variant in {text, _NOISE.sub("", text)}:
            found += [
                variant[start : start + WINDOW]
                for start in range(len(variant) - WINDOW + 1)
                if variant[start : start + WINDOW] in self.pieces
            ]
        return found


def assert_clean(scan: SecretScan, texts: dict[str, str]) -> None:
    for where, text in texts.items():
        hits = scan.hits(text)
        assert not hits, f"{len(hits)} secret pieces in {where}, e.g. {hits[0][:8]}..."


async def wait_version(agent: AgentProcess, url: str, version: str) -> None:
    await agent.wait_status(
        lambda s: f"version: {version}" in substatus(s)[url]["formattedMessage"]["message"],
        within=60,
    )


async def test_the_agent_shows_no_secret_in_logs_status_or_metrics(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    kv.set_secret(
        "demo",
        "keyonly",
        kv.authority.issue(["k.example"]).key_pem().decode(),
        "application/x-pem-file",
    )
    document = settings_document(
        kv, ["web", "api", "keyonly"], tmp_path / "certs", interval=1, require_initial_sync=False
    )
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(document))
    agent = start_agent(
        agents,
        kv,
        tmp_path,
        str(settings),
        "--log-level",
        "debug",
        "--metrics-address",
        "127.0.0.1:0",
    )
    await wait_version(agent, WEB, kv.versions("demo", "web")[-1])
    await agent.wait_status(lambda s: substatus(s)[KEY_ONLY]["status"] == "error")

    kv.fail_imds(500, times=2)
    kv.revoke_tokens()  # the agent's token is refused: a fresh one, through IMDS failures
    await wait_version(agent, WEB, kv.rotate("demo", "web"))
    kv.fail(status=503, times=3)
    kv.drop_connections(times=2)
    await wait_version(agent, API, kv.rotate("demo", "api"))
    kv.fail(status=403, inner_code="ForbiddenByRbac", times=4)
    kv.throttle("demo", limit=2, window=2)
    await agent.wait_log("(429 Throttled)")
    kv.reset_faults()
    await wait_version(agent, API, kv.rotate("demo", "api"))

    async with aiohttp.ClientSession() as session:
        url = re.search(r"serving metrics at (\S+)", agent.log_text())
        assert url is not None, agent.log_text()
        async with session.get(url.group(1)) as response:
            metrics = await response.text()
    assert "kvcertsync_" in metrics
    agent.send(signal.SIGTERM)
    code, stderr = await agent.wait_exit(10)
    assert code == 0, stderr

    log = agent.log_text()
    assert "DEBUG" in log and "refused" in log  # the run saw what it was meant to
    texts = {"the log": log, "stderr": stderr, "/metrics": metrics}
    for path in sorted(agent.status_dir.rglob("*")):
        if path.is_file():
            texts[str(path)] = path.read_text(errors="replace")
    assert len(texts) > 3
    scan = SecretScan()
    scan.add_served(kv)
    assert_clean(scan, texts)


def every_text(errors: Iterable[BaseException]) -> list[str]:
    out = []
    for error in errors:
        out += [str(error), repr(error), "".join(traceback.format_exception(error))]
    return out


async def test_in_process_events_errors_reprs_and_debug_logs_hold_no_secret(
    kv: LocalKeyVault, caplog: pytest.LogCaptureFixture
) -> None:
    http_challenge_cache.clear()
    caplog.set_level(logging.DEBUG)
    kv.set_secret(
        "demo",
        "keyonly",
        kv.authority.issue(["k.example"]).key_pem().decode(),
        "application/x-pem-file",
    )
    settings = parse_settings(
        {
            "secretsManagementSettings": {
                "pollingIntervalInS": "3600",
                "observedCertificates": [WEB, API, KEY_ONLY],
            },
            "authenticationSettings": {"msiEndpoint": kv.imds_endpoint},
        }
    )
    store = MemoryStore()
    sync = sync_from_settings(settings, store=store, ca_file=kv.ca_file, redirect=kv.redirect)
    events: list[Event] = []
    sync.subscribe(events.append)
    errors: list[BaseException] = []
    reprs: list[str] = []

    async def poll() -> None:
        report = await sync.refresh()
        errors.extend(report.errors.values())
        reprs.append(repr(report))

    async with sync:
        await poll()
        kv.revoke_tokens()
        kv.rotate("demo", "web")
        await poll()
        kv.fail(status=503, times=2)
        kv.drop_connections(times=2)
        await poll()
        kv.fail_imds(500, times=2)
        kv.revoke_tokens()
        kv.rotate("demo", "api")
        await poll()
        kv.fail(status=403, inner_code="ForbiddenByRbac", times=3)
        await poll()
        kv.reset_faults()
        await poll()
        reprs += [repr(sync), repr(store), repr(sync.source), *map(repr, sync.states())]
        for url in (WEB, API):
            reprs.append(repr(store.current(SecretUri.parse(url))))
            reprs.append(repr(await sync.material(url)))
        async with KeyVaultSource.from_settings(
            settings, ca_file=kv.ca_file, redirect=kv.redirect
        ) as source:
            fetched = await source.get(SecretUri.parse(WEB))
            reprs += [repr(fetched), str(fetched), repr(source)]
            try:
                CertificateMaterial.from_secret(kv.secret("demo", "keyonly").value)
            except ValueError as error:
                errors.append(error)

    failures = [e for e in events if isinstance(e, SyncFailed)]
    assert failures and {type(e.error).__name__ for e in failures} >= {"MaterialError"}
    assert len(errors) >= 3
    texts = {
        "event reprs": "\n".join(map(repr, events)),
        "event descriptions": "\n".join(e.describe() for e in events),
        "errors": "\n".join(every_text([*errors, *(e.error for e in failures)])),
        "reprs": "\n".join(reprs),
        "DEBUG log": caplog.text,
    }
    assert "refused" in caplog.text
    scan = SecretScan()
    scan.add_served(kv)
    assert_clean(scan, texts)


def test_the_scan_finds_what_it_looks_for() -> None:
    scan = SecretScan()
    secret = "MIIK" + "q" * 30 + "x9Z/+" * 20
    scan.add(secret)
    assert scan.hits(f"log line: {secret[17:63]} end")
    assert scan.hits("json: " + secret[:30] + "\\n" + secret[30:80])  # cut by an escaped newline
    assert not scan.hits(secret[:39])
