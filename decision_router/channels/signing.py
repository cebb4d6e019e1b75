"""Webhook signatures: HMAC-SHA256 over f"{timestamp}.{body}" with the receiver's secret.

Every signed request carries two headers:

    X-Decision-Router-Timestamp: 1764083286            (Unix seconds, when this attempt was sent)
    X-Decision-Router-Signature: v1=<hex HMAC-SHA256>

Each retry is signed again with a fresh timestamp, so a receiver can keep a short replay
window. `verify` is deliberately standard-library only so receivers can copy it.
"""

from __future__ import annotations

import hashlib
import hmac
import time

__all__ = ["SIGNATURE_HEADER", "TIMESTAMP_HEADER", "VERSION", "sign", "signature_headers", "verify"]

TIMESTAMP_HEADER = "X-Decision-Router-Timestamp"
SIGNATURE_HEADER = "X-Decision-Router-Signature"
VERSION = "v1"


def _bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def sign(secret: str | bytes, timestamp: int, body: str | bytes) -> str:
    """The signature header value: `v1=<hex>` of HMAC-SHA256(secret, f"{timestamp}.{body}")."""
    message = f"{int(timestamp)}.".encode() + _bytes(body)
    return f"{VERSION}=" + hmac.new(_bytes(secret), message, hashlib.sha256).hexdigest()


def signature_headers(secret: str | bytes, body: str | bytes, *, now: float | None = None) -> dict[str, str]:
    """Both headers for one request, timestamped `now` (default: the current time)."""
    timestamp = int(time.time() if now is None else now)
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: sign(secret, timestamp, body)}


def verify(
    secret: str | bytes,
    timestamp: str | int,
    body: str | bytes,
    signature: str,
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """True when `signature` (the header value) matches and `timestamp` is within
    `tolerance_s` of `now`. Pass the raw request body, exactly as received.

    The header may hold several comma-separated `v1=` values (e.g. during a secret
    rotation); any match is enough. Comparison is constant-time.
    """
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        return False  # stale (replayed) or from a badly skewed clock
    expected = sign(secret, ts, body)
    candidates = [part.strip() for part in str(signature).split(",")]
    # Compare against every candidate, so the time does not depend on which one matched.
    matches = [hmac.compare_digest(expected.encode(), c.encode()) for c in candidates if c.startswith(f"{VERSION}=")]
    return any(matches)
