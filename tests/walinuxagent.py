"""Feed status and heartbeat files to the Azure Linux agent's own code (WALinuxAgent).

The Azure VM agent, not our reading of its format, is the judge of the files that the
extension writes. This module fetches WALinuxAgent from Debian's ``waagent`` package and runs
its real reading code on a file in a subprocess, returning what the agent made of it.

How the agent is obtained
-------------------------
Debian 12 (bookworm) ships ``waagent 2.7.3.0-4.1`` (``Architecture: all``; ``Depends:
python3-distro, python3:any, python3-pkg-resources, ca-certificates, openssl``; conflicts with
``network-manager``). Installing it is not an option for a test: its postinst creates
``/var/lib/waagent``, enables ``walinuxagent.service`` and starts it, and it would remove
network-manager. So the package is only downloaded and unpacked::

    apt-get download waagent python3-distro      # about 230 kB, under a second
    dpkg-deb -x waagent_2.7.3.0-4.1_all.deb tree
    dpkg-deb -x python3-distro_1.8.0-1_all.deb tree

into a cache directory (``/tmp/kvcertsync-waagent``, or ``$KVCERTSYNC_WAAGENT_DIR``), kept
across sessions; delete it to fetch again. The Python code lands in
``tree/usr/lib/python3/dist-packages/azurelinuxagent`` (egg-info ``WALinuxAgent-2.7.3.0``;
``azurelinuxagent.common.version.AGENT_VERSION == "2.7.3.0"``).

``apt-get download`` needs the apt lists (``apt-get update``) but changes nothing on the
system. When it cannot work (no apt, no lists, no network), every test that needs the agent is
skipped with the reason; ``KVCERTSYNC_REQUIRE_WAAGENT=1`` turns that skip into a failure.

Importing ``azurelinuxagent.ga.exthandlers`` needs the ``distro`` module:
``azurelinuxagent.common.version`` calls ``get_distro()`` at import time, which on Python >= 3.8
goes through ``distro.linux_distribution`` (``common/future.py``); without ``distro`` the import
dies with ``NameError: name 'distro' is not defined``. Debian's ``python3-distro`` (1.8.0, pure
Python) is unpacked beside the agent, so nothing has to be installed in the venv. With both
dist-packages directories first on ``sys.path`` the agent imports under the venv's Python 3.11
(pyenv 3.11.7) as well as under Debian's ``/usr/bin/python3`` (3.11.2); the venv's Python is
tried first, Debian's second (``$KVCERTSYNC_WAAGENT_PYTHON`` overrides). Other imports are from
the standard library; note ``from distutils.version import LooseVersion`` in
``ga/exthandlers.py``, so Python >= 3.12 needs setuptools' distutils shim. The import only warns
(``DeprecationWarning``: ``crypt``, ``distutils``). Nothing in ``azurelinuxagent`` imports
``pkg_resources`` (``python3-pkg-resources``).

The agent code runs in a subprocess (``python -I -c SCRIPT``) with ``conf.__conf__.values``
pointing ``Lib.Dir`` and ``Extension.LogDir`` into a temporary directory and the event logger at
a temporary events directory, so nothing under ``/var/lib/waagent`` or ``/var/log`` is touched
and the agent's module-level state (logger, config, distro probe) stays out of pytest. The
agent's own warnings are captured with a ``logger.AppenderType.TELEMETRY`` appender on
``logger.DEFAULT_LOGGER``: they are the agent's own error texts.

What the agent does with a status file (``azurelinuxagent/ga/exthandlers.py``, 2.7.3.0;
identical in upstream 2.15.0.1)
------------------------------------------------------------------------------------------
* Path: ``ExtHandlerInstance.get_status_file_path(ext)`` ->
  ``<Lib.Dir>/<HandlerName>-<version>/status/<seq>.status`` for a single-config handler
  (``<extName>.<seq>.status`` for multi-config), ``<seq>`` the settings' sequence number.
* ``collect_ext_status(ext)``:

  1. ``_read_status_file`` -> ``_read_and_parse_json_status_file``: ``fileutil.read_file``
     (strict UTF-8 decode, no BOM removal), then ``json.loads``. Any exception is retried
     ``_NUM_OF_STATUS_FILE_RETRIES = 5`` times, ``_STATUS_FILE_RETRY_DELAY = 2`` s apart (the
     subprocess sets the delay to 0 so tests stay fast). ``ExtensionStatusError`` codes:
     ``FileNotExists`` (5) -> the agent reports ``transitioning``, code 0, "This status is being
     reported by the Guest Agent since no status file was reported by extension ...";
     ``InvalidJsonFile`` (2, also for a UTF-8 BOM) and ``CouldNotReadStatusFile`` (1) -> ``error``
     with code ``PluginSettingsStatusInvalid`` (1012) resp. ``PluginUnknownFailure`` (-1).
     Invalid UTF-8 raises ``UnicodeDecodeError``, which nothing in ``collect_ext_status`` catches.
  2. ``parse_ext_status(ext_status, data)``: ``None`` or ``[]`` -> nothing (status stays None);
     not a list -> "The extension status must be an array: ..."; only ``data[0]`` is read;
     required keys ``status`` and ``status/status`` ("Invalid status format by extension:
     Missing status/status key"); a ``status.status`` outside ``ExtensionStatusValue.STRINGS``
     (``transitioning``, ``warning``, ``error``, ``success``, case-sensitive) is NOT rejected
     but silently reported as ``error``; ``code`` defaults to 0 and is not type-checked;
     ``operation`` and ``configurationAppliedTime`` are copied; ``formattedMessage`` is optional
     but if present needs ``lang`` and ``message`` keys ("Missing formattedMessage/lang key");
     ``substatus`` may be absent or null, each non-null entry needs ``status`` with a value in
     STRINGS ("Invalid value X in range [...] at the node substatus/status") and may have
     ``name``, ``code`` (default 0), ``formattedMessage`` (same rule). A malformed file
     (``StatusFileMalformed``, 3) is reported as ``error``, code 1012, message "Could not get a
     valid status from the extension <Handler>-<version>. Encountered the following error: ...".
     Not read at all: ``version``, ``timestampUTC``, ``status.name`` (the agent uses the
     settings' name) and ``lang`` (``wire.ext_status_to_v1`` re-labels every message
     ``en-US`` and stamps its own ``timestampUTC``).
  3. Size: after a successful parse, ``len(data_str) > _MAX_STATUS_FILE_SIZE_IN_BYTES``
     (``128 * 1024`` = 131072; ``len`` of the decoded text, so characters, not bytes) raises
     ``MaxSizeExceeded`` (4): the agent warns "... the status file <path> of size N bytes is too
     big. Max Limit allowed is 131072 bytes", keeps status and code, truncates the message with
     ``_truncate_message`` to ``_MAX_STATUS_MESSAGE_LENGTH = 1024`` characters plus
     ``_TRUNCATED_SUFFIX = " ... [TRUNCATED]"`` (only when it is >= 1024 long), truncates each
     substatus name and message the same way to ``_MAX_SUBSTATUS_FIELD_LENGTH = 10240`` and
     keeps substatus entries only while the running total of those lengths stays <= 131072.
     An oversized file whose status has no ``formattedMessage`` (or a substatus without
     ``name`` or ``formattedMessage``) crashes there: ``_truncate_message(None)`` returns
     None, and unpacking it raises ``TypeError``.
* ``get_ext_handling_status`` / ``is_ext_handling_complete``: no file -> ``warning``
  (not complete); ``success`` and ``error`` are terminal (``_EXTENSION_TERMINAL_STATUSES``),
  ``transitioning`` and ``warning`` are not.

What the agent does with a heartbeat file
-----------------------------------------
``ExtHandlerInstance.collect_heartbeat()``, called only when ``HandlerManifest.json`` has
``handlerManifest.reportHeartbeat: true``: the file is ``<base dir>/heartbeat.log``
(``get_heartbeat_file``; the same path as ``heartbeatFile`` in ``HandlerEnvironment.json``).
Missing -> ``ExtensionError("Failed to get heart beat file")``; mtime older than 600 s
(``is_responsive``) -> ``{"status": "Unresponsive", "code": -1, "message": "Extension heartbeat
is not responsive"}`` without reading it; else ``json.loads(text)[0]['heartbeat']``, where
``ValueError``/``KeyError`` -> ``ExtensionError("Malformed heartbeat file: ...")`` (an empty
array raises an uncaught ``IndexError``). The caller (``ExtHandlersHandler`` status reporting)
then only does ``handler_status.status = heartbeat.get('status')``: the value goes unvalidated
into the handler's ``status`` on the wire (the agent's own values there are ``Ready`` and
``NotReady``). 2.7.3.0 reads no other key: ``code`` and ``Message`` are ignored; upstream
2.15.0.1 also takes ``formattedMessage`` (``{"lang", "message"}``, both required, through
``parse_formatted_message``) as the handler's message.

API
---
* ``require_waagent() -> Waagent``: the unpacked agent (cached per process); skips the calling
  test with the reason when it cannot be had. Fixture ``waagent`` does the same; a test module
  uses it with ``from tests.walinuxagent import waagent_fixture  # noqa: F401``.
* ``waagent_collect_status(path, *, seq_no=None) -> AgentStatus`` and
  ``waagent_collect_statuses(paths, *, seq_no=None) -> list[AgentStatus]`` (one subprocess for
  all): what ``collect_ext_status`` made of the file, never raising for a bad file.
* ``waagent_parse_status(path, *, seq_no=None) -> AgentStatus``: the same, but raises
  ``AssertionError`` with the agent's own words when it complained, crashed, coerced the
  status to ``error`` or found no status.
* ``status_problems(result) -> list[str]``: those complaints.
* ``waagent_collect_heartbeat(path) -> AgentHeartbeat``,
  ``waagent_collect_heartbeats(paths) -> list[AgentHeartbeat]``,
  ``waagent_parse_heartbeat(path) -> dict`` (strict; the ``heartbeat`` object as the agent read
  it) and ``heartbeat_problems(result) -> list[str]``.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import pytest

HANDLER_NAME = "Microsoft.Azure.KeyVault.KeyVaultForLinux"
HANDLER_VERSION = "2.0.0"
PACKAGES = ("waagent", "python3-distro")
DEFAULT_CACHE_DIR = Path("/tmp/kvcertsync-waagent")
STATUS_VALUES = ("transitioning", "warning", "error", "success")
# Limits of WALinuxAgent's exthandlers.py (2.7.3.0), checked against the unpacked code.
MAX_STATUS_FILE_SIZE = 128 * 1024
MAX_STATUS_MESSAGE_LENGTH = 1024
MAX_SUBSTATUS_FIELD_LENGTH = 10 * 1024
TRUNCATED_SUFFIX = " ... [TRUNCATED]"

_DIST_PACKAGES = Path("usr/lib/python3/dist-packages")
_DOWNLOAD_TIMEOUT = 180
_RUN_TIMEOUT = 120


class AgentSubstatus(TypedDict):
    name: str | None
    status: str | None
    code: Any
    message: str | None


class AgentStatus(TypedDict, total=False):
    """What ``collect_ext_status`` made of a status file (``ExtensionStatus`` fields)."""

    name: str | None
    operation: str | None
    status: str | None
    code: Any
    message: str | None
    configurationAppliedTime: str | None
    sequenceNumber: int | None
    substatus: list[AgentSubstatus]
    warnings: list[str]  # what the agent logged at WARNING or above while reading
    notes: list[str]  # silent coercions: a status outside STATUS_VALUES reported as error
    complete: bool | None  # is_ext_handling_complete: terminal status?
    v1: dict[str, Any] | None  # wire.ext_status_to_v1: what the agent would send upstream
    exception: str | None  # traceback of an exception that escaped collect_ext_status


class AgentHeartbeat(TypedDict, total=False):
    heartbeat: Any  # the "heartbeat" object as collect_heartbeat returned it
    handler_status: Any  # heartbeat.get('status'): the handler status the agent reports
    error: str | None  # ExtensionError text from collect_heartbeat
    error_code: int | None
    exception: str | None  # traceback of any other exception


@dataclass(frozen=True)
class Waagent:
    """WALinuxAgent unpacked from Debian's package, with an interpreter that imports it."""

    root: Path
    python: str
    sys_path: tuple[str, ...]
    packages: dict[str, str]  # Debian package -> version
    agent_version: str  # azurelinuxagent.common.version.AGENT_VERSION
    exthandlers: Path  # the azurelinuxagent/ga/exthandlers.py that the interpreter imported

    def run(self, request: dict[str, Any]) -> Any:
        return _run_script(self.python, {**request, "sys_path": list(self.sys_path)})


class WaagentUnavailable(Exception):
    """WALinuxAgent cannot be had here; the message says why."""


# --- the code that runs in the subprocess, next to the agent --------------------------------

_SCRIPT = r"""
import json, os, shutil, sys, traceback, warnings


def main(request):
    sys.path[:0] = request["sys_path"]
    warnings.simplefilter("ignore")
    try:
        import azurelinuxagent.common.conf as conf
        import azurelinuxagent.common.event as event
        import azurelinuxagent.common.logger as logger
        import azurelinuxagent.ga.exthandlers as exthandlers
        from azurelinuxagent.common.exception import ExtensionError
        from azurelinuxagent.common.future import ustr
        from azurelinuxagent.common.protocol.restapi import Extension, ExtensionSettings
        from azurelinuxagent.common.protocol.wire import ext_status_to_v1
        from azurelinuxagent.common.version import AGENT_VERSION
    except Exception:
        return {"import_error": traceback.format_exc()}
    if request["mode"] == "probe":
        return {"agent_version": AGENT_VERSION, "exthandlers": exthandlers.__file__}

    captured = []

    def capture(level, line):
        # "<time> <LEVEL> <thread> <message>\n", written for WARNING and ERROR
        captured.append(line.rstrip("\n").split(" ", 3)[-1])

    logger.DEFAULT_LOGGER.appenders = []
    logger.add_logger_appender(logger.AppenderType.TELEMETRY, logger.LogLevel.WARNING, capture)
    exthandlers._STATUS_FILE_RETRY_DELAY = 0

    def instance(work, job):
        conf.__conf__.values["Lib.Dir"] = os.path.join(work, "lib")
        conf.__conf__.values["Extension.LogDir"] = os.path.join(work, "log")
        events = os.path.join(work, "events")
        os.makedirs(events)
        event.init_event_logger(events)
        logger.reset_periodic()
        handler = Extension(name=job["handler"])
        handler.version = job["handler_version"]
        settings = ExtensionSettings(name=job["handler"], sequenceNumber=job["seq_no"])
        handler.settings.append(settings)
        return exthandlers.ExtHandlerInstance(handler, None), settings

    def collect_status(work, job):
        inst, settings = instance(work, job)
        _, path = inst.get_status_file_path(settings)
        os.makedirs(os.path.dirname(path))
        if job["file"] is not None:
            shutil.copy2(job["file"], path)
        notes = []
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)[0]["status"]["status"]
        except Exception:
            raw = None
        if raw is not None and raw not in exthandlers.ExtensionStatusValue.STRINGS:
            notes.append(
                "status/status {0!r} is not one of {1}: the agent reports it as 'error'".format(
                    raw, exthandlers.ExtensionStatusValue.STRINGS))
        del captured[:]
        try:
            st = inst.collect_ext_status(settings)
        except Exception:
            return {"exception": traceback.format_exc(), "warnings": list(captured),
                    "notes": notes}
        out = {
            "name": st.name, "operation": st.operation, "status": st.status, "code": st.code,
            "message": st.message, "configurationAppliedTime": st.configurationAppliedTime,
            "sequenceNumber": st.sequenceNumber,
            "substatus": [{"name": s.name, "status": s.status, "code": s.code,
                           "message": s.message} for s in st.substatusList],
            "warnings": list(captured), "notes": notes, "exception": None,
        }
        out["v1"] = ext_status_to_v1(st)
        out["complete"] = inst.is_ext_handling_complete(settings)[0]
        return out

    def collect_heartbeat(work, job):
        inst, _ = instance(work, job)
        os.makedirs(inst.get_base_dir())
        manifest = [{"name": job["handler"], "version": job["handler_version"],
                     "handlerManifest": {"installCommand": "install", "uninstallCommand": "x",
                                         "updateCommand": "update", "enableCommand": "enable",
                                         "disableCommand": "disable", "reportHeartbeat": True}}]
        with open(inst.get_manifest_file(), "w") as f:
            json.dump(manifest, f)
        if job["file"] is not None:
            shutil.copy2(job["file"], inst.get_heartbeat_file())  # keeps the mtime
        out = {"heartbeat": None, "handler_status": None, "error": None, "error_code": None,
               "exception": None}
        try:
            heartbeat = inst.collect_heartbeat()
            out["heartbeat"] = heartbeat
            if heartbeat is not None:
                # what ExtHandlersHandler does with it
                out["handler_status"] = heartbeat.get("status")
        except ExtensionError as e:
            out["error"], out["error_code"] = ustr(e), e.code
        except Exception:
            out["exception"] = traceback.format_exc()
        return out

    collect = collect_status if request["mode"] == "status" else collect_heartbeat
    results = []
    for i, job in enumerate(request["jobs"]):
        results.append(collect(os.path.join(request["work"], str(i)), job))
    return {"results": results}


result = main(json.loads(sys.argv[1]))
sys.stdout.write("\n@@RESULT@@" + json.dumps(result) + "\n")
"""


def _run_script(python: str, request: dict[str, Any]) -> Any:
    proc = subprocess.run(
        [python, "-I", "-c", _SCRIPT, json.dumps(request)],
        capture_output=True,
        text=True,
        timeout=_RUN_TIMEOUT,
        check=False,
    )
    marker = proc.stdout.rfind("\n@@RESULT@@")
    if proc.returncode != 0 or marker < 0:
        raise AssertionError(
            f"the WALinuxAgent subprocess ({python}) failed with exit {proc.returncode}:\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return json.loads(proc.stdout[marker + len("\n@@RESULT@@") :])


# --- obtaining the package ------------------------------------------------------------------


def _tail(text: str, lines: int = 6) -> str:
    kept = [line for line in text.strip().splitlines() if not line.startswith("W: ")]
    return " | ".join(kept[-lines:]) or "(no output)"


def _fetch(cache: Path) -> None:
    """Download the packages and unpack them into ``cache`` (built beside it, then renamed)."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise WaagentUnavailable(
                f"{tool} not found: WALinuxAgent is taken from Debian's waagent package"
            )
    cache.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=cache.name + ".", dir=cache.parent))
    try:
        debs = build / "debs"
        debs.mkdir()
        try:
            proc = subprocess.run(
                ["apt-get", "download", "-q", *PACKAGES],
                cwd=debs,
                capture_output=True,
                text=True,
                timeout=_DOWNLOAD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise WaagentUnavailable(
                f"`apt-get download {' '.join(PACKAGES)}` took over {e.timeout} s"
            ) from e
        if proc.returncode != 0:
            hint = ""
            if "Unable to locate package" in proc.stderr:
                hint = " (the apt lists lack it: `apt-get update` first)"
            raise WaagentUnavailable(
                f"`apt-get download {' '.join(PACKAGES)}` failed with exit {proc.returncode}"
                f"{hint}: {_tail(proc.stderr + proc.stdout)}"
            )
        packages: dict[str, str] = {}
        for deb in sorted(debs.glob("*.deb")):
            fields = subprocess.run(
                ["dpkg-deb", "-f", str(deb), "Package", "Version"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            info = dict(line.split(": ", 1) for line in fields.splitlines() if ": " in line)
            packages[info["Package"]] = info["Version"]
            subprocess.run(["dpkg-deb", "-x", str(deb), str(build / "tree")], check=True)
        if set(packages) != set(PACKAGES):
            raise WaagentUnavailable(f"apt-get download brought {packages}, not {PACKAGES}")
        (build / "packages.json").write_text(json.dumps(packages, indent=2) + "\n")
        if cache.exists():
            shutil.rmtree(cache)
        try:
            os.replace(build, cache)
        except OSError:
            if not (cache / "packages.json").is_file():  # else another run just made it
                raise
    except subprocess.CalledProcessError as e:
        raise WaagentUnavailable(f"unpacking the packages failed: {e}") from e
    finally:
        if build.exists():
            shutil.rmtree(build, ignore_errors=True)


def _obtain() -> Waagent:
    cache = Path(os.environ.get("KVCERTSYNC_WAAGENT_DIR") or DEFAULT_CACHE_DIR)
    dist = cache / "tree" / _DIST_PACKAGES
    if not (cache / "packages.json").is_file() or not (dist / "azurelinuxagent").is_dir():
        _fetch(cache)
    packages = json.loads((cache / "packages.json").read_text())
    sys_path = (str(dist),)
    override = os.environ.get("KVCERTSYNC_WAAGENT_PYTHON")
    candidates = [override] if override else [sys.executable, "/usr/bin/python3"]
    failures = []
    for python in dict.fromkeys(candidates):
        if not (python and os.access(python, os.X_OK)):
            failures.append(f"{python}: not an executable")
            continue
        try:
            probe = _run_script(python, {"mode": "probe", "sys_path": list(sys_path)})
        except (AssertionError, subprocess.TimeoutExpired) as e:
            failures.append(f"{python}: {_tail(str(e), 3)}")
            continue
        if "import_error" in probe:
            failures.append(f"{python}: {_tail(probe['import_error'], 3)}")
            continue
        return Waagent(
            cache, python, sys_path, packages, probe["agent_version"], Path(probe["exthandlers"])
        )
    raise WaagentUnavailable(
        f"WALinuxAgent from waagent {packages.get('waagent')} in {cache} does not import: "
        + "; ".join(failures)
    )


@functools.cache
def _obtain_cached() -> Waagent | str:
    try:
        return _obtain()
    except WaagentUnavailable as e:
        return str(e)
    except OSError as e:  # e.g. the cache directory cannot be written
        return f"{type(e).__name__}: {e}"


def require_waagent() -> Waagent:
    """The unpacked agent, or skip (fail under ``KVCERTSYNC_REQUIRE_WAAGENT=1``) with why."""
    got = _obtain_cached()
    if isinstance(got, str):
        reason = f"WALinuxAgent (Debian's waagent package) unavailable: {got}"
        if os.environ.get("KVCERTSYNC_REQUIRE_WAAGENT") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return got


@pytest.fixture(name="waagent", scope="session")
def waagent_fixture() -> Waagent:
    """The unpacked WALinuxAgent; skips the test with the reason when it cannot be had."""
    return require_waagent()


# --- feeding files to it --------------------------------------------------------------------

_SEQ_NAME = re.compile(r"^(\d+)\.status$")


def _seq_no_of(path: Path | None, seq_no: int | None) -> int:
    if seq_no is not None:
        return seq_no
    match = _SEQ_NAME.match(path.name) if path is not None else None
    return int(match.group(1)) if match else 0


def _jobs(paths: Sequence[Path | str | None], seq_no: int | None) -> list[dict[str, Any]]:
    jobs = []
    for raw in paths:
        path = None if raw is None else Path(raw)
        if path is not None and not path.is_file():
            raise FileNotFoundError(path)
        jobs.append(
            {
                "file": None if path is None else str(path.resolve()),
                "seq_no": _seq_no_of(path, seq_no),
                "handler": HANDLER_NAME,
                "handler_version": HANDLER_VERSION,
            }
        )
    return jobs


def _collect(mode: str, paths: Sequence[Path | str | None], seq_no: int | None) -> list[Any]:
    agent = require_waagent()
    jobs = _jobs(paths, seq_no)
    with tempfile.TemporaryDirectory(prefix="kvcertsync-waagent-run.") as work:
        results: list[Any] = agent.run({"mode": mode, "work": work, "jobs": jobs})["results"]
    return results


def waagent_collect_statuses(
    paths: Sequence[Path | str | None], *, seq_no: int | None = None
) -> list[AgentStatus]:
    """Run ``collect_ext_status`` on each file (``None``: no status file), in one subprocess.

    The file is copied to ``<Lib.Dir>/<HANDLER_NAME>-<HANDLER_VERSION>/status/<seq>.status``;
    ``seq`` is ``seq_no``, else taken from a file named ``<n>.status``, else 0.
    """
    return _collect("status", paths, seq_no)


def waagent_collect_status(path: Path | str | None, *, seq_no: int | None = None) -> AgentStatus:
    """What the agent made of one status file; never raises for a bad file."""
    return waagent_collect_statuses([path], seq_no=seq_no)[0]


def status_problems(result: AgentStatus) -> list[str]:
    """What the agent complained about (its own words), or found wrong, in a status file."""
    problems = list(result.get("warnings") or [])
    if result.get("exception"):
        problems.append("collect_ext_status raised:\n" + str(result["exception"]))
    problems += result.get("notes") or []
    if not result.get("exception") and result.get("status") is None:
        problems.append("the agent found no status in the file (null or empty array)")
    return problems


def waagent_parse_status(path: Path | str, *, seq_no: int | None = None) -> AgentStatus:
    """The agent's reading of a status file; ``AssertionError`` if it did not take it cleanly."""
    result = waagent_collect_status(path, seq_no=seq_no)
    problems = status_problems(result)
    if problems:
        raise AssertionError(
            f"WALinuxAgent rejected the status file {path}:\n" + "\n".join(problems)
        )
    return result


def waagent_collect_heartbeats(paths: Sequence[Path | str | None]) -> list[AgentHeartbeat]:
    """Run ``collect_heartbeat`` on each file (its mtime is kept), in one subprocess."""
    return _collect("heartbeat", paths, None)


def waagent_collect_heartbeat(path: Path | str | None) -> AgentHeartbeat:
    """What the agent made of one heartbeat file; never raises for a bad file."""
    return waagent_collect_heartbeats([path])[0]


def heartbeat_problems(result: AgentHeartbeat) -> list[str]:
    """The agent's complaints about a heartbeat file, including an ``Unresponsive`` verdict."""
    problems = []
    if result.get("error"):
        problems.append(f"collect_heartbeat: {result['error']} (code {result.get('error_code')})")
    if result.get("exception"):
        problems.append("collect_heartbeat raised:\n" + str(result["exception"]))
    if result.get("handler_status") == "Unresponsive":
        problems.append(f"the agent judged the heartbeat stale: {result.get('heartbeat')}")
    return problems


def waagent_parse_heartbeat(path: Path | str) -> dict[str, Any]:
    """The ``heartbeat`` object the agent read; ``AssertionError`` if it did not take it."""
    result = waagent_collect_heartbeat(path)
    problems = heartbeat_problems(result)
    if problems:
        raise AssertionError(
            f"WALinuxAgent rejected the heartbeat file {path}:\n" + "\n".join(problems)
        )
    heartbeat: dict[str, Any] = result["heartbeat"]
    return heartbeat
