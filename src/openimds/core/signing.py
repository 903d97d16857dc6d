"""Instance-ID signatures, byte-identical to Neutron's signer and Nova's check.

signature = lowercase hex HMAC-SHA256(metadata_proxy_shared_secret, instance id as UTF-8).
An empty secret still signs (with an empty key) and is still checked.
"""

from __future__ import annotations

import hashlib
import hmac

__all__ = ["sign_instance_id", "verify_signature"]


def sign_instance_id(secret: bytes, instance_id: str) -> str:
    """Sign an instance ID: ``sign_instance_id(b"secret", "foo")`` -> ``"773ba446..."``."""
    return hmac.new(secret, instance_id.encode(), hashlib.sha256).hexdigest()


def verify_signature(secret: bytes, instance_id: str, signature: str) -> bool:
    """True when signature is the exact lowercase hex HMAC, compared in constant time."""
    if not signature:
        return False
    return hmac.compare_digest(sign_instance_id(secret, instance_id), signature)
