"""The composition root: the one place that knows the implementations behind the protocols.

The engine knows only the SecretSource and Store protocols; this module picks a credential, a
source and a store for extension settings, so a working agent comes from the extension's JSON
alone (``sync_from_settings``), and parses the ``--store`` forms the command line takes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from azure.core.credentials_async import AsyncTokenCredential

from kvcertsync.engine import CertSync
from kvcertsync.settings import AgentSettings, ObservedCertificate
from kvcertsync.sources.base import SecretSource
from kvcertsync.sources.keyvault import KeyVaultSource
from kvcertsync.stores.base import Store
from kvcertsync.stores.memory import MemoryStore
from kvcertsync.stores.pemdir import PemDirectoryStore
from kvcertsync.stores.plugins import store_from_name, store_plugin_of
from kvcertsync.stores.windows import WindowsCertStore

__all__ = [
    "STORE_FORMS",
    "consumer_paths",
    "describe_store",
    "reconfigure",
    "source_from_settings",
    "store_from_settings",
    "store_from_spec",
    "sync_from_settings",
]

#: What ``--store`` accepts, for help texts and errors.
STORE_FORMS = "pem:DIR, pem-split:DIR, windows, memory, or NAME[:ARGS] of a store plugin"


def source_from_settings(
    settings: AgentSettings, credential: AsyncTokenCredential | None = None, **options: Any
) -> SecretSource:
    """A KeyVaultSource authenticating as ``settings`` say (or with ``credential``)."""
    return KeyVaultSource.from_settings(settings, credential=credential, **options)


def store_from_settings(settings: AgentSettings) -> Store:
    """The store the platform and the certificates' locations call for.

    On Windows, the certificate store (crypt32). Elsewhere a PemDirectoryStore: certificates
    whose location is a directory go there, the others to the Linux extension's default
    directory, as it does.
    """
    if sys.platform == "win32":
        return WindowsCertStore.from_settings(settings)
    return PemDirectoryStore.from_settings(settings)


def store_from_spec(spec: str | None, settings: AgentSettings) -> Store:
    """The store ``--store`` names: ``NAME`` or ``NAME:ARGS``, built in or from a plugin.

    None means the platform's default (``store_from_settings``). The built-ins are ``pem:DIR``,
    ``pem-split:DIR`` (``DIR`` is where certificates go whose settings name no directory of
    their own), ``windows`` and ``memory``; ValueError says what is wrong with ``spec``.
    """
    if spec is None:
        return store_from_settings(settings)
    name, sep, args = spec.partition(":")
    try:
        return store_from_name(name, args if sep else None, settings)
    except ValueError as exc:
        raise ValueError(f"--store {spec!r}: {exc}") from exc


def consumer_paths(
    store: Store, observed: ObservedCertificate, location: str
) -> tuple[str, tuple[str, ...]]:
    """What a consumer of ``observed`` configures, and the files behind it.

    ``location`` is what the store reported (``<dir>/<vault>.<name>``, ``LocalMachine\\MY``).
    A PEM store's consumer names the custom link when there is one; the split layout's files
    are named through the link, so they follow each renewal.
    """
    if not isinstance(store, PemDirectoryStore):
        return location, ()
    link = Path(location)
    if observed.symlink_name:
        link = link.with_name(observed.symlink_name)
    if store.layout == "split":
        names = ("cert.pem", "chain.pem", "fullchain.pem", "privkey.pem")
        return str(link), tuple(str(link / name) for name in names)
    return str(link), (str(link),)


def describe_store(store: Store) -> str:
    """One line saying where a store puts certificates, for a person."""
    if isinstance(store, PemDirectoryStore):
        return (
            f"PEM files ({store.layout} layout) in each certificate's certificateStoreLocation, "
            f"else {store.directory}"
        )
    if isinstance(store, WindowsCertStore):
        return "the Windows certificate store"
    if isinstance(store, MemoryStore):
        return "memory (nothing is written)"
    plugin = store_plugin_of(store)
    return repr(store) if plugin is None else f"{store!r} (plugin {plugin.describe()})"


def sync_from_settings(
    settings: AgentSettings,
    *,
    store: Store | None = None,
    source: SecretSource | None = None,
    credential: AsyncTokenCredential | None = None,
    ca_file: str | None = None,
    redirect: Mapping[str, str] | None = None,
    **options: Any,
) -> CertSync:
    """A CertSync for extension settings, with the platform's store and Key Vault by default.

    Without ``source`` it reads Key Vault, authenticating as the settings say (or with
    ``credential``); ``ca_file`` and ``redirect`` point it at an emulator. Without ``store`` it
    installs where the settings' locations point. ``options`` go to CertSync.
    """
    if store is None:
        store = store_from_settings(settings)
    if source is None:
        source = source_from_settings(
            settings,
            credential,
            ca_file=ca_file,
            redirect=redirect,
            max_connections=options.get("max_concurrency", 32),
        )
    elif ca_file is not None or redirect is not None:
        raise ValueError("ca_file and redirect configure the Key Vault source: not with source=")
    return CertSync.from_settings(settings, store=store, source=source, **options)


def reconfigure(sync: CertSync, settings: AgentSettings) -> None:
    """Apply re-read settings to a running CertSync built here, keeping its state.

    Certificates added, removed or changed (location, ACLs, identity) are applied by
    ``update_observed``; the interval and initial-sync rule change in place; the source
    picks up new identities, the store new store-wide options.
    """
    source = sync.source
    if isinstance(source, KeyVaultSource):
        source.apply_settings(settings)
    store = sync.store
    if isinstance(store, PemDirectoryStore):
        store.apply_acls = settings.acl_enabled
    elif isinstance(store, WindowsCertStore):
        store.link_on_renewal = settings.link_on_renewal
    sync.require_initial_sync = settings.require_initial_sync
    sync.set_polling_interval(settings.polling_interval)
    sync.update_observed(settings.observed)
