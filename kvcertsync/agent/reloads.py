"""Reload hooks an operator writes without Python: batched, de-duplicated, per certificate.

A renewal (``CertificateUpdated``) after the initial sync joins a batch; when no change has
come for the batch window, every distinct command whose certificates match runs once, with
every matching changed certificate in ``KVCERTSYNC_CHANGED``. Rotating the two certificates
nginx uses gives one ``systemctl reload nginx``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import shlex
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import anyio
import attrs

from kvcertsync.agent.handler import read_json_file
from kvcertsync.errors import SettingsError
from kvcertsync.events import CertificateUpdated
from kvcertsync.hooks import run_command, shell_argv
from kvcertsync.uri import SecretUri

__all__ = [
    "DEFAULT_BATCH_WINDOW",
    "DEFAULT_HOOK_TIMEOUT",
    "HOOKS_FILE_NAME",
    "Change",
    "HookConfig",
    "HookSpec",
    "ReloadHooks",
]

logger = logging.getLogger(__name__)

#: Changes this close together run each command once (seconds).
DEFAULT_BATCH_WINDOW: Final = 3.0
#: How long a hook may run before its whole process group is killed (seconds).
DEFAULT_HOOK_TIMEOUT: Final = 30.0
#: The hook file ``run`` reads from beside the settings file when it exists.
HOOKS_FILE_NAME: Final = "kvcertsync.hooks.json"
_LABEL_LENGTH = 60


def _command(command: str | Sequence[str]) -> str | tuple[str, ...]:
    return command if isinstance(command, str) else tuple(command)


def _hooks(hooks: Iterable[HookSpec]) -> tuple[HookSpec, ...]:
    return tuple(hooks)


@attrs.frozen
class HookSpec:
    """One command, for every change or for the certificates matching ``certificates``."""

    #: A shell command line (``/bin/sh -c``; PowerShell on Windows), or an argv without a shell.
    command: str | tuple[str, ...] = attrs.field(converter=_command)
    #: Secret URLs or fnmatch patterns (``https://contoso.vault.azure.net/secrets/web*``);
    #: empty: every certificate.
    certificates: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    timeout: float = DEFAULT_HOOK_TIMEOUT
    name: str = attrs.field(default="")

    def __attrs_post_init__(self) -> None:
        if not self.command:
            raise ValueError("a hook needs a command")
        if not self.timeout > 0:
            raise ValueError("a hook's timeout must be positive")
        if not self.name:
            text = self.command if isinstance(self.command, str) else shlex.join(self.command)
            clipped = text if len(text) <= _LABEL_LENGTH else text[: _LABEL_LENGTH - 3] + "..."
            object.__setattr__(self, "name", clipped)

    @property
    def argv(self) -> list[str]:
        """What runs: the shell with the command line, or the argv itself."""
        return shell_argv(self.command) if isinstance(self.command, str) else list(self.command)

    def matches(self, uri: SecretUri) -> bool:
        """Whether a change of ``uri`` concerns this hook."""
        if not self.certificates:
            return True
        text = str(uri.latest).lower()
        return any(
            fnmatch.fnmatchcase(text, pattern.lower().rstrip("/")) for pattern in self.certificates
        )


@attrs.frozen
class HookConfig:
    """Every hook and when they run."""

    hooks: tuple[HookSpec, ...] = attrs.field(default=(), converter=_hooks)
    batch_window: float = DEFAULT_BATCH_WINDOW
    on_initial_sync: bool = False

    def __attrs_post_init__(self) -> None:
        if self.batch_window < 0:
            raise ValueError("the batch window cannot be negative")

    def merged(self, other: HookConfig) -> HookConfig:
        """These hooks, then ``other``'s; ``other``'s window and initial-sync choice."""
        return HookConfig((*self.hooks, *other.hooks), other.batch_window, other.on_initial_sync)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, defaults: HookConfig | None = None
    ) -> HookConfig:
        """Read a hook file; SettingsError names the file and the JSON path of what is wrong."""
        where = os.fspath(path)
        document = read_json_file(where)
        base = defaults or cls()
        return base.merged(cls._parse(document, where, base))

    @classmethod
    def _parse(cls, document: Any, where: str, defaults: HookConfig) -> HookConfig:
        def fail(path: str, message: str) -> SettingsError:
            return SettingsError(f"{message} (in {where})", path)

        if not isinstance(document, Mapping):
            raise fail("", "expected an object with a 'hooks' array")
        known = ("hooks", "batchWindowSeconds", "runOnInitialSync", "timeoutSeconds")
        for key in document:
            if key not in known:
                raise fail(key, f"unknown key; known: {', '.join(known)}")
        window = document.get("batchWindowSeconds", defaults.batch_window)
        timeout = document.get("timeoutSeconds", DEFAULT_HOOK_TIMEOUT)
        initial = document.get("runOnInitialSync", defaults.on_initial_sync)
        for key, value in (("batchWindowSeconds", window), ("timeoutSeconds", timeout)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise fail(key, f"expected a number of seconds, got {value!r}")
        if not isinstance(initial, bool):
            raise fail("runOnInitialSync", f"expected true or false, got {initial!r}")
        entries = document.get("hooks", [])
        if not isinstance(entries, list):
            raise fail("hooks", "expected an array of hooks")
        hooks = [
            cls._hook(entry, f"hooks[{index}]", timeout, fail)
            for index, entry in enumerate(entries)
        ]
        return HookConfig(tuple(hooks), float(window), initial)

    @staticmethod
    def _hook(
        entry: Any, path: str, timeout: float, fail: Callable[[str, str], SettingsError]
    ) -> HookSpec:
        if not isinstance(entry, Mapping):
            raise fail(path, 'expected an object such as {"command": "systemctl reload nginx"}')
        for key in entry:
            if key not in ("command", "certificates", "timeoutSeconds", "name"):
                raise fail(
                    f"{path}.{key}",
                    "unknown key; known: command, certificates, timeoutSeconds, name",
                )
        command = entry.get("command")
        is_argv = isinstance(command, list) and all(isinstance(a, str) for a in command)
        if not (isinstance(command, str) and command.strip()) and not (is_argv and command):
            raise fail(f"{path}.command", "expected a command line or an array of arguments")
        certificates = entry.get("certificates", [])
        if isinstance(certificates, str):
            certificates = [certificates]
        if not isinstance(certificates, list) or not all(isinstance(c, str) for c in certificates):
            raise fail(f"{path}.certificates", "expected secret URLs or patterns")
        own = entry.get("timeoutSeconds", timeout)
        if isinstance(own, bool) or not isinstance(own, int | float) or own <= 0:
            raise fail(f"{path}.timeoutSeconds", f"expected a positive number, got {own!r}")
        name = entry.get("name", "")
        if not isinstance(name, str):
            raise fail(f"{path}.name", "expected a string")
        return HookSpec(command, tuple(certificates), float(own), name)


@attrs.frozen
class Change:
    """One renewed certificate, with the paths its consumers configure."""

    event: CertificateUpdated
    #: What a consumer names: the custom link if set, else the ``<vault>.<name>`` link; the
    #: store location on Windows.
    location: str
    #: The files behind it: the one combined file, or the split layout's files.
    files: tuple[str, ...] = ()

    def environment(self) -> dict[str, str]:
        """The per-certificate ``KVCERTSYNC_*`` variables."""
        event = self.event
        env = {
            "KVCERTSYNC_URI": str(event.uri.latest),
            "KVCERTSYNC_VAULT": event.uri.vault_name,
            "KVCERTSYNC_NAME": event.uri.name,
            "KVCERTSYNC_VERSION": event.version,
            "KVCERTSYNC_THUMBPRINT": event.thumbprint,
            "KVCERTSYNC_NOT_AFTER": event.not_after.isoformat(),
            "KVCERTSYNC_LOCATION": self.location,
            "KVCERTSYNC_FILES": "\n".join(self.files),
        }
        if event.previous_version is not None:
            env["KVCERTSYNC_PREVIOUS_VERSION"] = event.previous_version
        return env


class ReloadHooks:
    """Runs the configured hooks for batches of changes; counts runs and failures."""

    def __init__(self, config: HookConfig, *, on_done: Callable[[], None] | None = None) -> None:
        self.config = config
        self._on_done = on_done
        #: Per hook name: (runs, failures), for metrics.
        self.counts: dict[str, tuple[int, int]] = {}
        #: The last failure of a hook that ran for a certificate (cleared by a success).
        self.failures: dict[SecretUri, str] = {}
        self._pending: dict[SecretUri, Change] = {}
        self._arrived = anyio.Event()
        self._last_change = 0.0

    def stats(self) -> dict[str, tuple[int, int]]:
        """Per hook name: how often it ran and how often it failed."""
        return dict(self.counts)

    def add(self, change: Change) -> None:
        """Queue a change for the next batch (the latest change of a certificate wins)."""
        if not self.config.hooks:
            return
        self._pending[change.event.uri.latest] = change
        self._last_change = time.monotonic()
        self._arrived.set()

    async def serve(self) -> None:
        """Run batches as changes arrive, until cancelled."""
        while True:
            await self._arrived.wait()
            # Settle: a batch closes once no change has come for the window (the deadline
            # moves with each change; sleeping to it is the point).
            window = self.config.batch_window
            while (wait := self._last_change + window - time.monotonic()) > 0:  # noqa: ASYNC110
                await anyio.sleep(wait)
            batch, self._pending = list(self._pending.values()), {}
            self._arrived = anyio.Event()
            await self.run_batch(batch)

    async def flush(self) -> None:
        """Run what is pending now, without waiting for the window."""
        batch, self._pending = list(self._pending.values()), {}
        self._arrived = anyio.Event()
        if batch:
            await self.run_batch(batch)

    async def run_batch(self, batch: Sequence[Change]) -> None:
        """Run every hook concerned by ``batch`` once, one after the other (config order)."""
        for hook in self.config.hooks:
            concerned = [c for c in batch if hook.matches(c.event.uri)]
            if concerned:
                await self._run(hook, concerned)
        if self._on_done is not None:
            self._on_done()

    async def _run(self, hook: HookSpec, changes: Sequence[Change]) -> None:
        env = dict(os.environ)
        env["KVCERTSYNC_EVENT"] = "CertificateUpdated"
        env["KVCERTSYNC_CHANGED"] = "\n".join(str(c.event.uri.latest) for c in changes)
        env["KVCERTSYNC_COUNT"] = str(len(changes))
        if len(changes) == 1:
            env.update(changes[0].environment())
        which = ", ".join(str(c.event.uri.latest) for c in changes)
        runs, failures = self.counts.get(hook.name, (0, 0))
        started = time.monotonic()
        problem: str | None = None
        output = ""
        try:
            with anyio.fail_after(hook.timeout):
                status, output = await run_command(hook.argv, env)
        except TimeoutError:
            problem = f"hook {hook.name!r} timed out after {hook.timeout:g} s and was killed"
        except OSError as exc:
            problem = f"hook {hook.name!r} could not start: {exc.strerror or exc}"
        else:
            if status != 0:
                problem = f"hook {hook.name!r} exited with status {status}"
        took = time.monotonic() - started
        if problem is None:
            self.counts[hook.name] = (runs + 1, failures)
            logger.info("hook %r done in %.1f s for %s", hook.name, took, which)
            if output:
                logger.info("hook %r output: %s", hook.name, output)
            for change in changes:
                self.failures.pop(change.event.uri.latest, None)
            return
        self.counts[hook.name] = (runs + 1, failures + 1)
        tail = f": {output}" if output else ""
        logger.error("%s (for %s)%s", problem, which, tail)
        for change in changes:
            self.failures[change.event.uri.latest] = problem
