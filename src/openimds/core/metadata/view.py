"""The registry's metadata view (`GET /v1/instances/{id}/view`) as typed, frozen data.

`parse_view(dict)` is the only place that knows the view's JSON shape; everything else in
this package works on these dataclasses. See docs/architecture.md, "Metadata view".
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from openimds.errors import BadRequest

__all__ = ["Keypair", "Port", "Subnet", "View", "parse_view"]


@dataclass(frozen=True, slots=True)
class Keypair:
    id: str
    name: str
    public_key: str
    type: str


@dataclass(frozen=True, slots=True)
class Subnet:
    id: str
    cidr: str
    ip_version: int
    gateway_ip: str | None
    enable_dhcp: bool
    dns_nameservers: tuple[str, ...]
    host_routes: tuple[tuple[str, str], ...]  # (destination CIDR, nexthop)
    isolated: bool
    dhcp_ip: str | None  # the lowest of dhcp_ips: the one network_data.json routes via
    ipv6_address_mode: str | None = None  # slaac, dhcpv6-stateful, dhcpv6-stateless
    dhcp_ips: tuple[str, ...] = ()  # every DHCP port's address here (one per DHCP node)


@dataclass(frozen=True, slots=True)
class Port:
    id: str
    mac_address: str
    network_id: str
    network_mtu: int | None
    fixed_ips: tuple[tuple[str, str], ...]  # (subnet_id, ip_address)
    subnets: tuple[Subnet, ...]


@dataclass(frozen=True, slots=True)
class View:
    revision: int
    id: str
    name: str
    hostname: str
    project_id: str
    availability_zone: str | None
    flavor: str
    launch_index: int
    key_name: str | None
    keypair_id: str | None
    metadata: tuple[tuple[str, str], ...]
    user_data: bytes | None
    image_id: str | None
    ec2_id: int
    password: str | None
    keypair: Keypair | None
    ports: tuple[Port, ...]
    created_at: str = ""

    def first_ipv4(self) -> str | None:
        for port in self.ports:
            versions = {s.id: s.ip_version for s in port.subnets}
            for subnet_id, ip in port.fixed_ips:
                if versions.get(subnet_id, 6 if ":" in ip else 4) == 4 and ":" not in ip:
                    return ip
        return None


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _ip_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return (addr.version, int(addr))


def _subnet(raw: Mapping[str, Any]) -> Subnet:
    ips = [_str(i) for i in raw.get("dhcp_ips") or ()]
    if not ips and raw.get("dhcp_ip"):
        ips = [_str(raw["dhcp_ip"])]
    ips.sort(key=_ip_key)
    return Subnet(
        id=_str(raw["id"]),
        cidr=_str(raw["cidr"]),
        ip_version=int(raw.get("ip_version") or (6 if ":" in _str(raw["cidr"]) else 4)),
        gateway_ip=raw.get("gateway_ip") or None,
        enable_dhcp=bool(raw.get("enable_dhcp", True)),
        dns_nameservers=tuple(_str(d) for d in raw.get("dns_nameservers") or ()),
        host_routes=tuple(
            (_str(r["destination"]), _str(r["nexthop"])) for r in raw.get("host_routes") or ()
        ),
        isolated=bool(raw.get("isolated", True)),
        dhcp_ip=ips[0] if ips else None,
        ipv6_address_mode=raw.get("ipv6_address_mode") or None,
        dhcp_ips=tuple(ips),
    )


def _port(raw: Mapping[str, Any]) -> Port:
    network = raw.get("network") or {}
    mtu = network.get("mtu")
    return Port(
        id=_str(raw["id"]),
        mac_address=_str(raw.get("mac_address")),
        network_id=_str(raw.get("network_id") or network.get("id")),
        network_mtu=int(mtu) if mtu is not None else None,
        fixed_ips=tuple(
            (_str(f.get("subnet_id")), _str(f["ip_address"])) for f in raw.get("fixed_ips") or ()
        ),
        subnets=tuple(_subnet(s) for s in raw.get("subnets") or ()),
    )


def parse_view(raw: Mapping[str, Any]) -> View:
    """Typed view from the registry's JSON; raises BadRequest naming a missing field."""
    try:
        inst = raw["instance"]
        user_data: bytes | None = None
        if inst.get("user_data") is not None:
            user_data = base64.b64decode(inst["user_data"], validate=False)
        kp = raw.get("keypair")
        keypair = None
        if kp:
            keypair = Keypair(
                id=_str(kp.get("id")), name=_str(kp["name"]),
                public_key=_str(kp["public_key"]), type=_str(kp.get("type") or "ssh"),
            )
        meta = inst.get("metadata") or {}
        return View(
            revision=int(raw.get("revision") or 0),
            id=_str(inst["id"]),
            name=_str(inst.get("name")),
            hostname=_str(inst.get("hostname") or inst.get("name")),
            project_id=_str(inst["project_id"]),
            availability_zone=inst.get("availability_zone"),
            flavor=_str(inst.get("flavor")),
            launch_index=int(inst.get("launch_index") or 0),
            key_name=inst.get("key_name") or None,
            keypair_id=inst.get("keypair_id") or None,
            metadata=tuple((str(k), _str(v)) for k, v in meta.items()),
            user_data=user_data,
            image_id=inst.get("image_id") or None,
            ec2_id=int(inst.get("ec2_id") or 0),
            password=inst.get("password"),
            keypair=keypair,
            ports=tuple(_port(p) for p in raw.get("ports") or inst.get("ports") or ()),
            created_at=_str(inst.get("created_at")),
        )
    except KeyError as exc:
        raise BadRequest(f"metadata view lacks field {exc.args[0]!r}") from None
    except (TypeError, ValueError, binascii.Error) as exc:
        raise BadRequest(f"metadata view is malformed: {exc}") from None
