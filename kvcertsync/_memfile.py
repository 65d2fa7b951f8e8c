"""Load a certificate chain and key into an ``ssl.SSLContext`` from memory, leaving nothing behind.

``SSLContext.load_cert_chain`` reads only from files. On Linux the file is an anonymous memory
file (``memfd_create``) opened again through ``/proc/self/fd``: it never touches a disk, no other
user can open it, and it is gone when its descriptor closes. Elsewhere (or where memfd or /proc
is unavailable) it is a 0600 file in a fresh 0700 directory, both removed before returning.
Either way the key is written encrypted under a one-time random password that only this call
knows, so even a file left by a crash between writing and removing is of no use to anyone.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import ssl
import tempfile
from collections.abc import Iterator

from cryptography.hazmat.primitives import serialization

from kvcertsync.material import CertificateMaterial

__all__ = ["load_cert_chain", "memfd_supported"]

_FILE_NAME = "chain-and-key.pem"


def memfd_supported() -> bool:
    """Whether this system can hand ``ssl`` an anonymous memory file (Linux with /proc)."""
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


def load_cert_chain(
    context: ssl.SSLContext,
    material: CertificateMaterial,
    *,
    use_memfd: bool | None = None,
    temp_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Load ``material``'s full chain and key into ``context`` without leaving a file anywhere.

    ``use_memfd`` None picks a memory file where the system has one; ``temp_dir`` is where the
    private directory goes otherwise (the system's temporary directory by default).
    """
    password = secrets.token_bytes(32)
    encrypted_key = material.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    data = material.fullchain_pem() + encrypted_key
    memfd = memfd_supported() if use_memfd is None else use_memfd
    with _memory_file(data) if memfd else _private_file(data, temp_dir) as path:
        context.load_cert_chain(path, password=password)


@contextlib.contextmanager
def _memory_file(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("kvcertsync-tls", os.MFD_CLOEXEC)
    try:
        _write_all(fd, data)
        # Opening /proc/self/fd/N opens the memory file anew, from its start.
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


@contextlib.contextmanager
def _private_file(data: bytes, temp_dir: str | os.PathLike[str] | None) -> Iterator[str]:
    directory = tempfile.mkdtemp(prefix="kvcertsync-tls-", dir=temp_dir)  # mode 0700
    try:
        path = os.path.join(directory, _FILE_NAME)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0), 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        yield path
    finally:
        # The directory is ours alone: remove it whatever went wrong above.
        shutil.rmtree(directory)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
