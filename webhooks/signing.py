"""Signatures of webhook deliveries: what Latentry sends, and how a receiver checks it.

Each delivery carries ``Latentry-Signature: t=<unix seconds>,v1=<hex>``, where the hex is
HMAC-SHA256, keyed with the hook's secret, of ``f"{t}.{body}"`` (the raw request body, bytes as
sent). The timestamp is signed with the body, so a captured request cannot be replayed later
than the receiver's tolerance. ``verify`` needs nothing but the standard library: receivers may
copy it as it is.
"""

import hashlib
import hmac
import time

HEADER = "Latentry-Signature"


def sign(secret, body, timestamp):
    """The hex HMAC-SHA256 of ``f"{timestamp}.{body}"`` under ``secret``."""
    body = body.encode() if isinstance(body, str) else body
    message = f"{int(timestamp)}.".encode() + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret, body, timestamp=None):
    """The ``Latentry-Signature`` value for ``body`` sent now (or at ``timestamp``)."""
    timestamp = int(time.time() if timestamp is None else timestamp)
    return f"t={timestamp},v1={sign(secret, body, timestamp)}"


def verify(secret, body, header, tolerance_s=300, now=None):
    """True only if ``header`` (the ``Latentry-Signature`` value) signs ``body`` (the raw
    request body) with ``secret``, at a time within ``tolerance_s`` seconds of ``now`` (the
    clock, by default). Compares in constant time; any malformed header is False."""
    timestamp, signatures = None, []
    for part in (header or "").split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isascii() and value.isdigit():
            timestamp = int(value)
        elif name == "v1":
            signatures.append(value)
    if timestamp is None or not signatures:
        return False
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_s:
        return False  # stale (or from the future): possibly a replay
    expected = sign(secret, body, timestamp)
    return any(hmac.compare_digest(expected.encode(), s.encode()) for s in signatures)
