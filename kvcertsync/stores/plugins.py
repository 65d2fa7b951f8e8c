"""Stores by name: the built-in ones, and third-party ones from `kvcertsync.stores` entry points.

A distribution provides a store by declaring an entry point in the ``kvcertsync.stores`` group
whose object is a ``StoreFactory``: called as ``factory(args, settings)`` with the text after
``NAME:`` in ``--store NAME:ARGS`` (None without a colon) and the extension settings, it returns a
Store. Nothing is imported until a store is asked for by name, and then only that plugin.
"""

from __future__ import annotations

import logging
import weakref
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import attrs

from kvcertsync.errors import KvCertSyncError
from kvcertsync.stores.base import Store
from kvcertsync.stores.memory import MemoryStore
from kvcertsync.stores.pemdir import Layout, PemDirectoryStore
from kvcertsync.stores.windows import WindowsCertStore

if TYPE_CHECKING:
    from kvcertsync.settings import AgentSettings

__all__ = [
    "BUILTIN_STORES",
    "ENTRY_POINT_GROUP",
    "StoreFactory",
    "StorePlugin",
    "StorePluginError",
    "installed_store_plugins",
    "store_from_name",
    "store_plugin_of",
]

logger = logging.getLogger(__name__)

#: The entry-point group third-party stores register in.
ENTRY_POINT_GROUP = "kvcertsync.stores"


class StoreFactory(Protocol):
    """What a store entry point names: ``factory(args, settings) -> Store``.

    ``args`` is the text after ``NAME:`` (None when there is no colon); a factory raises
    ValueError saying what is wrong with it. A class whose ``__init__`` takes these two, or a
    classmethod (``mypkg.store:MyStore.from_spec``), is one.
    """

    def __call__(self, args: str | None, settings: AgentSettings, /) -> Store:
        """Build the store ``args`` describe, for ``settings``."""
        ...


@attrs.frozen
class StorePlugin:
    """One installed store plugin, as its entry point declares it (nothing imported)."""

    #: The store's name, as ``--store NAME:ARGS`` takes it.
    name: str
    #: What the entry point refers to: ``module:attribute``.
    value: str
    #: The distribution that declares it, and its version (None when unknown).
    distribution: str | None
    version: str | None

    @property
    def label(self) -> str:
        """``NAME (DIST VERSION)``, for messages."""
        return f"{self.name} ({self.provider})"

    @property
    def provider(self) -> str:
        """``DIST VERSION``: who provides the store."""
        if self.distribution is None:
            return "an unknown distribution"
        return f"{self.distribution} {self.version or '(no version)'}"

    def describe(self) -> str:
        """``NAME from DIST VERSION (module:attribute)``: everything known about it."""
        return f"{self.name} from {self.provider} ({self.value})"


class StorePluginError(KvCertSyncError, ValueError):
    """No store has that name, or the plugin that provides it failed to load or to build it."""


def _pem(args: str | None, settings: AgentSettings) -> Store:
    return _pem_store("pem", "kvlinux", args, settings)


def _pem_split(args: str | None, settings: AgentSettings) -> Store:
    return _pem_store("pem-split", "split", args, settings)


def _pem_store(name: str, layout: Layout, args: str | None, settings: AgentSettings) -> Store:
    if not args:
        raise ValueError(f"{name} needs a directory, as in {name}:/etc/certs")
    return PemDirectoryStore.from_settings(settings, directory=Path(args).absolute(), layout=layout)


def _windows(args: str | None, settings: AgentSettings) -> Store:
    _no_args("windows", args)
    return WindowsCertStore.from_settings(settings)


def _memory(args: str | None, settings: AgentSettings) -> Store:
    _no_args("memory", args)
    return MemoryStore()


def _no_args(name: str, args: str | None) -> None:
    if args is not None:
        raise ValueError(f"{name} takes no argument; use {name} alone")


# name -> (the form help texts show, the factory)
_BUILTINS: dict[str, tuple[str, StoreFactory]] = {
    "pem": ("pem:DIR", _pem),
    "pem-split": ("pem-split:DIR", _pem_split),
    "windows": ("windows", _windows),
    "memory": ("memory", _memory),
}

#: The built-in stores, in the form ``--store`` takes them.
BUILTIN_STORES: tuple[str, ...] = tuple(form for form, _ in _BUILTINS.values())

# Which plugin built which store, for ``kvcertsync check``; weak, so stores die as usual.
_PROVIDERS: weakref.WeakKeyDictionary[object, StorePlugin] = weakref.WeakKeyDictionary()
# (name, value) pairs whose clash with a built-in was logged: once per process, not per reload.
_WARNED: set[tuple[str, str]] = set()


def _plugin(entry: EntryPoint) -> StorePlugin:
    dist = entry.dist
    if dist is None:
        return StorePlugin(entry.name, entry.value, None, None)
    return StorePlugin(entry.name, entry.value, dist.name, dist.version)


def installed_store_plugins() -> tuple[StorePlugin, ...]:
    """Every store plugin installed, sorted by name; none of them is imported."""
    found = (_plugin(entry) for entry in entry_points(group=ENTRY_POINT_GROUP))
    return tuple(sorted(found, key=lambda plugin: (plugin.name, plugin.value)))


def store_plugin_of(store: Store) -> StorePlugin | None:
    """The plugin that built ``store`` through ``store_from_name``, or None."""
    try:
        return _PROVIDERS.get(store)
    except TypeError:  # an object that takes no weak reference was never recorded
        return None


def store_from_name(name: str, args: str | None, settings: AgentSettings) -> Store:
    """The store called ``name`` (a built-in, else an installed plugin), built from ``args``.

    Built-in names win over plugins of the same name (a warning says so). StorePluginError
    (a ValueError) names what went wrong: an unknown name (listing what there is), a plugin
    that fails to import, or a factory that rejects ``args`` or fails.
    """
    entries = list(entry_points(group=ENTRY_POINT_GROUP, name=name))
    builtin = _BUILTINS.get(name)
    if builtin is not None:
        for entry in entries:
            _warn_shadowed(_plugin(entry))
        return builtin[1](args, settings)
    if not entries:
        raise StorePluginError(f"no store is called {name!r}; {_available()}")
    plugins = sorted({_plugin(entry) for entry in entries}, key=lambda p: p.describe())
    if len(plugins) > 1:
        both = " and ".join(plugin.describe() for plugin in plugins)
        raise StorePluginError(
            f"store {name!r} is provided by {both}: uninstall all but one of them"
        )
    plugin = plugins[0]
    store = _build(plugin, entries[0], args, settings)
    try:
        _PROVIDERS[store] = plugin
    except TypeError:
        logger.debug("%s: its store takes no weak reference; check cannot name it", plugin.label)
    return store


def _build(
    plugin: StorePlugin, entry: EntryPoint, args: str | None, settings: AgentSettings
) -> Store:
    try:
        factory = entry.load()
    except Exception as exc:
        raise StorePluginError(
            f"store plugin {plugin.describe()} failed to load: {type(exc).__name__}: {exc}"
        ) from exc
    if not callable(factory):
        raise StorePluginError(
            f"store plugin {plugin.describe()} names an object of type {type(factory).__name__}, "
            "not a factory to call as factory(args, settings)"
        )
    try:
        store = factory(args, settings)
    except ValueError as exc:
        raise StorePluginError(f"{plugin.label}: {exc}") from exc
    except Exception as exc:
        raise StorePluginError(
            f"store plugin {plugin.describe()} failed to build its store: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(store, Store):
        raise StorePluginError(
            f"store plugin {plugin.describe()} returned an object of type {type(store).__name__}, "
            "which is not a Store (it needs async install() and installed())"
        )
    return store


def _warn_shadowed(plugin: StorePlugin) -> None:
    key = (plugin.name, plugin.value)
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning(
        "store plugin %s is not used: %r is a built-in store, and built-ins come first; "
        "its distribution must choose another name",
        plugin.describe(),
        plugin.name,
    )


def _available() -> str:
    """What ``--store`` could name instead, for an error message."""
    plugins = [p for p in installed_store_plugins() if p.name not in _BUILTINS]
    installed = ", ".join(f"{p.name} ({p.provider})" for p in plugins) or "none"
    return (
        f"built in: {', '.join(BUILTIN_STORES)}; installed plugins: {installed} "
        f"(a plugin registers in the {ENTRY_POINT_GROUP!r} entry-point group)"
    )
