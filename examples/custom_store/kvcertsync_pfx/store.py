"""PfxDirectoryStore: ``<vault>.<name>.pfx`` per certificate (key, leaf, chain) in one directory.

Java (``keytool``, ``KeyStore.getInstance("PKCS12")``) and .NET (``X509Certificate2``) read these
files directly. The file's friendly name records the secret URL and version that were installed,
so a restarted agent reads what is in place from the file itself and installs nothing. POSIX only
(it checks the directory's owner and mode before writing keys there).
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
from cryptography.hazmat.primitives.serialization import pkcs12

from kvcertsync import CertificateMaterial, SecretUri, StoreError
from kvcertsync.stores import InstalledCertificate

if TYPE_CHECKING:
    from kvcertsync import AgentSettings, ObservedCertificate

__all__ = ["PfxDirectoryStore"]

logger = logging.getLogger(__name__)


class PfxDirectoryStore:
    """Certificates as password-less PKCS#12 files, 0600 in a 0700 directory, replaced by rename."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    @classmethod
    def from_spec(cls, args: str | None, settings: AgentSettings) -> PfxDirectoryStore:
        """The store for ``--store pfx:DIR`` (the kvcertsync.stores entry point)."""
        if not args:
            raise ValueError("pfx needs a directory, as in pfx:/etc/kvcertsync/pfx")
        return cls(Path(args).absolute())

    def __repr__(self) -> str:
        return f"PfxDirectoryStore({str(self.directory)!r})"

    def path_for(self, observed: ObservedCertificate) -> Path:
        """Where the certificate of ``observed`` lives: ``<directory>/<vault>.<name>.pfx``."""
        # Vault and secret names are letters, digits and dashes: no path can escape.
        return self.directory / f"{observed.uri.vault_name}.{observed.uri.name}.pfx"

    async def install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        """Write ``version`` of ``observed`` as its PKCS#12 file, replacing the old one at once."""
        return await anyio.to_thread.run_sync(self._install, observed, material, version)

    async def installed(self, observed: ObservedCertificate) -> InstalledCertificate | None:
        """What the file of ``observed`` holds now, or None."""
        found = await anyio.to_thread.run_sync(self._read, observed)
        return found[0] if found is not None else None

    async def read(
        self, observed: ObservedCertificate
    ) -> tuple[InstalledCertificate, CertificateMaterial] | None:
        """The record and the certificate, chain and key of ``observed``, or None."""
        return await anyio.to_thread.run_sync(self._read, observed)

    # ------------------------------------------------------------------ worker threads

    def _record(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        return InstalledCertificate(
            uri=observed.uri.latest,
            version=version,
            thumbprint=material.thumbprint,
            not_after=material.not_after,
            location=str(self.path_for(observed)),
        )

    def _install(
        self, observed: ObservedCertificate, material: CertificateMaterial, version: str
    ) -> InstalledCertificate:
        record = self._record(observed, material, version)
        found = self._read(observed)
        if found is not None and found[0] == record:
            return record  # already in place: write nothing
        name = str(observed.uri.with_version(version)).encode()
        data = material.to_pkcs12(friendly_name=name)
        self._prepare_directory()
        path = self.path_for(observed)
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)  # the commit point: readers see the old file or the new
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise StoreError(f"{path}: cannot write it: {exc.strerror or exc}") from None
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        logger.info("wrote %s (version %s)", path, version)
        return record

    def _prepare_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.stat(self.directory)
        except OSError as exc:
            raise StoreError(f"{self.directory}: {exc.strerror or exc}") from None
        if info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise StoreError(
                f"{self.directory} is not ours alone (owner uid {info.st_uid}, mode "
                f"{stat.S_IMODE(info.st_mode):04o}): refusing to write private keys there"
            )

    def _read(
        self, observed: ObservedCertificate
    ) -> tuple[InstalledCertificate, CertificateMaterial] | None:
        path = self.path_for(observed)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{path}: cannot read it: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as file:
            data = file.read()
        try:
            loaded = pkcs12.load_pkcs12(data, None)
            installed = SecretUri.parse(
                (loaded.cert.friendly_name or b"").decode() if loaded.cert else "",
                allow_any_host=True,
            )
            if loaded.key is None or loaded.cert is None:
                raise ValueError("it holds no key or no certificate")
            certificates = [
                loaded.cert.certificate,
                *(c.certificate for c in loaded.additional_certs),
            ]
            material = CertificateMaterial.from_key_and_certificates(loaded.key, certificates)
        except ValueError as exc:
            # Damaged (or not ours): nothing usable is installed, so the next poll writes it.
            logger.warning("%s is unreadable (%s); it will be written again", path, exc)
            return None
        if installed.latest != observed.uri.latest or installed.version is None:
            raise StoreError(f"{path} holds {installed}, not {observed.uri}: refusing to use it")
        return self._record(observed, material, installed.version), material
