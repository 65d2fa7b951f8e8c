"""Reload hooks as an operator configures them: real processes, real rotations, real signals."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvcertsync.emulator import LocalKeyVault
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
RECORDER = Path(__file__).resolve().parent / "helpers" / "record_env.py"


def record(out: Path) -> str:
    """A hook command line that appends what it was told, as one JSON line, to ``out``."""
    return f"{sys.executable} {RECORDER} {out}"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def runs(path: Path) -> list[dict[str, str]]:
    """Every run a recording hook made, in order."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def wait_runs(path: Path, count: int, agent: AgentProcess, within: float = 30) -> None:
    with anyio.fail_after(within):
        while len(runs(path)) < count:
            agent.assert_running()
            await anyio.sleep(0.05)


def start(
    agents: list[AgentProcess],
    kv: LocalKeyVault,
    tmp: Path,
    document: dict[str, Any],
    *args: str,
) -> AgentProcess:
    settings = tmp / "settings.json"
    settings.write_text(json.dumps(document))
    return start_agent(agents, kv, tmp, str(settings), *args)


async def test_two_certificates_rotated_together_give_one_run_listing_both(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    out = tmp_path / "runs.jsonl"
    document = settings_document(kv, ["web", "api"], tmp_path / "certs", interval=1)
    # A 3 s window: the two polls that see the rotations may fall up to a poll interval apart.
    agent = start(agents, kv, tmp_path, document, "--on-change", record(out), "--hook-batch", "3")
    await agent.wait_phase("success")
    assert runs(out) == []  # no hook for the first installs: nginx starts after READY
    kv.rotate("demo", "web")
    kv.rotate("demo", "api")
    await wait_runs(out, 1, agent)
    await anyio.sleep(4)  # nothing more comes
    (run,) = runs(out)
    assert sorted(run["KVCERTSYNC_CHANGED"].split("\n")) == [API, WEB]
    assert run["KVCERTSYNC_COUNT"] == "2"
    assert "KVCERTSYNC_URI" not in run  # per-certificate variables only for a batch of one
    await agent.wait_log(f"hook {record(out)[:20]!r}"[:-1])

    await agent.wait_log(" done in ")  # one line per run, in the log


async def test_a_per_certificate_hook_runs_for_its_certificate_only_with_its_variables(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    out = tmp_path / "web.jsonl"
    certs = tmp_path / "certs"
    document = settings_document(kv, ["web", "api"], certs, interval=1)
    document["secretsManagementSettings"]["observedCertificates"][0]["customSymbolicLinkName"] = (
        "site"
    )
    agent = start(
        agents,
        kv,
        tmp_path,
        document,
        "--on-change-of",
        "https://demo.vault.azure.net/secrets/web*",
        record(out),
        "--hook-batch",
        "0.5",
    )
    await agent.wait_phase("success")
    previous = kv.versions("demo", "web")[-1]
    kv.rotate("demo", "api")
    await agent.wait_status(
        lambda s: kv.versions("demo", "api")[-1] in substatus(s)[API]["formattedMessage"]["message"]
    )
    await anyio.sleep(1.5)
    assert runs(out) == []  # api changed: not this hook's certificate
    version = kv.rotate("demo", "web")
    await wait_runs(out, 1, agent)
    (run,) = runs(out)
    assert run["KVCERTSYNC_URI"] == WEB and run["KVCERTSYNC_CHANGED"] == WEB
    assert (run["KVCERTSYNC_VAULT"], run["KVCERTSYNC_NAME"]) == ("demo", "web")
    assert run["KVCERTSYNC_VERSION"] == version
    assert run["KVCERTSYNC_PREVIOUS_VERSION"] == previous
    assert run["KVCERTSYNC_LOCATION"] == str(certs / "site")  # what nginx.conf names
    assert run["KVCERTSYNC_FILES"] == str(certs / "site")
    assert len(run["KVCERTSYNC_THUMBPRINT"]) == 40 and run["KVCERTSYNC_NOT_AFTER"]


async def test_hooks_on_initial_sync_when_asked_and_never_on_a_restart_that_finds_it_current(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    out = tmp_path / "runs.jsonl"
    document = settings_document(kv, ["web", "api"], tmp_path / "certs")
    args = ["--on-change", record(out), "--hooks-on-initial-sync", "--hook-batch", "1"]
    first = start(agents, kv, tmp_path, document, *args)
    await wait_runs(out, 1, first)
    assert sorted(runs(out)[0]["KVCERTSYNC_CHANGED"].split("\n")) == [API, WEB]
    first.send(signal.SIGTERM)
    assert (await first.wait_exit(5))[0] == 0
    (tmp_path / "again").mkdir()
    again = start(agents, kv, tmp_path / "again", document, *args)
    await again.wait_phase("success")
    await anyio.sleep(1)
    assert len(runs(out)) == 1  # the store was current: nothing changed, nothing ran


async def test_a_hanging_hook_is_killed_and_the_next_change_runs_hooks_again(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    out = tmp_path / "runs.jsonl"
    marker = tmp_path / "hung-once"
    # The first run hangs (a reload stuck on a dead service); later runs record and finish.
    command = f"if [ ! -e {marker} ]; then touch {marker}; sleep 60; fi; {record(out)}"
    document = settings_document(kv, ["web"], tmp_path / "certs", interval=1)
    agent = start(
        agents,
        kv,
        tmp_path,
        document,
        "--on-change",
        command,
        "--hook-timeout",
        "5",  # bounds the later runs too: a shell and a Python start, on a loaded machine
        "--hook-batch",
        "0",
    )
    await agent.wait_phase("success")
    kv.rotate("demo", "web")
    await agent.wait_log("timed out after 5 s and was killed")
    status = await agent.wait_phase("warning")
    assert "hook: hook " in substatus(status)[WEB]["formattedMessage"]["message"]
    kv.rotate("demo", "web")
    await wait_runs(out, 1, agent)
    await agent.wait_phase("success")  # the hook worked again: the warning is gone


async def test_a_failing_hook_shows_in_the_status_and_syncing_goes_on(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    document = settings_document(kv, ["web"], tmp_path / "certs", interval=1)
    agent = start(
        agents,
        kv,
        tmp_path,
        document,
        "--on-change",
        "echo reload failed >&2; exit 3",
        "--hook-batch",
        "0",
    )
    await agent.wait_phase("success")
    kv.rotate("demo", "web")
    status = await agent.wait_phase("warning")
    web = substatus(status)[WEB]
    assert web["status"] == "warning"
    assert (
        "hook: hook 'echo reload failed >&2; exit 3' exited with status 3"
        in (web["formattedMessage"]["message"])
    )
    assert "the reload hook failed for 1" in status["status"]["formattedMessage"]["message"]
    log = agent.log_text()
    assert (
        "exited with status 3 (for https://demo.vault.azure.net/secrets/web): reload failed" in log
    )
    assert "Traceback" not in log
    version = kv.rotate("demo", "web")  # still syncing
    await agent.wait_status(lambda s: version in substatus(s)[WEB]["formattedMessage"]["message"])


async def test_a_hook_file_beside_the_settings_is_read_and_reread_on_sighup(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    out, other = tmp_path / "file.jsonl", tmp_path / "other.jsonl"
    hooks = tmp_path / "kvcertsync.hooks.json"
    hooks.write_text(
        json.dumps(
            {
                "batchWindowSeconds": 0,
                "hooks": [
                    {
                        "name": "record",
                        "command": [sys.executable, str(RECORDER), str(out)],
                        "certificates": [WEB],
                    },
                ],
            }
        )
    )
    document = settings_document(kv, ["web", "api"], tmp_path / "certs", interval=1)
    agent = start(agents, kv, tmp_path, document)
    await agent.wait_phase("success")
    kv.rotate("demo", "web")
    await wait_runs(out, 1, agent)
    await agent.wait_log("hook 'record' done")
    hooks.write_text(json.dumps({"hooks": [{"command": record(other)}]}))
    agent.send(signal.SIGHUP)
    await agent.wait_log("settings reloaded")
    kv.rotate("demo", "api")
    await wait_runs(other, 1, agent)
    assert runs(other)[0]["KVCERTSYNC_URI"] == API
    hooks.write_text('{"hooks": [{"comand": "typo"}]}')
    agent.send(signal.SIGHUP)
    await agent.wait_log("hooks[0].comand: unknown key")


async def test_once_runs_the_hooks_of_the_changes_it_made(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """Cron: a pass that renews a certificate reloads its consumer before it exits."""
    out = tmp_path / "runs.jsonl"
    document = settings_document(kv, ["web"], tmp_path / "certs")
    first = start(agents, kv, tmp_path, document, "--once", "--on-change", record(out))
    assert (await first.wait_exit(30))[0] == 0
    assert runs(out) == []  # a first install
    kv.rotate("demo", "web")
    (tmp_path / "2").mkdir()
    second = start(agents, kv, tmp_path / "2", document, "--once", "--on-change", record(out))
    assert (await second.wait_exit(30))[0] == 0
    (run,) = runs(out)
    assert run["KVCERTSYNC_URI"] == WEB and run["KVCERTSYNC_PREVIOUS_VERSION"]


async def test_run_serves_metrics_that_match_the_installed_certificate_and_count_hooks(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from kvcertsync.material import CertificateMaterial

    document = settings_document(kv, ["web"], tmp_path / "certs", interval=1)
    agent = start(
        agents,
        kv,
        tmp_path,
        document,
        "--metrics-address",
        "127.0.0.1:0",
        "--on-change",
        "exit 1",
        "--hook-batch",
        "0",
    )
    await agent.wait_phase("success")
    kv.rotate("demo", "web")
    await agent.wait_phase("warning")  # the hook failed: counted below
    line = next(x for x in agent.log_text().splitlines() if "serving metrics at " in x)
    url = line.split("serving metrics at ")[1].strip()
    assert url.startswith("http://127.0.0.1:")
    import urllib.request

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=10) as reply:
            return str(reply.read().decode())

    text = await anyio.to_thread.run_sync(scrape)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    web = CertificateMaterial.from_secret((tmp_path / "certs" / "demo.web").read_bytes())
    labels = (("name", "web"), ("uri", WEB), ("vault", "demo"))
    assert samples[("kvcertsync_certificate_not_after_timestamp_seconds", labels)] == (
        web.not_after.timestamp()
    )
    assert samples[("kvcertsync_hook_runs_total", (("hook", "exit 1"),))] == 1
    assert samples[("kvcertsync_hook_failures_total", (("hook", "exit 1"),))] == 1
    assert samples[("kvcertsync_changes_total", ())] == 2
    assert samples[("kvcertsync_initial_sync_done", ())] == 1
    agent.send(signal.SIGTERM)
    assert (await agent.wait_exit(5))[0] == 0


async def test_a_taken_metrics_port_is_a_clear_start_error(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        document = settings_document(kv, ["web"], tmp_path / "certs")
        agent = start(agents, kv, tmp_path, document, "--metrics-address", str(port))
        code, stderr = await agent.wait_exit(30)
    assert code == 2
    assert f"cannot serve metrics on {port}" in stderr and "Traceback" not in stderr


async def test_allow_any_host_reaches_a_vault_outside_azure(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """A private DNS name or an emulator on localhost: no redirect, its own name."""
    kv.import_certificate("localhost", "web", kv.authority.issue(["web.example"]))
    document = settings_document(kv, [], tmp_path / "certs")
    document["secretsManagementSettings"]["observedCertificates"] = [
        {"url": f"{kv.local_url}/secrets/web", "certificateStoreLocation": str(tmp_path / "certs")}
    ]
    settings = tmp_path / "s.json"
    settings.write_text(json.dumps(document))
    refused = AgentProcess([str(settings), "--once", "--ca-file", kv.ca_file], tmp=tmp_path)
    agents.append(refused)
    assert (await refused.wait_exit(30))[0] == 2
    assert "--allow-any-host on the command line" in refused.log_text()
    (tmp_path / "2").mkdir()
    allowed = AgentProcess(
        [str(settings), "--once", "--ca-file", kv.ca_file],
        tmp=tmp_path / "2",
        env={"KVCERTSYNC_ALLOW_ANY_HOST": "1"},
    )
    agents.append(allowed)
    assert (await allowed.wait_exit(30))[0] == 0, allowed.log_text()
    assert (tmp_path / "certs" / "localhost.web").is_symlink()
