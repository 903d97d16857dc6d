"""The EC2-compatible tree, gated per version exactly as Nova's `get_ec2_metadata`.

`ec2_tree(view, version, options)` returns `{"meta-data": {...}, "user-data"?: bytes}`.
Values Nova takes from tables we do not have are derived from the instance, stably:

- `ami-id`: Nova numbers images in `S3ImageMapping`; we use the image UUID's first 32 bits
  (`ami-00000000` without an image);
- `reservation-id`: Nova stores a random `r-` + 8 base-36 characters at boot; we derive those
  8 characters from the instance UUID;
- `security-groups`: the registry has no security groups; every Neutron port is in `default`
  unless told otherwise, so that is what we list;
- `block-device-mapping`: a libvirt instance booted from an image (`ami`: `vda`, `root`:
  `/dev/vda`), what cloud-init's crawl reads;
- `public-ipv4`: empty (the registry has no floating IPs), as Nova without one.

`local-ipv4` is the first fixed IPv4; with none, Nova uses the request's address, so the
tree then holds `REQUEST_ADDRESS` and the server fills it in per request.

Only `latest` (which Nova maps to 2009-04-04) also carries a few newer AWS keys that
botocore and the `ec2-metadata` package read and that we can always answer: `mac`,
`instance-life-cycle`, `services/partition` and `services/domain` (when `dhcp_domain` is set).
No listed key ever answers 404.

With `[api] expose_tags` (AWS's `InstanceMetadataTags=enabled`), `latest` also has
`tags/instance/<key>`: the instance's properties whose key follows AWS's rules for tags in
metadata (letters, digits and `+-=._:@`; not `.`, `..` or `_index`); others are left out.
"""

from __future__ import annotations

import hashlib
import re
import string
from typing import Any, Final

from openimds.core.metadata.listing import NAME_KEY
from openimds.core.metadata.versions import ec2_at_least
from openimds.core.metadata.view import View

__all__ = ["REQUEST_ADDRESS", "RequestAddress", "ec2_tree", "hostname_of", "is_tag_key"]


class RequestAddress:
    """Marks the `local-ipv4` leaf that is the request's address (no fixed IPv4)."""

    __slots__ = ()


REQUEST_ADDRESS: Final = RequestAddress()
_BASE36 = string.digits + string.ascii_lowercase
_TAG_KEY = re.compile(r"[A-Za-z0-9+\-=._:@]{1,128}")
_TAG_RESERVED = frozenset({".", "..", "_index"})


def is_tag_key(key: str) -> bool:
    """AWS's rule for a tag key that instance metadata can carry."""
    return key not in _TAG_RESERVED and _TAG_KEY.fullmatch(key) is not None


def hostname_of(view: View, dhcp_domain: str) -> str:
    """Nova's `_get_hostname`: the hostname, plus `.dhcp_domain` when one is set."""
    return f"{view.hostname}.{dhcp_domain}" if dhcp_domain else view.hostname


def ami_id(image_id: str | None) -> str:
    if not image_id:
        return "ami-00000000"
    digits = "".join(c for c in image_id if c in string.hexdigits)[:8] or "0"
    return f"ami-{int(digits, 16):08x}"


def reservation_id(instance_id: str) -> str:
    digest = hashlib.sha256(instance_id.encode()).digest()
    return "r-" + "".join(_BASE36[b % 36] for b in digest[:8])


def ec2_tree(
    view: View, version: str, *, dhcp_domain: str, latest: bool, expose_tags: bool = False,
) -> dict[str, Any]:
    """The EC2 tree for one version (`latest` = the newest, plus the extra AWS keys)."""
    hostname = hostname_of(view, dhcp_domain)
    local_ipv4: str | RequestAddress = view.first_ipv4() or REQUEST_ADDRESS
    meta: dict[str, Any] = {
        "ami-id": ami_id(view.image_id),
        "ami-launch-index": str(view.launch_index),
        "ami-manifest-path": "FIXME",
        "instance-id": f"i-{view.ec2_id:08x}",
        "hostname": hostname,
        "local-ipv4": local_ipv4,
        "reservation-id": reservation_id(view.id),
        "security-groups": ["default"],
    }
    if view.keypair is not None:
        meta["public-keys"] = {
            "0": {NAME_KEY: "0=" + view.keypair.name, "openssh-key": view.keypair.public_key}
        }
    if ec2_at_least(version, "2007-01-19"):
        meta["local-hostname"] = hostname
        meta["public-hostname"] = hostname
        meta["public-ipv4"] = ""
    if ec2_at_least(version, "2007-08-29"):
        meta["instance-type"] = view.flavor
    if ec2_at_least(version, "2007-12-15"):
        meta["block-device-mapping"] = {"ami": "vda", "root": "/dev/vda"}
    if ec2_at_least(version, "2008-02-01"):
        meta["placement"] = {"availability-zone": view.availability_zone or ""}
    if ec2_at_least(version, "2008-09-01"):
        meta["instance-action"] = "none"
    if latest:
        if view.ports:
            meta["mac"] = view.ports[0].mac_address
        meta["instance-life-cycle"] = "on-demand"
        services = {"partition": "openstack"}
        if dhcp_domain:
            services["domain"] = dhcp_domain
        meta["services"] = services
        if expose_tags:
            meta["tags"] = {"instance": {k: v for k, v in view.metadata if is_tag_key(k)}}
    tree: dict[str, Any] = {"meta-data": meta}
    if view.user_data is not None:
        tree["user-data"] = view.user_data
    return tree
