"""``kvcertsync check``: what the agent would do with settings here, and what would fail."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

from kvcertsync.errors import StoreError
from kvcertsync.settings import (
    AgentSettings,
    ObservedCertificate,
    SettingsWarning,
    collision_message,
)
from kvcertsync.stores.base import Store
from kvcertsync.stores.memory import MemoryStore
from kvcertsync.stores.pemdir import PemDirectoryStore
from kvcertsync.stores.plugins import store_plugin_of
from kvcertsync.stores.windows import WindowsCertStore

__all__ = ["collisions", "describe", "machine_warnings", "placement", "problems"]


def _cert_path(settings: AgentSettings, index: int) -> str:
    return f"{settings.json_path}.observedCertificates[{index}]"


def identity(settings: AgentSettings, cert: ObservedCertificate) -> dict[str, str | None]:
    """Whom ``cert`` is read as: kind, client id, where that came from, the endpoint."""
    client_id, source = (
        (cert.msi_client_id, "authenticationOverride")
        if cert.msi_client_id
        else (settings.msi_client_id, "msiClientId")
        if settings.msi_client_id
        else (None, None)
    )
    return {
        "kind": "user-assigned" if client_id else "system-assigned",
        "clientId": client_id,
        "from": source,
        "endpoint": settings.msi_endpoint,
    }


def identity_text(settings: AgentSettings, cert: ObservedCertificate) -> str:
    """``identity()`` in words."""
    who = identity(settings, cert)
    endpoint = who["endpoint"] or "the VM's IMDS"
    if who["kind"] == "user-assigned":
        return f"user-assigned {who['clientId']} ({who['from']}), via {endpoint}"
    return f"system-assigned managed identity, via {endpoint}"


def _acls(settings: AgentSettings, cert: ObservedCertificate, store: Store) -> str | None:
    if not cert.acls:
        return None
    names = ", ".join(
        " and ".join(p for p in (a.user and f"user {a.user}", a.group and f"group {a.group}") if p)
        for a in cert.acls
    )
    if not isinstance(store, PemDirectoryStore):
        return f"{names} (Linux only: this store ignores them)"
    return f"{names} ({'applied' if store.apply_acls else 'not applied: aclEnabled is false'})"


def _windows_location(cert: ObservedCertificate) -> str:
    return cert.store_location if cert.is_windows_store else "LocalMachine"


def _where(cert: ObservedCertificate, store: Store) -> Iterator[tuple[str, str]]:
    if isinstance(store, PemDirectoryStore):
        try:
            directory = store.directory_for(cert)
            base = store.base_name(cert)
        except StoreError as exc:
            yield "installs to", f"nowhere: {exc}"
            return
        layout = "cert, chain, key in one file" if store.layout == "kvlinux" else "split files"
        yield "installs to", f"{directory / base}.<version> ({layout}; {base} links to it)"
        link = cert.symlink_name or base
        yield "configure", f"{directory / link}"
    elif isinstance(store, WindowsCertStore):
        yield (
            "installs to",
            f"{_windows_location(cert)}\\{cert.store_name} (Windows certificate store)",
        )
        if cert.accounts:
            yield "key readers", ", ".join(cert.accounts)
        yield "key", "exportable" if cert.key_exportable else "not exportable"
    elif isinstance(store, MemoryStore):
        yield "installs to", "memory (this process only)"
    else:
        yield "installs to", repr(store)


def placement(
    settings: AgentSettings, index: int, cert: ObservedCertificate, store: Store
) -> dict[str, Any]:
    """Where ``cert`` goes and as whom, as ``kvcertsync check --json`` prints it."""
    where: dict[str, Any]
    if isinstance(store, PemDirectoryStore):
        where = {"kind": "pem", "layout": store.layout}
        try:
            directory = store.directory_for(cert)
            base = store.base_name(cert)
        except StoreError as exc:
            where["error"] = str(exc)
        else:
            suffix = ".<version>" if store.layout == "kvlinux" else ".<version>/"
            where.update(
                directory=str(directory),
                files=f"{directory / base}{suffix}",
                link=str(directory / base),
                configure=str(directory / (cert.symlink_name or base)),
                acls=[acl.to_dict() for acl in cert.acls],
                aclsApplied=bool(cert.acls) and store.apply_acls,
            )
    elif isinstance(store, WindowsCertStore):
        where = {
            "kind": "windows",
            "location": _windows_location(cert),
            "storeName": cert.store_name,
            "accounts": list(cert.accounts),
            "keyExportable": cert.key_exportable,
            "linkOnRenewal": store.link_on_renewal,
        }
    elif isinstance(store, MemoryStore):
        where = {"kind": "memory"}
    else:
        where = {"kind": type(store).__name__}
    plugin = store_plugin_of(store)
    if plugin is not None:
        where["plugin"] = attrs.asdict(plugin)
    return {
        "index": index,
        "path": _cert_path(settings, index),
        "uri": str(cert.uri),
        "vault": cert.uri.vault_name,
        "name": cert.uri.name,
        "version": cert.uri.version,
        "identity": identity(settings, cert),
        "store": where,
    }


def _count(number: int) -> str:
    return f"{number} certificate{'' if number == 1 else 's'}"


def describe(settings: AgentSettings, store: Store) -> Iterator[str]:
    """Lines saying where each certificate goes, as whom, and what the agent honours."""
    link = ""
    if isinstance(store, WindowsCertStore):
        link = f"; linkOnRenewal {str(store.link_on_renewal).lower()}"
    yield (
        f"polling every {settings.polling_interval:g} s; requireInitialSync "
        f"{str(settings.require_initial_sync).lower()}{link}; {_count(len(settings.observed))}"
    )
    plugin = store_plugin_of(store)
    if plugin is not None:
        yield f"store plugin {plugin.describe()}"
    for cert in settings.observed:
        yield f"  {cert.uri}"
        rows = [*_where(cert, store), ("identity", identity_text(settings, cert))]
        acls = _acls(settings, cert, store)
        if acls is not None:
            rows.append(("acls", acls))
        for label, text in rows:
            yield f"    {label + ':':<13}{text}"


def _missing(kind: str, name: str) -> bool:
    if sys.platform == "win32":
        return False
    import grp
    import pwd

    try:
        (pwd.getpwnam if kind == "user" else grp.getgrnam)(name)
    except KeyError:
        return True
    return False


def machine_warnings(settings: AgentSettings, store: Store) -> list[SettingsWarning]:
    """What would fail on this machine although the settings are valid."""
    found: list[SettingsWarning] = []
    for index, cert in enumerate(settings.observed):
        short = f"observedCertificates[{index}].acls"
        for number, acl in enumerate(cert.acls):
            for kind, name in (("user", acl.user), ("group", acl.group)):
                if name is None or not _missing(kind, name):
                    continue
                found.append(
                    SettingsWarning(
                        f"acl-{kind}-missing",
                        f"{_cert_path(settings, index)}.acls[{number}].{kind}",
                        f"{short}: {kind} {name!r} does not exist on this machine",
                        kind="machine",
                        kvcertsync="does not install this certificate until the "
                        f"{kind} exists (StoreError)",
                    )
                )
    if isinstance(store, WindowsCertStore):
        for index, cert in enumerate(settings.observed):
            if not cert.is_windows_store:
                path = f"{_cert_path(settings, index)}.certificateStoreLocation"
                found.append(
                    SettingsWarning(
                        "directory-for-windows-store",
                        path,
                        f"observedCertificates[{index}].certificateStoreLocation: "
                        f"{cert.store_location!r} is a directory, not LocalMachine or CurrentUser",
                        kind="machine",
                    )
                )
    return found


def problems(settings: AgentSettings, store: Store) -> list[str]:
    """``machine_warnings`` as text."""
    return [str(warning) for warning in machine_warnings(settings, store)]


def collisions(settings: AgentSettings, store: Store) -> list[tuple[str, str]]:
    """(JSON path, message) for certificates that would share a file name in this store.

    The parser compares ``certificateStoreLocation`` values; here the store says which
    directory each certificate really lands in (a Windows location on Linux lands in the
    store's default directory, which another certificate may also name).
    """
    if not isinstance(store, PemDirectoryStore):
        return []
    seen: dict[tuple[Path, str], tuple[int, bool]] = {}
    found: list[tuple[str, str]] = []
    for index, cert in enumerate(settings.observed):
        try:
            directory = store.directory_for(cert)
            base = store.base_name(cert)
        except StoreError:
            continue
        names = [(base.lower(), False)]
        if cert.symlink_name and cert.symlink_name.lower() != base.lower():
            names.append((cert.symlink_name.lower(), True))
        for name, custom in names:
            other, other_custom = seen.setdefault((directory, name), (index, custom))
            if other == index:
                continue
            path = _cert_path(settings, index)
            found.append(
                (
                    path,
                    collision_message(
                        name,
                        str(directory),
                        (path, cert, custom),
                        (_cert_path(settings, other), settings.observed[other], other_custom),
                    ),
                )
            )
            break
    return found
