"""Every document of one instance, built from its view once and looked up by path.

Routing follows Nova's `InstanceMetadata.lookup` (metadata-api.md §2.1): the path is
normalised (`..` resolved, trailing slashes dropped, query ignored by the caller), a first
token other than `ec2`/`openstack` means EC2 (`/ec2/latest/...` is an alias), matching is
case-sensitive. Fixed quirks: below a leaf is 404 (Nova: 500); a leading `//` is just `/`;
`network_data.json` is `application/json`; `password` is `text/plain`.

`InstanceDocuments.lookup(path, today)` returns one of:
- `Document` — complete bytes, content type, ETag;
- `SeededDocument` — meta_data.json, the server splices a fresh random_seed in;
- `AddressLeaf` — `local-ipv4` when the instance has no IPv4: the request's address;
- `PasswordTarget` — the password document; POST is allowed here;
- `DynamicVendorTarget` — vendor_data2.json with dynamic targets: the server fetches them.
It raises `NotFound` otherwise. Successful lookups are memoised per normalised path, so a
document is serialised once per view (i.e. once per change of the instance), until the
caller, which keeps its own copy of an answer, says to `forget` it.
"""

from __future__ import annotations

import datetime
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from openimds.core.metadata.ec2 import RequestAddress, ec2_tree
from openimds.core.metadata.identity import IdentitySigner, identity_document
from openimds.core.metadata.listing import JSON, NAME_KEY, TEXT, Document, document, render_node
from openimds.core.metadata.network_data import network_data
from openimds.core.metadata.openstack import SeededDocument, dump, meta_data, openstack_listing
from openimds.core.metadata.versions import (
    EC2_VERSIONS,
    GRIZZLY,
    HAVANA,
    NEWTON_TWO,
    ec2_version,
    openstack_at_least,
    openstack_version,
    visible_openstack_versions,
)
from openimds.core.metadata.view import View
from openimds.errors import NotFound

__all__ = [
    "ROOT",
    "AddressLeaf",
    "DocumentOptions",
    "DynamicVendorTarget",
    "InstanceDocuments",
    "PasswordTarget",
    "Target",
    "normalize_path",
    "root_document",
]

PASSWORD_TYPE = TEXT


@dataclass(frozen=True, slots=True)
class DocumentOptions:
    """What the documents depend on besides the view (from `[api]` settings)."""

    dhcp_domain: str = "novalocal"
    # The StaticJSON vendordata dict, or None when StaticJSON is not a provider.
    static_vendordata: Mapping[str, Any] | None = None
    # True when DynamicJSON is a provider with at least one target.
    dynamic_vendordata: bool = False
    # `/latest/dynamic/instance-identity/` is served when a signer is given.
    identity: IdentitySigner | None = None
    region: str = "RegionOne"
    architecture: str = "x86_64"
    expose_tags: bool = False


@dataclass(frozen=True, slots=True)
class AddressLeaf:
    """`local-ipv4` with no fixed IPv4: the server answers with the request's address."""


@dataclass(frozen=True, slots=True)
class PasswordTarget:
    doc: Document


@dataclass(frozen=True, slots=True)
class DynamicVendorTarget:
    """vendor_data2.json: `{"static": ...}` (if StaticJSON) plus one key per target."""

    static: Mapping[str, Any] | None


Target = Document | SeededDocument | AddressLeaf | PasswordTarget | DynamicVendorTarget
_ADDRESS: Final = AddressLeaf()
ROOT = "/"
OPENSTACK_ROOT = "/openstack"  # the version list: the one document that depends on the date


def root_document() -> Document:
    """`GET /`: the EC2 version list; Nova answers it before any identification."""
    return document(render_node([*EC2_VERSIONS, "latest"]))


_ROOT_DOC = root_document()


def normalize_path(path: str) -> str:
    """Nova's normalisation: the path percent-decoded (webob's PATH_INFO), then
    posixpath.normpath, with any leading `//` collapsed to `/`."""
    if "%" in path:
        path = unquote(path, errors="replace")
    return posixpath.normpath("/" + path.lstrip("/"))


class _IdentityPart(str):
    """A leaf of `/latest/dynamic/instance-identity/`, signed when first asked for."""

    __slots__ = ()


_IDENTITY_PARTS = ("document", "signature", "pkcs7", "rsa2048")


class InstanceDocuments:
    """The documents of one instance at one revision of its view."""

    __slots__ = ("_ec2", "_identity", "_memo", "_os_listing", "options", "view")

    def __init__(self, view: View, options: DocumentOptions) -> None:
        self.view = view
        self.options = options
        self._memo: dict[str, Target] = {}
        self._ec2: dict[str, dict[str, Any]] = {}
        self._os_listing: tuple[datetime.date, Document] | None = None
        self._identity: bytes | None = None

    @property
    def instance_id(self) -> str:
        return self.view.id

    @property
    def project_id(self) -> str:
        return self.view.project_id

    def lookup(self, path: str, today: datetime.date) -> Target:
        """The target for a normalised path (see `normalize_path`); raises NotFound."""
        hit = self._memo.get(path)
        if hit is not None:
            return hit
        tokens = path.split("/")[1:]
        if tokens[0] == "openstack":
            if len(tokens) == 1:
                return self._openstack_versions(today)
            target = self._openstack(tokens[1:])
        else:
            target = self._ec2_item(tokens[1:] if tokens[0] == "ec2" else tokens)
        self._memo[path] = target
        return target

    def forget(self, path: str | None = None) -> None:
        """Drop what was built for `path` (None: everything built, the EC2 trees too); a
        later lookup builds it again, the same bytes from the same view."""
        if path is None:
            self._memo.clear()
            self._ec2.clear()
            self._os_listing = None
            self._identity = None
        elif path == OPENSTACK_ROOT:
            self._os_listing = None
        else:
            self._memo.pop(path, None)

    # -- OpenStack ----------------------------------------------------------------------
    def _openstack_versions(self, today: datetime.date) -> Document:
        cached = self._os_listing
        if cached is not None and cached[0] == today:
            return cached[1]
        doc = document(render_node(list(visible_openstack_versions(today))))
        self._os_listing = (today, doc)
        return doc

    def _openstack(self, tokens: list[str]) -> Target:
        version = openstack_version(tokens[0])
        if version is None:
            raise NotFound(f"no OpenStack metadata version {tokens[0]!r}")
        if len(tokens) == 1:
            listing = openstack_listing(
                self.view, version, static_vendordata=self.options.static_vendordata is not None
            )
            return document(render_node(listing))
        name = "/".join(tokens[1:])
        view = self.view
        if name == "meta_data.json":
            md = meta_data(view, version, dhcp_domain=self.options.dhcp_domain)
            return md if isinstance(md, SeededDocument) else document(md, JSON)
        if name == "user_data" and view.user_data is not None:
            return document(view.user_data)
        if name == "password" and openstack_at_least(version, GRIZZLY):
            return PasswordTarget(document((view.password or "").encode(), PASSWORD_TYPE))
        if name == "vendor_data.json" and openstack_at_least(version, HAVANA):
            static = self.options.static_vendordata
            if static is not None:
                return document(dump(static), JSON)
        if name == "vendor_data2.json" and openstack_at_least(version, NEWTON_TWO):
            static = self.options.static_vendordata
            if self.options.dynamic_vendordata:
                return DynamicVendorTarget(static)
            return document(dump({} if static is None else {"static": static}), JSON)
        if name == "network_data.json":
            return document(dump(network_data(view)), JSON)
        raise NotFound(f"no OpenStack metadata document {name!r}")

    # -- EC2 ----------------------------------------------------------------------------
    def _ec2_node(self, tokens: list[str]) -> Any:
        """The EC2 tree node at a path below the root (a dict, list or leaf)."""
        version = ec2_version(tokens[0])
        if version is None:
            raise NotFound(f"no EC2 metadata version {tokens[0]!r}")
        key = "latest" if tokens[0] == "latest" else version
        tree = self._ec2.get(key)
        if tree is None:
            opts = self.options
            tree = ec2_tree(self.view, version, dhcp_domain=opts.dhcp_domain,
                            latest=key == "latest", expose_tags=opts.expose_tags)
            if key == "latest" and opts.identity is not None:
                tree["dynamic"] = {"instance-identity": {
                    part: _IdentityPart(part) for part in _IDENTITY_PARTS}}
            self._ec2[key] = tree
        node: Any = tree
        for part in tokens[1:]:
            if not isinstance(node, Mapping) or part not in node or part == NAME_KEY:
                raise NotFound("no such metadata path")
            node = node[part]
        return node

    def _ec2_item(self, tokens: list[str]) -> Target:
        if not tokens:
            return _ROOT_DOC
        node = self._ec2_node(tokens)
        if isinstance(node, RequestAddress):
            return _ADDRESS
        if isinstance(node, _IdentityPart):
            return self._identity_part(node)
        return document(render_node(node))

    def _identity_part(self, part: str) -> Document:
        signer = self.options.identity
        assert signer is not None
        doc = self._identity
        if doc is None:
            doc = self._identity = identity_document(
                self.view, region=self.options.region, architecture=self.options.architecture)
        if part == "document":
            return document(doc, JSON)
        if part == "signature":
            return document(signer.signature(doc))
        return document(signer.pkcs7(doc))

    def lookup_json(self, path: str) -> Target:
        """GCE's `?recursive=true&alt=json` on an EC2 path: the subtree as one JSON object
        (a leaf as a JSON string). Raises NotFound; `local-ipv4` from the request is left
        to the plain lookup (AddressLeaf)."""
        memo_key = path + "?json"
        hit = self._memo.get(memo_key)
        if hit is not None:
            return hit
        tokens = path.split("/")[1:]
        if tokens[0] == "ec2":
            tokens = tokens[1:]
        if not tokens or tokens[0] in ("", "openstack"):
            raise NotFound("recursive JSON is served for EC2 paths only")
        node = self._ec2_node(tokens)
        if isinstance(node, RequestAddress):
            return _ADDRESS
        target = document(json.dumps(self._jsonable(node), sort_keys=True,
                                     separators=(",", ":")).encode(), JSON)
        self._memo[memo_key] = target
        return target

    def _jsonable(self, node: Any) -> Any:
        if isinstance(node, _IdentityPart):
            body = self._identity_part(node).body.decode()
            return json.loads(body) if node == "document" else body
        if isinstance(node, Mapping):
            return {k: self._jsonable(v) for k, v in node.items() if k != NAME_KEY}
        if isinstance(node, RequestAddress):
            return ""
        if isinstance(node, bytes):
            return node.decode("utf-8", "replace")
        if isinstance(node, str):
            return node
        if isinstance(node, Sequence):
            return [str(item) for item in node]
        return str(node)
