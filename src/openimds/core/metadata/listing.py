"""How Nova prints a tree node (`ec2_md_print`), and the documents' wire form.

A node is a dict (a directory), a list (lines), or a leaf (str or bytes). A directory lists
its keys sorted, one per line, with no trailing newline; a sub-directory gets a trailing `/`
unless it carries a `_name` entry, which is printed instead (public keys: `0=keyname`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["JSON", "TEXT", "Document", "document", "render_node"]

TEXT = "text/plain; charset=UTF-8"
JSON = "application/json"
NAME_KEY = "_name"


@dataclass(frozen=True, slots=True)
class Document:
    """One serialized answer: body bytes, content type and a strong ETag."""

    body: bytes
    content_type: str
    etag: str


def etag_of(body: bytes) -> str:
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def document(body: bytes, content_type: str = TEXT) -> Document:
    return Document(body, content_type, etag_of(body))


def render_node(node: Any) -> bytes:
    """Nova's `ec2_md_print` for one node."""
    if isinstance(node, Mapping):
        lines = []
        for key in sorted(node):
            if key == NAME_KEY:
                continue
            value = node[key]
            if isinstance(value, Mapping):
                lines.append(str(value[NAME_KEY]) if NAME_KEY in value else key + "/")
            else:
                lines.append(key)
        return "\n".join(lines).encode()
    if isinstance(node, bytes):
        return node
    if isinstance(node, str):
        return node.encode()
    if isinstance(node, Sequence):
        return "\n".join(str(item) for item in node).encode()
    return str(node).encode()
