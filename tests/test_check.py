"""``kvcertsync check`` as an operator runs it before deploying to the real extension.

Every test runs the console script in a subprocess; the ``--probe`` tests run it against an
in-process emulator through ``--ca-file``/``--redirect``, as ``kvcertsync run`` is tested.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from kvcertsync.emulator import LocalKeyVault
from kvcertsync.settings import AgentSettings, ObservedCertificate, parse_settings
from kvcertsync.stores.pemdir import PemDirectoryStore

_SCRIPT = Path(sys.executable).with_name("kvcertsync")
KVCERTSYNC = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "kvcertsync"]
SMS = "secretsManagementSettings"
OBS = f"{SMS}.observedCertificates"
WEB = "https://demo.vault.azure.net/secrets/web"
VERSION = "0123456789abcdef0123456789abcdef"


def check(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KVCERTSYNC, "check", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        check=False,
    )


def document(directory: Path, **sms: Any) -> dict[str, Any]:
    """Settings every current extension version takes as they are: no warning at all."""
    return {
        SMS: {
            "pollingIntervalInS": "3600",
            "observedCertificates": [{"url": WEB, "certificateStoreLocation": str(directory)}],
            **sms,
        }
    }


def write(path: Path, doc: Any) -> Path:
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def check_json(*args: str, stdin: str | None = None) -> tuple[int, dict[str, Any]]:
    result = check(*args, "--json", stdin=stdin)
    return result.returncode, json.loads(result.stdout)


# --- what check verifies without a vault ---


def test_settings_every_extension_version_takes_pass_strict(tmp_path: Path) -> None:
    settings = write(tmp_path / "settings.json", document(tmp_path / "certs"))
    result = check(str(settings), "--strict")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"{settings}: valid\n")
    assert "warning" not in result.stdout


def _numeric_interval(doc: dict[str, Any]) -> None:
    doc[SMS]["pollingIntervalInS"] = 3600


def _short_interval(doc: dict[str, Any]) -> None:
    doc[SMS]["pollingIntervalInS"] = "60"


def _long_interval(doc: dict[str, Any]) -> None:
    doc[SMS]["pollingIntervalInS"] = "86400"


def _versioned_url(doc: dict[str, Any]) -> None:
    doc[SMS]["observedCertificates"][0]["url"] = f"{WEB}/{VERSION}"


def _logging_settings(doc: dict[str, Any]) -> None:
    doc["loggingSettings"] = {"logger": "fluentd", "endpoint": "tcp://localhost:24224"}


def _acl_enabled_in_a_certificate(doc: dict[str, Any]) -> None:
    doc[SMS]["observedCertificates"][0]["aclEnabled"] = True


def _acl_enabled_at_the_top(doc: dict[str, Any]) -> None:
    doc["aclEnabled"] = True


def _acl_user_missing(doc: dict[str, Any]) -> None:
    doc[SMS]["aclEnabled"] = True
    doc[SMS]["observedCertificates"][0]["acls"] = [{"user": "no-such-user-kvcertsync"}]


def _boolean_string(doc: dict[str, Any]) -> None:
    doc[SMS]["requireInitialSync"] = "true"


def _url_string(doc: dict[str, Any]) -> None:
    doc[SMS]["observedCertificates"] = [WEB]


def _custom_link(doc: dict[str, Any]) -> None:
    doc[SMS]["observedCertificates"][0]["customSymbolicLinkName"] = "web"


@pytest.mark.parametrize(
    ("change", "code", "path", "said"),
    [
        (_numeric_interval, "polling-interval-number", f"{SMS}.pollingIntervalInS", "not a string"),
        (_short_interval, "polling-interval-range", f"{SMS}.pollingIntervalInS", "every 300 s"),
        (_long_interval, "polling-interval-range", f"{SMS}.pollingIntervalInS", "every 3600 s"),
        (_versioned_url, "versioned-url", f"{OBS}[0].url", "refuses versioned URLs"),
        (_logging_settings, "logging-settings", "loggingSettings", "not honoured"),
        (
            _acl_enabled_in_a_certificate,
            "misplaced-key",
            f"{OBS}[0].aclEnabled",
            f"did you mean {SMS}.aclEnabled?",
        ),
        (_acl_enabled_at_the_top, "misplaced-key", "aclEnabled", f"did you mean {SMS}.aclEnabled?"),
        (
            _acl_user_missing,
            "acl-user-missing",
            f"{OBS}[0].acls[0].user",
            "user 'no-such-user-kvcertsync' does not exist on this machine",
        ),
        (_boolean_string, "boolean-string", f"{SMS}.requireInitialSync", "written as string"),
        (_url_string, "url-string-entry", f"{OBS}[0]", "no longer takes URL strings"),
        (
            _custom_link,
            "removed-in-extension-4",
            f"{OBS}[0].customSymbolicLinkName",
            "finds nothing",
        ),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_strict_fails_on_each_file_the_extension_treats_differently(
    tmp_path: Path, change: Any, code: str, path: str, said: str
) -> None:
    doc = document(tmp_path / "certs")
    change(doc)
    settings = write(tmp_path / "settings.json", doc)

    lenient = check(str(settings))
    assert lenient.returncode == 0, lenient.stderr
    assert said in lenient.stdout
    assert "Traceback" not in lenient.stderr

    strict = check(str(settings), "--strict")
    assert strict.returncode == 1
    assert "--strict" in strict.stderr

    status, report = check_json(str(settings), "--strict")
    assert status == 1
    assert report["valid"] is True and report["ok"] is False
    (warning,) = [w for w in report["warnings"] if w["code"] == code]
    assert warning["path"] == path
    assert said in " ".join(str(warning[k]) for k in ("message", "extension", "kvcertsync"))


def test_each_extension_difference_says_what_both_would_do(tmp_path: Path) -> None:
    doc = document(tmp_path / "certs")
    _numeric_interval(doc)
    settings = write(tmp_path / "settings.json", doc)
    out = check(str(settings)).stdout
    assert f"warning: {SMS}.pollingIntervalInS: a number (3600)" in out
    assert "    extension: fails to read the settings (not a string)" in out
    assert "    kvcertsync: accepts the number: polls every 3600 s" in out


def test_double_encoded_settings_are_read_and_warned_about(tmp_path: Path) -> None:
    text = json.dumps(json.dumps(document(tmp_path / "certs")))
    result = check("-", "--strict", stdin=text)
    assert result.returncode == 1
    assert "double-encoded" in result.stdout and "fails to read the settings" in result.stdout


def test_extension_version_keeps_only_the_differences_that_version_has(tmp_path: Path) -> None:
    doc = document(tmp_path / "certs")
    _custom_link(doc)
    _versioned_url(doc)
    settings = write(tmp_path / "settings.json", doc)
    assert check(str(settings), "--strict", "--extension-version", "4").returncode == 1
    # KeyVaultForLinux 3.0 has customSymbolicLinkName and pins versions, as kvcertsync does.
    assert check(str(settings), "--strict", "--extension-version", "3").returncode == 0
    # Objects need 3.0: the 1.0 / 2.0 extensions take URL strings only.
    _, report = check_json(str(settings), "--extension-version", "2")
    assert {w["code"] for w in report["warnings"]} == {"object-entry"}


def test_json_holds_the_normalised_settings_and_where_each_certificate_goes(
    tmp_path: Path,
) -> None:
    certs = tmp_path / "certs"
    doc = document(certs)
    doc[SMS]["observedCertificates"][0]["customSymbolicLinkName"] = "tls"
    doc[SMS]["observedCertificates"].append(
        {
            "url": "https://demo.vault.azure.net/secrets/api",
            "certificateStoreLocation": str(certs),
            "authenticationOverride": {"msiClientId": "11112222-bbbb-3333-cccc-4444dddd5555"},
        }
    )
    doc["authenticationSettings"] = {
        "msiEndpoint": "http://169.254.169.254/metadata/identity",
        "msiClientId": "00001111-aaaa-2222-bbbb-3333cccc4444",
    }
    settings = write(tmp_path / "settings.json", doc)
    status, report = check_json(str(settings))
    assert status == 0
    assert report["valid"] is True and report["ok"] is True and report["errors"] == []
    assert report["settings"] == _parse(doc).to_dict()
    first, second = report["certificates"]
    assert first["path"] == f"{OBS}[0]" and first["uri"] == WEB and first["version"] is None
    assert first["store"]["kind"] == "pem"
    assert first["store"]["files"] == f"{certs}/demo.web.<version>"
    assert first["store"]["link"] == f"{certs}/demo.web"
    assert first["store"]["configure"] == f"{certs}/tls"
    assert first["identity"] == {
        "kind": "user-assigned",
        "clientId": "00001111-aaaa-2222-bbbb-3333cccc4444",
        "from": "msiClientId",
        "endpoint": "http://169.254.169.254/metadata/identity",
    }
    assert second["identity"]["from"] == "authenticationOverride"
    codes = {w["code"]: w for w in report["warnings"]}
    assert codes["authentication-override"]["versions"] == [1, 2, 3]
    assert codes["removed-in-extension-4"]["kind"] == "extension"
    assert report["probe"] is None


def _parse(doc: dict[str, Any]) -> AgentSettings:
    return parse_settings(doc)


def test_json_reports_an_invalid_file_with_its_path_and_code(tmp_path: Path) -> None:
    doc = document(tmp_path / "certs")
    doc[SMS]["observedCertificates"][0]["url"] = "https://demo.vault.azure.net/certificates/web"
    settings = write(tmp_path / "settings.json", doc)
    status, report = check_json(str(settings))
    assert status == 1
    assert report["valid"] is False and report["settings"] is None
    (error,) = report["errors"]
    assert error["code"] == "keyless-url" and error["path"] == f"{OBS}[0].url"
    assert f"use '{WEB}'" in error["message"] and str(settings) in error["message"]

    status, report = check_json("-", stdin='{"secretsManagementSettings": ')
    assert status == 1 and report["errors"][0]["code"] == "json-syntax"
    assert "(in <stdin>)" in report["errors"][0]["message"]


def test_a_certificates_url_is_an_error_that_names_the_secret_url(tmp_path: Path) -> None:
    doc = document(tmp_path / "certs")
    doc[SMS]["observedCertificates"][0]["url"] = "https://demo.vault.azure.net/certificates/web"
    result = check(str(write(tmp_path / "settings.json", doc)))
    assert result.returncode == 1
    assert f"{OBS}[0].url" in result.stderr and f"use '{WEB}'" in result.stderr


def test_a_host_outside_azure_names_the_command_line_remedy(tmp_path: Path) -> None:
    doc = document(tmp_path / "certs")
    doc[SMS]["observedCertificates"][0]["url"] = "https://kv.example.test/secrets/web"
    settings = write(tmp_path / "settings.json", doc)
    refused = check(str(settings))
    assert refused.returncode == 1
    assert "--allow-any-host" in refused.stderr and "--redirect" in refused.stderr
    allowed = check(str(settings), "--allow-any-host")
    assert allowed.returncode == 0, allowed.stderr
    assert "kv.example.test is not an Azure Key Vault host" in allowed.stdout
    assert check(str(settings), "--allow-any-host", "--strict").returncode == 1


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    settings = write(tmp_path / "settings.json", document(tmp_path / "certs"))
    assert check(str(settings), "--ca-file", str(tmp_path / "none.pem")).returncode == 2
    assert check(str(settings), "--redirect", "nonsense").returncode == 2
    assert check(str(settings), "--store", "nowhere").returncode == 2


# --- name collisions: the hint given must be the change that fixes them ---


def _two_clouds(directory: Path) -> dict[str, Any]:
    return {
        SMS: {
            "pollingIntervalInS": "3600",
            "observedCertificates": [
                {
                    "url": "https://shop.vault.azure.net/secrets/web",
                    "certificateStoreLocation": str(directory),
                },
                {
                    "url": "https://shop.vault.azure.cn/secrets/web",
                    "certificateStoreLocation": str(directory),
                },
            ],
        }
    }


def test_the_collision_hint_is_the_change_that_fixes_it(tmp_path: Path) -> None:
    doc = _two_clouds(tmp_path / "certs")
    refused = check(str(write(tmp_path / "settings.json", doc)))
    assert refused.returncode == 1
    assert "would both be named 'shop.web'" in refused.stderr
    assert "give one of them its own certificateStoreLocation" in refused.stderr
    assert "a customSymbolicLinkName does not help" in refused.stderr

    # What the old message also suggested does not help: the files keep <vault>.<name>.
    linked = copy.deepcopy(doc)
    linked[SMS]["observedCertificates"][1]["customSymbolicLinkName"] = "web-cn"
    assert check(str(write(tmp_path / "linked.json", linked))).returncode == 1

    # The hint does.
    moved = copy.deepcopy(doc)
    moved[SMS]["observedCertificates"][1]["certificateStoreLocation"] = str(tmp_path / "cn")
    fixed = check(str(write(tmp_path / "moved.json", moved)), "--strict")
    assert fixed.returncode == 0, fixed.stderr
    assert f"{tmp_path / 'certs'}/shop.web.<version>" in fixed.stdout
    assert f"{tmp_path / 'cn'}/shop.web.<version>" in fixed.stdout


@pytest.mark.anyio
async def test_following_the_collision_hint_installs_both_certificates(tmp_path: Path) -> None:
    from kvcertsync.emulator.certs import TestAuthority

    authority = TestAuthority()
    store = PemDirectoryStore(tmp_path / "default")
    public = ObservedCertificate.of(
        "https://shop.vault.azure.net/secrets/web", store_location=str(tmp_path / "certs")
    )
    china = ObservedCertificate.of(
        "https://shop.vault.azure.cn/secrets/web", store_location=str(tmp_path / "cn")
    )
    materials = [authority.issue(["shop.example"]), authority.issue(["shop.example.cn"])]
    for cert, material, version in zip(
        (public, china), materials, ("a" * 32, "b" * 32), strict=True
    ):
        await store.install(cert, material, version)
    for cert, material in zip((public, china), materials, strict=True):
        installed = await store.installed(cert)
        assert installed is not None and installed.thumbprint == material.thumbprint
    assert (tmp_path / "certs" / "shop.web").resolve().name == "shop.web." + "a" * 32
    assert (tmp_path / "cn" / "shop.web").resolve().name == "shop.web." + "b" * 32


def test_a_secret_listed_with_and_without_a_version_gets_its_own_hint(tmp_path: Path) -> None:
    doc = document(tmp_path / "certs")
    doc[SMS]["observedCertificates"].append(
        {"url": f"{WEB}/{VERSION}", "certificateStoreLocation": str(tmp_path / "certs")}
    )
    refused = check(str(write(tmp_path / "settings.json", doc)))
    assert refused.returncode == 1
    assert f"both are {WEB}, once with a version: list the secret once" in refused.stderr
    doc[SMS]["observedCertificates"][1]["certificateStoreLocation"] = str(tmp_path / "pinned")
    assert check(str(write(tmp_path / "fixed.json", doc))).returncode == 0


def test_collisions_the_store_creates_are_found_too(tmp_path: Path) -> None:
    # LocalMachine certificates land in --store's directory on Linux, which the other names.
    doc = _two_clouds(tmp_path / "certs")
    doc[SMS]["observedCertificates"][0]["certificateStoreLocation"] = "LocalMachine"
    settings = write(tmp_path / "settings.json", doc)
    assert check(str(settings), "--store", f"pem:{tmp_path / 'other'}").returncode == 0
    clash = check(str(settings), "--store", f"pem:{tmp_path / 'certs'}")
    assert clash.returncode == 1
    assert "would both be named 'shop.web'" in clash.stderr
    status, report = check_json(str(settings), "--store", f"pem:{tmp_path / 'certs'}")
    assert status == 1 and report["valid"] is False
    assert report["errors"][0]["code"] == "name-collision"
    assert report["errors"][0]["path"] == f"{OBS}[1]"


# --- --probe against the emulator ---


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def kv() -> AsyncIterator[LocalKeyVault]:
    async with LocalKeyVault(client_ids={"00001111-aaaa-2222-bbbb-3333cccc4444"}) as vault:
        yield vault


def emulator_options(kv: LocalKeyVault) -> list[str]:
    ((pattern, target),) = kv.redirect.items()
    return ["--ca-file", kv.ca_file, "--redirect", f"{pattern}={target}"]


def probe_settings(kv: LocalKeyVault, directory: Path, urls: list[str], **auth: str) -> Any:
    return {
        SMS: {
            "pollingIntervalInS": "3600",
            "observedCertificates": [
                {"url": url, "certificateStoreLocation": str(directory)} for url in urls
            ],
        },
        "authenticationSettings": {"msiEndpoint": kv.imds_endpoint, **auth},
    }


async def run_check(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = await anyio.run_process(
        [*KVCERTSYNC, "check", *args], check=False, env={**os.environ, **(env or {})}
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@pytest.mark.anyio
async def test_probe_reports_a_good_one_a_403_and_a_404_in_words(
    kv: LocalKeyVault, tmp_path: Path
) -> None:
    web = kv.authority.issue(["web.example"])
    kv.import_certificate("demo", "web", web)
    kv.import_certificate("locked", "web", kv.authority.issue(["locked.example"]))
    kv.fail(status=403, inner_code="ForbiddenByRbac", times=None, vault="locked")
    urls = [
        WEB,
        "https://locked.vault.azure.net/secrets/web",
        "https://demo.vault.azure.net/secrets/gone",
    ]
    settings = write(tmp_path / "settings.json", probe_settings(kv, tmp_path / "certs", urls))

    status, out, err = await run_check(str(settings), "--probe", *emulator_options(kv))
    assert status == 1, out + err
    assert "probe: 3 certificates read, 2 failed" in out
    assert f"thumbprint: {web.thumbprint}" in out
    assert f"notAfter:   {web.not_after.isoformat()}" in out
    assert (
        "FAILED:     the VM's system-assigned identity may not read secrets in vault locked "
        "(403 ForbiddenByRbac)"
    ) in out
    assert "assign it the 'Key Vault Secrets User' role on the vault" in out
    assert "FAILED:     vault demo has no secret gone (404 SecretNotFound)" in out
    assert "Traceback" not in err
    assert not (tmp_path / "certs").exists()  # a probe installs nothing

    status, out, _ = await run_check(str(settings), "--probe", "--json", *emulator_options(kv))
    report = json.loads(out)
    assert status == 1 and report["valid"] is True and report["ok"] is False
    good, denied, missing = report["probe"]["results"]
    assert report["probe"]["failed"] == 2
    assert good["ok"] is True and good["thumbprint"] == web.thumbprint
    assert good["notAfter"] == web.not_after.isoformat()
    assert good["contentType"] == "application/x-pkcs12"
    assert good["version"] == kv.versions("demo", "web")[-1]
    assert denied["code"] == "forbidden-by-rbac" and denied["reachable"] is True
    assert missing["code"] == "secret-not-found" and missing["path"] == f"{OBS}[2]"


@pytest.mark.anyio
async def test_probe_passes_when_every_secret_reads_and_takes_the_environment(
    kv: LocalKeyVault, tmp_path: Path
) -> None:
    kv.import_certificate(
        "demo", "web", kv.authority.issue(["web.example"]), "application/x-pem-file"
    )
    settings = write(tmp_path / "settings.json", probe_settings(kv, tmp_path / "certs", [WEB]))
    ((pattern, target),) = kv.redirect.items()
    env = {"KVCERTSYNC_CA_FILE": kv.ca_file, "KVCERTSYNC_REDIRECT": f"{pattern}={target}"}
    status, out, err = await run_check(str(settings), "--probe", "--strict", env=env)
    assert status == 0, out + err
    assert "probe: 1 certificate read, 0 failed" in out
    assert "ok:         version" in out and "application/x-pem-file" in out


@pytest.mark.anyio
async def test_probe_says_when_an_access_policy_is_missing(
    kv: LocalKeyVault, tmp_path: Path
) -> None:
    kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    kv.fail(status=403, inner_code="ForbiddenByPolicy", times=None, vault="demo")
    settings = write(tmp_path / "settings.json", probe_settings(kv, tmp_path / "certs", [WEB]))
    status, out, _ = await run_check(str(settings), "--probe", *emulator_options(kv))
    assert status == 1
    assert "no access policy grants it Get on secrets (403 ForbiddenByPolicy)" in out
    assert "az keyvault set-policy --name demo --secret-permissions get" in out


@pytest.mark.anyio
async def test_probe_says_when_the_identity_is_not_on_this_machine(
    kv: LocalKeyVault, tmp_path: Path
) -> None:
    kv.import_certificate("demo", "web", kv.authority.issue(["web.example"]))
    unknown = "99998888-ffff-7777-eeee-6666dddd5555"
    settings = write(
        tmp_path / "settings.json",
        probe_settings(kv, tmp_path / "certs", [WEB], msiClientId=unknown),
    )
    status, out, _ = await run_check(str(settings), "--probe", "--json", *emulator_options(kv))
    assert status == 1
    (result,) = json.loads(out)["probe"]["results"]
    assert result["code"] == "identity-not-found" and result["reachable"] is False
    assert f"the managed identity {unknown} is not assigned to this machine" in result["error"]
    assert "400 Identity not found" in result["error"]
    assert "authenticationSettings.msiClientId" in result["advice"]


@pytest.mark.anyio
async def test_probe_says_when_the_vault_name_does_not_resolve(
    kv: LocalKeyVault, tmp_path: Path
) -> None:
    # .invalid never resolves (RFC 6761); the redirect covers *.vault.azure.net only.
    url = "https://nosuchvault.invalid/secrets/web"
    settings = write(tmp_path / "settings.json", probe_settings(kv, tmp_path / "certs", [url]))
    status, out, _ = await run_check(
        str(settings), "--probe", "--json", "--allow-any-host", *emulator_options(kv)
    )
    assert status == 1
    (result,) = json.loads(out)["probe"]["results"]
    assert result["code"] == "dns"
    assert result["error"] == "the vault's name nosuchvault.invalid does not resolve"


@pytest.mark.anyio
async def test_probe_shows_progress_on_many_urls(kv: LocalKeyVault, tmp_path: Path) -> None:
    material = kv.authority.issue(["many.example"])
    urls = []
    for number in range(40):
        kv.import_certificate("demo", f"cert-{number}", material)
        urls.append(f"https://demo.vault.azure.net/secrets/cert-{number}")
    settings = write(tmp_path / "settings.json", probe_settings(kv, tmp_path / "certs", urls))
    status, out, err = await run_check(
        str(settings), "--probe", "--progress", *emulator_options(kv)
    )
    assert status == 0, out + err
    assert "probe: 40 certificates read, 0 failed" in out
    assert "probe:" in err and "/40 [" in err  # tqdm's bar, on stderr
    assert out.count(f"thumbprint: {material.thumbprint}") == 40
