"""The network fabric: one Linux bridge per network, `brq` + network id[:11], and on a node
with a tunnel address one VXLAN device per network in it, as Neutron's linuxbridge agent.

Rules: the fabric touches only bridges whose name has our prefix and the shape of a network
id (`brq` + 11 lowercase hex/dash characters). It creates what the registry has, and deletes a
bridge the registry no longer has only once nothing is attached to it: another agent (DHCP,
a lab VM) with a newer view may already have plugged into a bridge for a network this agent
has not heard of yet, and deleting it would silently cut that port off. The agent owning an
attached leg removes it first; the next converge then deletes the empty bridge.

VXLAN (`[fabric] local_ip` set): the network's bridge also holds `vxlan-<VNI>` (the network's
`segmentation_id` from the registry), local address local_ip, learning on. Broadcast, unknown
unicast and multicast reach the other nodes either through `[fabric] vxlan_group` (multicast,
the device bound to the link holding local_ip) or, without a group, through one all-zeros FDB
entry per `[fabric] flood_peers` address (head-end replication). The VXLAN port does not make
a bridge busy: it goes with its bridge. Without local_ip nothing of this exists: a single
node's networks stay on its own bridges, exactly as before.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from openimds.config import FabricSettings
from openimds.core.names import bridge_name
from openimds.errors import ConfigError
from openimds.host.links import LinkInfo, Netlink

log = logging.getLogger(__name__)

BRIDGE_PREFIX = "brq"
VXLAN_PREFIX = "vxlan-"
_OUR_BRIDGE = re.compile(r"^brq[0-9a-f-]{11}$")
# IP + UDP + VXLAN headers over IPv4, what the underlay MTU must exceed the network's by.
VXLAN_OVERHEAD = 50


def is_our_bridge(name: str) -> bool:
    return bool(_OUR_BRIDGE.match(name))


def vxlan_name(vni: int) -> str:
    return f"{VXLAN_PREFIX}{vni}"


def _is_our_vxlan(link: LinkInfo) -> bool:
    return link.kind == "vxlan" and link.name.startswith(VXLAN_PREFIX)


@dataclass(frozen=True, slots=True)
class Tunnel:
    """This node's VXLAN endpoint."""

    local_ip: str
    port: int = 4789
    group: str | None = None
    peers: tuple[str, ...] = ()  # flood entries when there is no group (never local_ip)
    ttl: int = 0


def tunnel_from(fabric: FabricSettings) -> Tunnel | None:
    """The node's tunnel from `[fabric]`, None when local_ip is empty (single node)."""
    if not fabric.local_ip:
        return None

    def parse(value: str, key: str) -> str:
        try:
            ip = ipaddress.ip_address(value)
        except ValueError:
            raise ConfigError(f"[fabric] {key}: {value!r} is not an IP address") from None
        if ip.version != 4:
            raise ConfigError(f"[fabric] {key}: {value!r}: VXLAN tunnels are IPv4 here")
        return str(ip)

    local = parse(fabric.local_ip, "local_ip")
    group = parse(fabric.vxlan_group, "vxlan_group") if fabric.vxlan_group else None
    if group is not None and not ipaddress.ip_address(group).is_multicast:
        raise ConfigError(f"[fabric] vxlan_group: {group!r} is not a multicast address")
    peers = tuple(sorted({parse(p, "flood_peers") for p in fabric.flood_peers} - {local}))
    return Tunnel(local, fabric.vxlan_port, group, () if group else peers, fabric.vxlan_ttl)


@dataclass(frozen=True, slots=True)
class BridgeSpec:
    name: str
    network_id: str
    mtu: int
    vni: int | None = None  # the network's segmentation_id (used only with a Tunnel)


def bridge_spec(network: Mapping[str, Any]) -> BridgeSpec:
    """The bridge a registry network calls for."""
    vni = network.get("segmentation_id")
    return BridgeSpec(bridge_name(str(network["id"])), str(network["id"]),
                      int(network.get("mtu") or 1500), int(vni) if vni else None)


def bridges_for(networks: Iterable[Mapping[str, Any]]) -> dict[str, BridgeSpec]:
    """The bridges the registry's networks call for, by bridge name."""
    return {spec.name: spec for spec in map(bridge_spec, networks)}


@dataclass(slots=True)
class FabricReport:
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept_busy: list[str] = field(default_factory=list)


def ensure_bridge(nl: Netlink, spec: BridgeSpec, tunnel: Tunnel | None = None) -> bool:
    """One network's bridge, up, with its MTU (and its VXLAN port on a tunnel node); True if
    the bridge was created now."""
    created = nl.ensure_bridge(spec.name, mtu=spec.mtu)
    if tunnel is not None and spec.vni is not None:
        ensure_vxlan(nl, spec, tunnel)
    return created


def ensure_vxlan(nl: Netlink, spec: BridgeSpec, tunnel: Tunnel) -> None:
    assert spec.vni is not None
    name = vxlan_name(spec.vni)
    device = None
    if tunnel.group:
        device = nl.link_with_address(tunnel.local_ip)
        if device is None:
            raise ConfigError(f"[fabric] local_ip: no link holds {tunnel.local_ip}")
    nl.ensure_vxlan(name, vni=spec.vni, local=tunnel.local_ip, port=tunnel.port,
                    group=tunnel.group, device=device, ttl=tunnel.ttl, mtu=spec.mtu,
                    master=spec.name)
    if not tunnel.group:
        nl.set_flood_peers(name, tunnel.peers)


def converge(
    nl: Netlink, networks: Iterable[Mapping[str, Any]], *, delete_stale: bool = True,
    tunnel: Tunnel | None = None,
) -> FabricReport:
    """Create missing bridges (and VXLAN ports); delete ours the registry no longer has, if
    nothing but their VXLAN port is attached."""
    want = bridges_for(networks)
    report = FabricReport()
    every = nl.links()  # one dump, not one per network
    have = {link.name: link for link in every if link.name.startswith(BRIDGE_PREFIX)}
    vxlans = {link.name: link for link in every if _is_our_vxlan(link)}
    for spec in want.values():
        link = have.get(spec.name)
        if link is not None and link.kind == "bridge" and link.up and link.mtu == spec.mtu:
            if tunnel is None or spec.vni is None:
                continue
            port = vxlans.get(vxlan_name(spec.vni))
            if port is not None and port.master == link.index and port.up:
                continue
        if ensure_bridge(nl, spec, tunnel):
            report.created.append(spec.name)
    if not delete_stale:
        return report
    for link in have.values():
        if link.kind != "bridge" or not is_our_bridge(link.name) or link.name in want:
            continue
        if delete_bridge_if_unused(nl, link.name):
            report.deleted.append(link.name)
        else:
            report.kept_busy.append(link.name)
    if report.created or report.deleted:
        log.info("fabric.converged created=%s deleted=%s busy=%s",
                 report.created, report.deleted, report.kept_busy)
    return report


def delete_bridge_if_unused(nl: Netlink, bridge: str) -> bool:
    """Delete a bridge (and its VXLAN port) if nothing else is attached; True if it went."""
    if nl.link(bridge) is None:
        return False
    attached = nl.bridge_ports(bridge)
    if any(not _is_our_vxlan(port) for port in attached):
        return False
    for port in attached:
        nl.delete_link(port.name)
    nl.delete_link(bridge)
    return True
