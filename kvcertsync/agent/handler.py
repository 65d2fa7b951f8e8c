"""Handler mode: the folders the Azure VM agent lays out for an extension (HandlerEnvironment.json).

The VM agent writes ``HandlerEnvironment.json`` at the root of the handler's directory::

    [{"name": "Microsoft.Azure.KeyVault.KeyVaultForLinux", "version": 1.0,
      "handlerEnvironment": {"logFolder": ..., "configFolder": ..., "statusFolder": ...,
                             "heartbeatFile": ...}}]

It puts each settings sequence in ``configFolder/<N>.settings`` (the VM envelope, with
``publicSettings`` and ``protectedSettings``) and reads ``statusFolder/<N>.status`` back.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from kvcertsync.errors import SettingsError

__all__ = [
    "HANDLER_ENVIRONMENT",
    "HandlerEnvironment",
    "find_handler_environment",
    "read_json_file",
]

#: The file name the VM agent gives the handler's environment.
HANDLER_ENVIRONMENT: Final = "HandlerEnvironment.json"
_SEQUENCE = re.compile(r"([0-9]+)\.settings")


@attrs.frozen
class HandlerEnvironment:
    """The folders of one extension handler, as HandlerEnvironment.json names them."""

    path: Path
    name: str
    log_folder: Path
    config_folder: Path
    status_folder: Path
    heartbeat_file: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> HandlerEnvironment:
        """Read HandlerEnvironment.json; SettingsError names the file and the key."""
        where = Path(path)
        document = read_json_file(where)
        node: Any = document[0] if isinstance(document, list) and document else document
        if not isinstance(node, Mapping):
            raise SettingsError(f"{where}: expected [{{...}}], an array of one object")
        env = node.get("handlerEnvironment")
        if not isinstance(env, Mapping):
            raise SettingsError(f"{where}: [0].handlerEnvironment: missing or not an object")

        def folder(key: str, required: bool = True) -> Path | None:
            value = env.get(key)
            if value is None and not required:
                return None
            if not isinstance(value, str) or not value.strip():
                raise SettingsError(f"{where}: [0].handlerEnvironment.{key}: missing or empty")
            # Relative folders are the handler directory's, where the VM agent runs us from.
            return where.parent / value

        log_folder, config_folder = folder("logFolder"), folder("configFolder")
        status_folder = folder("statusFolder")
        assert log_folder and config_folder and status_folder  # required ones are never None
        return cls(
            path=where,
            name=str(node.get("name") or "kvcertsync"),
            log_folder=log_folder,
            config_folder=config_folder,
            status_folder=status_folder,
            heartbeat_file=folder("heartbeatFile", required=False),
        )

    def sequence_number(self, environ: Mapping[str, str] | None = None) -> int:
        """The settings sequence to apply: ``ConfigSequenceNumber`` if set, else the highest N."""
        env = os.environ if environ is None else environ
        given = env.get("ConfigSequenceNumber", "").strip()
        if given.isdigit():
            return int(given)
        try:
            names = os.listdir(self.config_folder)
        except OSError as exc:
            raise SettingsError(
                f"{self.config_folder}: cannot list the settings: {exc.strerror or exc}"
            ) from None
        found = [int(m[1]) for n in names if (m := _SEQUENCE.fullmatch(n))]
        if not found:
            raise SettingsError(f"{self.config_folder}: no <N>.settings file")
        return max(found)

    def settings_file(self, sequence: int) -> Path:
        """``configFolder/<N>.settings``."""
        return self.config_folder / f"{sequence}.settings"

    def status_file(self, sequence: int) -> Path:
        """``statusFolder/<N>.status``."""
        return self.status_folder / f"{sequence}.status"


def read_json_file(path: str | os.PathLike[str]) -> Any:
    """The JSON in one of the agent's own files; SettingsError names the file and the fault."""
    where = os.fspath(path)
    try:
        return json.loads(Path(where).read_bytes())
    except FileNotFoundError:
        raise SettingsError(f"{where}: no such file") from None
    except OSError as exc:
        raise SettingsError(f"{where}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SettingsError(f"{where}: invalid JSON: {exc}") from None


def find_handler_environment(executable: str | os.PathLike[str]) -> Path | None:
    """HandlerEnvironment.json beside ``executable`` or in its parent (a handler's ``bin/``)."""
    here = Path(executable).resolve().parent
    for folder in (here, here.parent):
        candidate = folder / HANDLER_ENVIRONMENT
        if candidate.is_file():
            return candidate
    return None
