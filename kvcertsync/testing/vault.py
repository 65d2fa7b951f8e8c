"""Helpers for tests that run a CertSync against the local Key Vault emulator."""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from kvcertsync.uri import SecretUri

if TYPE_CHECKING:
    from kvcertsync.emulator import LocalKeyVault
    from kvcertsync.engine import CertSync
    from kvcertsync.material import CertificateMaterial
    from kvcertsync.stores.base import InstalledCertificate

__all__ = ["rotate_and_wait"]


async def rotate_and_wait(
    vault: LocalKeyVault,
    sync: CertSync,
    uri: SecretUri | str | None = None,
    material: CertificateMaterial | None = None,
    *,
    within: float = 60.0,
) -> InstalledCertificate:
    """Rotate ``uri`` in ``vault``; return the new version once ``sync`` installed it.

    By then every callback subscribed to ``sync`` has handled (or timed out on) the
    CertificateUpdated it announced. ``uri`` may be omitted when ``sync`` observes one
    certificate; ``material`` (default: a fresh leaf from the vault's authority) is the new
    version. AssertionError says why when the sync did not install it.
    """
    target = _target(sync, uri)
    version = vault.rotate(target.vault_name, target.name, material)
    try:
        with anyio.fail_after(within):
            report = await sync.refresh(target)
            # Callbacks run in delivery tasks of their own: wait until they are done with it.
            # (The bus's settle: CertSync has no public "wait for every callback" yet.)
            await sync.settle()
    except TimeoutError:
        raise AssertionError(
            f"rotated {target} to version {version}, but the sync had not installed it and "
            f"told its subscribers within {within:g} s"
        ) from None
    for result in report.failed:
        raise AssertionError(
            f"rotated {target} to version {version}, but the sync failed to install it: "
            f"{type(result.error).__name__}: {result.error}"
        )
    installed = sync.current(target)
    if installed is None or installed.version != version:
        shown = "nothing" if installed is None else f"version {installed.version}"
        raise AssertionError(f"rotated {target} to version {version}, but {shown} is installed")
    return installed


def _target(sync: CertSync, uri: SecretUri | str | None) -> SecretUri:
    observed = [cert.uri for cert in sync.observed]
    if uri is not None:
        return uri if isinstance(uri, SecretUri) else SecretUri.parse(uri, allow_any_host=True)
    if len(observed) != 1:
        raise ValueError(
            f"this sync observes {len(observed)} certificates: say which to rotate (uri=)"
        )
    return observed[0]
