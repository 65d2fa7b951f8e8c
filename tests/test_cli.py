"""The command line as people use it: check, the emulator's copy-paste path, service, examples."""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kvcertsync.agent.cli import absolute_run_args

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def kvcertsync(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "kvcertsync", *args],
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def exists(kind: str, name: str) -> bool:
    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(name)
    except KeyError:
        return False
    return True


def test_check_shows_where_each_certificate_goes_on_linux() -> None:
    result = kvcertsync("check", str(EXAMPLES / "settings-linux.json"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    app1 = "/var/lib/waagent/Microsoft.Azure.KeyVault/app1"
    assert f"installs to: {app1}/demo.web-tls.<version>" in out
    assert f"configure:   {app1}/web" in out  # the customSymbolicLinkName nginx.conf names
    assert "requireInitialSync true" in out
    assert "user-assigned 00001111-aaaa-2222-bbbb-3333cccc4444 (msiClientId)" in out
    assert "user www-data and group ssl-cert (applied)" in out
    assert "loggingSettings: not honoured" in out
    assert "LocalMachine" not in out  # nothing goes to a Windows store on Linux
    for kind, name in (("user", "www-data"), ("group", "ssl-cert")):
        warned = f"{kind} {name!r} does not exist on this machine" in out
        assert warned == (not exists(kind, name))


def test_check_warns_about_acl_users_that_do_not_exist(tmp_path: Path) -> None:
    document = json.loads((EXAMPLES / "settings-linux.json").read_text())
    certs = document["secretsManagementSettings"]["observedCertificates"]
    certs[0]["acls"] = [{"user": "no-such-user-kvcertsync"}, {"group": "no-such-group-kv"}]
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(document))
    result = kvcertsync("check", str(settings))
    assert result.returncode == 0
    assert (
        "warning: observedCertificates[0].acls: user 'no-such-user-kvcertsync' does not exist "
        "on this machine"
    ) in result.stdout
    assert "group 'no-such-group-kv' does not exist" in result.stdout


def test_check_describes_a_windows_vm_from_linux() -> None:
    result = kvcertsync("check", str(EXAMPLES / "settings.json"), "--store", "windows")
    assert result.returncode == 0, result.stderr
    assert "linkOnRenewal true" in result.stdout
    assert "installs to: LocalMachine\\MY (Windows certificate store)" in result.stdout
    assert "key readers: Network Service, Local Service" in result.stdout


def test_check_names_the_file_and_json_path_of_an_error(tmp_path: Path) -> None:
    settings = tmp_path / "bad.json"
    settings.write_text('{"secretsManagementSettings": {"observedCertificates": [42]}}')
    result = kvcertsync("check", str(settings))
    assert result.returncode == 1
    assert "observedCertificates[0]" in result.stderr and str(settings) in result.stderr


def test_a_newcomer_goes_from_the_emulator_to_run_by_copy_and_paste(tmp_path: Path) -> None:
    emulator = subprocess.Popen(
        [sys.executable, "-m", "kvcertsync", "emulator", "--vault", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines: list[str] = []
        assert emulator.stdout is not None
        for line in emulator.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("ready"):
                break
        endpoint = next(line for line in lines if line.startswith("msiEndpoint: ")).split()[1]
        run_with = next(line for line in lines if line.startswith("run with: "))
        settings = tmp_path / "settings.json"
        settings.write_text(
            json.dumps(
                {
                    "secretsManagementSettings": {
                        "observedCertificates": [
                            {
                                "url": "https://demo.vault.azure.net/secrets/demo-cert",
                                "certificateStoreLocation": str(tmp_path / "certs"),
                            }
                        ]
                    },
                    "authenticationSettings": {"msiEndpoint": endpoint},
                }
            )
        )
        # Exactly what a person pastes: the command, their file, the line's options.
        command = f"{sys.executable} -m kvcertsync run {settings} --once " + run_with[10:]
        result = subprocess.run(
            command,
            shell=True,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "STATE_DIRECTORY": str(tmp_path / "state")},
        )
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "certs" / "demo.demo-cert").is_symlink()
    finally:
        emulator.send_signal(signal.SIGINT)
        emulator.communicate(timeout=30)


def test_service_commands_say_what_to_do_off_windows(tmp_path: Path) -> None:
    result = kvcertsync("service", "install", "--", str(tmp_path / "settings.json"))
    assert result.returncode == 1
    assert "manages a Windows service" in result.stderr and "systemd" in result.stderr
    named = kvcertsync("service", "stop", "--name", "kv2")
    assert named.returncode == 1 and "'kvcertsync service stop'" in named.stderr


def test_service_install_stores_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    args = absolute_run_args(
        ["settings.json", "--log-file=logs/k.log", "--status-dir", "st", "--log-format", "json"]
    )
    assert args == [
        str(tmp_path / "settings.json"),
        f"--log-file={tmp_path / 'logs' / 'k.log'}",
        "--status-dir",
        str(tmp_path / "st"),
        "--log-format",
        "json",
    ]
    with pytest.raises(SystemExit):
        absolute_run_args(["--log-format", "xml"])


def test_the_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (EXAMPLES / "systemd" / "kvcertsync.service").read_text()
    here = shutil.which("kvcertsync") or str(Path(sys.executable).parent / "kvcertsync")
    (tmp_path / "kvcertsync.service").write_text(
        unit.replace("/opt/kvcertsync/bin/kvcertsync", here)
    )
    verify = subprocess.run(
        [analyze, "verify", str(tmp_path / "kvcertsync.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verify.returncode == 0, verify.stderr
    assert "Unknown" not in verify.stderr and "ignoring" not in verify.stderr, verify.stderr
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes"):
        assert line in unit
    security = subprocess.run(
        [analyze, "security", "--offline=true", str(tmp_path / "kvcertsync.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if security.returncode == 0 or "exposure level" in security.stdout:
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
        assert match is not None, security.stdout
        assert float(match[1]) <= 2.0
    drop_in = (EXAMPLES / "systemd" / "nginx-after-kvcertsync.conf").read_text()
    assert "Requires=kvcertsync.service" in drop_in and "After=kvcertsync.service" in drop_in


def test_the_containers_commands_run_as_written(tmp_path: Path) -> None:
    """The Dockerfile's ENTRYPOINT + CMD and HEALTHCHECK, run here with its paths mapped."""
    dockerfile = (EXAMPLES / "container" / "Dockerfile").read_text()

    def instruction(name: str) -> list[str]:
        match = re.search(rf"^{name} (?:--\S+ )*(?:CMD )?(\[.*\])$", dockerfile, re.MULTILINE)
        assert match is not None, name
        words: list[str] = json.loads(match[1])
        return words

    paths = {
        "/certs": str(tmp_path / "certs"),
        "/var/lib/kvcertsync": str(tmp_path / "state"),
        "/etc/kvcertsync/settings.json": str(tmp_path / "settings.json"),
    }

    def mapped(words: list[str]) -> list[str]:
        out = []
        for word in words:
            for path in sorted(paths, key=len, reverse=True):
                word = word.replace(path, paths[path])
            out.append(word)
        return out

    entry = mapped(instruction("ENTRYPOINT") + instruction("CMD"))
    health = mapped(instruction("HEALTHCHECK"))
    assert f"pem:{tmp_path / 'certs'}" in entry  # nothing lands outside tmp_path
    assert entry[:2] == ["kvcertsync", "run"] and health[:2] == ["kvcertsync", "status"]
    code = (
        "import asyncio, json, subprocess, sys\n"
        "from kvcertsync.emulator import LocalKeyVault\n"
        "async def main():\n"
        "    async with LocalKeyVault() as kv:\n"
        "        kv.import_certificate('demo', 'web', kv.authority.issue(['web.example']))\n"
        "        (pattern, target), = kv.redirect.items()\n"
        "        settings = {'secretsManagementSettings': {'observedCertificates': [\n"
        "            'https://demo.vault.azure.net/secrets/web']},\n"
        "            'authenticationSettings': {'msiEndpoint': kv.imds_endpoint}}\n"
        f"        open({str(tmp_path / 'settings.json')!r}, 'w').write(json.dumps(settings))\n"
        "        extra = ['--once', '--ca-file', kv.ca_file, '--redirect', f'{pattern}={target}']\n"
        "        run = await asyncio.create_subprocess_exec(\n"
        "            sys.executable, '-m', 'kvcertsync', *sys.argv[1:], *extra)\n"
        "        sys.exit(await run.wait())\n"
        "asyncio.run(main())\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", code, *entry[1:]], capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "certs" / "demo.web").is_symlink()
    healthy = kvcertsync(*health[1:])
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert "one pass done; 1 certificate installed and current" in healthy.stdout


def test_output_into_a_closed_pipe_is_no_traceback() -> None:
    script = Path(sys.executable).with_name("kvcertsync")
    command = f"{script} check {EXAMPLES / 'settings-linux.json'} | head -1"
    result = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    assert result.stdout.endswith("valid\n") and "Traceback" not in result.stderr


def test_status_from_the_future_is_suspect(tmp_path: Path) -> None:
    from kvcertsync.agent.status import Phase, StatusReport, status_document, write_json_atomic

    later = datetime.now(UTC) + timedelta(days=30)
    report = StatusReport("kvcertsync", Phase.SUCCESS, "ok", (), timestamp=later)
    write_json_atomic(tmp_path / "status.json", status_document(report))
    result = kvcertsync("status", "--status-dir", str(tmp_path))
    assert result.returncode == 1
    assert "in the future" in result.stdout and "stale" in result.stdout
