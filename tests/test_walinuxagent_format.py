"""Status and heartbeat documents in the extension format, judged by WALinuxAgent's own code.

Hand-written documents in the format the agent writes must pass the real parser; broken ones
must be rejected by it, which shows the check can fail. What the agent does with each file is
described in tests/walinuxagent.py. Every file of a group goes to the agent in one subprocess.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.walinuxagent import (
    HANDLER_NAME,
    MAX_STATUS_FILE_SIZE,
    MAX_STATUS_MESSAGE_LENGTH,
    MAX_SUBSTATUS_FIELD_LENGTH,
    STATUS_VALUES,
    TRUNCATED_SUFFIX,
    AgentHeartbeat,
    AgentStatus,
    Waagent,
    heartbeat_problems,
    status_problems,
    waagent_collect_heartbeats,
    waagent_collect_status,
    waagent_collect_statuses,
    waagent_fixture,  # noqa: F401  (the "waagent" fixture)
    waagent_parse_heartbeat,
    waagent_parse_status,
)

PLUGIN_SETTINGS_STATUS_INVALID = 1012  # ExtensionErrorCodes.PluginSettingsStatusInvalid


def message(text: str) -> dict[str, str]:
    return {"lang": "en-US", "message": text}


def status_document(
    status: str = "success",
    *,
    code: Any = 0,
    text: str | None = "Certificates are current.",
    substatus: list[dict[str, Any]] | None = None,
    operation: str = "Enable",
) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"name": HANDLER_NAME, "operation": operation, "status": status}
    body["code"] = code
    if text is not None:
        body["formattedMessage"] = message(text)
    if substatus is not None:
        body["substatus"] = substatus
    return [{"version": 1.0, "timestampUTC": "2026-12-03T07:00:00Z", "status": body}]


def substatus_entry(name: str, status: str = "success", code: int = 0, text: str = "ok") -> Any:
    return {"name": name, "status": status, "code": code, "formattedMessage": message(text)}


def write(path: Path, document: Any) -> Path:
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


# --- documents the agent must take ----------------------------------------------------------

ACCEPTED: dict[str, list[dict[str, Any]]] = {
    "the-format": status_document(
        "success",
        text="2 certificates installed",
        substatus=[
            substatus_entry("https://vault.vault.azure.net/secrets/web", text="installed"),
            substatus_entry("https://vault.vault.azure.net/secrets/api", text="unchanged"),
        ],
    ),
    **{
        f"status-{value}": status_document(
            value,
            code=0 if value == "success" else 1,
            substatus=[substatus_entry("cert", status=value, code=7, text=f"cert is {value}")],
        )
        for value in STATUS_VALUES
    },
    "no-substatus-key": status_document("transitioning", text="starting"),
    "null-substatus": status_document("success", substatus=None),
    "empty-substatus": status_document("success", substatus=[]),
    "no-formatted-message": status_document("success", text=None, substatus=[]),
    "minimal-substatus": status_document("warning", substatus=[{"status": "error"}]),
    "non-ascii": status_document("error", code=3, text="Zertifikat ungültig — 証明書 ✗"),
}
ACCEPTED["null-substatus"][0]["status"]["substatus"] = None  # some extensions write null


@pytest.fixture(scope="module")
def accepted_results(waagent: Waagent, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("accepted")
    paths = [write(folder / f"{name}.json", doc) for name, doc in ACCEPTED.items()]
    return dict(zip(ACCEPTED, waagent_collect_statuses(paths), strict=True))


def expected_reading(document: list[dict[str, Any]]) -> dict[str, Any]:
    """Our reading of the format: the fields the agent should report back."""
    body = document[0]["status"]
    return {
        "status": body["status"],
        "code": body.get("code", 0),
        "operation": body.get("operation"),
        "message": (body.get("formattedMessage") or {}).get("message"),
        "substatus": [
            {
                "name": entry.get("name"),
                "status": entry["status"],
                "code": entry.get("code", 0),
                "message": (entry.get("formattedMessage") or {}).get("message"),
            }
            for entry in body.get("substatus") or []
        ],
    }


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_agent_takes_documents_in_the_format(name: str, accepted_results: Any) -> None:
    result: AgentStatus = accepted_results[name]
    assert status_problems(result) == []
    got = {key: result.get(key) for key in ("status", "code", "operation", "message")}
    got["substatus"] = result.get("substatus")
    assert got == expected_reading(ACCEPTED[name])
    assert result.get("name") == HANDLER_NAME
    # What the agent would send on: same fields, messages re-labelled en-US.
    v1 = result.get("v1")
    assert v1 is not None
    assert v1["status"]["status"] == result.get("status")
    assert v1["status"]["formattedMessage"] == message(result.get("message"))  # type: ignore[arg-type]


def test_terminal_statuses_end_the_agents_wait(accepted_results: Any) -> None:
    complete = {
        value: accepted_results[f"status-{value}"].get("complete") for value in STATUS_VALUES
    }
    assert complete == {"transitioning": False, "warning": False, "error": True, "success": True}


def test_the_strict_helper_returns_the_agents_reading(tmp_path: Path) -> None:
    doc = ACCEPTED["the-format"]
    result = waagent_parse_status(write(tmp_path / "7.status", doc))
    assert result.get("sequenceNumber") == 7  # taken from the <seq>.status file name
    assert result.get("substatus") == expected_reading(doc)["substatus"]


def test_no_status_file_yet_is_reported_as_transitioning(waagent: Waagent) -> None:
    result = waagent_collect_status(None)
    assert (result.get("status"), result.get("code"), result.get("complete")) == (
        "transitioning",
        0,
        False,
    )
    assert "no status file was reported" in str(result.get("message"))


# --- documents the agent must refuse --------------------------------------------------------


def with_body(**changes: Any) -> list[dict[str, Any]]:
    doc = status_document(substatus=[substatus_entry("cert")])
    for key, value in changes.items():
        if value is None:
            del doc[0]["status"][key]
        else:
            doc[0]["status"][key] = value
    return doc


def encoded(document: Any) -> bytes:
    return json.dumps(document).encode()


GOOD = encoded(status_document(substatus=[substatus_entry("cert")]))
MALFORMED = ("error", PLUGIN_SETTINGS_STATUS_INVALID)
# id -> (file content, the agent's words, (status, code) the agent reports instead or None)
REJECTED: dict[str, tuple[bytes, str, tuple[str, int] | None]] = {
    "object-not-array": (
        encoded(status_document()[0]),
        "The extension status must be an array",
        MALFORMED,
    ),
    "no-status-object": (encoded([{"version": 1.0}]), "Missing status key", MALFORMED),
    "no-status-value": (encoded(with_body(status=None)), "Missing status/status key", MALFORMED),
    "message-without-lang": (
        encoded(with_body(formattedMessage={"message": "x"})),
        "Missing formattedMessage/lang key",
        MALFORMED,
    ),
    "message-without-text": (
        encoded(with_body(formattedMessage={"lang": "en-US"})),
        "Missing formattedMessage/message key",
        MALFORMED,
    ),
    "message-as-string": (
        encoded(with_body(formattedMessage="x")),
        "Missing formattedMessage/lang key",
        MALFORMED,
    ),
    "substatus-bad-value": (
        encoded(with_body(substatus=[substatus_entry("cert", status="ok")])),
        "Invalid value ok in range ['transitioning', 'warning', 'error', 'success'] "
        "at the node substatus/status",
        MALFORMED,
    ),
    "substatus-capitalised": (
        encoded(with_body(substatus=[substatus_entry("cert", status="Success")])),
        "Invalid value Success in range",
        MALFORMED,
    ),
    "substatus-without-status": (
        encoded(with_body(substatus=[{"name": "cert", "code": 0}])),
        "Missing substatus/status key",
        MALFORMED,
    ),
    "substatus-message-without-lang": (
        encoded(with_body(substatus=[{"status": "success", "formattedMessage": {"message": ""}}])),
        "Missing formattedMessage/lang key",
        MALFORMED,
    ),
    "truncated-write": (GOOD[: len(GOOD) // 2], "could not parse it correctly", MALFORMED),
    "utf8-bom": (b"\xef\xbb\xbf" + GOOD, "Unexpected UTF-8 BOM", MALFORMED),
    "status-capitalised": (
        encoded(with_body(status="Success")),
        "status/status 'Success' is not one of",
        ("error", 0),
    ),
    "status-unknown": (
        encoded(with_body(status="ready")),
        "status/status 'ready' is not one of",
        ("error", 0),
    ),
    "empty-array": (b"[]", "found no status", None),
    "null": (b"null", "found no status", None),
    "invalid-utf8": (GOOD.replace(b"Certificates", b"Certificat\xe9s"), "UnicodeDecodeError", None),
}


@pytest.fixture(scope="module")
def rejected_results(waagent: Waagent, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("rejected")
    paths = []
    for name, (content, _, _) in REJECTED.items():
        path = folder / f"{name}.status"
        path.write_bytes(content)
        paths.append(path)
    return dict(zip(REJECTED, waagent_collect_statuses(paths, seq_no=0), strict=True))


@pytest.mark.parametrize("name", list(REJECTED))
def test_agent_refuses_broken_documents(name: str, rejected_results: Any) -> None:
    _, words, reported = REJECTED[name]
    result: AgentStatus = rejected_results[name]
    problems = "\n".join(status_problems(result))
    assert words in problems
    if reported is not None:
        assert (result.get("status"), result.get("code")) == reported


def test_the_strict_helper_raises_with_the_agents_words(tmp_path: Path) -> None:
    path = tmp_path / "0.status"
    path.write_bytes(REJECTED["substatus-bad-value"][0])
    with pytest.raises(AssertionError, match=r"Invalid value ok in range .* substatus/status"):
        waagent_parse_status(path)


def test_invalid_utf8_escapes_the_agents_status_collection(rejected_results: Any) -> None:
    # Not an ExtensionError: it would break the agent's whole status report for the handler.
    assert "UnicodeDecodeError" in str(rejected_results["invalid-utf8"].get("exception"))


# --- the size limit -------------------------------------------------------------------------


def sized(length: int, *, pad: str = "x", text: str | None = "done") -> str:
    """A status file of exactly ``length`` characters, padded in one substatus message."""
    doc = status_document(text=text, substatus=[substatus_entry("cert", text="")])
    bare = json.dumps(doc, ensure_ascii=False)
    assert length > len(bare)
    doc[0]["status"]["substatus"][0]["formattedMessage"]["message"] = pad * (length - len(bare))
    out = json.dumps(doc, ensure_ascii=False)
    assert len(out) == length
    return out


def truncated(field: str, limit: int) -> str:
    """WALinuxAgent's ``_truncate_message``."""
    return field if len(field) < limit else field[:limit] + TRUNCATED_SUFFIX


def many_substatus(count: int = 20) -> list[dict[str, Any]]:
    entries = [substatus_entry(f"cert-{i:02}", text=chr(ord("a") + i) * 8000) for i in range(count)]
    entries[0]["formattedMessage"]["message"] = "A" * 12000  # over the 10 KiB field limit
    return entries


SIZED: dict[str, str] = {
    "at-limit": sized(MAX_STATUS_FILE_SIZE),
    "one-over": sized(MAX_STATUS_FILE_SIZE + 1),
    # 131072 characters, but 196000-odd bytes: the agent measures characters.
    "non-ascii-at-limit": sized(MAX_STATUS_FILE_SIZE, pad="é"),
    "many-substatus": json.dumps(
        status_document("warning", code=2, text="M" * 2000, substatus=many_substatus())
    ),
    "oversized-without-message": sized(MAX_STATUS_FILE_SIZE + 1, text=None),
}


@pytest.fixture(scope="module")
def sized_results(waagent: Waagent, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("sized")
    paths = []
    for name, text in SIZED.items():
        path = folder / f"{name}.status"
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return dict(zip(SIZED, waagent_collect_statuses(paths), strict=True))


def test_a_file_at_the_size_limit_is_taken_whole(sized_results: Any) -> None:
    for name in ("at-limit", "non-ascii-at-limit"):
        result = sized_results[name]
        assert status_problems(result) == [], name
        assert len(result["substatus"][0]["message"]) > MAX_SUBSTATUS_FIELD_LENGTH  # untouched
    assert len(SIZED["non-ascii-at-limit"].encode()) > MAX_STATUS_FILE_SIZE


def test_one_character_over_the_limit_truncates_messages(sized_results: Any) -> None:
    result = sized_results["one-over"]
    too_big = (
        f"of size {MAX_STATUS_FILE_SIZE + 1} bytes is too big. "
        f"Max Limit allowed is {MAX_STATUS_FILE_SIZE} bytes"
    )
    assert any(too_big in warning for warning in result["warnings"])
    # Status and code stand; the substatus message is cut to 10 KiB plus the suffix.
    assert (result["status"], result["code"], result["message"]) == ("success", 0, "done")
    padded = json.loads(SIZED["one-over"])[0]["status"]["substatus"][0]["formattedMessage"]
    assert result["substatus"] == [
        {
            "name": "cert",
            "status": "success",
            "code": 0,
            "message": truncated(padded["message"], MAX_SUBSTATUS_FIELD_LENGTH),
        }
    ]
    assert result["substatus"][0]["message"].endswith(" ... [TRUNCATED]")


def test_an_oversized_file_loses_trailing_substatus_entries(sized_results: Any) -> None:
    result = sized_results["many-substatus"]
    assert any("is too big" in warning for warning in result["warnings"])
    assert (result["status"], result["code"]) == ("warning", 2)
    assert result["message"] == "M" * MAX_STATUS_MESSAGE_LENGTH + TRUNCATED_SUFFIX
    # Kept while the running total of message and substatus name/message lengths <= 128 KiB.
    size, kept = len(result["message"]), []
    for entry in many_substatus():
        name = truncated(entry["name"], MAX_SUBSTATUS_FIELD_LENGTH)
        text = truncated(entry["formattedMessage"]["message"], MAX_SUBSTATUS_FIELD_LENGTH)
        size += len(name) + len(text)
        if size > MAX_STATUS_FILE_SIZE:
            break
        kept.append({"name": name, "status": "success", "code": 0, "message": text})
    assert result["substatus"] == kept
    assert 0 < len(kept) < 20


def test_an_oversized_file_without_a_message_crashes_the_agent(sized_results: Any) -> None:
    # _truncate_message(None) returns None, which collect_ext_status unpacks: our files must
    # stay under the limit or always carry formattedMessage (status and every substatus).
    assert "TypeError" in str(sized_results["oversized-without-message"].get("exception"))


# --- heartbeat ------------------------------------------------------------------------------

HEARTBEAT = [{"version": 1.0, "heartbeat": {"status": "ready", "code": 0, "Message": "running"}}]
# id -> (content, age in seconds, expected collect_heartbeat outcome)
HEARTBEATS: dict[str, tuple[bytes | None, int, dict[str, Any]]] = {
    "the-format": (
        encoded(HEARTBEAT),
        0,
        {"heartbeat": HEARTBEAT[0]["heartbeat"], "handler_status": "ready"},
    ),
    "status-only": (
        encoded([{"heartbeat": {"status": "notready"}}]),
        0,
        {"heartbeat": {"status": "notready"}, "handler_status": "notready"},
    ),
    "ten-minutes-old": (encoded(HEARTBEAT), 590, {"handler_status": "ready"}),
    "stale": (
        encoded(HEARTBEAT),
        601,
        {
            "heartbeat": {
                "status": "Unresponsive",
                "code": -1,
                "message": "Extension heartbeat is not responsive",
            },
            "handler_status": "Unresponsive",
        },
    ),
    "missing": (None, 0, {"error": "Failed to get heart beat file"}),
    "not-json": (b'[{"heartbeat": ', 0, {"error": "Malformed heartbeat file: "}),
    "no-heartbeat-key": (
        encoded([HEARTBEAT[0]["heartbeat"]]),
        0,
        {"error": "Malformed heartbeat file: 'heartbeat'"},
    ),
    "object-not-array": (encoded(HEARTBEAT[0]), 0, {"error": "Malformed heartbeat file: 0"}),
    "empty-array": (b"[]", 0, {"exception": "IndexError"}),
    "heartbeat-not-object": (encoded([{"heartbeat": "ready"}]), 0, {"exception": "AttributeError"}),
}


@pytest.fixture(scope="module")
def heartbeat_results(waagent: Waagent, tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder = tmp_path_factory.mktemp("heartbeat")
    paths: list[Path | None] = []
    now = time.time()
    for name, (content, age, _) in HEARTBEATS.items():
        if content is None:
            paths.append(None)
            continue
        path = folder / f"{name}.log"
        path.write_bytes(content)
        os.utime(path, (now - age, now - age))
        paths.append(path)
    return dict(zip(HEARTBEATS, waagent_collect_heartbeats(paths), strict=True))


@pytest.mark.parametrize("name", list(HEARTBEATS))
def test_agent_reads_heartbeat_files(name: str, heartbeat_results: Any) -> None:
    result: AgentHeartbeat = heartbeat_results[name]
    for key, want in HEARTBEATS[name][2].items():
        got = result.get(key)
        if key in ("error", "exception"):
            assert want in str(got), f"{key}: {got}"
        else:
            assert got == want, key
    clean = name in ("the-format", "status-only", "ten-minutes-old")
    assert (heartbeat_problems(result) == []) == clean, heartbeat_problems(result)


def test_the_strict_heartbeat_helper(tmp_path: Path) -> None:
    assert waagent_parse_heartbeat(write(tmp_path / "heartbeat.log", HEARTBEAT)) == {
        "status": "ready",
        "code": 0,
        "Message": "running",
    }
    bad = write(tmp_path / "bad.log", [HEARTBEAT[0]["heartbeat"]])
    with pytest.raises(AssertionError, match="Malformed heartbeat file"):
        waagent_parse_heartbeat(bad)


# --- the agent itself -----------------------------------------------------------------------


def test_the_agent_is_debians_walinuxagent_with_the_documented_limits(waagent: Waagent) -> None:
    assert waagent.packages["waagent"].startswith(waagent.agent_version)
    source = waagent.exthandlers.read_text(encoding="utf-8")
    for line in (
        "_MAX_STATUS_FILE_SIZE_IN_BYTES = 128 * 1024",
        "_MAX_STATUS_MESSAGE_LENGTH = 1024",
        "_MAX_SUBSTATUS_FIELD_LENGTH = 10 * 1024",
        '_TRUNCATED_SUFFIX = u" ... [TRUNCATED]"',
        "STRINGS = ['transitioning', 'warning', 'error', 'success']",
        "heartbeat = json.loads(heartbeat_json)[0]['heartbeat']",
        "return last_update <= 600",
    ):
        assert line in source, line
