"""IMDSv2 session tokens with AWS's semantics, stateless and bound to one instance.

    PUT /latest/api/token   X-aws-ec2-metadata-token-ttl-seconds: 1..21600
    -> 200, body = token, the TTL header echoed (under the name the client used)
    GET ...                 X-aws-ec2-metadata-token: <token>

Firecracker's names (`X-metadata-token-ttl-seconds`, `X-metadata-token`) are accepted too.

A token is `<payload>.<mac>` in unpadded base64url: payload = version byte, expiry (unix
seconds, 8 bytes big-endian), the first 12 bytes of SHA-256(instance id), 8 random bytes;
mac = HMAC-SHA256(key, payload) truncated to 20 bytes. The key is derived from the shared
secret (`$state_path/secrets.ini`), so every API process and every restart accepts the
tokens the others minted. A genuine token carries the instance it was minted for, which lets
a 401 say *why*: missing, malformed, expired, or minted for another instance. Clocks and
randomness come in as arguments.

Forwarded requests never get a token (AWS's defence against open reverse proxies inside the
guest). Our own hops always set X-Forwarded-For and strip the VM's X-Forwarded-*/Forwarded,
so XFF itself cannot be the signal here: the namespace proxy adds `X-Openimds-Guest-Forwarded:
1` when the VM sent one (and strips any the VM sent under that name), and the agent passes it
through. `forwarded_by_guest(headers)` also looks for what other forwarding proxies in the
guest leave behind: `Via`, `X-Real-IP`, `X-Client-IP`, `True-Client-IP`, more than one
X-Forwarded-For value (a hop that appends), or a `Forwarded` header.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
from collections.abc import Iterable

__all__ = [
    "FC_TOKEN_HEADER",
    "FC_TTL_HEADER",
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
FC_TTL_HEADER = b"x-metadata-token-ttl-seconds"
FC_TOKEN_HEADER = b"x-metadata-token"
GUEST_FORWARDED_MARKER = b"x-openimds-guest-forwarded"
MIN_TTL_S = 1
MAX_TTL_S = 21600
MAX_TOKEN_CHARS = 128  # a genuine token is 72 characters; anything longer is not decoded
_VERSION = 2
_PAYLOAD = struct.Struct(">BQ12s8s")
_MAC_BYTES = 20
_FORWARDING_HEADERS = frozenset({
    b"via", b"x-real-ip", b"x-client-ip", b"true-client-ip", b"forwarded",
    GUEST_FORWARDED_MARKER,
})

# Why a token was refused: the one-line reasons of the 401 answers.
MALFORMED = "the IMDSv2 token is not valid"
EXPIRED = "the IMDSv2 token has expired"
OTHER_INSTANCE = "the IMDSv2 token was issued to another instance"


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


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()[:_MAC_BYTES]


def _instance_tag(instance_id: str) -> bytes:
    return hashlib.sha256(instance_id.encode()).digest()[:12]


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
    payload = _PAYLOAD.pack(_VERSION, int(now_s) + ttl_s, _instance_tag(instance_id),
                            nonce[:8].ljust(8, b"\0"))
    return _b64(payload) + "." + _b64(_mac(key, payload))


def check_token(key: bytes, instance_id: str, token: bytes, now_s: float) -> str | None:
    """None when the token was minted with this key for this instance and has not expired;
    otherwise the reason it is refused (`MALFORMED`, `EXPIRED`, `OTHER_INSTANCE`)."""
    if len(token) > MAX_TOKEN_CHARS:
        return MALFORMED
    try:
        text = token.decode("ascii").strip()
        head, _, tail = text.partition(".")
        payload = _unb64(head)
        mac = _unb64(tail)
        version, expiry, tag, _nonce = _PAYLOAD.unpack(payload)
    except (UnicodeDecodeError, ValueError, struct.error):
        return MALFORMED
    if version != _VERSION or len(mac) != _MAC_BYTES:
        return MALFORMED
    if not hmac.compare_digest(_mac(key, payload), mac):
        return MALFORMED
    if not hmac.compare_digest(tag, _instance_tag(instance_id)):
        return OTHER_INSTANCE
    if now_s >= expiry:
        return EXPIRED
    return None


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
