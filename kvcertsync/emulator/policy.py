"""CertificatePolicy: Key Vault's policy JSON read, checked and defaulted; the X.509 it asks for."""

from __future__ import annotations

import calendar
import ipaddress
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from kvcertsync.emulator._keys import CURVES, RSA_SIZES, PrivateKey, describe_key
from kvcertsync.emulator.store import bad_parameter
from kvcertsync.material import PEM_CONTENT_TYPE, PKCS12_CONTENT_TYPE

__all__ = [
    "SELF",
    "UNKNOWN",
    "CertificatePolicy",
    "LifetimeAction",
    "build_csr",
    "build_leaf",
    "object_field",
    "policy_for_certificate",
]

SELF = "Self"
UNKNOWN = "Unknown"
KEY_USAGES = (
    "digitalSignature",
    "nonRepudiation",
    "keyEncipherment",
    "dataEncipherment",
    "keyAgreement",
    "keyCertSign",
    "cRLSign",
    "encipherOnly",
    "decipherOnly",
)
_DEFAULT_EKUS = (
    ExtendedKeyUsageOID.SERVER_AUTH.dotted_string,
    ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string,
)
_RSA_USAGE = ("digitalSignature", "keyEncipherment")
_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_UPN = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
_NAME_TYPES = {
    "E": NameOID.EMAIL_ADDRESS,
    "EMAIL": NameOID.EMAIL_ADDRESS,
    "S": NameOID.STATE_OR_PROVINCE_NAME,
}
#: Key Vault backdates a new certificate's notBefore by ten minutes (seen in its answers).
BACKDATE = timedelta(minutes=10)


@attrs.frozen
class LifetimeAction:
    """One ``lifetime_actions`` entry: at a trigger, ``AutoRenew`` or ``EmailContacts``."""

    action: str
    lifetime_percentage: int | None = None
    days_before_expiry: int | None = None

    def due(self, not_before: float, expires: float) -> float:
        """The Unix time this action triggers for a certificate valid from/until these times."""
        if self.days_before_expiry is not None:
            return expires - self.days_before_expiry * 86400
        return not_before + (expires - not_before) * (self.lifetime_percentage or 80) / 100

    def to_json(self) -> dict[str, Any]:
        """The wire form."""
        trigger = (
            {"days_before_expiry": self.days_before_expiry}
            if self.days_before_expiry is not None
            else {"lifetime_percentage": self.lifetime_percentage}
        )
        return {"trigger": trigger, "action": {"action_type": self.action}}


@attrs.frozen
class CertificatePolicy:
    """Everything a certificate's policy says, with Key Vault's defaults filled in."""

    issuer: str = SELF
    certificate_type: str | None = None
    cert_transparency: bool | None = None
    kty: str = "RSA"
    key_size: int | None = 2048
    curve: str | None = None
    exportable: bool = True
    reuse_key: bool = False
    content_type: str = PKCS12_CONTENT_TYPE
    subject: str = ""
    dns_names: tuple[str, ...] = ()
    emails: tuple[str, ...] = ()
    upns: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    ekus: tuple[str, ...] = _DEFAULT_EKUS
    key_usage: tuple[str, ...] = _RSA_USAGE
    validity_months: int = 12
    ca: bool = False
    lifetime_actions: tuple[LifetimeAction, ...] = (LifetimeAction("AutoRenew", 80),)
    enabled: bool = True

    @property
    def is_ec(self) -> bool:
        """Whether the key is an elliptic-curve one."""
        return self.kty.upper().startswith("EC")

    @classmethod
    def from_json(
        cls, body: Any, *, current: CertificatePolicy | None = None, where: str = "policy"
    ) -> CertificatePolicy:
        """Read a policy; fields left out keep ``current``'s values (or the defaults)."""
        if not isinstance(body, Mapping):
            raise bad_parameter(f"The property '{where}' must be an object.")
        base = current or cls()
        changes: dict[str, Any] = {}
        issuer = object_field(body, "issuer", where)
        if issuer:
            name = _string(issuer, "name", f"{where}.issuer")
            if name is not None:
                changes["issuer"] = name
                if current is None or name != current.issuer:
                    # A new issuer brings its own default actions unless some are given.
                    changes["lifetime_actions"] = _default_actions(name)
            if "cty" in issuer:
                changes["certificate_type"] = _string(issuer, "cty", f"{where}.issuer")
            if "cert_transparency" in issuer:
                changes["cert_transparency"] = _bool(issuer, "cert_transparency", f"{where}.issuer")
        elif current is None:
            changes["lifetime_actions"] = _default_actions(base.issuer)
        changes.update(_key_props(object_field(body, "key_props", where), base, where))
        secret = object_field(body, "secret_props", where)
        content_type = _string(secret, "contentType", f"{where}.secret_props")
        if content_type is not None:
            if content_type.lower() not in (PKCS12_CONTENT_TYPE, PEM_CONTENT_TYPE):
                raise bad_parameter(
                    f"The property '{where}.secret_props.contentType' must be "
                    f"{PKCS12_CONTENT_TYPE} or {PEM_CONTENT_TYPE}, not '{content_type}'."
                )
            changes["content_type"] = content_type.lower()
        changes.update(_x509_props(object_field(body, "x509_props", where), base, where))
        if "lifetime_actions" in body and body["lifetime_actions"] is not None:
            changes["lifetime_actions"] = _actions(body["lifetime_actions"], where)
        attributes = object_field(body, "attributes", where)
        if "enabled" in attributes:
            changes["enabled"] = _bool(attributes, "enabled", f"{where}.attributes")
        policy = attrs.evolve(base, **changes)
        policy._check(where)
        return policy

    def _check(self, where: str) -> None:
        if not self.subject and not (self.dns_names or self.emails or self.upns):
            raise bad_parameter(
                f"The policy needs '{where}.x509_props.subject' or subject alternative names."
            )
        if self.subject:
            parse_subject(self.subject, where)
        days = self.validity_months * 28
        for index, action in enumerate(self.lifetime_actions):
            if action.days_before_expiry is not None and action.days_before_expiry >= days:
                raise bad_parameter(
                    f"'{where}.lifetime_actions[{index}].trigger.days_before_expiry' "
                    f"({action.days_before_expiry}) must be shorter than the validity "
                    f"({self.validity_months} months)."
                )
            if action.action == "AutoRenew" and self.issuer.lower() == UNKNOWN.lower():
                raise bad_parameter(
                    "AutoRenew needs an issuer Key Vault can ask; with the 'Unknown' issuer "
                    "use EmailContacts."
                )

    def to_json(self, base: str, name: str, created: int, updated: int) -> dict[str, Any]:
        """The policy as the service shows it."""
        key: dict[str, Any] = {"exportable": self.exportable, "kty": self.kty}
        if self.is_ec:
            key["crv"] = self.curve
        else:
            key["key_size"] = self.key_size
        key["reuse_key"] = self.reuse_key
        sans: dict[str, list[str]] = {}
        for field, wire in (
            ("emails", "emails"),
            ("dns_names", "dns_names"),
            ("upns", "upns"),
            ("uris", "uris"),
            ("ip_addresses", "ipAddresses"),
        ):
            values = getattr(self, field)
            if values:
                sans[wire] = list(values)
        x509_props: dict[str, Any] = {}
        if self.subject:
            x509_props["subject"] = self.subject
        x509_props.update(
            sans=sans,
            ekus=list(self.ekus),
            key_usage=list(self.key_usage),
            validity_months=self.validity_months,
            basic_constraints={"ca": self.ca},
        )
        issuer: dict[str, Any] = {"name": self.issuer}
        if self.certificate_type is not None:
            issuer["cty"] = self.certificate_type
        if self.cert_transparency is not None:
            issuer["cert_transparency"] = self.cert_transparency
        return {
            "id": f"{base}/certificates/{name}/policy",
            "key_props": key,
            "secret_props": {"contentType": self.content_type},
            "x509_props": x509_props,
            "lifetime_actions": [action.to_json() for action in self.lifetime_actions],
            "issuer": issuer,
            "attributes": {"enabled": self.enabled, "created": created, "updated": updated},
        }

    def validity(self, start: datetime) -> tuple[datetime, datetime]:
        """notBefore and notAfter of a certificate issued at ``start``."""
        return start - BACKDATE, add_months(start, self.validity_months)


# ---------------------------------------------------------------------- reading JSON


def object_field(body: Mapping[str, Any], key: str, where: str = "") -> Mapping[str, Any]:
    """``body[key]`` as an object ({} when absent), or a 400 naming ``where.key``."""
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        path = f"{where}.{key}" if where else key
        raise bad_parameter(f"The property '{path}' must be an object.")
    return value


def _string(body: Mapping[str, Any], key: str, where: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise bad_parameter(f"The property '{where}.{key}' must be a string.")
    return value


def _bool(body: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad_parameter(f"The property '{where}.{key}' must be true or false.")
    return value


def _int(body: Mapping[str, Any], key: str, where: str) -> int | None:
    value = body.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise bad_parameter(f"The property '{where}.{key}' must be a whole number.")
    return value


def _strings(body: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise bad_parameter(f"The property '{where}.{key}' must be a list of strings.")
    return tuple(value)


def _key_props(props: Mapping[str, Any], base: CertificatePolicy, where: str) -> dict[str, Any]:
    where = f"{where}.key_props"
    changes: dict[str, Any] = {}
    kty = _string(props, "kty", where)
    if kty is not None:
        if kty.upper() not in ("RSA", "RSA-HSM", "EC", "EC-HSM"):
            raise bad_parameter(
                f"The property '{where}.kty' must be RSA, RSA-HSM, EC or EC-HSM, not '{kty}'."
            )
        changes["kty"] = kty.upper()
    is_ec = changes.get("kty", base.kty).startswith("EC")
    size = _int(props, "key_size", where)
    curve = _string(props, "crv", where)
    if is_ec:
        if curve is not None and curve.upper() not in CURVES:
            raise bad_parameter(
                f"The property '{where}.crv' must be one of {', '.join(CURVES)}, not '{curve}'."
            )
        changes.update(curve=(curve or base.curve or "P-256").upper(), key_size=None)
    else:
        if size is not None and size not in RSA_SIZES:
            raise bad_parameter(
                f"The property '{where}.key_size' must be one of "
                f"{', '.join(map(str, RSA_SIZES))}, not {size}."
            )
        changes.update(key_size=size or base.key_size or 2048, curve=None)
    for key in ("exportable", "reuse_key"):
        value = _bool(props, key, where)
        if value is not None:
            changes[key] = value
    if is_ec != base.is_ec and "key_usage" not in changes:
        changes["key_usage"] = ("digitalSignature",) if is_ec else _RSA_USAGE
    return changes


def _x509_props(props: Mapping[str, Any], base: CertificatePolicy, where: str) -> dict[str, Any]:
    where = f"{where}.x509_props"
    changes: dict[str, Any] = {}
    subject = _string(props, "subject", where)
    if subject is not None:
        changes["subject"] = subject
    sans = object_field(props, "sans", where)
    if "sans" in props:
        for wire, field in (
            ("dns_names", "dns_names"),
            ("emails", "emails"),
            ("upns", "upns"),
            ("uris", "uris"),
            ("ipAddresses", "ip_addresses"),
        ):
            changes[field] = _strings(sans, wire, f"{where}.sans") or ()
        for address in changes["ip_addresses"]:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise bad_parameter(
                    f"'{where}.sans.ipAddresses' holds '{address}', which is not an IP address."
                ) from None
    ekus = _strings(props, "ekus", where)
    if ekus is not None:
        for eku in ekus:
            if not _OID.fullmatch(eku):
                raise bad_parameter(f"'{where}.ekus' holds '{eku}', which is not an OID.")
        changes["ekus"] = ekus
    usage = _strings(props, "key_usage", where)
    if usage is not None:
        known = {name.lower(): name for name in KEY_USAGES}
        unknown = [name for name in usage if name.lower() not in known]
        if unknown:
            raise bad_parameter(
                f"'{where}.key_usage' holds {unknown}; known usages: {', '.join(KEY_USAGES)}."
            )
        changes["key_usage"] = tuple(known[name.lower()] for name in usage)
    months = _int(props, "validity_months", where)
    if months is not None:
        if not 1 <= months <= 1200:
            raise bad_parameter(f"'{where}.validity_months' must be between 1 and 1200.")
        changes["validity_months"] = months
    constraints = object_field(props, "basic_constraints", where)
    ca = _bool(constraints, "ca", f"{where}.basic_constraints")
    if ca is not None:
        changes["ca"] = ca
    return changes


def _actions(value: Any, where: str) -> tuple[LifetimeAction, ...]:
    if not isinstance(value, list):
        raise bad_parameter(f"The property '{where}.lifetime_actions' must be a list.")
    actions = []
    for index, entry in enumerate(value):
        at = f"{where}.lifetime_actions[{index}]"
        if not isinstance(entry, Mapping):
            raise bad_parameter(f"The property '{at}' must be an object.")
        trigger = object_field(entry, "trigger", at)
        kind = _string(object_field(entry, "action", at), "action_type", f"{at}.action")
        if kind is None or kind.lower() not in ("autorenew", "emailcontacts"):
            raise bad_parameter(f"'{at}.action.action_type' must be AutoRenew or EmailContacts.")
        percentage = _int(trigger, "lifetime_percentage", f"{at}.trigger")
        days = _int(trigger, "days_before_expiry", f"{at}.trigger")
        if (percentage is None) == (days is None):
            raise bad_parameter(
                f"'{at}.trigger' needs exactly one of lifetime_percentage or days_before_expiry."
            )
        if percentage is not None and not 1 <= percentage <= 99:
            raise bad_parameter(f"'{at}.trigger.lifetime_percentage' must be between 1 and 99.")
        if days is not None and days < 1:
            raise bad_parameter(f"'{at}.trigger.days_before_expiry' must be at least 1.")
        action = "AutoRenew" if kind.lower() == "autorenew" else "EmailContacts"
        actions.append(LifetimeAction(action, percentage, days))
    return tuple(actions)


def _default_actions(issuer: str) -> tuple[LifetimeAction, ...]:
    # Certificates Key Vault cannot renew by itself get a reminder instead of a renewal.
    kind = "EmailContacts" if issuer.lower() == UNKNOWN.lower() else "AutoRenew"
    return (LifetimeAction(kind, 80),)


# ---------------------------------------------------------------------- X.509


def add_months(when: datetime, months: int) -> datetime:
    """``when`` plus calendar months (the day clamped to the month's length)."""
    index = when.month - 1 + months
    year, month = when.year + index // 12, index % 12 + 1
    day = min(when.day, calendar.monthrange(year, month)[1])
    return when.replace(year=year, month=month, day=day)


def parse_subject(subject: str, where: str = "policy") -> x509.Name:
    """A policy subject (``CN=web, O=Contoso``; types in any case) as an X.509 name."""
    parts = [part.strip() for part in re.split(r"(?<!\\)[,;]", subject) if part.strip()]
    normalised = []
    for part in parts:
        kind, sep, value = part.partition("=")
        if not sep or not kind.strip() or not value.strip():
            raise bad_parameter(
                f"'{where}.x509_props.subject' has '{part}', which is not TYPE=value."
            )
        normalised.append(f"{kind.strip().upper()}={value.strip()}")
    try:
        # Key Vault lists the most general part last, as RFC 4514 does.
        return x509.Name.from_rfc4514_string(",".join(normalised), _NAME_TYPES)
    except ValueError as exc:
        raise bad_parameter(f"'{where}.x509_props.subject' is not a valid name: {exc}") from None


def _der_utf8(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) < 128:
        return bytes([0x0C, len(data)]) + data
    length = len(data).to_bytes((len(data).bit_length() + 7) // 8, "big")
    return bytes([0x0C, 0x80 | len(length)]) + length + data


def _extensions(policy: CertificatePolicy) -> list[tuple[x509.ExtensionType, bool]]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in policy.dns_names]
    names += [x509.RFC822Name(email) for email in policy.emails]
    names += [x509.OtherName(_UPN, _der_utf8(upn)) for upn in policy.upns]
    names += [x509.UniformResourceIdentifier(uri) for uri in policy.uris]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in policy.ip_addresses]
    usage = set(policy.key_usage)
    extensions: list[tuple[x509.ExtensionType, bool]] = [
        (x509.BasicConstraints(ca=policy.ca, path_length=None), True),
    ]
    if usage:
        extensions.append(
            (
                x509.KeyUsage(
                    digital_signature="digitalSignature" in usage,
                    content_commitment="nonRepudiation" in usage,
                    key_encipherment="keyEncipherment" in usage,
                    data_encipherment="dataEncipherment" in usage,
                    key_agreement="keyAgreement" in usage
                    or bool(usage & {"encipherOnly", "decipherOnly"}),
                    key_cert_sign="keyCertSign" in usage,
                    crl_sign="cRLSign" in usage,
                    encipher_only="encipherOnly" in usage,
                    decipher_only="decipherOnly" in usage,
                ),
                True,
            )
        )
    if policy.ekus:
        extensions.append(
            (x509.ExtendedKeyUsage([ObjectIdentifier(oid) for oid in policy.ekus]), False)
        )
    if names:
        extensions.append((x509.SubjectAlternativeName(names), False))
    return extensions


def _subject(policy: CertificatePolicy) -> x509.Name:
    if policy.subject:
        return parse_subject(policy.subject)
    return x509.Name([])


def build_csr(policy: CertificatePolicy, key: PrivateKey) -> x509.CertificateSigningRequest:
    """The CSR a pending operation shows: the policy's subject and extensions, signed by ``key``."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(_subject(policy))
    for extension, critical in _extensions(policy):
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(key, hashes.SHA256())


def build_leaf(
    policy: CertificatePolicy,
    key: PrivateKey,
    start: datetime,
    issuer: tuple[x509.Name, PrivateKey] | None = None,
) -> x509.Certificate:
    """A certificate for ``key`` as the policy asks, self-signed or signed by ``issuer``."""
    not_before, not_after = policy.validity(start)
    subject = _subject(policy)
    issuer_name, signing_key = issuer if issuer is not None else (subject, key)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    authority = signing_key.public_key()
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(authority), critical=False
    )
    for extension, critical in _extensions(policy):
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def policy_for_certificate(
    certificate: x509.Certificate,
    key: PrivateKey,
    content_type: str,
    given: Any = None,
) -> CertificatePolicy:
    """The policy Key Vault derives for an imported certificate; ``given`` overrides parts."""
    try:
        sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        ekus = tuple(oid.dotted_string for oid in eku)
    except x509.ExtensionNotFound:
        ekus = ()
    start = certificate.not_valid_before_utc
    months = max(1, round((certificate.not_valid_after_utc - start).days / 30.44))
    described = describe_key(key)
    derived = CertificatePolicy(
        issuer=UNKNOWN,
        kty=described["kty"],
        key_size=described.get("key_size"),
        curve=described.get("crv"),
        content_type=content_type,
        subject=certificate.subject.rfc4514_string(),
        dns_names=tuple(sans.get_values_for_type(x509.DNSName)),
        emails=tuple(sans.get_values_for_type(x509.RFC822Name)),
        uris=tuple(sans.get_values_for_type(x509.UniformResourceIdentifier)),
        ip_addresses=tuple(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
        ekus=ekus,
        key_usage=_key_usage_names(certificate, key),
        validity_months=months,
        lifetime_actions=_default_actions(UNKNOWN),
    )
    if given is None:
        return derived
    policy = CertificatePolicy.from_json(given, current=derived)
    # The key and the subject are the certificate's own, whatever the policy says.
    return attrs.evolve(policy, kty=derived.kty, key_size=derived.key_size, curve=derived.curve)


def _key_usage_names(certificate: x509.Certificate, key: PrivateKey) -> tuple[str, ...]:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return ("digitalSignature",)
        return _RSA_USAGE if isinstance(key, rsa.RSAPrivateKey) else ()
    flags = {
        "digitalSignature": usage.digital_signature,
        "nonRepudiation": usage.content_commitment,
        "keyEncipherment": usage.key_encipherment,
        "dataEncipherment": usage.data_encipherment,
        "keyAgreement": usage.key_agreement,
        "keyCertSign": usage.key_cert_sign,
        "cRLSign": usage.crl_sign,
    }
    if usage.key_agreement:
        flags["encipherOnly"] = usage.encipher_only
        flags["decipherOnly"] = usage.decipher_only
    return tuple(name for name, present in flags.items() if present)


def epoch(when: datetime) -> int:
    """Whole Unix seconds of an aware datetime."""
    return int(when.astimezone(UTC).timestamp())
