"""Key Vault events as Event Grid delivers them: the Event Grid schema and CloudEvents 1.0 alike.

Parsing only (no HTTP, no refreshing), so the webhook receiver and the pull adapter read messages
the same way. A message is one event or a batch (a JSON array) in either schema, as bytes, text
or already-decoded JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import attrs

from kvcertsync.errors import KvCertSyncError
from kvcertsync.uri import SecretUri

__all__ = [
    "CLOUDEVENTS",
    "EVENT_GRID",
    "REFRESH_EVENT_TYPES",
    "VALIDATION_EVENT_TYPE",
    "EventBatch",
    "KeyVaultEvent",
    "MalformedEvents",
    "Message",
    "parse_events",
]

EVENT_GRID: Final = "eventgrid"
CLOUDEVENTS: Final = "cloudevents"
Schema = Literal["eventgrid", "cloudevents"]

#: Event Grid's subscription validation handshake (Event Grid schema only).
VALIDATION_EVENT_TYPE: Final = "Microsoft.EventGrid.SubscriptionValidationEvent"
#: The Key Vault events after which a certificate-backed secret is worth polling now.
REFRESH_EVENT_TYPES: Final = frozenset(
    f"Microsoft.KeyVault.{kind}{what}"
    for kind in ("Secret", "Certificate")
    for what in ("NewVersionCreated", "NearExpiry", "Expired")
)

#: What ``parse_events`` reads: JSON text or bytes, or JSON already decoded.
Message = bytes | str | Mapping[str, Any] | Sequence[Any]

_BATCH_TYPE = "application/cloudevents-batch+json"
_STRUCTURED_TYPE = "application/cloudevents+json"
_OBJECT_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_VAULT_NAME = re.compile(r"[0-9A-Za-z-]{1,63}")


class MalformedEvents(KvCertSyncError, ValueError):
    """A message that is not Event Grid or CloudEvents 1.0 JSON; the text says what and where."""


@attrs.frozen
class KeyVaultEvent:
    """One Key Vault event about a secret or a certificate."""

    #: ``Microsoft.KeyVault.SecretNewVersionCreated`` and the like.
    event_type: str
    #: The vault's name (lower case), e.g. ``contoso``.
    vault_name: str
    #: ``Secret`` or ``Certificate``.
    object_type: str
    #: The secret's (or certificate's) name, as the event wrote it.
    object_name: str
    #: The version the event is about, when it names one.
    version: str | None = None
    #: The vault's host from the event's object id (``contoso.vault.azure.net``), when given.
    vault_host: str | None = None
    not_before: datetime | None = None
    expires: datetime | None = None
    #: The event's own id (Event Grid may deliver one event more than once).
    event_id: str | None = None
    schema: Schema = EVENT_GRID

    @property
    def new_version(self) -> bool:
        """True for ``...NewVersionCreated``: a version now exists that may not be installed."""
        return self.event_type.endswith("NewVersionCreated")

    def matches(self, uri: SecretUri) -> bool:
        """True when this event is about the secret ``uri`` follows (a versioned URL never is).

        The vault is compared by host when the event names one, else by name; names ignore case.
        """
        if uri.version is not None or uri.name.lower() != self.object_name.lower():
            return False
        if self.vault_host is not None:
            return uri.hostname == self.vault_host
        return uri.vault_name == self.vault_name


@attrs.frozen
class EventBatch:
    """What one message held: Key Vault events to act on, a validation code, what was ignored."""

    events: tuple[KeyVaultEvent, ...] = ()
    #: Event Grid's subscription validation code, to answer as ``{"validationResponse": code}``.
    validation_code: str | None = None
    #: The types of the events that are not about a secret or certificate version.
    ignored: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.events) + len(self.ignored) + (self.validation_code is not None)


def parse_events(message: Message, *, content_type: str | None = None) -> EventBatch:
    """Read one message (an event or a batch, Event Grid schema or CloudEvents 1.0).

    ``content_type`` is the HTTP one, when there is one: ``application/cloudevents+json`` must
    hold one event, ``application/cloudevents-batch+json`` an array. Raises MalformedEvents.
    """
    document = _decode(message)
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == _BATCH_TYPE and not isinstance(document, list):
        raise MalformedEvents(f"a {_BATCH_TYPE} body must be a JSON array of CloudEvents")
    if kind == _STRUCTURED_TYPE and not isinstance(document, Mapping):
        raise MalformedEvents(f"a {_STRUCTURED_TYPE} body must be one CloudEvent (a JSON object)")
    if isinstance(document, Mapping):
        items: list[tuple[str, Any]] = [("the event", document)]
    elif isinstance(document, list):
        items = [(f"event [{index}]", item) for index, item in enumerate(document)]
    else:
        raise MalformedEvents(
            f"expected an event (a JSON object) or a batch (an array), not {_json_kind(document)}"
        )
    events: list[KeyVaultEvent] = []
    ignored: list[str] = []
    validation: str | None = None
    for where, item in items:
        parsed = _event(item, where)
        if isinstance(parsed, KeyVaultEvent):
            events.append(parsed)
        elif parsed[0] == VALIDATION_EVENT_TYPE:
            validation = parsed[1]
        else:
            ignored.append(parsed[0])
    return EventBatch(tuple(events), validation, tuple(ignored))


def _decode(message: Message) -> Any:
    if isinstance(message, bytes | bytearray | memoryview):
        try:
            message = bytes(message).decode("utf-8")
        except UnicodeDecodeError as error:
            raise MalformedEvents(f"the message is not UTF-8 text (byte {error.start})") from None
    if isinstance(message, str):
        try:
            return json.loads(message)
        except ValueError as error:
            # The decoder's message names a position, never the content.
            raise MalformedEvents(f"the message is not valid JSON: {error}") from None
    if isinstance(message, Mapping):
        return message
    if isinstance(message, Sequence):
        return list(message)
    raise MalformedEvents(f"a message must be bytes, text or decoded JSON, not {type(message)}")


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    return f"a {type(value).__name__}"


def _text(event: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
    value = event.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        got = "missing" if value is None else _json_kind(value)
        raise MalformedEvents(f"{where}: '{key}' must be a non-empty string ({got})")
    return value.strip()


def _event(item: Any, where: str) -> KeyVaultEvent | tuple[str, str]:
    """A Key Vault event, or (event type, validation code or "") for the others."""
    if not isinstance(item, Mapping):
        raise MalformedEvents(f"{where}: expected a JSON object, not {_json_kind(item)}")
    if "specversion" in item:
        schema: Schema = CLOUDEVENTS
        version = item.get("specversion")
        if version != "1.0":
            raise MalformedEvents(
                f"{where}: CloudEvents specversion {version!r} is not supported (only '1.0')"
            )
        event_type = _text(item, "type", where)
        _text(item, "source", where)
        _text(item, "id", where)
        topic, subject = item.get("source"), item.get("subject")
    elif "eventType" in item:
        schema = EVENT_GRID
        event_type = _text(item, "eventType", where)
        topic, subject = item.get("topic"), item.get("subject")
    else:
        raise MalformedEvents(
            f"{where}: neither an Event Grid event (no 'eventType') nor a CloudEvent "
            "(no 'specversion')"
        )
    assert event_type is not None
    where = f"{where} ({event_type})"
    if event_type == VALIDATION_EVENT_TYPE:
        data = _data(item, where)
        code = _text(data, "validationCode", f"{where} data")
        assert code is not None
        return event_type, code
    if event_type not in REFRESH_EVENT_TYPES:
        return event_type, ""
    data = {str(key).strip().lower(): value for key, value in _data(item, where).items()}
    return _key_vault_event(data, event_type, schema, item.get("id"), topic, subject, where)


def _data(item: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    data = item.get("data")
    if not isinstance(data, Mapping):
        got = "missing" if data is None else _json_kind(data)
        raise MalformedEvents(f"{where}: 'data' must be a JSON object ({got})")
    return data


def _key_vault_event(
    data: Mapping[str, Any],
    event_type: str,
    schema: Schema,
    event_id: Any,
    topic: Any,
    subject: Any,
    where: str,
) -> KeyVaultEvent:
    # Keys are compared trimmed and case-folded: the service's own samples write "ObjectName "
    # with a trailing space, and SDK models spell them objectName.
    host = None
    object_id = data.get("id")
    if isinstance(object_id, str) and object_id.strip():
        try:
            host = urlsplit(object_id.strip()).hostname
        except ValueError:
            host = None
    vault = data.get("vaultname")
    if not isinstance(vault, str) or not vault.strip():
        vault = (host or "").split(".", 1)[0] or _last_segment(topic)
    name = data.get("objectname")
    if not isinstance(name, str) or not name.strip():
        name = subject
    if not isinstance(vault, str) or not _VAULT_NAME.fullmatch(vault.strip()):
        raise MalformedEvents(f"{where}: data has no valid 'VaultName' (nor an 'Id' URL naming it)")
    if not isinstance(name, str) or not _OBJECT_NAME.fullmatch(name.strip()):
        raise MalformedEvents(
            f"{where}: data has no valid 'ObjectName' (1-127 letters, digits or hyphens)"
        )
    object_type = data.get("objecttype")
    version = data.get("version")
    # The service's samples write " ee059b2b..." with a leading space.
    version = version.strip().lower() if isinstance(version, str) else ""
    return KeyVaultEvent(
        event_type=event_type,
        vault_name=vault.strip().lower(),
        object_type=object_type.strip() if isinstance(object_type, str) else "",
        object_name=name.strip(),
        version=version or None,
        vault_host=host.lower() if host else None,
        not_before=_when(data.get("nbf")),
        expires=_when(data.get("exp")),
        event_id=event_id if isinstance(event_id, str) else None,
        schema=schema,
    )


def _last_segment(topic: Any) -> str:
    # Event Grid's topic or a CloudEvent's source: ".../Microsoft.KeyVault/vaults/<name>".
    return topic.rstrip("/").rsplit("/", 1)[-1] if isinstance(topic, str) else ""


def _when(value: Any) -> datetime | None:
    """NBF/EXP: Unix seconds, as a number or (in the service's samples) a string."""
    if isinstance(value, bool):
        return None
    try:
        return datetime.fromtimestamp(float(value), UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return None
