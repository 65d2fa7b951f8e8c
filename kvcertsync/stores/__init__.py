"""Where certificates go: the Store protocol and its implementations."""

from kvcertsync.stores.base import InstalledCertificate, Store
from kvcertsync.stores.memory import MemoryStore
from kvcertsync.stores.pemdir import PemDirectoryStore

__all__ = ["InstalledCertificate", "MemoryStore", "PemDirectoryStore", "Store"]
