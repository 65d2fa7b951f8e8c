"""``kvcertsync run`` as an operator runs it: a real process, real signals, the emulator, files."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvcertsync.agent.daemon import Agent, AgentOptions
from kvcertsync.emulator import LocalKeyVault
from kvcertsync.material import CertificateMaterial
from tests.agent_process import (
    KVCERTSYNC,
    AgentProcess,
    agent_vault_fixture,  # noqa: F401  (the "kv" fixture)
    agents_fixture,  # noqa: F401  (the "agents" fixture)
    emulator_options,
    settings_document,
    start_agent,
    substatus,
    write_handler_environment,
)
from tests.walinuxagent import (
    Waagent,
    waagent_collect_heartbeats,
    waagent_fixture,  # noqa: F401  (the "waagent" fixture)
    waagent_parse_status,
)

pytestmark = pytest.mark.anyio

WEB = "https://demo.vault.azure.net/secrets/web"
API = "https://demo.vault.azure.net/secrets/api"
# The token header the emulator's IMDS puts on every token it issues (base64url, unpadded).
TOKEN_HEADER = "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def write_settings(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))
    return path


async def test_transitioning_then_success_then_a_clean_stop(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    certs = tmp_path / "certs"
    settings = write_settings(
        tmp_path / "settings.json", settings_document(kv, ["web", "api"], certs)
    )
    kv.latency(1.5)  # the initial sync takes a while: long enough to see it transitioning
    agent = start_agent(agents, kv, tmp_path, str(settings))
    first = await agent.wait_status(lambda s: True)
    assert first["status"]["status"] == "transitioning"
    assert first["status"]["formattedMessage"]["message"].startswith("initial sync: 0 of 2")
    kv.latency(0)
    done = await agent.wait_phase("success")
    assert done["version"] == 1.0 and done["status"]["operation"] == "Enable"
    entries = substatus(done)
    assert set(entries) == {WEB, API}
    web = CertificateMaterial.from_secret((certs / "demo.web").read_bytes())
    message = entries[WEB]["formattedMessage"]["message"]
    assert f"thumbprint: {web.thumbprint}" in message
    assert f"version: {kv.versions('demo', 'web')[-1]}" in message
    assert entries[WEB]["status"] == "success" and entries[WEB]["code"] == 0

    agent.send(signal.SIGTERM)
    code, stderr = await agent.wait_exit(5)
    assert code == 0
    assert "Traceback" not in stderr + agent.log_text()
    final = agent.read_status()
    assert final is not None and final["status"]["formattedMessage"]["message"].startswith(
        "agent stopped"
    )


async def test_an_initial_sync_that_cannot_succeed_stays_transitioning_and_stops_on_sigterm(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    kv.fail(status=403, inner_code="ForbiddenByRbac", times=None)
    settings = write_settings(
        tmp_path / "settings.json", settings_document(kv, ["web"], tmp_path / "certs")
    )
    agent = start_agent(agents, kv, tmp_path, str(settings))
    status = await agent.wait_status(lambda s: substatus(s)[WEB]["status"] == "error")
    assert status["status"]["status"] == "transitioning"
    assert "ForbiddenByRbac" in substatus(status)[WEB]["formattedMessage"]["message"]
    agent.send(signal.SIGTERM)
    code, stderr = await agent.wait_exit(5)
    assert code == 0
    assert "Traceback" not in stderr + agent.log_text()
    assert not (tmp_path / "certs" / "demo.web").exists()


async def test_error_once_initial_attempts_are_used_up_then_success_when_access_comes(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    kv.fail(status=403, inner_code="ForbiddenByRbac", times=None)
    settings = write_settings(
        tmp_path / "settings.json",
        settings_document(kv, ["web"], tmp_path / "certs", interval=1),
    )
    agent = start_agent(agents, kv, tmp_path, str(settings), "--initial-attempts", "2")
    status = await agent.wait_phase("error")
    assert status["status"]["code"] != 0
    assert "initial sync failed" in status["status"]["formattedMessage"]["message"]
    assert "ForbiddenByRbac" in status["status"]["formattedMessage"]["message"]
    kv.reset_faults()  # access granted: the agent heals at its next regular poll
    await agent.wait_phase("success")
    assert (tmp_path / "certs" / "demo.web").exists()


async def test_warning_when_a_certificate_starts_failing_later(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    settings = write_settings(
        tmp_path / "settings.json",
        settings_document(kv, ["web", "api"], tmp_path / "certs", interval=1),
    )
    agent = start_agent(agents, kv, tmp_path, str(settings))
    await agent.wait_phase("success")
    kv.disable("demo", "api")
    status = await agent.wait_phase("warning")
    api = substatus(status)[API]
    assert api["status"] == "warning"  # still installed, but not renewable now
    message = api["formattedMessage"]["message"]
    assert "version: " in message and "SecretDisabled" in message
    assert substatus(status)[WEB]["status"] == "success"
    kv.enable("demo", "api")
    await agent.wait_phase("success")


async def test_sighup_adds_and_removes_certificates_and_keeps_state(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    kv.import_certificate("demo", "new", kv.authority.issue(["new.example"]))
    kv.import_certificate("demo", "moved", kv.authority.issue(["moved.example"]))
    certs, elsewhere = tmp_path / "certs", tmp_path / "elsewhere"
    document = settings_document(kv, ["web", "api", "moved"], certs)
    settings = write_settings(tmp_path / "s.json", document)
    agent = start_agent(agents, kv, tmp_path, str(settings))
    await agent.wait_phase("success")
    installed_web = (certs / "demo.web").resolve()
    document = settings_document(kv, ["web", "new", "moved"], certs, interval=1)
    observed = document["secretsManagementSettings"]["observedCertificates"]
    observed[2]["certificateStoreLocation"] = str(elsewhere)
    write_settings(settings, document)
    agent.send(signal.SIGHUP)
    moved = "https://demo.vault.azure.net/secrets/moved"
    status = await agent.wait_status(
        lambda s: (
            set(substatus(s)) == {WEB, "https://demo.vault.azure.net/secrets/new", moved}
            and s["status"]["status"] == "success"
            and str(elsewhere) in substatus(s)[moved]["formattedMessage"]["message"]
        )
    )
    assert status is not None
    assert (certs / "demo.new").exists()
    assert (elsewhere / "demo.moved").exists()  # a new location is installed afresh
    assert (certs / "demo.web").resolve() == installed_web  # not installed again
    await agent.wait_log("settings reloaded: 3 certificates")
    log = agent.log_text()
    assert "removed https://demo.vault.azure.net/secrets/api" in log
    assert f"changed {moved}" in log
    installs = [line for line in log.splitlines() if f"engine: installed {WEB} version" in line]
    assert len(installs) == 1  # the kept one was not installed again
    # The new interval (1 s) applies: a rotation arrives within a few seconds.
    rotated = kv.rotate("demo", "web")
    await agent.wait_status(lambda s: rotated in substatus(s)[WEB]["formattedMessage"]["message"])


async def test_sighup_with_a_broken_file_keeps_the_running_set(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    settings = write_settings(
        tmp_path / "s.json", settings_document(kv, ["web"], tmp_path / "certs", interval=1)
    )
    agent = start_agent(agents, kv, tmp_path, str(settings))
    await agent.wait_phase("success")
    settings.write_text('{"secretsManagementSettings": {"observedCertificates": [')
    agent.send(signal.SIGHUP)
    await agent.wait_log("reload refused, the running settings stay")
    assert "invalid JSON" in agent.log_text() and str(settings) in agent.log_text()
    rotated = kv.rotate("demo", "web")  # still polling, with the old settings
    await agent.wait_status(lambda s: rotated in substatus(s)[WEB]["formattedMessage"]["message"])
    agent.send(signal.SIGTERM)
    assert (await agent.wait_exit(5))[0] == 0


async def test_once_exits_0_when_all_current_and_1_with_a_reason_otherwise(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    certs = tmp_path / "certs"
    settings = write_settings(tmp_path / "s.json", settings_document(kv, ["web", "api"], certs))
    (tmp_path / "ok").mkdir()
    ok = start_agent(agents, kv, tmp_path / "ok", str(settings), "--once")
    assert (await ok.wait_exit(30))[0] == 0
    assert (certs / "demo.web").exists() and (certs / "demo.api").exists()

    kv.disable("demo", "api")
    (tmp_path / "bad").mkdir()
    bad = start_agent(agents, kv, tmp_path / "bad", str(settings), "--once")
    code, _ = await bad.wait_exit(30)
    assert code == 1
    reasons = [line for line in bad.log_text().splitlines() if " ERROR " in line]
    assert any(API in line and "SecretDisabled" in line for line in reasons), bad.log_text()
    assert any("1 of 2 certificates not installed and current" in line for line in reasons)
    assert not any(WEB in line for line in reasons)


async def test_start_splay_spreads_the_first_requests_of_a_once_pass(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    names = [f"s{i}" for i in range(6)]
    for name in names:
        kv.import_certificate("demo", name, kv.authority.issue([f"{name}.example"]))
    certs = tmp_path / "certs"
    settings = write_settings(tmp_path / "s.json", settings_document(kv, names, certs))
    agent = start_agent(agents, kv, tmp_path, str(settings), "--once", "--start-splay", "3")
    assert (await agent.wait_exit(30))[0] == 0, agent.log_text()
    assert all((certs / f"demo.{name}").exists() for name in names)
    # The first answer per certificate: the pass polls again each interval until it is done.
    first: dict[str, float] = {}
    for r in kv.requests:
        name = r.path.split("/")[2]
        if r.status == 200 and name in names:
            first.setdefault(name, r.time)
    assert sorted(first) == names
    times = list(first.values())
    # All at once they would land within milliseconds; six uniform draws over 3 s span less
    # than 0.3 s with a chance of about 1 in 18,000.
    assert max(times) - min(times) > 0.3, times


async def test_settings_from_stdin(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    document = settings_document(kv, ["web"], tmp_path / "certs")
    agent = start_agent(agents, kv, tmp_path, "-", "--once", stdin=json.dumps(document).encode())
    assert (await agent.wait_exit(30))[0] == 0
    assert (tmp_path / "certs" / "demo.web").exists()


async def test_invalid_settings_exit_2_naming_the_file_and_path(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    settings = tmp_path / "s.json"
    settings.write_text('{"secretsManagementSettings": {"pollingIntervalInS": "often"}}')
    agent = start_agent(agents, kv, tmp_path, str(settings))
    code, stderr = await agent.wait_exit(30)
    assert code == 2
    log = agent.log_text()
    assert "secretsManagementSettings.pollingIntervalInS" in log and str(settings) in log
    assert "Traceback" not in stderr + log


async def test_handler_mode_reads_the_envelope_and_writes_status_and_heartbeat(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    handler = tmp_path / "Microsoft.Azure.KeyVault.KeyVaultForLinux-3.0.1"
    write_handler_environment(handler)
    public = settings_document(kv, ["web"], tmp_path / "certs")
    old = settings_document(kv, ["api"], tmp_path / "certs")
    for number, document in ((0, old), (1, public)):
        envelope = {
            "runtimeSettings": [
                {
                    "handlerSettings": {
                        "protectedSettingsCertThumbprint": "0" * 40,
                        "protectedSettings": "MIIB...",
                        "publicSettings": document,
                    }
                }
            ]
        }
        (handler / "config" / f"{number}.settings").write_text(json.dumps(envelope))
    agent = start_agent(
        agents, kv, tmp_path, "--handler-environment", str(handler / "HandlerEnvironment.json")
    )
    agent.log = handler / "logs" / "kvcertsync.log"  # the handler's log folder, by default
    status_file = handler / "status" / "1.status"  # the highest sequence number
    status = await agent.wait_phase("success", path=status_file)
    assert status["status"]["name"] == "Microsoft.Azure.KeyVault.KeyVaultForLinux"
    assert set(substatus(status)) == {WEB}
    assert not (handler / "status" / "0.status").exists()
    heartbeat = json.loads((handler / "heartbeat.log").read_text())
    assert heartbeat[0]["version"] == 1.0
    assert heartbeat[0]["heartbeat"]["status"] == "ready" and heartbeat[0]["heartbeat"]["code"] == 0
    assert "protectedSettings ignored" in agent.log_text()
    agent.send(signal.SIGTERM)
    assert (await agent.wait_exit(5))[0] == 0


async def test_json_logs_parse_and_hold_no_secret(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    settings = write_settings(
        tmp_path / "s.json", settings_document(kv, ["web", "api"], tmp_path / "certs", interval=1)
    )
    agent = start_agent(
        agents, kv, tmp_path, str(settings), "--log-format", "json", "--log-level", "debug"
    )
    await agent.wait_phase("success")
    rotated = kv.rotate("demo", "web")
    # The status file names the new version after the install's log line is written.
    await agent.wait_status(
        lambda s: f"version: {rotated}" in substatus(s)[WEB]["formattedMessage"]["message"]
    )
    agent.send(signal.SIGTERM)
    assert (await agent.wait_exit(5))[0] == 0
    text = agent.log_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    installs = [
        line
        for line in lines
        if line["logger"] == "kvcertsync.engine" and line["message"].startswith("installed ")
    ]
    assert len(installs) >= 3
    assert all(line["uri"] and line["version"] and line["thumbprint"] for line in installs)
    assert any(line["level"] == "debug" for line in lines)
    for forbidden in ("-----BEGIN", "PRIVATE KEY", TOKEN_HEADER, "access_token"):
        assert forbidden not in text
    for name in ("web", "api"):
        for version in kv.versions("demo", name):
            value = kv.secret("demo", name, version).value
            for offset in range(0, len(value) - 40, 200):
                assert value[offset : offset + 40] not in text


async def test_a_second_sigterm_during_the_grace_exits_at_once(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = await start_hung_in_an_install(agents, kv, tmp_path, stop_timeout=60)
    agent.send(signal.SIGTERM)
    await agent.wait_log("stopping")
    agent.send(signal.SIGTERM)
    code, _ = await agent.wait_exit(5)
    assert code == 128 + signal.SIGTERM
    assert "second SIGTERM: exiting now" in agent.log_text()
    assert_nothing_half_visible(tmp_path / "certs")


async def test_a_stop_that_overruns_its_grace_abandons_cleanly_with_status_0(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = await start_hung_in_an_install(agents, kv, tmp_path, stop_timeout=1)
    started = time.monotonic()
    agent.send(signal.SIGTERM)
    code, _ = await agent.wait_exit(5)
    assert code == 0 and time.monotonic() - started < 5
    assert "abandoning in-flight work" in agent.log_text()
    assert_nothing_half_visible(tmp_path / "certs")


async def start_hung_in_an_install(
    agents: list[AgentProcess], kv: LocalKeyVault, tmp: Path, *, stop_timeout: float
) -> AgentProcess:
    """An agent whose install hangs (setfacl stuck on a dead NFS server, say) mid-way."""
    fake_bin = tmp / "bin"
    fake_bin.mkdir()
    marker = tmp / "setfacl-started"
    script = fake_bin / "setfacl"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 30\n")
    script.chmod(0o755)
    document = settings_document(kv, ["web"], tmp / "certs")
    document["secretsManagementSettings"]["aclEnabled"] = True
    document["secretsManagementSettings"]["observedCertificates"][0]["acls"] = [{"user": "root"}]
    settings = write_settings(tmp / "s.json", document)
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}"}
    agent = start_agent(
        agents, kv, tmp, str(settings), "--stop-timeout", str(stop_timeout), env=env
    )
    with anyio.fail_after(30):
        while not marker.exists():
            agent.assert_running()
            await anyio.sleep(0.05)
    return agent


def assert_nothing_half_visible(directory: Path) -> None:
    """Every name a reader would use is absent or complete."""
    if not directory.exists():
        return
    for entry in directory.iterdir():
        if entry.name.startswith("."):
            continue  # temporary names: no reader opens them
        if entry.is_symlink():
            assert entry.resolve().exists()
        CertificateMaterial.from_secret(entry.read_bytes())


# --------------------------------------------------------------------------- systemd


class NotifySocket:
    """A real sd_notify listener: an AF_UNIX datagram socket, as systemd binds it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.messages.append(fields)

    async def wait_for(self, key: str, value: str | None = None, within: float = 30) -> int:
        """The index of the first message setting ``key`` (to ``value``), once it arrives."""
        with anyio.fail_after(within):
            while True:
                for index, message in enumerate(self.drain()):
                    if key in message and (value is None or message[key] == value):
                        return index
                await anyio.sleep(0.02)

    def close(self) -> None:
        self.sock.close()


async def test_systemd_ready_only_after_the_certificates_exist(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    listener = NotifySocket(tmp_path / "notify")
    certs = tmp_path / "certs"
    document = settings_document(kv, ["web", "api"], certs)
    kv.import_certificate("slow", "late", kv.authority.issue(["late.example"]))
    document["secretsManagementSettings"]["observedCertificates"].append(
        {"url": "https://slow.vault.azure.net/secrets/late", "certificateStoreLocation": str(certs)}
    )
    settings = write_settings(tmp_path / "s.json", document)
    kv.latency(0.5)
    kv.latency(2.5, vault="slow")  # READY must wait for the slowest, not the first
    env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "900000"}
    try:
        agent = start_agent(agents, kv, tmp_path, str(settings), env=env)
        await listener.wait_for("STATUS")
        assert not any("READY" in m for m in listener.messages)
        index = await listener.wait_for("READY", "1")
        # At the instant READY arrives, every certificate is in place for nginx.
        for name in ("demo.web", "demo.api", "slow.late"):
            assert (certs / name).exists(), name
        before = listener.messages[:index]
        assert any(m.get("STATUS", "").startswith("initial sync: 0 of 3") for m in before)
        assert any(m.get("STATUS", "").startswith("initial sync: 2 of 3") for m in before)
        await listener.wait_for("WATCHDOG", "1")

        kv.reset_faults()
        agent.send(signal.SIGHUP)
        reloading = await listener.wait_for("RELOADING", "1")
        assert int(listener.messages[reloading]["MONOTONIC_USEC"]) > 0
        with anyio.fail_after(10):
            while not any("READY" in m for m in listener.drain()[reloading + 1 :]):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        agent.send(signal.SIGTERM)
        await listener.wait_for("STOPPING", "1")
        assert (await agent.wait_exit(5))[0] == 0
    finally:
        listener.close()


async def test_status_command_reads_what_run_wrote(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    settings = write_settings(
        tmp_path / "s.json", settings_document(kv, ["web", "api"], tmp_path / "certs", interval=1)
    )
    agent = start_agent(agents, kv, tmp_path, str(settings))
    await agent.wait_phase("success")
    status = await anyio.run_process(
        [*KVCERTSYNC, "status", "--status-dir", str(agent.status_dir)], check=False
    )
    assert status.returncode == 0, status.stderr
    out = status.stdout.decode()
    assert "success: 2 certificates installed and current" in out
    web = CertificateMaterial.from_secret((tmp_path / "certs" / "demo.web").read_bytes())
    assert web.thumbprint[:12] in out and str(tmp_path / "certs" / "demo.web") in out

    kv.disable("demo", "api")
    await agent.wait_phase("warning")
    failing = await anyio.run_process(
        [*KVCERTSYNC, "status", "--status-dir", str(agent.status_dir), "--json"],
        check=False,
    )
    assert failing.returncode == 1
    report = json.loads(failing.stdout)
    by_uri = {c["uri"]: c for c in report["certificates"]}
    assert by_uri[API]["status"] == "warning" and "SecretDisabled" in by_uri[API]["error"]
    assert by_uri[WEB]["thumbprint"] == web.thumbprint
    mode = stat.S_IMODE(agent.status_file.stat().st_mode)
    assert mode == 0o644  # the operator's shell reads it; it holds no secret


def many_certificates(kv: LocalKeyVault, tmp: Path, count: int) -> Path:
    names = [f"c{i}" for i in range(count)]
    for name in names:
        kv.import_certificate("demo", name, kv.authority.issue([f"{name}.example"]))
    return write_settings(tmp / "s.json", settings_document(kv, names, tmp / "c"))


async def test_a_long_initial_sync_shows_a_progress_bar(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    settings = many_certificates(kv, tmp_path, 12)
    kv.latency(0.5)
    agent = start_agent(agents, kv, tmp_path, str(settings), "--progress")
    await agent.wait_phase("success")
    agent.send(signal.SIGTERM)
    code, stderr = await agent.wait_exit(5)
    assert code == 0
    assert "initial sync:" in stderr and "/12" in stderr and "cert" in stderr


async def test_without_a_terminal_a_long_initial_sync_logs_its_progress(
    kv: LocalKeyVault, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = many_certificates(kv, tmp_path, 6)
    kv.latency(0.6)
    ((pattern, target),) = kv.redirect.items()
    options = AgentOptions(
        settings=str(settings),
        status_dir=tmp_path / "status",
        ca_file=kv.ca_file,
        redirect={pattern: target},
        progress=False,
        progress_every=0.2,
    )
    agent = Agent(options)
    caplog.set_level(logging.INFO, logger="kvcertsync.agent.daemon")
    async with anyio.create_task_group() as tg:
        tg.start_soon(agent.run)
        with anyio.fail_after(30):
            while "initial sync complete" not in caplog.text:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        agent.request_stop()
    assert agent.exit_status == 0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("initial sync: ")]
    assert lines and all(line.endswith(" of 6 certificates") for line in lines)
    agent.request_stop()  # after the run: a no-op, no grace timer left behind


async def test_every_status_file_a_handler_run_writes_passes_walinuxagent(
    waagent: Waagent, kv: LocalKeyVault, tmp_path: Path
) -> None:
    handler = tmp_path / "handler"
    env_file = write_handler_environment(handler)
    document = settings_document(kv, ["web", "api"], tmp_path / "certs", interval=1)
    envelope = {"runtimeSettings": [{"handlerSettings": {"publicSettings": document}}]}
    (handler / "config" / "0.settings").write_text(json.dumps(envelope))
    kv.fail(status=403, inner_code="ForbiddenByRbac", times=None)
    kv.latency(0.5)  # "transitioning" lasts a few answers: long enough to be seen
    args = ["--handler-environment", str(env_file), "--initial-attempts", "2"]
    agent = AgentProcess([*args, *emulator_options(kv)], tmp=tmp_path)
    agent.log = handler / "logs" / "kvcertsync.log"
    status_file = handler / "status" / "0.status"
    snapshots: dict[str, bytes] = {}
    try:

        async def reach(phase: str) -> None:
            # The very bytes that showed the phase: a second read could be the next phase's.
            with anyio.fail_after(30):
                while True:
                    agent.assert_running()
                    with contextlib.suppress(FileNotFoundError):
                        data = status_file.read_bytes()
                        if json.loads(data)[0]["status"]["status"] == phase:
                            snapshots[phase] = data
                            return
                    await anyio.sleep(0.02)

        await reach("transitioning")
        kv.latency(0)
        await reach("error")
        kv.reset_faults()
        await reach("success")
        kv.disable("demo", "api")
        await reach("warning")
        agent.send(signal.SIGTERM)
        assert (await agent.wait_exit(5))[0] == 0
        snapshots["stopped"] = status_file.read_bytes()
    finally:
        agent.kill()
    paths = []
    for label, data in snapshots.items():
        path = tmp_path / "snapshots" / label / "0.status"
        path.parent.mkdir(parents=True)
        path.write_bytes(data)
        paths.append(path)
    for label, path in zip(snapshots, paths, strict=True):
        result = waagent_parse_status(path)
        expected = "warning" if label == "stopped" else label
        assert result["status"] == expected, label
        assert {s["name"] for s in result["substatus"]} == {
            "https://demo.vault.azure.net/secrets/web",
            "https://demo.vault.azure.net/secrets/api",
        }
    (heartbeat,) = waagent_collect_heartbeats([handler / "heartbeat.log"])
    assert not heartbeat.get("error"), heartbeat


async def test_emulator_options_from_the_environment(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """A service sets KVCERTSYNC_CA_FILE and KVCERTSYNC_REDIRECT instead of options."""
    settings = write_settings(tmp_path / "s.json", settings_document(kv, ["web"], tmp_path / "c"))
    ((pattern, target),) = kv.redirect.items()
    env = {"KVCERTSYNC_CA_FILE": kv.ca_file, "KVCERTSYNC_REDIRECT": f"{pattern}={target}"}
    agent = AgentProcess([str(settings), "--once"], tmp=tmp_path, env=env)
    agents.append(agent)
    assert (await agent.wait_exit(30))[0] == 0
    assert (tmp_path / "c" / "demo.web").exists()


async def test_a_handler_finds_its_environment_beside_the_executable(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    """As the VM agent lays a handler out: bin/kvcertsync, HandlerEnvironment.json one up."""
    handler = tmp_path / "Microsoft.Azure.KeyVault.KeyVaultForLinux-3.0.1"
    write_handler_environment(handler)
    document = settings_document(kv, ["web"], tmp_path / "certs")
    envelope = {"runtimeSettings": [{"handlerSettings": {"publicSettings": document}}]}
    (handler / "config" / "0.settings").write_text(json.dumps(envelope))
    (handler / "bin").mkdir()
    launcher = handler / "bin" / "kvcertsync"
    launcher.write_text(
        f"#!{sys.executable}\nimport sys\nfrom kvcertsync.__main__ import main\nsys.exit(main())\n"
    )
    launcher.chmod(0o755)
    process = await anyio.open_process(
        [str(launcher), "run", *emulator_options(kv)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        status_file = handler / "status" / "0.status"
        with anyio.fail_after(30):
            while not status_file.exists() or b'"success"' not in status_file.read_bytes():
                assert process.returncode is None
                await anyio.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        with anyio.fail_after(5):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
        await process.aclose()
    assert "kvcertsync agent: 1 certificate," in (handler / "logs" / "kvcertsync.log").read_text()


# --------------------------------------------------------------------------- awkward moments


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.4])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_at_any_moment_of_start_up_is_clean(
    kv: LocalKeyVault,
    tmp_path: Path,
    agents: list[AgentProcess],
    delay: float,
    signum: int,
) -> None:
    settings = write_settings(tmp_path / "s.json", settings_document(kv, ["web"], tmp_path / "c"))
    agent = start_agent(agents, kv, tmp_path, str(settings))
    # From the instant it can catch signals: mid-import, mid-settings, mid-sync, wherever.
    # (SIGTERM: Python itself catches SIGINT from before it has imported anything.)
    await agent.wait_catching(signal.SIGTERM)
    await anyio.sleep(delay)
    agent.send(signum)
    code, stderr = await agent.wait_exit(10)
    assert code == 0, stderr
    assert "Traceback" not in stderr + agent.log_text()


async def test_an_early_sighup_does_not_kill(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    settings = write_settings(tmp_path / "s.json", settings_document(kv, ["web"], tmp_path / "c"))
    agent = start_agent(agents, kv, tmp_path, str(settings))
    await agent.wait_catching(signal.SIGHUP)
    agent.send(signal.SIGHUP)
    await agent.wait_phase("success")
    agent.send(signal.SIGTERM)
    assert (await agent.wait_exit(5))[0] == 0


async def test_a_stop_while_stdin_never_ends_is_clean(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    agent = AgentProcess(["-", *emulator_options(kv)], tmp=tmp_path, keep_stdin_open=True)
    agents.append(agent)
    await agent.wait_catching(signal.SIGTERM)
    await anyio.sleep(0.5)  # reading stdin, which never ends
    agent.send(signal.SIGTERM)
    code, stderr = await agent.wait_exit(5)
    assert code == 0, stderr
    assert "stopped before the settings were read" in agent.log_text()


async def test_a_stop_during_a_reload_stuck_on_a_fifo_is_clean(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    settings = write_settings(tmp_path / "s.json", settings_document(kv, ["web"], tmp_path / "c"))
    agent = start_agent(agents, kv, tmp_path, str(settings))
    await agent.wait_phase("success")
    settings.unlink()
    os.mkfifo(settings)  # a reload would wait forever for a writer
    agent.send(signal.SIGHUP)
    await agent.wait_log("re-reading the settings")
    agent.send(signal.SIGTERM)
    code, stderr = await agent.wait_exit(5)
    assert code == 0, stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--initial-attempts", "0"], "--initial-attempts must be at least 1"),
        (["--start-splay", "-1"], "--start-splay must be 0 or more seconds, not -1.0"),
        (["--start-splay", "nan"], "--start-splay must be 0 or more seconds, not nan"),
        (["--redirect", "bogus"], "expected PATTERN=HOST:PORT"),
        (["--ca-file", "/nonexistent/ca.pem"], "--ca-file /nonexistent/ca.pem: no such file"),
        (["--log-file", "/nonexistent/dir/k.log"], "cannot log to /nonexistent/dir/k.log"),
        (["--store", "pem"], "pem needs a directory"),
    ],
)
async def test_wrong_options_exit_2_with_a_clear_error(
    kv: LocalKeyVault, tmp_path: Path, args: list[str], message: str
) -> None:
    settings = write_settings(tmp_path / "s.json", settings_document(kv, ["web"], tmp_path / "c"))
    result = await anyio.run_process(
        [*KVCERTSYNC, "run", str(settings), "--once", *args], check=False
    )
    stderr = result.stderr.decode()
    assert result.returncode == 2, stderr
    assert message in stderr and "Traceback" not in stderr


async def test_a_ca_file_that_is_not_pem_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    (tmp_path / "s.json").write_text('{"secretsManagementSettings": {"observedCertificates": []}}')
    result = await anyio.run_process(
        [*KVCERTSYNC, "run", str(tmp_path / "s.json"), "--ca-file", str(tmp_path / "ca.pem")],
        check=False,
    )
    assert result.returncode == 2
    assert b"not PEM CA certificates" in result.stderr and b"Traceback" not in result.stderr


async def test_the_status_file_is_readable_whatever_the_umask(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    settings = write_settings(tmp_path / "s.json", settings_document(kv, ["web"], tmp_path / "c"))
    agent = start_agent(agents, kv, tmp_path, str(settings), umask=0o077)  # systemd's UMask=0077
    await agent.wait_phase("success")
    assert stat.S_IMODE(agent.status_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(agent.status_dir.stat().st_mode) == 0o755
    # The keys stay private under any umask.
    key_file = (tmp_path / "c" / "demo.web").resolve()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def handler_with_settings(kv: LocalKeyVault, tmp: Path, names: list[str]) -> Path:
    handler = tmp / "handler"
    env_file = write_handler_environment(handler)
    document = settings_document(kv, names, tmp / "certs", interval=1)
    envelope = {"runtimeSettings": [{"handlerSettings": {"publicSettings": document}}]}
    (handler / "config" / "0.settings").write_text(json.dumps(envelope))
    return env_file


async def test_a_refused_handler_reload_says_error_for_that_sequence(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    env_file = handler_with_settings(kv, tmp_path, ["web"])
    handler = env_file.parent
    # The VM agent started it for sequence 0; a reload still finds the newer ones.
    env = {"ConfigSequenceNumber": "0"}
    agent = start_agent(agents, kv, tmp_path, "--handler-environment", str(env_file), env=env)
    agent.log = handler / "logs" / "kvcertsync.log"
    await agent.wait_phase("success", path=handler / "status" / "0.status")
    (handler / "config" / "1.settings").write_text("{broken")
    agent.send(signal.SIGHUP)
    status = await agent.wait_phase("error", path=handler / "status" / "1.status")
    message = status["status"]["formattedMessage"]["message"]
    assert message.startswith("settings 1 refused") and "invalid JSON" in message
    assert "running with the last good ones" in message
    assert substatus(status)[WEB]["status"] == "success"  # still kept current
    # A good sequence 2 heals it, and is read although ConfigSequenceNumber never changes.
    envelope = {
        "runtimeSettings": [
            {
                "handlerSettings": {
                    "publicSettings": settings_document(
                        kv, ["web", "api"], tmp_path / "certs", interval=1
                    )
                }
            }
        ]
    }
    (handler / "config" / "2.settings").write_text(json.dumps(envelope))
    agent.send(signal.SIGHUP)
    healed = await agent.wait_phase("success", path=handler / "status" / "2.status")
    assert set(substatus(healed)) == {WEB, API}


async def test_a_handler_that_cannot_start_says_why_in_its_status_file(
    kv: LocalKeyVault, tmp_path: Path, agents: list[AgentProcess]
) -> None:
    env_file = handler_with_settings(kv, tmp_path, ["web"])
    handler = env_file.parent
    (handler / "config" / "0.settings").write_text('{"runtimeSettings": [{"handlerSettings": {}}]}')
    agent = start_agent(
        agents,
        kv,
        tmp_path,
        "--handler-environment",
        str(env_file),
        env={"ConfigSequenceNumber": "0"},
    )
    code, stderr = await agent.wait_exit(30)
    assert code == 2
    assert "publicSettings" in stderr  # on stderr too, although it logs to its logFolder
    status = json.loads((handler / "status" / "0.status").read_text())[0]["status"]
    assert status["status"] == "error" and "publicSettings" in status["formattedMessage"]["message"]
