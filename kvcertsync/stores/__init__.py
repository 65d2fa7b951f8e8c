"""Where certificates go: the Store protocol and its implementations."""

from kvcertsync.stores.base import InstalledCertificate, InstallIncomplete, ReadableStore, Store
from kvcertsync.stores.memory import MemoryStore
from kvcertsync.stores.pemdir import PemDirectoryStore
from kvcertsync.stores.plugins import (
    StoreFactory,
    StorePlugin,
    StorePluginError,
    installed_store_plugins,
    store_from_name,
)
from kvcertsync.stores.windows import WindowsCertStore

__all__ = [
    "InstallIncomplete",
    "InstalledCertificate",
    "MemoryStore",
    "PemDirectoryStore",
    "ReadableStore",
    "Store",
    "StoreFactory",
    "StorePlugin",
    "StorePluginError",
    "WindowsCertStore",
    "installed_store_plugins",
    "store_from_name",
]
