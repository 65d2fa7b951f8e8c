"""The data-plane api-versions the emulator answers, checked the way Key Vault checks them."""

from __future__ import annotations

from kvcertsync.emulator.store import VaultError

__all__ = ["LATEST_API_VERSION", "SUPPORTED_API_VERSIONS", "check_api_version"]

#: The newest stable version: the default of azure-keyvault-secrets/-certificates 4.12.
LATEST_API_VERSION = "2026-04-01"

#: Every stable version, and the previews the Azure SDKs have sent as their default.
SUPPORTED_API_VERSIONS = frozenset(
    {
        "2016-10-01",
        "7.0",
        "7.1",
        "7.2",
        "7.3",
        "7.4",
        "7.5",
        "7.6",
        "2025-07-01",
        LATEST_API_VERSION,
        "7.3-preview",
        "7.4-preview.1",
        "7.5-preview.1",
        "7.6-preview.1",
        "7.6-preview.2",
        "2026-03-01-preview",
    }
)


def check_api_version(version: str | None) -> None:
    """Raise the service's 400 BadParameter unless ``version`` is one the service answers."""
    if version is not None and version.strip().lower() in SUPPORTED_API_VERSIONS:
        return
    # Key Vault's wording for an unknown version; a missing one is reported the same way.
    raise VaultError(
        400,
        "BadParameter",
        f"The specified version ({version or ''}) is not recognized. "
        f"Consider using the latest supported version ({LATEST_API_VERSION}).",
    )
