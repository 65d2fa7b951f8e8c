"""Fuzzing both parsers: whatever the input, only the library's own error escapes, and fast.

``parse_settings`` gets arbitrary JSON-ish documents (NaN, infinities, huge numbers, the whole key
vocabulary at every level, JSON hidden in strings as PowerShell writes it, the VM envelope), text
and bytes. ``CertificateMaterial.from_secret`` gets arbitrary bytes and text and mutated valid
PFX (kvcertsync's and openssl's, DER and base64) and PEM. Each case must end in a result or in
SettingsError / MaterialError within the deadline (a hang shows as a deadline failure).

CI runs ``KVCERTSYNC_FUZZ_EXAMPLES`` (default 200) examples per property. For a long run:

    KVCERTSYNC_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/test_fuzz.py -p no:cacheprovider

(``--hypothesis-seed=N`` replays one run; failures found are kept in ``.hypothesis/``.)
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvcertsync import settings as settings_module
from kvcertsync.emulator import TestAuthority
from kvcertsync.errors import MaterialError, SettingsError
from kvcertsync.material import CertificateMaterial
from kvcertsync.settings import AgentSettings, parse_settings

EXAMPLES = int(os.environ.get("KVCERTSYNC_FUZZ_EXAMPLES", "200"))
# Generous for a loaded CI machine: the point is that nothing hangs (a crafted PFX once did).
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONTENT_TYPES = [None, "application/x-pkcs12", "application/x-pem-file", "text/plain", ""]

# ---------------------------------------------------------------- settings

# Every key the parser knows, at every level, so random documents reach deep into validation.
VOCABULARY = sorted(
    {
        *settings_module._TOP_KEYS,
        *settings_module._SMS_KEYS,
        *settings_module._CERT_KEYS,
        *settings_module._ACL_KEYS,
        *settings_module._AUTH_KEYS,
        *settings_module._LOGGING_KEYS,
        "runtimeSettings",
        "handlerSettings",
        "publicSettings",
        "protectedSettings",
    }
)
TELLING_STRINGS = [
    "https://demo.vault.azure.net/secrets/web",
    "https://demo.vault.azure.net/secrets/web/0123456789abcdef0123456789abcdef",
    "https://demo.vault.azure.net/certificates/web",
    "https://demo.vault.azure.net:8443/secrets/web?x=1#y",
    "http://169.254.169.254/metadata/identity",
    "http:///metadata/identity",
    "http://localhost:40342/metadata/identity",
    "00001111-aaaa-2222-bbbb-3333cccc4444",
    "LocalMachine",
    "localmachine",
    "CurrentUser",
    "MY",
    "/srv/certs",
    "relative/dir",
    "..",
    "web-current",
    ".hidden",
    "x" * 300,
    "3600",
    "-1",
    "0",
    "1e309",
    "NaN",
    "Infinity",
    "true",
    "false",
    "",
    " ",
    "\x00",
    "\ud800",
    '{"secretsManagementSettings": {"observedCertificates": ["x"]}}',
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # unbounded: 10**400 overflows float()
    | st.floats()  # NaN and the infinities included
    | st.text(max_size=30)
    | st.sampled_from(TELLING_STRINGS)
)
keys = st.sampled_from(VOCABULARY) | st.text(max_size=8)
documents = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(keys, children, max_size=5)
        # PowerShell's habit: a whole object written as a JSON string.
        | st.dictionaries(keys, children, max_size=3).map(json.dumps)
    ),
    max_leaves=30,
)


def as_json(document: Any) -> str | None:
    """``document`` as JSON text, or None when JSON cannot say it (a lone surrogate)."""
    try:
        return json.dumps(document)  # NaN and the infinities as Python's json writes them
    except (ValueError, UnicodeEncodeError):
        return None


def settings_or_error(source: Any) -> None:
    """Parse ``source``: an AgentSettings, or SettingsError; anything else fails the test."""
    try:
        result = parse_settings(source)
    except SettingsError as error:
        assert str(error)  # a message, always
        return
    assert isinstance(result, AgentSettings)
    assert math.isfinite(result.polling_interval) and result.polling_interval > 0
    assert result.observed


def valid_document(data: st.DataObject) -> dict[str, Any]:
    """A small valid document, optionally inside the VM envelope."""
    certificate: dict[str, Any] = {"url": "https://demo.vault.azure.net/secrets/web"}
    for key in data.draw(st.sets(st.sampled_from(settings_module._CERT_KEYS[1:]), max_size=3)):
        certificate[key] = data.draw(documents)
    document: dict[str, Any] = {
        "secretsManagementSettings": {
            "pollingIntervalInS": "3600",
            "observedCertificates": [certificate],
        }
    }
    if data.draw(st.booleans()):
        document = {"runtimeSettings": [{"handlerSettings": {"publicSettings": document}}]}
    return document


@FUZZ
@given(st.dictionaries(keys, documents, max_size=5))
def test_settings_any_document(document: dict[str, Any]) -> None:
    settings_or_error(document)
    text = as_json(document)
    if text is not None:
        settings_or_error(text)


@FUZZ
@given(st.data())
def test_settings_a_valid_document_with_fields_replaced(data: st.DataObject) -> None:
    document = valid_document(data)
    settings_or_error(document)
    text = as_json(document)
    if text is not None:
        settings_or_error(text)


@FUZZ
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_settings_any_text_or_bytes(source: str | bytes) -> None:
    settings_or_error(source)


@FUZZ
@given(
    st.dictionaries(keys, documents, max_size=4),
    st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-32"]),
    st.integers(min_value=0, max_value=2),
)
def test_settings_documents_encoded_and_quoted(
    document: dict[str, Any], encoding: str, quoted: int
) -> None:
    text = as_json(document)
    if text is None:
        return
    for _ in range(quoted):
        text = json.dumps(text)  # JSON inside a JSON string, as PowerShell escapes it
    settings_or_error(text.encode(encoding, "surrogatepass"))


# ---------------------------------------------------------------- material

AUTHORITY = TestAuthority()
RSA = AUTHORITY.issue(["rsa.example"], key="rsa")  # an RSA read takes ~50 ms: used sparingly
EC = AUTHORITY.issue(["ec.example"])
OTHER_EC = AUTHORITY.issue(["other.example"], include_root=True)


def openssl_pfx(material: CertificateMaterial, directory: Path) -> bytes | None:
    """A PFX as Key Vault and openssl write one (encrypted bags, empty password), or None."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    (directory / "key.pem").write_bytes(material.key_pem())
    (directory / "cert.pem").write_bytes(material.fullchain_pem())
    out = directory / "bundle.pfx"
    command = [openssl, "pkcs12", "-export", "-passout", "pass:", "-out", str(out)]
    command += ["-inkey", str(directory / "key.pem"), "-in", str(directory / "cert.pem")]
    subprocess.run(command, check=True, capture_output=True)
    return out.read_bytes()


@pytest.fixture(scope="module")
def pfx_samples(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    samples = [RSA.to_pkcs12(), EC.to_pkcs12(), EC.to_pkcs12(password=b"s3cret")]
    from_openssl = openssl_pfx(RSA, tmp_path_factory.mktemp("pfx"))
    if from_openssl is not None:
        samples.append(from_openssl)
    for sample in samples[:2]:
        CertificateMaterial.from_secret(sample)  # the unmutated ones read
    return samples


PEM_SAMPLES = [
    RSA.to_pem_bundle().decode(),
    (EC.key_pem() + EC.fullchain_pem()).decode(),  # key first, as Key Vault writes it
    (EC.chain_pem() + EC.key_pem() + EC.cert_pem()).decode(),  # any order
]
edits = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "cut", "repeat"]),
        st.integers(min_value=0, max_value=1 << 16),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, operations: list[tuple[str, int, int]]) -> bytes:
    """``data`` with each edit applied at a position taken modulo its length."""
    out = bytearray(data)
    for operation, where, value in operations:
        if not out:
            break
        at = where % len(out)
        if operation == "flip":
            out[at] ^= 1 << (value % 8)
        elif operation == "set":
            out[at] = value
        elif operation == "insert":
            out[at:at] = bytes([value])
        elif operation == "delete":
            del out[at : at + 1 + value % 8]
        elif operation == "cut":
            del out[at:]
        else:
            out[at:at] = out[at : at + 1 + value]
    return bytes(out)


def material_or_error(value: str | bytes, content_type: str | None) -> None:
    """Read ``value``: a CertificateMaterial, or MaterialError; anything else fails the test."""
    try:
        material = CertificateMaterial.from_secret(value, content_type)
    except MaterialError as error:
        assert str(error)
        return
    assert re.fullmatch(r"[0-9A-F]{40}", material.thumbprint)
    material.to_pem_bundle()  # what a store writes can be written


@FUZZ
@given(st.binary(max_size=2000) | st.text(max_size=2000), st.sampled_from(CONTENT_TYPES))
def test_material_any_bytes_or_text(value: str | bytes, content_type: str | None) -> None:
    material_or_error(value, content_type)


@FUZZ
@given(st.data(), edits, st.booleans(), st.sampled_from(CONTENT_TYPES))
def test_material_a_mutated_pfx(
    pfx_samples: list[bytes],
    data: st.DataObject,
    operations: list[tuple[str, int, int]],
    as_base64: bool,
    content_type: str | None,
) -> None:
    pfx = mutate(data.draw(st.sampled_from(pfx_samples)), operations)
    material_or_error(base64.b64encode(pfx).decode() if as_base64 else pfx, content_type)


@FUZZ
@given(st.sampled_from(PEM_SAMPLES), edits, st.sampled_from(CONTENT_TYPES))
def test_material_a_mutated_pem(
    pem: str, operations: list[tuple[str, int, int]], content_type: str | None
) -> None:
    mutated = mutate(pem.encode(), operations)
    material_or_error(mutated, content_type)
    material_or_error(mutated.decode("utf-8", "replace"), content_type)


EC_PEM_SAMPLES = [PEM_SAMPLES[1], PEM_SAMPLES[2], OTHER_EC.to_pem_bundle().decode()]


@FUZZ
@given(
    st.lists(st.sampled_from(EC_PEM_SAMPLES).map(lambda p: p.split("\n-----END ")), max_size=4),
    st.sampled_from(CONTENT_TYPES),
)
def test_material_pem_blocks_shuffled_and_doubled(
    pieces: list[list[str]], content_type: str | None
) -> None:
    # Blocks of several secrets glued together: keys that match no certificate, duplicates.
    text = "\n-----END ".join(part for parts in pieces for part in parts)
    material_or_error(text, content_type)


def damaged(der: bytes, damage: str) -> bytes:
    """A certificate's DER with its version made 9, or its subject's text made invalid UTF-8."""
    if damage == "version":
        at = der.index(bytes.fromhex("a003020102"))  # [0] EXPLICIT INTEGER 2 (v3)
        return der[: at + 4] + b"\x09" + der[at + 5 :]
    word = b"intermediate"  # inside a UTF8String of the intermediate's subject
    at = der.index(word)
    return der[:at] + b"\xff" * len(word) + der[at + len(word) :]


@pytest.mark.parametrize("damage", ["version", "subject"])
def test_material_a_certificate_whose_fields_do_not_parse(damage: str) -> None:
    # Found by this module's fuzzing: cryptography raises InvalidVersion (not a ValueError)
    # when loading, and parses names lazily (ValueError on first .subject).
    intermediate = EC.chain[0].public_bytes(serialization.Encoding.DER)
    block = base64.encodebytes(damaged(intermediate, damage)).decode()
    pem = f"{EC.key_pem().decode()}{EC.cert_pem().decode()}"
    pem += f"-----BEGIN CERTIFICATE-----\n{block}-----END CERTIFICATE-----\n"
    with pytest.raises(MaterialError):
        CertificateMaterial.from_secret(pem)
