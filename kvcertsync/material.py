"""Certificate material: read a Key Vault secret (PKCS#12 or PEM), order the chain, re-encode it.

Everything here is pure CPU work with no I/O, so callers may run it in a worker thread. No message,
repr or chained exception produced here carries the secret value or any key bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import logging
import re
import threading
import warnings
import weakref
from collections.abc import Iterable
from datetime import datetime
from typing import Literal, TypeAlias, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from kvcertsync.errors import MaterialError

__all__ = [
    "MAX_PFX_ITERATIONS",
    "PEM_CONTENT_TYPE",
    "PKCS12_CONTENT_TYPE",
    "CertificateMaterial",
    "PrivateKey",
    "certificate_dns_names",
    "certificate_thumbprint",
]

logger = logging.getLogger(__name__)

# cryptography warns (on the user's stderr) when it reads a damaged PFX as BER; what the value is
# gets said by a MaterialError instead. A filter, since catch_warnings is not thread-safe.
warnings.filterwarnings(
    "ignore", message="PKCS#12 bundle could not be parsed as DER", category=UserWarning
)

PKCS12_CONTENT_TYPE = "application/x-pkcs12"
PEM_CONTENT_TYPE = "application/x-pem-file"

PrivateKey: TypeAlias = (
    rsa.RSAPrivateKey
    | ec.EllipticCurvePrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)
_SUPPORTED_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)

# Labels are restricted to the characters RFC 7468 allows, so a stray "-----BEGIN" inside
# garbage cannot make the pattern swallow unrelated text.
_PEM_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----(.*?)-----END \1-----", re.DOTALL)
_PEM_MARKER = "-----BEGIN"
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/_=-]*")
_WHITESPACE = re.compile(r"\s+")
_ENCRYPTED_PEM_HEADER = re.compile(r"^Proc-Type:\s*4\s*,\s*ENCRYPTED", re.MULTILINE)
_CERTIFICATE_LABELS = frozenset({"CERTIFICATE", "X509 CERTIFICATE", "TRUSTED CERTIFICATE"})

#: The most key-derivation or MAC iterations a PFX may ask for. Key Vault and OpenSSL use 2,048
#: and Windows 2,000 to 10,000; a crafted 2**31 would keep a parser busy for hours.
MAX_PFX_ITERATIONS = 1_000_000
# Bounds on the walk that finds them: nesting depth, and elements visited.
_DER_DEPTH = 24
_DER_ELEMENTS = 100_000

_PfxFailure = Literal["password", "truncated", "corrupt"]
_E = TypeVar("_E", bound=x509.ExtensionType)


class _SharedCertificate:
    """One parsed chain certificate, shared by every material whose chain holds the same DER."""

    __slots__ = ("__weakref__", "certificate")

    def __init__(self, certificate: x509.Certificate) -> None:
        self.certificate = certificate


# Every leaf of one issuer carries the same intermediate; one parsed copy serves them all, and it
# goes away with the last material that holds it. (x509.Certificate itself takes no weak refs.)
_SHARED: weakref.WeakValueDictionary[bytes, _SharedCertificate] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def _shared(certificate: x509.Certificate) -> _SharedCertificate:
    """The process-wide holder of ``certificate``, keyed by the SHA-256 of its DER."""
    digest = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()
    with _SHARED_LOCK:
        holder = _SHARED.get(digest)
        if holder is None:
            holder = _SHARED[digest] = _SharedCertificate(certificate)
        return holder


def _key_der(key: PrivateKey) -> bytes | PrivateKey:
    """The key as PKCS#8 DER, or the object itself when it refuses to be exported."""
    try:
        return key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    except Exception:  # a non-exportable key (HSM-like) stays an object
        return key


class CertificateMaterial:
    """A private key with its leaf certificate and the leaf's issuer chain (leaf excluded).

    Kept compact: the key and the leaf as DER bytes, parsed again on each access, and the chain
    as parsed certificates shared with every other material that holds the same ones.
    """

    __slots__ = ("__weakref__", "_chain", "_key", "_leaf")

    _key: bytes | PrivateKey
    _leaf: bytes
    _chain: tuple[_SharedCertificate, ...]

    def __init__(
        self,
        private_key: PrivateKey,
        certificate: x509.Certificate,
        chain: Iterable[x509.Certificate] = (),
    ) -> None:
        key: object = private_key  # direct construction bypasses the parsers' checks
        if not isinstance(key, _SUPPORTED_KEYS):
            raise MaterialError(_unsupported_key_message(key)) from None
        if _spki(certificate) != _key_spki(private_key):
            raise MaterialError("the private key does not belong to the certificate") from None
        object.__setattr__(self, "_key", _key_der(private_key))
        object.__setattr__(self, "_leaf", certificate.public_bytes(serialization.Encoding.DER))
        object.__setattr__(self, "_chain", tuple(_shared(cert) for cert in chain))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"CertificateMaterial is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"CertificateMaterial is immutable (cannot delete {name!r})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CertificateMaterial):
            return NotImplemented
        # As before: the certificates decide, the key object's identity does not.
        return self._leaf == other._leaf and self._chain_ders() == other._chain_ders()

    def __hash__(self) -> int:
        return hash((self._leaf, self._chain_ders()))

    def __copy__(self) -> CertificateMaterial:
        return self  # immutable

    def __deepcopy__(self, memo: dict[int, object]) -> CertificateMaterial:
        return self

    def __reduce__(self) -> tuple[object, ...]:
        # Never pickled with its key: a pickle would be a private key written somewhere.
        raise TypeError("CertificateMaterial cannot be pickled (it holds a private key)")

    @property
    def private_key(self) -> PrivateKey:
        """The private key, parsed from its DER on each access."""
        if not isinstance(self._key, bytes):
            return self._key
        # These bytes are our own export of a key already checked on the way in.
        key = serialization.load_der_private_key(
            self._key, password=None, unsafe_skip_rsa_key_validation=True
        )
        assert isinstance(key, _SUPPORTED_KEYS)
        return key

    @property
    def certificate(self) -> x509.Certificate:
        """The leaf certificate, parsed from its DER on each access."""
        return x509.load_der_x509_certificate(self._leaf)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The issuer chain, issuer of the leaf first; its objects are shared between materials."""
        return tuple(holder.certificate for holder in self._chain)

    def _chain_ders(self) -> tuple[bytes, ...]:
        return tuple(
            holder.certificate.public_bytes(serialization.Encoding.DER) for holder in self._chain
        )

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_secret(
        cls, value: str | bytes, content_type: str | None = None
    ) -> CertificateMaterial:
        """Read a Key Vault secret value: base64 or DER PKCS#12, or PEM blocks in any order."""
        declared = _normalise_content_type(content_type)
        if not value or not value.strip():
            raise MaterialError("the secret value is empty") from None
        if _looks_like_pem(value):
            if declared == PKCS12_CONTENT_TYPE:
                logger.debug("secret declared %s but holds PEM; reading it as PEM", declared)
            return cls._from_pem(_to_text(value))
        if declared == PEM_CONTENT_TYPE:
            logger.debug("secret declared %s but holds no PEM block; trying PKCS#12", declared)
        der = _pfx_bytes(value, declared)
        if der.startswith(_PEM_MARKER.encode("ascii")):
            # Some tools base64-wrap a whole PEM file; the content, not the wrapping, decides.
            return cls._from_pem(_to_text(der))
        return cls._from_pfx(der)

    @classmethod
    def from_key_and_certificates(
        cls, private_key: PrivateKeyTypes, certificates: Iterable[x509.Certificate]
    ) -> CertificateMaterial:
        """Pick the leaf matching ``private_key`` among ``certificates`` and order the rest."""
        if not isinstance(private_key, _SUPPORTED_KEYS):
            raise MaterialError(_unsupported_key_message(private_key)) from None
        unique = _dedupe(certificates)
        for position, certificate in enumerate(unique, start=1):
            if not _names_parse(certificate):
                raise MaterialError(
                    f"certificate {position} of the secret has a subject or issuer that does "
                    "not parse"
                ) from None
        if not unique:
            raise MaterialError("the secret holds a private key but no certificate") from None
        key_spki = _key_spki(private_key)
        matching = [cert for cert in unique if _spki(cert) == key_spki]
        if not matching:
            raise MaterialError(
                f"the private key matches none of the {len(unique)} certificate(s) in the secret"
            ) from None
        # A CA certificate can share the leaf's key (self-issued setups); the end-entity wins.
        leaf = next((cert for cert in matching if not _is_ca(cert)), matching[0])
        others = [cert for cert in unique if cert is not leaf]
        return cls(private_key=private_key, certificate=leaf, chain=_order_chain(leaf, others))

    @classmethod
    def _from_pfx(cls, der: bytes) -> CertificateMaterial:
        iterations = _pfx_iterations(der)
        if iterations > MAX_PFX_ITERATIONS:
            raise MaterialError(
                f"the PKCS#12 (PFX) value asks for {iterations:,} key-derivation iterations; "
                f"more than {MAX_PFX_ITERATIONS:,} are refused (Key Vault uses 2,048)"
            )
        loaded = _load_pkcs12(der)
        if isinstance(loaded, str):
            raise MaterialError(_pfx_failure_message(loaded, der)) from None
        if loaded.key is None:
            raise MaterialError("the PKCS#12 (PFX) value holds no private key") from None
        certificates = [bag.certificate for bag in loaded.additional_certs]
        if loaded.cert is not None:
            certificates.insert(0, loaded.cert.certificate)
        if not certificates:
            raise MaterialError("the PKCS#12 (PFX) value holds no certificate") from None
        return cls.from_key_and_certificates(loaded.key, certificates)

    @classmethod
    def _from_pem(cls, text: str) -> CertificateMaterial:
        blocks = list(_PEM_BLOCK.finditer(text))
        if len(blocks) != text.count(_PEM_MARKER):
            raise MaterialError(
                "the PEM value has a block without a matching END line (truncated?)"
            ) from None
        keys: list[PrivateKey] = []
        certificates: list[x509.Certificate] = []
        for index, block in enumerate(blocks, start=1):
            label = block.group(1)
            if label in _CERTIFICATE_LABELS:
                certificates.append(_pem_certificate(label, block.group(2), index))
            elif label.endswith("PRIVATE KEY"):
                keys.append(_pem_private_key(label, block.group(0), index))
            else:
                logger.debug("ignoring PEM block %d labelled %r", index, label)
        distinct = {_key_spki(key): key for key in keys}
        if not distinct:
            if certificates:
                raise MaterialError("the PEM value holds certificates but no private key") from None
            raise MaterialError(
                "the PEM value holds neither a certificate nor a private key"
            ) from None
        if len(distinct) > 1:
            raise MaterialError(
                f"the PEM value holds {len(distinct)} different private keys; expected one"
            ) from None
        if not certificates:
            raise MaterialError("the PEM value holds a private key but no certificate") from None
        return cls.from_key_and_certificates(next(iter(distinct.values())), certificates)

    # ------------------------------------------------------------------ facts

    @property
    def thumbprint(self) -> str:
        """SHA-1 of the leaf's DER, upper-case hex without separators, as Windows shows it."""
        return _der_thumbprint(self._leaf)

    @property
    def sha256(self) -> str:
        """SHA-256 of the leaf's DER, upper-case hex without separators."""
        return hashlib.sha256(self._leaf).hexdigest().upper()

    @property
    def not_before(self) -> datetime:
        """Start of the leaf's validity (timezone-aware UTC)."""
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        """End of the leaf's validity (timezone-aware UTC)."""
        return self.certificate.not_valid_after_utc

    @property
    def subject(self) -> str:
        """The leaf's subject as an RFC 4514 string."""
        return self.certificate.subject.rfc4514_string()

    @property
    def issuer(self) -> str:
        """The leaf's issuer as an RFC 4514 string."""
        return self.certificate.issuer.rfc4514_string()

    @property
    def serial_number(self) -> int:
        """The leaf's serial number."""
        return self.certificate.serial_number

    @property
    def common_name(self) -> str | None:
        """The leaf's first subject common name, if any."""
        attributes = self.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not attributes:
            return None
        value = attributes[0].value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")

    @property
    def dns_names(self) -> tuple[str, ...]:
        """DNS names from the leaf's subjectAltName extension (empty if it has none)."""
        return certificate_dns_names(self.certificate)

    @property
    def is_self_signed(self) -> bool:
        """Whether the leaf is its own issuer."""
        return _is_self_issued(self.certificate)

    # ------------------------------------------------------------------ encodings

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def cert_pem(self) -> bytes:
        """The leaf certificate as PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def chain_pem(self) -> bytes:
        """The chain (issuer of the leaf first) as concatenated PEM; b"" when there is none."""
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.chain)

    def fullchain_pem(self) -> bytes:
        """The leaf followed by its chain, as concatenated PEM."""
        return self.cert_pem() + self.chain_pem()

    def to_pem_bundle(self) -> bytes:
        """Leaf, chain, then the key: the single-file layout KeyVaultForLinux writes."""
        return self.fullchain_pem() + self.key_pem()

    def to_pkcs12(self, password: bytes | None = None, friendly_name: bytes | None = None) -> bytes:
        """A DER PFX with key, leaf and chain; unencrypted unless a non-empty password is given."""
        encryption: serialization.KeySerializationEncryption
        if password:
            encryption = (
                serialization.PrivateFormat.PKCS12.encryption_builder()
                .kdf_rounds(2048)
                .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
                .hmac_hash(hashes.SHA256())
                .build(password)
            )
        else:
            # cryptography cannot encrypt under an empty password; its unencrypted PFX still
            # carries a MAC keyed by the empty password, which every reader accepts for "".
            encryption = serialization.NoEncryption()
        return pkcs12.serialize_key_and_certificates(
            friendly_name, self.private_key, self.certificate, list(self.chain) or None, encryption
        )

    # ------------------------------------------------------------------ helpers

    def __repr__(self) -> str:
        name = self.common_name
        who = f"CN={name}" if name is not None else (self.subject or "<empty subject>")
        expires = self.not_after.strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"<CertificateMaterial {who} thumbprint={self.thumbprint} not_after={expires}>"


# ---------------------------------------------------------------------- input decoding


def certificate_dns_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """DNS names from a certificate's subjectAltName: none if it has none, or none to trust."""
    san = _extension(certificate, x509.SubjectAlternativeName)
    if san is None:
        return ()
    return tuple(san.get_values_for_type(x509.DNSName))


def certificate_thumbprint(certificate: x509.Certificate) -> str:
    """SHA-1 of a certificate's DER, upper-case hex without separators, as Windows shows it."""
    return _der_thumbprint(certificate.public_bytes(serialization.Encoding.DER))


def _der_thumbprint(der: bytes) -> str:
    # SHA-1 here is an identifier that crypt32 and the Windows UI use, not a security check.
    return hashlib.sha1(der, usedforsecurity=False).hexdigest().upper()


def _normalise_content_type(content_type: str | None) -> str | None:
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


def _looks_like_pem(value: str | bytes) -> bool:
    if isinstance(value, bytes):
        return _PEM_MARKER.encode("ascii") in value
    return _PEM_MARKER in value


def _to_text(value: str | bytes) -> str:
    # latin-1 maps every byte, so decoding never fails and PEM's ASCII survives unchanged.
    return value if isinstance(value, str) else value.decode("latin-1")


def _pfx_bytes(value: str | bytes, declared: str | None) -> bytes:
    """DER PFX bytes from base64 text, or from raw DER when given bytes that are not base64."""
    if isinstance(value, bytes):
        text = value.decode("latin-1")
        if _BASE64_TEXT.fullmatch(_WHITESPACE.sub("", text)) is None:
            return value
    else:
        text = value
    compact = _WHITESPACE.sub("", text)
    if _BASE64_TEXT.fullmatch(compact) is None:
        what = f" (declared {declared})" if declared else ""
        raise MaterialError(
            f"the secret value{what} is neither PEM nor base64-encoded PKCS#12 (PFX)"
        ) from None
    decoded = _b64decode(compact)
    if decoded is None:
        raise MaterialError("the secret value is not valid base64") from None
    return decoded


def _b64decode(compact: str) -> bytes | None:
    text = compact.replace("-", "+").replace("_", "/")
    stripped = text.rstrip("=")
    if "=" in stripped:
        return None
    # A cut-off value loses its padding; decoding the whole quanta lets the DER check below
    # report "truncated" instead of a confusing base64 complaint.
    usable = stripped[: len(stripped) - len(stripped) % 4]
    remainder = stripped[len(usable) :]
    if len(remainder) >= 2:
        usable += remainder + "=" * (4 - len(remainder))
    try:
        return base64.b64decode(usable, validate=True)
    except (binascii.Error, ValueError):
        return None


def _load_pkcs12(der: bytes) -> pkcs12.PKCS12KeyAndCertificates | _PfxFailure:
    # Key Vault writes PFX with an empty password; other tools mean "no password" as NULL,
    # and the two give different MACs, so both are tried.
    for password in (None, b""):
        try:
            return pkcs12.load_pkcs12(der, password)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    return _classify_pfx_failure(der)


def _pfx_failure_message(failure: _PfxFailure, der: bytes) -> str:
    if failure == "password":
        return (
            "the PKCS#12 (PFX) value is protected by a password (or its integrity check "
            "failed); only PFX with an empty or no password is supported"
        )
    if failure == "truncated":
        declared = _der_header(der, 0)
        total = declared[1] + declared[2] if declared is not None else 0
        return (
            f"the PKCS#12 (PFX) value is truncated: its header declares {total} bytes "
            f"but only {len(der)} are present"
        )
    return "the value is not a valid PKCS#12 (PFX) structure (corrupt data)"


def _der_header(data: bytes, offset: int) -> tuple[int, int, int] | None:
    """(tag, header length, content length) of the DER element at ``offset``, or None."""
    if offset + 2 > len(data):
        return None
    tag, first = data[offset], data[offset + 1]
    if tag & 0x1F == 0x1F:
        return None
    if first < 0x80:
        return tag, 2, first
    count = first & 0x7F
    # Zero means BER indefinite length, never valid DER; more than 4 bytes is absurd here.
    if count == 0 or count > 4 or offset + 2 + count > len(data):
        return None
    return tag, 2 + count, int.from_bytes(data[offset + 2 : offset + 2 + count], "big")


def _pfx_iterations(der: bytes) -> int:
    """The largest iteration count a PFX's MAC or any of its KDFs asks for (0: none seen).

    Every such count (MacData, PBKDF2-params, pkcs-12PbeParams) is an INTEGER right after the
    salt's OCTET STRING in a SEQUENCE, so the DER tree is walked for that shape, into OCTET
    STRINGs that hold DER (the authenticated safe, its bags) too. Encrypted parts stay opaque.
    """
    budget = [_DER_ELEMENTS]
    most = [0]

    def children(start: int, end: int, depth: int) -> list[tuple[int, int, int]] | None:
        """(tag, content start, content end) of the elements tiling ``start:end``."""
        found: list[tuple[int, int, int]] = []
        offset = start
        while offset < end:
            element = walk(offset, end, depth)
            if element is None:
                return None
            found.append(element[:3])
            offset = element[3]
        return found

    def walk(offset: int, end: int, depth: int) -> tuple[int, int, int, int] | None:
        """(tag, content start, content end, element end) of the element at ``offset``."""
        budget[0] -= 1
        if budget[0] < 0 or depth > _DER_DEPTH or offset + 2 > end:
            return None
        tag, first = der[offset], der[offset + 1]
        if tag & 0x1F == 0x1F:
            return None
        constructed = bool(tag & 0x20)
        if first == 0x80:  # BER indefinite length: children up to an end-of-contents marker
            if not constructed:
                return None
            start = position = offset + 2
            items: list[tuple[int, int, int]] = []
            while der[position : position + 2] != b"\x00\x00":
                element = walk(position, end, depth + 1)
                if element is None:
                    return None
                items.append(element[:3])
                position = element[3]
            look(tag, items)
            return tag, start, position, position + 2
        header = _der_header(der, offset)
        if header is None or offset + header[1] + header[2] > end:
            return None
        start, stop = offset + header[1], offset + header[1] + header[2]
        if constructed:
            items_or_none = children(start, stop, depth + 1)
            if items_or_none is None:
                return None
            look(tag, items_or_none)
        elif tag == 0x04 and stop > start and der[start] in (0x30, 0x31):
            children(start, stop, depth + 1)  # DER inside an OCTET STRING, if it is DER
        return tag, start, stop, stop

    def look(tag: int, items: list[tuple[int, int, int]]) -> None:
        if tag != 0x30:
            return
        for (first_tag, _, _), (second_tag, start, stop) in itertools.pairwise(items):
            if first_tag == 0x04 and second_tag == 0x02:
                # More than 8 bytes is beyond any real count: report it as huge.
                value = int.from_bytes(der[start:stop], "big") if stop - start <= 8 else 2**64
                most[0] = max(most[0], value)

    walk(0, len(der), 0)
    return most[0]


def _classify_pfx_failure(der: bytes) -> _PfxFailure:
    """Tell a password-protected PFX from a cut-off or damaged one by its outer DER shape."""
    if der[:2] == b"\x30\x80":
        # BER indefinite length (cryptography accepts it): only its end-of-contents can be checked.
        well_formed = der.endswith(b"\x00\x00") and der[2:5] == b"\x02\x01\x03"
        return "password" if well_formed else "corrupt"
    outer = _der_header(der, 0)
    if outer is None or outer[0] != 0x30:
        return "corrupt"
    end = outer[1] + outer[2]
    if end > len(der):
        return "truncated"
    # Trailing bytes after the PFX are tolerated by cryptography, so they decide nothing here.
    offset = outer[1]
    version = _der_header(der, offset)
    if version is None or version[0] != 0x02:
        return "corrupt"
    if der[offset + version[1] : offset + version[1] + version[2]] != b"\x03":
        return "corrupt"
    offset += version[1] + version[2]
    # authSafe, then the optional macData: both SEQUENCEs that must tile the rest exactly.
    for required in (True, False):
        if offset == end and not required:
            break
        element = _der_header(der, offset)
        if element is None or element[0] != 0x30 or offset + element[1] + element[2] > end:
            return "corrupt"
        offset += element[1] + element[2]
    return "password" if offset == end else "corrupt"


def _pem_certificate(label: str, body: str, index: int) -> x509.Certificate:
    der = _pem_body(body)
    if der is not None and label == "TRUSTED CERTIFICATE":
        # OpenSSL appends its trust settings after the certificate: keep the first element.
        header = _der_header(der, 0)
        der = der[: header[1] + header[2]] if header is not None else None
    certificate = None
    if der is not None:
        try:
            certificate = x509.load_der_x509_certificate(der)
        except (ValueError, x509.InvalidVersion):
            # InvalidVersion (a version other than 1-3) is no ValueError in cryptography.
            certificate = None
    if certificate is None:
        raise MaterialError(f"PEM block {index} ({label}) is not a valid certificate") from None
    return certificate


def _pem_body(body: str) -> bytes | None:
    try:
        return base64.b64decode(_WHITESPACE.sub("", body), validate=True)
    except (binascii.Error, ValueError):
        return None


def _pem_private_key(label: str, block: str, index: int) -> PrivateKey:
    if label == "ENCRYPTED PRIVATE KEY" or _ENCRYPTED_PEM_HEADER.search(block):
        raise MaterialError(_encrypted_key_message(index)) from None
    outcome: PrivateKey | str
    try:
        loaded = serialization.load_pem_private_key(block.encode("latin-1"), password=None)
    except TypeError:
        outcome = _encrypted_key_message(index)
    except UnsupportedAlgorithm:
        outcome = f"PEM block {index} ({label}) holds a key of an unsupported type"
    except ValueError:
        outcome = f"PEM block {index} ({label}) is not a valid private key"
    else:
        if isinstance(loaded, _SUPPORTED_KEYS):
            outcome = loaded
        else:
            outcome = _unsupported_key_message(loaded)
    if isinstance(outcome, str):
        raise MaterialError(outcome) from None
    return outcome


def _encrypted_key_message(index: int) -> str:
    return (
        f"PEM block {index} holds an encrypted private key, which needs a password; "
        "encrypted keys are not supported"
    )


def _unsupported_key_message(key: object) -> str:
    kind = type(key).__name__.removeprefix("_")
    return f"unsupported private key type {kind}: RSA, EC, Ed25519 and Ed448 are supported"


# ---------------------------------------------------------------------- certificate logic


def _key_spki(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _spki(certificate: x509.Certificate) -> bytes | None:
    try:
        public_key = certificate.public_key()
    except (ValueError, UnsupportedAlgorithm):
        # A certificate with a key cryptography cannot load can never be our leaf.
        return None
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _dedupe(certificates: Iterable[x509.Certificate]) -> list[x509.Certificate]:
    seen: set[bytes] = set()
    unique: list[x509.Certificate] = []
    for certificate in certificates:
        der = certificate.public_bytes(serialization.Encoding.DER)
        if der not in seen:
            seen.add(der)
            unique.append(certificate)
    return unique


def _extension(certificate: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return certificate.extensions.get_extension_for_class(kind).value
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        # cryptography refuses malformed (ValueError) or duplicated extensions (an Exception of
        # its own, not a ValueError): either way, none can be trusted; treat as absent.
        return None


def _names_parse(certificate: x509.Certificate) -> bool:
    """Whether the subject and issuer parse (cryptography reads them only on first use)."""
    try:
        certificate.subject, certificate.issuer  # noqa: B018 - parsed on access
    except ValueError:
        return False
    return True


def _is_ca(certificate: x509.Certificate) -> bool:
    constraints = _extension(certificate, x509.BasicConstraints)
    return constraints is not None and constraints.ca


def _subject_key_id(certificate: x509.Certificate) -> bytes | None:
    ski = _extension(certificate, x509.SubjectKeyIdentifier)
    return ski.digest if ski is not None else None


def _authority_key_id(certificate: x509.Certificate) -> bytes | None:
    aki = _extension(certificate, x509.AuthorityKeyIdentifier)
    return aki.key_identifier if aki is not None else None


def _is_self_issued(certificate: x509.Certificate) -> bool:
    if certificate.subject != certificate.issuer:
        return False
    aki, ski = _authority_key_id(certificate), _subject_key_id(certificate)
    # Same name but a different key identifier is a CA key-rollover link, not a root.
    return aki is None or ski is None or aki == ski


def _order_chain(
    leaf: x509.Certificate, others: list[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """Walk issuer links up from the leaf; certificates that do not link follow in given order."""
    remaining = list(others)
    chain: list[x509.Certificate] = []
    current = leaf
    while remaining and not _is_self_issued(current):
        candidates = [cert for cert in remaining if cert.subject == current.issuer]
        if not candidates:
            break
        wanted = _authority_key_id(current)

        def rank(cert: x509.Certificate, wanted: bytes | None = wanted) -> int:
            have = _subject_key_id(cert)
            if wanted is None or have is None:
                return 1
            return 0 if have == wanted else 2

        # min() is stable, so equal ranks keep the order the secret gave them.
        issuer = min(candidates, key=rank)
        chain.append(issuer)
        remaining = [cert for cert in remaining if cert is not issuer]
        current = issuer
    return (*chain, *remaining)
