"""Plain Azure SDK code, nothing emulator-specific: run it against the emulator unchanged.

    kvcertsync emulator --vault demo --exec python examples/azure_sdk_unchanged.py

The emulator sets VAULT_URL (https://demo.vault.azure.net), routes *.vault.azure.net to itself
through HTTPS_PROXY, adds its CA to the trusted ones and points managed identity at its IMDS.
Against a real vault, the same program needs only VAULT_URL and a credential.
"""

from __future__ import annotations

import os

from azure.identity import DefaultAzureCredential
from azure.keyvault.certificates import CertificateClient, CertificatePolicy
from azure.keyvault.secrets import SecretClient


def main() -> None:
    vault_url = os.environ["VAULT_URL"]
    credential = DefaultAzureCredential()
    certificates = CertificateClient(vault_url, credential)
    secrets = SecretClient(vault_url, credential)

    policy = CertificatePolicy(
        issuer_name="Self", subject="CN=shop.example", san_dns_names=["shop.example"]
    )
    certificate = certificates.begin_create_certificate("shop", policy).result()
    print(f"created {certificate.name} version {certificate.properties.version}")

    # What the VM extension and kvcertsync read: the certificate's secret, with its key.
    secret = secrets.get_secret("shop")
    kind = secret.properties.content_type
    print(f"secret {secret.name}: {kind}, managed={secret.properties.managed}")

    secrets.set_secret("db-password", "s3cret")
    backup = secrets.backup_secret("db-password")
    print(f"backed up db-password: {len(backup)} opaque bytes")


if __name__ == "__main__":
    main()
