"""IMDSv2 session tokens with AWS's semantics, stateless and bound to one instance.

    PUT /latest/api/token   X-aws-ec2-metadata-token-ttl-seconds: 1..21600
    -> 200, body = token, the TTL header echoed
    GET ...                 X-aws-ec2-metadata-token: <token>

A token is `<payload>.<mac>` in unpadded base64url: payload = version byte, expiry (unix
seconds, 8 bytes big-endian), 8 random bytes; mac = HMAC-SHA256(key, payload + instance id)
truncated to 20 bytes. Any API process holding the same key accepts it, and it is useless
for another instance. Clocks and randomness come in as arguments.

Forwarded requests never get a token (AWS's defence against open reverse proxies inside the
guest). Our own hops always add X-Forwarded-For and strip the VM's X-Forwarded-*/Forwarded,
so XFF itself cannot be the signal here. `forwarded_by_guest(headers)` instead looks for what
a forwarding proxy in the guest leaves behind and our hops pass through or never produce:
`Via`, `X-Real-IP`, `X-Client-IP`, `True-Client-IP`, more than one X-Forwarded-For value (a
hop that appends), a `Forwarded` header, or an `X-Openimds-Guest-Forwarded` marker.

Gap: a guest proxy that adds only X-Forwarded-For (haproxy `option forwardfor`, Apache
mod_proxy) is invisible here, because the agent drops the guest's X-Forwarded-* before the
request reaches us. Closing it needs the agent to add `X-Openimds-Guest-Forwarded: 1` when it
drops one: proposed, not yet in docs/architecture.md. The marker does no harm if a guest sends
it itself: it only refuses that guest's own token.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Iterable

__all__ = [
    "GUEST_FORWARDED_MARKER",
    "MAX_TTL_S",
    "TOKEN_HEADER",
    "TTL_HEADER",
    "check_token",
    "derive_key",
    "forwarded_by_guest",
    "mint_token",
    "parse_ttl",
]

TTL_HEADER = b"x-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = b"x-aws-ec2-metadata-token"
GUEST_FORWARDED_MARKER = b"x-openimds-guest-forwarded"
MIN_TTL_S = 1
MAX_TTL_S = 21600
_VERSION = 1
_PAYLOAD = struct.Struct(">BQ8s")
_MAC_BYTES = 20
_FORWARDING_HEADERS = frozenset({
    b"via", b"x-real-ip", b"x-client-ip", b"true-client-ip", b"forwarded",
    GUEST_FORWARDED_MARKER,
})


def derive_key(shared_secret: bytes, fallback: bytes) -> bytes:
    """The token key: from the shared secret (all API processes agree), or `fallback`
    (random per process) when the secret is empty and would make tokens forgeable."""
    if not shared_secret:
        return fallback
    return hmac.new(shared_secret, b"openimds imds token key v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(key: bytes, payload: bytes, instance_id: str) -> bytes:
    return hmac.new(key, payload + instance_id.encode(), hashlib.sha256).digest()[:_MAC_BYTES]


def parse_ttl(value: bytes | None) -> int | None:
    """The TTL header as an int in 1..21600, or None when missing or invalid (-> 400)."""
    if value is None:
        return None
    text = value.strip()
    if not text.isdigit() or len(text) > 6:
        return None
    ttl = int(text)
    return ttl if MIN_TTL_S <= ttl <= MAX_TTL_S else None


def mint_token(key: bytes, instance_id: str, ttl_s: int, now_s: float, nonce: bytes) -> str:
    payload = _PAYLOAD.pack(_VERSION, int(now_s) + ttl_s, nonce[:8].ljust(8, b"\0"))
    return _b64(payload) + "." + _b64(_mac(key, payload, instance_id))


def check_token(key: bytes, instance_id: str, token: bytes, now_s: float) -> bool:
    """True when the token was minted for this instance with this key and has not expired."""
    try:
        text = token.decode("ascii")
        head, _, tail = text.partition(".")
        payload = _unb64(head)
        mac = _unb64(tail)
        version, expiry, _nonce = _PAYLOAD.unpack(payload)
    except (UnicodeDecodeError, ValueError, struct.error):
        return False
    if version != _VERSION or len(mac) != _MAC_BYTES:
        return False
    if not hmac.compare_digest(_mac(key, payload, instance_id), mac):
        return False
    return bool(now_s < expiry)


def forwarded_by_guest(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when the request shows signs of a forwarding proxy inside the guest."""
    xff_values = 0
    for name, value in headers:
        if name in _FORWARDING_HEADERS:
            return True
        if name == b"x-forwarded-for":
            xff_values += 1 + value.count(b",")
            if xff_values > 1:
                return True
    return False
