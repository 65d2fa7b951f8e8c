"""Status files in the Key Vault VM extension's format, as the Azure VM agent reads them.

The status file is a JSON array holding one object::

    [{"version": 1.0, "timestampUTC": "2026-12-03T07:00:00Z",
      "status": {"name": ..., "operation": "Enable", "status": "success", "code": 0,
                 "formattedMessage": {"lang": "en-US", "message": ...},
                 "substatus": [{"name": <url>, "status": ..., "code": ...,
                                "formattedMessage": {"lang": "en-US", "message": ...}}]}}]

with one substatus per certificate. The same object is written in plain mode (``--status-dir``)
and read back by ``kvcertsync status``; it is a report, never the only copy of anything.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import re
import secrets
import stat
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import attrs

from kvcertsync.engine import CertificateState

__all__ = [
    "FILE_LIMIT",
    "MESSAGE_LIMIT",
    "STATUS_FILE_NAME",
    "SUBSTATUS_FIELD_LIMIT",
    "TRUNCATED",
    "CertificateStatus",
    "Phase",
    "StatusReport",
    "certificates",
    "default_state_dir",
    "heartbeat_document",
    "read_status",
    "status_document",
    "summarize",
    "write_json_atomic",
]

#: The longest ``formattedMessage.message`` of the top-level status, in characters.
MESSAGE_LIMIT: Final = 1024
#: The longest field of one substatus entry, in bytes.
SUBSTATUS_FIELD_LIMIT: Final = 10 * 1024
#: The largest status file, in bytes.
FILE_LIMIT: Final = 128 * 1024
#: What marks a shortened text, as the VM agent itself marks it.
TRUNCATED: Final = " ... [TRUNCATED]"
#: The file name of the status in plain mode (handler mode writes ``<seqNo>.status``).
STATUS_FILE_NAME: Final = "status.json"

_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
# Far more than any status file kvcertsync writes (a whole one for 100,000 certificates).
_READ_LIMIT = 256 * 1024 * 1024
_LANG = "en-US"
# The one grammar of a substatus message: written here, parsed back by ``read_status``.
_MESSAGE = re.compile(
    r"^version: (?P<version>\S+); thumbprint: (?P<thumbprint>\S+); "
    r"notAfter: (?P<not_after>\S+); location: (?P<location>.*?)(?:; hook: (?P<hook>.*?))?"
    r"(?:; error: (?P<error>.*))?$"
    r"|^not installed(?:; error: (?P<pending_error>.*))?$",
    re.DOTALL,
)


class Phase(enum.Enum):
    """The status values the VM agent knows."""

    #: Not there yet: the initial sync is running (or a certificate was not polled yet).
    TRANSITIONING = "transitioning"
    #: Everything installed and current.
    SUCCESS = "success"
    #: Installed, but something failed since (the installed certificate stays in place).
    WARNING = "warning"
    #: Not installed and failing (or the initial sync used up its attempts).
    ERROR = "error"

    @property
    def code(self) -> int:
        """The status code that goes with it: 0 unless something failed."""
        return 0 if self in (Phase.TRANSITIONING, Phase.SUCCESS) else 1


@attrs.frozen
class CertificateStatus:
    """One certificate as a status file tells it."""

    #: The observed secret URL.
    name: str
    #: Where it stands.
    phase: Phase
    #: The installed version, or None when nothing is installed.
    version: str | None = None
    #: The installed certificate's SHA-1 thumbprint.
    thumbprint: str | None = None
    #: When the installed certificate expires (UTC).
    not_after: datetime | None = None
    #: Where it is installed (a file path, a Windows store).
    location: str | None = None
    #: The last poll's failure as ``Type: message``, or None.
    error: str | None = None
    #: The reload hook that ran for its last change failed: why.
    hook_error: str | None = None

    @classmethod
    def of(cls, state: CertificateState, *, hook_error: str | None = None) -> CertificateStatus:
        """The status of one certificate, from the engine's view of it (and its hooks')."""
        installed = state.installed
        if installed is None:
            phase = Phase.TRANSITIONING if state.error is None else Phase.ERROR
            return cls(str(state.uri), phase, error=state.error)
        ok = state.error is None and hook_error is None
        return cls(
            str(state.uri),
            Phase.SUCCESS if ok else Phase.WARNING,
            version=installed.version,
            thumbprint=installed.thumbprint,
            not_after=installed.not_after,
            location=installed.location,
            error=state.error,
            hook_error=hook_error,
        )

    @property
    def message(self) -> str:
        """The substatus message: version, thumbprint, notAfter and place, or the error."""
        if self.version is None or self.not_after is None:
            text = "not installed"
        else:
            text = (
                f"version: {self.version}; thumbprint: {self.thumbprint}; "
                f"notAfter: {self.not_after.strftime(_TIME_FORMAT)}; location: {self.location}"
            )
            if self.hook_error is not None:
                text = f"{text}; hook: {_one_line(self.hook_error)}"
        return text if self.error is None else f"{text}; error: {_one_line(self.error)}"

    def to_json(self) -> dict[str, Any]:
        """The substatus object, each field within the VM agent's limit."""
        return {
            "name": _clip_bytes(self.name, SUBSTATUS_FIELD_LIMIT),
            "status": self.phase.value,
            "code": self.phase.code,
            "formattedMessage": {
                "lang": _LANG,
                "message": _clip_bytes(self.message, SUBSTATUS_FIELD_LIMIT),
            },
        }

    @classmethod
    def from_json(cls, node: Any) -> CertificateStatus:
        """Read a substatus object back (one this module wrote)."""
        name = str(node.get("name", ""))
        phase = Phase(node.get("status"))
        message = str((node.get("formattedMessage") or {}).get("message", ""))
        match = _MESSAGE.match(message)
        if match is None:
            return cls(name, phase, error=message or None)
        if match["version"] is None:
            return cls(name, phase, error=match["pending_error"])
        return cls(
            name,
            phase,
            version=match["version"],
            thumbprint=match["thumbprint"],
            not_after=datetime.strptime(match["not_after"], _TIME_FORMAT).replace(tzinfo=UTC),
            location=match["location"],
            error=match["error"],
            hook_error=match["hook"],
        )


@attrs.frozen
class StatusReport:
    """The whole status: the agent's phase and message, and every certificate."""

    #: The handler's name in the status file (``kvcertsync``).
    name: str
    #: The agent's phase: the worst that applies.
    phase: Phase
    #: One line for a person, e.g. ``2 certificates installed and current``.
    message: str
    #: One entry per observed certificate, failing ones first.
    certificates: tuple[CertificateStatus, ...]
    #: When the report was made (UTC).
    timestamp: datetime = attrs.field(factory=lambda: datetime.now(UTC))
    #: The VM agent's operation name for the sequence (``Enable``).
    operation: str = "Enable"
    #: Certificates left out of the file to keep it within FILE_LIMIT.
    omitted: int = 0


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _clip(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` characters, marked when shortened."""
    return text if len(text) <= limit else text[: limit - len(TRUNCATED)] + TRUNCATED


def _clip_bytes(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` UTF-8 bytes, marked when shortened."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - len(TRUNCATED)].decode(errors="ignore") + TRUNCATED


# Failing certificates first: when the file must be cut, what needs attention stays in it.
_RANK: Final = {Phase.ERROR: 0, Phase.WARNING: 1, Phase.TRANSITIONING: 2, Phase.SUCCESS: 3}
_NEVER: Final = datetime.max.replace(tzinfo=UTC)


def _rank(status: CertificateStatus) -> tuple[int, datetime]:
    return _RANK[status.phase], status.not_after or _NEVER


def _document(report: StatusReport, substatus: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "version": 1.0,
            "timestampUTC": report.timestamp.astimezone(UTC).strftime(_TIME_FORMAT),
            "status": {
                "name": report.name,
                "operation": report.operation,
                "status": report.phase.value,
                "code": report.phase.code,
                "formattedMessage": {
                    "lang": _LANG,
                    "message": _clip(report.message, MESSAGE_LIMIT),
                },
                "substatus": substatus,
            },
        }
    ]


def _encode(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def status_document(report: StatusReport, *, limit: int | None = FILE_LIMIT) -> bytes:
    """The status file's bytes: within ``limit`` (None: whole), what needs attention first.

    Failing certificates come first, then each phase by expiry (soonest first). When every
    substatus does not fit, the last ones are left out and the message says how many (ending in
    the VM agent's own " ... [TRUNCATED]" mark).
    """
    ordered = sorted(report.certificates, key=_rank)
    if limit is None:
        return _encode(_document(report, [c.to_json() for c in ordered]))
    # Entries are encoded one by one until the room beside the longest "N more not listed"
    # message is used up: thousands of certificates cost what fits in the file, not more.
    room = limit - len(_encode(_document(_with_omitted(report, len(ordered)), [])))
    entries: list[dict[str, Any]] = []
    for certificate in ordered:
        entry = certificate.to_json()
        room -= len(_encode(entry)) + (1 if entries else 0)
        if room < 0:
            return _encode(_document(_with_omitted(report, len(ordered) - len(entries)), entries))
        entries.append(entry)
    return _encode(_document(report, entries))


def _with_omitted(report: StatusReport, omitted: int) -> StatusReport:
    note = f" ({omitted} more certificates not listed: the status file is limited to 128 KiB)"
    message = _clip(report.message, MESSAGE_LIMIT - len(note) - len(TRUNCATED)) + note + TRUNCATED
    return attrs.evolve(report, message=message, omitted=omitted)


def heartbeat_document(report: StatusReport) -> bytes:
    """The heartbeat file's bytes: the agent is up and what it is doing.

    The VM agent 2.7 reads ``status`` only; newer ones show ``formattedMessage``.
    """
    message = _clip(report.message, MESSAGE_LIMIT)
    ready = report.phase is not Phase.ERROR
    heartbeat = {
        "status": "ready" if ready else "notready",
        "code": 0 if ready else 1,
        "Message": message,
        "formattedMessage": {"lang": _LANG, "message": message},
    }
    return _encode([{"version": 1.0, "heartbeat": heartbeat}])


def read_status(path: str | os.PathLike[str]) -> StatusReport:
    """Read a status file this module wrote; ValueError names the file and what is wrong."""
    name = os.fspath(path)
    try:
        # O_NONBLOCK: a FIFO put where the status should be must not hang the reader.
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            document = json.loads(handle.read(_READ_LIMIT))
        node = document[0]
        status = node["status"]
        return StatusReport(
            name=str(status["name"]),
            phase=Phase(status["status"]),
            message=str(status["formattedMessage"]["message"]),
            certificates=tuple(CertificateStatus.from_json(s) for s in status.get("substatus", [])),
            timestamp=_parse_time(node["timestampUTC"]),
            operation=str(status.get("operation", "")),
        )
    except FileNotFoundError:
        raise ValueError(f"{name}: no status file (is kvcertsync run writing here?)") from None
    except OSError as exc:
        raise ValueError(f"{name}: cannot read: {exc.strerror or exc}") from None
    except RecursionError:
        raise ValueError(
            f"{name}: not a status file kvcertsync wrote (nested too deeply)"
        ) from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise ValueError(f"{name}: not a status file kvcertsync wrote ({exc})") from None


def _parse_time(text: str) -> datetime:
    """``timestampUTC``: ours has whole seconds; the VM agent's own has fractions."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def write_json_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` in one rename: a reader sees the old file or the new."""
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            # The mode as asked, whatever the umask (a service's UMask=0077, say).
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def default_state_dir() -> Path:
    """Where the agent keeps its status when not told: systemd's StateDirectory, else per user."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    if sys.platform == "win32":
        return Path(os.environ.get("PROGRAMDATA", r"C:\ProgramData")) / "kvcertsync"
    if os.geteuid() == 0:
        return Path("/var/lib/kvcertsync")
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state_home) / "kvcertsync"


def certificates(count: int) -> str:
    """``1 certificate``, ``2 certificates``."""
    return f"{count} certificate" if count == 1 else f"{count} certificates"


def summarize(
    states: Sequence[CertificateState], *, require_initial_sync: bool, initial_done: bool
) -> tuple[Phase, str]:
    """The agent's phase and a one-line message, from every certificate's state."""
    total = len(states)
    installed = sum(1 for s in states if s.last_success is not None)
    failing = [s for s in states if s.error is not None]
    gave_up = [s for s in failing if s.gave_up and s.last_success is None]
    if gave_up and require_initial_sync:
        first = gave_up[0]
        return Phase.ERROR, (
            f"initial sync failed: {len(gave_up)} of {total} certificates could not be "
            f"installed; {first.uri}: {first.error}"
        )
    if require_initial_sync and installed < total and not initial_done:
        return Phase.TRANSITIONING, f"initial sync: {installed} of {total} certificates installed"
    if failing:
        first = failing[0]
        return Phase.WARNING, (
            f"{len(failing)} of {total} certificates failing; {first.uri}: {first.error}"
        )
    if installed < total:
        return Phase.SUCCESS, f"{installed} of {total} certificates installed, the rest pending"
    return Phase.SUCCESS, f"{certificates(total)} installed and current"
