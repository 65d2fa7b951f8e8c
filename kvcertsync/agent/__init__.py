"""The agent: the composition root, and the daemon that stands in for the Key Vault VM extension."""

from kvcertsync.agent.compose import (
    reconfigure,
    source_from_settings,
    store_from_settings,
    store_from_spec,
    sync_from_settings,
)

__all__ = [
    "reconfigure",
    "source_from_settings",
    "store_from_settings",
    "store_from_spec",
    "sync_from_settings",
]
