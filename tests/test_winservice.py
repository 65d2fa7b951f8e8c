"""The Windows service layer against a fake SCM that enforces Windows' rules, in real threads.

What runs here is the real ScmNotifier and the real host (run_service) with real anyio event
loops in service threads, while the test thread plays the SCM's control thread. The pywin32 glue
is exercised against a model of pywin32 (its ServiceFramework and the C service_main of
PythonService.cpp), which checks the wiring, not pywin32 itself: that needs real Windows.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import anyio
import pytest

from kvcertsync.agent import winservice as ws
from kvcertsync.agent.notify import Notifier
from kvcertsync.agent.winservice import (
    ERROR_EXCEPTION_IN_SERVICE,
    ERROR_INVALID_SERVICE_CONTROL,
    ERROR_SERVICE_CANNOT_ACCEPT_CTRL,
    ERROR_SERVICE_NOT_ACTIVE,
    ERROR_SERVICE_SPECIFIC_ERROR,
    NO_ERROR,
    SERVICE_ACCEPT_PARAMCHANGE,
    SERVICE_ACCEPT_SHUTDOWN,
    SERVICE_ACCEPT_STOP,
    SERVICE_CONTROL_INTERROGATE,
    SERVICE_CONTROL_PARAMCHANGE,
    SERVICE_CONTROL_PAUSE,
    SERVICE_CONTROL_SHUTDOWN,
    SERVICE_CONTROL_STOP,
    SERVICE_RUNNING,
    SERVICE_START_PENDING,
    SERVICE_STOP_PENDING,
    SERVICE_STOPPED,
    SERVICE_WIN32_OWN_PROCESS,
    AgentLike,
    ScmNotifier,
    ServiceExit,
    StatusReport,
    WindowsServiceError,
    describe_exception,
    host_arguments,
    run_service,
    service_command_line,
    service_main,
    state_name,
)
from kvcertsync.errors import SettingsError

# Generous: these bound hangs, they do not measure speed.
TIMEOUT = 15.0

_PENDING = {SERVICE_START_PENDING, SERVICE_STOP_PENDING}
_NEXT_STATES = {
    SERVICE_START_PENDING: {
        SERVICE_START_PENDING,
        SERVICE_RUNNING,
        SERVICE_STOP_PENDING,
        SERVICE_STOPPED,
    },
    SERVICE_RUNNING: {SERVICE_RUNNING, SERVICE_STOP_PENDING, SERVICE_STOPPED},
    SERVICE_STOP_PENDING: {SERVICE_STOP_PENDING, SERVICE_STOPPED},
    SERVICE_STOPPED: set(),
}
_ACCEPT_BIT = {
    SERVICE_CONTROL_STOP: SERVICE_ACCEPT_STOP,
    SERVICE_CONTROL_SHUTDOWN: SERVICE_ACCEPT_SHUTDOWN,
    SERVICE_CONTROL_PARAMCHANGE: SERVICE_ACCEPT_PARAMCHANGE,
}


class FakeScm:
    """The SCM's half of SetServiceStatus and ControlService, with the rules Windows applies.

    Status rules (SetServiceStatus, SERVICE_STATUS): the first report is START_PENDING; RUNNING
    only follows START_PENDING; nothing follows STOPPED (a second STOPPED can crash a process);
    within a pending state the checkpoint rises and the next report comes within the wait hint;
    outside pending states the checkpoint is 0; exit codes only with STOPPED, a service-specific
    code only with ERROR_SERVICE_SPECIFIC_ERROR. Control rules (ControlService's state table):
    STOPPED -> ERROR_SERVICE_NOT_ACTIVE; STOP_PENDING -> ERROR_SERVICE_CANNOT_ACCEPT_CTRL;
    START_PENDING takes only STOP, and only if accepted; RUNNING takes what it accepts (and
    INTERROGATE always), else ERROR_INVALID_SERVICE_CONTROL. One control at a time.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._control_lock = threading.Lock()
        self._handler: Callable[[int], int] | None = None
        self._last_at = 0.0
        self.reports: list[StatusReport] = []
        self.timeline: list[str] = []
        self.violations: list[str] = []

    # -- the service's side --

    def connect(self, handler: Callable[[int], int]) -> None:
        """RegisterServiceCtrlHandlerEx: where controls go."""
        self._handler = handler

    def set_status(self, report: StatusReport) -> None:
        """SetServiceStatus."""
        now = time.monotonic()
        with self._cond:
            self._check(report, now)
            self.reports.append(report)
            self.timeline.append(f"status {state_name(report.state)} cp={report.checkpoint}")
            self._last_at = now
            self._cond.notify_all()

    def set_status_tuple(self, status: Sequence[int]) -> None:
        """SetServiceStatus as pywin32 passes it: a 7-tuple starting with the service type."""
        if len(status) != 7 or status[0] != SERVICE_WIN32_OWN_PROCESS:
            self.violations.append(f"bad SERVICE_STATUS tuple {tuple(status)}")
        self.set_status(StatusReport(*status[1:]))

    def note(self, text: str) -> None:
        """Put something the agent did on the same timeline as the reports."""
        with self._cond:
            self.timeline.append(text)

    def _check(self, report: StatusReport, now: float) -> None:
        fail = self.violations.append
        prev = self.reports[-1] if self.reports else None
        if report.state not in _NEXT_STATES:
            fail(f"unknown state {report.state}")
            return
        if prev is None:
            if report.state != SERVICE_START_PENDING:
                fail(f"first report is {state_name(report.state)}, not START_PENDING")
        else:
            if report.state not in _NEXT_STATES[prev.state]:
                fail(f"{state_name(prev.state)} -> {state_name(report.state)} is not a transition")
            if prev.state in _PENDING and now - self._last_at > prev.wait_hint_ms / 1000:
                fail(f"hung: no report within the {prev.wait_hint_ms} ms wait hint")
            if (
                report.state == prev.state
                and report.state in _PENDING
                and report.checkpoint <= prev.checkpoint
            ):
                fail(f"checkpoint did not rise: {prev.checkpoint} -> {report.checkpoint}")
        if report.state in _PENDING and report.wait_hint_ms <= 0:
            fail(f"{state_name(report.state)} without a wait hint")
        if report.state not in _PENDING and report.checkpoint != 0:
            fail(f"{state_name(report.state)} with checkpoint {report.checkpoint}")
        if report.state != SERVICE_STOPPED and (report.win32_exit_code or report.service_exit_code):
            fail(f"exit codes with {state_name(report.state)}")
        if report.service_exit_code and report.win32_exit_code != ERROR_SERVICE_SPECIFIC_ERROR:
            fail("a service-specific exit code without ERROR_SERVICE_SPECIFIC_ERROR")

    # -- the SCM's side --

    @property
    def last(self) -> StatusReport | None:
        with self._cond:
            return self.reports[-1] if self.reports else None

    def control(self, code: int) -> int:
        """ControlService: deliver ``code`` if the state and the accepted mask allow it."""
        with self._control_lock:
            last = self.last
            state = last.state if last is not None else SERVICE_START_PENDING
            accepted = last.controls_accepted if last is not None else 0
            if state == SERVICE_STOPPED:
                return ERROR_SERVICE_NOT_ACTIVE
            if state == SERVICE_STOP_PENDING:
                return ERROR_SERVICE_CANNOT_ACCEPT_CTRL
            if state == SERVICE_START_PENDING and code != SERVICE_CONTROL_STOP:
                return ERROR_SERVICE_CANNOT_ACCEPT_CTRL
            if code != SERVICE_CONTROL_INTERROGATE and not accepted & _ACCEPT_BIT.get(code, 0):
                return ERROR_INVALID_SERVICE_CONTROL
            return self._deliver(code)

    def system_shutdown(self) -> int | None:
        """The system is shutting down: SHUTDOWN goes to services that accept it."""
        with self._control_lock:
            last = self.last
            if last is None or last.state in (SERVICE_STOPPED, SERVICE_STOP_PENDING):
                return None
            if not last.controls_accepted & SERVICE_ACCEPT_SHUTDOWN:
                return None
            return self._deliver(SERVICE_CONTROL_SHUTDOWN)

    def _deliver(self, code: int) -> int:
        assert self._handler is not None, "the service registered no control handler"
        self.note(f"control {code}")
        started = time.monotonic()
        result = self._handler(code)
        if time.monotonic() - started > 10:
            self.violations.append(f"the handler blocked on control {code}")
        return result

    def wait_for(
        self, predicate: Callable[[StatusReport], bool], what: str, timeout: float = TIMEOUT
    ) -> StatusReport:
        """Block until a report satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for report in self.reports:
                    if predicate(report):
                        return report
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; timeline: {self.timeline}")
                self._cond.wait(left)

    def wait_state(self, state: int, timeout: float = TIMEOUT) -> StatusReport:
        return self.wait_for(lambda r: r.state == state, state_name(state), timeout)

    def wait_reports(self, count: int, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.reports) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"only {len(self.reports)} reports: {self.timeline}")
                self._cond.wait(left)

    @property
    def states(self) -> list[int]:
        with self._cond:
            return [r.state for r in self.reports]

    def assert_clean(self) -> StatusReport:
        """No rule broken, and the service ended with exactly one STOPPED; returns it."""
        with self._cond:
            assert self.violations == [], self.timeline
            assert self.reports, "no report at all"
            assert [r.state for r in self.reports].count(SERVICE_STOPPED) == 1, self.timeline
            assert self.reports[-1].state == SERVICE_STOPPED, self.timeline
            return self.reports[-1]


def collapse(states: Sequence[int]) -> list[str]:
    """States with repeats folded: [2, 2, 4, 3, 3, 1] -> START_PENDING, RUNNING, ..."""
    out: list[str] = []
    for state in states:
        name = state_name(state)
        if not out or out[-1] != name:
            out.append(name)
    return out


# -- fake agents -----------------------------------------------------------------------------


class FakeAgent:
    """The daemon's interface, driven by knobs: when to become ready, how to end."""

    def __init__(
        self,
        notifier: Notifier,
        scm: FakeScm,
        *,
        ready_after: float | None = None,
        ready_gate: threading.Event | None = None,
        exit_after: float | None = None,
        exit_status: int = 0,
        fail_after: float | None = None,
        failure: BaseException | None = None,
        in_task_group: bool = False,
        tick: float = 0.02,
    ) -> None:
        self.notifier = notifier
        self.scm = scm
        self.ready_after = ready_after
        self.ready_gate = ready_gate
        self.exit_after = exit_after
        self.exit_status = exit_status
        self.fail_after = fail_after
        self.failure = failure
        self.in_task_group = in_task_group
        self.tick = tick
        self.stop_requests = 0
        self._stop = threading.Event()

    def request_stop(self) -> None:
        # Thread-safe and usable before run(), as the real Agent's must be.
        self.stop_requests += 1
        self._stop.set()

    async def run(self) -> int:
        if self.in_task_group:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._loop)
            return 0
        return await self._loop()

    async def _loop(self) -> int:
        started = time.monotonic()
        is_ready = False
        while not self._stop.is_set():
            elapsed = time.monotonic() - started
            self.notifier.alive()
            if self.fail_after is not None and elapsed >= self.fail_after:
                assert self.failure is not None
                raise self.failure
            if self.exit_after is not None and elapsed >= self.exit_after:
                return self.exit_status
            if not is_ready and self._ready_now(elapsed):
                self.scm.note("agent: ready()")
                self.notifier.ready()
                is_ready = True
            await anyio.sleep(self.tick)
        self.notifier.stopping()
        await anyio.sleep(0.05)  # the graceful part of the stop
        self.notifier.alive()
        return 0

    def _ready_now(self, elapsed: float) -> bool:
        if self.ready_gate is not None:
            return self.ready_gate.is_set()
        return self.ready_after is not None and elapsed >= self.ready_after


class ReloadableAgent(FakeAgent):
    def __init__(self, notifier: Notifier, scm: FakeScm, **knobs: Any) -> None:
        super().__init__(notifier, scm, **knobs)
        self.reloads = 0

    def request_reload(self) -> None:
        self.reloads += 1


class Service:
    """run_service in a service thread of its own, with the test thread as the SCM's."""

    def __init__(self, factory: Callable[[Notifier], AgentLike], scm: FakeScm | None = None):
        self.scm = scm or FakeScm()
        self.notifier = ScmNotifier(self.scm)
        self.scm.connect(self.notifier.handle_control)
        self.agents: list[AgentLike] = []
        self.outcome: ServiceExit | None = None
        self.error: BaseException | None = None

        def build(notifier: Notifier) -> AgentLike:
            agent = factory(notifier)
            self.agents.append(agent)
            return agent

        def main() -> None:
            try:
                self.outcome = run_service(self.notifier, build)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=main, name="service-main", daemon=True)
        self.thread.start()

    @property
    def agent(self) -> Any:
        assert self.agents, "the factory has not run yet"
        return self.agents[0]

    def join(self, timeout: float = TIMEOUT) -> ServiceExit:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the service did not stop: {self.scm.timeline}"
        assert self.error is None, self.error
        assert self.outcome is not None
        return self.outcome

    def shutdown(self) -> None:
        """Teardown: stop whatever is still running so no thread outlives its test."""
        if self.thread.is_alive():
            for agent in self.agents:
                agent.request_stop()
            self.thread.join(TIMEOUT)


@pytest.fixture
def services() -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def start(factory: Callable[[Notifier], AgentLike], scm: FakeScm | None = None) -> Service:
        service = Service(factory, scm)
        started.append(service)
        return service

    yield start
    for service in started:
        service.shutdown()


def agent(cls: type[FakeAgent] = FakeAgent, **knobs: Any) -> Callable[[FakeScm], Any]:
    """A factory maker: the Service's FakeScm is only known once the service exists."""
    return lambda scm: lambda notifier: cls(notifier, scm, **knobs)


def start(services: Callable[..., Service], make: Callable[[FakeScm], Any]) -> Service:
    scm = FakeScm()
    return services(make(scm), scm)


def accepts_stop(report: StatusReport) -> bool:
    return bool(report.controls_accepted & SERVICE_ACCEPT_STOP)


# -- the host and the notifier, through the fake SCM -------------------------------------------


def test_running_is_reported_only_after_ready(services: Callable[..., Service]) -> None:
    service = start(services, agent(ready_after=0.3))
    scm = service.scm
    running = scm.wait_state(SERVICE_RUNNING)

    timeline = scm.timeline
    first_running = next(i for i, line in enumerate(timeline) if line.startswith("status RUNNING"))
    assert "agent: ready()" in timeline[:first_running]
    assert set(scm.states[: scm.states.index(SERVICE_RUNNING)]) == {SERVICE_START_PENDING}
    assert running.controls_accepted == SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN

    assert scm.control(SERVICE_CONTROL_STOP) == NO_ERROR
    outcome = service.join()
    stopped = scm.assert_clean()
    assert collapse(scm.states) == ["START_PENDING", "RUNNING", "STOP_PENDING", "STOPPED"]
    assert (stopped.win32_exit_code, stopped.service_exit_code) == (NO_ERROR, 0)
    assert outcome == ServiceExit(0)
    assert service.agent.stop_requests == 1


def test_alive_keeps_the_start_pending_checkpoint_rising(
    services: Callable[..., Service],
) -> None:
    service = start(services, agent())  # an initial sync that never succeeds
    scm = service.scm
    scm.wait_reports(15)

    pending = [r for r in scm.reports if r.state == SERVICE_START_PENDING]
    assert len(pending) >= 15
    checkpoints = [r.checkpoint for r in pending]
    assert checkpoints == sorted(set(checkpoints)), checkpoints
    assert all(r.wait_hint_ms > 0 for r in pending)
    assert scm.violations == []

    assert scm.control(SERVICE_CONTROL_STOP) == NO_ERROR
    service.join()
    scm.assert_clean()
    assert SERVICE_RUNNING not in scm.states


def test_stop_while_start_pending_stops_gracefully(services: Callable[..., Service]) -> None:
    service = start(services, agent())  # never ready
    scm = service.scm
    scm.wait_for(accepts_stop, "START_PENDING accepting STOP")

    began = time.monotonic()
    assert scm.control(SERVICE_CONTROL_STOP) == NO_ERROR
    outcome = service.join()
    assert time.monotonic() - began < TIMEOUT

    stopped = scm.assert_clean()
    assert collapse(scm.states) == ["START_PENDING", "STOP_PENDING", "STOPPED"]
    assert (stopped.win32_exit_code, stopped.service_exit_code) == (NO_ERROR, 0)
    assert outcome.status == 0
    assert service.agent.stop_requests == 1
    # Once STOP_PENDING is out the SCM refuses further controls; the service never sees them.
    assert scm.control(SERVICE_CONTROL_STOP) == ERROR_SERVICE_NOT_ACTIVE


def test_stop_is_refused_until_the_agent_exists(services: Callable[..., Service]) -> None:
    built = threading.Event()
    release = threading.Event()
    scm = FakeScm()

    def slow_factory(notifier: Notifier) -> AgentLike:
        built.set()
        release.wait(TIMEOUT)
        return FakeAgent(notifier, scm)

    service = services(slow_factory, scm)
    assert built.wait(TIMEOUT)
    first = scm.wait_state(SERVICE_START_PENDING)
    assert first.controls_accepted == 0
    # Nothing could act on a stop yet, so the service does not claim to accept one.
    assert scm.control(SERVICE_CONTROL_STOP) == ERROR_INVALID_SERVICE_CONTROL

    release.set()
    scm.wait_for(accepts_stop, "STOP accepted once the agent exists")
    assert scm.control(SERVICE_CONTROL_STOP) == NO_ERROR
    service.join()
    scm.assert_clean()


@pytest.mark.parametrize("status", [1, 3, 75])
def test_nonzero_exit_is_a_service_specific_error(
    services: Callable[..., Service], status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvcertsync")
    service = start(services, agent(ready_after=0.0, exit_after=0.2, exit_status=status))
    outcome = service.join()

    stopped = service.scm.assert_clean()
    assert stopped.win32_exit_code == ERROR_SERVICE_SPECIFIC_ERROR == 1066
    assert stopped.service_exit_code == status
    assert outcome.status == status
    assert f"exit status {status}" in caplog.text


def test_initial_sync_giving_up_stops_from_start_pending(
    services: Callable[..., Service],
) -> None:
    service = start(services, agent(exit_after=0.2, exit_status=1))  # never ready, then gives up
    service.join()
    stopped = service.scm.assert_clean()
    assert collapse(service.scm.states) == ["START_PENDING", "STOPPED"]
    assert (stopped.win32_exit_code, stopped.service_exit_code) == (1066, 1)


def test_an_exception_stops_the_service_with_one_log_line(
    services: Callable[..., Service], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="kvcertsync")
    failure = RuntimeError("vault\nunreachable")
    service = start(services, agent(ready_after=0.0, fail_after=0.2, failure=failure))
    outcome = service.join()

    stopped = service.scm.assert_clean()
    assert stopped.win32_exit_code == ERROR_EXCEPTION_IN_SERVICE
    assert stopped.service_exit_code == 0
    assert outcome.status == 1
    assert outcome.error == "RuntimeError: vault unreachable"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        "kvcertsync service: the agent failed: RuntimeError: vault unreachable"
    ]
    assert all(r.exc_info is None for r in caplog.records)
    assert "Traceback" not in caplog.text


def test_a_failure_inside_a_task_group_is_named_not_the_group(
    services: Callable[..., Service],
) -> None:
    failure = OSError("connection reset")
    service = start(services, agent(fail_after=0.1, failure=failure, in_task_group=True))
    outcome = service.join()
    service.scm.assert_clean()
    assert outcome.error == "OSError: connection reset"


def test_a_factory_error_is_reported_like_the_cli_reports_it(
    services: Callable[..., Service],
) -> None:
    def factory(notifier: Notifier) -> AgentLike:
        raise SettingsError(
            "must be a string", path="$.secretsManagementSettings.pollingIntervalInS"
        )

    service = services(factory)
    outcome = service.join()
    stopped = service.scm.assert_clean()
    assert collapse(service.scm.states) == ["START_PENDING", "STOPPED"]
    # The CLI exits 1 for a KvCertSyncError; the service says 1 the Windows way.
    assert (stopped.win32_exit_code, stopped.service_exit_code) == (1066, 1)
    assert outcome.error is not None and outcome.error.startswith("SettingsError: $.secrets")


def test_system_shutdown_is_a_graceful_stop(services: Callable[..., Service]) -> None:
    service = start(services, agent(ready_after=0.0))
    service.scm.wait_state(SERVICE_RUNNING)
    assert service.scm.system_shutdown() == NO_ERROR
    outcome = service.join()
    service.scm.assert_clean()
    assert collapse(service.scm.states)[-2:] == ["STOP_PENDING", "STOPPED"]
    assert outcome.status == 0


def test_paramchange_reloads_a_reloadable_agent_once_running(
    services: Callable[..., Service],
) -> None:
    gate = threading.Event()
    service = start(services, agent(ReloadableAgent, ready_gate=gate))
    scm = service.scm
    scm.wait_for(accepts_stop, "START_PENDING accepting STOP")
    pending = scm.last
    assert pending is not None and not pending.controls_accepted & SERVICE_ACCEPT_PARAMCHANGE
    assert scm.control(SERVICE_CONTROL_PARAMCHANGE) == ERROR_SERVICE_CANNOT_ACCEPT_CTRL

    gate.set()
    running = scm.wait_state(SERVICE_RUNNING)
    assert running.controls_accepted & SERVICE_ACCEPT_PARAMCHANGE
    assert scm.control(SERVICE_CONTROL_PARAMCHANGE) == NO_ERROR
    assert scm.control(SERVICE_CONTROL_PARAMCHANGE) == NO_ERROR
    assert service.agent.reloads == 2
    assert scm.last is not None and scm.last.state == SERVICE_RUNNING

    assert scm.control(SERVICE_CONTROL_STOP) == NO_ERROR
    service.join()
    scm.assert_clean()


def test_paramchange_is_not_accepted_without_request_reload(
    services: Callable[..., Service],
) -> None:
    service = start(services, agent(ready_after=0.0))
    running = service.scm.wait_state(SERVICE_RUNNING)
    assert not running.controls_accepted & SERVICE_ACCEPT_PARAMCHANGE
    assert service.scm.control(SERVICE_CONTROL_PARAMCHANGE) == ERROR_INVALID_SERVICE_CONTROL
    assert service.scm.control(SERVICE_CONTROL_PAUSE) == ERROR_INVALID_SERVICE_CONTROL
    reports = len(service.scm.reports)
    assert service.scm.control(SERVICE_CONTROL_INTERROGATE) == NO_ERROR
    assert len(service.scm.reports) == reports  # the SCM knows the status already
    assert service.scm.control(SERVICE_CONTROL_STOP) == NO_ERROR
    service.join()
    service.scm.assert_clean()


def test_a_stop_racing_the_agents_ready_never_reports_running_after_stop_pending(
    services: Callable[..., Service],
) -> None:
    gate = threading.Event()
    service = start(services, agent(ready_gate=gate, tick=0.001))
    scm = service.scm
    scm.wait_for(accepts_stop, "START_PENDING accepting STOP")
    gate.set()  # ready() and the stop now race
    # START_PENDING and RUNNING both accept STOP, whichever won.
    assert scm.control(SERVICE_CONTROL_STOP) == NO_ERROR
    service.join()
    scm.assert_clean()  # includes: nothing but STOP_PENDING/STOPPED after STOP_PENDING


# -- the notifier on its own ------------------------------------------------------------------


class RecordingScm:
    def __init__(self, fail: bool = False) -> None:
        self.reports: list[StatusReport] = []
        self.fail = fail

    def set_status(self, report: StatusReport) -> None:
        if self.fail:
            raise OSError("SetServiceStatus failed")
        self.reports.append(report)


def test_notifier_reports_each_transition_once() -> None:
    scm = RecordingScm()
    notifier = ScmNotifier(scm)
    notifier.starting()
    notifier.starting()
    stops: list[str] = []
    notifier.attach(lambda: stops.append("stop"))
    notifier.status("initial sync: 0 of 2 certificates installed")
    notifier.ready()
    notifier.ready()
    notifier.alive()  # nothing is pending: nothing to report
    notifier.reloading()
    notifier.ready()
    notifier.stopping()
    notifier.ready()  # too late
    notifier.stopped(ServiceExit(0))
    notifier.stopped(ServiceExit.from_status(2))

    assert [state_name(r.state) for r in scm.reports] == [
        "START_PENDING",
        "START_PENDING",
        "RUNNING",
        "STOP_PENDING",
        "STOPPED",
    ]
    assert [r.checkpoint for r in scm.reports] == [1, 2, 0, 3, 0]
    assert scm.reports[-1] == StatusReport(SERVICE_STOPPED)
    assert notifier.status_text == "initial sync: 0 of 2 certificates installed"
    assert stops == []


def test_notifier_attached_after_an_early_ready_still_accepts_stop() -> None:
    scm = RecordingScm()
    notifier = ScmNotifier(scm)
    notifier.starting()
    notifier.ready()
    assert scm.reports[-1].controls_accepted == 0
    notifier.attach(lambda: None)
    assert scm.reports[-1].state == SERVICE_RUNNING
    assert scm.reports[-1].controls_accepted == SERVICE_ACCEPT_STOP | SERVICE_ACCEPT_SHUTDOWN


def test_notifier_never_raises_into_the_agent(caplog: pytest.LogCaptureFixture) -> None:
    notifier = ScmNotifier(RecordingScm(fail=True))
    notifier.starting()
    notifier.alive()
    notifier.ready()
    notifier.stopping()
    notifier.stopped(ServiceExit(0))
    assert "SetServiceStatus failed" in caplog.text


def test_control_handler_results() -> None:
    scm = RecordingScm()
    notifier = ScmNotifier(scm)
    notifier.starting()

    def broken_stop() -> None:
        raise RuntimeError("boom")

    assert notifier.handle_control(SERVICE_CONTROL_STOP) == ws.ERROR_CALL_NOT_IMPLEMENTED
    notifier.attach(broken_stop)
    assert notifier.handle_control(SERVICE_CONTROL_PAUSE) == ws.ERROR_CALL_NOT_IMPLEMENTED
    assert notifier.handle_control(0x80) == ws.ERROR_CALL_NOT_IMPLEMENTED
    assert notifier.handle_control(SERVICE_CONTROL_STOP) == ERROR_EXCEPTION_IN_SERVICE
    assert notifier.state == SERVICE_STOP_PENDING
    assert notifier.handle_control(SERVICE_CONTROL_STOP) == NO_ERROR  # already stopping
    notifier.stopped(ServiceExit(0))
    assert notifier.handle_control(SERVICE_CONTROL_SHUTDOWN) == NO_ERROR
    assert notifier.controls_accepted == 0


def test_a_stop_after_the_agent_returned_is_reported_but_not_delivered() -> None:
    scm = RecordingScm()
    notifier = ScmNotifier(scm)
    stops: list[str] = []
    notifier.starting()
    notifier.attach(lambda: stops.append("stop"), lambda: stops.append("reload"))
    notifier.ready()
    notifier.detach()  # run() has returned; STOPPED is about to follow
    assert notifier.handle_control(SERVICE_CONTROL_PARAMCHANGE) == ws.ERROR_CALL_NOT_IMPLEMENTED
    assert notifier.handle_control(SERVICE_CONTROL_STOP) == NO_ERROR
    assert stops == []
    notifier.stopped(ServiceExit(0))
    assert [state_name(r.state) for r in scm.reports][-2:] == ["STOP_PENDING", "STOPPED"]


@pytest.mark.parametrize(
    ("status", "codes"),
    [(0, (0, 0)), (1, (1066, 1)), (255, (1066, 255)), (-1, (1066, 1)), (2**32, (1066, 1))],
)
def test_exit_status_mapping(status: int, codes: tuple[int, int]) -> None:
    exit = ServiceExit.from_status(status)
    assert (exit.win32_exit_code, exit.service_exit_code) == codes
    assert exit.status == status


def test_describe_exception_is_one_line_without_traceback() -> None:
    try:
        raise ValueError("line one\n  line two")
    except ValueError as exc:
        assert describe_exception(exc) == "ValueError: line one line two"
    group = ExceptionGroup("unhandled errors in a TaskGroup", [KeyError("x")])
    assert describe_exception(group) == "KeyError: 'x'"
    two = ExceptionGroup("two", [KeyError("a"), KeyError("b")])
    assert describe_exception(two).startswith("ExceptionGroup: two")
    assert describe_exception(RuntimeError()) == "RuntimeError"


# -- service_main, command lines --------------------------------------------------------------


def test_service_command_line_quotes_for_windows() -> None:
    line = service_command_line(
        "kvcertsync",
        [r"C:\Program Files\kvcertsync\settings.json", "--store=C:\\certs"],
        executable=r"C:\Program Files\Python312\python.exe",
    )
    assert line == (
        r'"C:\Program Files\Python312\python.exe" -m kvcertsync service --name kvcertsync host'
        r' -- "C:\Program Files\kvcertsync\settings.json" --store=C:\certs'
    )
    assert host_arguments("kv2", []) == ["-m", "kvcertsync", "service", "--name", "kv2", "host"]


@pytest.mark.skipif(sys.platform == "win32", reason="checks the message off Windows")
def test_service_main_off_windows_says_so() -> None:
    with pytest.raises(WindowsServiceError, match=rf"Windows service; this is {sys.platform}"):
        service_main("install", ["/etc/kvcertsync.json"])


def test_service_main_rejects_misuse() -> None:
    with pytest.raises(WindowsServiceError, match="unknown service action 'restart'"):
        service_main("restart")
    with pytest.raises(WindowsServiceError, match="stored by 'install'"):
        service_main("start", ["x.json"])
    with pytest.raises(ValueError, match="agent_factory"):
        service_main("host")


def test_service_main_without_pywin32_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ws, "_is_windows", lambda: True)
    for module in ("servicemanager", "win32service", "win32serviceutil"):
        monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    with pytest.raises(WindowsServiceError, match=r"pip install 'kvcertsync\[windows\]'"):
        service_main("stop")


# -- the pywin32 glue, against a model of pywin32 ----------------------------------------------


class PyWinError(Exception):
    """pywintypes.error: (winerror, funcname, strerror)."""

    def __init__(self, winerror: int, funcname: str, strerror: str) -> None:
        super().__init__(winerror, funcname, strerror)
        self.winerror, self.funcname, self.strerror = winerror, funcname, strerror


class FakePywin32:
    """servicemanager, win32service and win32serviceutil as far as the glue uses them.

    StartServiceCtrlDispatcher models PythonService.cpp's service_main: instantiate the class
    (whose ServiceFramework.__init__ registers the control handler), report START_PENDING with
    checkpoint 0, call SvcRun, then report STOPPED itself -- 0/0, or ERROR_SERVICE_SPECIFIC_ERROR
    with 0x20000001 if SvcRun raised, logging the traceback as ReportPythonError does.
    """

    def __init__(self, scm: FakeScm, service_name: str = "kvcertsync") -> None:
        self.scm = scm
        self.service_name = service_name
        self.events: list[tuple[str, str]] = []
        self.python_errors: list[str] = []
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.dispatcher_error: PyWinError | None = None
        self.install_error: PyWinError | None = None
        self.control_error: PyWinError | None = None
        self.query_states: list[tuple[int, int, int]] = [(SERVICE_STOPPED, 0, 0)]
        self.klass: Any = None
        self.servicemanager = self._servicemanager()
        self.win32service = self._win32service()
        self.win32serviceutil = self._win32serviceutil()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(ws, "_is_windows", lambda: True)
        monkeypatch.setattr(ws.time, "sleep", lambda seconds: None)
        for name in ("servicemanager", "win32service", "win32serviceutil"):
            monkeypatch.setitem(sys.modules, name, getattr(self, name))

    def _record(self, name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, args, kwargs))
            return None

        return call

    def _servicemanager(self) -> types.ModuleType:
        fake = self
        module = types.ModuleType("servicemanager")
        module.Initialize = self._record("Initialize")  # type: ignore[attr-defined]
        module.SetEventSourceName = self._record("SetEventSourceName")  # type: ignore[attr-defined]
        module.LogErrorMsg = lambda msg: fake.events.append(("error", msg))  # type: ignore[attr-defined]
        module.LogWarningMsg = lambda msg: fake.events.append(("warning", msg))  # type: ignore[attr-defined]
        module.LogInfoMsg = lambda msg: fake.events.append(("info", msg))  # type: ignore[attr-defined]

        def register(name: str, callback: Callable[[int, int, Any], int], ex: bool) -> str:
            assert ex, "the glue wants HandlerEx's arguments"
            fake.scm.connect(lambda control: callback(control, 0, None))
            return "status-handle"

        def prepare(klass: Any) -> None:
            fake.klass = klass

        def dispatch() -> None:
            if fake.dispatcher_error is not None:
                raise fake.dispatcher_error
            thread = threading.Thread(target=fake._service_main, name="pywin32-service_main")
            thread.start()
            thread.join()

        module.RegisterServiceCtrlHandler = register  # type: ignore[attr-defined]
        module.PrepareToHostSingle = prepare  # type: ignore[attr-defined]
        module.StartServiceCtrlDispatcher = dispatch  # type: ignore[attr-defined]
        return module

    def _service_main(self) -> None:
        instance = self.klass([self.service_name])
        set_status = self.win32service.SetServiceStatus
        set_status(
            "status-handle", (SERVICE_WIN32_OWN_PROCESS, SERVICE_START_PENDING, 0, 0, 0, 0, 5000)
        )
        failed = False
        try:
            instance.SvcRun()
        except Exception:
            failed = True
            self.python_errors.append(traceback.format_exc())
        stopped = (1066, 0x20000001) if failed else (0, 0)
        set_status("status-handle", (SERVICE_WIN32_OWN_PROCESS, SERVICE_STOPPED, 0, *stopped, 0, 0))

    def _win32service(self) -> types.ModuleType:
        fake = self
        module = types.ModuleType("win32service")
        module.error = PyWinError  # type: ignore[attr-defined]

        def set_status(handle: Any, status: tuple[int, ...]) -> None:
            assert handle == "status-handle"
            fake.scm.set_status_tuple(status)

        module.SetServiceStatus = set_status  # type: ignore[attr-defined]
        return module

    def _win32serviceutil(self) -> types.ModuleType:
        fake = self
        module = types.ModuleType("win32serviceutil")
        servicemanager = self.servicemanager

        class ServiceFramework:
            _svc_name_: str = ""

            def __init__(self, args: Sequence[str]) -> None:
                self.ssh = servicemanager.RegisterServiceCtrlHandler(
                    args[0], self.ServiceCtrlHandlerEx, True
                )
                servicemanager.SetEventSourceName(self._svc_name_)

            def ServiceCtrlHandlerEx(self, control: int, event_type: int, data: Any) -> int:
                raise AssertionError("the subclass must route controls itself")

            def SvcRun(self) -> None:
                raise AssertionError("pywin32's SvcRun reports RUNNING at once")

        def install_service(*args: Any, **kwargs: Any) -> None:
            fake.calls.append(("InstallService", args, kwargs))
            if fake.install_error is not None:
                raise fake.install_error

        def failing(name: str) -> Callable[..., None]:
            def call(*args: Any, **kwargs: Any) -> None:
                fake.calls.append((name, args, kwargs))
                if fake.control_error is not None:
                    raise fake.control_error

            return call

        def query(name: str) -> tuple[int, ...]:
            fake.calls.append(("QueryServiceStatus", (name,), {}))
            state, win32, specific = (
                fake.query_states.pop(0) if len(fake.query_states) > 1 else fake.query_states[0]
            )
            return (SERVICE_WIN32_OWN_PROCESS, state, 0, win32, specific, 0, 0)

        module.ServiceFramework = ServiceFramework  # type: ignore[attr-defined]
        module.InstallService = install_service  # type: ignore[attr-defined]
        module.ChangeServiceConfig = self._record("ChangeServiceConfig")  # type: ignore[attr-defined]
        module.RemoveService = failing("RemoveService")  # type: ignore[attr-defined]
        module.StartService = failing("StartService")  # type: ignore[attr-defined]
        module.StopService = failing("StopService")  # type: ignore[attr-defined]
        module.QueryServiceStatus = query  # type: ignore[attr-defined]
        return module

    def called(self, name: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        return [(args, kwargs) for n, args, kwargs in self.calls if n == name]


class Host:
    """service_main('host') in the thread pywin32's dispatcher would block in."""

    def __init__(self, fake: FakePywin32, factory: Callable[[Notifier], AgentLike]) -> None:
        self.fake = fake
        self.status: int | None = None
        self.error: BaseException | None = None
        self.agents: list[Any] = []

        def build(notifier: Notifier) -> AgentLike:
            built = factory(notifier)
            self.agents.append(built)
            return built

        def main() -> None:
            try:
                self.status = service_main("host", name="kvcertsync", agent_factory=build)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=main, name="dispatcher", daemon=True)
        self.thread.start()

    def join(self) -> int:
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), self.fake.scm.timeline
        assert self.error is None, self.error
        assert self.status is not None
        return self.status

    def shutdown(self) -> None:
        if self.thread.is_alive():
            for built in self.agents:
                built.request_stop()
            self.thread.join(TIMEOUT)


@pytest.fixture
def pywin32(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePywin32]:
    fake = FakePywin32(FakeScm())
    fake.install(monkeypatch)
    hosts: list[Host] = []
    fake.hosts = hosts  # type: ignore[attr-defined]
    yield fake
    for host in hosts:
        host.shutdown()


def host(fake: FakePywin32, **knobs: Any) -> Host:
    started = Host(fake, lambda notifier: FakeAgent(notifier, fake.scm, **knobs))
    fake.hosts.append(started)  # type: ignore[attr-defined]
    return started


def test_glue_hosts_the_agent_and_pywin32_reports_the_one_stopped(
    pywin32: FakePywin32,
) -> None:
    started = host(pywin32, ready_after=0.2)
    scm = pywin32.scm
    scm.wait_state(SERVICE_RUNNING)
    assert "agent: ready()" in scm.timeline
    assert scm.reports[0] == StatusReport(SERVICE_START_PENDING, wait_hint_ms=5000)  # pywin32's
    assert scm.control(SERVICE_CONTROL_STOP) == NO_ERROR
    assert started.join() == 0

    stopped = scm.assert_clean()
    assert (stopped.win32_exit_code, stopped.service_exit_code) == (0, 0)
    assert collapse(scm.states) == ["START_PENDING", "RUNNING", "STOP_PENDING", "STOPPED"]
    assert pywin32.python_errors == []
    assert pywin32.called("Initialize") == [(("kvcertsync",), {})]


def test_glue_turns_a_nonzero_exit_into_pywin32s_error_stop(pywin32: FakePywin32) -> None:
    started = host(pywin32, ready_after=0.0, exit_after=0.2, exit_status=3)
    assert started.join() == 3

    stopped = pywin32.scm.assert_clean()  # one STOPPED: the glue did not report its own
    assert stopped.win32_exit_code == ERROR_SERVICE_SPECIFIC_ERROR
    assert stopped.service_exit_code == 0x20000001  # pywin32's, not ours (see the docs)
    assert ("warning", "kvcertsync service: the agent stopped with exit status 3") in (
        pywin32.events
    )
    [logged] = pywin32.python_errors
    assert (
        "ServiceFailed: kvcertsync service 'kvcertsync': the agent stopped with exit status 3"
        in (logged)
    )


def test_glue_never_puts_the_agents_traceback_in_the_event_log(pywin32: FakePywin32) -> None:
    failure = RuntimeError("token endpoint refused")
    started = host(pywin32, fail_after=0.1, failure=failure)
    assert started.join() == 1

    pywin32.scm.assert_clean()
    assert (
        "error",
        "kvcertsync service: the agent failed: RuntimeError: token endpoint refused",
    ) in (pywin32.events)
    [logged] = pywin32.python_errors
    # The one traceback pywin32 writes is ServiceFailed's: no agent frame, no chained exception.
    assert "_loop" not in logged
    assert "During handling" not in logged
    assert "direct cause" not in logged


def test_glue_host_run_from_a_console_explains(pywin32: FakePywin32) -> None:
    pywin32.dispatcher_error = PyWinError(
        1063, "StartServiceCtrlDispatcher", "The service process could not connect"
    )
    with pytest.raises(WindowsServiceError, match="kvcertsync run"):
        service_main("host", agent_factory=lambda notifier: FakeAgent(notifier, pywin32.scm))


def test_install_registers_python_exe_with_the_run_options(
    pywin32: FakePywin32, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "settings.json").write_text("{}")
    out = io.StringIO()
    run_args = ["settings.json", "--log-file", r"C:\ProgramData\kvcertsync\agent.log"]
    assert service_main("install", run_args, out=out) == 0

    [(args, kwargs)] = pywin32.called("InstallService")
    assert args[:2] == (None, "kvcertsync")  # no PythonClass key: pythonservice.exe is not used
    assert kwargs["exeName"] == sys.executable
    assert kwargs["exeArgs"] == subprocess.list2cmdline(host_arguments("kvcertsync", run_args))
    assert kwargs["startType"] == ws.SERVICE_AUTO_START
    assert pywin32.called("SetEventSourceName") == [(("kvcertsync", True), {})]
    assert "'settings.json' is a relative path" in out.getvalue()
    assert "service 'kvcertsync' installed" in out.getvalue()


def test_install_over_an_existing_service_updates_it(pywin32: FakePywin32) -> None:
    pywin32.install_error = PyWinError(
        1073, "CreateService", "The specified service already exists"
    )
    out = io.StringIO()
    assert service_main("install", [r"C:\kv\settings.json"], name="kv2", out=out) == 0
    [(args, kwargs)] = pywin32.called("ChangeServiceConfig")
    assert args == (None, "kv2")
    assert kwargs["displayName"].endswith("(kv2)")
    assert "updated" in out.getvalue()


def test_install_without_rights_says_to_elevate(pywin32: FakePywin32) -> None:
    pywin32.install_error = PyWinError(5, "OpenSCManager", "Access is denied.")
    with pytest.raises(WindowsServiceError, match="elevated prompt"):
        service_main("install", out=io.StringIO())


def test_start_waits_for_running(pywin32: FakePywin32) -> None:
    pywin32.query_states = [(SERVICE_START_PENDING, 0, 0)] * 3 + [(SERVICE_RUNNING, 0, 0)]
    out = io.StringIO()
    assert service_main("start", out=out) == 0
    assert "is running" in out.getvalue()


def test_start_reports_a_failed_start(pywin32: FakePywin32) -> None:
    pywin32.query_states = [(SERVICE_START_PENDING, 0, 0), (SERVICE_STOPPED, 1066, 1)]
    with pytest.raises(WindowsServiceError, match="service-specific exit code 1"):
        service_main("start", out=io.StringIO())


def test_stop_of_a_stopped_service_is_fine(pywin32: FakePywin32) -> None:
    pywin32.control_error = PyWinError(1062, "ControlService", "The service has not been started.")
    out = io.StringIO()
    assert service_main("stop", out=out) == 0
    assert "not running" in out.getvalue()


def test_remove_stops_first_then_removes(pywin32: FakePywin32) -> None:
    pywin32.query_states = [
        (SERVICE_RUNNING, 0, 0),
        (SERVICE_STOP_PENDING, 0, 0),
        (SERVICE_STOPPED, 0, 0),
    ]
    out = io.StringIO()
    assert service_main("remove", out=out) == 0
    names = [name for name, _, _ in pywin32.calls]
    assert names.index("StopService") < names.index("RemoveService")
    assert "removed" in out.getvalue()


def test_remove_of_a_missing_service_says_how_to_install(pywin32: FakePywin32) -> None:
    def missing(name: str) -> tuple[int, ...]:
        raise PyWinError(1060, "OpenService", "The specified service does not exist")

    pywin32.win32serviceutil.QueryServiceStatus = missing  # type: ignore[attr-defined]
    with pytest.raises(WindowsServiceError, match="kvcertsync service --name kvcertsync install"):
        service_main("remove", name="kvcertsync", out=io.StringIO())
