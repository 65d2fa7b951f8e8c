"""Credentials from the extension's authenticationSettings (managed identity, msiEndpoint)."""
