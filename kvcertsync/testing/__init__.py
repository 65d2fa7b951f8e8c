"""Test kits: the Store conformance rules, and helpers for tests against the emulator.

``StoreConformance`` (a pytest base class) needs pytest; everything else works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvcertsync.testing.conformance import (
    STORE_RULES,
    InjectedFailure,
    MakeObserved,
    MakeStore,
    RuleNotApplicable,
    StoreRule,
    check_store,
    check_store_rule,
)
from kvcertsync.testing.vault import rotate_and_wait

if TYPE_CHECKING:
    from kvcertsync.testing.suite import StoreConformance

__all__ = [
    "STORE_RULES",
    "InjectedFailure",
    "MakeObserved",
    "MakeStore",
    "RuleNotApplicable",
    "StoreConformance",
    "StoreRule",
    "check_store",
    "check_store_rule",
    "rotate_and_wait",
]


def __getattr__(name: str) -> Any:
    # Imported on first use: StoreConformance imports pytest, which check_store does not need.
    if name == "StoreConformance":
        from kvcertsync.testing.suite import StoreConformance

        return StoreConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
