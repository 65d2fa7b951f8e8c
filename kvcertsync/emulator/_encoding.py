"""A certificate as a Key Vault secret value (PFX or PEM) and back, as import reads it."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from kvcertsync.emulator.store import bad_parameter
from kvcertsync.errors import MaterialError
from kvcertsync.material import (
    PEM_CONTENT_TYPE,
    PKCS12_CONTENT_TYPE,
    CertificateMaterial,
    PrivateKey,
)

__all__ = ["CONTENT_TYPES", "convert", "encode_certificate", "read_import", "secret_value"]

CONTENT_TYPES = (PKCS12_CONTENT_TYPE, PEM_CONTENT_TYPE)
_PEM_MARKER = b"-----BEGIN"
_PEM_KEY = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.*?-----END \1-----", re.S)


def secret_value(
    key: PrivateKey | None,
    certificate: x509.Certificate,
    chain: Sequence[x509.Certificate],
    content_type: str,
) -> str:
    """The value Key Vault keeps in a certificate's secret; ``key=None``: not exportable.

    PFX: base64, empty password. PEM: the PKCS#8 key first, then the leaf and its chain, which
    is the order Key Vault writes.
    """
    if content_type == PKCS12_CONTENT_TYPE:
        der = pkcs12.serialize_key_and_certificates(
            None, key, certificate, list(chain) or None, serialization.NoEncryption()
        )
        return base64.b64encode(der).decode("ascii")
    blocks = [cert.public_bytes(serialization.Encoding.PEM) for cert in (certificate, *chain)]
    if key is not None:
        blocks.insert(
            0,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
    return b"".join(blocks).decode("ascii")


def encode_certificate(
    certificate: CertificateMaterial | bytes | str, content_type: str
) -> tuple[CertificateMaterial, str]:
    """The secret value for a certificate given as material, DER PFX / PEM bytes or a str."""
    if content_type not in CONTENT_TYPES:
        raise ValueError(f"content_type must be {PKCS12_CONTENT_TYPE} or {PEM_CONTENT_TYPE}")
    if isinstance(certificate, CertificateMaterial):
        value = secret_value(
            certificate.private_key, certificate.certificate, certificate.chain, content_type
        )
        return certificate, value
    if isinstance(certificate, bytes):
        if _PEM_MARKER in certificate:
            value = certificate.decode("ascii")
        else:
            value = base64.b64encode(certificate).decode("ascii")
    else:
        value = certificate
    return CertificateMaterial.from_secret(value, content_type), value


def convert(value: str, content_type: str | None, out: str) -> str:
    """A certificate-backed secret's value in another format (the outContentType parameter)."""
    material = CertificateMaterial.from_secret(value, content_type)
    return encode_certificate(material, out)[1]


def read_import(value: str, password: str | None) -> tuple[CertificateMaterial, bool]:
    """The certificate an import request carries (base64 PFX, PEM, or base64 of PEM).

    Returns the material and whether it was PEM. Errors are the service's 400 BadParameter.
    """
    raw: bytes
    if _PEM_MARKER.decode() in value:
        raw = value.encode("ascii", "replace")
    else:
        try:
            raw = base64.b64decode(value, validate=False)
        except (binascii.Error, ValueError):
            raise bad_parameter("The certificate value is not base64.") from None
    try:
        if _PEM_MARKER in raw:
            return _read_pem(raw, password), True
        loaded = pkcs12.load_pkcs12(raw, password.encode("utf-8") if password else None)
    except (ValueError, TypeError, MaterialError) as exc:
        hint = " (wrong or missing password?)" if "password" in str(exc).lower() else ""
        raise bad_parameter(
            f"The certificate could not be read as PKCS#12 or PEM{hint}: {exc}"
        ) from None
    if loaded.key is None or loaded.cert is None:
        raise bad_parameter("The imported certificate must contain its private key.")
    others = [bag.certificate for bag in loaded.additional_certs]
    try:
        material = CertificateMaterial.from_key_and_certificates(
            loaded.key, [loaded.cert.certificate, *others]
        )
    except MaterialError as exc:
        raise bad_parameter(f"The imported certificate is not usable: {exc}") from None
    return material, False


def _read_pem(raw: bytes, password: str | None) -> CertificateMaterial:
    block = _PEM_KEY.search(raw)
    if block is None:
        raise bad_parameter("The PEM certificate must contain its private key (PKCS#8).")
    key = serialization.load_pem_private_key(
        block.group(0), password.encode("utf-8") if password else None
    )
    return CertificateMaterial.from_key_and_certificates(key, x509.load_pem_x509_certificates(raw))
