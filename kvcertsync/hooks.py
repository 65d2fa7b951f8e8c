"""Command hooks: run a program for each event, with the event's facts in its environment."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime

import anyio
import anyio.abc
import attrs

from kvcertsync.errors import KvCertSyncError
from kvcertsync.events import Event, SyncFailed

__all__ = ["CommandFailed", "command_hook", "event_environment", "run_command", "shell_argv"]

logger = logging.getLogger(__name__)

# Enough of a failing command's output to say why, not enough to flood the log or memory.
_OUTPUT_TAIL = 2000
# How long output is still read after the process exited (children may hold the pipes).
_DRAIN_AFTER_EXIT = 0.5


class CommandFailed(KvCertSyncError):
    """A hook command exited with a non-zero status."""


def event_environment(event: Event) -> dict[str, str]:
    """``KVCERTSYNC_*`` variables describing ``event`` (no secret material: events have none)."""
    env = {"KVCERTSYNC_EVENT": type(event).__name__}
    for field in attrs.fields(type(event)):
        value = getattr(event, field.name)
        if value is None:
            continue
        if isinstance(value, datetime):
            text = value.isoformat()
        elif isinstance(event, SyncFailed) and field.name == "error":
            text = event.message
        else:
            text = str(value)
        env[f"KVCERTSYNC_{field.name.upper()}"] = text
    return env


async def run_command(
    argv: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike[str] | None = None
) -> tuple[int, str]:
    """Run ``argv`` in its own process group; returns its status and the tail of its output.

    If we are cancelled (a timeout), the whole group dies, not only the shell.

    Only the tail of the output is kept, and once the process has exited its output is read
    for at most a moment more: a hook that starts a daemon must not hold us on its pipes.
    """
    tail = bytearray()
    drained = anyio.Event()
    open_streams = 2

    async def drain(stream: anyio.abc.ByteReceiveStream | None) -> None:
        nonlocal open_streams
        try:
            if stream is not None:
                async for chunk in stream:
                    tail.extend(chunk)
                    del tail[: max(0, len(tail) - _OUTPUT_TAIL)]
        finally:
            open_streams -= 1
            if not open_streams:
                drained.set()

    async with await anyio.open_process(
        argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True
    ) as process:
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(drain, process.stdout)
                tg.start_soon(drain, process.stderr)
                returncode = await process.wait()
                with anyio.move_on_after(_DRAIN_AFTER_EXIT):
                    await drained.wait()
                tg.cancel_scope.cancel()
        except BaseException:
            # A timed-out hook: kill what it started too (a shell's children survive its death).
            with contextlib.suppress(ProcessLookupError):
                if sys.platform == "win32":
                    # No process groups to signal there: the hook itself is ended.
                    process.kill()
                else:
                    os.killpg(process.pid, signal.SIGKILL)
            raise
    return returncode, tail.decode(errors="replace").strip()


def shell_argv(command: str) -> list[str]:
    """The argv that runs a shell command line: ``/bin/sh -c``, PowerShell on Windows."""
    if sys.platform == "win32":
        return ["powershell.exe", "-NoProfile", "-NonInteractive", "-Command", command]
    return ["/bin/sh", "-c", command]


def command_hook(
    command: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Callable[[Event], Awaitable[None]]:
    """A subscriber running ``command`` (a shell string, or an argv list) once per event.

    The event's fields arrive as ``KVCERTSYNC_URI``, ``KVCERTSYNC_VERSION``,
    ``KVCERTSYNC_THUMBPRINT``, ``KVCERTSYNC_LOCATION``... A non-zero exit raises CommandFailed,
    which the event bus logs and counts; its hook timeout bounds the run (the process is killed).
    """
    argv = shell_argv(command) if isinstance(command, str) else list(command)
    if not argv:
        raise ValueError("command is empty")
    label = command if isinstance(command, str) else shlex.join(argv)

    async def run(event: Event) -> None:
        environment = {**os.environ, **(env or {}), **event_environment(event)}
        returncode, output = await run_command(argv, environment, cwd)
        if returncode != 0:
            raise CommandFailed(
                f"hook {label!r} exited with status {returncode}: {output[-_OUTPUT_TAIL:]}"
            )
        logger.info("hook %r done for %s", label, type(event).__name__)
        if output:
            logger.debug("hook %r output: %s", label, output[-_OUTPUT_TAIL:])

    run.__name__ = f"command_hook({label})"
    return run
