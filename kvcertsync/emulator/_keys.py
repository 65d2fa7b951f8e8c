"""A certificate's key as the keys API shows it: key generation and the public JSON Web Key."""

from __future__ import annotations

import base64
from collections.abc import Iterable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = [
    "CURVES",
    "RSA_SIZES",
    "PrivateKey",
    "describe_key",
    "generate_key",
    "key_ops",
    "public_jwk",
]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

RSA_SIZES = (2048, 3072, 4096)
CURVES: dict[str, ec.EllipticCurve] = {
    "P-256": ec.SECP256R1(),
    "P-384": ec.SECP384R1(),
    "P-521": ec.SECP521R1(),
    "P-256K": ec.SECP256K1(),
}
_CURVE_NAMES = {type(curve).__name__: name for name, curve in CURVES.items()}

# Which key operations each X.509 key usage allows on the certificate's key.
_OPS = {
    "digitalSignature": ("sign", "verify"),
    "nonRepudiation": ("sign", "verify"),
    "keyEncipherment": ("wrapKey", "unwrapKey", "encrypt", "decrypt"),
    "dataEncipherment": ("encrypt", "decrypt"),
}
_ORDER = ("sign", "verify", "wrapKey", "unwrapKey", "encrypt", "decrypt")


def generate_key(kty: str, key_size: int | None, curve: str | None) -> PrivateKey:
    """A fresh key as a policy's ``key_props`` describe it (an -HSM type as its software twin)."""
    if kty.upper().startswith("EC"):
        return ec.generate_private_key(CURVES[curve or "P-256"])
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size or 2048)


def describe_key(key: PrivateKey) -> dict[str, Any]:
    """The ``key_props`` that describe an existing key (kty and size or curve)."""
    if isinstance(key, rsa.RSAPrivateKey):
        return {"kty": "RSA", "key_size": key.key_size}
    return {"kty": "EC", "crv": _CURVE_NAMES.get(type(key.curve).__name__, "P-256")}


def key_ops(key_usage: Iterable[str], kty: str) -> list[str]:
    """The ``key_ops`` a certificate key gets from its policy's key usage."""
    allowed = {op for usage in key_usage for op in _OPS.get(usage, ())}
    if kty.upper().startswith("EC"):
        allowed &= {"sign", "verify"}
    return [op for op in _ORDER if op in allowed]


def _b64url(number: int) -> str:
    raw = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _coordinate(number: int, curve: ec.EllipticCurve) -> str:
    raw = number.to_bytes((curve.key_size + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def public_jwk(key: PrivateKey, kid: str, ops: list[str]) -> dict[str, Any]:
    """The public half of ``key`` as Key Vault's JsonWebKey (never a private component)."""
    jwk: dict[str, Any] = {"kid": kid}
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        jwk.update(kty="RSA", key_ops=ops, n=_b64url(numbers.n), e=_b64url(numbers.e))
    else:
        point = public.public_numbers()
        jwk.update(
            kty="EC",
            key_ops=ops,
            crv=_CURVE_NAMES.get(type(public.curve).__name__, "P-256"),
            x=_coordinate(point.x, public.curve),
            y=_coordinate(point.y, public.curve),
        )
    return jwk
