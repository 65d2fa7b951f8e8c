"""The certificates Key Vault keeps: each version's certificate, key and managed secret as one.

A certificate version is three objects with one version id: the certificate (``cer``, ``x5t``,
policy), its key (``kid``) and its secret (``sid``: the private key in the policy's content type,
``managed``). The secret lives in the VaultStore and carries the attributes and tags all three
show, so the secrets API, the certificates API and the keys API can never disagree.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from kvcertsync.emulator._backup import BackupSealer
from kvcertsync.emulator._encoding import read_import, secret_value
from kvcertsync.emulator._keys import PrivateKey, generate_key, key_ops, public_jwk
from kvcertsync.emulator.certs import TestAuthority
from kvcertsync.emulator.clock import VaultClock
from kvcertsync.emulator.policy import (
    SELF,
    UNKNOWN,
    CertificatePolicy,
    build_csr,
    build_leaf,
    epoch,
    policy_for_certificate,
)
from kvcertsync.emulator.store import (
    RECOVERY_LEVEL,
    RETENTION_DAYS,
    VaultError,
    VaultStore,
    _Version,
    attributes_json,
    bad_parameter,
    is_valid_name,
    is_valid_version,
    not_found,
)
from kvcertsync.material import CertificateMaterial

__all__ = ["CertificateVault", "Publish"]

logger = logging.getLogger(__name__)

Publish = Callable[[str, str, _Version], None]
"""Called with (vault, name, secret version) for every new certificate version."""

IN_PROGRESS = "inProgress"
COMPLETED = "completed"
CANCELLED = "cancelled"
_PENDING_DETAILS = (
    "Pending certificate created. Certificate request is in progress. This may take some time "
    "based on the issuer provider. Please check again later."
)
_MERGE_DETAILS = "Pending certificate created. Please Perform Merge to complete the request."


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _deleted_not_found(name: str) -> VaultError:
    return VaultError(404, "CertificateNotFound", f"Deleted Certificate not found: {name}")


def _pending_not_found(name: str) -> VaultError:
    return VaultError(404, "PendingCertificateNotFound", f"Pending certificate not found: {name}")


def _in_progress() -> VaultError:
    # Key Vault answers 409 with the code Forbidden here (its documented example).
    return VaultError(
        409,
        "Forbidden",
        "A new key vault certificate can not be created or imported while a pending key vault "
        "certificate's status is inProgress.",
    )


@attrs.define
class _CertVersion:
    version: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey = attrs.field(repr=False)
    exportable: bool
    kty: str
    key_usage: tuple[str, ...]


@attrs.define
class _Operation:
    request_id: str
    version: str
    key: PrivateKey = attrs.field(repr=False)
    policy: CertificatePolicy
    created: float
    enabled: bool
    tags: dict[str, str] | None
    status: str = IN_PROGRESS
    cancellation_requested: bool = False


@attrs.define
class _Certificate:
    name: str
    policy: CertificatePolicy
    policy_created: int
    policy_updated: int
    versions: dict[str, _CertVersion] = attrs.field(factory=dict)
    operation: _Operation | None = None
    deleted_date: int | None = None
    preserve_order: bool | None = None

    def latest(self) -> _CertVersion | None:
        return next(reversed(self.versions.values()), None)


@attrs.frozen
class _Renewal:
    vault: str
    name: str
    latest: str
    policy: CertificatePolicy
    key: PrivateKey = attrs.field(repr=False)


class CertificateVault:
    """Every vault's certificates, issuers and contacts; safe from the loop and worker threads.

    ``authority`` issues for registered issuers (the emulator's TestAuthority); ``Self`` issues
    self-signed; ``Unknown`` waits for a merge. ``issuance_delay`` (seconds of the clock) keeps
    a request inProgress that long, so pollers poll.
    """

    def __init__(
        self,
        secrets: VaultStore,
        clock: VaultClock,
        authority: Callable[[], TestAuthority],
        publish: Publish,
        sealer: BackupSealer,
    ) -> None:
        self._secrets = secrets
        self._clock = clock
        self._authority = authority
        self._publish = publish
        self.sealer = sealer
        self.issuance_delay = 0.0
        self._lock = threading.RLock()
        self._vaults: dict[str, dict[str, _Certificate]] = {}
        self._issuers: dict[str, dict[str, dict[str, Any]]] = {}
        self._contacts: dict[str, list[dict[str, Any]]] = {}
        # Moving the clock is how tests reach renewal: it renews at once, not at the next tick.
        clock.subscribe(self.tick)

    def _now(self) -> int:
        return int(self._clock.time())

    # ------------------------------------------------------------------ lookups

    def _find(self, vault: str, name: str, *, deleted: bool = False) -> _Certificate:
        if not is_valid_name(name):
            raise bad_parameter(f"The request URI contains an invalid name: {name}")
        cert = self._vaults.get(vault, {}).get(name.lower())
        if cert is None or (cert.deleted_date is not None) != deleted:
            raise _deleted_not_found(name) if deleted else not_found(name, kind="certificate")
        return cert

    def _version(self, cert: _Certificate, version: str | None) -> _CertVersion:
        if not version:
            latest = cert.latest()
            if latest is None:
                raise not_found(cert.name, kind="certificate")
            return latest
        if not is_valid_version(version):
            raise bad_parameter(
                f"The version '{version}' of certificate '{cert.name}' is not valid."
            )
        found = cert.versions.get(version.lower())
        if found is None:
            raise not_found(cert.name, version, "certificate")
        return found

    def _record(self, vault: str, cert: _Certificate, version: str) -> _Version:
        return self._secrets.record(vault, cert.name, version)

    # ------------------------------------------------------------------ issuing

    def _signer(
        self, issuer: str
    ) -> tuple[x509.Name, PrivateKey, tuple[x509.Certificate, ...]] | None:
        if issuer.lower() == SELF.lower():
            return None
        authority = self._authority()
        name, key = authority.signer
        return name, key, authority.chain

    def _check_issuer(self, vault: str, issuer: str) -> None:
        if issuer.lower() in (SELF.lower(), UNKNOWN.lower()):
            return
        if issuer.lower() not in self._issuers.get(vault, {}):
            raise bad_parameter(
                f"The issuer '{issuer}' is not known in this vault: create it first "
                f"(PUT /certificates/issuers/{issuer}) or use 'Self' or 'Unknown'."
            )

    def _add_version(
        self,
        vault: str,
        cert: _Certificate,
        version: str,
        certificate: x509.Certificate,
        chain: tuple[x509.Certificate, ...],
        key: PrivateKey,
        policy: CertificatePolicy,
        *,
        enabled: bool,
        tags: Mapping[str, str] | None,
        value: str | None = None,
    ) -> _Version:
        previous = cert.latest()
        exportable = policy.exportable
        if value is None:
            value = secret_value(
                key if exportable else None, certificate, chain, policy.content_type
            )
        _, record = self._secrets.set(
            vault,
            cert.name,
            value,
            policy.content_type,
            enabled=enabled,
            not_before=epoch(certificate.not_valid_before_utc),
            expires=epoch(certificate.not_valid_after_utc),
            tags=tags,
            managed=True,
            version=version,
            previous=previous.version if previous is not None else None,
            managed_ok=True,
        )
        self._secrets.reserve(vault, cert.name, False)
        cert.versions[version] = _CertVersion(
            version, certificate, chain, key, exportable, policy.kty, policy.key_usage
        )
        self._publish(vault, cert.name, record)
        return record

    def _issue(self, vault: str, cert: _Certificate, operation: _Operation) -> None:
        signer = self._signer(operation.policy.issuer)
        start = self._clock.utcnow()
        if signer is None:
            leaf = build_leaf(operation.policy, operation.key, start)
            chain: tuple[x509.Certificate, ...] = ()
        else:
            leaf = build_leaf(operation.policy, operation.key, start, signer[:2])
            chain = signer[2]
        self._add_version(
            vault,
            cert,
            operation.version,
            leaf,
            chain,
            operation.key,
            operation.policy,
            enabled=operation.enabled,
            tags=operation.tags,
        )
        operation.status = COMPLETED

    def _advance(self, vault: str, cert: _Certificate) -> None:
        """Move an issuer's pending request on once its delay has passed (never an Unknown one)."""
        operation = cert.operation
        if operation is None or operation.status != IN_PROGRESS:
            return
        if operation.policy.issuer.lower() == UNKNOWN.lower():
            return
        if self._clock.time() < operation.created + self.issuance_delay:
            return
        if operation.cancellation_requested:
            operation.status = CANCELLED
            if not cert.versions:
                self._secrets.reserve(vault, cert.name, False)
            return
        self._issue(vault, cert, operation)

    # ------------------------------------------------------------------ create, import, merge

    def create(
        self,
        vault: str,
        name: str,
        policy_body: Any,
        attributes: Mapping[str, Any],
        tags: Mapping[str, str] | None,
        preserve_order: bool | None = None,
    ) -> _Operation:
        """Start a certificate request (POST /certificates/{name}/create)."""
        if not is_valid_name(name):
            raise bad_parameter(f"The certificate name '{name}' is not valid.")
        with self._lock:
            cert = self._vaults.get(vault, {}).get(name.lower())
            current = cert.policy if cert is not None else None
        if policy_body is None and current is None:
            raise bad_parameter("The property 'policy' is required to create a certificate.")
        policy = CertificatePolicy.from_json(policy_body) if policy_body is not None else current
        assert policy is not None
        reuse = cert.latest() if cert is not None and policy.reuse_key else None
        # Key generation can take a second (RSA 4096): never under the lock.
        key = (
            reuse.key
            if reuse is not None and reuse.kty == policy.kty
            else generate_key(policy.kty, policy.key_size, policy.curve)
        )
        enabled = attributes.get("enabled", True)
        with self._lock:
            self._check_issuer(vault, policy.issuer)
            cert = self._prepare(vault, name, policy)
            if preserve_order is not None:
                cert.preserve_order = preserve_order
            operation = _Operation(
                request_id=uuid.uuid4().hex,
                version=uuid.uuid4().hex,
                key=key,
                policy=policy,
                created=self._clock.time(),
                enabled=enabled if isinstance(enabled, bool) else True,
                tags=dict(tags) if tags is not None else None,
            )
            cert.operation = operation
            if not cert.versions:
                self._secrets.reserve(vault, cert.name)
            return operation

    def _prepare(self, vault: str, name: str, policy: CertificatePolicy) -> _Certificate:
        """The certificate to add a version to, after the service's conflict checks."""
        certs = self._vaults.setdefault(vault, {})
        cert = certs.get(name.lower())
        now = self._now()
        if cert is None:
            if self._secrets.exists(vault, name):
                raise VaultError(
                    409,
                    "Conflict",
                    f"A secret named {name} already exists and is not a certificate's secret; "
                    "certificates and secrets share names.",
                )
            cert = certs[name.lower()] = _Certificate(name, policy, now, now)
            return cert
        if cert.deleted_date is not None:
            raise VaultError(
                409,
                "Conflict",
                f"Certificate {cert.name} is currently in a deleted but recoverable state, and "
                "its name cannot be reused; in this state, the certificate can only be "
                "recovered or purged.",
                "ObjectIsDeletedButRecoverable",
            )
        if cert.operation is not None and cert.operation.status == IN_PROGRESS:
            self._advance(vault, cert)
            if cert.operation.status == IN_PROGRESS:
                raise _in_progress()
        cert.policy, cert.policy_updated = policy, now
        return cert

    def import_value(
        self,
        vault: str,
        name: str,
        value: str,
        password: str | None,
        policy_body: Any,
        attributes: Mapping[str, Any],
        tags: Mapping[str, str] | None,
        preserve_order: bool | None = None,
    ) -> _Version:
        """POST /certificates/{name}/import: a PFX or PEM with its key."""
        material, was_pem = read_import(value, password)
        content_type = None
        if policy_body is not None and isinstance(policy_body, Mapping):
            secret_props = policy_body.get("secret_props") or {}
            if isinstance(secret_props, Mapping):
                content_type = secret_props.get("contentType")
        if was_pem and content_type is None:
            raise bad_parameter(
                "The certificate is PEM: give a policy whose secret_props.contentType is "
                "application/x-pem-file."
            )
        policy = policy_for_certificate(
            material.certificate,
            material.private_key,  # type: ignore[arg-type]
            "application/x-pkcs12",
            policy_body,
        )
        enabled = attributes.get("enabled", True)
        return self.add_material(
            vault,
            name,
            material,
            policy,
            enabled=enabled if isinstance(enabled, bool) else True,
            tags=tags,
            preserve_order=preserve_order,
        )

    def add_material(
        self,
        vault: str,
        name: str,
        material: CertificateMaterial,
        policy: CertificatePolicy | None = None,
        *,
        enabled: bool = True,
        tags: Mapping[str, str] | None = None,
        value: str | None = None,
        content_type: str | None = None,
        preserve_order: bool | None = None,
    ) -> _Version:
        """A new version from a certificate with its key (import; the Python controls)."""
        if not is_valid_name(name):
            raise bad_parameter(f"The certificate name '{name}' is not valid.")
        key: Any = material.private_key
        if policy is None:
            policy = policy_for_certificate(
                material.certificate, key, content_type or "application/x-pkcs12"
            )
        with self._lock:
            cert = self._prepare(vault, name, policy)
            cert.operation = None
            if preserve_order is not None:
                cert.preserve_order = preserve_order
            return self._add_version(
                vault,
                cert,
                uuid.uuid4().hex,
                material.certificate,
                material.chain,
                key,
                policy,
                enabled=enabled,
                tags=tags,
                value=value,
            )

    def merge(
        self,
        vault: str,
        name: str,
        x5c: Any,
        attributes: Mapping[str, Any],
        tags: Mapping[str, str] | None,
    ) -> _Version:
        """POST /certificates/{name}/pending/merge: complete a request signed elsewhere."""
        if not isinstance(x5c, list) or not x5c or not all(isinstance(c, str) for c in x5c):
            raise bad_parameter("The property 'x5c' must be a non-empty list of base64 strings.")
        try:
            chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in x5c]
        except ValueError:
            raise bad_parameter(
                "The property 'x5c' holds something that is not a certificate."
            ) from None
        with self._lock:
            cert = self._find(vault, name)
            operation = cert.operation
            if operation is None or operation.status != IN_PROGRESS:
                raise _pending_not_found(name)
            if operation.policy.issuer.lower() != UNKNOWN.lower():
                raise VaultError(
                    403,
                    "Forbidden",
                    "Merge is forbidden on pending object created with issuer : "
                    f"{operation.policy.issuer} while it is in progess.",
                )
            ordered = CertificateMaterial.from_key_and_certificates(operation.key, chain)
            enabled = attributes.get("enabled", operation.enabled)
            record = self._add_version(
                vault,
                cert,
                operation.version,
                ordered.certificate,
                ordered.chain,
                operation.key,
                operation.policy,
                enabled=enabled if isinstance(enabled, bool) else True,
                tags=tags if tags is not None else operation.tags,
            )
            operation.status = COMPLETED
            return record

    # ------------------------------------------------------------------ renewal

    def tick(self) -> None:
        """Complete requests whose delay has passed and renew certificates that are due."""
        due: list[_Renewal] = []
        with self._lock:
            now = self._clock.time()
            for vault, certs in self._vaults.items():
                for cert in certs.values():
                    if cert.deleted_date is not None:
                        continue
                    self._advance(vault, cert)
                    renewal = self._due(vault, cert, now)
                    if renewal is not None:
                        due.append(renewal)
        for renewal in due:
            policy = renewal.policy
            key = (
                renewal.key
                if policy.reuse_key
                else generate_key(policy.kty, policy.key_size, policy.curve)
            )
            with self._lock:
                found = self._vaults.get(renewal.vault, {}).get(renewal.name.lower())
                latest = found.latest() if found is not None else None
                if found is None or latest is None or latest.version != renewal.latest:
                    continue
                cert = found
                operation = _Operation(
                    uuid.uuid4().hex,
                    uuid.uuid4().hex,
                    key,
                    cert.policy,
                    self._clock.time(),
                    enabled=True,
                    tags=self._record(renewal.vault, cert, latest.version).tags,
                )
                cert.operation = operation
                self._issue(renewal.vault, cert, operation)
                logger.info("auto-renewed certificate %s/%s", renewal.vault, cert.name)

    def _due(self, vault: str, cert: _Certificate, now: float) -> _Renewal | None:
        latest = cert.latest()
        policy = cert.policy
        if latest is None or policy.issuer.lower() == UNKNOWN.lower():
            return None
        if cert.operation is not None and cert.operation.status == IN_PROGRESS:
            return None
        start = latest.certificate.not_valid_before_utc.timestamp()
        end = latest.certificate.not_valid_after_utc.timestamp()
        record = self._record(vault, cert, latest.version)
        for action in policy.lifetime_actions:
            if action.action != "AutoRenew":
                continue
            due = action.due(start, end)
            # A version issued after its own trigger would renew forever: leave it be.
            if now >= due and record.created < due:
                return _Renewal(vault, cert.name, latest.version, policy, latest.key)
        return None

    # ------------------------------------------------------------------ reads

    def get(
        self, vault: str, name: str, version: str | None
    ) -> tuple[_Certificate, _CertVersion | None]:
        """A live certificate and one version (None: only a first request is pending)."""
        with self._lock:
            cert = self._find(vault, name)
            self._advance(vault, cert)
            pending = cert.operation is not None and cert.operation.status == IN_PROGRESS
            if not version and not cert.versions and pending:
                return cert, None
            return cert, self._version(cert, version)

    def certificates(
        self, vault: str, *, deleted: bool = False, pending: bool = False
    ) -> list[_Certificate]:
        """The vault's certificates by name (live or soft-deleted; ``pending``: unfinished too)."""
        with self._lock:
            certs = []
            for key in sorted(self._vaults.get(vault, {})):
                cert = self._vaults[vault][key]
                if (cert.deleted_date is not None) != deleted:
                    continue
                self._advance(vault, cert)
                if cert.versions or (pending and cert.operation is not None):
                    certs.append(cert)
            return certs

    def versions(self, vault: str, name: str) -> tuple[_Certificate, list[_CertVersion]]:
        """Every completed version of a live certificate, oldest first."""
        with self._lock:
            cert = self._find(vault, name)
            self._advance(vault, cert)
            return cert, list(cert.versions.values())

    def operation(
        self, vault: str, name: str, request_id: str | None = None
    ) -> tuple[_Certificate, _Operation]:
        """The certificate's request (GET /pending), moved on if its time has come."""
        with self._lock:
            cert = self._find(vault, name)
            self._advance(vault, cert)
            operation = cert.operation
            if operation is None or (request_id and request_id != operation.request_id):
                raise _pending_not_found(name)
            return cert, operation

    # ------------------------------------------------------------------ changes

    def update(
        self,
        vault: str,
        name: str,
        version: str | None,
        attributes: Mapping[str, Any],
        tags: Mapping[str, str] | None,
        tags_given: bool,
    ) -> tuple[_Certificate, _CertVersion]:
        """PATCH /certificates/{name}/{version}: enabled and tags (nbf/exp are the X.509's)."""
        enabled = attributes.get("enabled")
        if enabled is not None and not isinstance(enabled, bool):
            raise bad_parameter("The property 'attributes.enabled' must be true or false.")
        with self._lock:
            cert = self._find(vault, name)
            entry = self._version(cert, version)
            changes: dict[str, Any] = {}
            if enabled is not None:
                changes["enabled"] = enabled
            if tags_given:
                changes["tags"] = tags
            self._secrets.update(vault, cert.name, entry.version, managed_ok=True, **changes)
            return cert, entry

    def update_policy(self, vault: str, name: str, body: Any) -> _Certificate:
        """PATCH /certificates/{name}/policy: the next versions follow it."""
        with self._lock:
            cert = self._find(vault, name)
            policy = CertificatePolicy.from_json(body, current=cert.policy)
            self._check_issuer(vault, policy.issuer)
            cert.policy, cert.policy_updated = policy, self._now()
            return cert

    def find(self, vault: str, name: str) -> _Certificate:
        """A live certificate as it is (its request not moved on)."""
        with self._lock:
            return self._find(vault, name)

    def cancel(self, vault: str, name: str, requested: Any) -> tuple[_Certificate, _Operation]:
        """PATCH /pending: ask to cancel a request still in progress."""
        if not isinstance(requested, bool):
            raise bad_parameter("The property 'cancellation_requested' must be true or false.")
        with self._lock:
            cert = self._find(vault, name)
            operation = cert.operation
            if operation is None:
                raise _pending_not_found(name)
            if operation.status != IN_PROGRESS:
                raise bad_parameter(
                    f"The pending certificate request is {operation.status}, not inProgress; "
                    "it can no longer be cancelled."
                )
            operation.cancellation_requested = operation.cancellation_requested or requested
            return cert, operation

    def delete_operation(self, vault: str, name: str) -> tuple[_Certificate, _Operation]:
        """DELETE /pending: forget the request (a pending first version goes with it)."""
        with self._lock:
            cert = self._find(vault, name)
            operation = cert.operation
            if operation is None:
                raise _pending_not_found(name)
            cert.operation = None
            if not cert.versions:
                self._secrets.reserve(vault, cert.name, False)
            return cert, operation

    def delete(self, vault: str, name: str) -> _Certificate:
        """Soft-delete a certificate with its key and secret."""
        with self._lock:
            cert = self._find(vault, name)
            if cert.versions:
                self._secrets.delete(vault, cert.name, managed_ok=True)
            else:
                self._secrets.reserve(vault, cert.name, False)
            cert.operation = None
            cert.deleted_date = self._now()
            return cert

    def get_deleted(self, vault: str, name: str) -> _Certificate:
        """A soft-deleted certificate."""
        with self._lock:
            return self._find(vault, name, deleted=True)

    def recover(self, vault: str, name: str) -> _Certificate:
        """Bring a soft-deleted certificate back, with its key and secret."""
        with self._lock:
            cert = self._find(vault, name, deleted=True)
            if cert.versions:
                self._secrets.recover(vault, cert.name, managed_ok=True)
            cert.deleted_date = None
            return cert

    def purge(self, vault: str, name: str) -> None:
        """Remove a soft-deleted certificate, its key and its secret for good."""
        with self._lock:
            cert = self._find(vault, name, deleted=True)
            if cert.versions:
                self._secrets.purge(vault, cert.name, managed_ok=True)
            del self._vaults[vault][cert.name.lower()]

    # ------------------------------------------------------------------ backup and restore

    def backup(self, vault: str, name: str) -> bytes:
        """Every version of a certificate, its policy and its secret, sealed."""
        with self._lock:
            cert = self._find(vault, name)
            if not cert.versions:
                raise not_found(name, kind="certificate")
            payload = {
                "certificate": _dump_certificate(cert),
                "secret": self._secrets.export(vault, cert.name, managed_ok=True),
            }
        return self.sealer.seal("Certificate", payload)

    def restore(self, vault: str, blob: bytes) -> _Certificate:
        """Bring a backed-up certificate back under its name, which must be free."""
        payload = self.sealer.open("Certificate", blob)
        cert = _load_certificate(payload["certificate"])
        with self._lock:
            certs = self._vaults.setdefault(vault, {})
            latest = cert.latest()
            if cert.name.lower() in certs or latest is None:
                what = f"{cert.name}/{latest.version if latest else ''}"
                raise VaultError(
                    409,
                    "Conflict",
                    f"Conflict while restoring certificate {what} - certificate already exists "
                    "or concurrent access",
                )
            self._secrets.restore(vault, payload["secret"], managed_ok=True)
            certs[cert.name.lower()] = cert
            return cert

    # ------------------------------------------------------------------ issuers and contacts

    def set_issuer(
        self, vault: str, name: str, body: Mapping[str, Any], *, update: bool
    ) -> dict[str, Any]:
        """PUT (or PATCH) /certificates/issuers/{name}: stored as given, no CA is contacted."""
        if not is_valid_name(name):
            raise bad_parameter(f"The issuer name '{name}' is not valid.")
        with self._lock:
            issuers = self._issuers.setdefault(vault, {})
            current = issuers.get(name.lower())
            if update and current is None:
                raise _issuer_not_found(name)
            record: dict[str, Any] = dict(current) if current is not None else {"name": name}
            provider = body.get("provider")
            if provider is not None:
                if not isinstance(provider, str):
                    raise bad_parameter("The property 'provider' must be a string.")
                record["provider"] = provider
            if "provider" not in record:
                raise bad_parameter("The property 'provider' is required.")
            for key in ("credentials", "org_details"):
                if body.get(key) is not None:
                    if not isinstance(body[key], Mapping):
                        raise bad_parameter(f"The property '{key}' must be an object.")
                    record[key] = dict(body[key])
            attributes = body.get("attributes") or {}
            enabled = attributes.get("enabled") if isinstance(attributes, Mapping) else None
            now = self._now()
            record.setdefault("created", now)
            record["updated"] = now
            if isinstance(enabled, bool):
                record["enabled"] = enabled
            record.setdefault("enabled", True)
            issuers[name.lower()] = record
            return record

    def issuer(self, vault: str, name: str, *, delete: bool = False) -> dict[str, Any]:
        """GET (or DELETE) /certificates/issuers/{name}."""
        with self._lock:
            issuers = self._issuers.get(vault, {})
            record = issuers.get(name.lower())
            if record is None:
                raise _issuer_not_found(name)
            if delete:
                del issuers[name.lower()]
            return record

    def issuers(self, vault: str) -> list[dict[str, Any]]:
        """The vault's issuers, by name."""
        with self._lock:
            return [self._issuers[vault][k] for k in sorted(self._issuers.get(vault, {}))]

    def contacts(
        self, vault: str, contacts: Any = None, *, delete: bool = False
    ) -> list[dict[str, Any]]:
        """GET, PUT (``contacts``) or DELETE /certificates/contacts."""
        with self._lock:
            if contacts is not None:
                if not isinstance(contacts, list) or not all(
                    isinstance(c, Mapping) for c in contacts
                ):
                    raise bad_parameter("The property 'contacts' must be a list of objects.")
                self._contacts[vault] = [
                    {k: c[k] for k in ("email", "name", "phone") if c.get(k) is not None}
                    for c in contacts
                ]
            current = self._contacts.get(vault)
            if current is None:
                raise VaultError(404, "ContactsNotFound", "Contacts not found")
            if delete:
                del self._contacts[vault]
            return current

    # ------------------------------------------------------------------ keys

    def key(
        self, vault: str, name: str, version: str | None
    ) -> tuple[_Certificate, _CertVersion, _Version]:
        """A certificate's key version (GET /keys/{name}/{version})."""
        with self._lock:
            try:
                cert = self._find(vault, name)
                entry = self._version(cert, version)
            except VaultError as error:
                if error.status == 404:
                    raise not_found(name, version, "key") from None
                raise
            return cert, entry, self._record(vault, cert, entry.version)

    # ------------------------------------------------------------------ JSON shapes

    def bundle(
        self, vault: str, base: str, cert: _Certificate, entry: _CertVersion | None
    ) -> dict[str, Any]:
        """A CertificateBundle (the pending stub of a first request when ``entry`` is None)."""
        with self._lock:
            body: dict[str, Any] = {}
            if entry is None:
                # Nothing issued yet: the request's planned version (or the bare name).
                operation = cert.operation
                attributes: dict[str, Any] = {"enabled": False}
                if operation is None:
                    body["id"] = f"{base}/certificates/{cert.name}"
                    created = cert.policy_created
                else:
                    start = datetime.fromtimestamp(operation.created, UTC)
                    not_before, not_after = operation.policy.validity(start)
                    body["id"] = f"{base}/certificates/{cert.name}/{operation.version}"
                    attributes.update(nbf=epoch(not_before), exp=epoch(not_after))
                    created = int(operation.created)
                body["attributes"] = {
                    **attributes,
                    "created": created,
                    "updated": created,
                    "recoveryLevel": RECOVERY_LEVEL,
                    "recoverableDays": RETENTION_DAYS,
                }
            else:
                record = self._record(vault, cert, entry.version)
                der = _der(entry.certificate)
                body.update(
                    id=f"{base}/certificates/{cert.name}/{entry.version}",
                    kid=f"{base}/keys/{cert.name}/{entry.version}",
                    sid=f"{base}/secrets/{cert.name}/{entry.version}",
                    x5t=_b64url(hashlib.sha1(der).digest()),  # noqa: S324 (x5t is SHA-1)
                    cer=base64.b64encode(der).decode("ascii"),
                    attributes=attributes_json(record),
                )
                if record.tags is not None:
                    body["tags"] = dict(record.tags)
            body["policy"] = cert.policy.to_json(
                base, cert.name, cert.policy_created, cert.policy_updated
            )
            if cert.preserve_order is not None:
                body["preserveCertOrder"] = cert.preserve_order
            if cert.operation is not None:
                body["pending"] = {"id": f"{base}/certificates/{cert.name}/pending"}
            return body

    def item(
        self,
        vault: str,
        base: str,
        cert: _Certificate,
        entry: _CertVersion | None,
        *,
        versioned: bool,
    ) -> dict[str, Any]:
        """A CertificateItem (lists: no certificate, no policy)."""
        full = self.bundle(vault, base, cert, entry)
        item = {
            "id": full["id"] if versioned else f"{base}/certificates/{cert.name}",
            "attributes": full["attributes"],
        }
        for key in ("tags", "x5t"):
            if key in full:
                item[key] = full[key]
        return item

    def deleted_fields(self, base: str, cert: _Certificate) -> dict[str, Any]:
        """recoveryId, deletedDate and scheduledPurgeDate of a soft-deleted certificate."""
        deleted = cert.deleted_date or 0
        return {
            "recoveryId": f"{base}/deletedcertificates/{cert.name}",
            "deletedDate": deleted,
            "scheduledPurgeDate": deleted + RETENTION_DAYS * 86400,
        }

    @staticmethod
    def operation_json(base: str, cert: _Certificate, operation: _Operation) -> dict[str, Any]:
        """A CertificateOperation."""
        csr = build_csr(operation.policy, operation.key).public_bytes(serialization.Encoding.DER)
        issuer: dict[str, Any] = {"name": operation.policy.issuer}
        if operation.policy.certificate_type is not None:
            issuer["cty"] = operation.policy.certificate_type
        body: dict[str, Any] = {
            "id": f"{base}/certificates/{cert.name}/pending",
            "issuer": issuer,
            "csr": base64.b64encode(csr).decode("ascii"),
            "cancellation_requested": operation.cancellation_requested,
            "status": operation.status,
        }
        if operation.status == IN_PROGRESS:
            unknown = operation.policy.issuer.lower() == UNKNOWN.lower()
            body["status_details"] = _MERGE_DETAILS if unknown else _PENDING_DETAILS
        elif operation.status == COMPLETED:
            body["target"] = f"{base}/certificates/{cert.name}"
        elif operation.status == CANCELLED:
            body["status_details"] = "The certificate request was cancelled."
        body["request_id"] = operation.request_id
        return body

    def key_json(
        self, base: str, cert: _Certificate, entry: _CertVersion, record: _Version
    ) -> dict[str, Any]:
        """A KeyBundle: the public JWK of a certificate's key, managed, with its attributes."""
        kid = f"{base}/keys/{cert.name}/{entry.version}"
        attributes = attributes_json(record)
        attributes["exportable"] = entry.exportable
        body: dict[str, Any] = {
            "key": public_jwk(entry.key, kid, key_ops(entry.key_usage, entry.kty)),
            "attributes": attributes,
        }
        if record.tags is not None:
            body["tags"] = dict(record.tags)
        body["managed"] = True
        return body

    # ------------------------------------------------------------------ persistence

    def dump(self) -> dict[str, Any]:
        """Certificates (deleted ones too), issuers and contacts, for the state file."""
        with self._lock:
            return {
                "certificates": {
                    vault: [_dump_certificate(cert) for cert in certs.values()]
                    for vault, certs in self._vaults.items()
                },
                "issuers": self._issuers,
                "contacts": self._contacts,
                "issuanceDelay": self.issuance_delay,
            }

    def load(self, data: Mapping[str, Any]) -> None:
        """Replace everything with what :meth:`dump` wrote."""
        with self._lock:
            self._vaults = {
                vault: {cert.name.lower(): cert for cert in map(_load_certificate, certs)}
                for vault, certs in data.get("certificates", {}).items()
            }
            self._issuers = {v: dict(i) for v, i in data.get("issuers", {}).items()}
            self._contacts = {v: list(c) for v, c in data.get("contacts", {}).items()}
            self.issuance_delay = float(data.get("issuanceDelay", 0.0))

    def __iter__(self) -> Iterator[tuple[str, _Certificate]]:
        with self._lock:
            items = [(v, c) for v, certs in self._vaults.items() for c in certs.values()]
        return iter(items)


def _issuer_not_found(name: str) -> VaultError:
    return VaultError(404, "CertificateIssuerNotFound", f"Issuer not found: {name}")


def issuer_json(base: str, record: Mapping[str, Any]) -> dict[str, Any]:
    """An IssuerBundle (the credentials' password is never shown)."""
    body: dict[str, Any] = {
        "id": f"{base}/certificates/issuers/{record['name']}",
        "provider": record["provider"],
    }
    credentials = record.get("credentials")
    if credentials:
        body["credentials"] = {k: v for k, v in credentials.items() if k != "pwd"}
    if record.get("org_details") is not None:
        body["org_details"] = record["org_details"]
    body["attributes"] = {
        "enabled": record["enabled"],
        "created": record["created"],
        "updated": record["updated"],
    }
    return body


# ---------------------------------------------------------------------- (de)serialising


def _key_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")


def _load_key(text: str) -> PrivateKey:
    key = serialization.load_pem_private_key(text.encode("ascii"), None)
    if not isinstance(key, PrivateKey):
        raise bad_parameter("The saved key is neither RSA nor EC.")
    return key


def _cert_pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _dump_certificate(cert: _Certificate) -> dict[str, Any]:
    operation = cert.operation
    return {
        "name": cert.name,
        "policy": cert.policy.to_json("", cert.name, cert.policy_created, cert.policy_updated),
        "policyCreated": cert.policy_created,
        "policyUpdated": cert.policy_updated,
        "deleted": cert.deleted_date,
        "preserveOrder": cert.preserve_order,
        "versions": [
            {
                "version": v.version,
                "certificate": _cert_pem(v.certificate),
                "chain": [_cert_pem(c) for c in v.chain],
                "key": _key_pem(v.key),
                "exportable": v.exportable,
                "kty": v.kty,
                "keyUsage": list(v.key_usage),
            }
            for v in cert.versions.values()
        ],
        "operation": None
        if operation is None
        else {
            "requestId": operation.request_id,
            "version": operation.version,
            "key": _key_pem(operation.key),
            "policy": operation.policy.to_json("", cert.name, 0, 0),
            "created": operation.created,
            "enabled": operation.enabled,
            "tags": operation.tags,
            "status": operation.status,
            "cancellationRequested": operation.cancellation_requested,
        },
    }


def _load_certificate(data: Mapping[str, Any]) -> _Certificate:
    try:
        cert = _Certificate(
            data["name"],
            CertificatePolicy.from_json(data["policy"]),
            int(data["policyCreated"]),
            int(data["policyUpdated"]),
            deleted_date=data.get("deleted"),
            preserve_order=data.get("preserveOrder"),
        )
        for v in data["versions"]:
            cert.versions[v["version"]] = _CertVersion(
                v["version"],
                x509.load_pem_x509_certificate(v["certificate"].encode("ascii")),
                tuple(x509.load_pem_x509_certificate(c.encode("ascii")) for c in v["chain"]),
                _load_key(v["key"]),
                bool(v["exportable"]),
                str(v["kty"]),
                tuple(v["keyUsage"]),
            )
        op = data.get("operation")
        if op is not None:
            cert.operation = _Operation(
                op["requestId"],
                op["version"],
                _load_key(op["key"]),
                CertificatePolicy.from_json(op["policy"]),
                float(op["created"]),
                bool(op["enabled"]),
                op.get("tags"),
                op["status"],
                bool(op["cancellationRequested"]),
            )
    except (KeyError, TypeError, ValueError) as exc:
        raise bad_parameter(f"The certificate data is malformed ({exc}).") from None
    return cert
