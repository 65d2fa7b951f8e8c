"""The pull variant: refresh from any async iterator of event messages (a queue, a relay).

For hosts that cannot take inbound HTTP: Event Grid delivers to an Azure Storage Queue or a
Service Bus queue, and the host reads that queue. Each message is one event or a batch, in the
Event Grid schema or CloudEvents 1.0, as bytes, text or decoded JSON (see parse_events).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable

import attrs

from kvcertsync.push.events import MalformedEvents, Message, parse_events
from kvcertsync.push.refresher import PushRefresher, PushStats, Refreshable

__all__ = ["PullReport", "refresh_from_messages"]

logger = logging.getLogger(__name__)


@attrs.frozen
class PullReport:
    """What ``refresh_from_messages`` did."""

    #: Messages read from the iterator.
    messages: int
    #: Messages that were not Event Grid or CloudEvents JSON (skipped, each logged).
    malformed: int
    #: The refresher's counters: events, refreshes, coalesced...
    stats: PushStats


async def refresh_from_messages(messages: AsyncIterable[Message], sync: Refreshable) -> PullReport:
    """Refresh the observed certificates each message names, until the iterator ends.

    A malformed message is logged and skipped (a poison message must not stop the others).
    When the iterator ends, the refreshes it started are awaited; cancel to stop sooner.
    """
    count = malformed = 0
    async with PushRefresher(sync) as refresher:
        async for message in messages:
            count += 1
            try:
                batch = parse_events(message)
            except MalformedEvents as error:
                malformed += 1
                logger.warning("push: message %d skipped: %s", count, error)
                continue
            refresher.submit(batch)
        await refresher.wait_idle()
    return PullReport(count, malformed, refresher.stats)
