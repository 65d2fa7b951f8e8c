"""``kvcertsync run`` as a Windows service: SCM status reporting, the service host, pywin32 glue.

Three layers, so that everything but the last can be tested anywhere:

* :class:`ScmNotifier` is a :class:`~kvcertsync.agent.notify.Notifier` that turns the agent's
  lifecycle calls, and the SCM's control requests, into ``SERVICE_STATUS`` reports to an
  :class:`Scm`. It is pure Python: no pywin32, no Windows.
* :func:`run_service` hosts one agent in the calling thread (the service thread): it builds the
  agent from a factory, runs it under anyio, and ends with exactly one STOPPED report whose exit
  codes say how the agent ended.
* :func:`service_main` is what ``kvcertsync service ACTION`` calls: install, remove, start, stop,
  and ``host``, the entry the SCM runs (``python.exe -m kvcertsync service host ...``). Only this
  layer imports pywin32, lazily, so the package imports and type-checks without it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Final, Protocol

import anyio
import attrs

from kvcertsync.agent.notify import Notifier
from kvcertsync.errors import KvCertSyncError

__all__ = [
    "ACTIONS",
    "DEFAULT_SERVICE_NAME",
    "AgentFactory",
    "AgentLike",
    "ReloadableAgent",
    "Scm",
    "ScmNotifier",
    "ServiceExit",
    "StatusReport",
    "WindowsServiceError",
    "host_arguments",
    "run_service",
    "service_command_line",
    "service_main",
]

logger = logging.getLogger(__name__)

# Service type, winnt.h.
SERVICE_WIN32_OWN_PROCESS: Final = 0x00000010

# Service states (dwCurrentState), winsvc.h.
SERVICE_STOPPED: Final = 0x00000001
SERVICE_START_PENDING: Final = 0x00000002
SERVICE_STOP_PENDING: Final = 0x00000003
SERVICE_RUNNING: Final = 0x00000004

# Controls accepted (dwControlsAccepted bit mask), winsvc.h.
SERVICE_ACCEPT_STOP: Final = 0x00000001
SERVICE_ACCEPT_SHUTDOWN: Final = 0x00000004
SERVICE_ACCEPT_PARAMCHANGE: Final = 0x00000008

# Control codes (HandlerEx dwControl), winsvc.h.
SERVICE_CONTROL_STOP: Final = 0x00000001
SERVICE_CONTROL_PAUSE: Final = 0x00000002
SERVICE_CONTROL_CONTINUE: Final = 0x00000003
SERVICE_CONTROL_INTERROGATE: Final = 0x00000004
SERVICE_CONTROL_SHUTDOWN: Final = 0x00000005
SERVICE_CONTROL_PARAMCHANGE: Final = 0x00000006

# Start types (CreateService dwStartType), winsvc.h / winnt.h.
SERVICE_AUTO_START: Final = 0x00000002

# System error codes, winerror.h.
NO_ERROR: Final = 0
ERROR_ACCESS_DENIED: Final = 5
ERROR_CALL_NOT_IMPLEMENTED: Final = 120
ERROR_INVALID_SERVICE_CONTROL: Final = 1052
ERROR_SERVICE_ALREADY_RUNNING: Final = 1056
ERROR_SERVICE_DOES_NOT_EXIST: Final = 1060
ERROR_SERVICE_CANNOT_ACCEPT_CTRL: Final = 1061
ERROR_SERVICE_NOT_ACTIVE: Final = 1062
ERROR_FAILED_SERVICE_CONTROLLER_CONNECT: Final = 1063
ERROR_EXCEPTION_IN_SERVICE: Final = 1064
ERROR_SERVICE_SPECIFIC_ERROR: Final = 1066
ERROR_SERVICE_MARKED_FOR_DELETE: Final = 1072
ERROR_SERVICE_EXISTS: Final = 1073

#: The service name ``install`` uses unless told otherwise.
DEFAULT_SERVICE_NAME: Final = "kvcertsync"
#: The verbs :func:`service_main` knows.
ACTIONS: Final = ("install", "remove", "start", "stop", "host")
#: Exit status of a host whose agent raised (the CLI's status for a KvCertSyncError, too).
EXIT_FAILURE: Final = 1

_STATE_NAMES: Final = {
    SERVICE_STOPPED: "STOPPED",
    SERVICE_START_PENDING: "START_PENDING",
    SERVICE_STOP_PENDING: "STOP_PENDING",
    SERVICE_RUNNING: "RUNNING",
}
_PENDING: Final = frozenset({SERVICE_START_PENDING, SERVICE_STOP_PENDING})
_DWORD_MAX: Final = 0xFFFFFFFF
_DESCRIPTION: Final = (
    "Keeps certificates from Azure Key Vault installed and current (kvcertsync, in place of "
    "the Key Vault virtual machine extension)."
)


class WindowsServiceError(KvCertSyncError):
    """A ``kvcertsync service`` action failed; the message says what to do next."""


def state_name(state: int) -> str:
    """The winsvc.h name of a service state, e.g. ``RUNNING``."""
    return _STATE_NAMES.get(state, f"state {state}")


@attrs.frozen
class StatusReport:
    """One ``SERVICE_STATUS`` as a service reports it (the service type is always own-process)."""

    state: int
    controls_accepted: int = 0
    win32_exit_code: int = NO_ERROR
    service_exit_code: int = 0
    checkpoint: int = 0
    wait_hint_ms: int = 0

    def as_tuple(self) -> tuple[int, int, int, int, int, int, int]:
        """The 7-tuple ``win32service.SetServiceStatus`` takes, in SERVICE_STATUS field order."""
        return (
            SERVICE_WIN32_OWN_PROCESS,
            self.state,
            self.controls_accepted,
            self.win32_exit_code,
            self.service_exit_code,
            self.checkpoint,
            self.wait_hint_ms,
        )


class Scm(Protocol):
    """Where status reports go: SetServiceStatus on Windows, a recorder in tests."""

    def set_status(self, report: StatusReport) -> None:
        """Tell the service control manager the service's current status."""
        ...


class AgentLike(Protocol):
    """What the host needs of the daemon (``kvcertsync.agent.daemon.Agent``)."""

    async def run(self) -> int:
        """Run until stopped; return the exit status (0: a clean stop)."""
        ...

    def request_stop(self) -> None:
        """Begin a graceful stop; thread-safe, idempotent, and effective even before run()."""
        ...


class ReloadableAgent(AgentLike, Protocol):
    """An agent that can re-read its settings; the service then accepts PARAMCHANGE."""

    def request_reload(self) -> None:
        """Re-read the settings soon; thread-safe (called from the SCM's control thread)."""
        ...


#: Builds the agent, handing it the notifier it must report its lifecycle to.
AgentFactory = Callable[[Notifier], AgentLike]


def _one_line(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_exception(exc: BaseException) -> str:
    """``Type: message`` on one line, never a traceback (frames can hold secret values)."""
    # anyio wraps a task's failure in an ExceptionGroup; the one inside is what a person needs.
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    message = _one_line(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@attrs.frozen
class ServiceExit:
    """How a hosted agent ended, as a process status and as the STOPPED report's exit codes."""

    status: int
    win32_exit_code: int = NO_ERROR
    service_exit_code: int = 0
    #: ``Type: message`` when the agent (or its factory) raised.
    error: str | None = None

    @classmethod
    def from_status(cls, status: int) -> ServiceExit:
        """The exit of an agent whose run() returned ``status``."""
        if status == 0:
            return cls(0)
        # Windows' convention for "the program's own code says why": 1066 plus a DWORD of ours.
        code = status if 0 < status <= _DWORD_MAX else EXIT_FAILURE
        return cls(status, ERROR_SERVICE_SPECIFIC_ERROR, code)

    @classmethod
    def from_exception(cls, exc: BaseException) -> ServiceExit:
        """The exit of an agent (or factory) that raised ``exc``."""
        if isinstance(exc, KvCertSyncError):
            # A failure kvcertsync expects and explains (bad settings, ...): the same status
            # the CLI exits with for it, reported the way from_status reports a status.
            return attrs.evolve(cls.from_status(EXIT_FAILURE), error=describe_exception(exc))
        return cls(EXIT_FAILURE, ERROR_EXCEPTION_IN_SERVICE, 0, describe_exception(exc))

    def describe(self) -> str:
        """One line for the event log: how the agent ended."""
        if self.error is not None:
            return f"the agent failed: {self.error}"
        if self.status == 0:
            return "the agent stopped"
        return f"the agent stopped with exit status {self.status}"


class ScmNotifier:
    """A Notifier that reports to the Windows service control manager, and its control handler.

    The SCM's rules it keeps: START_PENDING with a rising checkpoint until ``ready()``; RUNNING
    only then; STOP_PENDING with a rising checkpoint once a stop begins; STOPPED exactly once,
    last, with the exit codes. Every method is thread-safe: the agent calls the Notifier side
    from its event loop, the SCM calls :meth:`handle_control` from the dispatcher thread.
    """

    def __init__(
        self, scm: Scm, *, start_wait_hint_ms: int = 30_000, stop_wait_hint_ms: int = 30_000
    ) -> None:
        # alive() comes at least every 10 s, so 30 s gives the SCM three chances to see progress.
        self._scm = scm
        self._start_wait_hint_ms = start_wait_hint_ms
        self._stop_wait_hint_ms = stop_wait_hint_ms
        self._lock = threading.RLock()
        self._state: int | None = None
        self._checkpoint = 0
        self._stop: Callable[[], None] | None = None
        self._reload: Callable[[], None] | None = None
        self._agent_done = False
        self._status_text = ""
        self.last_report: StatusReport | None = None

    @property
    def state(self) -> int | None:
        """The last state reported, or None before the first report."""
        return self._state

    @property
    def status_text(self) -> str:
        """The agent's last ``status()`` line (the SCM has nowhere to show it)."""
        return self._status_text

    # -- host side ---------------------------------------------------------------------------

    def starting(self) -> None:
        """First report of the host: START_PENDING, no controls accepted yet (no agent to stop)."""
        with self._lock:
            if self._state is None:
                self._report(SERVICE_START_PENDING)

    def attach(self, stop: Callable[[], None], reload: Callable[[], None] | None = None) -> None:
        """The agent exists: route STOP/SHUTDOWN to ``stop`` and PARAMCHANGE to ``reload``."""
        with self._lock:
            self._stop, self._reload = stop, reload
            state = self._state
            if state in (SERVICE_START_PENDING, SERVICE_RUNNING):
                # Re-report so the SCM learns what it may send now.
                assert state is not None
                self._report(state)

    def detach(self) -> None:
        """The agent's run() has returned: no control reaches it any more."""
        with self._lock:
            # A stop the SCM sends now still gets STOP_PENDING (then STOPPED), but the agent
            # is not called: its loop is gone, and a late request_stop() could only misfire.
            self._agent_done = True

    def stopped(self, exit: ServiceExit) -> None:
        """Final report: STOPPED with the exit codes; any later call is ignored."""
        with self._lock:
            if self._state == SERVICE_STOPPED:
                return
            self._stop = self._reload = None
            self._report(
                SERVICE_STOPPED,
                win32_exit_code=exit.win32_exit_code,
                service_exit_code=exit.service_exit_code,
            )

    # -- Notifier (the agent's side) ----------------------------------------------------------

    def ready(self) -> None:
        """Start-up is complete: RUNNING (once; ignored when a stop has begun)."""
        with self._lock:
            if self._state == SERVICE_START_PENDING:
                self._report(SERVICE_RUNNING)

    def status(self, text: str) -> None:
        """Kept for the host's log; SERVICE_STATUS has no text field."""
        text = _one_line(text)
        if text != self._status_text:
            self._status_text = text
            logger.debug("service status: %s", text)

    def reloading(self) -> None:
        """Nothing to report: Windows has no reloading state; the service stays RUNNING."""
        logger.debug("service: reloading settings")

    def stopping(self) -> None:
        """A graceful stop has begun: STOP_PENDING (later calls count as progress)."""
        with self._lock:
            if self._state in (SERVICE_START_PENDING, SERVICE_RUNNING, SERVICE_STOP_PENDING):
                self._report(SERVICE_STOP_PENDING)

    def alive(self) -> None:
        """The loop is healthy: bump the checkpoint while a start or stop is pending."""
        with self._lock:
            state = self._state
            if state is not None and state in _PENDING:
                self._report(state)

    # -- the SCM's side ----------------------------------------------------------------------

    @property
    def controls_accepted(self) -> int:
        """The SERVICE_ACCEPT_* mask for the current state."""
        with self._lock:
            return self._accepted(self._state)

    def handle_control(self, control: int, event_type: int = 0, data: object = None) -> int:
        """HandlerEx: act on an SCM control and return its result code; never raises."""
        with self._lock:
            state = self._state
            accepted = self._accepted(state)
            if control == SERVICE_CONTROL_INTERROGATE:
                # The SCM already knows the last status; re-reporting would only add a report.
                return NO_ERROR
            if control in (SERVICE_CONTROL_STOP, SERVICE_CONTROL_SHUTDOWN):
                if state in (SERVICE_STOP_PENDING, SERVICE_STOPPED):
                    return NO_ERROR
                needed = (
                    SERVICE_ACCEPT_STOP
                    if control == SERVICE_CONTROL_STOP
                    else SERVICE_ACCEPT_SHUTDOWN
                )
                if not accepted & needed:
                    return ERROR_CALL_NOT_IMPLEMENTED
                # STOP_PENDING goes out before the agent hears of the stop, so that a ready()
                # racing in from the agent's loop can no longer report RUNNING.
                self._report(SERVICE_STOP_PENDING)
                callback = None if self._agent_done else self._stop
            elif control == SERVICE_CONTROL_PARAMCHANGE:
                if not accepted & SERVICE_ACCEPT_PARAMCHANGE or self._agent_done:
                    return ERROR_CALL_NOT_IMPLEMENTED
                callback = self._reload
            else:
                return ERROR_CALL_NOT_IMPLEMENTED
        # Outside the lock: the agent's callback may call back into this notifier from its thread.
        if callback is not None:
            try:
                callback()
            except Exception as exc:
                logger.error("service control %d failed: %s", control, describe_exception(exc))
                return ERROR_EXCEPTION_IN_SERVICE
        return NO_ERROR

    # -- internals ---------------------------------------------------------------------------

    def _accepted(self, state: int | None) -> int:
        if self._stop is None:
            return 0
        if state == SERVICE_START_PENDING:
            # Accepting STOP while START_PENDING goes against one of SetServiceStatus's "best
            # practices", but ControlService's state table allows it, and without it a service
            # whose initial sync never succeeds (vault unreachable) could not be stopped at all.
            # The handler is ready before this is reported: it is this object.
            return SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN
        if state == SERVICE_RUNNING:
            mask = SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN
            return mask | (SERVICE_ACCEPT_PARAMCHANGE if self._reload is not None else 0)
        return 0

    def _report(self, state: int, *, win32_exit_code: int = 0, service_exit_code: int = 0) -> None:
        # Called with the lock held, so reports reach the SCM in checkpoint order.
        if state in _PENDING:
            # One counter for both pending phases: it only ever rises, as the SCM wants.
            self._checkpoint += 1
            checkpoint = self._checkpoint
            wait_hint = (
                self._start_wait_hint_ms
                if state == SERVICE_START_PENDING
                else self._stop_wait_hint_ms
            )
        else:
            checkpoint = wait_hint = 0
        self._state = state
        report = StatusReport(
            state=state,
            controls_accepted=self._accepted(state),
            win32_exit_code=win32_exit_code,
            service_exit_code=service_exit_code,
            checkpoint=checkpoint,
            wait_hint_ms=wait_hint,
        )
        self.last_report = report
        try:
            self._scm.set_status(report)
        except Exception as exc:
            # The Notifier contract: never raise into the agent. The SCM will notice the silence.
            logger.warning("reporting %s to the SCM failed: %s", state_name(state), exc)


def run_service(notifier: ScmNotifier, factory: AgentFactory) -> ServiceExit:
    """Host one agent in this thread until it stops; report its end as STOPPED, return it."""
    notifier.starting()
    outcome: ServiceExit | None = None
    try:
        agent = factory(notifier)
        reload = getattr(agent, "request_reload", None)
        notifier.attach(agent.request_stop, reload if callable(reload) else None)
        status = anyio.run(agent.run)
        outcome = ServiceExit.from_status(status)
    except Exception as exc:
        outcome = ServiceExit.from_exception(exc)
    finally:
        notifier.detach()
        if outcome is None:
            # KeyboardInterrupt, SystemExit, ...: still end with one STOPPED, then let it go on.
            notifier.stopped(ServiceExit(EXIT_FAILURE, ERROR_EXCEPTION_IN_SERVICE))
    if outcome.error is not None:
        logger.error("kvcertsync service: %s", outcome.describe())
    elif outcome.status != 0:
        logger.warning("kvcertsync service: %s", outcome.describe())
    else:
        logger.info("kvcertsync service: %s", outcome.describe())
    notifier.stopped(outcome)
    return outcome


# -- service_main: the CLI's entry --------------------------------------------------------------


def host_arguments(name: str, run_args: Sequence[str]) -> list[str]:
    """The interpreter arguments the installed service starts with (after python.exe)."""
    # --name before the action: an option after it would land in the run options' remainder.
    args = ["-m", "kvcertsync", "service", "--name", name, "host"]
    if run_args:
        args += ["--", *run_args]
    return args


def service_command_line(name: str, run_args: Sequence[str], executable: str | None = None) -> str:
    """The service's whole command line (ImagePath), quoted the way Windows programs split it."""
    exe = sys.executable if executable is None else executable
    return subprocess.list2cmdline([exe, *host_arguments(name, run_args)])


def _is_windows() -> bool:
    return sys.platform == "win32"


def service_main(
    action: str,
    run_args: Sequence[str] = (),
    *,
    name: str = DEFAULT_SERVICE_NAME,
    agent_factory: AgentFactory | None = None,
    out: IO[str] | None = None,
    timeout: float = 120.0,
) -> int:
    """Run ``kvcertsync service ACTION``; the exit status (host: the agent's), or raise."""
    if action not in ACTIONS:
        raise WindowsServiceError(
            f"unknown service action {action!r}: use one of {', '.join(ACTIONS)}"
        )
    if run_args and action not in ("install", "host"):
        raise WindowsServiceError(
            f"run options are stored by 'install', not taken by {action!r}: "
            f"kvcertsync service install -- {subprocess.list2cmdline(run_args)}"
        )
    if action == "host" and agent_factory is None:
        raise ValueError("service_main('host') needs the agent_factory that builds the agent")
    if not _is_windows():
        raise WindowsServiceError(
            f"'kvcertsync service {action}' manages a Windows service; this is {sys.platform}. "
            "Elsewhere run 'kvcertsync run' under the system's service manager "
            "(systemd: Type=notify)."
        )
    win = _Pywin32.load()
    stream = sys.stdout if out is None else out
    if action == "host":
        assert agent_factory is not None
        return _host(win, name, agent_factory)
    if action == "install":
        return _install(win, name, run_args, stream)
    if action == "remove":
        return _remove(win, name, stream, timeout)
    if action == "start":
        return _start(win, name, stream, timeout)
    return _stop(win, name, stream, timeout)


@attrs.frozen
class _Pywin32:
    """The pywin32 modules, imported only when a Windows action runs (typed Any on purpose)."""

    servicemanager: Any
    win32service: Any
    win32serviceutil: Any

    @classmethod
    def load(cls) -> _Pywin32:
        """Import pywin32's service modules, or say how to install them."""
        try:
            import servicemanager  # type: ignore[import-untyped,import-not-found,unused-ignore]
            import win32service  # type: ignore[import-untyped,import-not-found,unused-ignore]
            import win32serviceutil  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError as exc:
            raise WindowsServiceError(
                f"the Windows service needs pywin32 ({exc}): pip install 'kvcertsync[windows]'"
            ) from None
        return cls(servicemanager, win32service, win32serviceutil)


def _winerror(exc: BaseException) -> int | None:
    code = getattr(exc, "winerror", None)
    return code if isinstance(code, int) else None


def _explain(exc: BaseException) -> str:
    # pywintypes.error carries (winerror, funcname, strerror).
    what = getattr(exc, "strerror", None) or str(exc)
    code = _winerror(exc)
    func = getattr(exc, "funcname", None)
    where = f"{func}: " if func else ""
    return f"{where}{what} (error {code})" if code is not None else f"{where}{what}"


class _EventLogHandler(logging.Handler):
    """Copies warnings and errors to the Application event log, as one line each."""

    def __init__(self, servicemanager: Any) -> None:
        super().__init__(logging.WARNING)
        self._servicemanager = servicemanager

    def emit(self, record: logging.LogRecord) -> None:
        """Write one event: the message, and the exception's type and message (no traceback)."""
        try:
            message = record.getMessage()
            if record.exc_info and record.exc_info[1] is not None:
                message = f"{message} ({describe_exception(record.exc_info[1])})"
            if record.levelno >= logging.ERROR:
                self._servicemanager.LogErrorMsg(message)
            else:
                self._servicemanager.LogWarningMsg(message)
        except Exception:
            self.handleError(record)


class _Win32Scm:
    """Scm over win32service.SetServiceStatus, for the status handle pywin32 registered."""

    def __init__(self, win32service: Any, handle: Any) -> None:
        self._win32service = win32service
        self._handle = handle

    def set_status(self, report: StatusReport) -> None:
        """SetServiceStatus, except STOPPED: pywin32 reports that itself once SvcRun returns."""
        if self._handle is None:
            return  # pywin32's debug mode: no SCM to tell.
        if report.state == SERVICE_STOPPED:
            # pywin32's service_main calls SetServiceStatus(STOPPED) after SvcRun, always; a
            # second STOPPED report "can cause the process to crash" (SetServiceStatus docs).
            # SvcDoRun raises instead when the agent failed, so that report carries an error.
            return
        self._win32service.SetServiceStatus(self._handle, report.as_tuple())


class ServiceFailed(Exception):
    """Raised from SvcRun so that pywin32 reports STOPPED with ERROR_SERVICE_SPECIFIC_ERROR."""


def _service_class(win: _Pywin32, name: str, factory: AgentFactory) -> type[Any]:
    """The ServiceFramework subclass pywin32 instantiates when the SCM starts the service."""
    framework: Any = win.win32serviceutil.ServiceFramework

    class KvCertSyncService(framework):  # type: ignore[misc,valid-type,unused-ignore]
        _svc_name_ = name
        _svc_display_name_ = _display_name(name)
        _svc_description_ = _DESCRIPTION
        #: How the last hosted agent ended (the host's return status comes from here).
        outcome: ServiceExit | None = None

        def __init__(self, args: Sequence[str]) -> None:
            # The notifier must exist before the base class registers our control handler.
            self.notifier: ScmNotifier | None = None
            super().__init__(args)
            self.notifier = ScmNotifier(_Win32Scm(win.win32service, self.ssh))

        def GetAcceptedControls(self) -> int:
            """What the SCM may send now (the base class guesses from method names)."""
            return self.notifier.controls_accepted if self.notifier is not None else 0

        def ServiceCtrlHandlerEx(self, control: int, event_type: int, data: object) -> int:
            """Every control goes to the notifier, which knows what the current state accepts."""
            if self.notifier is None:
                return ERROR_CALL_NOT_IMPLEMENTED
            return self.notifier.handle_control(control, event_type, data)

        def SvcStop(self) -> int:
            """The Windows stop is the agent's graceful stop."""
            return self.ServiceCtrlHandlerEx(SERVICE_CONTROL_STOP, 0, None)

        def SvcShutdown(self) -> int:
            """System shutdown: the same graceful stop, in the time Windows gives."""
            return self.ServiceCtrlHandlerEx(SERVICE_CONTROL_SHUTDOWN, 0, None)

        def SvcInterrogate(self) -> int:
            """The base class would report RUNNING here, even while still starting."""
            return NO_ERROR

        def SvcRun(self) -> None:
            """Entry from pywin32's service_main; the base reports RUNNING at once, we may not."""
            self.SvcDoRun()

        def SvcDoRun(self) -> None:
            """Host the agent; raise (outside any except block) if it did not end cleanly."""
            assert self.notifier is not None
            # On the "kvcertsync" logger, not the root: configure_logging replaces root handlers.
            handler = _EventLogHandler(win.servicemanager)
            package_logger = logging.getLogger("kvcertsync")
            package_logger.addHandler(handler)
            try:
                outcome = run_service(self.notifier, factory)
            finally:
                package_logger.removeHandler(handler)
            type(self).outcome = outcome
            if outcome.status != 0:
                # pywin32 logs this exception with its traceback: raised here, it has no
                # __context__, so the traceback shows these frames only, never the agent's.
                raise ServiceFailed(f"kvcertsync service {name!r}: {outcome.describe()}")

    return KvCertSyncService


def _display_name(name: str) -> str:
    # Display names must be unique among services, so a second instance needs its own.
    suffix = "" if name == DEFAULT_SERVICE_NAME else f" ({name})"
    return f"kvcertsync: Azure Key Vault certificates{suffix}"


def _host(win: _Pywin32, name: str, factory: AgentFactory) -> int:
    cls = _service_class(win, name, factory)
    win.servicemanager.Initialize(name)
    win.servicemanager.PrepareToHostSingle(cls)
    try:
        # Returns once the service has stopped; the service itself runs in the thread the SCM
        # starts (pywin32's service_main), and controls arrive on this one.
        win.servicemanager.StartServiceCtrlDispatcher()
    except win.win32service.error as exc:
        if _winerror(exc) == ERROR_FAILED_SERVICE_CONTROLLER_CONNECT:
            raise WindowsServiceError(
                "'kvcertsync service host' is the command the Windows service manager runs; "
                f"start the service with 'kvcertsync service --name {name} start', or run the "
                "agent in this console with 'kvcertsync run'"
            ) from None
        raise WindowsServiceError(f"cannot host the service: {_explain(exc)}") from None
    outcome = cls.outcome
    return outcome.status if isinstance(outcome, ServiceExit) else EXIT_FAILURE


def _relative_paths(run_args: Sequence[str]) -> list[str]:
    found = []
    for arg in run_args:
        value = arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg
        relative = value and not value.startswith("-") and not os.path.isabs(value)
        if relative and os.path.exists(value):
            found.append(value)
    return found


def _install(win: _Pywin32, name: str, run_args: Sequence[str], out: IO[str]) -> int:
    for path in _relative_paths(run_args):
        # The SCM starts services in %SystemRoot%\System32: a relative path means another file.
        out.write(
            f"warning: {path!r} is a relative path; the service will not find it. "
            f"Pass {os.path.abspath(path)!r} instead.\n"
        )
    if sys.prefix != sys.base_prefix and not os.path.islink(sys.executable):
        out.write(
            f"note: {sys.executable} is a virtual environment's python.exe, a launcher that "
            "runs the base interpreter as a child process; see docs/windows-service.md\n"
        )
    exe = sys.executable
    args = subprocess.list2cmdline(host_arguments(name, run_args))
    ws, wsu = win.win32service, win.win32serviceutil
    try:
        wsu.InstallService(
            None,  # no PythonClass registry key: this service does not run in pythonservice.exe
            name,
            _display_name(name),
            startType=SERVICE_AUTO_START,
            exeName=exe,
            exeArgs=args,
            description=_DESCRIPTION,
        )
        verb = "installed"
    except ws.error as exc:
        if _winerror(exc) != ERROR_SERVICE_EXISTS:
            hint = (
                " (run this from an elevated prompt)"
                if _winerror(exc) == ERROR_ACCESS_DENIED
                else ""
            )
            raise WindowsServiceError(
                f"cannot install the service {name!r}: {_explain(exc)}{hint}"
            ) from None
        try:
            wsu.ChangeServiceConfig(
                None,
                name,
                startType=SERVICE_AUTO_START,
                exeName=exe,
                exeArgs=args,
                displayName=_display_name(name),
                description=_DESCRIPTION,
            )
        except ws.error as exc2:
            raise WindowsServiceError(
                f"cannot update the service {name!r}: {_explain(exc2)}"
            ) from None
        verb = "updated (restart it to use the new options)"
    try:
        # Register the event source now, while elevated: the service account may not be able to.
        win.servicemanager.SetEventSourceName(name, True)
    except Exception as exc:
        out.write(f"warning: event log source {name!r} not registered: {_explain(exc)}\n")
    out.write(f"service {name!r} {verb}: {exe} {args}\n")
    out.write(f"start it with: kvcertsync service --name {name} start\n")
    return 0


def _query_state(win: _Pywin32, name: str) -> tuple[int, int, int]:
    status = win.win32serviceutil.QueryServiceStatus(name)
    return int(status[1]), int(status[3]), int(status[4])


def _wait_while(win: _Pywin32, name: str, states: frozenset[int], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    state = _query_state(win, name)[0]
    while state in states and time.monotonic() < deadline:
        time.sleep(0.5)
        state = _query_state(win, name)[0]
    return state


def _exit_codes(win: _Pywin32, name: str) -> str:
    _, win32_code, service_code = _query_state(win, name)
    if win32_code == ERROR_SERVICE_SPECIFIC_ERROR:
        return f"service-specific exit code {service_code}"
    return f"exit code {win32_code}"


def _missing(name: str) -> WindowsServiceError:
    return WindowsServiceError(
        f"no service named {name!r} is installed: kvcertsync service --name {name} "
        "install -- RUN OPTIONS"
    )


def _control(
    win: _Pywin32, name: str, verb: str, call: Callable[[str], object], already: int
) -> bool:
    """Ask the SCM to ``verb`` the service; False when Windows says it already is."""
    try:
        call(name)
    except win.win32service.error as exc:
        code = _winerror(exc)
        if code == already:
            return False
        if code == ERROR_SERVICE_DOES_NOT_EXIST:
            raise _missing(name) from None
        raise WindowsServiceError(f"cannot {verb} the service {name!r}: {_explain(exc)}") from None
    return True


def _start(win: _Pywin32, name: str, out: IO[str], timeout: float) -> int:
    start = win.win32serviceutil.StartService
    if not _control(win, name, "start", start, ERROR_SERVICE_ALREADY_RUNNING):
        out.write(f"service {name!r} is already running\n")
        return 0
    # With requireInitialSync the service stays START_PENDING until every certificate is in.
    state = _wait_while(win, name, frozenset({SERVICE_START_PENDING}), timeout)
    if state == SERVICE_RUNNING:
        out.write(f"service {name!r} is running\n")
        return 0
    if state == SERVICE_START_PENDING:
        out.write(
            f"service {name!r} is still starting after {timeout:g} s (the initial sync waits "
            "for every certificate); the event log says why if it fails\n"
        )
        return 0
    raise WindowsServiceError(
        f"service {name!r} stopped while starting ({_exit_codes(win, name)}); see the "
        "Application event log (source kvcertsync) and the agent's log"
    )


def _stop(win: _Pywin32, name: str, out: IO[str], timeout: float) -> int:
    stop = win.win32serviceutil.StopService
    if not _control(win, name, "stop", stop, ERROR_SERVICE_NOT_ACTIVE):
        out.write(f"service {name!r} is not running\n")
        return 0
    state = _wait_while(win, name, frozenset({SERVICE_STOP_PENDING, SERVICE_RUNNING}), timeout)
    if state != SERVICE_STOPPED:
        raise WindowsServiceError(
            f"service {name!r} is still {state_name(state)} after {timeout:g} s"
        )
    out.write(f"service {name!r} stopped\n")
    return 0


def _remove(win: _Pywin32, name: str, out: IO[str], timeout: float) -> int:
    try:
        state = _query_state(win, name)[0]
    except win.win32service.error as exc:
        if _winerror(exc) == ERROR_SERVICE_DOES_NOT_EXIST:
            raise _missing(name) from None
        raise WindowsServiceError(f"cannot query the service {name!r}: {_explain(exc)}") from None
    if state != SERVICE_STOPPED:
        # DeleteService only marks a running service; it would linger until stopped.
        _stop(win, name, out, timeout)
    try:
        win.win32serviceutil.RemoveService(name)
    except win.win32service.error as exc:
        if _winerror(exc) == ERROR_SERVICE_MARKED_FOR_DELETE:
            raise WindowsServiceError(
                f"service {name!r} is already marked for deletion; close the Services console "
                "(services.msc) and any other program holding it open"
            ) from None
        raise WindowsServiceError(f"cannot remove the service {name!r}: {_explain(exc)}") from None
    out.write(f"service {name!r} removed\n")
    return 0
