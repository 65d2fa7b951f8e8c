"""Backup blobs: opaque, sealed with a key only this emulator (and its state dir) holds."""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any, Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kvcertsync.emulator.store import bad_parameter

__all__ = ["BackupSealer", "Kind"]

Kind = Literal["Secret", "Certificate"]


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class BackupSealer:
    """Seals objects into blobs shaped like Key Vault's: a marker, then a compact JWE.

    The service's blob is ``<length><AzureKeyVault{Kind}BackupV1.microsoft.com>`` followed by a
    JWE only Key Vault can open; here the JWE is AES-256-GCM (``dir``) under ``key``, so a blob
    opens only in an emulator that holds the same key (one ``--state-dir``).
    """

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key or AESGCM.generate_key(bit_length=256)
        self._aead = AESGCM(self.key)

    @staticmethod
    def _marker(kind: Kind) -> bytes:
        label = f"AzureKeyVault{kind}BackupV1.microsoft.com".encode("ascii")
        return bytes([len(label)]) + label

    def seal(self, kind: Kind, payload: dict[str, Any]) -> bytes:
        """The blob for ``payload`` (its secret values are encrypted, never readable in it)."""
        header = _b64url(json.dumps({"alg": "dir", "enc": "A256GCM"}).encode("ascii"))
        nonce = os.urandom(12)
        sealed = self._aead.encrypt(
            nonce, json.dumps(payload).encode("utf-8"), header.encode("ascii")
        )
        token = ".".join((header, "", _b64url(nonce), _b64url(sealed[:-16]), _b64url(sealed[-16:])))
        return self._marker(kind) + token.encode("ascii")

    def open(self, kind: Kind, blob: bytes) -> dict[str, Any]:
        """The payload of a blob this emulator sealed; anything else is the service's 400."""
        marker = self._marker(kind)
        invalid = bad_parameter(f"The {kind.lower()} backup is not valid or was made elsewhere.")
        if not blob.startswith(marker):
            raise invalid
        try:
            header, _, nonce, ciphertext, tag = blob[len(marker) :].decode("ascii").split(".")
            plain = self._aead.decrypt(
                _unb64url(nonce), _unb64url(ciphertext) + _unb64url(tag), header.encode("ascii")
            )
            payload = json.loads(plain)
        except (ValueError, UnicodeDecodeError, binascii.Error, InvalidTag):
            raise invalid from None
        if not isinstance(payload, dict):
            raise invalid
        return payload

    def __repr__(self) -> str:
        return "<BackupSealer>"
