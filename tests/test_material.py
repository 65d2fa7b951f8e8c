"""CertificateMaterial: reading PKCS#12 and PEM secrets, chain order, fingerprints, re-encoding."""

from __future__ import annotations

import base64
import datetime as dt
import gc
import hashlib
import pickle
import re
from collections.abc import Iterator
from copy import copy as shallow_copy
from copy import deepcopy
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from kvcertsync.errors import MaterialError
from kvcertsync.material import CertificateMaterial
from tests.certs import (
    CertificateAuthority,
    ChainFiles,
    fingerprint_sha1,
    make_self_signed,
    openssl,
)

PKCS12 = "application/x-pkcs12"
PEM = "application/x-pem-file"


def load_cert(pem: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem)


def expected_chain(chain: ChainFiles) -> tuple[x509.Certificate, ...]:
    return tuple(load_cert(pem) for pem in chain.chain_pems)


def assert_material(material: CertificateMaterial, chain: ChainFiles) -> None:
    assert material.certificate == load_cert(chain.leaf_pem)
    assert material.chain == expected_chain(chain)
    assert material.thumbprint == chain.sha1_fingerprint()
    assert material.dns_names == chain.dns_names
    # The library already validated this key; checking it again here would only cost time.
    expected_key = serialization.load_pem_private_key(
        chain.key_pem, None, unsafe_skip_rsa_key_validation=True
    )
    assert material.key_pem() == expected_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def material_error(value: str | bytes, content_type: str | None = None) -> MaterialError:
    with pytest.raises(MaterialError) as info:
        CertificateMaterial.from_secret(value, content_type)
    return info.value


def pem_body(pem: bytes | str) -> str:
    """The base64 body of the first PEM block, without line breaks."""
    text = pem.decode() if isinstance(pem, bytes) else pem
    match = re.search(r"-----BEGIN [A-Z0-9 ]+-----(.*?)-----END", text, re.DOTALL)
    assert match is not None
    return "".join(match.group(1).split())


def slices(text: str, width: int = 16) -> Iterator[str]:
    """Overlapping-enough 16-character windows over ``text`` (every 8th offset)."""
    for start in range(0, max(1, len(text) - width), 8):
        yield text[start : start + width]


def assert_reveals_nothing(exc: BaseException, *secrets: str) -> None:
    shown = [str(exc), repr(exc), *map(str, exc.args)]
    for secret in secrets:
        for piece in slices(secret):
            for text in shown:
                assert piece not in text
    # Chained exceptions would carry cryptography's own view of the data: there must be none.
    assert exc.__cause__ is None
    assert exc.__context__ is None
    assert exc.__suppress_context__


# --------------------------------------------------------------------------- PKCS#12


@pytest.mark.parametrize("mode", ["modern", "legacy", "none"])
def test_reads_base64_pfx(rsa_chain: ChainFiles, mode: str) -> None:
    value = rsa_chain.pfx_base64(mode=mode)  # type: ignore[arg-type]
    material = CertificateMaterial.from_secret(value, PKCS12)
    assert_material(material, rsa_chain)
    assert isinstance(material.private_key, rsa.RSAPrivateKey)


def test_reads_ec_pfx(ec_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(ec_chain.pfx_base64(), PKCS12)
    assert_material(material, ec_chain)
    assert isinstance(material.private_key, ec.EllipticCurvePrivateKey)


def test_reads_legacy_ec_pfx(ec_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(ec_chain.pfx_base64(mode="legacy"))
    assert_material(material, ec_chain)


def test_reads_raw_der_pfx_bytes(rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pfx(), PKCS12)
    assert_material(material, rsa_chain)


def test_reads_base64_pfx_given_as_bytes(rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pfx_base64().encode(), PKCS12)
    assert_material(material, rsa_chain)


def test_reads_line_wrapped_base64(rsa_chain: ChainFiles) -> None:
    value = rsa_chain.pfx_base64()
    wrapped = "\r\n".join(value[i : i + 64] for i in range(0, len(value), 64)) + "\n"
    assert_material(CertificateMaterial.from_secret(wrapped, PKCS12), rsa_chain)


def test_reads_urlsafe_base64(rsa_chain: ChainFiles) -> None:
    value = base64.urlsafe_b64encode(rsa_chain.pfx()).decode().rstrip("=")
    assert_material(CertificateMaterial.from_secret(value, PKCS12), rsa_chain)


def test_pfx_without_chain_has_empty_chain(rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pfx_base64(include_chain=False))
    assert material.certificate == load_cert(rsa_chain.leaf_pem)
    assert material.chain == ()
    assert material.chain_pem() == b""


def test_pfx_friendly_name_does_not_matter(rsa_chain: ChainFiles) -> None:
    der = rsa_chain.pfx(friendly_name="My Cert")
    assert_material(CertificateMaterial.from_secret(der), rsa_chain)


# --------------------------------------------------------------------------- PEM


@pytest.mark.parametrize("chain_name", ["rsa_chain", "ec_chain"])
@pytest.mark.parametrize("key_format", ["pkcs8", "traditional"])
@pytest.mark.parametrize("key_position", ["first", "middle", "last"])
def test_reads_pem_in_any_order(
    request: pytest.FixtureRequest, chain_name: str, key_format: str, key_position: str
) -> None:
    chain: ChainFiles = request.getfixturevalue(chain_name)
    value = chain.pem_secret(key_position=key_position, key_format=key_format)  # type: ignore[arg-type]
    label = "PRIVATE KEY" if key_format == "pkcs8" else f"{chain.key_type.upper()} PRIVATE KEY"
    assert f"-----BEGIN {label}-----" in value
    assert_material(CertificateMaterial.from_secret(value, PEM), chain)


@pytest.mark.parametrize("seed", range(4))
def test_reads_pem_with_shuffled_certificates(rsa_chain: ChainFiles, seed: int) -> None:
    value = rsa_chain.pem_secret(shuffle=seed, key_position="middle")
    assert_material(CertificateMaterial.from_secret(value, PEM), rsa_chain)


def test_reads_pem_bytes_with_crlf(rsa_chain: ChainFiles) -> None:
    value = rsa_chain.pem_secret().replace("\n", "\r\n").encode()
    assert_material(CertificateMaterial.from_secret(value), rsa_chain)


def test_pem_ignores_unrelated_blocks(ec_chain: ChainFiles) -> None:
    params = openssl("ecparam", "-name", "prime256v1").decode()
    value = params + ec_chain.pem_secret()
    assert_material(CertificateMaterial.from_secret(value, PEM), ec_chain)


def test_pem_accepts_the_same_key_twice(rsa_chain: ChainFiles) -> None:
    value = rsa_chain.pem_secret() + rsa_chain.traditional_key_pem().decode()
    assert_material(CertificateMaterial.from_secret(value, PEM), rsa_chain)


def test_pem_accepts_trusted_certificate_blocks(rsa_chain: ChainFiles) -> None:
    trusted = openssl(
        "x509", "-in", rsa_chain.chain_paths[0], "-trustout", "-addtrust", "serverAuth"
    )
    assert b"BEGIN TRUSTED CERTIFICATE" in trusted
    value = (rsa_chain.leaf_pem + trusted + rsa_chain.key_pem).decode()
    material = CertificateMaterial.from_secret(value, PEM)
    assert material.chain == expected_chain(rsa_chain)[:1]


def test_reads_ed25519(tmp_path: Path) -> None:
    key = tmp_path / "ed.key"
    openssl("genpkey", "-algorithm", "ED25519", "-out", key)
    chain = make_self_signed(tmp_path, key_path=key, dns_names=["ed.example.com"])
    material = CertificateMaterial.from_secret(chain.pem_secret())
    assert isinstance(material.private_key, ed25519.Ed25519PrivateKey)
    assert material.thumbprint == chain.sha1_fingerprint()
    reread = CertificateMaterial.from_secret(material.to_pkcs12())
    assert reread == material


# --------------------------------------------------------------------------- sniffing


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        PKCS12,
        PEM,
        "APPLICATION/X-PKCS12",
        "application/x-pem-file; charset=utf-8",
        "text/plain",
    ],
)
def test_content_decides_not_content_type(rsa_chain: ChainFiles, content_type: str | None) -> None:
    from_pfx = CertificateMaterial.from_secret(rsa_chain.pfx_base64(), content_type)
    from_pem = CertificateMaterial.from_secret(rsa_chain.pem_secret(), content_type)
    assert_material(from_pfx, rsa_chain)
    assert_material(from_pem, rsa_chain)


def test_base64_wrapped_pem_is_read(rsa_chain: ChainFiles) -> None:
    value = base64.b64encode(rsa_chain.pem_secret().encode()).decode()
    assert_material(CertificateMaterial.from_secret(value, PKCS12), rsa_chain)


# --------------------------------------------------------------------------- leaf and chain


def test_leaf_found_by_key_not_position(rsa_chain: ChainFiles) -> None:
    root, intermediate = rsa_chain.chain_pems[1], rsa_chain.chain_pems[0]
    value = (root + rsa_chain.key_pem + intermediate + rsa_chain.leaf_pem).decode()
    material = CertificateMaterial.from_secret(value)
    assert material.certificate == load_cert(rsa_chain.leaf_pem)
    assert material.chain == expected_chain(rsa_chain)


def test_duplicates_are_dropped(rsa_chain: ChainFiles) -> None:
    leaf, (intermediate, root) = rsa_chain.leaf_pem, rsa_chain.chain_pems
    value = (root + leaf + intermediate + root + leaf + intermediate + rsa_chain.key_pem).decode()
    material = CertificateMaterial.from_secret(value)
    assert material.chain == expected_chain(rsa_chain)


def test_a_certificate_with_a_duplicated_extension_is_read_as_having_none(
    rsa_chain: ChainFiles,
) -> None:
    # Its subject key identifier turned into a second basicConstraints (found by the fuzzer: a
    # flipped bit). cryptography then refuses every extension of it with DuplicateExtension.
    der = load_cert(rsa_chain.chain_pems[0]).public_bytes(serialization.Encoding.DER)
    ski, constraints = bytes.fromhex("0603551d0e"), bytes.fromhex("0603551d13")
    assert der.count(ski) == 1 and der.count(constraints) == 1
    tampered = x509.load_der_x509_certificate(der.replace(ski, constraints))
    with pytest.raises(x509.DuplicateExtension):
        tampered.extensions  # noqa: B018 - parsed on access
    intermediate = tampered.public_bytes(serialization.Encoding.PEM)
    value = rsa_chain.leaf_pem + intermediate + rsa_chain.chain_pems[1] + rsa_chain.key_pem
    material = CertificateMaterial.from_secret(value.decode())
    assert material.certificate == load_cert(rsa_chain.leaf_pem)
    assert material.chain == (tampered, load_cert(rsa_chain.chain_pems[1]))


def test_unrelated_certificates_go_last_in_given_order(
    rsa_chain: ChainFiles, ec_chain: ChainFiles
) -> None:
    ec_root, ec_intermediate = ec_chain.chain_pems[1], ec_chain.chain_pems[0]
    value = rsa_chain.pem_secret(extra=[ec_root, ec_intermediate], shuffle=None)
    shuffled = (
        ec_root + rsa_chain.chain_pems[1] + ec_intermediate + rsa_chain.leaf_pem
        + rsa_chain.chain_pems[0] + rsa_chain.key_pem
    ).decode()  # fmt: skip
    for secret in (value, shuffled):
        material = CertificateMaterial.from_secret(secret)
        assert material.chain == (
            *expected_chain(rsa_chain),
            load_cert(ec_root),
            load_cert(ec_intermediate),
        )


def test_chain_stops_where_the_links_stop(rsa_chain: ChainFiles) -> None:
    # Without the intermediate the root cannot be linked: it is kept, as a fallback, after.
    value = (rsa_chain.chain_pems[1] + rsa_chain.leaf_pem + rsa_chain.key_pem).decode()
    material = CertificateMaterial.from_secret(value)
    assert material.chain == (load_cert(rsa_chain.chain_pems[1]),)


def test_issuer_with_matching_key_identifier_wins(
    rsa_chain: ChainFiles, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Same CA names, different keys: only the key identifiers tell the two intermediates apart.
    lookalike = CertificateAuthority.create(tmp_path_factory.mktemp("lookalike"), key="ec")
    impostor = lookalike.intermediate_cert_path.read_bytes()
    assert load_cert(impostor).subject == load_cert(rsa_chain.chain_pems[0]).subject
    value = (impostor + rsa_chain.chain_pem + rsa_chain.leaf_pem + rsa_chain.key_pem).decode()
    material = CertificateMaterial.from_secret(value)
    assert material.chain == (*expected_chain(rsa_chain), load_cert(impostor))


def test_non_ca_certificate_preferred_as_leaf(tmp_path: Path, rsa_chain: ChainFiles) -> None:
    # A CA certificate minted with the leaf's own key, listed first, must not become the leaf.
    twin = make_self_signed(
        tmp_path, key_path=rsa_chain.leaf_key_path, ca=True, common_name="Twin CA", dns_names=[]
    )
    value = twin.leaf_pem + rsa_chain.pem_secret().encode()
    material = CertificateMaterial.from_secret(value)
    assert material.certificate == load_cert(rsa_chain.leaf_pem)
    assert material.chain == (*expected_chain(rsa_chain), load_cert(twin.leaf_pem))


def test_self_signed_leaf_has_empty_chain(self_signed_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(self_signed_chain.pfx_base64())
    assert material.chain == ()
    assert material.is_self_signed
    assert material.subject == material.issuer == "CN=self.example.com"
    assert material.fullchain_pem() == material.cert_pem()


# --------------------------------------------------------------------------- facts


def test_facts_match_openssl(rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pfx_base64())
    assert material.thumbprint == fingerprint_sha1(material.cert_pem())
    assert re.fullmatch(r"[0-9A-F]{40}", material.thumbprint)
    sha256 = openssl("x509", "-noout", "-fingerprint", "-sha256", stdin=material.cert_pem())
    assert material.sha256 == sha256.decode().split("=", 1)[1].strip().replace(":", "")
    serial = openssl("x509", "-noout", "-serial", "-in", rsa_chain.leaf_cert_path)
    assert material.serial_number == int(serial.decode().split("=", 1)[1], 16)
    assert material.subject == "CN=www.example.com"
    assert material.issuer == "CN=kvcertsync Test Intermediate CA,O=kvcertsync Test"
    assert material.common_name == "www.example.com"
    assert material.dns_names == ("www.example.com", "example.com")
    assert not material.is_self_signed


def test_validity_is_utc_aware(tmp_path: Path, rsa_ca: CertificateAuthority) -> None:
    start = dt.datetime(2020, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    end = dt.datetime(2021, 6, 7, 8, 9, 10, tzinfo=dt.UTC)
    chain = rsa_ca.issue(["old.example.com"], not_before=start, not_after=end)
    material = CertificateMaterial.from_secret(chain.pem_secret())
    assert material.not_before == start
    assert material.not_after == end
    assert material.not_after.utcoffset() == dt.timedelta(0)
    assert "not_after=2021-06-07T08:09:10Z" in repr(material)


def test_no_san_gives_no_dns_names(tmp_path: Path) -> None:
    chain = make_self_signed(tmp_path, key="ec", dns_names=[], common_name="bare")
    material = CertificateMaterial.from_secret(chain.pem_secret())
    assert material.dns_names == ()


def test_repr_is_short_and_keyless(rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pfx_base64())
    text = repr(material)
    assert text.startswith("<CertificateMaterial CN=www.example.com thumbprint=")
    assert material.thumbprint in text
    for piece in slices(pem_body(material.key_pem())):
        assert piece not in text
    for piece in slices(rsa_chain.pfx_base64()):
        assert piece not in text


def test_equality_ignores_key_object_identity(rsa_chain: ChainFiles) -> None:
    from_pfx = CertificateMaterial.from_secret(rsa_chain.pfx_base64())
    from_pem = CertificateMaterial.from_secret(rsa_chain.pem_secret())
    assert from_pfx == from_pem
    assert hash(from_pfx) == hash(from_pem)


def test_direct_construction_checks_the_key(
    rsa_chain: ChainFiles, other_rsa_chain: ChainFiles
) -> None:
    other_key = serialization.load_pem_private_key(other_rsa_chain.key_pem, None)
    assert isinstance(other_key, rsa.RSAPrivateKey)
    with pytest.raises(MaterialError, match="does not belong"):
        CertificateMaterial(private_key=other_key, certificate=load_cert(rsa_chain.leaf_pem))


def test_from_key_and_certificates(rsa_chain: ChainFiles) -> None:
    key = serialization.load_pem_private_key(rsa_chain.key_pem, None)
    certs = [load_cert(pem) for pem in (*reversed(rsa_chain.chain_pems), rsa_chain.leaf_pem)]
    material = CertificateMaterial.from_key_and_certificates(key, certs)
    assert_material(material, rsa_chain)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("chain_name", ["rsa_chain", "ec_chain"])
def test_round_trips(request: pytest.FixtureRequest, chain_name: str) -> None:
    chain: ChainFiles = request.getfixturevalue(chain_name)
    original = CertificateMaterial.from_secret(chain.pem_secret(shuffle=1), PEM)
    via_pfx = CertificateMaterial.from_secret(base64.b64encode(original.to_pkcs12()).decode())
    via_pem = CertificateMaterial.from_secret(original.fullchain_pem() + original.key_pem())
    via_bundle = CertificateMaterial.from_secret(original.to_pem_bundle())
    for copy in (via_pfx, via_pem, via_bundle):
        assert copy == original
        assert copy.thumbprint == original.thumbprint
        assert copy.chain == original.chain
        assert copy.key_pem() == original.key_pem()


def test_outputs_are_well_formed(rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pfx_base64())
    assert material.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert material.cert_pem() == rsa_chain.leaf_pem
    assert material.chain_pem() == rsa_chain.chain_pem
    assert material.fullchain_pem() == rsa_chain.fullchain_pem
    bundle = material.to_pem_bundle()
    assert bundle == rsa_chain.fullchain_pem + material.key_pem()


def test_openssl_verifies_our_pem_output(tmp_path: Path, rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pem_secret(shuffle=4))
    cert, chain = tmp_path / "cert.pem", tmp_path / "chain.pem"
    cert.write_bytes(material.cert_pem())
    chain.write_bytes(material.chain_pem())
    out = openssl("verify", "-CAfile", rsa_chain.root_cert_path, "-untrusted", chain, cert)
    assert out.strip().endswith(b": OK")


@pytest.mark.parametrize("password", [None, b"", b"s3cret"])
def test_openssl_reads_our_pfx(
    tmp_path: Path, rsa_chain: ChainFiles, password: bytes | None
) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pem_secret())
    pfx = tmp_path / "our.pfx"
    pfx.write_bytes(material.to_pkcs12(password, friendly_name=b"web cert"))
    passin = f"pass:{(password or b'').decode()}"
    out = openssl("pkcs12", "-in", pfx, "-nodes", "-passin", passin).decode()
    assert out.count("BEGIN CERTIFICATE") == 3
    assert "BEGIN PRIVATE KEY" in out
    assert "friendlyName: web cert" in out
    if password:
        with pytest.raises(RuntimeError, match="pkcs12"):
            openssl("pkcs12", "-in", pfx, "-nodes", "-passin", "pass:wrong")


def test_our_password_pfx_is_refused_without_password(rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pem_secret())
    exc = material_error(base64.b64encode(material.to_pkcs12(b"s3cret")).decode())
    assert "password" in str(exc)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", ["", b"", "   \n", b"\r\n"])
def test_empty_value(value: str | bytes) -> None:
    assert "empty" in str(material_error(value, PKCS12))


@pytest.mark.parametrize("value", ["this is not base64!", "MIIK€xyz", '{"json": true}'])
def test_not_base64(value: str) -> None:
    exc = material_error(value, PKCS12)
    assert "neither PEM nor base64" in str(exc)
    assert_reveals_nothing(exc, value)


def test_misplaced_padding_is_not_base64() -> None:
    assert "not valid base64" in str(material_error("MIIK=abc", PKCS12))


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.9])
def test_truncated_base64_pfx(rsa_chain: ChainFiles, fraction: float) -> None:
    value = rsa_chain.pfx_base64()
    cut = value[: int(len(value) * fraction)]
    exc = material_error(cut, PKCS12)
    assert "truncated" in str(exc)
    assert_reveals_nothing(exc, cut)


def test_truncated_der_pfx(rsa_chain: ChainFiles) -> None:
    der = rsa_chain.pfx()
    exc = material_error(der[:-100])
    assert "truncated" in str(exc)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda der: b"\x31" + der[1:], id="wrong-outer-tag"),
        pytest.param(lambda der: der[:7] + b"\x04" + der[8:], id="auth-safe-tag"),
        pytest.param(lambda der: der[:4] + b"\x04" + der[5:], id="version-tag"),
        pytest.param(lambda der: b"\x30\x80" + der[4:], id="indefinite-length-no-end"),
        pytest.param(lambda der: b"\x30\x03\x02\x01\x03", id="version-only"),
        pytest.param(lambda der: bytes(range(256)) * 4, id="random-bytes"),
    ],
)
def test_corrupt_pfx(rsa_chain: ChainFiles, damage: object) -> None:
    der = damage(rsa_chain.pfx())  # type: ignore[operator]
    value = base64.b64encode(der).decode()
    exc = material_error(value, PKCS12)
    assert "corrupt" in str(exc)
    assert_reveals_nothing(exc, value)


def test_damage_inside_pfx_is_an_error(rsa_chain: ChainFiles) -> None:
    der = bytearray(rsa_chain.pfx())
    for offset in range(200, len(der) - 200, 97):
        der[offset] ^= 0xFF
    value = base64.b64encode(bytes(der)).decode()
    assert_reveals_nothing(material_error(value, PKCS12), value)


@pytest.mark.parametrize("mode", ["modern", "legacy"])
def test_password_protected_pfx(rsa_chain: ChainFiles, mode: str) -> None:
    value = rsa_chain.pfx_base64("hunter2", mode=mode)  # type: ignore[arg-type]
    exc = material_error(value, PKCS12)
    assert "protected by a password" in str(exc)
    assert "hunter2" not in str(exc)
    assert_reveals_nothing(exc, value)


def test_pfx_without_private_key(rsa_chain: ChainFiles) -> None:
    value = base64.b64encode(rsa_chain.pfx_without_key()).decode()
    assert "no private key" in str(material_error(value, PKCS12))


def test_pem_without_key(rsa_chain: ChainFiles) -> None:
    exc = material_error(rsa_chain.fullchain_pem.decode(), PEM)
    assert "no private key" in str(exc)


def test_pem_without_certificate(rsa_chain: ChainFiles) -> None:
    exc = material_error(rsa_chain.key_pem.decode(), PEM)
    assert "no certificate" in str(exc)
    assert_reveals_nothing(exc, pem_body(rsa_chain.key_pem))


def test_pem_with_nothing_useful() -> None:
    exc = material_error(openssl("ecparam", "-name", "prime256v1").decode(), PEM)
    assert "neither a certificate nor a private key" in str(exc)


@pytest.mark.parametrize("foreign", ["other_rsa_chain", "ec_chain"])
def test_key_matching_no_certificate(
    request: pytest.FixtureRequest, rsa_chain: ChainFiles, foreign: str
) -> None:
    other: ChainFiles = request.getfixturevalue(foreign)
    value = (rsa_chain.fullchain_pem + other.key_pem).decode()
    exc = material_error(value, PEM)
    assert "matches none of the 3 certificate" in str(exc)
    assert_reveals_nothing(exc, pem_body(other.key_pem))


def test_two_different_keys(rsa_chain: ChainFiles, other_rsa_chain: ChainFiles) -> None:
    value = rsa_chain.pem_secret() + other_rsa_chain.key_pem.decode()
    exc = material_error(value, PEM)
    assert "2 different private keys" in str(exc)
    assert_reveals_nothing(exc, pem_body(rsa_chain.key_pem), pem_body(other_rsa_chain.key_pem))


def test_encrypted_pkcs8_key(rsa_chain: ChainFiles) -> None:
    encrypted = rsa_chain.encrypted_key_pem("pw")
    exc = material_error((rsa_chain.fullchain_pem + encrypted).decode(), PEM)
    assert "encrypted" in str(exc)
    assert "password" in str(exc)
    assert_reveals_nothing(exc, pem_body(encrypted))


def test_encrypted_traditional_key(rsa_chain: ChainFiles) -> None:
    encrypted = openssl(
        "rsa", "-in", rsa_chain.leaf_key_path, "-traditional", "-aes256", "-passout", "pass:pw"
    )
    assert b"Proc-Type: 4,ENCRYPTED" in encrypted
    exc = material_error((rsa_chain.fullchain_pem + encrypted).decode(), PEM)
    assert "encrypted" in str(exc)


def test_unsupported_key_type(tmp_path: Path, rsa_chain: ChainFiles) -> None:
    key = tmp_path / "x25519.key"
    openssl("genpkey", "-algorithm", "X25519", "-out", key)
    exc = material_error((rsa_chain.fullchain_pem + key.read_bytes()).decode(), PEM)
    assert "unsupported private key type" in str(exc)


def test_corrupt_certificate_block(rsa_chain: ChainFiles) -> None:
    bad = "-----BEGIN CERTIFICATE-----\nTm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"
    exc = material_error(bad + rsa_chain.pem_secret(), PEM)
    assert "block 1 (CERTIFICATE) is not a valid certificate" in str(exc)


def test_corrupt_key_block(rsa_chain: ChainFiles) -> None:
    body = pem_body(rsa_chain.key_pem)
    damaged = (
        f"-----BEGIN PRIVATE KEY-----\n{body[:40]}AAAA{body[44:]}\n-----END PRIVATE KEY-----\n"
    )
    exc = material_error(rsa_chain.fullchain_pem.decode() + damaged, PEM)
    assert "not a valid private key" in str(exc)
    assert_reveals_nothing(exc, body)


def test_unterminated_pem_block(rsa_chain: ChainFiles) -> None:
    value = rsa_chain.pem_secret()
    cut = value[: value.rindex("-----END")]
    exc = material_error(cut, PEM)
    assert "without a matching END" in str(exc)
    assert_reveals_nothing(exc, pem_body(rsa_chain.key_pem))


def test_error_messages_name_no_secret_across_inputs(
    rsa_chain: ChainFiles, other_rsa_chain: ChainFiles
) -> None:
    pfx = rsa_chain.pfx_base64()
    key_body = pem_body(rsa_chain.key_pem)
    bad_values: list[str | bytes] = [
        pfx[: len(pfx) // 2],
        pfx[:100] + "!!" + pfx[100:],
        rsa_chain.pfx_base64("pw"),
        rsa_chain.key_pem.decode(),
        (other_rsa_chain.fullchain_pem + rsa_chain.key_pem).decode(),
        rsa_chain.encrypted_key_pem(),
    ]
    for value in bad_values:
        exc = material_error(value)
        text = value if isinstance(value, str) else value.decode()
        assert_reveals_nothing(exc, "".join(text.split()), key_body)


# --------------------------------------------------------------------------- compact storage


def test_identical_chain_certificates_are_one_shared_object(
    rsa_chain: ChainFiles, other_rsa_chain: ChainFiles
) -> None:
    first = CertificateMaterial.from_secret(rsa_chain.pfx_base64())
    second = CertificateMaterial.from_secret(other_rsa_chain.pem_secret(shuffle=2), PEM)
    assert first.thumbprint != second.thumbprint  # two leaves of one CA
    assert len(first.chain) == len(second.chain) >= 1
    for mine, theirs in zip(first.chain, second.chain, strict=True):
        assert mine is theirs
    assert first.chain[0] == load_cert(rsa_chain.chain_pems[0])


def test_a_shared_chain_certificate_goes_with_its_last_holder() -> None:
    from kvcertsync.emulator import TestAuthority
    from kvcertsync.material import _SHARED

    authority = TestAuthority("released")
    material = CertificateMaterial.from_secret(authority.issue().to_pem_bundle())
    der = material.chain[0].public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).digest()
    assert _SHARED[digest].certificate is material.chain[0]
    del material  # the only holder: the authority keeps its own, unshared copy
    gc.collect()
    assert digest not in _SHARED


def test_parsing_on_demand_gives_identical_results(rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pfx_base64())
    key = serialization.load_pem_private_key(rsa_chain.key_pem, None)
    assert isinstance(key, rsa.RSAPrivateKey)
    for _ in range(2):  # every access parses again: the same answers each time
        parsed = material.private_key
        assert isinstance(parsed, rsa.RSAPrivateKey)
        assert parsed.private_numbers() == key.private_numbers()
        assert material.certificate == load_cert(rsa_chain.leaf_pem)
        assert material.chain == expected_chain(rsa_chain)
    assert material.key_pem() == material.key_pem()
    assert material.thumbprint == fingerprint_sha1(rsa_chain.leaf_pem)
    assert material.not_after == load_cert(rsa_chain.leaf_pem).not_valid_after_utc
    signing = material.private_key
    assert isinstance(signing, rsa.RSAPrivateKey)
    signature = signing.sign(b"x", padding.PKCS1v15(), hashes.SHA256())
    public = material.certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, b"x", padding.PKCS1v15(), hashes.SHA256())


def test_material_is_immutable_and_never_pickled(rsa_chain: ChainFiles) -> None:
    material = CertificateMaterial.from_secret(rsa_chain.pfx_base64())
    with pytest.raises(AttributeError, match="immutable"):
        material._key = b""
    with pytest.raises(AttributeError, match="immutable"):
        del material._leaf
    with pytest.raises(TypeError, match="cannot be pickled") as caught:
        pickle.dumps(material)
    assert pem_body(material.key_pem())[:40] not in str(caught.value)
    assert shallow_copy(material) is material and deepcopy(material) is material
