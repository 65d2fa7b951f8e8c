"""``POST /_emulator/bulk``: load many secrets and certificates in one admin request."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvcertsync.material import PKCS12_CONTENT_TYPE

if TYPE_CHECKING:
    from kvcertsync.emulator.server import LocalKeyVault

__all__ = ["bulk_load"]

_SECRET_KEYS = frozenset({"vault", "name", "value", "contentType", "tags"})
_CERTIFICATE_KEYS = frozenset({"vault", "name", "dnsNames", "key", "days", "contentType"})


def _entries(body: dict[str, Any], key: str, fail: Callable[[str], Exception]) -> list[Any]:
    entries = body.get(key, [])
    if not isinstance(entries, list):
        raise fail(f"'{key}' must be a list of objects")
    return entries


def _string(entry: dict[str, Any], key: str, where: str, fail: Callable[[str], Exception]) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise fail(f"{where}.{key} (a non-empty string) is required")
    return value


def _checked(
    entry: Any, allowed: frozenset[str], where: str, fail: Callable[[str], Exception]
) -> dict[str, Any]:
    """``entry`` as an object of known fields with a ``vault`` and a ``name``."""
    if not isinstance(entry, dict):
        raise fail(f"{where} must be an object")
    unknown = set(entry) - allowed
    if unknown:
        raise fail(f"{where} has unknown fields {sorted(unknown)}; known: {sorted(allowed)}")
    _string(entry, "vault", where, fail)
    _string(entry, "name", where, fail)
    return entry


def _validate(body: dict[str, Any], fail: Callable[[str], Exception]) -> None:
    # Everything is checked before anything is stored: a bad entry loads nothing.
    unknown = set(body) - {"secrets", "certificates"}
    if unknown:
        raise fail(f"unknown fields {sorted(unknown)}; known: ['certificates', 'secrets']")
    for i, entry in enumerate(_entries(body, "secrets", fail)):
        where = f"secrets[{i}]"
        entry = _checked(entry, _SECRET_KEYS, where, fail)
        if not isinstance(entry.get("value"), str):
            raise fail(f"{where}.value (a string) is required")
        if not isinstance(entry.get("contentType", ""), str):
            raise fail(f"{where}.contentType must be a string")
        if not isinstance(entry.get("tags", {}), dict):
            raise fail(f"{where}.tags must be an object")
    for i, entry in enumerate(_entries(body, "certificates", fail)):
        where = f"certificates[{i}]"
        entry = _checked(entry, _CERTIFICATE_KEYS, where, fail)
        names = entry.get("dnsNames", [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise fail(f"{where}.dnsNames must be a list of strings")
        if entry.get("key", "ec") not in ("ec", "rsa"):
            raise fail(f"{where}.key must be 'ec' or 'rsa'")
        days = entry.get("days", 90)
        if isinstance(days, bool) or not isinstance(days, int | float) or days <= 0:
            raise fail(f"{where}.days must be a positive number")
        if not isinstance(entry.get("contentType", PKCS12_CONTENT_TYPE), str):
            raise fail(f"{where}.contentType must be a string")


def _load(kv: LocalKeyVault, body: dict[str, Any]) -> dict[str, list[dict[str, str]]]:
    secrets = [
        {
            "vault": e["vault"],
            "name": e["name"],
            "version": kv.set_secret(
                e["vault"], e["name"], e["value"], e.get("contentType"), tags=e.get("tags")
            ),
        }
        for e in body.get("secrets", [])
    ]
    certificates = []
    for e in body.get("certificates", []):
        dns_names = e.get("dnsNames") or [f"{e['name']}.example.com"]
        material = kv.authority.issue(dns_names, key=e.get("key", "ec"), days=e.get("days", 90))
        content_type = e.get("contentType", PKCS12_CONTENT_TYPE)
        version = kv.import_certificate(e["vault"], e["name"], material, content_type)
        certificates.append(
            {
                "vault": e["vault"],
                "name": e["name"],
                "version": version,
                "thumbprint": material.thumbprint,
            }
        )
    return {"secrets": secrets, "certificates": certificates}


async def bulk_load(
    kv: LocalKeyVault, body: dict[str, Any], fail: Callable[[str], Exception]
) -> dict[str, list[dict[str, str]]]:
    """Validate every entry of ``body``, then store them all; returns each new version."""
    _validate(body, fail)
    # Issuing certificates generates keys and signs: in a worker thread, off the event loop.
    return await asyncio.to_thread(_load, kv, body)
