"""Registry object rules that need no storage: names, hostnames, key pairs, metadata.

Pure functions over plain values; errors are `BadRequest` naming the field and value.
Device owners and the limits Nova applies live here so every floor spells them the same.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import uuid
from dataclasses import dataclass
from typing import Any

from openimds.errors import BadRequest

__all__ = [
    "DEVICE_OWNER_DHCP",
    "DEVICE_OWNER_INSTANCE",
    "DEVICE_OWNER_ROUTER",
    "MAX_PASSWORD_CHARS",
    "MAX_USER_DATA_BYTES",
    "PublicKey",
    "DHCP_RESERVED_DEVICE_ID",
    "dhcp_device_id",
    "parse_metadata",
    "parse_name",
    "parse_public_key",
    "sanitize_hostname",
]

DEVICE_OWNER_DHCP = "network:dhcp"
DEVICE_OWNER_ROUTER = "network:router_interface"
DEVICE_OWNER_INSTANCE = "compute:nova"
MAX_USER_DATA_BYTES = 65536
MAX_PASSWORD_CHARS = 1020
MAX_NAME_CHARS = 255
MAX_METADATA_ITEMS = 128
CHANGE_KINDS = ("project", "network", "subnet", "router", "port", "instance", "keypair")

_KEY_TYPES = frozenset({
    "ssh-rsa", "ssh-dss", "ssh-ed25519", "ssh-ed448",
    "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com", "sk-ssh-ed25519@openssh.com",
})


# A DHCP port no node serves (the network has no DHCP node yet, or had and lost them all): it
# keeps its address until a node claims it (Neutron's DEVICE_ID_RESERVED_DHCP_PORT).
DHCP_RESERVED_DEVICE_ID = "reserved_dhcp_port"


def dhcp_device_id(host: str, network_id: str) -> str:
    """The device_id of the DHCP port `host` serves on `network_id`, as Neutron names it:
    `dhcp<uuid5(DNS namespace, host)>-<network id>`."""
    return f"dhcp{uuid.uuid5(uuid.NAMESPACE_DNS, host)}-{network_id}"


def dhcp_adopted_device_id(host: str, network_id: str) -> str:
    """The device_id of a dead node's DHCP port that `host` adopted (serves besides its own,
    `core.nodes` module doc): its own port's device_id with `-adopted`."""
    return f"{dhcp_device_id(host, network_id)}-adopted"


def parse_name(raw: Any, field: str = "name", *, required: bool = True) -> str:
    """A printable name of at most 255 characters ('' allowed when not required)."""
    if raw is None and not required:
        return ""
    if not isinstance(raw, str):
        raise BadRequest(f"{field}: expected a string, got {raw!r}")
    if required and not raw.strip():
        raise BadRequest(f"{field}: must not be empty")
    if len(raw) > MAX_NAME_CHARS:
        raise BadRequest(f"{field}: longer than {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 for c in raw):
        raise BadRequest(f"{field}: {raw!r} contains control characters")
    return raw


def sanitize_hostname(name: str, instance_id: str) -> str:
    """A hostname from a display name, exactly as Nova's `utils.sanitize_hostname`.

    Characters outside U+0000..U+00FF are dropped, the name is cut to 63 characters, spaces,
    underscores and dots become '-', anything that is neither a (Unicode) word character nor
    '-' is dropped, the result is lower-cased and trimmed of '.' and '-' at both ends
    (`Café ☕` -> `café`). Nothing left -> Nova's default, ``Server-<instance id>``.
    """
    text = name.encode("latin-1", "ignore").decode("latin-1")[:63]
    text = re.sub(r"[ _.]", "-", text)
    text = re.sub(r"[^\w.-]+", "", text).lower().strip(".-")
    return text or f"Server-{instance_id}"[:63]


def parse_hostname(raw: Any, field: str = "hostname") -> str:
    """An explicit hostname (`--hostname`): RFC 1123 labels, <= 63 chars per label, kept as
    given (Nova stores an explicit hostname verbatim, case included)."""
    if not isinstance(raw, str) or not raw:
        raise BadRequest(f"{field}: expected a hostname, got {raw!r}")
    labels = raw.split(".")
    ok = all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", lab) for lab in labels)
    if not ok or len(raw) > 253:
        raise BadRequest(f"{field}: {raw!r} is not a valid hostname")
    return raw


def parse_metadata(raw: Any, field: str = "metadata") -> dict[str, str]:
    """Instance properties: str keys (1..255) to str values (≤ 255), at most 128."""
    if not isinstance(raw, dict):
        raise BadRequest(f"{field}: expected an object of strings, got {raw!r}")
    if len(raw) > MAX_METADATA_ITEMS:
        raise BadRequest(f"{field}: more than {MAX_METADATA_ITEMS} items")
    out: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not 0 < len(key) <= 255:
            raise BadRequest(f"{field}: key {key!r} must be 1 to 255 characters")
        if not isinstance(value, str) or len(value) > 255:
            raise BadRequest(f"{field}.{key}: value {value!r} must be a string of ≤ 255 chars")
        out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class PublicKey:
    type: str
    text: str
    fingerprint: str


def _fingerprint(blob: bytes) -> str:
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def parse_public_key(raw: Any, field: str = "public_key") -> PublicKey:
    """An OpenSSH public key line; fingerprint is Nova's: MD5 of the blob, colon hex."""
    if not isinstance(raw, str) or not raw.strip():
        raise BadRequest(f"{field}: expected an OpenSSH public key line")
    text = raw.strip()
    if "\n" in text:
        raise BadRequest(f"{field}: expected one line, got {text.count(chr(10)) + 1}")
    parts = text.split()
    if len(parts) < 2 or parts[0] not in _KEY_TYPES:
        shown = parts[0] if parts else ""
        raise BadRequest(f"{field}: {shown[:40]!r} is not a known SSH key type")
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: the key body is not base64") from None
    if len(blob) < 4:
        raise BadRequest(f"{field}: the key body is truncated")
    (n,) = struct.unpack(">I", blob[:4])
    if blob[4:4 + n].decode("ascii", "replace") != parts[0] or len(blob) <= 4 + n:
        raise BadRequest(f"{field}: the key body does not match its type {parts[0]}")
    return PublicKey(type="ssh", text=text, fingerprint=_fingerprint(blob))
