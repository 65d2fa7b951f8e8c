"""The daemon behind ``kvcertsync run``: the Key Vault VM extension as a service an operator runs.

One Agent reads the extension's settings (a file, stdin, or the VM agent's handler folders),
builds credential, source, store and engine, and runs until stopped: SIGTERM/SIGINT stop it
gracefully at any moment, SIGHUP re-reads the settings, the status file says where every
certificate stands, and the supervisor (systemd, the Windows SCM) hears of readiness.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import ssl
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.abc
import attrs

from kvcertsync.agent.compose import (
    consumer_paths,
    describe_store,
    reconfigure,
    store_from_spec,
    sync_from_settings,
)
from kvcertsync.agent.handler import HandlerEnvironment
from kvcertsync.agent.notify import Notifier, NullNotifier
from kvcertsync.agent.push import push_server
from kvcertsync.agent.reloads import Change, HookConfig, ReloadHooks
from kvcertsync.agent.status import (
    FILE_LIMIT,
    STATUS_FILE_NAME,
    CertificateStatus,
    Phase,
    StatusReport,
    certificates,
    default_state_dir,
    heartbeat_document,
    status_document,
    summarize,
    write_json_atomic,
)
from kvcertsync.engine import CertSync, InitialSyncError
from kvcertsync.errors import KvCertSyncError, SettingsError
from kvcertsync.events import CertificateUpdated, Event, InitialSyncCompleted
from kvcertsync.settings import AgentSettings, load_settings, parse_settings

__all__ = ["DEFAULT_INITIAL_ATTEMPTS", "ONCE_INITIAL_ATTEMPTS", "Agent", "AgentOptions"]

logger = logging.getLogger(__name__)

#: Initial attempts per certificate before the initial sync reports error (the extension's 25).
DEFAULT_INITIAL_ATTEMPTS: Final = 25
#: ``--once`` gives each certificate this many attempts: transient faults pass, cron never hangs.
ONCE_INITIAL_ATTEMPTS: Final = 3
# How often the status file is rewritten while nothing changes (the VM agent wants <= 2 min).
_STATUS_EVERY: Final = 30.0
# How often the heartbeat file is refreshed (the VM agent wants <= 1 min).
_HEARTBEAT_EVERY: Final = 30.0
# Changes are written at most this often: an initial sync of thousands is one write a second.
_STATUS_SETTLE: Final = 1.0


@attrs.frozen
class AgentOptions:
    """What ``kvcertsync run`` was asked to do."""

    #: A settings file, ``-`` for stdin, or None in handler mode.
    settings: str | None = None
    #: ``pem:DIR``, ``pem-split:DIR``, ``windows``, ``memory``; None: the platform's default.
    store: str | None = None
    status_dir: Path | None = None
    once: bool = False
    #: Initial attempts per certificate; None: 25, or 3 with ``once``.
    initial_attempts: int | None = None
    #: Spread the first polls at random over this many seconds (a fleet started together).
    start_splay: float = 0.0
    ca_file: str | None = None
    redirect: Mapping[str, str] = attrs.field(factory=dict)
    handler: HandlerEnvironment | None = None
    #: How long a graceful stop may take before in-flight work is abandoned.
    stop_timeout: float = 4.0
    #: Show a progress bar for the initial sync (None: when stderr is a terminal).
    progress: bool | None = None
    #: Without a bar, how often a long initial sync logs how far it is.
    progress_every: float = 10.0
    #: Reload hooks from the command line (and the defaults for the hook file's).
    hooks: HookConfig = attrs.field(factory=HookConfig)
    #: A hook file, read at start and on every reload.
    hooks_file: Path | None = None
    #: Serve Prometheus metrics here (``HOST:PORT`` or ``PORT``), or nowhere.
    metrics_address: str | None = None
    #: Accept vault hosts outside Azure's clouds (a private DNS name, an emulator).
    allow_any_host: bool = False
    #: Receive Event Grid's Key Vault events here (``HOST:PORT`` or ``PORT``), or nowhere.
    push_address: str | None = None
    #: The push receiver's shared key (never shown).
    push_key: str | None = attrs.field(default=None, repr=False)
    #: Serve the push receiver over HTTPS: a PEM chain (with its key, unless push_tls_key).
    push_tls_cert: str | None = None
    push_tls_key: str | None = None


class Agent:
    """One run of the agent: settings in, certificates kept current, status out."""

    def __init__(
        self,
        options: AgentOptions,
        *,
        notifier: Notifier | None = None,
        early_signals: list[int] | None = None,
    ) -> None:
        if options.settings is None and options.handler is None:
            raise ValueError("give a settings file or a handler environment")
        self.options = options
        self.notifier: Notifier = notifier or NullNotifier()
        self.settings: AgentSettings | None = None
        self.sync: CertSync | None = None
        self.exit_status: int | None = None
        #: Why the agent could not start (settings, store, options), for the caller to show.
        self.error: str | None = None
        #: Signals caught before the agent could handle them (the CLI defers them from the
        #: first instant): handled as soon as it can.
        self.early_signals = early_signals if early_signals is not None else []
        self._sequence: int | None = None
        # A handler's settings sequence that was refused: the status says so, for that N.
        self._settings_error: str | None = None
        self._stdin_text: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._stop = threading.Event()
        self._stop_event: anyio.Event | None = None
        self._reload_event: anyio.Event | None = None
        self._dirty: anyio.Event | None = None
        self._ready_sent = False
        self._grace: threading.Timer | None = None
        self.reloads = ReloadHooks(options.hooks, on_done=self._hooks_ran)
        # Until InitialSyncCompleted arrives, a first install is part of the initial sync.
        self._initial_seen = False

    # ------------------------------------------------------------------ control

    def request_stop(self) -> None:
        """Stop gracefully (thread-safe; from a signal, the Windows SCM, any thread)."""
        if self._stop.is_set() or self.exit_status is not None:
            return
        self._stop.set()
        logger.info("stopping (in-flight installs finish; at most %g s)", self.options.stop_timeout)
        self.notifier.stopping()
        self._grace = threading.Timer(self.options.stop_timeout, self._abandon)
        self._grace.daemon = True
        self._grace.start()
        self._call_soon(lambda: self._stop_event.set() if self._stop_event else None)

    def request_reload(self) -> None:
        """Re-read the settings (thread-safe; SIGHUP, the SCM's PARAMCHANGE)."""
        self._call_soon(lambda: self._reload_event.set() if self._reload_event else None)

    def _call_soon(self, action: Callable[[], object]) -> None:
        """Run ``action`` on the agent's loop without waiting for it (a wedged loop must not
        block the caller: a signal handler, the Windows SCM's control thread)."""
        loop = self._loop
        if loop is None:
            return  # not running yet: run() looks at the request when it starts
        if threading.get_ident() == self._loop_thread:
            action()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: the run is over anyway
            loop.call_soon_threadsafe(action)

    def _abandon(self) -> None:
        """The graceful stop overran: leave now; every install is atomic, nothing is torn."""
        logger.warning(
            "stop took longer than %g s: abandoning in-flight work", self.options.stop_timeout
        )
        _flush_logs()
        # An unfinished --once pass did not make every certificate current: never report 0.
        status = self.exit_status if self.exit_status is not None else int(self.options.once)
        os._exit(status)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if signum == getattr(signal, "SIGHUP", None):
            if self.options.once or self.sync is None:
                logger.info("%s ignored: %s", name, "one pass" if self.sync else "starting")
            else:
                logger.info("%s: re-reading the settings", name)
                self.request_reload()
        elif self._stop.is_set():
            logger.warning("second %s: exiting now", name)
            _flush_logs()
            os._exit(128 + signum)
        else:
            logger.info("%s received", name)
            self.request_stop()

    # ------------------------------------------------------------------ settings

    def _read_settings(self, *, reload: bool = False) -> tuple[AgentSettings, int | None]:
        """The settings (and, in handler mode, their sequence number); SettingsError if bad."""
        options = self.options
        if options.handler is not None:
            # The VM agent's ConfigSequenceNumber names the sequence it started us for; a
            # reload looks for a newer one.
            sequence = options.handler.sequence_number({} if reload else None)
            path = options.handler.settings_file(sequence)
            try:
                settings = load_settings(path, allow_any_host=options.allow_any_host)
            except SettingsError as exc:
                exc.sequence = sequence  # type: ignore[attr-defined]
                raise
            with contextlib.suppress(OSError):
                if b"protectedSettings" in path.read_bytes():
                    logger.info("%s: protectedSettings ignored (the extension defines none)", path)
            return settings, sequence
        if options.settings == "-":
            if self._stdin_text is None:
                self._stdin_text = sys.stdin.read()
                return parse_settings(self._stdin_text, allow_any_host=options.allow_any_host), None
            raise SettingsError("the settings came from stdin: there is nothing to re-read")
        assert options.settings is not None
        return load_settings(options.settings, allow_any_host=options.allow_any_host), None

    def _build(self, settings: AgentSettings) -> CertSync:
        options = self.options
        try:
            store = store_from_spec(options.store, settings)
        except ValueError as exc:
            raise KvCertSyncError(str(exc)) from None
        attempts = options.initial_attempts
        if attempts is None:
            attempts = ONCE_INITIAL_ATTEMPTS if options.once else DEFAULT_INITIAL_ATTEMPTS
        return sync_from_settings(
            settings,
            store=store,
            ca_file=options.ca_file,
            redirect=options.redirect or None,
            initial_sync_attempts=attempts,
            start_splay=options.start_splay,
            # A pass for cron must give every certificate its attempts, whatever the setting.
            require_initial_sync=True if options.once else settings.require_initial_sync,
        )

    # ------------------------------------------------------------------ the run

    async def run(self) -> int:
        """Run until stopped (or one pass with ``once``); returns the process exit status.

        Signals are handled from the first instant to the last: a second SIGTERM while a
        stop hangs still exits at once, and a stop that overruns ``stop_timeout`` is
        abandoned (the grace timer stays armed if this returns by an exception).
        """
        self._loop_thread = threading.get_ident()
        # The agent runs on asyncio (aiohttp): its loop takes hand-offs from other threads.
        self._loop = asyncio.get_running_loop()
        self._stop_event = anyio.Event()
        self._reload_event = anyio.Event()
        self._dirty = anyio.Event()
        if self._stop.is_set():
            self._stop_event.set()
        async with anyio.create_task_group() as tg:
            await tg.start(self._signals)
            status = await self._main()
            tg.cancel_scope.cancel()
        self.exit_status = status
        if self._grace is not None:
            self._grace.cancel()
        return status

    async def _main(self) -> int:
        loaded: list[tuple[AgentSettings, int | None]] = []

        async def read() -> None:
            # Abandoned on a stop: a read stuck on stdin or a FIFO must not hold the agent.
            loaded.append(
                await anyio.to_thread.run_sync(self._read_settings, abandon_on_cancel=True)
            )

        try:
            if not await self._until_stopped(read):
                logger.info("stopped before the settings were read")
                return int(self.options.once)
            settings, self._sequence = loaded[0]
            self.reloads.config = await anyio.to_thread.run_sync(self._read_hooks)
            sync = self._build(settings)
        except (KvCertSyncError, OSError, ssl.SSLError) as exc:
            return await self._failed_start(exc)
        self.settings, self.sync = settings, sync
        self._announce(settings)
        sync.subscribe(self._changed)
        sync.subscribe(self._for_hooks, CertificateUpdated, InitialSyncCompleted)
        metrics = None
        if self.options.metrics_address is not None:
            from kvcertsync.agent.metrics import start_metrics_server

            try:
                metrics = await anyio.to_thread.run_sync(
                    functools.partial(
                        start_metrics_server,
                        self.options.metrics_address,
                        sync,
                        hooks=self.reloads.stats,
                    )
                )
            except KvCertSyncError as exc:
                return await self._failed_start(exc)
        try:
            async with contextlib.AsyncExitStack() as stack:
                options = self.options
                if options.push_address is not None:
                    try:
                        push = await stack.enter_async_context(
                            push_server(
                                sync,
                                options.push_address,
                                options.push_key,
                                tls_cert=options.push_tls_cert,
                                tls_key=options.push_tls_key,
                            )
                        )
                    except KvCertSyncError as exc:
                        return await self._failed_start(exc)
                    logger.info("push refresh: Event Grid webhook at %s (key required)", push.url)
                return await self._serve(sync)
        finally:
            if metrics is not None:
                await anyio.to_thread.run_sync(metrics.close, abandon_on_cancel=True)

    def _read_hooks(self) -> HookConfig:
        path = self.options.hooks_file
        if path is None:
            return self.options.hooks
        return HookConfig.load(path, defaults=self.options.hooks)

    async def _for_hooks(self, event: Event) -> None:
        if isinstance(event, InitialSyncCompleted):
            self._initial_seen = True
            return
        assert isinstance(event, CertificateUpdated) and self.sync is not None
        first_install = event.previous_version is None and not self._initial_seen
        if first_install and not self.reloads.config.on_initial_sync:
            # The service to reload starts after READY and reads these files anyway.
            return
        observed = next((o for o in self.sync.observed if o.uri == event.uri), None)
        if observed is None:
            return  # removed by a reload meanwhile
        location, files = consumer_paths(self.sync.store, observed, event.location)
        self.reloads.add(Change(event, location, files))

    async def _failed_start(self, exc: BaseException) -> int:
        """Say why the agent cannot start; a handler's status file says it too (for the VM)."""
        self.error = (
            str(exc) if isinstance(exc, KvCertSyncError) else f"{type(exc).__name__}: {exc}"
        )
        logger.error("%s", self.error)
        handler = self.options.handler
        sequence = getattr(exc, "sequence", None)
        if handler is not None and sequence is not None:
            report = StatusReport(
                name=handler.name, phase=Phase.ERROR, message=self.error, certificates=()
            )
            with contextlib.suppress(OSError):
                await anyio.to_thread.run_sync(
                    _write_in, handler.status_file(sequence), status_document(report)
                )
        self.exit_status = 2
        return 2

    def _announce(self, settings: AgentSettings) -> None:
        assert self.sync is not None
        logger.info(
            "kvcertsync agent: %s, polling every %g s, requireInitialSync %s; store: %s",
            certificates(len(settings.observed)),
            settings.polling_interval,
            str(settings.require_initial_sync).lower(),
            describe_store(self.sync.store),
        )
        for warning in settings.warnings:
            logger.warning("settings: %s", warning)
        if settings.logging is not None:
            logger.warning(
                "settings: loggingSettings (%s) is not honoured: kvcertsync logs to stderr or "
                "--log-file (JSON lines with --log-format json, for a log shipper to forward)",
                settings.logging.logger or "no logger named",
            )

    def _hooks_ran(self) -> None:
        if self._dirty is not None:
            self._dirty.set()

    async def _changed(self, event: Event) -> None:
        if self._dirty is not None:
            self._dirty.set()

    async def _serve(self, sync: CertSync) -> int:
        status = 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._keep_alive)
            if not self.options.once:
                tg.start_soon(self._status_loop)
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._reload_loop)
                tg.start_soon(self.reloads.serve)
            try:
                async with sync:
                    if not self.options.once:
                        await self._write_status()
                    if self.options.once:
                        status = await self._once(sync)
                        # Changes the pass made run their hooks now, not after a window.
                        await self.reloads.flush()
                    else:
                        await self._initial(sync)
                        assert self._stop_event is not None
                        await self._stop_event.wait()
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                    await self._write_status(final=True)
                tg.cancel_scope.cancel()
        return status

    async def _until_stopped(self, work: Callable[[], Awaitable[Any]]) -> bool:
        """Run ``work`` unless a stop comes first; True when it finished.

        What ``work`` raises comes out as itself, not wrapped in an ExceptionGroup.
        """
        finished = False
        failure: list[Exception] = []
        assert self._stop_event is not None
        stop = self._stop_event
        async with anyio.create_task_group() as tg:

            async def body() -> None:
                nonlocal finished
                try:
                    await work()
                except Exception as exc:
                    failure.append(exc)
                else:
                    finished = True
                tg.cancel_scope.cancel()

            async def stopper() -> None:
                await stop.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(body)
            tg.start_soon(stopper)
        if failure:
            raise failure[0]
        return finished

    async def _initial(self, sync: CertSync) -> None:
        failed: list[InitialSyncError] = []

        async def wait() -> None:
            try:
                await sync.wait_ready()
            except InitialSyncError as exc:
                failed.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(self._progress, sync)
            finished = await self._until_stopped(wait)
            tg.cancel_scope.cancel()
        if not finished:
            return
        if failed:
            logger.error(
                "%s; still polling: the service counts as started once they are installed",
                failed[0],
            )
        else:
            logger.info("initial sync complete")
        await self._write_status()

    async def _once(self, sync: CertSync) -> int:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._progress, sync)
            finished = await self._until_stopped(self._wait_quietly(sync))
            tg.cancel_scope.cancel()
        failures = 0
        for state in sync.states():
            if state.current:
                continue
            failures += 1
            reason = state.error or ("pending" if finished else "stopped before it was installed")
            logger.error("%s: %s", state.uri, reason, extra={"uri": str(state.uri)})
        total = len(sync.states())
        if failures:
            logger.error("%d of %d certificates not installed and current", failures, total)
            return 1
        logger.info("all %s installed and current", certificates(total))
        return 0

    @staticmethod
    def _wait_quietly(sync: CertSync) -> Callable[[], Awaitable[None]]:
        async def wait() -> None:
            # Each failure is reported by certificate, not as the one InitialSyncError.
            with contextlib.suppress(InitialSyncError):
                await sync.wait_ready()

        return wait

    # ------------------------------------------------------------------ background tasks

    async def _signals(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        if threading.current_thread() is not threading.main_thread():
            # Signals reach the main thread only: hosted in another (a Windows service's
            # thread), the host stops the agent through request_stop().
            task_status.started()
            await anyio.sleep_forever()
        if sys.platform == "win32":
            # No signal handlers on Windows' loop: Ctrl+C arrives through signal.signal.
            signal.signal(signal.SIGINT, lambda *_: self.request_stop())
            task_status.started()
            await anyio.sleep_forever()
        wanted = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        with anyio.open_signal_receiver(*wanted) as signals:
            # Installed: whatever arrived before is handled now, and nothing more can be lost.
            early, self.early_signals[:] = list(self.early_signals), []
            for signum in early:
                self._on_signal(signum)
            task_status.started()
            async for signum in signals:
                self._on_signal(signum)

    async def _keep_alive(self) -> None:
        interval = 10.0
        watchdog = getattr(self.notifier, "watchdog_interval", None)
        if isinstance(watchdog, int | float) and watchdog > 0:
            interval = min(interval, watchdog / 3)
        while True:
            self.notifier.alive()
            await anyio.sleep(interval)

    async def _status_loop(self) -> None:
        while True:
            assert self._dirty is not None
            with anyio.move_on_after(_STATUS_EVERY):
                await self._dirty.wait()
                await anyio.sleep(_STATUS_SETTLE)
            self._dirty = anyio.Event()
            await self._write_status()

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._write_heartbeat()
            await anyio.sleep(_HEARTBEAT_EVERY)

    async def _reload_loop(self) -> None:
        while True:
            assert self._reload_event is not None
            await self._reload_event.wait()
            self._reload_event = anyio.Event()
            await self._reload()

    async def _reload(self) -> None:
        sync = self.sync
        assert sync is not None
        if self._ready_sent:
            self.notifier.reloading()
        try:
            settings, sequence = await anyio.to_thread.run_sync(
                functools.partial(self._read_settings, reload=True), abandon_on_cancel=True
            )
            hooks = await anyio.to_thread.run_sync(self._read_hooks)
            before = {o.uri: o for o in sync.observed}
            reconfigure(sync, settings)
            self.reloads.config = hooks
        except (KvCertSyncError, ValueError, OSError) as exc:
            logger.error("reload refused, the running settings stay: %s", exc)
            refused = getattr(exc, "sequence", None)
            if refused is not None and refused != self._sequence:
                # The VM agent waits on <N>.status of the sequence it handed over: say there
                # that it was refused, rather than report the old settings as its success.
                self._sequence = refused
                self._settings_error = (
                    f"settings {refused} refused ({exc}); running with the last good ones"
                )
        else:
            self.settings = settings
            self._settings_error = None
            if sequence is not None:
                self._sequence = sequence
            after = {o.uri: o for o in sync.observed}
            added = [str(u) for u in after if u not in before]
            removed = [str(u) for u in before if u not in after]
            changed = [str(u) for u in after if u in before and before[u] != after[u]]
            logger.info(
                "settings reloaded: %d certificates (added %s; removed %s; changed %s), polling "
                "every %g s",
                len(after),
                ", ".join(added) or "none",
                ", ".join(removed) or "none",
                ", ".join(changed) or "none",
                settings.polling_interval,
            )
            for warning in settings.warnings:
                logger.warning("settings: %s", warning)
        if self._ready_sent:
            self.notifier.ready()
        await self._write_status()

    async def _progress(self, sync: CertSync) -> None:
        total = len(sync.observed)
        show_bar = self.options.progress
        if show_bar is None:
            show_bar = sys.stderr.isatty()
        if show_bar:
            try:
                from tqdm import tqdm
                from tqdm.contrib.logging import logging_redirect_tqdm
            except ImportError:
                show_bar = False
        if not show_bar:
            while True:
                await anyio.sleep(self.options.progress_every)
                logger.info("initial sync: %d of %d certificates", sync.initial_sync_done, total)
        bar = tqdm(total=total, unit="cert", desc="initial sync", leave=False)
        try:
            with logging_redirect_tqdm():
                while True:
                    bar.update(sync.initial_sync_done - bar.n)
                    await anyio.sleep(0.2)
        finally:
            bar.update(sync.initial_sync_done - bar.n)
            bar.close()

    # ------------------------------------------------------------------ status files

    def status_report(self) -> StatusReport:
        """Where the agent and every certificate stand now, as the status file says."""
        sync = self.sync
        settings = self.settings
        assert sync is not None and settings is not None
        states = sync.states()
        phase, message = summarize(
            states,
            require_initial_sync=sync.require_initial_sync,
            initial_done=sync.initial_sync_done == len(states),
        )
        name = self.options.handler.name if self.options.handler is not None else "kvcertsync"
        hook_failures = self.reloads.failures
        failed_hooks = [s for s in states if s.uri.latest in hook_failures]
        if failed_hooks and phase is Phase.SUCCESS:
            first = failed_hooks[0].uri.latest
            phase = Phase.WARNING
            message = (
                f"{message}; the reload hook failed for {len(failed_hooks)}: "
                f"{first}: {hook_failures[first]}"
            )
        if self._settings_error is not None:
            phase, message = Phase.ERROR, f"{self._settings_error}; {message}"
        return StatusReport(
            name=name,
            phase=phase,
            message=message,
            certificates=tuple(
                CertificateStatus.of(s, hook_error=hook_failures.get(s.uri.latest)) for s in states
            ),
            timestamp=datetime.now(UTC),
        )

    def status_path(self) -> Path:
        """Where the status file goes: ``statusFolder/<N>.status``, or the status directory."""
        handler = self.options.handler
        if handler is not None and self._sequence is not None:
            return handler.status_file(self._sequence)
        return (self.options.status_dir or default_state_dir()) / STATUS_FILE_NAME

    async def _write_status(self, *, final: bool = False) -> None:
        sync = self.sync
        assert sync is not None
        report = self.status_report()
        if final:
            done = "one pass done" if self.options.once else "agent stopped"
            report = attrs.evolve(report, message=f"{done}; {report.message}")
        elif not self._ready_sent:
            installed = all(s.last_success is not None for s in sync.states())
            if installed or not sync.require_initial_sync:
                self._ready_sent = True
                self.notifier.ready()
        if not final:
            self.notifier.status(report.message)
        path = self.status_path()
        # The VM agent reads at most 128 KiB; the plain file is for `kvcertsync status`: whole.
        data = status_document(report, limit=FILE_LIMIT if self.options.handler else None)
        try:
            await anyio.to_thread.run_sync(_write_in, path, data)
        except OSError as exc:
            logger.warning("cannot write the status file %s: %s", path, exc.strerror or exc)

    async def _write_heartbeat(self) -> None:
        handler = self.options.handler
        if handler is None or handler.heartbeat_file is None:
            return
        data = heartbeat_document(self.status_report())
        try:
            await anyio.to_thread.run_sync(_write_in, handler.heartbeat_file, data)
        except OSError as exc:
            logger.warning(
                "cannot write the heartbeat %s: %s", handler.heartbeat_file, exc.strerror or exc
            )


def _write_in(path: Path, data: bytes) -> None:
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Whatever the umask: an operator's `kvcertsync status` reads it (it holds no secret).
        os.chmod(path.parent, 0o755)  # noqa: S103 - a status directory, no secret in it
    write_json_atomic(path, data)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
