"""StateDir: the emulator's vaults, CA and clock kept on disk, so a restart loses nothing."""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kvcertsync.emulator._backup import BackupSealer
from kvcertsync.emulator.certificates import CertificateVault
from kvcertsync.emulator.certs import TestAuthority
from kvcertsync.emulator.clock import VaultClock
from kvcertsync.emulator.store import VaultStore

__all__ = ["StateDir"]

logger = logging.getLogger(__name__)

FORMAT = 1


class StateDir:
    """A state directory: ``ca.pem`` (public) and ``private/state.json`` (0600, in a 0700 dir).

    The state file holds every vault's secrets and certificates (private keys included), the
    issuers, contacts, the clock's offsets, the backup key and the CA's keys.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.private = self.path / "private"
        self.state_file = self.private / "state.json"

    def _prepare(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.private.mkdir(mode=0o700, exist_ok=True)
        # mkdir's mode is masked by the umask and ignored for an existing directory.
        self.private.chmod(0o700)

    def read(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet."""
        try:
            text = self.state_file.read_text("utf-8")
        except FileNotFoundError:
            return None
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"{self.state_file} is not valid JSON ({exc}); move it away") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{self.state_file} is not an emulator state file of format {FORMAT}")
        return state

    def write(self, state: dict[str, Any]) -> None:
        """Replace the state file atomically (a crash leaves the old or the new one)."""
        self._prepare()
        fd, temp = tempfile.mkstemp(prefix=".state-", dir=self.private)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(state, file, separators=(",", ":"))
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.state_file)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise

    @staticmethod
    def gather(
        authority: TestAuthority,
        secrets: VaultStore,
        certificates: CertificateVault,
        clock: VaultClock,
        tokens: Mapping[str, Mapping[str, Any]],
    ) -> dict[str, Any]:
        """Everything worth keeping, as JSON-ready data (``tokens``: the grants IMDS issued)."""
        return {
            "format": FORMAT,
            "authority": authority.export(),
            "secrets": secrets.dump(),
            "certificates": certificates.dump(),
            "clock": {"offset": clock.offset, "tokenOffset": clock.token_offset},
            "backupKey": base64.b64encode(certificates.sealer.key).decode("ascii"),
            # Clients keep their tokens across our restart; so do we, or they get 401s.
            "tokens": {token: dict(grant) for token, grant in tokens.items()},
        }

    @staticmethod
    def apply(
        state: dict[str, Any],
        secrets: VaultStore,
        certificates: CertificateVault,
        clock: VaultClock,
    ) -> tuple[TestAuthority, dict[str, dict[str, Any]]]:
        """Put a saved state back; returns the saved CA and the saved token grants."""
        secrets.load(state["secrets"])
        certificates.load(state["certificates"])
        certificates.sealer = BackupSealer(base64.b64decode(state["backupKey"]))
        saved = state.get("clock", {})
        clock.resume(saved.get("offset", 0.0), saved.get("tokenOffset", 0.0))
        logger.info("emulator state restored from the state directory")
        return TestAuthority.restore(state["authority"]), dict(state.get("tokens", {}))

    def __repr__(self) -> str:
        return f"<StateDir {self.path}>"
