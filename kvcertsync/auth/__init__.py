"""Credentials from the extension's authenticationSettings (managed identity, msiEndpoint)."""

from kvcertsync.auth.endpoint import (
    CredentialTimeout,
    EndpointWatch,
    ImdsAuthenticationError,
    imds_guidance,
)
from kvcertsync.auth.factory import (
    ARC_API_VERSION,
    CredentialCache,
    credential_from_settings,
    is_arc_endpoint,
    is_standard_imds,
)
from kvcertsync.auth.imds import (
    DEFAULT_API_VERSION,
    DEFAULT_RESOURCE,
    ImdsCredential,
    ImdsRetry,
    arc_key_directory,
    token_url,
)
from kvcertsync.auth.shared import TOKEN_TIMEOUT, SharedCredential, share

__all__ = [
    "ARC_API_VERSION",
    "DEFAULT_API_VERSION",
    "DEFAULT_RESOURCE",
    "TOKEN_TIMEOUT",
    "CredentialCache",
    "CredentialTimeout",
    "EndpointWatch",
    "ImdsAuthenticationError",
    "ImdsCredential",
    "ImdsRetry",
    "SharedCredential",
    "arc_key_directory",
    "credential_from_settings",
    "imds_guidance",
    "is_arc_endpoint",
    "is_standard_imds",
    "share",
    "token_url",
]
