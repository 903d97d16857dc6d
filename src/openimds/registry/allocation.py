"""Ports and their fixed IPs: MACs, free-IP picks, requested IPs, insert and delete.

Runs inside a write transaction (`Tx`), so "first free IP" and the insert that takes it are
one atomic step (SQLite: BEGIN IMMEDIATE; PostgreSQL: the revision row lock). IPs come from
the subnet's allocation pools, never the gateway or an IP another port holds; a requested IP
may lie outside the pools but must be a host address of one of the network's subnets. The
subnet's free addresses are its availability ranges (registry/ipalloc.py): a pick, a
requested address and a deleted port each keep them in step.

IPv6 as Neutron: on an auto-address subnet (ipv6_address_mode slaac or dhcpv6-stateless) a
port's address is the EUI-64 of its MAC, every non-router port gets one on each such subnet,
and asking for a specific address there is refused; stateful DHCPv6 and static IPv6 subnets
hand out pool addresses like IPv4 (one subnet per version when nothing is asked).
"""

from __future__ import annotations

import secrets
from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from openimds.core import ipam
from openimds.core.models import DEVICE_OWNER_ROUTER
from openimds.errors import BadRequest, Conflict, NotFound
from openimds.registry import ipalloc
from openimds.registry.records import Json, new_id, now, port_change, port_dict
from openimds.registry.reuse import (
    DB_NOW,
    address_key,
    released_within,
    routers_key,
    routers_released_within,
)
from openimds.registry.store import Tx, networks, port_ips, ports, subnets

# Built once (a create runs each of them; building a statement costs more than running it).
_MAC_TAKEN = sa.select(ports.c.id).where(ports.c.mac_address == sa.bindparam("mac"))
_IP_TAKEN = sa.select(port_ips.c.port_id).where(
    port_ips.c.network_id == sa.bindparam("network_id"),
    port_ips.c.ip_address == sa.bindparam("ip"))
_NETWORK_SUBNETS = (sa.select(subnets).where(subnets.c.network_id == sa.bindparam("network_id"))
                    .order_by(subnets.c.created_at, subnets.c.id))
# The network, its subnets in `_NETWORK_SUBNETS` order and whether a drawn MAC is free, in one
# statement (`port_network`): a row per subnet (one with a NULL id when it has none), each
# usable as a subnet row, the network's project beside it; and the reuse hold's questions
# about the new port that do not depend on its addresses (registry/reuse.py): was the drawn
# MAC's link-local address, or the scope of a router on the network, released moments ago.
def _port_network(dialect: str) -> Any:
    joined = networks.outerjoin(subnets, subnets.c.network_id == networks.c.id)
    columns = [
        subnets, networks.c.project_id.label("net_project_id"),
        sa.exists(_MAC_TAKEN).label("mac_taken"),
        released_within(dialect, sa.bindparam("ll_key", type_=sa.String)).label("ll_held"),
        routers_released_within(dialect, sa.bindparam("id")).label("routers_held")]
    order = [subnets.c.created_at, subnets.c.id]
    if dialect == "postgresql":
        # with each subnet's pick rows too (`ipalloc.LATERAL_PICK`, a row per subnet and
        # pick source), so an automatic address costs its take only: one round trip fewer.
        # SQLite has no LATERAL, and no round trips to save: it picks as before.
        pick = ipalloc.LATERAL_PICK
        joined = joined.outerjoin(pick, sa.true())
        columns += [pick.c.src, pick.c.k, pick.c.l]
        order.append(pick.c.src)
    return (sa.select(*columns).select_from(joined).where(networks.c.id == sa.bindparam("id"))
            .order_by(*order))


_PORT_NETWORK = {dialect: _port_network(dialect) for dialect in DB_NOW}
# inline: no implicit RETURNING of the key (given), so either may run in a pipeline (Tx.later)
_INSERT_PORT = ports.insert().inline()
_INSERT_PORT_IPS = port_ips.insert().inline()
# a port's addresses with what `ipalloc.release` needs of their subnets
_PORT_IPS_SUBNETS = (
    sa.select(port_ips.c.ip_address, subnets.c.id, subnets.c.network_id, subnets.c.ip_version,
              subnets.c.ipv6_address_mode, subnets.c.allocation_pools)
    .join(subnets, subnets.c.id == port_ips.c.subnet_id)
    .where(port_ips.c.port_id == sa.bindparam("port_id")))
_DELETE_PORT_IPS = port_ips.delete().where(port_ips.c.port_id == sa.bindparam("port_id"))
_DELETE_PORT = ports.delete().where(ports.c.id == sa.bindparam("port_id"))


def new_mac(conn: Connection) -> str:
    for _ in range(64):
        mac = ipam.generate_mac(secrets.token_bytes)
        if conn.execute(_MAC_TAKEN, {"mac": mac}).first() is None:
            return mac
    raise Conflict("could not find a free MAC address after 64 tries")


class PortNetwork(NamedTuple):
    """What a new port needs of its network (`port_network`)."""

    project_id: str
    subnets: list[Row[Any]]  # in `allocate`'s order
    mac: str  # free when read
    # subnet id -> its pick's rows (`ipalloc.pick`'s read), PostgreSQL only
    picks: dict[str, list[Row[Any]]]


class NetworkRead(NamedTuple):
    """`port_network`'s read, made before the write so it can go with its first round trip
    (`Store.write(first=NetworkRead.query)`)."""

    network_id: str
    mac: str  # the drawn MAC the read checks
    ll_key: str  # its link-local address's release key
    query: tuple[Any, dict[str, Any]]


def network_read(backend: str, network_id: str, window_s: float) -> NetworkRead:
    """The read of `port_network` for a new port on network_id, with a freshly drawn MAC, on
    `backend` ("sqlite" or "postgresql"); window_s: the store's `reuse_window_s`."""
    mac = ipam.generate_mac(secrets.token_bytes)
    ll_key = address_key(network_id, str(ipam.link_local_address(mac)))
    params = {"id": network_id, "mac": mac, "ll_key": ll_key, "window": window_s,
              "prefix": address_key(network_id, "")}
    return NetworkRead(network_id, mac, ll_key, (_PORT_NETWORK[backend], params))


def port_network(tx: Tx, read: NetworkRead, field: str = "network_id") -> PortNetwork:
    """The network a new port goes on (missing: 404 naming `field`, as `ref_row`), its
    subnets and a free MAC, in one read (`network_read`; its rows are `tx.first` when the
    write ran it with the bump, else it runs here): the first draw is checked by the same
    read (else `new_mac`), and `allocate` is given the subnets instead of reading them
    again. The same read answers the reuse hold about the drawn MAC's link-local address
    and the network's routers (`Tx.released_seen`) and, on PostgreSQL, reads each subnet's
    pick (`PortNetwork.picks`, for `allocate`'s automatic addresses)."""
    conn = tx.conn
    network_id, mac, ll_key = read.network_id, read.mac, read.ll_key
    pg = conn.dialect.name == "postgresql"
    rows: list[Any] | None = tx.first
    if rows is None:
        rows = list(conn.execute(*read.query))
    if not rows:
        raise NotFound(f"{field}: network {network_id} not found")
    first = rows[0]
    tx.released_seen[routers_key(network_id)] = bool(first.routers_held)
    if first.mac_taken:
        mac = new_mac(conn)  # its link-local address is left to the hold's own check
    else:
        tx.released_seen[ll_key] = bool(first.ll_held)
    subs: dict[str, Row[Any]] = {}
    picks: dict[str, list[Row[Any]]] = {}
    for r in rows:
        if r.id is None:
            continue
        subs.setdefault(r.id, r)
        if pg:
            picks.setdefault(r.id, [])
            if r.src is not None:  # (none at all: a subnet without state, built by its pick)
                picks[r.id].append(r)
    return PortNetwork(str(first.net_project_id), list(subs.values()), mac, picks)


def free_ip(tx: Tx, subnet: Row[Any], *, take: bool = True) -> ipam.IPAddress | None:
    """The lowest free pool address, one released moments ago (the IP quarantine) only when
    no other is free; taken from the subnet's free state unless take=False (`ipalloc.pick`)."""
    return ipalloc.pick(tx, subnet, take=take)


def no_free_ip(subnet: Row[Any], purpose: str = "") -> Conflict:
    """The 409 for a full subnet, naming it."""
    return Conflict(f"no free IP address left on subnet {subnet.id} ({subnet.cidr})"
                    + (f" {purpose}" if purpose else ""))


def is_auto_address(subnet: Row[Any]) -> bool:
    return subnet.ip_version == 6 and subnet.ipv6_address_mode in ipam.AUTO_ADDRESS_MODES


def auto_address(subnet: Row[Any], mac: str) -> ipam.IPAddress:
    return ipam.eui64_address(ipam.parse_cidr(subnet.cidr), mac)


def allocate(
    tx: Tx, network_id: str, requests: Any, *, device_owner: str, mac: str,
    field: str = "fixed_ips", subs: list[Row[Any]] | None = None,
    picks: dict[str, list[Row[Any]]] | None = None,
) -> list[tuple[str, str]]:
    """(subnet_id, ip) pairs for a new port with this MAC on network_id, taken from the
    subnets' free state. An address picked for the port (none requested) avoids those
    released moments ago (the IP quarantine) while another is free; asked for, it is given.
    subs, picks: the network's subnets and their picks as `port_network` read them in this
    transaction (else read here)."""
    conn = tx.conn
    if subs is None:
        subs = list(conn.execute(_NETWORK_SUBNETS, {"network_id": network_id}))
    if not subs:
        raise BadRequest(f"network_id: network {network_id} has no subnets")

    def free(subnet: Row[Any]) -> ipam.IPAddress | None:
        return free_ip(tx, subnet)

    out: list[tuple[str, str]] = []
    if device_owner != DEVICE_OWNER_ROUTER:
        out += [(s.id, str(auto_address(s, mac))) for s in subs if is_auto_address(s)]
    if requests is None:
        # each subnet picked from at most once, nothing taken before: its pick as read
        read = picks or {}
        for version in (4, 6):
            candidates = [s for s in subs if s.ip_version == version
                          and not is_auto_address(s)]
            for s in candidates:
                ip = ipalloc.pick(tx, s, read=read.get(s.id))
                if ip is not None:
                    out.append((s.id, str(ip)))
                    break
        if not out:
            full = ", ".join(f"{s.id} ({s.cidr})" for s in subs)
            raise Conflict(f"no free IP address left on network {network_id}: subnet {full} "
                           "full")
        return out
    if not isinstance(requests, list) or not requests:
        raise BadRequest(f"{field}: expected a non-empty list of {{subnet_id, ip_address}}")
    by_id = {s.id: s for s in subs}
    for i, req in enumerate(requests):
        where = f"{field}[{i}]"
        if not isinstance(req, dict) or not set(req) <= {"subnet_id", "ip_address"} or not req:
            raise BadRequest(f"{where}: expected {{subnet_id?, ip_address?}}, got {req!r}")
        subnet = None
        if req.get("subnet_id") is not None:
            subnet = by_id.get(req["subnet_id"])
            if subnet is None:
                raise BadRequest(
                    f"{where}.subnet_id: subnet {req['subnet_id']} is not on network "
                    f"{network_id}"
                )
        if req.get("ip_address") is None:
            assert subnet is not None
            if is_auto_address(subnet):
                if device_owner == DEVICE_OWNER_ROUTER:
                    out.append((subnet.id, str(auto_address(subnet, mac))))
                continue  # non-router ports have it already
            ip = free(subnet)
            if ip is None:
                raise no_free_ip(subnet)
            out.append((subnet.id, str(ip)))
            continue
        addr = ipam.normalize_ip(ipam.parse_ip(req["ip_address"], f"{where}.ip_address"))
        if subnet is None:
            subnet = next((s for s in subs if addr in ipam.parse_cidr(s.cidr)), None)
            if subnet is None:
                cidrs = ", ".join(s.cidr for s in subs)
                raise BadRequest(
                    f"{where}.ip_address: {addr} is not inside any subnet of network "
                    f"{network_id} ({cidrs})"
                )
        net = ipam.parse_cidr(subnet.cidr)
        if is_auto_address(subnet):
            raise BadRequest(
                f"{where}.ip_address: {addr} cannot be assigned on subnet {net}: its "
                f"ipv6_address_mode {subnet.ipv6_address_mode} gives ports EUI-64 addresses")
        if addr.version != net.version or addr not in net:
            raise BadRequest(f"{where}.ip_address: {addr} is not inside subnet {net}")
        ipam.validate_fixed_ip(net, addr, f"{where}.ip_address")
        if subnet.gateway_ip == str(addr) and device_owner != DEVICE_OWNER_ROUTER:
            raise Conflict(f"IP address {addr} is the gateway of subnet {net}")
        if any(ip == str(addr) for _, ip in out) or conn.execute(
                _IP_TAKEN, {"network_id": network_id, "ip": str(addr)}).first():
            raise Conflict(f"IP address {addr} is already in use on network {network_id}")
        ipalloc.take(tx, subnet, addr)
        out.append((subnet.id, str(addr)))
    return out


def insert_port(
    tx: Tx, *, network_id: str, project_id: str, device_id: str, device_owner: str,
    fixed: list[tuple[str, str]], name: str = "", mac: str | None = None,
    port_id: str | None = None, mac_checked: bool = False, later: bool = False,
) -> Json:
    """mac_checked: the caller took mac from `new_mac` in this transaction (no re-check).
    later: the rows go in at commit (`Tx.later`): the caller reads neither back."""
    conn = tx.conn
    run = tx.later if later else conn.execute
    if mac is None:
        mac = new_mac(conn)
    elif not mac_checked and conn.execute(_MAC_TAKEN, {"mac": mac}).first():
        raise Conflict(f"MAC address {mac} is already in use")
    values = {
        "id": port_id or new_id(), "name": name, "network_id": network_id,
        "project_id": project_id, "mac_address": mac, "device_id": device_id,
        "device_owner": device_owner, "created_at": now(), "revision": tx.revision,
    }
    run(_INSERT_PORT, values)
    if fixed:
        run(_INSERT_PORT_IPS, [
            {"port_id": values["id"], "subnet_id": sid, "network_id": network_id,
             "ip_address": ip} for sid, ip in fixed
        ])
    port_change(tx, "create", values, [ip for _, ip in fixed])
    return port_dict(values, [{"subnet_id": s, "ip_address": ip} for s, ip in fixed])


def delete_port(tx: Tx, port: Row[Any]) -> None:
    """Delete the port; its pool addresses go back to their subnets' free state."""
    conn = tx.conn
    held = list(conn.execute(_PORT_IPS_SUBNETS, {"port_id": port.id}))
    conn.execute(_DELETE_PORT_IPS, {"port_id": port.id})
    conn.execute(_DELETE_PORT, {"port_id": port.id})
    ipalloc.release(tx, [(r, r.ip_address) for r in held])
    port_change(tx, "delete", port, [r.ip_address for r in held])

