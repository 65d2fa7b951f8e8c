"""StoreConformance: the Store contract as a pytest test class, one test per rule."""

from __future__ import annotations

import pytest

from kvcertsync.testing.conformance import (
    STORE_RULES,
    MakeObserved,
    MakeStore,
    RuleNotApplicable,
    StoreRule,
    check_store_rule,
)

__all__ = ["StoreConformance"]


class StoreConformance:
    """Subclass it as ``class TestMyStore(StoreConformance)`` and override ``store_factory``.

    Each rule of the Store contract runs as its own test (``test_store_rule[<rule>]``); a rule
    for an optional part the store lacks is skipped. ``observed_factory`` may be overridden to
    give the certificates locations, ACLs or accounts the store needs.
    """

    pytestmark = pytest.mark.anyio

    @pytest.fixture
    def anyio_backend(self) -> str:
        """Stores are checked on asyncio."""
        return "asyncio"

    @pytest.fixture
    def store_factory(self) -> MakeStore:
        """Override: a callable returning a new store over the same storage on every call."""
        raise NotImplementedError(
            f"{type(self).__name__} must override the store_factory fixture: return a callable "
            "that gives a new store object over the same storage each time it is called"
        )

    @pytest.fixture
    def observed_factory(self) -> MakeObserved | None:
        """Override to build the ObservedCertificate for each secret URL (None: defaults)."""
        return None

    @pytest.mark.parametrize("rule", STORE_RULES, ids=lambda rule: rule.name)
    async def test_store_rule(
        self, rule: StoreRule, store_factory: MakeStore, observed_factory: MakeObserved | None
    ) -> None:
        """The store keeps this rule of the contract."""
        __tracebackhide__ = True
        try:
            await check_store_rule(rule, store_factory, observed=observed_factory)
        except RuleNotApplicable as exc:
            pytest.skip(str(exc))
