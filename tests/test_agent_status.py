"""The status writer: the phases, limits and read-back, and every file judged by WALinuxAgent."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from kvcertsync.agent.status import (
    FILE_LIMIT,
    MESSAGE_LIMIT,
    TRUNCATED,
    CertificateStatus,
    Phase,
    StatusReport,
    heartbeat_document,
    read_status,
    status_document,
    summarize,
    write_json_atomic,
)
from kvcertsync.engine import CertificateState
from kvcertsync.settings import ObservedCertificate
from kvcertsync.stores.base import InstalledCertificate
from tests.walinuxagent import (
    Waagent,
    waagent_collect_heartbeats,
    waagent_collect_statuses,
    waagent_fixture,  # noqa: F401  (the "waagent" fixture)
)

NOT_AFTER = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


def state(
    name: str,
    *,
    installed: bool = True,
    error: str | None = None,
    gave_up: bool = False,
    succeeded: bool | None = None,
) -> CertificateState:
    observed = ObservedCertificate.of(f"https://demo.vault.azure.net/secrets/{name}")
    record = (
        InstalledCertificate(
            observed.uri, "a" * 32, "B" * 40, NOT_AFTER, f"/var/lib/certs/demo.{name}"
        )
        if installed
        else None
    )
    success = installed if succeeded is None else succeeded
    return CertificateState(
        observed=observed,
        installed=record,
        current=installed and error is None,
        failures=1 if error else 0,
        error=error,
        gave_up=gave_up,
        last_success=datetime.now(UTC) if success else None,
    )


def report_of(*states: CertificateState, require: bool = True, done: bool = True) -> StatusReport:
    phase, message = summarize(states, require_initial_sync=require, initial_done=done)
    return StatusReport(
        name="Microsoft.Azure.KeyVault.KeyVaultForLinux",
        phase=phase,
        message=message,
        certificates=tuple(CertificateStatus.of(s) for s in states),
    )


def test_phases_follow_the_extensions_rules() -> None:
    pending = state("a", installed=False)
    assert report_of(pending, done=False).phase is Phase.TRANSITIONING
    # Without requireInitialSync the extension reports success once it runs.
    assert report_of(pending, require=False, done=False).phase is Phase.SUCCESS
    failing = state("a", installed=False, error="AccessDenied: no", gave_up=True)
    assert report_of(failing).phase is Phase.ERROR
    assert report_of(state("a"), state("b", error="TransientSourceError: 503")).phase is (
        Phase.WARNING
    )
    assert report_of(state("a"), state("b")).phase is Phase.SUCCESS
    assert Phase.ERROR.code == 1 and Phase.SUCCESS.code == 0


def test_status_reads_back_what_it_wrote(tmp_path: Path) -> None:
    report = report_of(state("ok"), state("bad", error="AccessDenied: 403; odd: text"))
    path = tmp_path / "status.json"
    write_json_atomic(path, status_document(report))
    again = read_status(path)
    assert again.phase is Phase.WARNING and again.message == report.message
    by_name = {c.name: c for c in again.certificates}
    ok = by_name["https://demo.vault.azure.net/secrets/ok"]
    assert (ok.version, ok.thumbprint, ok.not_after) == ("a" * 32, "B" * 40, NOT_AFTER)
    assert ok.location == "/var/lib/certs/demo.ok" and ok.error is None
    assert by_name["https://demo.vault.azure.net/secrets/bad"].error == (
        "AccessDenied: 403; odd: text"
    )
    # Failing certificates come first: a cut file keeps what needs attention.
    assert again.certificates[0].name.endswith("/bad")


def test_read_status_names_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no status file"):
        read_status(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("[1]")
    with pytest.raises(ValueError, match=r"x\.json: not a status file"):
        read_status(tmp_path / "x.json")


def big_report() -> StatusReport:
    states = [state(f"cert-{i:05}") for i in range(3000)]
    states.append(state("broken", error="TransientSourceError: " + "x" * 20000))
    return report_of(*states)


def test_the_file_stays_within_the_agents_limits() -> None:
    data = status_document(big_report())
    assert len(data) <= FILE_LIMIT
    node = json.loads(data)[0]["status"]
    assert len(node["formattedMessage"]["message"]) <= MESSAGE_LIMIT
    assert node["formattedMessage"]["message"].endswith(TRUNCATED)
    assert "more certificates not listed" in node["formattedMessage"]["message"]
    first = node["substatus"][0]
    assert first["name"].endswith("/broken")  # the failing one survives the cut
    assert len(first["formattedMessage"]["message"].encode()) <= 10 * 1024
    assert first["formattedMessage"]["message"].endswith(TRUNCATED)


def test_documents_pass_walinuxagent(waagent: Waagent, tmp_path: Path) -> None:
    reports = {
        "transitioning": report_of(state("a", installed=False), done=False),
        "success": report_of(state("a"), state("b")),
        "warning": report_of(state("a"), state("b", error="SourceError: ünïcode ✓")),
        "error": report_of(state("a", installed=False, error="AccessDenied: x", gave_up=True)),
        "big": big_report(),
    }
    paths = []
    for index, report in enumerate(reports.values()):
        path = tmp_path / f"{index}.status"
        write_json_atomic(path, status_document(report))
        paths.append(path)
    results = waagent_collect_statuses(paths)
    for (label, report), result, path in zip(reports.items(), results, paths, strict=True):
        assert not result.get("warnings") and not result.get("exception"), (label, result)
        assert result["status"] == report.phase.value, label
        assert result["code"] == report.phase.code
        assert len(result["substatus"]) == len(
            json.loads(path.read_bytes())[0]["status"]["substatus"]
        )
    heartbeat = tmp_path / "heartbeat.log"
    write_json_atomic(heartbeat, heartbeat_document(reports["success"]))
    (seen,) = waagent_collect_heartbeats([heartbeat])
    assert not seen.get("error") and seen["heartbeat"]["status"] == "ready"


def test_a_cut_file_keeps_what_expires_soonest() -> None:
    states = [state(f"cert-{i:05}") for i in range(3000)]
    soon = CertificateState(
        observed=ObservedCertificate.of("https://demo.vault.azure.net/secrets/soon"),
        installed=InstalledCertificate(
            ObservedCertificate.of("https://demo.vault.azure.net/secrets/soon").uri,
            "c" * 32,
            "D" * 40,
            datetime.now(UTC),
            "/var/lib/certs/demo.soon",
        ),
        current=True,
        failures=0,
        error=None,
        gave_up=False,
        last_success=datetime.now(UTC),
    )
    report = report_of(*states, soon)
    cut = json.loads(status_document(report))[0]["status"]["substatus"]
    assert len(cut) < 3001 and cut[0]["name"].endswith("/soon")
    whole = json.loads(status_document(report, limit=None))[0]["status"]["substatus"]
    assert len(whole) == 3001  # the plain file for `kvcertsync status` is never cut


def test_heartbeat_is_ready_with_code_0_while_only_warning() -> None:
    warning = report_of(state("a"), state("b", error="TransientSourceError: 503"))
    heartbeat = json.loads(heartbeat_document(warning))[0]["heartbeat"]
    assert (heartbeat["status"], heartbeat["code"]) == ("ready", 0)


def test_heartbeat_says_notready_on_error() -> None:
    failing = report_of(state("a", installed=False, error="AccessDenied: x", gave_up=True))
    heartbeat = json.loads(heartbeat_document(failing))[0]["heartbeat"]
    assert heartbeat["status"] == "notready" and heartbeat["code"] == 1
    assert heartbeat["Message"] == heartbeat["formattedMessage"]["message"]
