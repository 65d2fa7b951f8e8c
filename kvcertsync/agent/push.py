"""``kvcertsync run --push-address``: the agent's side of push refresh (options, key, TLS).

The key never comes from the command line (argv is world-readable in /proc): it is read from
``--push-key-file`` or the ``KVCERTSYNC_PUSH_KEY`` environment variable.
"""

from __future__ import annotations

import logging
import os
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from kvcertsync.errors import KvCertSyncError
from kvcertsync.push import MIN_KEY_LENGTH, PushServer, Refreshable

__all__ = ["PUSH_KEY_ENV", "parse_push_address", "push_server", "read_push_key", "require_key"]

logger = logging.getLogger(__name__)

#: The environment variable that may hold the push receiver's shared key.
PUSH_KEY_ENV: Final = "KVCERTSYNC_PUSH_KEY"


def parse_push_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT`` or ``PORT`` (on 127.0.0.1), as ``--metrics-address``."""
    from kvcertsync.agent.metrics import parse_listen_address

    try:
        return parse_listen_address(text, "--push-address")
    except ValueError as error:
        raise KvCertSyncError(str(error)) from None


def read_push_key(key_file: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The shared key from ``key_file`` (first line) or the environment; None when neither."""
    env = os.environ if environ is None else environ
    if key_file is None:
        key = env.get(PUSH_KEY_ENV)
        where = PUSH_KEY_ENV
    else:
        path = Path(key_file)
        try:
            text = path.read_text(encoding="utf-8")
            mode = path.stat().st_mode
        except OSError as error:
            raise KvCertSyncError(
                f"--push-key-file {key_file}: cannot read: {error.strerror or error}"
            ) from None
        except UnicodeDecodeError:
            raise KvCertSyncError(f"--push-key-file {key_file}: not UTF-8 text") from None
        if sys.platform != "win32" and mode & 0o077:
            logger.warning(
                "--push-key-file %s can be read by other users (mode %o): chmod 600 it",
                key_file,
                mode & 0o777,
            )
        key = text.splitlines()[0] if text.strip() else ""
        where = f"--push-key-file {key_file}"
    if key is None:
        return None
    key = key.strip()
    if len(key) < MIN_KEY_LENGTH:
        raise KvCertSyncError(
            f"{where}: the push key must be at least {MIN_KEY_LENGTH} characters "
            f"(it is {len(key)}); make one with `openssl rand -hex 32`"
        )
    return key


def require_key(key: str | None) -> str:
    """``key``, or the error that says where ``--push-address`` takes its key from."""
    if key is None:
        raise KvCertSyncError(
            f"--push-address needs the webhook's shared key: --push-key-file FILE or "
            f"{PUSH_KEY_ENV} (never on the command line, where every user can read it)"
        )
    return key


def _tls(cert_file: str, key_file: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert_file, key_file)
    except FileNotFoundError as error:
        raise KvCertSyncError(
            f"--push-tls-cert/--push-tls-key: {error.filename}: no such file"
        ) from None
    except ssl.SSLError as error:  # before OSError: it is one
        raise KvCertSyncError(
            f"--push-tls-cert {cert_file}: not a PEM certificate chain and matching private key "
            f"({error.reason})"
        ) from None
    except OSError as error:
        raise KvCertSyncError(
            f"--push-tls-cert {cert_file}: cannot read: {error.strerror or error}"
        ) from None
    return context


def push_server(
    sync: Refreshable,
    address: str,
    key: str | None,
    *,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> PushServer:
    """The PushServer ``--push-address`` asks for (not started); KvCertSyncError if wrong."""
    host, port = parse_push_address(address)
    key = require_key(key)
    if tls_key is not None and tls_cert is None:
        raise KvCertSyncError("--push-tls-key needs --push-tls-cert")
    context = _tls(tls_cert, tls_key) if tls_cert is not None else None
    return PushServer(sync, key=key, host=host, port=port, ssl_context=context)
