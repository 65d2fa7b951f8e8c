"""``kvcertsync check``: what the agent would do with settings here, and what would fail."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from kvcertsync.errors import StoreError
from kvcertsync.settings import AgentSettings, ObservedCertificate
from kvcertsync.stores.base import Store
from kvcertsync.stores.memory import MemoryStore
from kvcertsync.stores.pemdir import PemDirectoryStore
from kvcertsync.stores.windows import WindowsCertStore

__all__ = ["describe", "problems"]


def _identity(settings: AgentSettings, cert: ObservedCertificate) -> str:
    endpoint = settings.msi_endpoint or "the VM's IMDS"
    if cert.msi_client_id:
        return f"user-assigned {cert.msi_client_id} (authenticationOverride), via {endpoint}"
    if settings.msi_client_id:
        return f"user-assigned {settings.msi_client_id} (msiClientId), via {endpoint}"
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
        location = cert.store_location if cert.is_windows_store else "LocalMachine"
        yield "installs to", f"{location}\\{cert.store_name} (Windows certificate store)"
        if cert.accounts:
            yield "key readers", ", ".join(cert.accounts)
        yield "key", "exportable" if cert.key_exportable else "not exportable"
    elif isinstance(store, MemoryStore):
        yield "installs to", "memory (this process only)"
    else:
        yield "installs to", repr(store)


def describe(settings: AgentSettings, store: Store) -> Iterator[str]:
    """Lines saying where each certificate goes, as whom, and what the agent honours."""
    link = ""
    if isinstance(store, WindowsCertStore):
        link = f"; linkOnRenewal {str(store.link_on_renewal).lower()}"
    yield (
        f"polling every {settings.polling_interval:g} s; requireInitialSync "
        f"{str(settings.require_initial_sync).lower()}{link}; {len(settings.observed)} certificates"
    )
    for cert in settings.observed:
        yield f"  {cert.uri}"
        rows = [*_where(cert, store), ("identity", _identity(settings, cert))]
        acls = _acls(settings, cert, store)
        if acls is not None:
            rows.append(("acls", acls))
        for label, text in rows:
            yield f"    {label + ':':<13}{text}"
    if settings.logging is not None:
        yield (
            "  loggingSettings: not honoured (kvcertsync logs to stderr or --log-file; "
            "--log-format json for a log shipper)"
        )


def problems(settings: AgentSettings, store: Store) -> list[str]:
    """What would fail on this machine although the settings are valid."""
    found: list[str] = []
    if sys.platform != "win32":
        import grp
        import pwd

        for index, cert in enumerate(settings.observed):
            path = f"observedCertificates[{index}].acls"
            for acl in cert.acls:
                if acl.user:
                    try:
                        pwd.getpwnam(acl.user)
                    except KeyError:
                        found.append(f"{path}: user {acl.user!r} does not exist on this machine")
                if acl.group:
                    try:
                        grp.getgrnam(acl.group)
                    except KeyError:
                        found.append(f"{path}: group {acl.group!r} does not exist on this machine")
    if isinstance(store, WindowsCertStore):
        for index, cert in enumerate(settings.observed):
            if not cert.is_windows_store:
                found.append(
                    f"observedCertificates[{index}].certificateStoreLocation: "
                    f"{cert.store_location!r} is a directory, not LocalMachine or CurrentUser"
                )
    return found
