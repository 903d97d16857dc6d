"""DHCP ports per (network, DHCP node), kept in step with the bindings (SQL side).

The policy is `core.nodes.dhcp_ports`; this module reads a network's DHCP ports, asks it, and
writes the answer inside the caller's write transaction: a re-bound port only changes its
device_id (same port, MAC and IPs: the new node takes the address over), a new port gets the
first free IP of every DHCP-enabled subnet (the EUI-64 of its MAC on auto-address IPv6
subnets), a freed port is deleted. Every change is a port change row, so agents follow it.

Callers: the scheduler after it moves bindings, and subnet creation. `stale()` is the cheap
read the scheduler's plan uses to find networks whose ports do not match their bindings
(ports written before this scheme, by `dhcp-<network id>`), so they are fixed on the next tick.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from openimds.core import nodes
from openimds.core.models import (
    DEVICE_OWNER_DHCP,
    DHCP_RESERVED_DEVICE_ID,
    dhcp_adopted_device_id,
    dhcp_device_id,
)
from openimds.registry.allocation import (
    auto_address,
    delete_port,
    free_ip,
    insert_port,
    is_auto_address,
    new_mac,
    no_free_ip,
)
from openimds.registry.records import Json, port_change
from openimds.registry.store import Tx, networks, port_ips, ports, subnets

log = logging.getLogger(__name__)


def _ports_of(conn: Connection, network_id: str) -> dict[str, Any]:
    return {p.id: p for p in conn.execute(sa.select(ports).where(
        ports.c.network_id == network_id, ports.c.device_owner == DEVICE_OWNER_DHCP))}


def _dhcp_subnets(conn: Connection, network_id: str) -> list[Any]:
    return list(conn.execute(sa.select(subnets).where(
        subnets.c.network_id == network_id, subnets.c.enable_dhcp.is_(True))
        .order_by(subnets.c.created_at, subnets.c.id)))


def sync(tx: Tx, network_id: str, hosts: Sequence[str],
         adopt: Mapping[str, str] | None = None) -> nodes.DhcpPortPlan:
    """Give each of hosts its own DHCP port on the network (see module doc); adopt: dead
    host -> the bound host that adopts its port (`nodes.dhcp_ports`)."""
    conn = tx.conn
    current = _ports_of(conn, network_id)
    subs = _dhcp_subnets(conn, network_id)
    plan = nodes.dhcp_ports(network_id, hosts, {p.id: p.device_id for p in current.values()},
                            has_dhcp=bool(subs), adopt=adopt)
    for pid, device_id in plan.rebind.items():
        port = current[pid]
        conn.execute(ports.update().where(ports.c.id == pid)
                     .values(device_id=device_id, revision=tx.revision))
        ips = conn.execute(sa.select(port_ips.c.ip_address)
                           .where(port_ips.c.port_id == pid)).scalars()
        port_change(tx, "update", {**port._asdict(), "device_id": device_id}, ips)
        log.info("registry.dhcp_port_rebound network=%s port=%s from=%s to=%s", network_id,
                 pid, port.device_id, device_id)
    for pid in plan.delete:
        delete_port(tx, current[pid])
        log.info("registry.dhcp_port_freed network=%s port=%s device=%s", network_id, pid,
                 current[pid].device_id)
    if plan.create:
        network = conn.execute(sa.select(networks).where(networks.c.id == network_id)).one()
        for host in plan.create:
            create(tx, network, subs, dhcp_device_id(host, network_id))
    return plan


def create(tx: Tx, network: Any, subs: Sequence[Any], device_id: str) -> Json | None:
    """A new DHCP port with an address on each of subs; None (logged) if no subnet has one
    free: a full pool must not fail the heartbeat or subnet write that asked for it."""
    conn = tx.conn
    mac = new_mac(conn)
    fixed: list[tuple[str, str]] = []
    for s in subs:
        ip = auto_address(s, mac) if is_auto_address(s) else free_ip(tx, s)
        if ip is None:
            log.warning("registry.dhcp_port_no_ip network=%s subnet=%s cidr=%s device=%s",
                        network.id, s.id, s.cidr, device_id)
            continue
        fixed.append((s.id, str(ip)))
    if not fixed:
        return None
    return insert_port(tx, network_id=network.id, project_id=network.project_id,
                       device_id=device_id, device_owner=DEVICE_OWNER_DHCP, fixed=fixed,
                       mac=mac)


def add_subnet(tx: Tx, network: Any, subnet_id: str, hosts: Sequence[str]) -> None:
    """A new DHCP-enabled subnet: every DHCP port of the network gains an address on it,
    then each DHCP node without a port gets one (one port reserved while it has none).
    Conflict (the subnet is not created) when the pool has no address for a port."""
    conn = tx.conn
    row = conn.execute(sa.select(subnets).where(subnets.c.id == subnet_id)).one()
    current = _ports_of(conn, network.id)
    for pid in sorted(current):
        port = current[pid]
        ip = auto_address(row, port.mac_address) if is_auto_address(row) else free_ip(tx, row)
        if ip is None:
            raise no_free_ip(row, "for the DHCP port")
        before = list(conn.execute(sa.select(port_ips.c.ip_address)
                                   .where(port_ips.c.port_id == pid)).scalars())
        conn.execute(port_ips.insert().values(port_id=pid, subnet_id=row.id,
                                              network_id=network.id, ip_address=str(ip)))
        conn.execute(ports.update().where(ports.c.id == pid).values(revision=tx.revision))
        port_change(tx, "update", port, [*before, str(ip)])
    if not current and not hosts:
        if create(tx, network, [row], DHCP_RESERVED_DEVICE_ID) is None:
            raise no_free_ip(row, "for the DHCP port")
        return
    if not current and not is_auto_address(row) and free_ip(tx, row, take=False) is None:
        raise no_free_ip(row, "for the DHCP port")
    sync(tx, network.id, hosts)


def stale(conn: Connection, bound: Mapping[str, Sequence[str]]) -> list[str]:
    """Networks whose DHCP ports are not exactly one per bound host (a port named for no
    bound host, or a bound host without one while another port could be handed over)."""
    by_net: dict[str, list[str]] = {}
    for r in conn.execute(sa.select(ports.c.network_id, ports.c.device_id)
                          .where(ports.c.device_owner == DEVICE_OWNER_DHCP)):
        by_net.setdefault(r.network_id, []).append(r.device_id)
    out = []
    for nid, devices in by_net.items():
        hosts = bound.get(nid, ())
        if not hosts:
            if devices != [DHCP_RESERVED_DEVICE_ID]:
                out.append(nid)
            continue
        adopted = {dhcp_adopted_device_id(h, nid) for h in hosts}
        own = [d for d in devices if d not in adopted]  # adopted ports stay with their node
        if sorted(own) != sorted(dhcp_device_id(h, nid) for h in hosts):
            # a host lacking a port with nothing to hand over needs a new IP: that is the
            # binding's own write (sync), not a retry every tick
            if any(d not in {dhcp_device_id(h, nid) for h in hosts} for d in own) \
                    or len(own) != len(set(own)):
                out.append(nid)
    return sorted(out)
