"""Test certificates minted with the real ``openssl`` CLI: a small, trustme-like helper.

    ca = CertificateAuthority.create(tmp_path / "ca")            # root -> intermediate
    chain = ca.issue(["www.example.com"], days=30)                 # leaf signed by the intermediate
    chain.pfx_base64()                                             # what Key Vault hands out
    chain.pem_secret(key_position="first")                         # the PEM flavour

or in one step: ``make_chain(tmp_path, key="ec")``. Everything lives in files under the given
directory; ``ChainFiles`` reads them back as bytes and produces the PFX/PEM variants on demand.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import itertools
import random
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

KeyType = Literal["rsa", "ec"]
PfxMode = Literal["modern", "legacy", "none"]
KeyPosition = Literal["first", "middle", "last"]
KeyFormat = Literal["pkcs8", "traditional"]

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
DEFAULT_DNS_NAMES = ("www.example.com", "example.com")

_counter = itertools.count()

_REQ_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
"""

_CA_EXTENSIONS = """\
[root_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[intermediate_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
"""

_LEAF_CONFIG = """\
[ca]
default_ca = test_ca
[test_ca]
database = {database}
serial = {serial}
new_certs_dir = {issued}
default_md = sha256
policy = policy_any
unique_subject = no
email_in_dn = no
copy_extensions = none
[policy_any]
commonName = supplied
[leaf_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, {key_usage}
extendedKeyUsage = serverAuth, clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
{san}
"""


def openssl(*args: str | Path, stdin: bytes | None = None) -> bytes:
    """Run the openssl CLI; return stdout, or raise with its stderr."""
    argv = [OPENSSL, *map(str, args)]
    proc = subprocess.run(argv, input=stdin, capture_output=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout


def generate_key(path: Path, key: KeyType = "rsa") -> Path:
    """Write a new PKCS#8 private key (RSA 2048 or EC P-256) to ``path``."""
    if key == "rsa":
        options = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    elif key == "ec":
        options = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    else:
        raise ValueError(f"unknown key type {key!r}")
    openssl("genpkey", *options, "-out", path)
    return path


def _asn1_time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).strftime("%Y%m%d%H%M%SZ")


def _serial() -> str:
    return "0x" + secrets.token_hex(16)


def fingerprint_sha1(cert_pem: Path | bytes) -> str:
    """``openssl x509 -fingerprint -sha1`` of a certificate, as upper hex without colons."""
    if isinstance(cert_pem, Path):
        out = openssl("x509", "-in", cert_pem, "-noout", "-fingerprint", "-sha1")
    else:
        out = openssl("x509", "-noout", "-fingerprint", "-sha1", stdin=cert_pem)
    return out.decode().strip().split("=", 1)[1].replace(":", "").upper()


@dataclass(frozen=True)
class ChainFiles:
    """A leaf certificate, its key and its issuer chain (issuer first), as files on disk."""

    directory: Path
    key_type: KeyType
    dns_names: tuple[str, ...]
    leaf_cert_path: Path
    leaf_key_path: Path
    chain_paths: tuple[Path, ...]

    # -- the pieces, as PEM bytes

    @property
    def leaf_pem(self) -> bytes:
        """The leaf certificate (PEM)."""
        return self.leaf_cert_path.read_bytes()

    @property
    def key_pem(self) -> bytes:
        """The leaf's private key as unencrypted PKCS#8 PEM."""
        return self.leaf_key_path.read_bytes()

    @property
    def chain_pems(self) -> tuple[bytes, ...]:
        """Each chain certificate (PEM), issuer of the leaf first."""
        return tuple(path.read_bytes() for path in self.chain_paths)

    @property
    def chain_pem(self) -> bytes:
        """The chain certificates concatenated, issuer of the leaf first."""
        return b"".join(self.chain_pems)

    @property
    def fullchain_pem(self) -> bytes:
        """Leaf followed by the chain."""
        return self.leaf_pem + self.chain_pem

    @property
    def root_pem(self) -> bytes:
        """The top of the chain (the leaf itself when self-signed)."""
        return self.chain_pems[-1] if self.chain_paths else self.leaf_pem

    @property
    def root_cert_path(self) -> Path:
        """Path of the top of the chain (the leaf itself when self-signed)."""
        return self.chain_paths[-1] if self.chain_paths else self.leaf_cert_path

    @property
    def intermediate_pem(self) -> bytes:
        """The leaf's direct issuer (PEM); raises for a self-signed leaf."""
        return self.chain_pems[0]

    def sha1_fingerprint(self) -> str:
        """The leaf's SHA-1 fingerprint according to openssl (upper hex, no colons)."""
        cached = self.directory / "leaf.sha1"
        if not cached.exists():
            cached.write_text(fingerprint_sha1(self.leaf_cert_path))
        return cached.read_text()

    # -- key variants

    def traditional_key_pem(self) -> bytes:
        """The key as PKCS#1 (``RSA PRIVATE KEY``) or SEC1 (``EC PRIVATE KEY``) PEM."""
        cached = self.directory / "leaf-traditional.key"
        if not cached.exists():
            tool = "rsa" if self.key_type == "rsa" else "ec"
            extra = ["-traditional"] if self.key_type == "rsa" else []
            cached.write_bytes(openssl(tool, "-in", self.leaf_key_path, *extra))
        return cached.read_bytes()

    def encrypted_key_pem(self, password: str = "secret") -> bytes:
        """The key as PKCS#8 ``ENCRYPTED PRIVATE KEY`` (AES-256) under ``password``."""
        return openssl(
            "pkcs8", "-topk8", "-v2", "aes-256-cbc", "-in", self.leaf_key_path,
            "-passout", f"pass:{password}",
        )  # fmt: skip

    # -- secret formats

    def pfx(
        self,
        password: str = "",
        *,
        mode: PfxMode = "modern",
        include_chain: bool = True,
        friendly_name: str | None = None,
    ) -> bytes:
        """A DER PFX by ``openssl pkcs12 -export``.

        ``mode``: "modern" (OpenSSL 3 default, AES), "legacy" (3DES/RC2, as Windows exports),
        "none" (no encryption and no MAC at all).
        """
        # Exports are cached on disk by their options: openssl runs once per variant per chain.
        tag = hashlib.sha256(repr((password, mode, include_chain, friendly_name)).encode())
        out = self.directory / f"export-{tag.hexdigest()[:16]}.pfx"
        if out.exists():
            return out.read_bytes()
        args: list[str | Path] = ["pkcs12", "-export", "-inkey", self.leaf_key_path]
        args += ["-in", self.leaf_cert_path, "-out", out, "-passout", f"pass:{password}"]
        if include_chain and self.chain_paths:
            bundle = self.directory / f"export-{next(_counter)}-chain.pem"
            bundle.write_bytes(self.chain_pem)
            args += ["-certfile", bundle]
        if mode == "legacy":
            args.append("-legacy")
        elif mode == "none":
            args += ["-keypbe", "NONE", "-certpbe", "NONE", "-nomac"]
        if friendly_name is not None:
            args += ["-name", friendly_name]
        openssl(*args)
        return out.read_bytes()

    def pfx_base64(
        self, password: str = "", *, mode: PfxMode = "modern", include_chain: bool = True
    ) -> str:
        """``pfx()`` base64-encoded, as Key Vault returns an ``application/x-pkcs12`` secret."""
        der = self.pfx(password, mode=mode, include_chain=include_chain)
        return base64.b64encode(der).decode("ascii")

    def pfx_without_key(self) -> bytes:
        """A DER PFX holding only the certificates (``-nokeys``), empty password."""
        out = self.directory / f"export-{next(_counter)}-nokey.pfx"
        openssl(
            "pkcs12", "-export", "-nokeys", "-in", self.leaf_cert_path, "-out", out,
            "-passout", "pass:",
        )  # fmt: skip
        return out.read_bytes()

    def pem_secret(
        self,
        *,
        key_position: KeyPosition = "last",
        key_format: KeyFormat = "pkcs8",
        shuffle: int | None = None,
        include_chain: bool = True,
        extra: Sequence[bytes] = (),
    ) -> str:
        """An ``application/x-pem-file`` value: certificates and the key, in the order asked.

        ``shuffle`` is a seed: when given, the certificates (leaf, chain, ``extra``) are shuffled
        with it before the key is placed.
        """
        certs = [self.leaf_pem, *(self.chain_pems if include_chain else ()), *extra]
        if shuffle is not None:
            random.Random(shuffle).shuffle(certs)
        key = self.key_pem if key_format == "pkcs8" else self.traditional_key_pem()
        if key_position == "first":
            blocks = [key, *certs]
        elif key_position == "last":
            blocks = [*certs, key]
        else:
            middle = max(1, len(certs) // 2)
            blocks = [*certs[:middle], key, *certs[middle:]]
        return b"".join(blocks).decode("ascii")


@dataclass(frozen=True)
class CertificateAuthority:
    """A root CA and an intermediate CA under it, both kept on disk to issue leaves."""

    directory: Path
    key_type: KeyType
    root_cert_path: Path
    root_key_path: Path
    intermediate_cert_path: Path
    intermediate_key_path: Path

    @classmethod
    def create(
        cls, directory: Path, *, key: KeyType = "rsa", name: str = "kvcertsync Test"
    ) -> CertificateAuthority:
        """Mint a root CA and an intermediate CA (10 years each) in ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        # req -x509 reads extension sections from -config only, so that file holds them too.
        req_config = directory / "req.cnf"
        req_config.write_text(_REQ_CONFIG + _CA_EXTENSIONS)
        extensions = directory / "ca_ext.cnf"
        extensions.write_text(_CA_EXTENSIONS)

        root_key = generate_key(directory / "root.key", key)
        root_cert = directory / "root.pem"
        openssl(
            "req", "-config", req_config, "-new", "-x509", "-key", root_key,
            "-subj", f"/O={name}/CN={name} Root CA", "-days", "3650", "-sha256",
            "-set_serial", _serial(), "-extensions", "root_ext", "-out", root_cert,
        )  # fmt: skip

        intermediate_key = generate_key(directory / "intermediate.key", key)
        csr = directory / "intermediate.csr"
        intermediate_cert = directory / "intermediate.pem"
        openssl(
            "req", "-config", req_config, "-new", "-key", intermediate_key,
            "-subj", f"/O={name}/CN={name} Intermediate CA", "-out", csr,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", csr, "-CA", root_cert, "-CAkey", root_key,
            "-set_serial", _serial(), "-days", "3650", "-sha256",
            "-extfile", extensions, "-extensions", "intermediate_ext", "-out", intermediate_cert,
        )  # fmt: skip
        return cls(directory, key, root_cert, root_key, intermediate_cert, intermediate_key)

    def issue(
        self,
        dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
        *,
        key: KeyType | None = None,
        common_name: str | None = None,
        days: int = 365,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        name: str | None = None,
    ) -> ChainFiles:
        """Issue a leaf from the intermediate; validity is ``not_before``..``not_after``.

        ``not_before`` defaults to an hour ago and ``not_after`` to ``not_before`` + ``days``;
        both may lie in the past, for expired certificates.
        """
        number = next(_counter)
        leaf_dir = self.directory / (name or f"leaf-{number}")
        leaf_dir.mkdir(parents=True, exist_ok=False)
        key_type = key or self.key_type
        start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        end = not_after or start + dt.timedelta(days=days)
        cn = common_name or (dns_names[0] if dns_names else f"leaf {number}")

        leaf_key = generate_key(leaf_dir / "leaf.key", key_type)
        csr = leaf_dir / "leaf.csr"
        openssl(
            "req", "-config", self.directory / "req.cnf", "-new", "-key", leaf_key,
            "-subj", f"/CN={cn}", "-out", csr,
        )  # fmt: skip

        database = leaf_dir / "index.txt"
        database.write_text("")
        serial = leaf_dir / "serial"
        serial.write_text(secrets.token_hex(16) + "\n")
        issued = leaf_dir / "issued"
        issued.mkdir()
        san = ""
        if dns_names:
            san = "subjectAltName = " + ", ".join(f"DNS:{dns}" for dns in dns_names)
        config = leaf_dir / "ca.cnf"
        config.write_text(
            _LEAF_CONFIG.format(
                database=database,
                serial=serial,
                issued=issued,
                key_usage="digitalSignature, keyEncipherment"
                if key_type == "rsa"
                else "digitalSignature",
                san=san,
            )
        )
        leaf_cert = leaf_dir / "leaf.pem"
        openssl(
            "ca", "-batch", "-config", config, "-cert", self.intermediate_cert_path,
            "-keyfile", self.intermediate_key_path, "-in", csr, "-out", leaf_cert,
            "-startdate", _asn1_time(start), "-enddate", _asn1_time(end),
            "-extensions", "leaf_ext", "-notext",
        )  # fmt: skip
        return ChainFiles(
            directory=leaf_dir,
            key_type=key_type,
            dns_names=tuple(dns_names),
            leaf_cert_path=leaf_cert,
            leaf_key_path=leaf_key,
            chain_paths=(self.intermediate_cert_path, self.root_cert_path),
        )


def make_chain(
    directory: Path,
    *,
    key: KeyType = "rsa",
    dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
    days: int = 365,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
) -> ChainFiles:
    """Mint root -> intermediate -> leaf in ``directory`` and return the leaf's files."""
    ca = CertificateAuthority.create(directory / "ca", key=key)
    return ca.issue(dns_names, days=days, not_before=not_before, not_after=not_after)


def make_self_signed(
    directory: Path,
    *,
    key: KeyType = "rsa",
    dns_names: Sequence[str] = DEFAULT_DNS_NAMES,
    days: int = 365,
    key_path: Path | None = None,
    ca: bool = False,
    common_name: str | None = None,
) -> ChainFiles:
    """A self-signed certificate (empty chain) in ``directory``.

    ``key_path`` reuses an existing key (e.g. to make a CA certificate sharing a leaf's key);
    ``ca`` marks it ``CA:TRUE``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    leaf_key = key_path or generate_key(directory / "leaf.key", key)
    leaf_cert = directory / f"self-signed-{next(_counter)}.pem"
    config = directory / f"self-signed-{next(_counter)}.cnf"
    lines = [
        "[self_ext]",
        f"basicConstraints = critical, CA:{'TRUE' if ca else 'FALSE'}",
        "subjectKeyIdentifier = hash",
    ]
    if dns_names:
        lines.append("subjectAltName = " + ", ".join(f"DNS:{dns}" for dns in dns_names))
    config.write_text(_REQ_CONFIG + "\n".join(lines) + "\n")
    cn = common_name or (dns_names[0] if dns_names else "self-signed")
    openssl(
        "req", "-config", config, "-new", "-x509", "-key", leaf_key, "-subj", f"/CN={cn}",
        "-days", str(days), "-sha256", "-set_serial", _serial(), "-extensions", "self_ext",
        "-out", leaf_cert,
    )  # fmt: skip
    return ChainFiles(directory, key, tuple(dns_names), leaf_cert, leaf_key, ())
