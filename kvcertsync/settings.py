"""Key Vault VM extension settings: parse every published shape into validated, frozen models."""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import attrs

from kvcertsync.errors import SecretUriError, SettingsError
from kvcertsync.uri import VAULT_DNS_SUFFIXES, SecretUri

__all__ = [
    "DEFAULT_POLLING_INTERVAL",
    "DEFAULT_REQUIRE_INITIAL_SYNC",
    "DEFAULT_STORE_LOCATION",
    "DEFAULT_STORE_NAME",
    "EXTENSION_POLLING_RANGE",
    "LINUX_DEFAULT_STORE_DIRECTORY",
    "MAX_POLLING_INTERVAL",
    "SUPPORTED_EXTENSION_VERSIONS",
    "WINDOWS_STORE_LOCATIONS",
    "Acl",
    "AgentSettings",
    "LoggingSettings",
    "ObservedCertificate",
    "SettingsWarning",
    "collision_message",
    "error_code",
    "load_settings",
    "located",
    "parse_settings",
]

logger = logging.getLogger(__name__)

_T = TypeVar("_T")
_M = TypeVar("_M")

#: pollingIntervalInS when absent, in seconds (the extension's documented default: hourly).
DEFAULT_POLLING_INTERVAL: Final = 3600.0
#: Largest pollingIntervalInS we accept (signed 32-bit maximum): far past any useful interval, and
#: small enough to stay exact as a float and to fit whatever integer type a consumer uses.
MAX_POLLING_INTERVAL: Final = 2**31 - 1
#: certificateStoreName when absent (the Windows "Personal" store).
DEFAULT_STORE_NAME: Final = "MY"
#: certificateStoreLocation when absent.
DEFAULT_STORE_LOCATION: Final = "LocalMachine"
#: Where KeyVaultForLinux writes certificates when certificateStoreLocation is absent.
LINUX_DEFAULT_STORE_DIRECTORY: Final = "/var/lib/waagent/Microsoft.Azure.KeyVault.Store"
#: The Windows store locations the extension accepts (case-sensitive, per its documentation).
WINDOWS_STORE_LOCATIONS: Final = ("LocalMachine", "CurrentUser")
#: The documented default: report success once polling starts, not after every install.
DEFAULT_REQUIRE_INITIAL_SYNC: Final = False
#: The pollingIntervalInS range (seconds) KeyVaultForWindows 4.0 and KeyVaultForLinux 4.x accept:
#: "limited to between 5 and 60 minutes" (their pages' "Upgrading from 3.0" sections).
EXTENSION_POLLING_RANGE: Final = (300, 3600)
#: The extension major versions Microsoft supports (its pages: "only for major version 3.0 and
#: later"); ``kvcertsync check`` warns about differences from these unless told a version.
SUPPORTED_EXTENSION_VERSIONS: Final = (3, 4)

_SMS = "secretsManagementSettings"
_AUTH = "authenticationSettings"
_LOGGING = "loggingSettings"
_TOP_KEYS = (_SMS, _AUTH, _LOGGING)
_SMS_KEYS = (
    "pollingIntervalInS",
    "certificateStoreName",
    "certificateStoreLocation",
    "linkOnRenewal",
    "requireInitialSync",
    "aclEnabled",
    "observedCertificates",
)
_CERT_KEYS = (
    "url",
    "certificateStoreName",
    "certificateStoreLocation",
    "keyExportable",
    "accounts",
    "customSymbolicLinkName",
    "acls",
    "authenticationOverride",
)
_ACL_KEYS = ("user", "group")
_OVERRIDE_KEYS = ("msiClientId",)
_AUTH_KEYS = ("msiEndpoint", "msiClientId")
_LOGGING_KEYS = ("logger", "endpoint", "format", "servicename")
_IMDS_EXAMPLE = "http://169.254.169.254/metadata/identity"
_DIGITS = re.compile(r"[0-9]+")
#: A file name kvcertsync writes in a store directory (links, version files): what a PEM
#: directory store accepts, so ``check`` refuses exactly what an install would. 230 at most:
#: the temporary name a link is made under (".kvcertsync-tmp-<name>.<8 hex>") must fit in 255.
LINK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,229}")
# A link with a version file's name would replace that file with a link to itself.
_VERSION_SUFFIX = re.compile(r"\.[0-9a-f]{32}$")
# The extension's own Windows page shows "keyExportable": "false"; accept exactly these spellings.
_BOOL_STRINGS = {"true": True, "false": False}
_MAX_UNWRAP = 3


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return type(value).__name__


def _show(value: object) -> str:
    try:
        text = repr(value) if isinstance(value, str) else json.dumps(value, default=str)
    except ValueError:  # an integer too long to print (sys.set_int_max_str_digits)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _got(value: object) -> str:
    if isinstance(value, Mapping | list | tuple):
        return _json_type(value)
    return f"{_json_type(value)} {_show(value)}"


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _item(path: str, index: int) -> str:
    return f"{path}[{index}]"


# --- structured warnings and error codes ---


def _int_tuple(values: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(value) for value in values)


@attrs.frozen
class SettingsWarning:
    """One thing worth knowing about valid settings, with its JSON path and a stable code.

    ``kind`` says who notices it: ``"settings"`` (the parser's own warnings, also listed as
    strings in ``AgentSettings.warnings`` and logged), ``"extension"`` (where the Key Vault VM
    extension behaves differently from kvcertsync; not logged) or ``"machine"`` (what would
    fail on this machine, found by ``kvcertsync check``). ``extension`` and ``kvcertsync`` say
    what each would do; ``versions`` names the extension major versions concerned (empty: all).
    """

    code: str
    path: str
    message: str
    kind: str = "settings"
    extension: str | None = None
    kvcertsync: str | None = None
    versions: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple)

    def applies_to(self, version: int | None) -> bool:
        """Whether this concerns extension major ``version`` (None: a supported one, 3 or 4)."""
        if not self.versions:
            return True
        if version is None:
            return any(v in SUPPORTED_EXTENSION_VERSIONS for v in self.versions)
        return version in self.versions

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``kvcertsync check --json`` prints."""
        return {
            "code": self.code,
            "path": self.path,
            "kind": self.kind,
            "message": self.message,
            "extension": self.extension,
            "kvcertsync": self.kvcertsync,
            "versions": list(self.versions),
        }

    def __str__(self) -> str:
        return self.message


class _CodedError(SettingsError):
    """A SettingsError that carries a stable ``code`` (read it with ``error_code``)."""

    def __init__(self, code: str, message: str, path: str = "") -> None:
        super().__init__(message, path)
        self.code = code


def _error(code: str, message: str, path: str = "") -> SettingsError:
    return _CodedError(code, message, path)


def error_code(error: SettingsError) -> str:
    """A stable, machine-readable code for a settings error (``"invalid"`` when unclassified)."""
    code = getattr(error, "code", None)
    return code if isinstance(code, str) else "invalid"


def located(error: SettingsError, source: str) -> SettingsError:
    """``error`` again, its message ending with where the settings came from: ``(in <source>)``."""
    return _error(error_code(error), f"{_message(error)} (in {source})", error.path)


def _same_secret(a: SecretUri, b: SecretUri) -> bool:
    return a.latest == b.latest


def collision_message(
    name: str,
    location: str,
    this: tuple[str, ObservedCertificate, bool],
    other: tuple[str, ObservedCertificate, bool],
) -> str:
    """Why two certificates cannot share ``name`` in ``location``, and the change that fixes it.

    ``this`` and ``other`` are (JSON path, certificate, whether ``name`` is its custom link).
    Files are named ``<vault>.<name>.<version>`` with a ``<vault>.<name>`` link, always: a
    ``customSymbolicLinkName`` only adds a link, so it cannot separate two ``<vault>.<name>``.
    """
    this_path, this_cert, this_custom = this
    other_path, other_cert, other_custom = other
    head = f"{this_cert.uri} and {other_path} would both be named {name!r} in {location}"
    if this_custom or other_custom:
        rename = this_path if this_custom else other_path
        return (
            f"{head}: give {_join(rename, 'customSymbolicLinkName')} another name (or move one "
            "of them to its own certificateStoreLocation)"
        )
    if _same_secret(this_cert.uri, other_cert.uri):
        return (
            f"{head}: both are {this_cert.uri.latest}, once with a version: list the secret once "
            "(without a version to follow the latest), or give one of them its own "
            "certificateStoreLocation (another directory)"
        )
    return (
        f"{head}: give one of them its own certificateStoreLocation (another directory); a "
        "customSymbolicLinkName does not help, since the files are still named "
        f"{name}.<version> and {name}"
    )


# --- shared value checks: each returns an error message, or None when the value is acceptable ---


def _store_location_problem(value: str) -> str | None:
    if value in WINDOWS_STORE_LOCATIONS or _as_directory(value) is not None:
        return None
    squashed = re.sub(r"[\s_\-\\/]", "", value).lower()
    for known in WINDOWS_STORE_LOCATIONS:
        if squashed == known.lower():
            return (
                f"store locations are case-sensitive: write {known!r}, not {value!r} "
                f"(accepted: {' or '.join(map(repr, WINDOWS_STORE_LOCATIONS))}, "
                "or an absolute directory path)"
            )
    return (
        f"expected {' or '.join(map(repr, WINDOWS_STORE_LOCATIONS))} (Windows certificate store, "
        f"case-sensitive) or an absolute directory path such as {LINUX_DEFAULT_STORE_DIRECTORY!r} "
        rf"or 'C:\certs', got {value!r}"
    )


def _as_directory(value: str) -> PurePath | None:
    if not value or "\0" in value:
        return None
    if value.startswith("/"):
        return PurePosixPath(value)
    windows = PureWindowsPath(value)
    # is_absolute() needs a drive (C:\) or a UNC share (\\server\share), which is what we want.
    return windows if windows.is_absolute() else None


def _symlink_problem(value: str) -> str | None:
    if not LINK_NAME.fullmatch(value):
        return (
            "expected a file name of 1 to 230 letters, digits, '.', '_' or '-' that starts "
            f"with a letter or digit, got {value!r}"
        )
    if _VERSION_SUFFIX.search(value):
        return (
            f"{value!r} ends like a certificate version file (.<32 hex digits>); "
            "it could replace one"
        )
    return None


def _endpoint_problem(value: str) -> str | None:
    expected = f"expected an http(s) URL with a host, such as {_IMDS_EXAMPLE!r}, got {value!r}"
    if not value or any(ch.isspace() or ord(ch) < 32 for ch in value):
        return expected
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return expected
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return expected
    return None


def _polling_problem(value: float) -> str | None:
    if not math.isfinite(value) or value <= 0:
        return f"expected a positive number of seconds, got {value!r}"
    if value > MAX_POLLING_INTERVAL:
        return f"expected at most {MAX_POLLING_INTERVAL} seconds, got {value!r}"
    return None


def _text_problem(value: str) -> str | None:
    return None if value.strip() else "expected a non-empty string"


# --- attrs validators and converters for construction from code ---


def _validate_with(
    check: Callable[[Any], str | None],
) -> Callable[[Any, attrs.Attribute[Any], Any], None]:
    def validate(_instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is None:
            return
        problem = check(value)
        if problem is not None:
            raise SettingsError(problem, attribute.name)

    return validate


def _str_tuple(values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError("expected a sequence of strings, not a single string")
    return tuple(values)


def _acl_tuple(values: Iterable[Acl]) -> tuple[Acl, ...]:
    return tuple(values)


def _observed_tuple(values: Iterable[ObservedCertificate]) -> tuple[ObservedCertificate, ...]:
    return tuple(values)


def _strings(_instance: Any, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise SettingsError(f"expected non-empty strings, got {item!r}", attribute.name)


_opt_str = attrs.validators.optional(attrs.validators.instance_of(str))


# --- models ---


@attrs.frozen
class Acl:
    """Read access to an installed certificate for a POSIX user and/or group (Linux v3 ``acls``)."""

    user: str | None = attrs.field(
        default=None, validator=[_opt_str, _validate_with(_text_problem)]
    )
    group: str | None = attrs.field(
        default=None, validator=[_opt_str, _validate_with(_text_problem)]
    )

    def __attrs_post_init__(self) -> None:
        if self.user is None and self.group is None:
            raise SettingsError("an ACL entry needs a user, a group, or both")

    def to_dict(self) -> dict[str, str]:
        """The extension's JSON form of this entry."""
        out: dict[str, str] = {}
        if self.user is not None:
            out["user"] = self.user
        if self.group is not None:
            out["group"] = self.group
        return out


@attrs.frozen
class LoggingSettings:
    """The extension's ``loggingSettings`` (Linux v3 Fluentd forwarding); every field optional."""

    logger: str | None = attrs.field(default=None, validator=_opt_str)
    endpoint: str | None = attrs.field(default=None, validator=_opt_str)
    format: str | None = attrs.field(default=None, validator=_opt_str)
    servicename: str | None = attrs.field(default=None, validator=_opt_str)

    def to_dict(self) -> dict[str, str]:
        """The extension's JSON form, omitting unset fields."""
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class ObservedCertificate:
    """One certificate to keep installed: where it lives in Key Vault and where it goes."""

    uri: SecretUri = attrs.field(validator=attrs.validators.instance_of(SecretUri))
    store_name: str = attrs.field(
        default=DEFAULT_STORE_NAME,
        validator=[attrs.validators.instance_of(str), _validate_with(_text_problem)],
    )
    store_location: str = attrs.field(
        default=DEFAULT_STORE_LOCATION,
        validator=[attrs.validators.instance_of(str), _validate_with(_store_location_problem)],
    )
    key_exportable: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    accounts: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple, validator=_strings)
    symlink_name: str | None = attrs.field(
        default=None, validator=[_opt_str, _validate_with(_symlink_problem)]
    )
    acls: tuple[Acl, ...] = attrs.field(
        default=(),
        converter=_acl_tuple,
        validator=attrs.validators.deep_iterable(attrs.validators.instance_of(Acl)),
    )
    msi_client_id: str | None = attrs.field(
        default=None, validator=[_opt_str, _validate_with(_text_problem)]
    )

    @classmethod
    def of(
        cls, url: str | SecretUri, *, allow_any_host: bool = False, **kwargs: Any
    ) -> ObservedCertificate:
        """Build from a URL string (parsed with SecretUri.parse) or a SecretUri, plus any field."""
        uri = (
            url
            if isinstance(url, SecretUri)
            else SecretUri.parse(url, allow_any_host=allow_any_host)
        )
        return cls(uri, **kwargs)

    @property
    def is_windows_store(self) -> bool:
        """True when the location names a Windows certificate store rather than a directory."""
        return self.store_location in WINDOWS_STORE_LOCATIONS

    @property
    def store_directory(self) -> PurePath | None:
        """The location as a path when it is a directory, else None."""
        return None if self.is_windows_store else _as_directory(self.store_location)

    def to_dict(self) -> dict[str, Any]:
        """The extension's v3 object form of this certificate (v4 for the client-id override)."""
        out: dict[str, Any] = {
            "url": str(self.uri),
            "certificateStoreName": self.store_name,
            "certificateStoreLocation": self.store_location,
        }
        if self.key_exportable:
            out["keyExportable"] = True
        if self.accounts:
            out["accounts"] = list(self.accounts)
        if self.symlink_name is not None:
            out["customSymbolicLinkName"] = self.symlink_name
        if self.acls:
            out["acls"] = [acl.to_dict() for acl in self.acls]
        if self.msi_client_id is not None:
            out["authenticationOverride"] = {"msiClientId": self.msi_client_id}
        return out


def _check_observed(
    _instance: Any, attribute: attrs.Attribute[Any], value: tuple[ObservedCertificate, ...]
) -> None:
    if not value:
        raise SettingsError("at least one certificate must be observed", attribute.name)
    seen: dict[SecretUri, int] = {}
    for index, cert in enumerate(value):
        if not isinstance(cert, ObservedCertificate):
            raise TypeError(f"{attribute.name}[{index}] must be an ObservedCertificate")
        if cert.uri in seen:
            raise SettingsError(
                f"{cert.uri} is observed twice (at {seen[cert.uri]} and {index})",
                attribute.name,
            )
        seen[cert.uri] = index


def _check_polling(_instance: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    problem = _polling_problem(value)
    if problem is not None:
        raise SettingsError(problem, attribute.name)


@attrs.frozen
class AgentSettings:
    """Validated extension settings: what to watch, how often, and how to authenticate."""

    observed: tuple[ObservedCertificate, ...] = attrs.field(
        converter=_observed_tuple, validator=_check_observed
    )
    polling_interval: float = attrs.field(
        default=DEFAULT_POLLING_INTERVAL, kw_only=True, converter=float, validator=_check_polling
    )
    require_initial_sync: bool = attrs.field(
        default=DEFAULT_REQUIRE_INITIAL_SYNC,
        kw_only=True,
        validator=attrs.validators.instance_of(bool),
    )
    link_on_renewal: bool = attrs.field(
        default=False, kw_only=True, validator=attrs.validators.instance_of(bool)
    )
    acl_enabled: bool = attrs.field(
        default=False, kw_only=True, validator=attrs.validators.instance_of(bool)
    )
    msi_endpoint: str | None = attrs.field(
        default=None, kw_only=True, validator=[_opt_str, _validate_with(_endpoint_problem)]
    )
    msi_client_id: str | None = attrs.field(
        default=None, kw_only=True, validator=[_opt_str, _validate_with(_text_problem)]
    )
    store_name: str = attrs.field(
        default=DEFAULT_STORE_NAME,
        kw_only=True,
        validator=[attrs.validators.instance_of(str), _validate_with(_text_problem)],
    )
    store_location: str = attrs.field(
        default=DEFAULT_STORE_LOCATION,
        kw_only=True,
        validator=[attrs.validators.instance_of(str), _validate_with(_store_location_problem)],
    )
    logging: LoggingSettings | None = attrs.field(
        default=None,
        kw_only=True,
        validator=attrs.validators.optional(attrs.validators.instance_of(LoggingSettings)),
    )
    warnings: tuple[str, ...] = attrs.field(
        default=(), kw_only=True, converter=_str_tuple, eq=False, repr=False
    )
    #: Everything the parser noticed, structured (path, code): its warnings (the same as
    #: ``warnings``) and where the Key Vault VM extension would behave differently.
    diagnostics: tuple[SettingsWarning, ...] = attrs.field(
        default=(), kw_only=True, converter=tuple, eq=False, repr=False
    )
    #: The JSON path of ``secretsManagementSettings`` in the document parsed (inside the VM
    #: envelope: ``runtimeSettings[0].handlerSettings.publicSettings.secretsManagementSettings``).
    json_path: str = attrs.field(default=_SMS, kw_only=True, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        if self.msi_client_id is not None and self.msi_endpoint is None:
            raise SettingsError(
                f"msi_client_id needs msi_endpoint (for most Azure VMs: {_IMDS_EXAMPLE})",
                "msi_endpoint",
            )

    def to_dict(self) -> dict[str, Any]:
        """The extension's v3 object form; ``parse_settings(s.to_dict()) == s``."""
        if not float(self.polling_interval).is_integer():
            raise SettingsError(
                f"{self.polling_interval!r} is not a whole number of seconds, which "
                "pollingIntervalInS cannot express",
                "polling_interval",
            )
        sms: dict[str, Any] = {"pollingIntervalInS": str(int(self.polling_interval))}
        if self.store_name != DEFAULT_STORE_NAME:
            sms["certificateStoreName"] = self.store_name
        if self.store_location != DEFAULT_STORE_LOCATION:
            sms["certificateStoreLocation"] = self.store_location
        sms["linkOnRenewal"] = self.link_on_renewal
        sms["requireInitialSync"] = self.require_initial_sync
        if self.acl_enabled:
            sms["aclEnabled"] = True
        sms["observedCertificates"] = [cert.to_dict() for cert in self.observed]
        out: dict[str, Any] = {_SMS: sms}
        auth = {
            key: value
            for key, value in (
                ("msiEndpoint", self.msi_endpoint),
                ("msiClientId", self.msi_client_id),
            )
            if value is not None
        }
        if auth:
            out[_AUTH] = auth
        if self.logging is not None:
            out[_LOGGING] = self.logging.to_dict()
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        """``to_dict()`` as JSON text."""
        return json.dumps(self.to_dict(), indent=indent, ensure_ascii=False)


# --- parsing ---


class _Parser:
    """One parse: carries options and collects warnings as it walks the document."""

    def __init__(self, allow_any_host: bool) -> None:
        self.allow_any_host = allow_any_host
        self.diagnostics: list[SettingsWarning] = []
        self.root = ""
        self.sms_path = _SMS

    def warn(
        self,
        code: str,
        path: str,
        message: str,
        *,
        extension: str | None = None,
        kvcertsync: str | None = None,
    ) -> None:
        """A warning of the parser's own: logged, and listed in ``AgentSettings.warnings``."""
        logger.warning("%s", message)
        self.diagnostics.append(
            SettingsWarning(code, path, message, extension=extension, kvcertsync=kvcertsync)
        )

    def note(
        self,
        code: str,
        path: str,
        message: str,
        *,
        extension: str,
        kvcertsync: str,
        versions: tuple[int, ...] = (),
    ) -> None:
        """Where the extension would differ from kvcertsync: kept for ``check``, not logged."""
        self.diagnostics.append(
            SettingsWarning(
                code,
                path,
                message,
                kind="extension",
                extension=extension,
                kvcertsync=kvcertsync,
                versions=versions,
            )
        )

    # document level

    def load(self, source: object) -> AgentSettings:
        document = self.decode(source)
        root, body = self.unwrap(document)
        return self.settings(root, body)

    def decode(self, source: object) -> object:
        if isinstance(source, bytes | bytearray):
            source = self.text_of(bytes(source))
        if isinstance(source, str):
            return self.from_text(source, depth=0)
        if isinstance(source, Mapping):
            return source
        raise _error(
            "not-an-object",
            f"settings must be a JSON object (text, bytes or a mapping), got {_got(source)}",
        )

    @staticmethod
    def text_of(data: bytes) -> str:
        try:
            # detect_encoding honours the UTF-16 and UTF-8 byte-order marks PowerShell writes.
            return data.decode(json.detect_encoding(data))
        except (UnicodeDecodeError, LookupError) as exc:
            raise _error(
                "encoding", f"settings are not valid UTF-8/UTF-16/UTF-32 text: {exc}"
            ) from None

    def from_text(self, text: str, depth: int) -> object:
        text = text.lstrip("\ufeff")
        try:
            value = _loads(text)
        except _JsonSyntaxError as first:
            value = self.unescaped(text, first)
        if isinstance(value, str) and depth < _MAX_UNWRAP:
            # ConvertTo-Json of an already-serialised document yields a JSON string of JSON.
            mark = len(self.diagnostics)
            try:
                inner = self.from_text(value, depth + 1)
            except SettingsError:
                inner = None
            if isinstance(inner, Mapping):
                self.warn(
                    "double-encoded",
                    "",
                    "settings were a JSON string holding the JSON document (double-encoded, as "
                    "PowerShell's ConvertTo-Json produces); decoded it again",
                    extension="expects a JSON object; a string holding one is not, and it fails "
                    "to read the settings",
                    kvcertsync="decodes the string again and reads the document inside",
                )
                return inner
            del self.diagnostics[mark:]
        return value

    def unescaped(self, text: str, error: _JsonSyntaxError) -> object:
        if '\\"' in text:
            try:
                value = _loads(text.replace('\\"', '"'))
            except _JsonSyntaxError:
                pass
            else:
                self.warn(
                    "escaped-quotes",
                    "",
                    'settings had every quote escaped as \\" (a PowerShell quoting mistake); '
                    "read them with the backslashes removed",
                    extension='fails with "[CertificateManagementConfiguration] Failed to parse '
                    'the configuration settings with:not an object."',
                    kvcertsync="reads the settings with the backslashes removed",
                )
                return value
        raise _error("json-syntax", str(error)) from None

    def unwrap(self, document: object) -> tuple[str, Mapping[str, Any]]:
        if not isinstance(document, Mapping):
            raise _error(
                "not-an-object", f"the top level must be a JSON object, got {_got(document)}"
            )
        document = self.obj(document, "")
        if "runtimeSettings" not in document:
            return "", document
        path = "runtimeSettings"
        runtime = document["runtimeSettings"]
        if not isinstance(runtime, list | tuple) or not runtime:
            raise _error("wrong-type", f"expected a non-empty array, got {_got(runtime)}", path)
        if len(runtime) > 1:
            self.warn(
                "runtime-settings-entries",
                path,
                f"{path}: has {len(runtime)} entries; only the first is used",
            )
        node: object = runtime[0]
        path = _item(path, 0)
        for key in ("handlerSettings", "publicSettings"):
            if not isinstance(node, Mapping):
                raise _error("wrong-type", f"expected an object, got {_got(node)}", path)
            if key not in node:
                raise _error("missing-key", f"missing {key!r}", path)
            node, path = node[key], _join(path, key)
        if isinstance(node, str):
            node = self.from_text(node, depth=1)
        return path, self.obj(node, path)

    # the settings object

    def settings(self, root: str, doc: Mapping[str, Any]) -> AgentSettings:
        self.root = root
        sms_path = self.sms_path = _join(root, _SMS)
        raw_sms = doc.get(_SMS)
        if raw_sms is None:
            raise _error("missing-key", self.missing_sms_hint(doc), sms_path)
        self.unknown_keys(root, doc, _TOP_KEYS, "top")
        sms = self.obj(raw_sms, sms_path)
        if _AUTH in sms:
            raise _error(
                "misplaced-key",
                f"{_AUTH} belongs at the top level, beside {_SMS}, not inside it",
                _join(sms_path, _AUTH),
            )
        self.unknown_keys(sms_path, sms, _SMS_KEYS, "sms")

        polling_interval = self.polling(sms, sms_path)
        store_name = self.opt_text(sms, sms_path, "certificateStoreName") or DEFAULT_STORE_NAME
        store_location = self.opt_location(sms, sms_path) or DEFAULT_STORE_LOCATION
        link_on_renewal = self.opt_bool(sms, sms_path, "linkOnRenewal", False)
        require_initial_sync = self.opt_bool(
            sms, sms_path, "requireInitialSync", DEFAULT_REQUIRE_INITIAL_SYNC
        )
        acl_enabled = self.opt_bool(sms, sms_path, "aclEnabled", False)
        observed = self.observed(sms, sms_path, store_name, store_location, acl_enabled)
        msi_endpoint, msi_client_id = self.authentication(root, doc)
        logging_settings = self.logging(root, doc)
        self.removed_in_4(sms, sms_path, observed, link_on_renewal, require_initial_sync)
        self.overrides(observed, _join(sms_path, "observedCertificates"), msi_client_id)
        return _build(
            sms_path,
            AgentSettings,
            observed,
            polling_interval=polling_interval,
            require_initial_sync=require_initial_sync,
            link_on_renewal=link_on_renewal,
            acl_enabled=acl_enabled,
            msi_endpoint=msi_endpoint,
            msi_client_id=msi_client_id,
            store_name=store_name,
            store_location=store_location,
            logging=logging_settings,
            warnings=tuple(d.message for d in self.diagnostics if d.kind == "settings"),
            diagnostics=tuple(self.diagnostics),
            json_path=sms_path,
        )

    @staticmethod
    def missing_sms_hint(doc: Mapping[str, Any]) -> str:
        message = f"required: the settings object must contain {_SMS!r}"
        if "observedCertificates" in doc or "pollingIntervalInS" in doc:
            return message + f'; wrap the certificate settings in {{"{_SMS}": {{...}}}}'
        if "properties" in doc or "settings" in doc:
            return message + "; this looks like an ARM resource: pass its properties.settings"
        return message

    def polling(self, sms: Mapping[str, Any], path: str) -> float:
        path = _join(path, "pollingIntervalInS")
        value = sms.get("pollingIntervalInS")
        if value is None:
            return DEFAULT_POLLING_INTERVAL
        expected = (
            f"expected a whole number of seconds from 1 to {MAX_POLLING_INTERVAL}, as a string "
            'such as "3600" (or a number)'
        )
        if isinstance(value, str):
            digits = value.strip()
            # The length check keeps int() away from its digit limit on absurd input.
            if (
                not _DIGITS.fullmatch(digits)
                or len(digits) > 12
                or not 0 < int(digits) <= MAX_POLLING_INTERVAL
            ):
                raise _error("polling-interval", f"{expected}, got {_got(value)}", path)
            seconds = float(int(digits))
        else:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise _error("polling-interval", f"{expected}, got {_got(value)}", path)
            if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
                raise _error("polling-interval", f"{expected}, got {_got(value)}", path)
            if not 0 < value <= MAX_POLLING_INTERVAL:
                raise _error("polling-interval", f"{expected}, got {_got(value)}", path)
            seconds = float(value)
            self.note(
                "polling-interval-number",
                path,
                f"{path}: a number ({_show(value)}), where the extension's schema takes a string "
                f'such as "{int(seconds)}"',
                extension="fails to read the settings (not a string) and installs nothing",
                kvcertsync=f"accepts the number: polls every {int(seconds)} s",
            )
        low, high = EXTENSION_POLLING_RANGE
        if not low <= seconds <= high:
            clamped = low if seconds < low else high
            self.note(
                "polling-interval-range",
                path,
                f"{path}: {int(seconds)} s is outside the {low} to {high} s (5 to 60 minutes) "
                "that the extension's 4.x versions accept",
                extension=f"4.x limits pollingIntervalInS to {low}-{high} s: it would poll every "
                f"{clamped} s (3.x and earlier poll every {int(seconds)} s)",
                kvcertsync=f"polls every {int(seconds)} s, as written",
                versions=(4,),
            )
        return seconds

    def observed(
        self,
        sms: Mapping[str, Any],
        sms_path: str,
        store_name: str,
        store_location: str,
        acl_enabled: bool,
    ) -> tuple[ObservedCertificate, ...]:
        path = _join(sms_path, "observedCertificates")
        items = sms.get("observedCertificates")
        if items is None:
            raise _error(
                "missing-key",
                "required: an array of secret URLs or certificate objects "
                '(e.g. ["https://myvault.vault.azure.net/secrets/mycert"])',
                path,
            )
        if not isinstance(items, list | tuple):
            raise _error(
                "wrong-type",
                f"expected an array of secret URLs or certificate objects, got {_got(items)}",
                path,
            )
        if not items:
            raise _error("empty", "is empty: list at least one certificate to observe", path)
        certs: list[ObservedCertificate] = []
        seen: dict[SecretUri, int] = {}
        files: dict[tuple[str, str], tuple[int, bool]] = {}
        strings: list[int] = []
        objects: list[int] = []
        for index, item in enumerate(items):
            item_path = _item(path, index)
            if isinstance(item, str):
                url_path = item_path
                strings.append(index)
                cert = _build(
                    item_path,
                    ObservedCertificate,
                    self.uri(item, item_path),
                    store_name=store_name,
                    store_location=store_location,
                )
            elif isinstance(item, Mapping):
                url_path = _join(item_path, "url")
                objects.append(index)
                cert = self.certificate(item, item_path, store_name, store_location, acl_enabled)
            else:
                raise _error(
                    "wrong-type",
                    f"expected a secret URL string or a certificate object, got {_got(item)}",
                    item_path,
                )
            if cert.uri in seen:
                raise _error(
                    "duplicate-url",
                    f"{cert.uri} is already observed at {_item(path, seen[cert.uri])}; "
                    "list each secret once",
                    url_path,
                )
            seen[cert.uri] = index
            if cert.uri.version is not None:
                self.versioned(cert.uri, url_path)
            # Files are named <vault>.<name> (and by customSymbolicLinkName) per location, as
            # the Linux extension names them: two secrets must not share a name there.
            names = [(f"{cert.uri.vault_name}.{cert.uri.name}".lower(), False)]
            if cert.symlink_name:
                names.append((cert.symlink_name.lower(), True))
            for name, custom in names:
                other, other_custom = files.setdefault((cert.store_location, name), (index, custom))
                if other != index:
                    raise _error(
                        "name-collision",
                        collision_message(
                            name,
                            cert.store_location,
                            (item_path, cert, custom),
                            (_item(path, other), certs[other], other_custom),
                        ),
                        item_path,
                    )
            certs.append(cert)
        self.entry_forms(path, strings, objects)
        return tuple(certs)

    def versioned(self, uri: SecretUri, path: str) -> None:
        self.note(
            "versioned-url",
            path,
            f"{path}: {uri} names version {uri.version}: that version is installed and never "
            "replaced by a newer one",
            extension="4.x refuses versioned URLs (observed URLs must be versionless); 3.x and "
            "earlier install this version, as kvcertsync does",
            kvcertsync=f"installs version {uri.version} and keeps it, whatever is newer; drop "
            f"/{uri.version} to follow the latest",
            versions=(4,),
        )

    def entry_forms(self, path: str, strings: list[int], objects: list[int]) -> None:
        if strings:
            first, more = _first_of(path, strings)
            self.note(
                "url-string-entry",
                first,
                f"{first}{more}: a plain URL string (the 1.0 form)",
                extension="KeyVaultForLinux 4.x no longer takes URL strings: each entry must be "
                'an object {"url": ...}',
                kvcertsync='reads the string as {"url": ...} with the top-level store settings',
                versions=(4,),
            )
        if objects:
            first, more = _first_of(path, objects)
            self.note(
                "object-entry",
                first,
                f"{first}{more}: a certificate object (the 3.0 form)",
                extension="KeyVaultForWindows 1.0 and KeyVaultForLinux 2.0 take URL strings only",
                kvcertsync="reads the object, with its per-certificate store settings",
                versions=(1, 2),
            )

    def removed_in_4(
        self,
        sms: Mapping[str, Any],
        sms_path: str,
        observed: tuple[ObservedCertificate, ...],
        link_on_renewal: bool,
        require_initial_sync: bool,
    ) -> None:
        """Settings the 4.x extensions dropped, where kvcertsync does what 3.x did."""
        windows = any(cert.is_windows_store for cert in observed)
        if windows and sms.get("linkOnRenewal") is not None and not link_on_renewal:
            path = _join(sms_path, "linkOnRenewal")
            self.note(
                "removed-in-extension-4",
                path,
                f"{path}: false, which KeyVaultForWindows 4.0 no longer reads",
                extension="4.0 always links a renewed certificate to the one it replaces",
                kvcertsync="does not link renewals (CERT_RENEWAL_PROP_ID), as 3.0 with false",
                versions=(4,),
            )
        if sms.get("requireInitialSync") is not None and not require_initial_sync:
            path = _join(sms_path, "requireInitialSync")
            self.note(
                "removed-in-extension-4",
                path,
                f"{path}: false, which the 4.x extensions no longer read",
                extension="4.x reports success only once every certificate is installed",
                kvcertsync="reports success as soon as polling starts, as 3.x with false",
                versions=(4,),
            )
        certs = sms.get("observedCertificates")
        for index, item in enumerate(certs if isinstance(certs, list | tuple) else ()):
            if not isinstance(item, Mapping):
                continue
            cert = observed[index]
            item_path = _item(_join(sms_path, "observedCertificates"), index)
            if cert.key_exportable:
                path = _join(item_path, "keyExportable")
                self.note(
                    "removed-in-extension-4",
                    path,
                    f"{path}: true, which KeyVaultForWindows 4.0 no longer reads",
                    extension="4.0 never makes private keys exportable",
                    kvcertsync="imports the private key as exportable, as 3.0 does",
                    versions=(4,),
                )
            if cert.symlink_name is not None:
                path = _join(item_path, "customSymbolicLinkName")
                base = f"{cert.uri.vault_name}.{cert.uri.name}"
                self.note(
                    "removed-in-extension-4",
                    path,
                    f"{path}: {cert.symlink_name!r}, which KeyVaultForLinux 4.x no longer reads",
                    extension=f"4.x links only {base}.pem and {base}.keyid: a consumer "
                    f"configured with {cert.symlink_name!r} finds nothing",
                    kvcertsync=f"links {cert.symlink_name!r} (and {base}) to the current "
                    "version, as 3.0 does",
                    versions=(4,),
                )

    def overrides(
        self, observed: tuple[ObservedCertificate, ...], path: str, default: str | None
    ) -> None:
        default_identity = (
            f"user-assigned {default} (msiClientId)" if default else "the system-assigned identity"
        )
        for index, cert in enumerate(observed):
            if cert.msi_client_id is None:
                continue
            where = _join(_item(path, index), "authenticationOverride")
            self.note(
                "authentication-override",
                where,
                f"{where}: a per-certificate identity, read from the extension's 4.x versions on",
                extension=f"3.x and earlier ignore it and read this secret as {default_identity}",
                kvcertsync=f"reads this secret as user-assigned {cert.msi_client_id}",
                versions=(1, 2, 3),
            )

    def certificate(
        self,
        item: Mapping[str, Any],
        path: str,
        store_name: str,
        store_location: str,
        acl_enabled: bool,
    ) -> ObservedCertificate:
        self.unknown_keys(path, item, _CERT_KEYS, "cert")
        url = item.get("url")
        url_path = _join(path, "url")
        if url is None:
            raise _error(
                "missing-key",
                "required: the secret URL, e.g. https://myvault.vault.azure.net/secrets/mycert",
                url_path,
            )
        uri = self.uri(url, url_path)
        accounts = self.opt_list(item, path, "accounts", self.text)
        acls = self.opt_list(item, path, "acls", self.acl)
        if acls and not acl_enabled:
            acls_path = _join(path, "acls")
            self.warn(
                "acls-without-acl-enabled",
                acls_path,
                f"{acls_path}: set, but {_join(self.sms_path, 'aclEnabled')} is not true "
                "(the extension applies ACLs only when it is)",
                extension="KeyVaultForLinux 3.0 applies them only when aclEnabled is true; 4.x "
                "always applies them",
                kvcertsync="does not apply them until aclEnabled is true",
            )
        symlink = self.opt_text(item, path, "customSymbolicLinkName")
        if symlink is not None:
            problem = _symlink_problem(symlink)
            if problem is not None:
                raise _error("symlink-name", problem, _join(path, "customSymbolicLinkName"))
        return _build(
            path,
            ObservedCertificate,
            uri,
            store_name=self.opt_text(item, path, "certificateStoreName") or store_name,
            store_location=self.opt_location(item, path) or store_location,
            key_exportable=self.opt_bool(item, path, "keyExportable", False),
            accounts=accounts,
            symlink_name=symlink,
            acls=acls,
            msi_client_id=self.override(item, path),
        )

    def uri(self, value: object, path: str) -> SecretUri:
        if not isinstance(value, str):
            raise _error("wrong-type", f"expected a secret URL string, got {_got(value)}", path)
        try:
            uri = SecretUri.parse(value, allow_any_host=self.allow_any_host)
        except SecretUriError as exc:
            text = str(exc)
            code = (
                "keyless-url"
                if "carries no private key" in text
                else "vault-host"
                if "not a Key Vault host" in text
                else "secret-url"
            )
            raise _error(code, f"invalid secret URL: {text}", path) from None
        if self.allow_any_host and not uri.hostname.endswith(VAULT_DNS_SUFFIXES):
            self.note(
                "non-azure-host",
                path,
                f"{path}: {uri.hostname} is not an Azure Key Vault host",
                extension="accepts only Azure Key Vault hosts (<vault>.vault.azure.net and the "
                "sovereign clouds' equivalents)",
                kvcertsync=f"reads from {uri.host}, as allowed (allow_any_host)",
            )
        return uri

    def acl(self, value: object, path: str) -> Acl:
        node = self.obj(value, path, example='{"user": "www-data", "group": "ssl-cert"}')
        self.unknown_keys(path, node, _ACL_KEYS, "acl")
        user = self.opt_text(node, path, "user")
        group = self.opt_text(node, path, "group")
        if user is None and group is None:
            raise _error("acl-entry", 'expected "user", "group" or both', path)
        return Acl(user, group)

    def override(self, item: Mapping[str, Any], path: str) -> str | None:
        path = _join(path, "authenticationOverride")
        value = item.get("authenticationOverride")
        if value is None:
            return None
        node = self.obj(value, path, example='{"msiClientId": "<client id>"}')
        self.unknown_keys(path, node, _OVERRIDE_KEYS, "override")
        return self.opt_text(node, path, "msiClientId")

    def authentication(self, root: str, doc: Mapping[str, Any]) -> tuple[str | None, str | None]:
        path = _join(root, _AUTH)
        value = doc.get(_AUTH)
        if value is None:
            return None, None
        node = self.obj(value, path)
        self.unknown_keys(path, node, _AUTH_KEYS, "auth")
        endpoint = self.opt_text(node, path, "msiEndpoint")
        client_id = self.opt_text(node, path, "msiClientId")
        if endpoint is not None:
            problem = _endpoint_problem(endpoint)
            if problem is not None:
                raise _error("msi-endpoint", problem, _join(path, "msiEndpoint"))
        elif client_id is not None:
            raise _error(
                "msi-endpoint-required",
                f"required when msiClientId is set (for most Azure VMs: {_IMDS_EXAMPLE!r}; "
                "Azure Arc: 'http://localhost:40342/metadata/identity')",
                _join(path, "msiEndpoint"),
            )
        return endpoint, client_id

    def logging(self, root: str, doc: Mapping[str, Any]) -> LoggingSettings | None:
        path = _join(root, _LOGGING)
        value = doc.get(_LOGGING)
        if value is None:
            return None
        node = self.obj(value, path)
        self.unknown_keys(path, node, _LOGGING_KEYS, "logging")
        fields = {key: self.opt_text(node, path, key, allow_empty=True) for key in _LOGGING_KEYS}
        settings = LoggingSettings(**fields)
        target = " at ".join(
            repr(v) for v in (settings.logger or "fluentd", settings.endpoint) if v
        )
        self.note(
            "logging-settings",
            path,
            f"{path}: not honoured by kvcertsync",
            extension=f"KeyVaultForLinux 3.0 and later forward their logs to {target}",
            kvcertsync="logs to stderr or --log-file; --log-format json gives a log shipper one "
            "object per line",
        )
        return settings

    # field helpers: each names its JSON path in any error

    def obj(self, value: object, path: str, example: str | None = None) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            hint = f" such as {example}" if example else ""
            raise _error("wrong-type", f"expected an object{hint}, got {_got(value)}", path)
        for key in value:
            if not isinstance(key, str):
                raise _error("wrong-type", f"object keys must be strings, got {_got(key)}", path)
        return value

    def home(self, key: str, level: str, path: str) -> str | None:
        """Where ``key`` is read, when it is known at another level than ``level``."""
        sms, root = self.sms_path, self.root
        if key in _SMS_KEYS and level != "sms":
            return _join(sms, key)
        if key in _TOP_KEYS and level != "top":
            return f"{_join(root, key)}, at the top level beside {_SMS}"
        if key == "msiClientId" and level == "cert":
            return _join(_join(path, "authenticationOverride"), key)
        if key in _AUTH_KEYS and level != "auth":
            return _join(_join(root, _AUTH), key)
        if key in _CERT_KEYS and level in ("top", "sms"):
            return f"{_join(sms, 'observedCertificates')}[...].{key}, in each certificate object"
        if key in _LOGGING_KEYS and level != "logging":
            return _join(_join(root, _LOGGING), key)
        if key in _ACL_KEYS and level == "cert":
            return f"{_join(path, 'acls')}[...].{key}"
        return None

    def unknown_keys(
        self, path: str, node: Mapping[str, Any], known: tuple[str, ...], level: str
    ) -> None:
        for key in node:
            if key in known:
                continue
            key_path = _join(path, key)
            home = self.home(key, level, path)
            if home is not None:
                self.warn(
                    "misplaced-key",
                    key_path,
                    f"{key_path}: not read here, ignored (did you mean {home}?)",
                    extension=f"reads {key} only there: this one has no effect",
                    kvcertsync="ignores it too",
                )
                continue
            message = f"{key_path}: unknown key, ignored"
            close = difflib.get_close_matches(key, known, n=1) or [
                k for k in known if k.lower() == key.lower()
            ]
            if close:
                message += f" (did you mean {close[0]!r}?)"
            self.warn("unknown-key", key_path, message)

    def text(self, value: object, path: str, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            raise _error("wrong-type", f"expected a string, got {_got(value)}", path)
        if not allow_empty and not value.strip():
            raise _error("wrong-type", "expected a non-empty string", path)
        return value

    def opt_text(
        self, node: Mapping[str, Any], path: str, key: str, allow_empty: bool = False
    ) -> str | None:
        value = node.get(key)
        return None if value is None else self.text(value, _join(path, key), allow_empty)

    def opt_location(self, node: Mapping[str, Any], path: str) -> str | None:
        key = "certificateStoreLocation"
        location = self.opt_text(node, path, key)
        if location is not None:
            problem = _store_location_problem(location)
            if problem is not None:
                raise _error("store-location", problem, _join(path, key))
        return location

    def opt_bool(self, node: Mapping[str, Any], path: str, key: str, default: bool) -> bool:
        value = node.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        key_path = _join(path, key)
        if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
            # The extension's own documentation shows "keyExportable": "false"; accept it.
            parsed = _BOOL_STRINGS[value.strip().lower()]
            self.warn(
                "boolean-string",
                key_path,
                f"{key_path}: boolean written as string {value!r}; use {value.lower()}",
                extension="types it as a JSON boolean: a string is not one (its Windows page "
                'shows "keyExportable": "false" all the same)',
                kvcertsync=f"reads it as {str(parsed).lower()}",
            )
            return parsed
        raise _error(
            "wrong-type", f"expected a boolean (true or false), got {_got(value)}", key_path
        )

    def opt_list(
        self,
        node: Mapping[str, Any],
        path: str,
        key: str,
        item: Callable[[object, str], _T],
    ) -> tuple[_T, ...]:
        path = _join(path, key)
        value = node.get(key)
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            raise _error("wrong-type", f"expected an array, got {_got(value)}", path)
        return tuple(item(entry, _item(path, index)) for index, entry in enumerate(value))


def _first_of(path: str, indices: list[int]) -> tuple[str, str]:
    """The JSON path of the first of ``indices`` in ``path``, and " (and N more)"."""
    more = f" (and {len(indices) - 1} more)" if len(indices) > 1 else ""
    return _item(path, indices[0]), more


def _message(exc: SettingsError) -> str:
    text = str(exc)
    return text[len(exc.path) + 2 :] if exc.path else text


def _build(path: str, model: Callable[..., _M], *args: Any, **kwargs: Any) -> _M:
    """Construct a model from values the parser already checked, reporting at ``path``."""
    try:
        return model(*args, **kwargs)
    except SettingsError as exc:
        # Models validate again on construction; name the JSON location, not the attribute.
        raise SettingsError(_message(exc), path) from None
    except (TypeError, ValueError) as exc:
        raise SettingsError(str(exc), path) from None


class _JsonSyntaxError(Exception):
    """Internal: JSON text that does not parse, with a position-bearing message."""


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _loads(text: str) -> object:
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _JsonSyntaxError(
            f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from None
    except RecursionError:
        raise _JsonSyntaxError("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise _JsonSyntaxError(f"invalid JSON: {exc}") from None


def parse_settings(
    source: str | bytes | Mapping[str, Any], *, allow_any_host: bool = False
) -> AgentSettings:
    """Parse extension settings (JSON text, bytes or a mapping, optionally in the VM envelope)."""
    return _Parser(allow_any_host).load(source)


def load_settings(path: str | os.PathLike[str], *, allow_any_host: bool = False) -> AgentSettings:
    """Read and parse an extension settings file; errors name the file."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise _error("file", f"settings file not found: {name}") from None
    except OSError as exc:
        raise _error("file", f"cannot read settings file {name}: {exc.strerror or exc}") from None
    try:
        return parse_settings(data, allow_any_host=allow_any_host)
    except SettingsError as exc:
        raise located(exc, name) from None
