"""The OpenStack tree's documents, as Nova's `InstanceMetadata` builds them.

`meta_data.json` keys come in Nova's order and per-version gating (see metadata-api.md §2.4):
uuid, meta (if any), public_keys + keys (if the instance's key pair exists), hostname, name,
launch_index, availability_zone, random_seed (>= 2013-04-04), project_id (>= 2015-10-15),
devices (>= 2016-06-30; no device tags exist here, so `[]`), dedicated_cpus (>= 2020-10-14,
`[]`). Serialisation is `json.dumps` with default separators, as oslo's `dump_as_bytes`.

`random_seed` is fresh on every request in Nova. We keep that: the document is stored as a
template split around the seed, and the server splices 512 fresh random bytes (base64) in
per request; its ETag is weak, as the rest of the document is what it identifies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from openimds.core.metadata.ec2 import hostname_of
from openimds.core.metadata.listing import JSON, etag_of
from openimds.core.metadata.versions import (
    GRIZZLY,
    HAVANA,
    LIBERTY,
    NEWTON_ONE,
    NEWTON_TWO,
    VICTORIA,
    openstack_at_least,
)
from openimds.core.metadata.view import View

__all__ = ["SeededDocument", "dump", "meta_data", "openstack_listing"]

_SEED_MARK = "\x00openimds-random-seed\x00"
_SEED_MARK_JSON = json.dumps(_SEED_MARK).encode()


def dump(value: Any) -> bytes:
    """JSON bytes exactly as Nova's `jsonutils.dump_as_bytes`."""
    return json.dumps(value).encode()


@dataclass(frozen=True, slots=True)
class SeededDocument:
    """meta_data.json with a hole for random_seed: prefix + '"<base64>"' + suffix."""

    prefix: bytes
    suffix: bytes
    etag: str
    content_type: str = JSON

    def render(self, seed_b64: bytes) -> bytes:
        return b"".join((self.prefix, b'"', seed_b64, b'"', self.suffix))


def meta_data(view: View, version: str, *, dhcp_domain: str) -> bytes | SeededDocument:
    """meta_data.json for one version: bytes, or a seeded template from 2013-04-04 on."""
    md: dict[str, Any] = {"uuid": view.id}
    if view.metadata:
        md["meta"] = dict(view.metadata)
    if view.keypair is not None:
        md["public_keys"] = {view.keypair.name: view.keypair.public_key}
        md["keys"] = [{"name": view.keypair.name, "type": view.keypair.type,
                       "data": view.keypair.public_key}]
    md["hostname"] = hostname_of(view, dhcp_domain)
    md["name"] = view.name
    md["launch_index"] = view.launch_index
    md["availability_zone"] = view.availability_zone
    seeded = openstack_at_least(version, GRIZZLY)
    if seeded:
        md["random_seed"] = _SEED_MARK
    if openstack_at_least(version, LIBERTY):
        md["project_id"] = view.project_id
    if openstack_at_least(version, NEWTON_ONE):
        md["devices"] = []
    if openstack_at_least(version, VICTORIA):
        md["dedicated_cpus"] = []
    body = dump(md)
    if not seeded:
        return body
    # The mark is the last string before project_id/devices/dedicated_cpus, none of which
    # can contain it, so the last occurrence is the seed's.
    prefix, _, suffix = body.rpartition(_SEED_MARK_JSON)
    return SeededDocument(prefix, suffix, "W/" + etag_of(prefix + b"\x00" + suffix))


def openstack_listing(
    view: View, version: str, *, static_vendordata: bool
) -> list[str]:
    """The `/openstack/<version>` listing, in Nova's order.

    Unlike Nova, vendor_data.json is listed only when it is served (StaticJSON enabled).
    """
    names = ["meta_data.json"]
    if view.user_data is not None:
        names.append("user_data")
    if openstack_at_least(version, GRIZZLY):
        names.append("password")
    if openstack_at_least(version, HAVANA) and static_vendordata:
        names.append("vendor_data.json")
    if openstack_at_least(version, LIBERTY):
        names.append("network_data.json")
    if openstack_at_least(version, NEWTON_TWO):
        names.append("vendor_data2.json")
    return names
