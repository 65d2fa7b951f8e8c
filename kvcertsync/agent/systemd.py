"""sd_notify(3) without a dependency: one datagram per state change to ``$NOTIFY_SOCKET``."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]

logger = logging.getLogger(__name__)


class SystemdNotifier:
    """A Notifier for ``Type=notify`` units: READY, STATUS, RELOADING, STOPPING, WATCHDOG."""

    def __init__(self, address: str, *, watchdog_interval: float | None = None) -> None:
        # A leading "@" names a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._last_status: str | None = None
        #: How often systemd wants WATCHDOG=1 (WatchdogSec), or None.
        self.watchdog_interval = watchdog_interval

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SystemdNotifier | None:
        """The notifier systemd asked for through ``NOTIFY_SOCKET``, or None outside a unit."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        if not address:
            return None
        interval = None
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if usec and usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            interval = int(usec) / 1e6
        return cls(address, watchdog_interval=interval)

    def send(self, *assignments: str) -> None:
        """Send ``KEY=value`` lines in one datagram; a missing listener is logged, not raised."""
        try:
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:
            logger.debug("sd_notify %s failed: %s", assignments, exc)

    def ready(self) -> None:
        """READY=1: dependent units (After=/Requires=) may start."""
        self.send("READY=1")

    def status(self, text: str) -> None:
        """STATUS=: the line ``systemctl status`` shows (sent only when it changes)."""
        text = " ".join(text.split())
        if text != self._last_status:
            self._last_status = text
            self.send(f"STATUS={text}")

    def reloading(self) -> None:
        """RELOADING=1 with the monotonic time systemd's notify-reload wants."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """STOPPING=1."""
        self.send("STOPPING=1")

    def alive(self) -> None:
        """WATCHDOG=1 when the unit has WatchdogSec (the loop that calls this is alive)."""
        if self.watchdog_interval is not None:
            self.send("WATCHDOG=1")

    def close(self) -> None:
        """Close the socket."""
        self._socket.close()
