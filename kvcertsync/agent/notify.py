"""The Notifier protocol: how the agent tells its supervisor (systemd, the SCM) where it is."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Notifier", "NullNotifier"]


class Notifier(Protocol):
    """Lifecycle reports to a service manager; every method is quick and never raises."""

    def ready(self) -> None:
        """Start-up is complete (after the initial sync when requireInitialSync is true)."""
        ...

    def status(self, text: str) -> None:
        """A one-line state a person reads (``systemctl status``)."""
        ...

    def reloading(self) -> None:
        """Settings are being re-read; ``ready()`` follows when done."""
        ...

    def stopping(self) -> None:
        """A graceful stop has begun."""
        ...

    def alive(self) -> None:
        """The agent's loop is healthy (watchdog keep-alive, start-pending checkpoints)."""
        ...


class NullNotifier:
    """Reports to nobody: the agent run in a terminal, a container, or cron."""

    def ready(self) -> None:
        """Nothing to tell."""

    def status(self, text: str) -> None:
        """Nothing to tell."""

    def reloading(self) -> None:
        """Nothing to tell."""

    def stopping(self) -> None:
        """Nothing to tell."""

    def alive(self) -> None:
        """Nothing to tell."""
