import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvcertsync import SecretUri, SecretUriError
from kvcertsync.uri import VAULT_DNS_SUFFIXES

VERSION = "0123456789abcdef0123456789abcdef"


@pytest.mark.parametrize("suffix", VAULT_DNS_SUFFIXES)
def test_every_cloud_suffix_parses(suffix: str) -> None:
    uri = SecretUri.parse(f"https://myvault{suffix}/secrets/web")
    assert uri.vault_name == "myvault"
    assert uri.vault_url == f"https://myvault{suffix}"
    assert uri.name == "web"
    assert uri.version is None


def test_version_trailing_slash_port_and_case_are_canonicalised() -> None:
    uri = SecretUri.parse(f"HTTPS://MyVault.Vault.Azure.Net:443/secrets/Web/{VERSION.upper()}/")
    assert str(uri) == f"https://myvault.vault.azure.net/secrets/Web/{VERSION}"
    assert uri.version == VERSION
    assert repr(uri) == f"SecretUri('https://myvault.vault.azure.net/secrets/Web/{VERSION}')"


def test_comparison_is_case_insensitive_and_hash_consistent() -> None:
    a = SecretUri.parse("https://myvault.vault.azure.net/secrets/Web")
    b = SecretUri.parse("https://MYVAULT.vault.azure.net/secrets/web/")
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert a != a.with_version(VERSION)
    assert a.with_version(VERSION).latest == a


def test_str_round_trips() -> None:
    for text in (
        "https://vault1.vault.azure.net/secrets/a",
        f"https://vault1.vault.azure.net/secrets/a/{VERSION}",
    ):
        assert str(SecretUri.parse(str(SecretUri.parse(text)))) == text


@pytest.mark.parametrize("collection", ["certificates", "keys"])
def test_keyless_collections_explain_and_correct(collection: str) -> None:
    with pytest.raises(SecretUriError) as info:
        SecretUri.parse(f"https://myvault.vault.azure.net/{collection}/web/{VERSION}")
    message = str(info.value)
    assert "private key" in message
    assert f"https://myvault.vault.azure.net/secrets/web/{VERSION}" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://myvault.vault.azure.net/secrets/web", "https"),
        ("https://example.com/secrets/web", "not a Key Vault host"),
        ("https://myvault.vault.azure.net.evil.com/secrets/web", "not a Key Vault host"),
        ("https://myvault.vault.azure.net:8443/secrets/web", "port 443"),
        ("https://myvault.vault.azure.net/secrets/", "/secrets/<name>"),
        ("https://myvault.vault.azure.net/secrets/a/b/c", "/secrets/<name>"),
        ("https://myvault.vault.azure.net/secrets/web/123", "32 hexadecimal"),
        ("https://myvault.vault.azure.net/secrets/we_b", "letters, digits or hyphens"),
        ("https://myvault.vault.azure.net/secrets/" + "a" * 128, "1-127"),
        ("https://myvault.vault.azure.net/secrets/..", "letters, digits or hyphens"),
        ("https://myvault.vault.azure.net/secrets/web?api-version=7.4", "query"),
        ("https://user:pw@myvault.vault.azure.net/secrets/web", "user information"),
        ("https://ab.vault.azure.net/secrets/web", "vault name"),
        ("https://my--vault.vault.azure.net/secrets/web", "vault name"),
        ("https:///secrets/web", "no host"),
        ("", "empty"),
    ],
)
def test_bad_urls_name_the_problem(text: str, expected: str) -> None:
    with pytest.raises(SecretUriError, match=expected):
        SecretUri.parse(text)


def test_non_string_is_rejected() -> None:
    with pytest.raises(SecretUriError, match="must be a string"):
        SecretUri.parse(42)  # type: ignore[arg-type]


def test_any_host_opt_in_keeps_port() -> None:
    uri = SecretUri.parse("https://127.0.0.1:8443/secrets/web", allow_any_host=True)
    assert uri.vault_url == "https://127.0.0.1:8443"
    assert uri.hostname == "127.0.0.1"
    with pytest.raises(SecretUriError, match="https"):
        SecretUri.parse("http://localhost/secrets/web", allow_any_host=True)


@given(st.text(max_size=200))
def test_parse_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(SecretUriError):
        SecretUri.parse(text)


@given(
    st.from_regex(r"[a-z][a-z0-9]{2,20}", fullmatch=True),
    st.from_regex(r"[0-9A-Za-z-]{1,127}", fullmatch=True),
    st.none() | st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
)
def test_valid_parts_round_trip(vault: str, name: str, version: str | None) -> None:
    text = f"https://{vault}.vault.azure.net/secrets/{name}" + (f"/{version}" if version else "")
    uri = SecretUri.parse(text)
    assert (uri.vault_name, uri.name, uri.version) == (vault, name, version)
    assert str(uri) == text
