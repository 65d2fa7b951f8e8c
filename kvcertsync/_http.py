"""HTTP details shared by the Key Vault source and the IMDS credential."""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from datetime import UTC, datetime

__all__ = ["MAX_RETRY_AFTER", "retry_after"]

#: The longest wait a server may ask for; beyond it a misbehaving header cannot stall a poll.
MAX_RETRY_AFTER = 3600.0


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from retry-after-ms, x-ms-retry-after-ms or Retry-After (number or date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    for name in ("retry-after-ms", "x-ms-retry-after-ms"):
        try:
            millis = float(lowered[name])
        except (KeyError, ValueError):
            continue
        if math.isfinite(millis) and millis >= 0:
            return min(millis / 1000, MAX_RETRY_AFTER)
    raw = lowered.get("retry-after")
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER) if math.isfinite(seconds) else None
