"""A kvcertsync store plugin: each certificate as one PKCS#12 file in a directory."""

from kvcertsync_pfx.store import PfxDirectoryStore

__all__ = ["PfxDirectoryStore"]
