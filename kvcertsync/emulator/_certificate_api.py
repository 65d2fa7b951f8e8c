"""The HTTP side of certificates, certificate keys and secret backup: paths, bodies, answers."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from typing import Any

import attrs
from aiohttp import web

from kvcertsync.emulator._json import json_object
from kvcertsync.emulator._wire import json_response, page
from kvcertsync.emulator.certificates import CertificateVault, issuer_json
from kvcertsync.emulator.policy import object_field
from kvcertsync.emulator.store import VaultError, VaultStore, bad_parameter, secret_bundle, tags_of

__all__ = ["CertificateApi"]

_RESERVED = frozenset({"contacts", "issuers", "restore"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _blob(body: Mapping[str, Any]) -> bytes:
    value = body.get("value")
    if not isinstance(value, str) or not value:
        raise bad_parameter("The property 'value' (the backup blob) is required.")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        raise bad_parameter("The property 'value' is not base64url.") from None


def _flag(body: Mapping[str, Any], key: str) -> bool | None:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad_parameter(f"The property '{key}' must be true or false.")
    return value


def _is_root(rest: list[str]) -> bool:
    return not rest or rest == [""]


@attrs.frozen
class _Call:
    """One request and the vault it is for; ``base`` builds ids, ``next_base`` nextLinks."""

    request: web.BaseRequest
    vault: str
    base: str
    next_base: str

    @property
    def method(self) -> str:
        return self.request.method

    def not_allowed(self) -> VaultError:
        return VaultError(
            405,
            "MethodNotAllowed",
            f"The method {self.method} is not allowed on {self.request.path}.",
        )

    def no_path(self) -> VaultError:
        return VaultError(404, "NotFound", f"The path {self.request.path} does not exist.")

    def only(self, *methods: str) -> None:
        if self.method not in methods:
            raise self.not_allowed()

    async def body(self) -> dict[str, Any]:
        return await json_object(
            self.request, lambda reason: bad_parameter(f"The request {reason}.")
        )

    def page(self, items: list[dict[str, Any]]) -> web.Response:
        return page(self.request, items, self.next_base)


class CertificateApi:
    """Answers /certificates, /deletedcertificates, /keys and secret backup/restore."""

    def __init__(self, certificates: CertificateVault, secrets: VaultStore) -> None:
        self._certs = certificates
        self._secrets = secrets

    async def route(
        self, request: web.BaseRequest, vault: str, base: str, next_base: str
    ) -> web.Response | None:
        """The answer for a path this API owns, or None to let the secrets API try."""
        parts = request.path.split("/")[1:]
        collection, rest = parts[0], parts[1:]
        call = _Call(request, vault, base, next_base)
        if collection == "certificates":
            return await self._certificates(call, rest)
        if collection == "deletedcertificates":
            return await self._deleted(call, rest)
        if collection == "keys":
            return self._keys(call, rest)
        if collection == "secrets" and request.method == "POST":
            return await self._secret_backup(call, rest)
        return None

    # ------------------------------------------------------------------ /certificates

    async def _certificates(self, call: _Call, rest: list[str]) -> web.Response:
        certs, vault, base = self._certs, call.vault, call.base
        if _is_root(rest):
            call.only("GET")
            pending = call.request.query.get("includePending", "").lower() == "true"
            return call.page(
                [
                    certs.item(vault, base, cert, cert.latest(), versioned=False)
                    for cert in certs.certificates(vault, pending=pending)
                ]
            )
        head, tail = rest[0], rest[1:]
        if head == "contacts" and not tail:
            return await self._contacts(call)
        if head == "issuers":
            return await self._issuers(call, tail)
        if head == "restore" and not tail:
            call.only("POST")
            cert = await asyncio.to_thread(certs.restore, vault, _blob(await call.body()))
            return json_response(200, certs.bundle(vault, base, cert, cert.latest()))
        name = head
        if not tail:
            call.only("GET", "DELETE")
            if call.method == "GET":
                return self._certificate(call, name, None)
            cert = certs.delete(vault, name)
            deleted = certs.deleted_fields(base, cert)
            return json_response(200, {**certs.bundle(vault, base, cert, cert.latest()), **deleted})
        action = tail[0]
        if action == "pending":
            return await self._pending(call, name, tail[1:])
        if len(tail) > 1:
            raise call.no_path()
        if action == "create" and call.method == "POST":
            return await self._create(call, name)
        if action == "import" and call.method == "POST":
            return await self._import(call, name)
        if action == "versions" and call.method == "GET":
            cert, entries = certs.versions(vault, name)
            return call.page([certs.item(vault, base, cert, e, versioned=True) for e in entries])
        if action == "policy":
            call.only("GET", "PATCH")
            if call.method == "GET":
                cert = certs.find(vault, name)
            else:
                cert = certs.update_policy(vault, name, await call.body())
            policy = cert.policy.to_json(base, cert.name, cert.policy_created, cert.policy_updated)
            return json_response(200, policy)
        if action == "backup":
            call.only("POST")
            blob = await asyncio.to_thread(certs.backup, vault, name)
            return json_response(200, {"value": _b64url(blob)})
        version = action or None
        call.only("GET", "PATCH")
        if call.method == "GET":
            return self._certificate(call, name, version)
        body = await call.body()
        attributes, tags = object_field(body, "attributes"), tags_of(body)
        cert, entry = certs.update(vault, name, version, attributes, tags, "tags" in body)
        return json_response(200, certs.bundle(vault, base, cert, entry))

    def _certificate(self, call: _Call, name: str, version: str | None) -> web.Response:
        cert, entry = self._certs.get(call.vault, name, version)
        return json_response(200, self._certs.bundle(call.vault, call.base, cert, entry))

    async def _create(self, call: _Call, name: str) -> web.Response:
        if name.lower() in _RESERVED:
            raise bad_parameter(f"The certificate name '{name}' is reserved.")
        body = await call.body()
        operation = await asyncio.to_thread(
            self._certs.create,
            call.vault,
            name,
            body.get("policy"),
            object_field(body, "attributes"),
            tags_of(body),
            _flag(body, "preserveCertOrder"),
        )
        cert = self._certs.find(call.vault, name)
        headers = {
            "Location": (
                f"{call.base}/certificates/{cert.name}/pending?api-version="
                f"{call.request.query['api-version']}&request_id={operation.request_id}"
            )
        }
        remaining = operation.created + self._certs.issuance_delay - self._secrets.clock.time()
        if operation.status == "inProgress" and remaining > 0:
            headers["Retry-After"] = str(max(1, int(remaining + 0.999)))
        return json_response(202, self._certs.operation_json(call.base, cert, operation), headers)

    async def _import(self, call: _Call, name: str) -> web.Response:
        body = await call.body()
        value = body.get("value")
        if not isinstance(value, str) or not value:
            raise bad_parameter("The property 'value' (the certificate) is required.")
        password = body.get("pwd")
        if password is not None and not isinstance(password, str):
            raise bad_parameter("The property 'pwd' must be a string.")
        await asyncio.to_thread(
            self._certs.import_value,
            call.vault,
            name,
            value,
            password,
            body.get("policy"),
            object_field(body, "attributes"),
            tags_of(body),
            _flag(body, "preserveCertOrder"),
        )
        return self._certificate(call, name, None)

    async def _pending(self, call: _Call, name: str, rest: list[str]) -> web.Response:
        certs, vault, base = self._certs, call.vault, call.base
        if rest == ["merge"]:
            call.only("POST")
            body = await call.body()
            attributes, tags = object_field(body, "attributes"), tags_of(body)
            await asyncio.to_thread(certs.merge, vault, name, body.get("x5c"), attributes, tags)
            cert, entry = certs.get(vault, name, None)
            location = {"Location": f"{base}/certificates/{cert.name}"}
            return json_response(201, certs.bundle(vault, base, cert, entry), location)
        if rest:
            raise call.no_path()
        call.only("GET", "PATCH", "DELETE")
        if call.method == "GET":
            cert, operation = certs.operation(vault, name, call.request.query.get("request_id"))
        elif call.method == "PATCH":
            requested = (await call.body()).get("cancellation_requested")
            cert, operation = certs.cancel(vault, name, requested)
        else:
            cert, operation = certs.delete_operation(vault, name)
        return json_response(200, certs.operation_json(base, cert, operation))

    async def _contacts(self, call: _Call) -> web.Response:
        call.only("GET", "PUT", "DELETE")
        if call.method == "PUT":
            contacts = self._certs.contacts(call.vault, (await call.body()).get("contacts", []))
        else:
            contacts = self._certs.contacts(call.vault, delete=call.method == "DELETE")
        return json_response(
            200, {"id": f"{call.base}/certificates/contacts", "contacts": contacts}
        )

    async def _issuers(self, call: _Call, rest: list[str]) -> web.Response:
        if _is_root(rest):
            call.only("GET")
            return call.page(
                [
                    {
                        "id": f"{call.base}/certificates/issuers/{r['name']}",
                        "provider": r["provider"],
                    }
                    for r in self._certs.issuers(call.vault)
                ]
            )
        if len(rest) != 1:
            raise call.no_path()
        call.only("GET", "PUT", "PATCH", "DELETE")
        if call.method in ("PUT", "PATCH"):
            update = call.method == "PATCH"
            record = self._certs.set_issuer(call.vault, rest[0], await call.body(), update=update)
        else:
            record = self._certs.issuer(call.vault, rest[0], delete=call.method == "DELETE")
        return json_response(200, issuer_json(call.base, record))

    # ------------------------------------------------------------------ /deletedcertificates

    async def _deleted(self, call: _Call, rest: list[str]) -> web.Response:
        certs, vault, base = self._certs, call.vault, call.base
        if _is_root(rest):
            call.only("GET")
            return call.page(
                [
                    {
                        **certs.item(vault, base, cert, cert.latest(), versioned=False),
                        **certs.deleted_fields(base, cert),
                    }
                    for cert in certs.certificates(vault, deleted=True)
                    if cert.versions
                ]
            )
        name = rest[0]
        if len(rest) == 1:
            call.only("GET", "DELETE")
            if call.method == "DELETE":
                certs.purge(vault, name)
                return web.Response(status=204)
            cert = certs.get_deleted(vault, name)
            deleted = certs.deleted_fields(base, cert)
            return json_response(200, {**certs.bundle(vault, base, cert, cert.latest()), **deleted})
        if rest[1:] != ["recover"]:
            raise call.no_path()
        call.only("POST")
        cert = certs.recover(vault, name)
        return json_response(200, certs.bundle(vault, base, cert, cert.latest()))

    # ------------------------------------------------------------------ /keys

    def _keys(self, call: _Call, rest: list[str]) -> web.Response:
        call.only("GET")
        certs, vault, base = self._certs, call.vault, call.base

        def listed(name: str, version: str | None, kid: str | None = None) -> dict[str, Any]:
            cert, entry, record = certs.key(vault, name, version)
            key = certs.key_json(base, cert, entry, record)
            item: dict[str, Any] = {
                "kid": kid or key["key"]["kid"],
                "attributes": key["attributes"],
            }
            if "tags" in key:
                item["tags"] = key["tags"]
            item["managed"] = True
            return item

        if _is_root(rest):
            return call.page(
                [
                    listed(cert.name, None, f"{base}/keys/{cert.name}")
                    for cert in certs.certificates(vault)
                ]
            )
        name = rest[0]
        if rest[1:] == ["versions"]:
            _, entries = certs.versions(vault, name)
            return call.page([listed(name, entry.version) for entry in entries])
        if len(rest) > 2:
            raise call.no_path()
        version = rest[1] if len(rest) == 2 and rest[1] else None
        cert, entry, record = certs.key(vault, name, version)
        return json_response(200, certs.key_json(base, cert, entry, record))

    # ------------------------------------------------------------------ secret backup

    async def _secret_backup(self, call: _Call, rest: list[str]) -> web.Response | None:
        sealer = self._certs.sealer
        if rest == ["restore"]:
            payload = sealer.open("Secret", _blob(await call.body()))
            secret = self._secrets.restore(call.vault, payload)
            return json_response(
                200, secret_bundle(call.base, secret, secret.current(), include_value=False)
            )
        if len(rest) == 2 and rest[1] == "backup":
            data = self._secrets.export(call.vault, rest[0])
            return json_response(200, {"value": _b64url(sealer.seal("Secret", data))})
        return None
