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
from kvcertsync.uri import SecretUri

__all__ = [
    "DEFAULT_POLLING_INTERVAL",
    "DEFAULT_REQUIRE_INITIAL_SYNC",
    "DEFAULT_STORE_LOCATION",
    "DEFAULT_STORE_NAME",
    "LINUX_DEFAULT_STORE_DIRECTORY",
    "MAX_POLLING_INTERVAL",
    "WINDOWS_STORE_LOCATIONS",
    "Acl",
    "AgentSettings",
    "LoggingSettings",
    "ObservedCertificate",
    "load_settings",
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
    if not value.strip():
        return "expected a non-empty file name"
    if "/" in value or "\0" in value or value in (".", ".."):
        return f"expected a plain file name (no '/', not '.' or '..'), got {value!r}"
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
        self.warnings: list[str] = []
        self.sms_path = _SMS

    def warn(self, message: str) -> None:
        logger.warning("%s", message)
        self.warnings.append(message)

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
        raise SettingsError(
            f"settings must be a JSON object (text, bytes or a mapping), got {_got(source)}"
        )

    @staticmethod
    def text_of(data: bytes) -> str:
        try:
            # detect_encoding honours the UTF-16 and UTF-8 byte-order marks PowerShell writes.
            return data.decode(json.detect_encoding(data))
        except (UnicodeDecodeError, LookupError) as exc:
            raise SettingsError(f"settings are not valid UTF-8/UTF-16/UTF-32 text: {exc}") from None

    def from_text(self, text: str, depth: int) -> object:
        text = text.lstrip("\ufeff")
        try:
            value = _loads(text)
        except _JsonSyntaxError as first:
            value = self.unescaped(text, first)
        if isinstance(value, str) and depth < _MAX_UNWRAP:
            # ConvertTo-Json of an already-serialised document yields a JSON string of JSON.
            mark = len(self.warnings)
            try:
                inner = self.from_text(value, depth + 1)
            except SettingsError:
                inner = None
            if isinstance(inner, Mapping):
                self.warn(
                    "settings were a JSON string holding the JSON document (double-encoded, as "
                    "PowerShell's ConvertTo-Json produces); decoded it again"
                )
                return inner
            del self.warnings[mark:]
        return value

    def unescaped(self, text: str, error: _JsonSyntaxError) -> object:
        if '\\"' in text:
            try:
                value = _loads(text.replace('\\"', '"'))
            except _JsonSyntaxError:
                pass
            else:
                self.warn(
                    'settings had every quote escaped as \\" (a PowerShell quoting mistake); '
                    "read them with the backslashes removed"
                )
                return value
        raise SettingsError(str(error)) from None

    def unwrap(self, document: object) -> tuple[str, Mapping[str, Any]]:
        if not isinstance(document, Mapping):
            raise SettingsError(f"the top level must be a JSON object, got {_got(document)}")
        document = self.obj(document, "")
        if "runtimeSettings" not in document:
            return "", document
        path = "runtimeSettings"
        runtime = document["runtimeSettings"]
        if not isinstance(runtime, list | tuple) or not runtime:
            raise SettingsError(f"expected a non-empty array, got {_got(runtime)}", path)
        if len(runtime) > 1:
            self.warn(f"{path}: has {len(runtime)} entries; only the first is used")
        node: object = runtime[0]
        path = _item(path, 0)
        for key in ("handlerSettings", "publicSettings"):
            if not isinstance(node, Mapping):
                raise SettingsError(f"expected an object, got {_got(node)}", path)
            if key not in node:
                raise SettingsError(f"missing {key!r}", path)
            node, path = node[key], _join(path, key)
        if isinstance(node, str):
            node = self.from_text(node, depth=1)
        return path, self.obj(node, path)

    # the settings object

    def settings(self, root: str, doc: Mapping[str, Any]) -> AgentSettings:
        sms_path = self.sms_path = _join(root, _SMS)
        raw_sms = doc.get(_SMS)
        if raw_sms is None:
            raise SettingsError(self.missing_sms_hint(doc), sms_path)
        self.unknown_keys(root, doc, _TOP_KEYS)
        sms = self.obj(raw_sms, sms_path)
        if _AUTH in sms:
            raise SettingsError(
                f"{_AUTH} belongs at the top level, beside {_SMS}, not inside it",
                _join(sms_path, _AUTH),
            )
        self.unknown_keys(sms_path, sms, _SMS_KEYS)

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
            warnings=tuple(self.warnings),
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
                raise SettingsError(f"{expected}, got {_got(value)}", path)
            return float(int(digits))
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SettingsError(f"{expected}, got {_got(value)}", path)
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            raise SettingsError(f"{expected}, got {_got(value)}", path)
        if not 0 < value <= MAX_POLLING_INTERVAL:
            raise SettingsError(f"{expected}, got {_got(value)}", path)
        return float(value)

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
            raise SettingsError(
                "required: an array of secret URLs or certificate objects "
                '(e.g. ["https://myvault.vault.azure.net/secrets/mycert"])',
                path,
            )
        if not isinstance(items, list | tuple):
            raise SettingsError(
                f"expected an array of secret URLs or certificate objects, got {_got(items)}", path
            )
        if not items:
            raise SettingsError("is empty: list at least one certificate to observe", path)
        certs: list[ObservedCertificate] = []
        seen: dict[SecretUri, int] = {}
        files: dict[tuple[str, str], int] = {}
        for index, item in enumerate(items):
            item_path = _item(path, index)
            if isinstance(item, str):
                url_path = item_path
                cert = _build(
                    item_path,
                    ObservedCertificate,
                    self.uri(item, item_path),
                    store_name=store_name,
                    store_location=store_location,
                )
            elif isinstance(item, Mapping):
                url_path = _join(item_path, "url")
                cert = self.certificate(item, item_path, store_name, store_location, acl_enabled)
            else:
                raise SettingsError(
                    f"expected a secret URL string or a certificate object, got {_got(item)}",
                    item_path,
                )
            if cert.uri in seen:
                raise SettingsError(
                    f"{cert.uri} is already observed at {_item(path, seen[cert.uri])}; "
                    "list each secret once",
                    url_path,
                )
            seen[cert.uri] = index
            # Files are named <vault>.<name> (and by customSymbolicLinkName) per location, as
            # the Linux extension names them: two secrets must not share a name there.
            names = [f"{cert.uri.vault_name}.{cert.uri.name}".lower()]
            if cert.symlink_name:
                names.append(cert.symlink_name.lower())
            for name in names:
                other = files.setdefault((cert.store_location, name), index)
                if other != index:
                    raise SettingsError(
                        f"{cert.uri} and {_item(path, other)} would both be named {name!r} in "
                        f"{cert.store_location}: give one a different customSymbolicLinkName or "
                        "certificateStoreLocation",
                        item_path,
                    )
            certs.append(cert)
        return tuple(certs)

    def certificate(
        self,
        item: Mapping[str, Any],
        path: str,
        store_name: str,
        store_location: str,
        acl_enabled: bool,
    ) -> ObservedCertificate:
        self.unknown_keys(path, item, _CERT_KEYS)
        url = item.get("url")
        url_path = _join(path, "url")
        if url is None:
            raise SettingsError(
                "required: the secret URL, e.g. https://myvault.vault.azure.net/secrets/mycert",
                url_path,
            )
        uri = self.uri(url, url_path)
        accounts = self.opt_list(item, path, "accounts", self.text)
        acls = self.opt_list(item, path, "acls", self.acl)
        if acls and not acl_enabled:
            self.warn(
                f"{_join(path, 'acls')}: set, but {_join(self.sms_path, 'aclEnabled')} is not true "
                "(the extension applies ACLs only when it is)"
            )
        symlink = self.opt_text(item, path, "customSymbolicLinkName")
        if symlink is not None:
            problem = _symlink_problem(symlink)
            if problem is not None:
                raise SettingsError(problem, _join(path, "customSymbolicLinkName"))
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
            raise SettingsError(f"expected a secret URL string, got {_got(value)}", path)
        try:
            return SecretUri.parse(value, allow_any_host=self.allow_any_host)
        except SecretUriError as exc:
            raise SettingsError(f"invalid secret URL: {exc}", path) from None

    def acl(self, value: object, path: str) -> Acl:
        node = self.obj(value, path, example='{"user": "www-data", "group": "ssl-cert"}')
        self.unknown_keys(path, node, _ACL_KEYS)
        user = self.opt_text(node, path, "user")
        group = self.opt_text(node, path, "group")
        if user is None and group is None:
            raise SettingsError('expected "user", "group" or both', path)
        return Acl(user, group)

    def override(self, item: Mapping[str, Any], path: str) -> str | None:
        path = _join(path, "authenticationOverride")
        value = item.get("authenticationOverride")
        if value is None:
            return None
        node = self.obj(value, path, example='{"msiClientId": "<client id>"}')
        self.unknown_keys(path, node, _OVERRIDE_KEYS)
        return self.opt_text(node, path, "msiClientId")

    def authentication(self, root: str, doc: Mapping[str, Any]) -> tuple[str | None, str | None]:
        path = _join(root, _AUTH)
        value = doc.get(_AUTH)
        if value is None:
            return None, None
        node = self.obj(value, path)
        self.unknown_keys(path, node, _AUTH_KEYS)
        endpoint = self.opt_text(node, path, "msiEndpoint")
        client_id = self.opt_text(node, path, "msiClientId")
        if endpoint is not None:
            problem = _endpoint_problem(endpoint)
            if problem is not None:
                raise SettingsError(problem, _join(path, "msiEndpoint"))
        elif client_id is not None:
            raise SettingsError(
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
        self.unknown_keys(path, node, _LOGGING_KEYS)
        fields = {key: self.opt_text(node, path, key, allow_empty=True) for key in _LOGGING_KEYS}
        return LoggingSettings(**fields)

    # field helpers: each names its JSON path in any error

    def obj(self, value: object, path: str, example: str | None = None) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            hint = f" such as {example}" if example else ""
            raise SettingsError(f"expected an object{hint}, got {_got(value)}", path)
        for key in value:
            if not isinstance(key, str):
                raise SettingsError(f"object keys must be strings, got {_got(key)}", path)
        return value

    def unknown_keys(self, path: str, node: Mapping[str, Any], known: tuple[str, ...]) -> None:
        for key in node:
            if key in known:
                continue
            message = f"{_join(path, key)}: unknown key, ignored"
            close = difflib.get_close_matches(key, known, n=1) or [
                k for k in known if k.lower() == key.lower()
            ]
            if close:
                message += f" (did you mean {close[0]!r}?)"
            elif key == _LOGGING and path.endswith(_SMS):
                message += f" ({_LOGGING} belongs at the top level, beside {_SMS})"
            self.warn(message)

    def text(self, value: object, path: str, allow_empty: bool = False) -> str:
        if not isinstance(value, str):
            raise SettingsError(f"expected a string, got {_got(value)}", path)
        if not allow_empty and not value.strip():
            raise SettingsError("expected a non-empty string", path)
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
                raise SettingsError(problem, _join(path, key))
        return location

    def opt_bool(self, node: Mapping[str, Any], path: str, key: str, default: bool) -> bool:
        value = node.get(key)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_STRINGS:
            # The extension's own documentation shows "keyExportable": "false"; accept it.
            self.warn(
                f"{_join(path, key)}: boolean written as string {value!r}; use {value.lower()}"
            )
            return _BOOL_STRINGS[value.strip().lower()]
        raise SettingsError(
            f"expected a boolean (true or false), got {_got(value)}", _join(path, key)
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
            raise SettingsError(f"expected an array, got {_got(value)}", path)
        return tuple(item(entry, _item(path, index)) for index, entry in enumerate(value))


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
        raise SettingsError(f"settings file not found: {name}") from None
    except OSError as exc:
        raise SettingsError(f"cannot read settings file {name}: {exc.strerror or exc}") from None
    try:
        return parse_settings(data, allow_any_host=allow_any_host)
    except SettingsError as exc:
        raise SettingsError(f"{_message(exc)} (in {name})", exc.path) from None
