"""Push refresh: Key Vault events (Event Grid) make CertSync poll a certificate at once.

- ``parse_events``: Event Grid schema and CloudEvents 1.0 messages -> KeyVaultEvent.
- ``PushRefresher``: events -> ``sync.refresh(uri)``, matched to observed URLs and coalesced.
- ``EventGridReceiver`` / ``PushServer``: the webhook (validation handshakes, shared key).
- ``refresh_from_messages``: the same from any async iterator (Storage Queue, Service Bus).

See docs/push.md.
"""

from kvcertsync.push.events import (
    CLOUDEVENTS,
    EVENT_GRID,
    REFRESH_EVENT_TYPES,
    VALIDATION_EVENT_TYPE,
    EventBatch,
    KeyVaultEvent,
    MalformedEvents,
    Message,
    parse_events,
)
from kvcertsync.push.pull import PullReport, refresh_from_messages
from kvcertsync.push.receiver import (
    KEY_HEADER,
    KEY_QUERY,
    MAX_BODY,
    MIN_KEY_LENGTH,
    EventGridReceiver,
    PushServer,
    PushServerError,
)
from kvcertsync.push.refresher import PushRefresher, PushStats, Refreshable

__all__ = [
    "CLOUDEVENTS",
    "EVENT_GRID",
    "KEY_HEADER",
    "KEY_QUERY",
    "MAX_BODY",
    "MIN_KEY_LENGTH",
    "REFRESH_EVENT_TYPES",
    "VALIDATION_EVENT_TYPE",
    "EventBatch",
    "EventGridReceiver",
    "KeyVaultEvent",
    "MalformedEvents",
    "Message",
    "PullReport",
    "PushRefresher",
    "PushServer",
    "PushServerError",
    "PushStats",
    "Refreshable",
    "parse_events",
    "refresh_from_messages",
]
