"""The agent's commands: ``run``, ``status``, ``check`` and ``service``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import ssl
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kvcertsync.agent.compose import STORE_FORMS, store_from_spec
from kvcertsync.agent.daemon import (
    DEFAULT_INITIAL_ATTEMPTS,
    ONCE_INITIAL_ATTEMPTS,
    Agent,
    AgentOptions,
)
from kvcertsync.agent.handler import HandlerEnvironment, find_handler_environment
from kvcertsync.agent.logs import LEVELS, configure_logging
from kvcertsync.agent.notify import Notifier
from kvcertsync.agent.preflight import describe, problems
from kvcertsync.agent.push import PUSH_KEY_ENV, parse_push_address, read_push_key, require_key
from kvcertsync.agent.reloads import (
    DEFAULT_BATCH_WINDOW,
    DEFAULT_HOOK_TIMEOUT,
    HOOKS_FILE_NAME,
    HookConfig,
    HookSpec,
)
from kvcertsync.agent.status import (
    STATUS_FILE_NAME,
    Phase,
    StatusReport,
    default_state_dir,
    read_status,
)
from kvcertsync.errors import KvCertSyncError, SettingsError
from kvcertsync.settings import load_settings, parse_settings
from kvcertsync.sources.redirect import parse_target
from kvcertsync.stores.base import Store
from kvcertsync.stores.windows import WindowsCertStore

__all__ = ["add_commands", "parse_redirects"]

logger = logging.getLogger(__name__)

#: Environment variables that stand in for ``--ca-file`` and ``--redirect`` (for services).
CA_FILE_ENV = "KVCERTSYNC_CA_FILE"
REDIRECT_ENV = "KVCERTSYNC_REDIRECT"
ALLOW_ANY_HOST_ENV = "KVCERTSYNC_ALLOW_ANY_HOST"
# How old a status file may be before `status` says the agent looks dead (it rewrites each minute).
_STALE = timedelta(minutes=5)


class UsageError(KvCertSyncError):
    """The command line or the files it names are wrong (exit status 2)."""

    usage = True


def parse_redirects(values: Sequence[str]) -> dict[str, str]:
    """``PATTERN=HOST:PORT`` items (comma-separated too) as the mapping KeyVaultSource takes."""
    redirect: dict[str, str] = {}
    for value in values:
        for item in filter(None, (part.strip() for part in value.split(","))):
            pattern, sep, target = item.partition("=")
            if not sep or not pattern:
                raise KvCertSyncError(
                    f"redirect {item!r}: expected PATTERN=HOST:PORT, e.g. "
                    "'*.vault.azure.net=127.0.0.1:8443'"
                )
            try:
                parse_target(target)
            except ValueError as exc:
                raise KvCertSyncError(str(exc)) from None
            redirect[pattern] = target
    return redirect


def _vault_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reaching a vault other than Azure's (an emulator)")
    group.add_argument(
        "--ca-file",
        metavar="PEM",
        help=f"trust this CA for the vault's TLS, besides the system's (env {CA_FILE_ENV})",
    )
    group.add_argument(
        "--redirect",
        action="append",
        default=[],
        metavar="PATTERN=HOST:PORT",
        help="connect to HOST:PORT for vault hosts matching PATTERN; names, SNI and TLS checks "
        f"stay the vault's (repeatable; env {REDIRECT_ENV}, comma-separated)",
    )


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "settings",
        nargs="?",
        help="the extension settings JSON (any shape the extension takes; - reads stdin); "
        "omitted in handler mode",
    )
    parser.add_argument("--store", metavar="SPEC", help=f"where certificates go: {STORE_FORMS}")
    parser.add_argument(
        "--status-dir", metavar="DIR", help="write status.json here (default: the state directory)"
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="one pass, then exit 0 if every certificate is installed and current, else 1",
    )
    parser.add_argument(
        "--initial-attempts",
        type=int,
        metavar="N",
        help="attempts per certificate before the initial sync reports error (default "
        f"{DEFAULT_INITIAL_ATTEMPTS}, as the extension; {ONCE_INITIAL_ATTEMPTS} with --once)",
    )
    parser.add_argument(
        "--start-splay",
        type=float,
        default=0.0,
        metavar="S",
        help="spread the first polls at random over S seconds, so a fleet that starts together "
        "does not reach its vault together (default 0: all at once)",
    )
    parser.add_argument(
        "--handler-environment",
        metavar="PATH",
        help="run as the VM extension's handler: read HandlerEnvironment.json's folders "
        "(found beside the executable when SETTINGS is omitted)",
    )
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", choices=LEVELS, default="info")
    parser.add_argument(
        "--log-file", metavar="PATH", help="log here, rotated at 10 MiB (default: stderr)"
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=4.0,
        metavar="S",
        help="longest graceful stop before in-flight work is abandoned (default 4)",
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar for the initial sync (default: on a terminal, with tqdm installed)",
    )
    parser.add_argument(
        "--allow-any-host",
        action="store_true",
        default=None,
        help="accept vault hosts outside Azure's clouds (a private DNS name, an emulator; "
        f"env {ALLOW_ANY_HOST_ENV}=1)",
    )
    parser.add_argument(
        "--metrics-address",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST 127.0.0.1 when only a "
        "port is given; needs kvcertsync[metrics]); default: off",
    )
    push = parser.add_argument_group("push refresh: Event Grid webhook (docs/push.md)")
    push.add_argument(
        "--push-address",
        metavar="[HOST:]PORT",
        help="receive Key Vault's Event Grid events here and poll a certificate as soon as it "
        "changes (HOST 127.0.0.1 when only a port is given); default: off",
    )
    push.add_argument(
        "--push-key-file",
        metavar="FILE",
        help=f"the webhook's shared key (first line; env {PUSH_KEY_ENV} instead), never on the "
        "command line",
    )
    push.add_argument(
        "--push-tls-cert",
        metavar="PEM",
        help="serve the webhook over HTTPS with this certificate chain (default: plain HTTP "
        "behind a TLS-terminating proxy)",
    )
    push.add_argument(
        "--push-tls-key", metavar="PEM", help="its private key, unless --push-tls-cert holds it"
    )
    hooks = parser.add_argument_group("reload hooks (docs/hooks.md)")
    hooks.add_argument(
        "--on-change",
        action="append",
        default=[],
        metavar="CMD",
        help="run this shell command once per batch of changes (repeatable)",
    )
    hooks.add_argument(
        "--on-change-of",
        action="append",
        nargs=2,
        default=[],
        metavar=("URL", "CMD"),
        help="run CMD when a certificate matching URL (a secret URL or pattern) changes",
    )
    hooks.add_argument(
        "--hooks",
        metavar="FILE",
        help=f"a hook file (default: {HOOKS_FILE_NAME} beside SETTINGS, when there is one)",
    )
    hooks.add_argument(
        "--hook-batch",
        type=float,
        default=DEFAULT_BATCH_WINDOW,
        metavar="S",
        help="changes this close together run each command once (default %(default)g s)",
    )
    hooks.add_argument(
        "--hook-timeout",
        type=float,
        default=DEFAULT_HOOK_TIMEOUT,
        metavar="S",
        help="kill a hook's whole process group after S seconds (default %(default)g)",
    )
    hooks.add_argument(
        "--hooks-on-initial-sync",
        action="store_true",
        help="run hooks for certificates installed for the first time by the initial sync too",
    )
    _vault_options(parser)


def hook_options(args: argparse.Namespace) -> tuple[HookConfig, Path | None]:
    """The hooks the command line gives, and the hook file to read with them."""
    if not args.hook_timeout > 0 or args.hook_batch < 0:
        raise KvCertSyncError("--hook-timeout must be positive and --hook-batch not negative")
    hooks = [HookSpec(command, timeout=args.hook_timeout) for command in args.on_change]
    hooks += [
        HookSpec(command, (pattern,), timeout=args.hook_timeout)
        for pattern, command in args.on_change_of
    ]
    config = HookConfig(tuple(hooks), args.hook_batch, args.hooks_on_initial_sync)
    if args.hooks is not None:
        return config, Path(args.hooks).absolute()
    if args.settings not in (None, "-"):
        beside = Path(args.settings).absolute().with_name(HOOKS_FILE_NAME)
        if beside.is_file():
            return config, beside
    return config, None


def agent_options(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> AgentOptions:
    """The AgentOptions that ``kvcertsync run``'s arguments (and environment) ask for."""
    env = os.environ if environ is None else environ
    handler_path = args.handler_environment
    if args.settings is None and handler_path is None:
        found = find_handler_environment(sys.argv[0])
        if found is None:
            raise KvCertSyncError(
                "give a settings file (or - for stdin), or --handler-environment PATH; no "
                "HandlerEnvironment.json was found beside the executable"
            )
        handler_path = str(found)
    if args.settings is not None and handler_path is not None:
        raise KvCertSyncError("give a settings file or --handler-environment, not both")
    if args.initial_attempts is not None and args.initial_attempts < 1:
        raise KvCertSyncError("--initial-attempts must be at least 1")
    if not (args.start_splay >= 0 and math.isfinite(args.start_splay)):
        raise KvCertSyncError(f"--start-splay must be 0 or more seconds, not {args.start_splay}")
    handler = HandlerEnvironment.load(handler_path) if handler_path is not None else None
    ca_file = args.ca_file or env.get(CA_FILE_ENV) or None
    if ca_file is not None:
        _check_ca_file(ca_file)
    redirects = list(args.redirect)
    if not redirects and env.get(REDIRECT_ENV):
        redirects = [env[REDIRECT_ENV]]
    hooks, hooks_file = hook_options(args)
    push_key = _push_options(args, env)
    return AgentOptions(
        push_address=args.push_address,
        push_key=push_key,
        push_tls_cert=args.push_tls_cert,
        push_tls_key=args.push_tls_key,
        hooks=hooks,
        hooks_file=hooks_file,
        metrics_address=args.metrics_address,
        allow_any_host=bool(args.allow_any_host or env.get(ALLOW_ANY_HOST_ENV) == "1"),
        settings=args.settings,
        store=args.store,
        status_dir=Path(args.status_dir).absolute() if args.status_dir else None,
        once=args.once,
        initial_attempts=args.initial_attempts,
        ca_file=ca_file,
        redirect=parse_redirects(redirects),
        handler=handler,
        stop_timeout=args.stop_timeout,
        progress=args.progress,
        start_splay=args.start_splay,
    )


def _push_options(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """Check the --push-* options together; returns the shared key (None without the option)."""
    if args.push_address is None:
        given = [o for o in ("push_key_file", "push_tls_cert", "push_tls_key") if getattr(args, o)]
        if given:
            raise KvCertSyncError(f"--{given[0].replace('_', '-')} needs --push-address")
        return None
    if args.once:
        raise KvCertSyncError("--push-address serves a running agent: it cannot go with --once")
    parse_push_address(args.push_address)
    return require_key(read_push_key(args.push_key_file, env))


def _check_ca_file(path: str) -> None:
    """A CA file that cannot be used is an error now, not a traceback at the first poll."""
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise KvCertSyncError(f"--ca-file {path}: no such file") from None
    except ssl.SSLError as exc:  # before OSError: it is one
        raise KvCertSyncError(f"--ca-file {path}: not PEM CA certificates ({exc.reason})") from None
    except OSError as exc:
        raise KvCertSyncError(f"--ca-file {path}: cannot read: {exc.strerror or exc}") from None


def _notifier() -> Notifier | None:
    from kvcertsync.agent.systemd import SystemdNotifier

    return SystemdNotifier.from_environment()


def run_command(args: argparse.Namespace) -> int:
    """``kvcertsync run``."""
    import anyio

    try:
        options = agent_options(args)
        log_file = args.log_file
        if log_file is None and options.handler is not None:
            options.handler.log_folder.mkdir(parents=True, exist_ok=True)
            log_file = str(options.handler.log_folder / "kvcertsync.log")
        try:
            configure_logging(level=args.log_level, fmt=args.log_format, file=log_file)
        except OSError as exc:
            raise KvCertSyncError(f"cannot log to {log_file}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise UsageError(f"{exc.filename}: {exc.strerror or exc}") from None
    except KvCertSyncError as exc:
        raise UsageError(str(exc)) from None
    agent = Agent(options, notifier=_notifier(), early_signals=getattr(args, "early_signals", []))
    try:
        status = anyio.run(agent.run)
    except KeyboardInterrupt:
        # Only where no signal handler could be installed (Windows consoles).
        status = 130
    if agent.error is not None and log_file is not None:
        print(f"kvcertsync: error: {agent.error} (log: {log_file})", file=sys.stderr)
    # A settings read abandoned on stdin or a FIFO still holds a worker thread, which the
    # interpreter would wait for at exit: the run is over, leave.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _status_path(args: argparse.Namespace) -> Path:
    if args.file:
        return Path(args.file)
    return Path(args.status_dir or default_state_dir()) / STATUS_FILE_NAME


def _ago(delta: timedelta) -> str:
    seconds = abs(int(delta.total_seconds()))
    if abs(seconds) >= 86400:
        return f"{seconds // 86400}d"
    if abs(seconds) >= 3600:
        return f"{seconds // 3600}h"
    return f"{seconds // 60}m" if abs(seconds) >= 60 else f"{seconds}s"


def _rows(report: StatusReport, now: datetime, warn: timedelta) -> tuple[list[list[str]], bool]:
    rows: list[list[str]] = []
    bad = report.phase is Phase.ERROR or report.phase is Phase.WARNING
    for cert in report.certificates:
        state = cert.phase.value
        expires = "-"
        if cert.not_after is not None:
            left = cert.not_after - now
            expires = _ago(left) if left.total_seconds() > 0 else f"EXPIRED {_ago(-left)} ago"
            if left <= warn:
                bad = True
                state = "expiring" if left.total_seconds() > 0 else "expired"
        if cert.phase in (Phase.ERROR, Phase.WARNING):
            bad = True
        rows.append(
            [
                cert.name,
                state,
                (cert.version or "-")[:12],
                (cert.thumbprint or "-")[:12],
                expires,
                cert.location or "-",
                cert.error or "",
            ]
        )
    return rows, bad


def status_command(args: argparse.Namespace) -> int:
    """``kvcertsync status``: exit 1 when a certificate fails or expires within the window."""
    path = _status_path(args)
    try:
        report = read_status(path)
    except ValueError as exc:
        print(f"kvcertsync: {exc}", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    warn = timedelta(days=args.warn_days)
    rows, bad = _rows(report, now, warn)
    age = now - report.timestamp
    # From the future by more than clock skew is as suspect as old: say so, fail.
    stale = abs(age) > _STALE
    if args.json:
        print(
            json.dumps(
                {
                    "file": str(path),
                    "status": report.phase.value,
                    "message": report.message,
                    "timestampUTC": report.timestamp.isoformat(),
                    "stale": stale,
                    "certificates": [_cert_json(c) for c in report.certificates],
                },
                indent=2,
            )
        )
    else:
        print(f"{report.phase.value}: {report.message}")
        note = "  (stale: is the agent running?)" if stale else ""
        when = f"{_ago(age)} ago" if age >= timedelta(0) else f"{_ago(age)} in the future"
        print(f"written {when} to {path}{note}")
        if rows:
            header = ["CERTIFICATE", "STATE", "VERSION", "THUMBPRINT", "EXPIRES IN"]
            print()
            _table([[*header, "INSTALLED AT", "LAST ERROR"], *rows])
    pending = args.ready and any(c.version is None for c in report.certificates)
    return 1 if bad or stale or pending else 0


def _cert_json(cert: Any) -> dict[str, Any]:
    return {
        "uri": cert.name,
        "status": cert.phase.value,
        "version": cert.version,
        "thumbprint": cert.thumbprint,
        "notAfter": cert.not_after.isoformat() if cert.not_after else None,
        "location": cert.location,
        "error": cert.error,
    }


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip())


def _check_load(args: argparse.Namespace) -> Any:
    """The settings ``check`` was given (``-``: stdin), errors naming where they came from."""
    if args.settings == "-":
        from kvcertsync.settings import located

        try:
            return parse_settings(sys.stdin.buffer.read(), allow_any_host=args.allow_any_host)
        except SettingsError as exc:
            raise located(exc, "<stdin>") from None
    return load_settings(args.settings, allow_any_host=args.allow_any_host)


def _check_store(args: argparse.Namespace, settings: Any) -> Store:
    if args.store == "windows" and sys.platform != "win32":
        # A pre-flight for a Windows VM from any machine: describe, never touch, the store.
        from kvcertsync.stores._fakewin import FakeWindowsCertBackend

        return WindowsCertStore.from_settings(settings, backend=FakeWindowsCertBackend())
    try:
        return store_from_spec(args.store, settings)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _check_vault_options(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> tuple[str | None, dict[str, str]]:
    """``--ca-file`` and ``--redirect`` (or their environment variables), as run reads them."""
    env = os.environ if environ is None else environ
    ca_file = args.ca_file or env.get(CA_FILE_ENV) or None
    redirects = list(args.redirect)
    if not redirects and env.get(REDIRECT_ENV):
        redirects = [env[REDIRECT_ENV]]
    try:
        if ca_file is not None:
            _check_ca_file(ca_file)
        return ca_file, parse_redirects(redirects)
    except KvCertSyncError as exc:
        raise UsageError(str(exc)) from None


def _check_warning_lines(warning: Any) -> list[str]:
    lines = [f"  warning: {warning}"]
    if warning.extension is not None and warning.kvcertsync is not None:
        versions = f" ({', '.join(f'{v}.x' for v in warning.versions)})" if warning.versions else ""
        lines.append(f"    extension{versions}: {warning.extension}")
        lines.append(f"    kvcertsync: {warning.kvcertsync}")
    return lines


class _ProbeProgress:
    """Progress on many URLs, as run shows it: a tqdm bar on a terminal, else a line each 10 s."""

    def __init__(self, total: int, enabled: bool | None, every: float = 10.0) -> None:
        import time

        self.total = total
        self.done = 0
        self.every = every
        self._clock = time.monotonic
        self._last = self._clock()
        self._bar: Any = None
        show_bar = sys.stderr.isatty() if enabled is None else enabled
        if show_bar and total > 1:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self._bar = tqdm(total=total, unit="cert", desc="probe", leave=False)

    def __call__(self, result: Any) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self._clock() - self._last >= self.every and self.done < self.total:
            self._last = self._clock()
            print(f"kvcertsync: probe: {self.done} of {self.total} certificates", file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_probe(
    args: argparse.Namespace, settings: Any, ca_file: str | None, redirect: dict[str, str]
) -> list[Any]:
    import anyio

    from kvcertsync.agent.probe import probe
    from kvcertsync.sources.keyvault import KeyVaultSource

    progress = _ProbeProgress(len(settings.observed), args.progress)

    async def main() -> list[Any]:
        source = KeyVaultSource.from_settings(settings, ca_file=ca_file, redirect=redirect)
        async with source:
            return await probe(settings, source, redirect=redirect, progress=progress)

    try:
        return anyio.run(main)
    finally:
        progress.close()


def check_command(args: argparse.Namespace) -> int:
    """``kvcertsync check``: valid or not, where each certificate goes, what would fail here.

    Exit 0 when valid (and, with ``--probe``, every secret readable); 1 when invalid, when a
    probe fails, or with ``--strict`` when anything is worth a warning; 2 for wrong options.
    """
    from kvcertsync.agent.preflight import collisions, machine_warnings, placement
    from kvcertsync.settings import error_code

    ca_file, redirect = _check_vault_options(args)
    # The parser's warnings are part of the report below: not logged to stderr as well.
    logging.getLogger("kvcertsync.settings").setLevel(logging.ERROR)
    version: int | None = args.extension_version
    name = "<stdin>" if args.settings == "-" else args.settings
    report: dict[str, Any] = {
        "file": name,
        "valid": False,
        "ok": False,
        "strict": args.strict,
        "extensionVersion": version,
        "errors": [],
        "warnings": [],
        "settings": None,
        "certificates": [],
        "probe": None,
    }
    try:
        settings = _check_load(args)
    except SettingsError as exc:
        if not args.json:
            raise
        report["errors"].append({"code": error_code(exc), "path": exc.path, "message": str(exc)})
        print(json.dumps(report, indent=2))
        return 1
    store = _check_store(args, settings)
    warnings = [
        w
        for w in (*settings.diagnostics, *machine_warnings(settings, store))
        if w.applies_to(version)
    ]
    errors = [
        {"code": "name-collision", "path": path, "message": f"{path}: {message}"}
        for path, message in collisions(settings, store)
    ]
    report.update(
        valid=not errors,
        errors=errors,
        warnings=[w.to_dict() for w in warnings],
        settings=settings.to_dict(),
        certificates=[
            placement(settings, index, cert, store) for index, cert in enumerate(settings.observed)
        ],
    )
    if not args.json:
        if errors:
            for error in errors:
                print(f"kvcertsync: error: {error['message']} (in {name})", file=sys.stderr)
        else:
            print(f"{name}: valid")
        for line in describe(settings, store):
            print(line)
        for warning in warnings:
            if warning.kind != "machine":
                print("\n".join(_check_warning_lines(warning)))
        for problem in problems(settings, store):
            print(f"  warning: {problem}")
    failed = 0
    if args.probe and not errors:
        try:
            results = _check_probe(args, settings, ca_file, redirect)
        except KeyboardInterrupt:
            print("kvcertsync: probe interrupted", file=sys.stderr)
            return 130
        failed = sum(not result.ok for result in results)
        report["probe"] = {
            "ok": not failed,
            "failed": failed,
            "results": [result.to_dict() for result in results],
        }
        if not args.json:
            read = f"{len(results)} certificate{'' if len(results) == 1 else 's'}"
            print(f"probe: {read} read, {failed} failed")
            for result in results:
                print("\n".join(result.lines()))
    strict_failure = args.strict and bool(warnings)
    report["ok"] = not errors and not failed and not strict_failure
    if args.json:
        print(json.dumps(report, indent=2))
    elif strict_failure:
        count = f"{len(warnings)} warning{'s' if len(warnings) != 1 else ''}"
        print(f"kvcertsync: check failed: {count}, and --strict", file=sys.stderr)
    return 0 if report["ok"] else 1


def run_parser() -> argparse.ArgumentParser:
    """A parser of ``kvcertsync run``'s arguments alone (for the service's stored options)."""
    parser = argparse.ArgumentParser(prog="kvcertsync run")
    _run_options(parser)
    return parser


# Options of run whose value is a path: a service starts in %SystemRoot%\System32.
_PATH_OPTIONS = (
    "--status-dir",
    "--log-file",
    "--ca-file",
    "--handler-environment",
    "--hooks",
    "--push-key-file",
    "--push-tls-cert",
    "--push-tls-key",
)


def absolute_run_args(run_args: Sequence[str]) -> list[str]:
    """``run_args`` checked by run's parser, with every path made absolute."""
    parsed = run_parser().parse_args(run_args)
    out: list[str] = []
    take_path = False
    for arg in run_args:
        option, sep, value = arg.partition("=")
        if take_path:
            out.append(os.path.abspath(arg))
        elif sep and option in _PATH_OPTIONS:
            out.append(f"{option}={os.path.abspath(value)}")
        elif arg == parsed.settings and arg != "-":
            out.append(os.path.abspath(arg))
        else:
            out.append(arg)
        take_path = arg in _PATH_OPTIONS
    return out


def _service_arguments(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The service name and run's options, ``--name`` accepted before or after the action."""
    name: str = args.name
    rest = list(args.run_args)
    while rest and rest[0] != "--":
        if rest[0] == "--name" and len(rest) > 1:
            name, rest = rest[1], rest[2:]
        elif rest[0].startswith("--name="):
            name, rest = rest[0].partition("=")[2], rest[1:]
        else:
            break
    return name, rest[1:] if rest[:1] == ["--"] else rest


def service_command(args: argparse.Namespace) -> int:
    """``kvcertsync service ACTION [-- run options]`` (Windows)."""
    from kvcertsync.agent.winservice import service_main

    name, run_args = _service_arguments(args)
    if args.action == "install":
        return service_main("install", absolute_run_args(run_args), name=name)
    if args.action != "host":
        return service_main(args.action, run_args, name=name)
    run = run_parser().parse_args(run_args)
    options = agent_options(run)
    configure_logging(level=run.log_level, fmt=run.log_format, file=run.log_file)

    def factory(notifier: Notifier) -> Agent:
        return Agent(options, notifier=notifier)

    return service_main("host", run_args, name=name, agent_factory=factory)


def add_commands(commands: Any) -> None:
    """Add ``check``, ``run``, ``status`` and ``service`` to the ``kvcertsync`` parser."""
    check = commands.add_parser(
        "check",
        help="validate a Key Vault VM extension settings file, show what it does here, warn "
        "where the extension would behave differently (--probe: read each secret once)",
    )
    check.add_argument("settings", help="path to the extension settings JSON (- reads stdin)")
    check.add_argument("--store", metavar="SPEC", help=f"as for run: {STORE_FORMS}")
    check.add_argument(
        "--json",
        action="store_true",
        help="print the result as one JSON object: valid, errors, warnings, the normalised "
        "settings, where each certificate goes (and the probe's results)",
    )
    check.add_argument("--strict", action="store_true", help="exit 1 on any warning too (for CI)")
    check.add_argument(
        "--extension-version",
        type=int,
        choices=(1, 2, 3, 4),
        metavar="MAJOR",
        help="warn only about differences from this major version of the extension (1, 2, 3 "
        "or 4; default: every version)",
    )
    check.add_argument(
        "--probe",
        action="store_true",
        help="also get a token with the configured identity and read each secret once "
        "(nothing is installed); exit 1 if any cannot be read",
    )
    check.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar for --probe (default: on a terminal, with tqdm installed)",
    )
    check.add_argument(
        "--allow-any-host",
        action="store_true",
        help="accept vault hosts outside Azure Key Vault's domains (an emulator, a proxy); "
        "each is warned about, since the extension refuses them",
    )
    _vault_options(check)
    check.set_defaults(func=check_command)

    run = commands.add_parser(
        "run", help="keep the settings' certificates installed and current (the agent)"
    )
    _run_options(run)
    run.set_defaults(func=run_command)

    status = commands.add_parser("status", help="show what a running agent last reported")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--status-dir", metavar="DIR", help="as given to run")
    where.add_argument("--file", metavar="PATH", help="a status file (e.g. a handler's N.status)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--warn-days",
        type=float,
        default=14,
        metavar="DAYS",
        help="exit 1 when a certificate expires within DAYS (default 14)",
    )
    status.add_argument(
        "--ready",
        action="store_true",
        help="exit 1 also while a certificate is not installed yet (a container health check)",
    )
    status.set_defaults(func=status_command)

    service = commands.add_parser(
        "service", help="install or remove kvcertsync run as a Windows service"
    )
    service.add_argument("action", choices=("install", "remove", "start", "stop", "host"))
    service.add_argument("--name", default="kvcertsync", help="the service name")
    service.add_argument(
        "run_args", nargs=argparse.REMAINDER, help="-- then run's arguments (for install)"
    )
    service.set_defaults(func=service_command)
