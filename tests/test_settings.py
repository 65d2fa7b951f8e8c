import copy
import json
import logging
import os
import re
import string
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcertsync.errors import SettingsError
from kvcertsync.settings import (
    LINK_NAME,
    LINUX_DEFAULT_STORE_DIRECTORY,
    Acl,
    AgentSettings,
    LoggingSettings,
    ObservedCertificate,
    load_settings,
    parse_settings,
)
from kvcertsync.uri import SecretUri

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
VAULT = "https://demo.vault.azure.net"
URL1 = f"{VAULT}/secrets/web-tls"
URL2 = f"{VAULT}/secrets/client-auth"
URL3 = f"{VAULT}/secrets/api"
CLIENT_ID = "00001111-aaaa-2222-bbbb-3333cccc4444"
IMDS = "http://169.254.169.254/metadata/identity"
SMS = "secretsManagementSettings"
OBS = f"{SMS}.observedCertificates"


def cert(url: str, **kw: Any) -> ObservedCertificate:
    return ObservedCertificate.of(url, **kw)


def v3_doc() -> dict[str, Any]:
    return {
        SMS: {
            "pollingIntervalInS": "600",
            "linkOnRenewal": True,
            "requireInitialSync": True,
            "observedCertificates": [
                {
                    "url": URL1,
                    "certificateStoreName": "MY",
                    "certificateStoreLocation": "LocalMachine",
                    "accounts": ["Network Service"],
                },
                {
                    "url": URL2,
                    "certificateStoreName": "TrustedPeople",
                    "certificateStoreLocation": "CurrentUser",
                    "keyExportable": True,
                    "accounts": ["Network Service", "Local Service"],
                },
                {"url": URL3},
            ],
        },
        "authenticationSettings": {"msiEndpoint": IMDS, "msiClientId": CLIENT_ID},
    }


V3_EXPECTED = AgentSettings(
    (
        cert(URL1, accounts=("Network Service",)),
        cert(
            URL2,
            store_name="TrustedPeople",
            store_location="CurrentUser",
            key_exportable=True,
            accounts=("Network Service", "Local Service"),
        ),
        cert(URL3),
    ),
    polling_interval=600.0,
    link_on_renewal=True,
    require_initial_sync=True,
    msi_endpoint=IMDS,
    msi_client_id=CLIENT_ID,
)


# --- accepted shapes ---------------------------------------------------------------------------


def test_windows_v1_top_level_store_and_url_strings() -> None:
    doc = {
        SMS: {
            "pollingIntervalInS": "3600",
            "certificateStoreName": "WebHosting",
            "certificateStoreLocation": "CurrentUser",
            "linkOnRenewal": False,
            "requireInitialSync": True,
            "observedCertificates": [URL1, URL2],
        },
        "authenticationSettings": {"msiEndpoint": f"{IMDS}/oauth2/token"},
    }
    expected = AgentSettings(
        (
            cert(URL1, store_name="WebHosting", store_location="CurrentUser"),
            cert(URL2, store_name="WebHosting", store_location="CurrentUser"),
        ),
        require_initial_sync=True,
        store_name="WebHosting",
        store_location="CurrentUser",
        msi_endpoint=f"{IMDS}/oauth2/token",
    )
    assert parse_settings(doc) == expected
    assert parse_settings(json.dumps(doc)) == expected


def test_windows_v3_objects_fall_back_to_defaults() -> None:
    parsed = parse_settings(v3_doc())
    assert parsed == V3_EXPECTED
    assert parsed.observed[2].store_name == "MY"
    assert parsed.observed[2].store_location == "LocalMachine"
    assert parsed.observed[2].is_windows_store
    assert parsed.observed[2].store_directory is None
    assert parsed.warnings == ()


def test_per_certificate_fields_override_top_level_ones() -> None:
    doc = v3_doc()
    doc[SMS]["certificateStoreName"] = "CA"
    doc[SMS]["certificateStoreLocation"] = "CurrentUser"
    parsed = parse_settings(doc)
    assert parsed.observed[0].store_location == "LocalMachine"
    assert parsed.observed[2] == cert(URL3, store_name="CA", store_location="CurrentUser")


def test_linux_v3_directories_acls_symlinks_and_logging() -> None:
    doc = {
        "loggingSettings": {
            "logger": "fluentd",
            "endpoint": "tcp://localhost:24224",
            "format": "forward",
            "servicename": "akvvm_service",
        },
        SMS: {
            "pollingIntervalInS": "3600",
            "requireInitialSync": False,
            "aclEnabled": True,
            "observedCertificates": [
                {
                    "url": URL1,
                    "certificateStoreLocation": "/var/lib/waagent/Microsoft.Azure.KeyVault/app1",
                    "customSymbolicLinkName": "app1Cert1",
                    "acls": [{"user": "app1", "group": "appGroup1"}, {"user": "service1"}],
                },
                {
                    "url": URL2,
                    "certificateStoreName": "ignored on linux",
                    "certificateStoreLocation": LINUX_DEFAULT_STORE_DIRECTORY,
                    "acls": [{"group": "ssl-cert"}],
                },
            ],
        },
    }
    expected = AgentSettings(
        (
            cert(
                URL1,
                store_location="/var/lib/waagent/Microsoft.Azure.KeyVault/app1",
                symlink_name="app1Cert1",
                acls=(Acl("app1", "appGroup1"), Acl("service1", None)),
            ),
            cert(
                URL2,
                store_name="ignored on linux",
                store_location=LINUX_DEFAULT_STORE_DIRECTORY,
                acls=(Acl(None, "ssl-cert"),),
            ),
        ),
        acl_enabled=True,
        logging=LoggingSettings(
            logger="fluentd",
            endpoint="tcp://localhost:24224",
            format="forward",
            servicename="akvvm_service",
        ),
    )
    parsed = parse_settings(doc)
    assert parsed == expected
    assert parsed.observed[0].store_directory == PurePosixPath(
        "/var/lib/waagent/Microsoft.Azure.KeyVault/app1"
    )
    assert not parsed.observed[0].is_windows_store
    assert parsed.warnings == ()


def test_linux_v2_top_level_directory() -> None:
    doc = {
        SMS: {
            "pollingIntervalInS": "3600",
            "certificateStoreName": "MY",
            "certificateStoreLocation": "/var/lib/waagent/Microsoft.Azure.KeyVault",
            "observedCertificates": [URL1],
        }
    }
    location = "/var/lib/waagent/Microsoft.Azure.KeyVault"
    assert parse_settings(doc) == AgentSettings(
        (cert(URL1, store_location=location),), store_location=location
    )


def test_windows_directory_location() -> None:
    doc = {SMS: {"observedCertificates": [{"url": URL1, "certificateStoreLocation": "C:\\certs"}]}}
    parsed = parse_settings(doc)
    assert parsed.observed[0].store_directory == PureWindowsPath("C:\\certs")
    assert not parsed.observed[0].is_windows_store


def test_v4_authentication_override_per_certificate() -> None:
    doc = v3_doc()
    doc[SMS]["observedCertificates"][2]["authenticationOverride"] = {"msiClientId": "other-id"}
    parsed = parse_settings(doc)
    assert parsed.observed[2] == cert(URL3, msi_client_id="other-id")
    assert parsed.observed[0].msi_client_id is None
    assert parsed.msi_client_id == CLIENT_ID


def test_vm_envelope() -> None:
    envelope = {
        "runtimeSettings": [
            {
                "handlerSettings": {
                    "protectedSettingsCertThumbprint": "ABCDEF",
                    "protectedSettings": "MIIB...",
                    "publicSettings": v3_doc(),
                }
            }
        ]
    }
    assert parse_settings(envelope) == V3_EXPECTED
    assert parse_settings(json.dumps(envelope)) == V3_EXPECTED


def test_powershell_double_encoded_string(caplog: pytest.LogCaptureFixture) -> None:
    text = json.dumps(json.dumps(v3_doc()))
    assert text.startswith('"{\\"')
    with caplog.at_level(logging.WARNING, logger="kvcertsync.settings"):
        parsed = parse_settings(text)
    assert parsed == V3_EXPECTED
    assert "double-encoded" in caplog.text
    assert any("double-encoded" in w for w in parsed.warnings)


def test_powershell_backslash_escaped_quotes(caplog: pytest.LogCaptureFixture) -> None:
    text = json.dumps(v3_doc(), indent=2).replace('"', '\\"')
    with caplog.at_level(logging.WARNING, logger="kvcertsync.settings"):
        parsed = parse_settings(text)
    assert parsed == V3_EXPECTED
    assert '\\"' in caplog.text
    assert len(parsed.warnings) == 1


def test_polling_interval_as_number() -> None:
    for value in (600, 600.0, "600", " 600 "):
        doc = v3_doc()
        doc[SMS]["pollingIntervalInS"] = value
        assert parse_settings(doc) == V3_EXPECTED


def test_minimal_document_uses_documented_defaults() -> None:
    parsed = parse_settings(json.dumps({SMS: {"observedCertificates": [URL1]}}))
    assert parsed == AgentSettings((cert(URL1),))
    assert parsed.polling_interval == 3600.0
    assert parsed.require_initial_sync is False
    assert parsed.link_on_renewal is False
    assert parsed.acl_enabled is False
    assert parsed.msi_endpoint is None
    assert parsed.msi_client_id is None
    assert parsed.logging is None
    assert (parsed.store_name, parsed.store_location) == ("MY", "LocalMachine")


def test_null_optional_values_mean_absent() -> None:
    doc = {
        SMS: {
            "pollingIntervalInS": None,
            "linkOnRenewal": None,
            "observedCertificates": [{"url": URL1, "accounts": None, "acls": None}],
        },
        "authenticationSettings": {"msiEndpoint": None, "msiClientId": None},
        "loggingSettings": None,
    }
    assert parse_settings(doc) == AgentSettings((cert(URL1),))


def test_boolean_written_as_string_is_accepted_with_warning() -> None:
    doc = v3_doc()
    doc[SMS]["observedCertificates"][1]["keyExportable"] = "true"
    parsed = parse_settings(doc)
    assert parsed == V3_EXPECTED
    assert parsed.warnings == (
        f"{OBS}[1].keyExportable: boolean written as string 'true'; use true",
    )


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_bytes_in_the_encodings_powershell_writes(encoding: str) -> None:
    assert parse_settings(json.dumps(v3_doc()).encode(encoding)) == V3_EXPECTED


def test_unknown_keys_warn_and_still_parse(caplog: pytest.LogCaptureFixture) -> None:
    doc = v3_doc()
    doc[SMS]["certStoreLocation"] = "/tmp"
    doc[SMS]["observedCertificates"][0]["color"] = "blue"
    doc["extra"] = 1
    with caplog.at_level(logging.WARNING, logger="kvcertsync.settings"):
        parsed = parse_settings(doc)
    assert parsed == V3_EXPECTED
    assert parsed.warnings == (
        "extra: unknown key, ignored",
        f"{SMS}.certStoreLocation: unknown key, ignored (did you mean 'certificateStoreLocation'?)",
        f"{OBS}[0].color: unknown key, ignored",
    )
    assert f"{OBS}[0].color: unknown key" in caplog.text
    assert [r.levelno for r in caplog.records] == [logging.WARNING] * 3


def test_acls_without_acl_enabled_warn() -> None:
    doc = {SMS: {"observedCertificates": [{"url": URL1, "acls": [{"user": "app"}]}]}}
    parsed = parse_settings(doc)
    assert parsed.observed[0].acls == (Acl("app", None),)
    assert parsed.warnings == (
        f"{OBS}[0].acls: set, but {SMS}.aclEnabled is not true "
        "(the extension applies ACLs only when it is)",
    )


@pytest.mark.parametrize("name", ["settings.json", "settings-linux.json"])
def test_examples_parse(name: str) -> None:
    parsed = load_settings(EXAMPLES / name)
    assert [str(c.uri) for c in parsed.observed] == [URL1, URL2]
    assert parsed.msi_endpoint == IMDS
    assert parsed.msi_client_id == CLIENT_ID
    assert parsed.warnings == ()


def test_windows_example_content() -> None:
    parsed = load_settings(str(EXAMPLES / "settings.json"))
    assert all(c.is_windows_store for c in parsed.observed)
    assert parsed.observed[1].key_exportable
    assert parsed.link_on_renewal and parsed.require_initial_sync


# --- models from code --------------------------------------------------------------------------


def test_models_from_code() -> None:
    uri = SecretUri.parse(URL1)
    assert ObservedCertificate(uri) == ObservedCertificate.of(URL1) == ObservedCertificate.of(uri)
    assert ObservedCertificate.of("https://kv.example.test/secrets/x", allow_any_host=True).uri == (
        SecretUri.parse("https://kv.example.test/secrets/x", allow_any_host=True)
    )
    assert ObservedCertificate(uri, accounts=["a", "b"]).accounts == ("a", "b")
    assert "ObservedCertificate(uri=SecretUri('https://demo.vault.azure.net/secrets/web-tls')" in (
        repr(ObservedCertificate(uri))
    )
    settings_ = AgentSettings([ObservedCertificate(uri)], polling_interval=60)
    assert settings_.observed == (ObservedCertificate(uri),)
    assert settings_.polling_interval == 60.0
    assert hash(settings_) == hash(AgentSettings([ObservedCertificate(uri)], polling_interval=60))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ObservedCertificate.of(URL1, store_location="localmachine"),
        lambda: ObservedCertificate.of(URL1, store_name=""),
        lambda: ObservedCertificate.of(URL1, symlink_name="a/b"),
        lambda: ObservedCertificate.of(URL1, accounts="Network Service"),
        lambda: ObservedCertificate(URL1),  # type: ignore[arg-type]
        lambda: Acl(None, None),
        lambda: AgentSettings(()),
        lambda: AgentSettings((cert(URL1), cert(URL1.upper().replace("HTTPS", "https")))),
        lambda: AgentSettings((cert(URL1),), polling_interval=0),
        lambda: AgentSettings((cert(URL1),), msi_client_id="x"),
        lambda: AgentSettings((cert(URL1),), msi_endpoint="http:///metadata/identity"),
    ],
)
def test_models_validate_on_construction(make: Any) -> None:
    with pytest.raises((SettingsError, TypeError)):
        make()


def test_to_dict_is_the_v3_object_form() -> None:
    out = V3_EXPECTED.to_dict()
    assert out == {
        SMS: {
            "pollingIntervalInS": "600",
            "linkOnRenewal": True,
            "requireInitialSync": True,
            "observedCertificates": [
                {
                    "url": URL1,
                    "certificateStoreName": "MY",
                    "certificateStoreLocation": "LocalMachine",
                    "accounts": ["Network Service"],
                },
                {
                    "url": URL2,
                    "certificateStoreName": "TrustedPeople",
                    "certificateStoreLocation": "CurrentUser",
                    "keyExportable": True,
                    "accounts": ["Network Service", "Local Service"],
                },
                {
                    "url": URL3,
                    "certificateStoreName": "MY",
                    "certificateStoreLocation": "LocalMachine",
                },
            ],
        },
        "authenticationSettings": {"msiEndpoint": IMDS, "msiClientId": CLIENT_ID},
    }
    assert json.loads(V3_EXPECTED.to_json()) == out
    minimal = AgentSettings((cert(URL1),)).to_dict()
    assert set(minimal) == {SMS}
    assert minimal[SMS]["pollingIntervalInS"] == "3600"


def test_to_dict_refuses_fractional_interval() -> None:
    with pytest.raises(SettingsError, match="whole number of seconds"):
        AgentSettings((cert(URL1),), polling_interval=0.5).to_dict()


# --- errors ------------------------------------------------------------------------------------


def mutate(path: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return a copy of the v3 document with the value at a dotted/indexed path replaced."""
    doc = copy.deepcopy(base if base is not None else v3_doc())
    keys: list[Any] = [int(k) if k.isdigit() else k for k in re.split(r"\.|\[|\]\.?", path) if k]
    node: Any = doc
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    return doc


def raises_at(doc: Any, path: str, hint: str) -> SettingsError:
    with pytest.raises(SettingsError, match=re.escape(path)) as info:
        parse_settings(doc)
    assert hint in str(info.value)
    assert info.value.path == path
    return info.value


@pytest.mark.parametrize(
    ("path", "value", "where", "hint"),
    [
        (SMS, [], "", "expected an object"),
        (f"{SMS}.pollingIntervalInS", [3600], "", "whole number of seconds"),
        (f"{SMS}.certificateStoreName", 5, "", "expected a string"),
        (f"{SMS}.certificateStoreLocation", False, "", "expected a string"),
        (f"{SMS}.linkOnRenewal", 1, "", "expected a boolean"),
        (f"{SMS}.requireInitialSync", "yes", "", "expected a boolean"),
        (f"{SMS}.aclEnabled", {}, "", "expected a boolean"),
        (f"{SMS}.observedCertificates", URL1, "", "expected an array"),
        (f"{OBS}[2]", 42, "", "expected a secret URL string or a certificate object"),
        (f"{OBS}[2].url", ["x"], "", "expected a secret URL string"),
        (f"{OBS}[2].certificateStoreName", ["MY"], "", "expected a string"),
        (f"{OBS}[2].certificateStoreLocation", 1, "", "expected a string"),
        (f"{OBS}[2].keyExportable", "no", "", "expected a boolean"),
        (f"{OBS}[2].accounts", "Network Service", "", "expected an array"),
        (f"{OBS}[2].accounts", ["ok", 7], "[1]", "expected a string"),
        (f"{OBS}[2].customSymbolicLinkName", 3, "", "expected a string"),
        (f"{OBS}[2].acls", {"user": "x"}, "", "expected an array"),
        (f"{OBS}[2].acls", ["www-data"], "[0]", "expected an object"),
        (f"{OBS}[2].acls", [{"user": 5}], "[0].user", "expected a string"),
        (f"{OBS}[2].authenticationOverride", "id", "", "expected an object"),
        (f"{OBS}[2].authenticationOverride", {"msiClientId": 5}, ".msiClientId", "a string"),
        ("authenticationSettings", "x", "", "expected an object"),
        ("authenticationSettings.msiEndpoint", 80, "", "expected a string"),
        ("authenticationSettings.msiClientId", True, "", "expected a string"),
        ("loggingSettings", [], "", "expected an object"),
        ("loggingSettings", {"logger": 1}, ".logger", "expected a string"),
        ("loggingSettings", {"endpoint": None, "format": ["x"]}, ".format", "expected a string"),
    ],
)
def test_wrong_type_names_the_path(path: str, value: Any, where: str, hint: str) -> None:
    raises_at(mutate(path, value), path + where, hint)


def test_wrong_type_names_the_path_inside_the_envelope() -> None:
    envelope = {"runtimeSettings": [{"handlerSettings": {"publicSettings": v3_doc()}}]}
    envelope["runtimeSettings"][0]["handlerSettings"]["publicSettings"][SMS][
        "observedCertificates"
    ][2]["url"] = 5
    raises_at(
        envelope,
        "runtimeSettings[0].handlerSettings.publicSettings."
        "secretsManagementSettings.observedCertificates[2].url",
        "expected a secret URL string",
    )


@pytest.mark.parametrize(
    ("envelope", "path"),
    [
        ({"runtimeSettings": []}, "runtimeSettings"),
        ({"runtimeSettings": [5]}, "runtimeSettings[0]"),
        ({"runtimeSettings": [{}]}, "runtimeSettings[0]"),
        ({"runtimeSettings": [{"handlerSettings": {}}]}, "runtimeSettings[0].handlerSettings"),
        (
            {"runtimeSettings": [{"handlerSettings": {"publicSettings": [1]}}]},
            "runtimeSettings[0].handlerSettings.publicSettings",
        ),
    ],
)
def test_broken_envelope(envelope: Any, path: str) -> None:
    raises_at(envelope, path, "")


def test_missing_observed_certificates() -> None:
    doc = v3_doc()
    del doc[SMS]["observedCertificates"]
    raises_at(doc, OBS, "required")


def test_empty_observed_certificates() -> None:
    raises_at(mutate(OBS, []), OBS, "at least one certificate")


def test_certificates_url_suggests_secrets() -> None:
    error = raises_at(
        mutate(f"{OBS}[2].url", f"{VAULT}/certificates/api"), f"{OBS}[2].url", "/secrets/"
    )
    assert f"{VAULT}/secrets/api" in str(error)


def test_invalid_url_in_v1_string_list() -> None:
    doc = {SMS: {"observedCertificates": [URL1, "http://demo.vault.azure.net/secrets/x"]}}
    raises_at(doc, f"{OBS}[1]", "https")


def test_missing_url() -> None:
    raises_at(mutate(f"{OBS}[2]", {"certificateStoreName": "MY"}), f"{OBS}[2].url", "required")


def test_duplicate_urls_name_both_indices() -> None:
    duplicate = URL1.replace("demo", "DEMO") + "/"
    error = raises_at(mutate(f"{OBS}[2].url", duplicate), f"{OBS}[2].url", f"{OBS}[0]")
    assert "already observed" in str(error)


def test_msi_client_id_without_endpoint() -> None:
    doc = v3_doc()
    del doc["authenticationSettings"]["msiEndpoint"]
    raises_at(doc, "authenticationSettings.msiEndpoint", "required when msiClientId is set")


@pytest.mark.parametrize(
    "endpoint",
    ["http:///metadata/identity", "ftp://169.254.169.254/x", "169.254.169.254", "", "http://h:x/"],
)
def test_msi_endpoint_must_be_http_url_with_host(endpoint: str) -> None:
    raises_at(
        mutate("authenticationSettings.msiEndpoint", endpoint),
        "authenticationSettings.msiEndpoint",
        "http(s) URL with a host" if endpoint else "non-empty",
    )


def test_authentication_settings_inside_secrets_management_settings() -> None:
    doc = v3_doc()
    doc[SMS]["authenticationSettings"] = doc.pop("authenticationSettings")
    raises_at(doc, f"{SMS}.authenticationSettings", "top level")


def test_missing_secrets_management_settings() -> None:
    raises_at({"authenticationSettings": {}}, SMS, "required")
    raises_at({"observedCertificates": [URL1]}, SMS, "wrap the certificate settings")


@pytest.mark.parametrize("document", ["[1, 2]", '"just text"', "42", "null", [1], 3.5, None])
def test_top_level_not_an_object(document: Any) -> None:
    with pytest.raises(SettingsError, match="JSON object"):
        parse_settings(document)


@pytest.mark.parametrize(
    "value",
    [
        *("abc", "0", "-5", "1.5", "", "3600.0", "1e3", "\u0663"),
        *(0, -5, 1.5, True, False, 2**40, float("inf"), float("nan")),
        pytest.param("9" * 5000, id="5000-digit-string"),
        pytest.param(10**5000, id="5000-digit-int"),
    ],
)
def test_invalid_polling_interval(value: Any) -> None:
    raises_at(
        mutate(f"{SMS}.pollingIntervalInS", value),
        f"{SMS}.pollingIntervalInS",
        "whole number of seconds",
    )


@pytest.mark.parametrize(
    ("value", "right"),
    [
        ("localmachine", "LocalMachine"),
        ("LOCALMACHINE", "LocalMachine"),
        ("currentuser", "CurrentUser"),
        ("Local Machine", "LocalMachine"),
    ],
)
def test_store_location_wrong_case_suggests_spelling(value: str, right: str) -> None:
    error = raises_at(
        mutate(f"{OBS}[1].certificateStoreLocation", value),
        f"{OBS}[1].certificateStoreLocation",
        f"write {right!r}",
    )
    assert "case-sensitive" in str(error)


@pytest.mark.parametrize("value", ["Machine", "relative/dir", "C:certs", "My"])
def test_store_location_other_strings_list_what_is_accepted(value: str) -> None:
    error = raises_at(
        mutate(f"{SMS}.certificateStoreLocation", value),
        f"{SMS}.certificateStoreLocation",
        "'LocalMachine' or 'CurrentUser'",
    )
    assert "absolute directory path" in str(error)


def test_acl_needs_user_or_group() -> None:
    doc = mutate(f"{SMS}.aclEnabled", True)
    raises_at(mutate(f"{OBS}[2].acls", [{"user": "a"}, {}], doc), f"{OBS}[2].acls[1]", '"user"')


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("../etc/passwd", "starts with a letter or digit"),
        (".hidden", "starts with a letter or digit"),
        ("a" * 231, "1 to 230 letters"),
        ("web cert", "letters, digits, '.', '_' or '-'"),
        ("myvault.web." + "0" * 32, "ends like a certificate version file"),
    ],
)
def test_symlink_name_follows_the_stores_own_rules(name: str, hint: str) -> None:
    raises_at(
        mutate(f"{OBS}[2].customSymbolicLinkName", name),
        f"{OBS}[2].customSymbolicLinkName",
        hint,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_every_symlink_name_check_accepts_a_store_installs(tmp_path: Path) -> None:
    from kvcertsync.emulator import TestAuthority
    from kvcertsync.stores import PemDirectoryStore

    # What parsing accepts, the store installs: the rules are one.
    for name in ("a" * 230, "web_cert-2.pem", "0"):
        observed = ObservedCertificate.of(
            "https://vault.vault.azure.net/secrets/web", symlink_name=name
        )
        await PemDirectoryStore(tmp_path).install(
            observed, TestAuthority().issue(["web.example"]), "f" * 32
        )
        assert os.readlink(tmp_path / name) == f"vault.web.{'f' * 32}"


def test_syntax_error_reports_line_and_column() -> None:
    with pytest.raises(SettingsError, match=r"line 3, column 1"):
        parse_settings('{\n  "a": 1,\n}')


# --- load_settings -----------------------------------------------------------------------------


def test_load_settings_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(v3_doc(), indent=2), encoding="utf-8")
    assert load_settings(path) == V3_EXPECTED
    assert load_settings(str(path)) == V3_EXPECTED


def test_load_settings_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(SettingsError, match=re.escape(str(path))):
        load_settings(path)


def test_load_settings_directory(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read settings file"):
        load_settings(tmp_path)


def test_load_settings_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "secretsManagementSettings": {\n    "a": 1,\n  }\n}\n', encoding="utf-8")
    with pytest.raises(SettingsError) as info:
        load_settings(path)
    message = str(info.value)
    assert "line 4, column 3" in message
    assert str(path) in message


def test_load_settings_validation_error_keeps_path_and_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(mutate(f"{OBS}[2].url", 5)), encoding="utf-8")
    with pytest.raises(SettingsError, match=re.escape(f"{OBS}[2].url: expected")) as info:
        load_settings(path)
    assert info.value.path == f"{OBS}[2].url"
    assert str(path) in str(info.value)


# --- properties --------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
# Keys the parser knows, so random documents reach deep into the validation code.
known_keys = st.sampled_from(
    [
        SMS,
        "authenticationSettings",
        "loggingSettings",
        "runtimeSettings",
        "observedCertificates",
        "pollingIntervalInS",
        "certificateStoreLocation",
        "url",
        "acls",
        "msiEndpoint",
        "msiClientId",
    ]
)
schemaish_values = st.recursive(
    json_scalars | st.sampled_from([URL1, URL2, "LocalMachine", "/srv/certs", IMDS]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(known_keys | st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=25,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parses_or_settings_error(source: Any) -> None:
    try:
        result = parse_settings(source)
    except SettingsError:
        return
    assert isinstance(result, AgentSettings)


@FAST
@given(json_values | schemaish_values)
def test_any_json_value_parses_or_raises_settings_error(value: Any) -> None:
    parses_or_settings_error(value)
    parses_or_settings_error(json.dumps(value))


@FAST
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_any_text_or_bytes_parses_or_raises_settings_error(source: Any) -> None:
    parses_or_settings_error(source)


def paths_of(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += paths_of(value, (*prefix, index))
    return found


def linux_doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((EXAMPLES / "settings-linux.json").read_text("utf-8"))
    return doc


@FAST
@given(st.data(), st.sampled_from(["windows", "linux", "envelope"]), json_values | schemaish_values)
def test_mutated_valid_documents_parse_or_raise_settings_error(
    data: st.DataObject, kind: str, replacement: Any
) -> None:
    doc: Any = {"windows": v3_doc, "linux": linux_doc, "envelope": v3_doc}[kind]()
    if kind == "envelope":
        doc = {"runtimeSettings": [{"handlerSettings": {"publicSettings": doc}}]}
    path = data.draw(st.sampled_from(paths_of(doc)))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = replacement
    parses_or_settings_error(doc)
    parses_or_settings_error(json.dumps(doc))


names = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=20)
versions = st.none() | st.binary(min_size=16, max_size=16).map(bytes.hex)
vaults = st.text(string.ascii_lowercase, min_size=3, max_size=10)
uris = st.builds(
    lambda vault, name, version: SecretUri.parse(
        f"https://{vault}.vault.azure.net/secrets/{name}" + (f"/{version}" if version else "")
    ),
    vaults,
    names,
    versions,
)
texts = st.text(min_size=1, max_size=12).filter(lambda s: s.strip() != "")
locations = st.sampled_from(
    ["LocalMachine", "CurrentUser", LINUX_DEFAULT_STORE_DIRECTORY, "/srv/certs", "C:\\certs"]
)
acls = st.builds(Acl, st.none() | texts, texts) | st.builds(Acl, texts, st.none())
link_names = st.from_regex(LINK_NAME, fullmatch=True).filter(
    lambda name: not re.search(r"\.[0-9a-f]{32}$", name)
)
observed_certs = st.builds(
    ObservedCertificate,
    uris,
    store_name=st.sampled_from(["MY", "Root", "WebHosting"]) | texts,
    store_location=locations,
    key_exportable=st.booleans(),
    accounts=st.lists(texts, max_size=3).map(tuple),
    symlink_name=st.none() | link_names,
    acls=st.lists(acls, max_size=2).map(tuple),
    msi_client_id=st.none() | texts,
)
auth = st.sampled_from([(None, None), (IMDS, None), (IMDS, CLIENT_ID), ("https://h:8443/x", "id")])
logging_settings = st.none() | st.builds(
    LoggingSettings,
    logger=st.none() | st.just("fluentd"),
    endpoint=st.none() | st.just("tcp://localhost:24224"),
    format=st.none() | st.text(max_size=5),
    servicename=st.none() | texts,
)


def distinct_file_names(certs: list[ObservedCertificate]) -> bool:
    """No two certificates would share a file or link name in one location."""
    names = [
        (c.store_location, name.lower())
        for c in certs
        for name in (f"{c.uri.vault_name}.{c.uri.name}", c.symlink_name)
        if name
    ]
    return len(names) == len(set(names))


@st.composite
def agent_settings(draw: st.DrawFn) -> AgentSettings:
    observed = draw(
        st.lists(observed_certs, min_size=1, max_size=4, unique_by=lambda c: c.uri.key).filter(
            distinct_file_names
        )
    )
    endpoint, client_id = draw(auth)
    return AgentSettings(
        observed,
        polling_interval=draw(st.integers(min_value=1, max_value=2**31 - 1)),
        require_initial_sync=draw(st.booleans()),
        link_on_renewal=draw(st.booleans()),
        acl_enabled=draw(st.booleans()),
        msi_endpoint=endpoint,
        msi_client_id=client_id,
        store_name=draw(st.sampled_from(["MY", "CA"])),
        store_location=draw(locations),
        logging=draw(logging_settings),
    )


@FAST
@given(agent_settings())
def test_round_trip_through_to_dict_and_to_json(original: AgentSettings) -> None:
    assert parse_settings(original.to_dict()) == original
    assert parse_settings(original.to_json()) == original
    assert parse_settings(original.to_json(indent=None).encode("utf-16")) == original


def test_two_vaults_sharing_a_file_name_in_one_location_are_refused() -> None:
    document = {
        "secretsManagementSettings": {
            "observedCertificates": [
                {
                    "url": "https://shop.vault.azure.net/secrets/web",
                    "certificateStoreLocation": "/c",
                },
                {
                    "url": "https://shop.vault.azure.cn/secrets/web",
                    "certificateStoreLocation": "/c",
                },
            ]
        }
    }
    with pytest.raises(SettingsError, match=r"observedCertificates\[1\].*'shop.web'"):
        parse_settings(document)
    document["secretsManagementSettings"]["observedCertificates"][1]["certificateStoreLocation"] = (
        "/d"  # type: ignore[index]
    )
    assert len(parse_settings(document).observed) == 2


def test_custom_link_names_must_be_unique_per_location() -> None:
    document = {
        "secretsManagementSettings": {
            "observedCertificates": [
                {"url": "https://shop.vault.azure.net/secrets/a", "customSymbolicLinkName": "tls"},
                {"url": "https://shop.vault.azure.net/secrets/b", "customSymbolicLinkName": "TLS"},
            ]
        }
    }
    with pytest.raises(SettingsError, match="'tls'"):
        parse_settings(document)
