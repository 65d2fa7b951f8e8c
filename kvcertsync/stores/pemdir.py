"""PemDirectoryStore: PEM files in a directory, in the Linux extension's layout, atomic and safe.

Every change is made on the side and published by one rename: a version file (or directory) is
written under a temporary name, synced and renamed into place, then the certificate's link is
swapped by renaming a new symlink over it. A reader (nginx, a restarted agent) therefore always
finds the link pointing at a complete, self-consistent version, old or new, whatever instant the
process dies at. All work is relative to one directory file descriptor whose owner and mode were
checked, and nothing the store did not create is followed or replaced.

Readers named by ``acls`` (or by the ``group``/``file_mode`` options) also need to traverse every
directory on the way to the store: kvcertsync gives them ``x`` (never ``r`` or ``w``) on the
directories it created itself, which it marks with the ``user.kvcertsync.created`` extended
attribute so that a later run still knows them, and only warns about directories it did not create.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import pwd
import re
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Literal, NamedTuple, TypeVar

import anyio
from cryptography import x509

from kvcertsync.errors import MaterialError, StoreError
from kvcertsync.material import CertificateMaterial, certificate_thumbprint
from kvcertsync.settings import LINK_NAME
from kvcertsync.stores.base import InstalledCertificate, InstallIncomplete

if TYPE_CHECKING:
    from kvcertsync.settings import Acl, AgentSettings, ObservedCertificate

__all__ = ["DEFAULT_DIRECTORY", "Layout", "PemDirectoryStore"]

logger = logging.getLogger(__name__)

#: Where KeyVaultForLinux keeps certificates when the settings name no directory.
DEFAULT_DIRECTORY = "/var/lib/waagent/Microsoft.Azure.KeyVault.Store"

Layout = Literal["kvlinux", "split"]

_T = TypeVar("_T")
# A leaf certificate's thumbprint and expiry: all an InstalledCertificate needs of it.
_LeafFacts = tuple[str, datetime]
# What identifies a file's content (dev, inode, size, mtime, ctime, link count) and a checked
# directory (dev, inode, owner, mode) for the installed() cache.
_FileId = tuple[int, int, int, int, int, int]
_DirectoryId = tuple[int, int, int, int]
# The file the leaf is read from (in the entry), its identity, the entry's, the directory's.
_Identities = tuple[str, _FileId, _FileId | None, _DirectoryId]
# How old a store directory's owner and mode check may be when installed() answers from memory.
# The answer itself is checked on every call; only the refusal of a directory opened to others
# since can come this much later (see _cached).
_DIRECTORY_RECHECK_S = 1.0
_FACTS_LIMIT = 100_000
_VERSION = re.compile(r"[0-9a-f]{32}")
_TEMP_PREFIX = ".kvcertsync-tmp-"
# Versions on their way out: renamed first, so a crash mid-delete leaves no half version visible.
_TRASH_PREFIX = ".kvcertsync-trash-"
# A temporary entry older than this belongs to a process that died mid-write.
_STALE_TEMP_SECONDS = 600.0
# How often a store lists a directory again: to learn versions others wrote there, and to
# sweep what a process that died after this one started left behind.
_RESCAN_SECONDS = _STALE_TEMP_SECONDS
#: Set on every directory kvcertsync creates: the directories a later run may open to readers.
_CREATED_XATTR = "user.kvcertsync.created"
# mkdir and marking are one step for the threads of this process, and the mark is read under
# the same lock: a thread that finds a directory another one just made also finds it marked.
_CREATE_LOCK = threading.Lock()
# Temp and trash entries older than this process were left by one that was killed mid-install;
# each store directory is swept of them once per process (they may hold private keys).
_STARTED = time.time()
_SWEPT: set[tuple[int, int]] = set()
_SWEEP_LOCK = threading.Lock()
# The system.posix_acl_access extended attribute (linux/posix_acl_xattr.h).
_ACL_XATTR = "system.posix_acl_access"
_ACL_XATTR_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = (
    0x01,
    0x02,
    0x04,
    0x08,
    0x10,
    0x20,
)
_SETFACL_MISSING = "setfacl is not installed (Debian/Ubuntu: apt install acl)"


class _Reader(NamedTuple):
    """Someone the settings let read the certificates: they must traverse the path too."""

    label: str  # "user www-data", "group ssl-cert", for messages
    entry: str  # the ACL qualifier as setfacl takes it: "u:www-data", "g:ssl-cert", "g:33"
    uid: int | None  # None: a group (any member of it)
    gids: frozenset[int]


class _Cached(NamedTuple):
    """An ``installed()`` answer, and the state of the files that made it true."""

    directory: str  # the store directory, as a path
    directory_id: _DirectoryId  # dev, inode, owner, mode it had when checked
    links: tuple[str, ...]  # the certificate's links, as paths
    target: str  # what every link said
    facts_path: str  # the file the leaf was read from, in the entry the links name
    facts_id: _FileId  # its dev, inode, size, mtime, ctime, links
    entry: str | None  # a version directory (layout "split"), as a path: checked itself too
    entry_id: _FileId | None  # its identity, as for facts_id
    record: InstalledCertificate


class _Index:
    """What a listing of a store directory found, kept current by this store's own changes."""

    __slots__ = ("pins", "scanned", "versions")

    def __init__(self, scanned: float) -> None:
        self.scanned = scanned  # time.monotonic() of the listing
        self.versions: dict[str, set[str]] = {}  # "<vault>.<name>" -> its version entries
        self.pins: dict[str, set[str]] = {}  # an entry -> the symlinks that pointed at it


class _Ancestor(NamedTuple):
    """A directory a lookup was made in on the way to the store directory."""

    fd: int  # an open descriptor of it, owned by whoever holds this
    path: str  # for messages only
    ours: bool  # created by kvcertsync (now, or marked by an earlier run) and safe to change


def _fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


# Reading needs only to look names up in directories: a reader granted x (not r) on them, as
# the ACLs grant, can still open them this way (Linux), where O_RDONLY would be refused.
_LOOKUP = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


@contextlib.contextmanager
def _open_dir(
    path: str | os.PathLike[str], dir_fd: int | None = None, *, lookup: bool = False
) -> Iterator[int]:
    flags = _LOOKUP if lookup else os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


class PemDirectoryStore:
    """Certificates as PEM files in a directory, compatible with KeyVaultForLinux.

    ``layout="kvlinux"`` (default): one file ``<vault>.<name>.<version>`` per version holding the
    leaf, its chain and then the private key, and a symlink ``<vault>.<name>`` to the current one.
    ``layout="split"``: ``<vault>.<name>`` links to a version directory holding ``cert.pem``,
    ``chain.pem``, ``fullchain.pem``, ``privkey.pem``, ``combined.pem`` (all of them in one file)
    (and ``bundle.pfx`` with ``pfx=True``).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] = DEFAULT_DIRECTORY,
        *,
        layout: Layout = "kvlinux",
        keep_versions: int = 2,
        file_mode: int = 0o600,
        group: str | int | None = None,
        apply_acls: bool = True,
        pfx: bool = False,
    ) -> None:
        if layout not in ("kvlinux", "split"):
            raise ValueError(f"layout must be 'kvlinux' or 'split', not {layout!r}")
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        if file_mode & ~0o640:
            raise ValueError(f"file_mode {file_mode:#o} would give more than owner rw, group r")
        self.directory = Path(directory)
        self.layout: Layout = layout
        self.keep_versions = keep_versions
        self.file_mode = file_mode
        self.gid = self._gid(group)
        self.apply_acls = apply_acls
        self.pfx = pfx
        # What each version file's leaf is, by inode (see _facts_of).
        self._facts: dict[tuple[int, int], tuple[tuple[int, int, int], _LeafFacts]] = {}
        # (directory, reader) pairs already warned about: once per store, not once per install.
        self._warned: set[tuple[str, str]] = set()
        # installed() answers, each checked against the files before use (see _cached).
        self._answers: dict[ObservedCertificate, _Cached] = {}
        # Each store directory's identity as a path last resolved to it, and when (monotonic).
        self._directories: dict[str, tuple[_DirectoryId, float]] = {}
        # Each store directory's versions, by (st_dev, st_ino), so that an install prunes its
        # own certificate's files without listing the directory (see _index).
        self._indexes: dict[tuple[int, int], _Index] = {}
        self._index_lock = threading.Lock()
        self._discarding: set[str] = set()  # trash entries this store is deleting now

    @classmethod
    def from_settings(cls, settings: AgentSettings, **options: object) -> PemDirectoryStore:
        """A store honouring the settings' ``aclEnabled`` (directories come per certificate)."""
        options.setdefault("apply_acls", settings.acl_enabled)
        return cls(**options)  # type: ignore[arg-type]

    @staticmethod
    def _gid(group: str | int | None) -> int | None:
        if group is None or isinstance(group, int):
            return group
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise StoreError(f"group {group!r} does not exist") from None

    def __repr__(self) -> str:
        return f"PemDirectoryStore({str(self.directory)!r}, layout={self.layout!r})"

    # ------------------------------------------------------------------ Store protocol

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        """Write ``version`` of ``observed`` and point its link(s) at it, atomically."""
        return await anyio.to_thread.run_sync(self._install, observed, material, version)

    async def installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        """What the link of ``observed`` points at now, or None."""
        # A remembered answer still true, or no link at all, costs a system call or a few:
        # not worth a thread hop.
        answer = self._cached(observed)
        if answer is not None:
            return answer
        link = self.directory_for(observed) / self.base_name(observed)
        try:
            os.lstat(link)
        except FileNotFoundError:
            return None  # what a full lookup finds too: no link (or no directory), nothing
        except OSError:
            pass  # the full lookup says what is wrong
        return await anyio.to_thread.run_sync(self._installed, observed)

    async def read(
        self, observed: ObservedCertificate
    ) -> tuple[InstalledCertificate, CertificateMaterial] | None:
        """The current version of ``observed`` read back from its PEM file(s), or None."""
        return await anyio.to_thread.run_sync(self._read, observed)

    # ------------------------------------------------------------------ naming

    def directory_for(self, observed: ObservedCertificate) -> Path:
        """The directory of ``observed``: its location when that is a path, else the default."""
        location = observed.store_directory
        if location is None:
            return self.directory
        if not isinstance(location, PurePosixPath):
            raise StoreError(f"{observed.uri}: {str(location)!r} is not a path on this system")
        return Path(location)

    @staticmethod
    def base_name(observed: ObservedCertificate) -> str:
        """``<vault>.<name>``, built from validated URL parts only (no path can escape)."""
        uri = observed.uri
        name = f"{uri.vault_name}.{uri.name}"
        if not LINK_NAME.fullmatch(name):
            raise StoreError(f"{uri}: cannot derive a safe file name from {name!r}")
        return name

    @staticmethod
    def _links(observed: ObservedCertificate, base: str) -> tuple[str, ...]:
        links = [base]
        custom = observed.symlink_name
        if custom is not None:
            if not LINK_NAME.fullmatch(custom):
                raise StoreError(
                    f"{observed.uri}: customSymbolicLinkName {custom!r} is not a safe name"
                )
            if custom != base:
                links.append(custom)
        return tuple(links)

    # ------------------------------------------------------------------ directory safety

    def _open_store_dir(
        self, path: Path, create: bool, ancestors: list[_Ancestor] | None = None
    ) -> int:
        """Open ``path`` (creating it 0700 if missing) and check nobody else can write in it.

        The path is walked one component at a time without following symlinks blindly: a
        symlink or a directory on the way counts only where nobody but root and us could have
        put it there, so nobody can redirect the store (and the chmods it makes) elsewhere.
        With ``ancestors``, every directory the walk looked a name up in is appended to it, with
        a descriptor of its own that the caller closes (also when this raises: see _walk).
        """
        fd = _walk(path, create, ancestors)
        try:
            info = os.fstat(fd)
            # A reader (a service following what root's agent installs) may trust root too.
            owners = (os.geteuid(),) if create else (0, os.geteuid())
            if info.st_uid not in owners:
                owner = _user_name(info.st_uid)
                doing = "refusing to write private keys there" if create else "not trusting it"
                raise StoreError(
                    f"{path} is owned by {owner}, not by the user kvcertsync runs as "
                    f"({_user_name(os.geteuid())}): {doing}"
                )
            if info.st_mode & 0o022:
                raise StoreError(
                    f"{path} is writable by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}): refusing to write private keys "
                    "where others can replace them"
                )
        except BaseException:
            os.close(fd)
            raise
        return fd

    @staticmethod
    def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    # ------------------------------------------------------------------ reading

    def _installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        self._answers.pop(observed, None)
        found = self._lookup(observed, self._leaf_facts)
        if found is None:
            return None
        version, (leaf, identities), link = found
        record = self._record(observed, version, leaf, link)
        self._remember(observed, record, *identities)
        return record

    def _cached(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        """The remembered answer for ``observed`` if the files still say it, else None.

        A ``readlink`` of each link and an ``lstat`` of the entry it names prove it, resolving
        the path afresh: every link still names the same entry, and the file the leaf was read
        from is the same file, unchanged (inode, size, mtime, ctime and link count: a file
        renamed over it, rewritten, hard-linked, chmod-ed or swapped for a link differs); a
        version directory (layout "split") is itself the same, by an ``lstat`` more (a file
        renamed in or out of it, or the directory swapped for a link, differs). The path to the
        directory is walked and checked again once a second at most, for all its certificates
        together: a directory (or one on the way) opened to others is refused that late;
        nothing placed in it meanwhile is taken for the certificate, since any such change
        differs above.
        """
        cached = self._answers.get(observed)
        if cached is None:
            return None
        try:
            for link in cached.links:
                if os.readlink(link) != cached.target:
                    return None
            # A version directory swapped for a link to another whose cert.pem is this one.
            if cached.entry is not None and _file_id(os.lstat(cached.entry)) != cached.entry_id:
                return None
            if _file_id(os.lstat(cached.facts_path)) != cached.facts_id:
                return None
            now = time.monotonic()
            seen = self._directories.get(cached.directory)
            # Checked again when stale, or when it differs: an install may have granted the
            # directory to readers since (its mode changed) after seeding this check.
            if (
                seen is None
                or now - seen[1] >= _DIRECTORY_RECHECK_S
                or seen[0] != cached.directory_id
            ):
                fd = self._open_store_dir(Path(cached.directory), create=False)
                try:
                    directory_id = _directory_id(os.fstat(fd))
                finally:
                    os.close(fd)
                seen = self._directories[cached.directory] = (directory_id, now)
        except (OSError, StoreError):
            return None  # the full lookup says what is wrong, if anything
        return cached.record if seen[0] == cached.directory_id else None

    def _remember(
        self,
        observed: ObservedCertificate,
        record: InstalledCertificate,
        facts_file: str,
        file_id: _FileId,
        entry_id: _FileId | None,
        directory_id: _DirectoryId,
    ) -> None:
        """Remember ``record`` with the identities that prove it (see _cached)."""
        directory, base = os.path.split(record.location)
        paths = tuple(os.path.join(directory, name) for name in self._links(observed, base))
        target = f"{base}.{record.version}"
        entry = os.path.join(directory, target)
        self._answers[observed] = _Cached(
            directory,
            directory_id,
            paths,
            target,
            os.path.join(entry, facts_file) if facts_file else entry,
            file_id,
            None if entry_id is None else entry,
            entry_id,
            record,
        )
        # Seen through a descriptor opened safely: a first check by path, never one that
        # replaces a newer check made on the event loop (this may run in a worker thread).
        if _safe_directory(directory_id):
            self._directories.setdefault(directory, (directory_id, time.monotonic()))

    def _read(
        self, observed: ObservedCertificate
    ) -> tuple[InstalledCertificate, CertificateMaterial] | None:
        found = self._lookup(observed, self._read_material)
        if found is None:
            return None
        version, material, link = found
        facts = (material.thumbprint, material.not_after)
        return self._record(observed, version, facts, link), material

    def _lookup(
        self, observed: ObservedCertificate, reader: Callable[[str, int], _T]
    ) -> tuple[str, _T, Path] | None:
        """The current version of ``observed``, what ``reader`` made of its entry, its link."""
        directory = self.directory_for(observed)
        base = self.base_name(observed)
        try:
            fd = self._open_store_dir(directory, create=False)
        except FileNotFoundError:
            return None
        try:
            _sweep_once(fd, directory)
            for attempt in range(3):
                version = self._current_version(base, fd)
                if version is None:
                    return None
                for link in self._links(observed, base)[1:]:
                    if (
                        self._lstat(link, fd) is None
                        or os.readlink(link, dir_fd=fd) != f"{base}.{version}"
                    ):
                        # A customSymbolicLinkName added or gone stale: installing again
                        # repairs it.
                        return None
                try:
                    content = reader(f"{base}.{version}", fd)
                except FileNotFoundError:
                    if attempt < 2 and self._current_version(base, fd) != version:
                        continue  # pruned as the link moved on (another process installs)
                    raise
                return version, content, directory / base
        except (OSError, ValueError, MaterialError) as exc:
            # A damaged or foreign target counts as nothing installed: the engine reinstalls.
            logger.warning("%s: unreadable (%s); it will be installed again", directory / base, exc)
        finally:
            os.close(fd)
        return None

    def _current_version(self, base: str, fd: int) -> str | None:
        info = self._lstat(base, fd)
        if info is None:
            return None
        if not stat.S_ISLNK(info.st_mode):
            raise StoreError(
                f"{base} exists and is not a symlink kvcertsync made: refusing to use it"
            )
        target = os.readlink(base, dir_fd=fd)
        prefix = f"{base}."
        version = target[len(prefix) :] if target.startswith(prefix) else ""
        if "/" in target or not _VERSION.fullmatch(version):
            raise StoreError(f"{base} points at {target!r}, which kvcertsync did not write")
        return version

    def _leaf_facts(self, entry: str, fd: int) -> tuple[_LeafFacts, _Identities]:
        """The leaf's facts, and the identities that prove them (see _identify)."""
        info = self._lstat(entry, fd)
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "missing", entry)
        directory_id = _directory_id(os.fstat(fd))
        if stat.S_ISDIR(info.st_mode):
            with _open_dir(entry, fd, lookup=True) as sub:
                facts, file_info = self._facts_of("cert.pem", sub)
            return facts, ("cert.pem", _file_id(file_info), _file_id(info), directory_id)
        facts, file_info = self._facts_of(entry, fd)
        return facts, ("", _file_id(file_info), None, directory_id)

    def _identify(self, entry: str, fd: int) -> _Identities:
        """The file of ``entry`` the leaf is read from, its identity, the version directory's
        (layout "split") and the store directory's."""
        if self.layout == "split":
            with _open_dir(entry, fd, lookup=True) as sub:
                info = os.stat("cert.pem", dir_fd=sub, follow_symlinks=False)
            entry_info = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            return "cert.pem", _file_id(info), _file_id(entry_info), _directory_id(os.fstat(fd))
        info = os.stat(entry, dir_fd=fd, follow_symlinks=False)
        return "", _file_id(info), None, _directory_id(os.fstat(fd))

    def _facts_of(self, name: str, dir_fd: int) -> tuple[_LeafFacts, os.stat_result]:
        """The leaf's thumbprint and expiry, parsed once per file.

        Version files are never changed in place (each is written whole, then renamed), so
        a file whose inode, size, mtime and ctime are unchanged holds what it held: an
        unchanged poll costs a stat, not a read and a parse. Damage changes the ctime.
        """
        info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", name)
        key = (info.st_dev, info.st_ino)
        signature = (info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        cached = self._facts.get(key)
        if cached is not None and cached[0] == signature:
            return cached[1], info
        leaf = x509.load_pem_x509_certificate(self._read_regular(name, dir_fd))
        facts = (certificate_thumbprint(leaf), leaf.not_valid_after_utc)
        if len(self._facts) >= _FACTS_LIMIT:
            self._facts.clear()  # superseded versions' entries pile up otherwise
        self._facts[key] = (signature, facts)
        return facts, info

    def _read_material(self, entry: str, fd: int) -> CertificateMaterial:
        info = self._lstat(entry, fd)
        if info is None:
            raise FileNotFoundError(errno.ENOENT, "missing", entry)
        if stat.S_ISDIR(info.st_mode):
            with _open_dir(entry, fd, lookup=True) as sub:
                try:
                    data = self._read_regular("combined.pem", sub)
                except FileNotFoundError:  # written before there was one
                    data = self._read_regular("fullchain.pem", sub)
                    data += self._read_regular("privkey.pem", sub)
        else:
            data = self._read_regular(entry, fd)
        return CertificateMaterial.from_secret(data, "application/x-pem-file")

    @staticmethod
    def _read_regular(name: str, dir_fd: int) -> bytes:
        file_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if not stat.S_ISREG(os.fstat(file_fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", name)
            with os.fdopen(file_fd, "rb", closefd=False) as handle:
                return handle.read()
        finally:
            os.close(file_fd)

    def _record(
        self, observed: ObservedCertificate, version: str, leaf: _LeafFacts, link: Path
    ) -> InstalledCertificate:
        thumbprint, not_after = leaf
        return InstalledCertificate(
            uri=observed.uri,
            version=version,
            thumbprint=thumbprint,
            not_after=not_after,
            location=str(link),
        )

    # ------------------------------------------------------------------ writing

    def _install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        if not _VERSION.fullmatch(version):
            raise StoreError(
                f"{observed.uri}: version {version!r} is not 32 hexadecimal characters"
            )
        directory = self.directory_for(observed)
        base = self.base_name(observed)
        links = self._links(observed, base)
        acls = observed.acls if self.apply_acls else ()
        entry = f"{base}.{version}"
        contents = self._contents(material)
        ancestors: list[_Ancestor] = []
        self._answers.pop(observed, None)
        try:
            # Only readers need the directories on the way: without any, none are collected.
            shared = bool(acls) or self.gid is not None or bool(self.file_mode & 0o040)
            fd = self._open_store_dir(
                directory, create=True, ancestors=ancestors if shared else None
            )
        except BaseException:
            _close_all(ancestors)
            raise
        try:
            _sweep_once(fd, directory)
            index = self._index(fd, directory)
            previous = [self._check_link_is_ours(link, base, fd, directory) for link in links]
            existing = self._lstat(entry, fd)
            if existing is not None and not self._same_content(entry, existing, contents, fd):
                if stat.S_ISLNK(existing.st_mode) or existing.st_uid != os.geteuid():
                    raise StoreError(
                        f"{directory / entry} exists and is not a file kvcertsync wrote: "
                        "refusing to replace it"
                    )
                # Ours but damaged (a truncated file, a lost member): move it aside, rewrite.
                logger.warning("%s is damaged; writing it again", directory / entry)
                self._discard(entry, fd)
                existing = None
            if existing is None:
                self._write_entry(entry, contents, acls, fd)
                with self._index_lock:
                    index.versions.setdefault(base, set()).add(entry)
                if any(target is not None for target in previous):
                    # The version is durable before a link that named an older one names it.
                    # A first version has no older one to keep readable: the fsync below
                    # makes both durable at once (a power cut between leaves a dangling
                    # link, which reads as "not installed" and is installed again).
                    _fsync_dir(fd)
            else:
                self._reshare(entry, contents, acls, fd)  # readers added since it was written
            for link in links:
                self._point(link, entry, fd)
            _fsync_dir(fd)
        except OSError as exc:
            os.close(fd)
            _close_all(ancestors)
            raise StoreError(f"cannot install into {directory}: {exc.strerror or exc}") from None
        except BaseException:
            os.close(fd)
            _close_all(ancestors)
            raise
        # The links point at the new version: it is live. Trouble after this is not a failed
        # install (that would hide the update from every hook): it is reported alongside.
        facts = (material.thumbprint, material.not_after)
        record = self._record(observed, version, facts, directory / base)
        with contextlib.suppress(OSError):
            self._remember(observed, record, *self._identify(entry, fd))
        logger.info(
            "installed %s version %s into %s",
            observed.uri,
            version,
            directory / base,
            extra={"uri": str(observed.uri), "version": version},
        )
        problems: list[str] = []
        steps: list[tuple[str, Callable[[], None]]] = [
            (
                "removing superseded versions",
                lambda: self._prune(base, entry, {p for p in previous if p is not None}, index, fd),
            ),
            (
                "granting the directory to its readers",
                lambda: self._grant_directory(fd, directory, acls),
            ),
            (
                "letting readers traverse the parent directories",
                lambda: self._grant_ancestors(ancestors, fd, directory, acls),
            ),
        ]
        try:
            for what, step in steps:
                try:
                    step()
                except (OSError, StoreError) as exc:
                    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                    problems.append(f"{what} failed: {detail}")
        finally:
            os.close(fd)
            _close_all(ancestors)
        if problems:
            raise InstallIncomplete(record, problems)
        return record

    def _contents(self, material: CertificateMaterial) -> dict[str, bytes]:
        if self.layout == "kvlinux":
            return {"": material.to_pem_bundle()}
        files = {
            "cert.pem": material.cert_pem(),
            "chain.pem": material.chain_pem(),
            "fullchain.pem": material.fullchain_pem(),
            "privkey.pem": material.key_pem(),
            # Certificate and key in one file, read with one open: a reader naming it for both
            # (nginx's ssl_certificate and ssl_certificate_key) never pairs two versions.
            "combined.pem": material.to_pem_bundle(),
        }
        if self.pfx:
            files["bundle.pfx"] = material.to_pkcs12()
        return files

    def _check_link_is_ours(self, link: str, base: str, fd: int, directory: Path) -> str | None:
        """The entry ``link`` points at now (None: no link yet); StoreError if not ours."""
        info = self._lstat(link, fd)
        if info is None:
            return None
        if not stat.S_ISLNK(info.st_mode):
            raise StoreError(
                f"{directory / link} exists and is not a symlink kvcertsync made: refusing to "
                "replace it"
            )
        target = os.readlink(link, dir_fd=fd)
        if "/" in target or not target.startswith(f"{base}."):
            raise StoreError(
                f"{directory / link} points at {target!r}, which kvcertsync did not write: "
                "refusing to replace it"
            )
        return target

    def _same_content(
        self, entry: str, info: os.stat_result, contents: dict[str, bytes], fd: int
    ) -> bool:
        """An existing version entry is reused only if it is ours and holds exactly this."""
        if info.st_uid != os.geteuid():
            return False
        try:
            if "" in contents:
                return stat.S_ISREG(info.st_mode) and self._read_regular(entry, fd) == contents[""]
            if not stat.S_ISDIR(info.st_mode):
                return False
            with _open_dir(entry, fd) as sub:
                # A PFX is salted afresh on every encoding: the PEM files decide.
                return all(
                    self._read_regular(name, sub) == data
                    for name, data in contents.items()
                    if name != "bundle.pfx"
                ) and ("bundle.pfx" not in contents or self._lstat("bundle.pfx", sub) is not None)
        except OSError:
            return False

    def _reshare(
        self, entry: str, contents: dict[str, bytes], acls: Sequence[Acl], fd: int
    ) -> None:
        """Share a version already in place (ours, same content) as the settings now say.

        Only adds: the ``group`` option's group, the mode bits ``file_mode`` asks for and the
        ``acls`` entries; nothing is written into it, no bit cleared and no entry removed.
        """
        if not acls and self.gid is None and self.file_mode == 0o600:
            return  # nothing to share: as written
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
        if "" in contents:
            file_fd = os.open(entry, flags, dir_fd=fd)
            try:
                self._share_more(file_fd, acls, directory=False)
            finally:
                os.close(file_fd)
            return
        sub = os.open(entry, flags | os.O_DIRECTORY, dir_fd=fd)
        try:
            for name in contents:
                file_fd = os.open(name, flags, dir_fd=sub)
                try:
                    self._share_more(file_fd, acls, directory=False)
                finally:
                    os.close(file_fd)
            self._share_more(sub, acls, directory=True)
        finally:
            os.close(sub)

    def _share_more(self, fd: int, acls: Sequence[Acl], *, directory: bool) -> None:
        """Like _share, for an entry that exists: add what is missing, take nothing away."""
        info = os.fstat(fd)
        if not (stat.S_ISDIR(info.st_mode) if directory else stat.S_ISREG(info.st_mode)):
            return
        wanted = self.file_mode | (0o100 if directory else 0)
        if directory and wanted & 0o040:
            wanted |= 0o010
        if self.gid is not None and info.st_gid != self.gid:
            os.fchown(fd, -1, self.gid)
        current = stat.S_IMODE(info.st_mode)  # with an ACL, the group bits are its mask
        if wanted & ~current:
            os.fchmod(fd, current | wanted)
        if acls:
            self._apply_acls(fd, acls, directory=directory)

    def _write_entry(
        self, entry: str, contents: dict[str, bytes], acls: Sequence[Acl], fd: int
    ) -> None:
        temp = f"{_TEMP_PREFIX}{entry}.{secrets.token_hex(4)}"
        try:
            if "" in contents:
                self._write_file(temp, contents[""], acls, fd)
            else:
                os.mkdir(temp, 0o700, dir_fd=fd)
                with _open_dir(temp, fd) as sub:
                    for name, data in contents.items():
                        self._write_file(name, data, acls, sub)
                    self._share(sub, acls, directory=True)
                    _fsync_dir(sub)
            os.rename(temp, entry, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            self._remove(temp, fd)
            raise

    def _write_file(self, name: str, data: bytes, acls: Sequence[Acl], dir_fd: int) -> None:
        # 0600 from the first instant; wider modes and groups are set before the rename makes
        # the file visible under its real name.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        file_fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(file_fd, view) :]
            self._share(file_fd, acls, directory=False)
            os.fsync(file_fd)
        finally:
            os.close(file_fd)

    def _share(self, fd: int, acls: Sequence[Acl], *, directory: bool) -> None:
        """Apply the group/mode options, then the ``acls`` entries, to one open file or dir."""
        mode = self.file_mode | (0o100 if directory else 0)
        if directory and mode & 0o040:
            mode |= 0o010
        if self.gid is not None:
            os.fchown(fd, -1, self.gid)
        if mode != 0o600 or directory:
            os.fchmod(fd, mode)
        if acls:
            # After the mode: a chmod would rewrite the ACL mask and silence the entries.
            self._apply_acls(fd, acls, directory=directory)

    def _apply_acls(self, fd: int, acls: Sequence[Acl], *, directory: bool) -> None:
        entries = _acl_entries(acls, "rx" if directory else "r")
        setfacl = shutil.which("setfacl")
        if setfacl is not None:
            path = _fd_path(fd)
            result = subprocess.run(
                [setfacl, "-m", ",".join(entries), path],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                return
            reason = result.stderr.strip() or f"exit status {result.returncode}"
        else:
            reason = _SETFACL_MISSING
        # Without POSIX ACLs, one group (and no users) can still be expressed by group ownership.
        users = [a.user for a in acls if a.user]
        groups = {a.group for a in acls if a.group}
        if not users and len(groups) == 1:
            gid = self._gid(groups.pop())
            os.fchown(fd, -1, gid if gid is not None else -1)
            os.fchmod(fd, 0o750 if directory else 0o640)
            return
        raise StoreError(
            f"cannot grant read access to {', '.join(entries)}: {reason}; without POSIX ACLs "
            "only a single group can be expressed (by group ownership)"
        )

    def _grant_directory(self, fd: int, directory: Path, acls: Sequence[Acl]) -> None:
        """Let the readers this store was told about traverse the (checked) directory ``fd``."""
        shared_group = self.gid is not None or self.file_mode & 0o040
        if shared_group:
            if self.gid is not None:
                os.fchown(fd, -1, self.gid)
            os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o050)
        if not acls:
            return
        setfacl = shutil.which("setfacl")
        entries = _acl_entries(acls, "x")
        if setfacl is not None:
            result = subprocess.run(
                [setfacl, "-m", ",".join(entries), _fd_path(fd)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                return
        # The files fell back to group ownership: the directory must let that group in.
        group = next((a.group for a in acls if a.group), None)
        if group is None:
            raise StoreError(f"{directory}: cannot let {', '.join(entries)} traverse it")
        gid = self._gid(group)
        os.fchown(fd, -1, gid if gid is not None else -1)
        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o050)

    def _grant_ancestors(
        self, ancestors: Sequence[_Ancestor], fd: int, directory: Path, acls: Sequence[Acl]
    ) -> None:
        """Let the readers traverse every directory on the way to the store directory ``fd``.

        A directory kvcertsync created gets ``x`` (an ACL entry, or the one-group fallback) for
        exactly the readers that cannot traverse it yet; nothing else about it changes. A
        directory kvcertsync did not create is left as it is, with a warning naming each reader
        it stops.
        """
        if not ancestors:
            return
        store = os.fstat(fd)
        readers = self._readers(acls, store)
        if not readers:
            return  # nobody to let in: what kvcertsync created stays 0700
        for ancestor in ancestors:
            info = os.fstat(ancestor.fd)
            acl = _read_acl(ancestor.fd)
            blocked = [r for r in readers if not _can_traverse(info, acl, r)]
            if not blocked:
                continue
            if ancestor.ours:
                self._let_traverse(ancestor, info, blocked, self._fallback_gid(acls, store))
                continue
            for reader in blocked:
                if (ancestor.path, reader.entry) in self._warned:
                    continue
                self._warned.add((ancestor.path, reader.entry))
                logger.warning(
                    "%s cannot traverse %s (owner %s, mode %04o), so it cannot read the "
                    "certificates in %s: kvcertsync did not create that directory and leaves its "
                    "permissions as they are; to let it through: setfacl -m %s:x %s",
                    reader.label,
                    ancestor.path,
                    _user_name(info.st_uid),
                    stat.S_IMODE(info.st_mode),
                    directory,
                    reader.entry,
                    ancestor.path,
                )

    def _let_traverse(
        self,
        ancestor: _Ancestor,
        info: os.stat_result,
        blocked: Sequence[_Reader],
        fallback_gid: int | None,
    ) -> None:
        """Give ``blocked`` traversal, and only traversal, of a directory kvcertsync created."""
        entries = [f"{reader.entry}:x" for reader in blocked]
        setfacl = shutil.which("setfacl")
        if setfacl is not None:
            result = subprocess.run(
                [setfacl, "-m", ",".join(entries), _fd_path(ancestor.fd)],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                logger.info(
                    "let %s traverse %s", ", ".join(r.label for r in blocked), ancestor.path
                )
                return
            reason = result.stderr.strip() or f"exit status {result.returncode}"
        else:
            reason = _SETFACL_MISSING
        # Without POSIX ACLs the files carry one group (see _apply_acls): let that group through.
        if fallback_gid is None or any(reader.uid is not None for reader in blocked):
            raise StoreError(
                f"{ancestor.path}: cannot let {', '.join(entries)} traverse it: {reason}; "
                "without POSIX ACLs only a single group can be expressed (by group ownership)"
            )
        mode = stat.S_IMODE(info.st_mode)
        if info.st_gid != fallback_gid and mode & 0o010:
            logger.warning(
                "%s: its group changes from %s to %s, whose members lose traversal of it "
                "(with setfacl installed, both groups would keep it)",
                ancestor.path,
                _group_name(info.st_gid),
                _group_name(fallback_gid),
            )
        os.fchown(ancestor.fd, -1, fallback_gid)
        os.fchmod(ancestor.fd, mode | 0o010)
        logger.info("let group %s traverse %s", _group_name(fallback_gid), ancestor.path)

    def _readers(self, acls: Sequence[Acl], store: os.stat_result) -> list[_Reader]:
        """Everyone the store shares certificates with, except root (who needs nothing)."""
        readers: dict[tuple[str, int], _Reader] = {}
        for acl in acls:
            if acl.user:
                _check_user(acl.user)
                account = pwd.getpwnam(acl.user)
                gids = frozenset(os.getgrouplist(acl.user, account.pw_gid))
                reader = _Reader(f"user {acl.user}", f"u:{acl.user}", account.pw_uid, gids)
                readers.setdefault(("u", account.pw_uid), reader)
            if acl.group:
                _check_group(acl.group)
                gid = grp.getgrnam(acl.group).gr_gid
                reader = _Reader(f"group {acl.group}", f"g:{acl.group}", None, frozenset({gid}))
                readers.setdefault(("g", gid), reader)
        files_gid = self._files_gid(store)
        if files_gid is not None:
            reader = _Reader(
                f"group {_group_name(files_gid)}", f"g:{files_gid}", None, frozenset({files_gid})
            )
            readers.setdefault(("g", files_gid), reader)
        return [reader for reader in readers.values() if reader.uid != 0]

    def _files_gid(self, store: os.stat_result) -> int | None:
        """The group the ``group``/``file_mode`` options let read the files, if any."""
        if self.gid is not None:
            return self.gid
        if self.file_mode & 0o040:
            # A new file takes the directory's group where it is set-group-ID, else ours.
            return store.st_gid if store.st_mode & stat.S_ISGID else os.getegid()
        return None

    def _fallback_gid(self, acls: Sequence[Acl], store: os.stat_result) -> int | None:
        """The one group the files fall back to without POSIX ACLs (None: there is none)."""
        if acls:
            groups = {a.group for a in acls if a.group}
            if any(a.user for a in acls) or len(groups) != 1:
                return None
            return self._gid(groups.pop())
        return self._files_gid(store)

    def _point(self, link: str, entry: str, fd: int) -> None:
        """Swap ``link`` to ``entry`` with one rename of a fresh symlink over it."""
        try:
            if os.readlink(link, dir_fd=fd) == entry:
                return
        except (FileNotFoundError, OSError):
            pass
        temp = f"{_TEMP_PREFIX}{link}.{secrets.token_hex(4)}"
        os.symlink(entry, temp, dir_fd=fd)
        try:
            os.rename(temp, link, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            self._remove(temp, fd)
            raise

    def _prune(self, base: str, current: str, previous: set[str], index: _Index, fd: int) -> None:
        """Keep the current version, the one it replaced, then the newest up to
        ``keep_versions``; never one a link points at.

        Only this certificate's own entries are looked at: those the index knows (listed at
        the last scan, or written since), plus what its links named.
        """
        with self._index_lock:
            known = index.versions.setdefault(base, set())
            names = (known | previous) - {current}
        keep = [current, *sorted(previous - {current})]
        if len(names) < self.keep_versions:
            return  # nothing beyond what is kept: no need to look at the files
        versions: list[tuple[int, str]] = []
        for name in names:
            info = self._lstat(name, fd)
            if info is None or stat.S_ISLNK(info.st_mode):
                with self._index_lock:
                    known.discard(name)
                continue
            if info.st_uid == os.geteuid():
                versions.append((info.st_mtime_ns, name))
        versions.sort(reverse=True)
        for _, name in versions:
            if len(keep) >= self.keep_versions:
                break
            if name not in keep:
                keep.append(name)
        kept = keep[: self.keep_versions]
        for _, name in versions:
            if name in kept or self._pinned(name, index, fd):
                continue
            self._discard(name, fd)
            with self._index_lock:
                known.discard(name)
            logger.debug("removed superseded %s", name)

    def _pinned(self, name: str, index: _Index, fd: int) -> bool:
        """Whether a symlink other than the certificate's own still points at ``name``."""
        with self._index_lock:
            links = sorted(index.pins.get(name, ()))
        pinned = False
        for link in links:
            try:
                still = os.readlink(link, dir_fd=fd) == name
            except OSError:
                still = False
            if still:
                pinned = True
            else:
                with self._index_lock:
                    index.pins.get(name, set()).discard(link)
        return pinned

    def _index(self, fd: int, directory: Path) -> _Index:
        """The index of the store directory ``fd``: listed on first use and every
        _RESCAN_SECONDS, sweeping on the way what processes that died mid-install left."""
        info = os.fstat(fd)
        key = (info.st_dev, info.st_ino)
        with self._index_lock:
            index = self._indexes.get(key)
            if index is not None and time.monotonic() - index.scanned < _RESCAN_SECONDS:
                return index
            # Listed under the lock: an entry written meanwhile is in the listing or added after.
            index = _scan(fd, directory, self._discarding)
            self._indexes[key] = index
            return index

    def _discard(self, name: str, fd: int) -> None:
        """Delete a version so that a crash midway leaves nothing half-visible."""
        trash = f"{_TRASH_PREFIX}{name}.{secrets.token_hex(4)}"
        # A trash entry keeps the version's old mtime: a scan must know it is in flight.
        with self._index_lock:
            self._discarding.add(trash)
        try:
            os.rename(name, trash, src_dir_fd=fd, dst_dir_fd=fd)
            self._remove(trash, fd)
        finally:
            with self._index_lock:
                self._discarding.discard(trash)

    @staticmethod
    def _remove(name: str, fd: int) -> None:
        info = PemDirectoryStore._lstat(name, fd)
        if info is None:
            return
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(name, dir_fd=fd)
        else:
            os.unlink(name, dir_fd=fd)


def _sweep_once(fd: int, directory: Path) -> None:
    """Remove, once per process, the temp and trash entries a killed process left in a store
    directory of ours (the next install of the same certificate would, but that may be never)."""
    info = os.fstat(fd)
    key = (info.st_dev, info.st_ino)
    if info.st_uid != os.geteuid():
        return  # a reader's view of someone else's store: not ours to clean
    with _SWEEP_LOCK:
        if key in _SWEPT:
            return
        _SWEPT.add(key)
    try:
        with _open_dir(".", fd) as real:
            for name in os.listdir(real):
                if not name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
                    continue
                entry = PemDirectoryStore._lstat(name, real)
                if entry is None or entry.st_uid != os.geteuid() or entry.st_mtime >= _STARTED:
                    continue
                PemDirectoryStore._remove(name, real)
                logger.info("removed %s, left by a process stopped mid-install", directory / name)
    except OSError as exc:
        logger.warning("could not sweep %s of leftovers: %s", directory, exc.strerror or exc)


def _scan(fd: int, directory: Path, in_flight: set[str]) -> _Index:
    """List the store directory ``fd``: its version entries, the symlinks pointing at them, and
    the temp and trash entries of ours old enough to be a dead process's, which it removes
    (except those in ``in_flight``, being deleted by this process now)."""
    index = _Index(time.monotonic())
    now = time.time()
    with os.scandir(fd) as entries:
        for item in entries:
            name = item.name
            if name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
                if name not in in_flight:
                    _remove_leftover(name, fd, directory, now)
            elif item.is_symlink():
                with contextlib.suppress(OSError):
                    index.pins.setdefault(os.readlink(name, dir_fd=fd), set()).add(name)
            elif len(name) > 33 and name[-33] == "." and _VERSION.fullmatch(name[-32:]):
                index.versions.setdefault(name[:-33], set()).add(name)
    return index


def _remove_leftover(name: str, fd: int, directory: Path, now: float) -> None:
    """Remove a temp or trash entry of ours older than this process or _STALE_TEMP_SECONDS."""
    try:
        info = PemDirectoryStore._lstat(name, fd)
        if info is None or info.st_uid != os.geteuid():
            return
        if info.st_mtime < _STARTED or now - info.st_mtime > _STALE_TEMP_SECONDS:
            PemDirectoryStore._remove(name, fd)
            logger.info("removed %s, left by a process stopped mid-install", directory / name)
    except OSError as exc:
        logger.warning("could not remove %s: %s", directory / name, exc.strerror or exc)


def _directory_id(info: os.stat_result) -> _DirectoryId:
    return (info.st_dev, info.st_ino, info.st_uid, info.st_mode)


def _safe_directory(directory_id: _DirectoryId) -> bool:
    """Whether a store directory so owned and with that mode may be read from (see _walk)."""
    _, _, uid, mode = directory_id
    return uid in (0, os.geteuid()) and not mode & 0o022


def _file_id(info: os.stat_result) -> _FileId:
    return (
        info.st_dev,
        info.st_ino,
        info.st_size,
        info.st_mtime_ns,
        info.st_ctime_ns,
        info.st_nlink,
    )


def _trusted(parent: os.stat_result, entry: os.stat_result) -> bool:
    """Whether only root and we could have placed ``entry`` in ``parent``."""
    us = (0, os.geteuid())
    if parent.st_uid not in us:
        return False
    if parent.st_mode & 0o022:
        # A shared directory like /tmp: safe only with the sticky bit and an entry of ours.
        return bool(parent.st_mode & stat.S_ISVTX) and entry.st_uid in us
    return True


def _walk(path: Path, create: bool, ancestors: list[_Ancestor] | None = None) -> int:
    """An open descriptor of directory ``path``, reached through trusted components only.

    With ``create``, missing components are made 0700 and marked as kvcertsync's. With
    ``ancestors``, every directory a name was looked up in on the way (each one a reader of the
    store must traverse, including those before a symlink's target) is appended to it once,
    with a descriptor of its own that the caller closes, also when this raises.
    """
    where = os.path.abspath(path)
    todo = list(Path(where).parts[1:])
    # Writing needs real descriptors (fsync, xattrs); reading only looks names up.
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC if create else _LOOKUP
    fd = os.open("/", flags)
    here = PurePosixPath("/")  # where ``fd`` is, for messages
    made = False  # whether this walk created the directory ``fd``
    seen: set[tuple[int, int]] = set()
    hops = 0
    try:
        while todo:
            name = todo.pop(0)
            if name in ("", "."):
                continue
            parent = os.fstat(fd)
            if ancestors is not None and (parent.st_dev, parent.st_ino) not in seen:
                seen.add((parent.st_dev, parent.st_ino))
                with _CREATE_LOCK:  # not between another thread's mkdir and its mark
                    ours = made or _created_by_us(fd, parent)
                ancestors.append(_Ancestor(os.dup(fd), str(here), ours))
            created = False
            try:
                entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                if not create:
                    raise
                if not _trusted(parent, parent):
                    raise StoreError(
                        f"{where}: will not create {name!r} in a directory others can write"
                    ) from None
                with _CREATE_LOCK:
                    try:
                        os.mkdir(name, 0o700, dir_fd=fd)
                    except FileExistsError:
                        pass  # another install (another certificate, another thread) was first
                    else:
                        created = True
                        _mark_created(name, fd, where)
                        os.fsync(fd)
                        logger.info("created directory %s in the path of %s", name, where)
                entry = os.stat(name, dir_fd=fd, follow_symlinks=False)
            if not _trusted(parent, entry):
                raise StoreError(
                    f"{where}: {name!r} sits in a directory that others can write: refusing "
                    "to use a path someone else could redirect"
                )
            if stat.S_ISLNK(entry.st_mode):
                hops += 1
                if hops > 40:
                    raise StoreError(f"{where}: too many symlinks")
                target = os.readlink(name, dir_fd=fd)
                if target.startswith("/"):
                    os.close(fd)
                    fd = os.open("/", flags)
                    here = PurePosixPath("/")
                    made = False
                todo = list(PurePosixPath(target).parts) + todo
                if todo and todo[0] == "/":
                    todo.pop(0)
                continue
            nxt = os.open(name, flags | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
            here = here.parent if name == ".." else here / name
            made = created
        if ancestors is not None:
            # A symlink back up the path can make the store directory one of its own ancestors.
            final = os.fstat(fd)
            for ancestor in list(ancestors):
                info = os.fstat(ancestor.fd)
                if (info.st_dev, info.st_ino) == (final.st_dev, final.st_ino):
                    ancestors.remove(ancestor)
                    os.close(ancestor.fd)
    except NotADirectoryError:
        os.close(fd)
        raise StoreError(f"{where} is not a directory") from None
    except FileNotFoundError:
        os.close(fd)
        raise
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot open directory {where}: {exc.strerror}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _mark_created(name: str, parent_fd: int, where: str) -> None:
    """Record on the directory ``name``, just created, that kvcertsync made it."""
    if sys.platform != "linux":
        return
    try:
        sub = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent_fd
        )
        try:
            os.setxattr(sub, _CREATED_XATTR, b"1")
            os.fsync(sub)
        finally:
            os.close(sub)
    except OSError as exc:
        # No user extended attributes here (old tmpfs, some network file systems): this run
        # still shares the directory, a later one will only warn about it.
        logger.info(
            "%s: cannot mark %r as created by kvcertsync (%s): readers added to the settings "
            "later will not be let through it",
            where,
            name,
            exc.strerror or exc,
        )


def _created_by_us(fd: int, info: os.stat_result) -> bool:
    """Whether the directory ``fd`` carries our mark, is ours and nobody else may write in it."""
    if sys.platform != "linux":
        return False
    if info.st_uid != os.geteuid() or info.st_mode & 0o022:
        return False
    try:
        os.getxattr(fd, _CREATED_XATTR)
    except OSError:
        return False
    return True


def _read_acl(fd: int) -> list[tuple[int, int, int]] | None:
    """The access ACL of ``fd`` as (tag, permissions, id) entries; None: just the mode bits."""
    if sys.platform != "linux":
        return None
    try:
        data = os.getxattr(fd, _ACL_XATTR)
    except OSError:
        return None
    if len(data) < 4 or (len(data) - 4) % 8:
        return None
    if struct.unpack_from("<I", data)[0] != _ACL_XATTR_VERSION:
        return None
    return [(tag, perm, ident) for tag, perm, ident in struct.iter_unpack("<HHI", data[4:])]


def _can_traverse(
    info: os.stat_result, acl: Sequence[tuple[int, int, int]] | None, reader: _Reader
) -> bool:
    """Whether ``reader`` may search (``x``) the directory ``info``: POSIX.1e access checking."""
    mode = info.st_mode
    if reader.uid is not None and reader.uid == info.st_uid:
        return bool(mode & 0o100)
    if not acl:
        if info.st_gid in reader.gids:
            return bool(mode & 0o010)
        return bool(mode & 0o001)
    mask = next((perm for tag, perm, _ in acl if tag == _ACL_MASK), 0o7)
    if reader.uid is not None:
        for tag, perm, ident in acl:
            if tag == _ACL_USER and ident == reader.uid:
                return bool(perm & mask & 0o1)
    matched = False
    for tag, perm, ident in acl:
        if (tag == _ACL_GROUP_OBJ and info.st_gid in reader.gids) or (
            tag == _ACL_GROUP and ident in reader.gids
        ):
            if perm & mask & 0o1:
                return True
            matched = True
    return not matched and bool(mode & 0o001)


def _close_all(ancestors: list[_Ancestor]) -> None:
    for ancestor in ancestors:
        os.close(ancestor.fd)
    ancestors.clear()


def _fd_path(fd: int) -> str:
    """A path naming an open descriptor of this process, for tools that take paths."""
    return f"/proc/{os.getpid()}/fd/{fd}"


def _acl_entries(acls: Sequence[Acl], perm: str) -> list[str]:
    entries: list[str] = []
    for acl in acls:
        if acl.user:
            _check_user(acl.user)
            entries.append(f"u:{acl.user}:{perm}")
        if acl.group:
            _check_group(acl.group)
            entries.append(f"g:{acl.group}:{perm}")
    return entries


def _check_user(user: str) -> None:
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise StoreError(f"acls: user {user!r} does not exist on this machine") from None


def _check_group(group: str) -> None:
    try:
        grp.getgrnam(group)
    except KeyError:
        raise StoreError(f"acls: group {group!r} does not exist on this machine") from None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"
