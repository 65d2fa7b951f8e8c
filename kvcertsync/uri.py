"""SecretUri: parse, validate and canonicalise a Key Vault secret URL."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import attrs

from kvcertsync.errors import SecretUriError

__all__ = ["VAULT_DNS_SUFFIXES", "SecretUri"]

#: DNS suffixes of the public and sovereign Key Vault (and Managed HSM) services.
VAULT_DNS_SUFFIXES = (
    ".vault.azure.net",
    ".vault.azure.cn",
    ".vault.usgovcloudapi.net",
    ".vault.microsoftazure.de",
    ".managedhsm.azure.net",
)

_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")
_VERSION = re.compile(r"[0-9A-Fa-f]{32}")
_VAULT_NAME = re.compile(r"[a-z](?:[a-z0-9-]*[a-z0-9])?")
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?|\d{1,3}")
# Collections that exist beside /secrets/ and hold the same certificate without its private key.
_KEYLESS_COLLECTIONS = ("certificates", "keys")


def _lower(value: str | None) -> str | None:
    return value.lower() if value is not None else None


# The hash is cached: every poll hashes its URL a few times (queues, store, stats).
@attrs.frozen(repr=False, cache_hash=True)
class SecretUri:
    """A validated Key Vault secret URL; compares case-insensitively, ``str()`` is canonical."""

    #: The vault's host name, e.g. ``myvault.vault.azure.net`` (with ``:port`` only off Azure).
    host: str = attrs.field(eq=str.lower)
    #: The secret's name, as written.
    name: str = attrs.field(eq=str.lower)
    #: The version (32 hexadecimal characters, lower case), or None for the latest.
    version: str | None = attrs.field(default=None, eq=_lower)

    @classmethod
    def parse(cls, text: str, *, allow_any_host: bool = False) -> SecretUri:
        """Parse ``https://<vault>.vault.azure.net/secrets/<name>[/<version>]``."""
        if not isinstance(text, str):
            raise SecretUriError(f"secret URL must be a string, not {type(text).__name__}")
        raw = text.strip()
        if not raw:
            raise SecretUriError("secret URL is empty")
        try:
            parts = urlsplit(raw)
            port = parts.port
        except ValueError as exc:
            raise SecretUriError(f"{raw!r} is not a valid URL: {exc}") from None
        if parts.scheme.lower() != "https":
            raise SecretUriError(f"{raw!r}: Key Vault URLs must use https, not {parts.scheme!r}")
        if parts.username is not None or parts.password is not None:
            raise SecretUriError(f"{raw!r}: a secret URL must not carry user information")
        if parts.query or parts.fragment:
            raise SecretUriError(f"{raw!r}: a secret URL takes no query string or fragment")
        hostname = (parts.hostname or "").lower()
        if not hostname:
            raise SecretUriError(f"{raw!r}: the URL has no host")
        host = cls._check_host(raw, hostname, port, allow_any_host)
        name, version = cls._check_path(raw, host, parts.path)
        return cls(host=host, name=name, version=version)

    @staticmethod
    def _check_host(raw: str, hostname: str, port: int | None, allow_any_host: bool) -> str:
        labels = hostname.split(".")
        if not all(_HOST_LABEL.fullmatch(label) for label in labels):
            raise SecretUriError(f"{raw!r}: {hostname!r} is not a valid host name")
        if allow_any_host:
            return hostname if port in (None, 443) else f"{hostname}:{port}"
        suffix = next((s for s in VAULT_DNS_SUFFIXES if hostname.endswith(s)), None)
        if suffix is None:
            raise SecretUriError(
                f"{raw!r}: {hostname!r} is not a Key Vault host (expected <vault>"
                f"{VAULT_DNS_SUFFIXES[0]} or a sovereign-cloud equivalent, a name private "
                "endpoints keep too; to reach an emulator or a proxy under that name, redirect "
                "the connection: --redirect on kvcertsync's command line, redirect= in "
                "KeyVaultSource; to accept any host: --allow-any-host on the command line, "
                "allow_any_host=True in Python)"
            )
        vault = hostname[: -len(suffix)]
        if not (3 <= len(vault) <= 24 and _VAULT_NAME.fullmatch(vault)) or "--" in vault:
            raise SecretUriError(f"{raw!r}: {vault!r} is not a valid vault name")
        if port not in (None, 443):
            raise SecretUriError(f"{raw!r}: Key Vault listens on port 443 only, not {port}")
        return hostname

    @staticmethod
    def _check_path(raw: str, host: str, path: str) -> tuple[str, str | None]:
        segments = path.split("/")[1:]
        if segments and segments[-1] == "":
            segments.pop()
        collection = segments[0].lower() if segments else ""
        if collection in _KEYLESS_COLLECTIONS and len(segments) in (2, 3):
            fixed = f"https://{host}/secrets/" + "/".join(segments[1:])
            raise SecretUriError(
                f"{raw!r} is a /{collection}/ URL, which carries no private key; a certificate "
                f"is installed from its secret: use {fixed!r}"
            )
        if collection != "secrets" or len(segments) not in (2, 3):
            raise SecretUriError(
                f"{raw!r}: expected a path /secrets/<name> or /secrets/<name>/<version>"
            )
        name = segments[1]
        if not _NAME.fullmatch(name):
            raise SecretUriError(
                f"{raw!r}: secret name {name!r} must be 1-127 letters, digits or hyphens"
            )
        version = segments[2] if len(segments) == 3 else None
        if version is not None and not _VERSION.fullmatch(version):
            raise SecretUriError(
                f"{raw!r}: secret version {version!r} must be 32 hexadecimal characters"
            )
        return name, version.lower() if version is not None else None

    @property
    def vault_url(self) -> str:
        """The vault's base URL, e.g. ``https://myvault.vault.azure.net``."""
        return f"https://{self.host.lower()}"

    @property
    def vault_name(self) -> str:
        """The vault's name: the first label of its host."""
        return self.host.split(".", 1)[0].split(":", 1)[0].lower()

    @property
    def hostname(self) -> str:
        """The vault host without any port."""
        return self.host.split(":", 1)[0].lower()

    @property
    def key(self) -> str:
        """A stable, case-folded identity for this secret (vault host, name, version)."""
        return str(self).lower()

    def with_version(self, version: str | None) -> SecretUri:
        """The same secret at ``version`` (None: the latest)."""
        if version is not None and not _VERSION.fullmatch(version):
            raise SecretUriError(f"secret version {version!r} must be 32 hexadecimal characters")
        return attrs.evolve(self, version=_lower(version))

    @property
    def latest(self) -> SecretUri:
        """The same secret without a version."""
        # Immutable, so a versionless URI is its own latest: this is asked on every poll.
        return self if self.version is None else attrs.evolve(self, version=None)

    def __str__(self) -> str:
        base = f"https://{self.host.lower()}/secrets/{self.name}"
        return f"{base}/{self.version}" if self.version else base

    def __repr__(self) -> str:
        return f"SecretUri({str(self)!r})"
