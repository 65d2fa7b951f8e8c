"""Shared pytest fixtures."""

from __future__ import annotations

import shutil

import pytest

from tests.certs import CertificateAuthority, ChainFiles, make_self_signed


@pytest.fixture(scope="session")
def openssl_available() -> None:
    """Skip tests that mint certificates when the openssl CLI is missing."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command-line tool is not installed")


@pytest.fixture(scope="session")
def rsa_ca(
    openssl_available: None, tmp_path_factory: pytest.TempPathFactory
) -> CertificateAuthority:
    """An RSA root -> intermediate CA, shared by the whole session."""
    return CertificateAuthority.create(tmp_path_factory.mktemp("rsa-ca"), key="rsa")


@pytest.fixture(scope="session")
def rsa_chain(rsa_ca: CertificateAuthority) -> ChainFiles:
    """An RSA leaf for www.example.com and example.com, issued by ``rsa_ca``."""
    return rsa_ca.issue(["www.example.com", "example.com"], name="rsa-leaf")


@pytest.fixture(scope="session")
def other_rsa_chain(rsa_ca: CertificateAuthority) -> ChainFiles:
    """A second RSA leaf (own key) from the same CA as ``rsa_chain``."""
    return rsa_ca.issue(["other.example.com"], name="other-rsa-leaf")


@pytest.fixture(scope="session")
def ec_chain(openssl_available: None, tmp_path_factory: pytest.TempPathFactory) -> ChainFiles:
    """An EC P-256 root -> intermediate -> leaf chain under CA names of its own."""
    ca = CertificateAuthority.create(
        tmp_path_factory.mktemp("ec-ca"), key="ec", name="kvcertsync EC Test"
    )
    return ca.issue(["ec.example.com"], name="ec-leaf")


@pytest.fixture(scope="session")
def self_signed_chain(
    openssl_available: None, tmp_path_factory: pytest.TempPathFactory
) -> ChainFiles:
    """A self-signed EC certificate with its key (no chain)."""
    return make_self_signed(
        tmp_path_factory.mktemp("self-signed"), key="ec", dns_names=["self.example.com"]
    )
