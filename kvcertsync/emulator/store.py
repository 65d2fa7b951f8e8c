"""The emulator's in-memory vaults: secrets, their versions, soft-deleted secrets, JSON shapes."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from kvcertsync.emulator.clock import VaultClock

__all__ = [
    "RECOVERY_LEVEL",
    "RETENTION_DAYS",
    "StoredSecret",
    "VaultError",
    "VaultStore",
    "is_valid_name",
    "is_valid_version",
    "managed_refused",
    "not_found",
    "tags_of",
]

RECOVERY_LEVEL = "Recoverable+Purgeable"
RETENTION_DAYS = 90
MAX_VALUE_BYTES = 25 * 1024
MAX_CONTENT_TYPE = 255
MAX_TAGS = 15

_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_VERSION = re.compile(r"[0-9A-Fa-f]{32}")


def is_valid_name(name: str) -> bool:
    """Whether ``name`` is a legal Key Vault object name (1-127 letters, digits, dashes)."""
    return _NAME.fullmatch(name) is not None


def is_valid_version(version: str) -> bool:
    """Whether ``version`` looks like a Key Vault version id (32 hex digits)."""
    return _VERSION.fullmatch(version) is not None


class VaultError(Exception):
    """A request the service would refuse: the HTTP status and the service's error codes."""

    def __init__(self, status: int, code: str, message: str, inner_code: str | None = None) -> None:
        super().__init__(message)
        #: The HTTP status the service answers with (404, 403, 409, ...).
        self.status = status
        #: The service's error code, e.g. ``SecretNotFound``, ``Forbidden``.
        self.code = code
        #: The service's error message.
        self.message = message
        #: The ``innererror`` code (``SecretDisabled``, ``ForbiddenByRbac``...), if any.
        self.inner_code = inner_code

    def body(self) -> dict[str, Any]:
        """The JSON error body Key Vault sends."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.inner_code is not None:
            error["innererror"] = {"code": self.inner_code}
        return {"error": error}


def not_found(name: str, version: str | None = None, kind: str = "secret") -> VaultError:
    """The service's 404 for a missing secret, key or certificate (or one of its versions)."""
    what = f"{name}/{version}" if version else name
    return VaultError(
        404,
        f"{kind.capitalize()}NotFound",
        f"A {kind} with (name/id) {what} was not found in this key vault. If you recently "
        f"deleted this {kind} you may be able to recover it using the correct recovery command. "
        "For help resolving this issue, please see https://go.microsoft.com/fwlink/?linkid=2125182",
    )


def bad_parameter(message: str) -> VaultError:
    """The service's 400 BadParameter."""
    return VaultError(400, "BadParameter", message)


def tags_of(body: Mapping[str, Any]) -> dict[str, str] | None:
    """A request body's ``tags`` (None when absent), or the service's 400 when malformed."""
    tags = body.get("tags")
    if tags is None:
        return None
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise bad_parameter("The property 'tags' must map strings to strings.")
    return dict(tags)


def managed_refused(operation: str) -> VaultError:
    """The 403 for a secrets-API write to a certificate's secret (it follows its certificate)."""
    return VaultError(
        403, "Forbidden", f"Operation {operation} is not allowed on a managed secret."
    )


def _deleted_conflict(name: str) -> VaultError:
    return VaultError(
        409,
        "Conflict",
        f"Secret {name} is currently in a deleted but recoverable state, and its name cannot be "
        "reused; in this state, the secret can only be recovered or purged.",
        "ObjectIsDeletedButRecoverable",
    )


@attrs.define
class _Version:
    version: str
    value: str = attrs.field(repr=False)
    content_type: str | None
    enabled: bool
    not_before: int | None
    expires: int | None
    created: int
    updated: int
    tags: dict[str, str] | None
    managed: bool
    #: For a certificate's secret: the version of the certificate's previous version.
    previous: str | None = None


@attrs.define
class _Secret:
    name: str
    versions: dict[str, _Version] = attrs.field(factory=dict)
    latest: str = ""
    deleted_date: int | None = None

    def current(self) -> _Version:
        return self.versions[self.latest]

    @property
    def managed(self) -> bool:
        return bool(self.latest) and self.current().managed


@attrs.frozen(repr=False)
class StoredSecret:
    """One version of a secret as the emulator holds it (the value never appears in repr)."""

    #: The vault's name (the first label of its host).
    vault: str
    #: The secret's name.
    name: str
    #: This version's id (32 hexadecimal characters).
    version: str
    #: The secret value.
    value: str = attrs.field(repr=False)
    #: The content type it was set with (``application/x-pkcs12`` for an imported certificate).
    content_type: str | None
    #: False when this version is disabled (reads answer 403 SecretDisabled).
    enabled: bool
    #: The version's ``nbf`` (UTC).
    not_before: datetime | None
    #: The version's ``exp`` (UTC).
    expires: datetime | None
    #: When this version was created (UTC).
    created: datetime
    #: When this version was last updated (UTC).
    updated: datetime
    #: The version's tags.
    tags: Mapping[str, str] | None
    #: True for a certificate's secret (``managed`` in the service's answers).
    managed: bool

    def __repr__(self) -> str:
        state = "enabled" if self.enabled else "disabled"
        return f"<StoredSecret {self.vault}/{self.name}/{self.version} {state}>"


def _when(seconds: int | None) -> datetime | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC)


def _check_value(value: str, content_type: str | None, tags: Mapping[str, str] | None) -> None:
    if len(value.encode("utf-8")) > MAX_VALUE_BYTES:
        raise bad_parameter(
            f"The secret value exceeds the maximum size of {MAX_VALUE_BYTES} bytes."
        )
    if content_type is not None and len(content_type) > MAX_CONTENT_TYPE:
        raise bad_parameter(f"The content type exceeds {MAX_CONTENT_TYPE} characters.")
    if tags is not None and len(tags) > MAX_TAGS:
        raise bad_parameter(f"The number of tags exceeds the maximum of {MAX_TAGS}.")


_UNSET: Any = object()


class VaultStore:
    """Every vault's secrets, safe to use from the event loop and from worker threads.

    A certificate's secret is ``managed``: it changes only with its certificate, so every write
    through the secrets API refuses it unless the caller says ``managed_ok=True`` (the
    certificates layer does). Names held by a certificate that has no secret yet are reserved.
    """

    def __init__(self, clock: VaultClock | None = None) -> None:
        self._lock = threading.RLock()
        self._vaults: dict[str, dict[str, _Secret]] = {}
        self._reserved: set[tuple[str, str]] = set()
        self.clock = clock or VaultClock()

    def _now(self) -> int:
        return int(self.clock.time())

    # ------------------------------------------------------------------ lookups

    def _secret(self, vault: str, name: str, *, deleted: bool = False) -> _Secret:
        if not is_valid_name(name):
            raise bad_parameter(f"The request URI contains an invalid name: {name}")
        secret = self._vaults.get(vault, {}).get(name.lower())
        if secret is None or (secret.deleted_date is not None) != deleted:
            raise not_found(name)
        return secret

    def _version(self, secret: _Secret, version: str | None) -> _Version:
        if not version:
            return secret.current()
        if not is_valid_version(version):
            raise bad_parameter(f"The version '{version}' of secret '{secret.name}' is not valid.")
        found = secret.versions.get(version.lower())
        if found is None:
            raise not_found(secret.name, version)
        return found

    def _guard(self, vault: str, secret: _Secret, operation: str, managed_ok: bool) -> None:
        if not managed_ok and (secret.managed or (vault, secret.name.lower()) in self._reserved):
            raise managed_refused(operation)

    def snapshot(self, vault: str, secret: _Secret, version: _Version) -> StoredSecret:
        """A frozen copy of one version."""
        return StoredSecret(
            vault=vault,
            name=secret.name,
            version=version.version,
            value=version.value,
            content_type=version.content_type,
            enabled=version.enabled,
            not_before=_when(version.not_before),
            expires=_when(version.expires),
            created=datetime.fromtimestamp(version.created, UTC),
            updated=datetime.fromtimestamp(version.updated, UTC),
            tags=dict(version.tags) if version.tags is not None else None,
            managed=version.managed,
        )

    # ------------------------------------------------------------------ operations

    def set(
        self,
        vault: str,
        name: str,
        value: str,
        content_type: str | None = None,
        *,
        enabled: bool = True,
        not_before: int | None = None,
        expires: int | None = None,
        tags: Mapping[str, str] | None = None,
        managed: bool = False,
        version: str | None = None,
        previous: str | None = None,
        managed_ok: bool = False,
    ) -> tuple[_Secret, _Version]:
        """Add a new version (creating the vault and the secret on first use).

        ``version`` chooses the id (a certificate's secret shares its certificate's version).
        """
        if not is_valid_name(name):
            raise bad_parameter(f"The request URI contains an invalid name: {name}")
        _check_value(value, content_type, tags)
        now = self._now()
        record = _Version(
            version=version or uuid.uuid4().hex,
            value=value,
            content_type=content_type,
            enabled=enabled,
            not_before=not_before,
            expires=expires,
            created=now,
            updated=now,
            tags=dict(tags) if tags is not None else None,
            managed=managed,
            previous=previous,
        )
        with self._lock:
            secrets = self._vaults.setdefault(vault, {})
            secret = secrets.get(name.lower())
            if secret is not None and secret.deleted_date is not None:
                raise _deleted_conflict(secret.name)
            if secret is None:
                if not managed_ok and (vault, name.lower()) in self._reserved:
                    raise managed_refused("set")
                # Names are case-insensitive; the spelling of the first write is kept.
                secret = secrets[name.lower()] = _Secret(name)
            else:
                self._guard(vault, secret, "set", managed_ok or managed)
            secret.versions[record.version] = record
            secret.latest = record.version
            return secret, record

    def get(self, vault: str, name: str, version: str | None = None) -> tuple[_Secret, _Version]:
        """A live secret's version (latest when ``version`` is None or empty)."""
        with self._lock:
            secret = self._secret(vault, name)
            return secret, self._version(secret, version)

    def record(self, vault: str, name: str, version: str) -> _Version:
        """One version, live or soft-deleted (a deleted certificate still shows its attributes)."""
        with self._lock:
            secret = self._vaults.get(vault, {}).get(name.lower())
            if secret is None:
                raise not_found(name, version)
            return self._version(secret, version)

    def update(
        self,
        vault: str,
        name: str,
        version: str | None = None,
        *,
        content_type: str | None = _UNSET,
        enabled: bool = _UNSET,
        not_before: int | None = _UNSET,
        expires: int | None = _UNSET,
        tags: Mapping[str, str] | None = _UNSET,
        managed_ok: bool = False,
    ) -> tuple[_Secret, _Version]:
        """Change a version's attributes; arguments left out stay as they are."""
        with self._lock:
            secret = self._secret(vault, name)
            self._guard(vault, secret, "update", managed_ok)
            record = self._version(secret, version)
            if content_type is not _UNSET:
                _check_value("", content_type, None)
                record.content_type = content_type
            if enabled is not _UNSET:
                record.enabled = enabled
            if not_before is not _UNSET:
                record.not_before = not_before
            if expires is not _UNSET:
                record.expires = expires
            if tags is not _UNSET:
                _check_value("", None, tags)
                record.tags = dict(tags) if tags is not None else None
            record.updated = self._now()
            return secret, record

    def delete(self, vault: str, name: str, *, managed_ok: bool = False) -> _Secret:
        """Soft-delete a secret: it disappears until recovered or purged."""
        with self._lock:
            secret = self._secret(vault, name)
            self._guard(vault, secret, "delete", managed_ok)
            secret.deleted_date = self._now()
            return secret

    def get_deleted(self, vault: str, name: str) -> _Secret:
        """A soft-deleted secret."""
        with self._lock:
            return self._secret(vault, name, deleted=True)

    def recover(self, vault: str, name: str, *, managed_ok: bool = False) -> _Secret:
        """Bring a soft-deleted secret back."""
        with self._lock:
            secret = self._secret(vault, name, deleted=True)
            self._guard(vault, secret, "recover", managed_ok)
            secret.deleted_date = None
            return secret

    def purge(self, vault: str, name: str, *, managed_ok: bool = False) -> None:
        """Remove a soft-deleted secret for good."""
        with self._lock:
            secret = self._secret(vault, name, deleted=True)
            self._guard(vault, secret, "purge", managed_ok)
            del self._vaults[vault][name.lower()]

    def reserve(self, vault: str, name: str, reserved: bool = True) -> None:
        """Hold (or free) a name for a certificate that has no secret yet."""
        with self._lock:
            key = (vault, name.lower())
            if reserved:
                self._reserved.add(key)
            else:
                self._reserved.discard(key)

    def exists(self, vault: str, name: str) -> bool:
        """Whether a secret of this name exists, live or soft-deleted."""
        with self._lock:
            return name.lower() in self._vaults.get(vault, {})

    def list_secrets(self, vault: str, *, deleted: bool = False) -> list[_Secret]:
        """The vault's live (or soft-deleted) secrets, by name."""
        with self._lock:
            secrets = self._vaults.get(vault, {})
            return [
                secret
                for key, secret in sorted(secrets.items())
                if (secret.deleted_date is not None) == deleted
            ]

    def list_versions(self, vault: str, name: str) -> tuple[_Secret, list[_Version]]:
        """Every version of a live secret, oldest first."""
        with self._lock:
            secret = self._secret(vault, name)
            return secret, list(secret.versions.values())

    def overview(self) -> dict[str, dict[str, list[str]]]:
        """vault -> live secret name -> versions (oldest first), for stats."""
        with self._lock:
            return {
                vault: {
                    secret.name: list(secret.versions)
                    for secret in secrets.values()
                    if secret.deleted_date is None
                }
                for vault, secrets in sorted(self._vaults.items())
            }

    # ------------------------------------------------------------------ export and import

    def export(self, vault: str, name: str, *, managed_ok: bool = False) -> dict[str, Any]:
        """One live secret with every version, as JSON-ready data (backup, persistence)."""
        with self._lock:
            secret = self._secret(vault, name)
            self._guard(vault, secret, "backup", managed_ok)
            return _dump(secret)

    def restore(self, vault: str, data: Mapping[str, Any], *, managed_ok: bool = False) -> _Secret:
        """Bring back an exported secret with its versions; its name must be free."""
        secret = _load(data)
        if secret.managed and not managed_ok:
            raise managed_refused("restore")
        with self._lock:
            secrets = self._vaults.setdefault(vault, {})
            existing = secrets.get(secret.name.lower())
            if existing is not None or (vault, secret.name.lower()) in self._reserved:
                current = f"{secret.name}/{secret.latest}"
                raise VaultError(
                    409,
                    "Conflict",
                    f"Conflict while restoring secret {current} - secret already exists or "
                    "concurrent access",
                )
            secrets[secret.name.lower()] = secret
            return secret

    def dump(self) -> dict[str, Any]:
        """Every vault's secrets (deleted ones too) and reserved names, for persistence."""
        with self._lock:
            return {
                "vaults": {
                    vault: [_dump(secret) for secret in secrets.values()]
                    for vault, secrets in self._vaults.items()
                },
                "reserved": sorted([vault, name] for vault, name in self._reserved),
            }

    def load(self, data: Mapping[str, Any]) -> None:
        """Replace everything with what :meth:`dump` wrote."""
        with self._lock:
            self._vaults = {
                vault: {secret.name.lower(): secret for secret in map(_load, secrets)}
                for vault, secrets in data.get("vaults", {}).items()
            }
            self._reserved = {(vault, name) for vault, name in data.get("reserved", [])}

    def __iter__(self) -> Iterator[tuple[str, _Secret]]:
        with self._lock:
            items = [(v, s) for v, secrets in self._vaults.items() for s in secrets.values()]
        return iter(items)


_FIELDS = tuple(field.name for field in attrs.fields(_Version))


def _dump(secret: _Secret) -> dict[str, Any]:
    return {
        "name": secret.name,
        "latest": secret.latest,
        "deleted": secret.deleted_date,
        "versions": [attrs.asdict(record) for record in secret.versions.values()],
    }


def _load(data: Mapping[str, Any]) -> _Secret:
    try:
        versions = [_Version(**{k: v[k] for k in _FIELDS if k in v}) for v in data["versions"]]
        secret = _Secret(
            str(data["name"]),
            {record.version: record for record in versions},
            str(data["latest"]),
            data.get("deleted"),
        )
    except (KeyError, TypeError) as exc:
        raise bad_parameter(f"The secret data is malformed ({exc}).") from None
    if secret.latest not in secret.versions or not is_valid_name(secret.name):
        raise bad_parameter("The secret data is malformed.")
    return secret


# ---------------------------------------------------------------------- JSON shapes


def attributes_json(record: _Version) -> dict[str, Any]:
    """The `attributes` object of a version (certificates and keys show their secret's)."""
    attributes: dict[str, Any] = {"enabled": record.enabled}
    if record.not_before is not None:
        attributes["nbf"] = record.not_before
    if record.expires is not None:
        attributes["exp"] = record.expires
    attributes.update(
        created=record.created,
        updated=record.updated,
        recoveryLevel=RECOVERY_LEVEL,
        recoverableDays=RETENTION_DAYS,
    )
    return attributes


def secret_bundle(
    base: str, secret: _Secret, record: _Version, *, include_value: bool = True
) -> dict[str, Any]:
    """A SecretBundle, as GET, PUT and PATCH answer (PATCH and DELETE without the value)."""
    body: dict[str, Any] = {}
    if include_value:
        body["value"] = record.value
    if record.content_type is not None:
        body["contentType"] = record.content_type
    body["id"] = f"{base}/secrets/{secret.name}/{record.version}"
    if record.managed:
        body["kid"] = f"{base}/keys/{secret.name}/{record.version}"
    body["attributes"] = attributes_json(record)
    if record.tags is not None:
        body["tags"] = dict(record.tags)
    if record.managed:
        body["managed"] = True
    if record.previous is not None:
        body["previousVersion"] = record.previous
    return body


def secret_item(base: str, secret: _Secret, record: _Version, *, versioned: bool) -> dict[str, Any]:
    """A SecretItem (list entries carry no value; the secrets list uses version-less ids)."""
    item: dict[str, Any] = {
        "id": f"{base}/secrets/{secret.name}" + (f"/{record.version}" if versioned else ""),
        "attributes": attributes_json(record),
    }
    if record.content_type is not None:
        item["contentType"] = record.content_type
    if record.tags is not None:
        item["tags"] = dict(record.tags)
    if record.managed:
        item["managed"] = True
    return item


def _deleted_fields(base: str, secret: _Secret) -> dict[str, Any]:
    deleted = secret.deleted_date or 0
    return {
        "recoveryId": f"{base}/deletedsecrets/{secret.name}",
        "deletedDate": deleted,
        "scheduledPurgeDate": deleted + RETENTION_DAYS * 86400,
    }


def deleted_bundle(base: str, secret: _Secret) -> dict[str, Any]:
    """A DeletedSecretBundle (the latest version's properties, without the value)."""
    return {
        **secret_bundle(base, secret, secret.current(), include_value=False),
        **_deleted_fields(base, secret),
    }


def deleted_item(base: str, secret: _Secret) -> dict[str, Any]:
    """A DeletedSecretItem."""
    return {
        **secret_item(base, secret, secret.current(), versioned=False),
        **_deleted_fields(base, secret),
    }
