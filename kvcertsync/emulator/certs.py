"""Mint test certificates (root -> intermediate -> leaf) as CertificateMaterial, in memory."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kvcertsync.material import CertificateMaterial, PrivateKey

__all__ = ["KeyKind", "TestAuthority", "mint_certificate"]

KeyKind = Literal["ec", "rsa"]


def _new_key(kind: KeyKind) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kvcertsync test"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


@attrs.frozen
class _Issuer:
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    certificate: x509.Certificate


def _build(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    issuer: _Issuer | None,
    signing_key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    not_before: datetime,
    not_after: datetime,
    ca: bool,
    dns_names: Sequence[str] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.certificate.subject if issuer else subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    authority = issuer.certificate.public_key() if issuer else public_key
    if isinstance(authority, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(authority), critical=False
        )
    if dns_names:
        builder = builder.add_extension(_san(dns_names), critical=False)
    if ca:
        # OpenSSL's strict mode (Python 3.13's default contexts) rejects a CA without keyUsage.
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


class TestAuthority:
    """A root and an intermediate CA that issue leaf certificates for tests and demos."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "kvcertsync test", *, key: KeyKind = "ec") -> None:
        now = datetime.now(UTC)
        root_key = _new_key(key)
        root_name = _name(f"{name} root CA")
        root = _build(
            root_name,
            root_key.public_key(),
            None,
            root_key,
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=3650),
            ca=True,
        )
        self.root = _Issuer(root_key, root)
        inter_key = _new_key(key)
        inter = _build(
            _name(f"{name} intermediate CA"),
            inter_key.public_key(),
            self.root,
            root_key,
            not_before=now - timedelta(days=1),
            not_after=now + timedelta(days=1825),
            ca=True,
        )
        self.intermediate = _Issuer(inter_key, inter)

    @property
    def root_certificate(self) -> x509.Certificate:
        """The self-signed root certificate (a trust anchor for verifying issued chains)."""
        return self.root.certificate

    @property
    def signer(self) -> tuple[x509.Name, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey]:
        """The intermediate's name and key, which sign the leaves this authority issues."""
        return self.intermediate.certificate.subject, self.intermediate.key

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """What a leaf of this authority is served with: the intermediate."""
        return (self.intermediate.certificate,)

    def export(self) -> dict[str, str]:
        """Both CAs' certificates and keys as PEM text, to keep in a private state file."""
        saved = {}
        for role, issuer in (("root", self.root), ("intermediate", self.intermediate)):
            saved[role] = issuer.certificate.public_bytes(serialization.Encoding.PEM).decode()
            saved[f"{role}_key"] = issuer.key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ).decode()
        return saved

    @classmethod
    def restore(cls, data: Mapping[str, str]) -> TestAuthority:
        """The authority :meth:`export` wrote (the same root, so issued chains still verify)."""
        authority = cls.__new__(cls)
        for role in ("root", "intermediate"):
            key = serialization.load_pem_private_key(data[f"{role}_key"].encode("ascii"), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
                raise ValueError(f"the saved {role} CA key is neither EC nor RSA")
            certificate = x509.load_pem_x509_certificate(data[role].encode("ascii"))
            setattr(authority, role, _Issuer(key, certificate))
        return authority

    def issue(
        self,
        dns_names: Sequence[str] = ("www.example.com",),
        *,
        key: KeyKind = "ec",
        days: float = 90,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        include_root: bool = False,
    ) -> CertificateMaterial:
        """A leaf for ``dns_names`` signed by the intermediate, with its chain."""
        start = not_before or datetime.now(UTC) - timedelta(minutes=5)
        end = not_after or start + timedelta(days=days)
        leaf_key = _new_key(key)
        leaf = _build(
            _name(dns_names[0] if dns_names else "kvcertsync test leaf"),
            leaf_key.public_key(),
            self.intermediate,
            self.intermediate.key,
            not_before=start,
            not_after=end,
            ca=False,
            dns_names=dns_names,
        )
        chain = [self.intermediate.certificate]
        if include_root:
            chain.append(self.root.certificate)
        private: PrivateKey = leaf_key
        return CertificateMaterial(private_key=private, certificate=leaf, chain=tuple(chain))


def mint_certificate(
    dns_names: Sequence[str] = ("www.example.com",),
    *,
    key: KeyKind = "ec",
    days: float = 90,
    not_after: datetime | None = None,
) -> CertificateMaterial:
    """A leaf with a fresh throwaway root and intermediate: the one-line way to get a test cert."""
    return TestAuthority(key=key).issue(dns_names, key=key, days=days, not_after=not_after)
