"""The network fabric: one Linux bridge per network, `brq` + network id[:11].

Rules: the fabric touches only bridges whose name has our prefix and the shape of a network
id (`brq` + 11 lowercase hex/dash characters). It creates what the registry has, and deletes a
bridge the registry no longer has only once nothing is attached to it: another agent (DHCP,
a lab VM) with a newer view may already have plugged into a bridge for a network this agent
has not heard of yet, and deleting it would silently cut that port off. The agent owning an
attached leg removes it first; the next converge then deletes the empty bridge.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from openimds.core.names import bridge_name
from openimds.host.links import Netlink

log = logging.getLogger(__name__)

BRIDGE_PREFIX = "brq"
_OUR_BRIDGE = re.compile(r"^brq[0-9a-f-]{11}$")


def is_our_bridge(name: str) -> bool:
    return bool(_OUR_BRIDGE.match(name))


@dataclass(frozen=True, slots=True)
class BridgeSpec:
    name: str
    network_id: str
    mtu: int


def bridges_for(networks: Iterable[Mapping[str, Any]]) -> dict[str, BridgeSpec]:
    """The bridges the registry's networks call for, by bridge name."""
    out: dict[str, BridgeSpec] = {}
    for net in networks:
        name = bridge_name(str(net["id"]))
        out[name] = BridgeSpec(name, str(net["id"]), int(net.get("mtu") or 1500))
    return out


@dataclass(slots=True)
class FabricReport:
    created: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    kept_busy: list[str] = field(default_factory=list)


def ensure_bridge(nl: Netlink, spec: BridgeSpec) -> bool:
    """One network's bridge, up, with its MTU; True if created now."""
    return nl.ensure_bridge(spec.name, mtu=spec.mtu)


def converge(
    nl: Netlink, networks: Iterable[Mapping[str, Any]], *, delete_stale: bool = True,
) -> FabricReport:
    """Create missing bridges; delete ours the registry no longer has, if nothing is attached."""
    want = bridges_for(networks)
    report = FabricReport()
    have = {link.name: link for link in nl.links(BRIDGE_PREFIX)}  # one dump, not one per net
    for spec in want.values():
        link = have.get(spec.name)
        if link is not None and link.kind == "bridge" and link.up and link.mtu == spec.mtu:
            continue
        if ensure_bridge(nl, spec):
            report.created.append(spec.name)
    if not delete_stale:
        return report
    for link in have.values():
        if link.kind != "bridge" or not is_our_bridge(link.name) or link.name in want:
            continue
        if nl.bridge_ports(link.name):
            report.kept_busy.append(link.name)
            continue
        nl.delete_link(link.name)
        report.deleted.append(link.name)
    if report.created or report.deleted:
        log.info("fabric.converged created=%s deleted=%s busy=%s",
                 report.created, report.deleted, report.kept_busy)
    return report
