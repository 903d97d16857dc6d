"""Rows to JSON, and the small reads and change records every registry operation shares.

Objects are shaped here once, so a port looks the same in a list, a topology, a view and an
instance; change rows (`Tx.change`) carry the attributes docs/architecture.md lists per kind.
"""

from __future__ import annotations

import base64
import ipaddress
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from openimds.core.models import (
    DEVICE_OWNER_DHCP,
    DEVICE_OWNER_ROUTER,
    dhcp_adopted_device_id,
    dhcp_device_id,
)
from openimds.errors import NotFound
from openimds.registry.store import (
    Tx,
    bindings,
    instance_hosts,
    port_ips,
    ports,
    segments,
    subnets,
)

Json = dict[str, Any]


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_id() -> str:
    return str(uuid.uuid4())


def ip_sort_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return (addr.version, int(addr))


def port_dict(row: Row[Any] | Json, fixed_ips: list[Json]) -> Json:
    d = row if isinstance(row, dict) else row._asdict()
    return {
        "id": d["id"], "name": d.get("name", ""), "network_id": d["network_id"],
        "project_id": d["project_id"], "mac_address": d["mac_address"],
        "fixed_ips": fixed_ips, "device_id": d["device_id"],
        "device_owner": d["device_owner"], "created_at": d.get("created_at"),
        "revision": d.get("revision"),
    }


def subnet_dict(d: Json) -> Json:
    keys = ("id", "name", "network_id", "project_id", "ip_version", "cidr", "gateway_ip",
            "enable_dhcp", "allocation_pools", "dns_nameservers", "host_routes", "created_at",
            "revision", "ipv6_address_mode", "ipv6_ra_mode")
    return {k: d.get(k) for k in keys}


def hosts_of(conn: Connection, instance_ids: Sequence[str]) -> dict[str, str]:
    """The compute node of each instance that has one."""
    if not instance_ids:
        return {}
    return {r.instance_id: r.host for r in conn.execute(
        sa.select(instance_hosts).where(instance_hosts.c.instance_id.in_(instance_ids)))}


def instance_dict(d: Json, port_list: list[Json], host: str | None = None) -> Json:
    ud = d.get("user_data")
    return {
        "id": d["id"], "name": d["name"], "hostname": d["hostname"],
        "project_id": d["project_id"], "availability_zone": d["availability_zone"],
        "flavor": d["flavor"], "launch_index": d["launch_index"],
        "created_at": d["created_at"], "key_name": d["key_name"],
        "keypair_id": d["keypair_id"], "metadata": dict(d["metadata"]),
        "user_data": base64.b64encode(ud).decode() if ud is not None else None,
        "image_id": d["image_id"], "ec2_id": d["ec2_id"],
        "has_password": bool(d.get("password")), "revision": d["revision"],
        "ports": port_list, "host": host,
    }


_BY_ID: dict[sa.Table, sa.Select[Any]] = {}


def by_id(conn: Connection, table: sa.Table, obj_id: str) -> Row[Any] | None:
    """The row with this id, or None (one statement per table, built once)."""
    query = _BY_ID.get(table)
    if query is None:
        query = _BY_ID[table] = sa.select(table).where(table.c.id == sa.bindparam("id"))
    return conn.execute(query, {"id": obj_id}).first()


def get_row(conn: Connection, table: sa.Table, kind: str, obj_id: str) -> Row[Any]:
    row = by_id(conn, table, obj_id)
    if row is None:
        raise NotFound(f"{kind} {obj_id} not found")
    return row


def ref_row(conn: Connection, table: sa.Table, kind: str, field: str, obj_id: str) -> Row[Any]:
    """A referenced object from a request body: missing = 404 naming the field."""
    row = by_id(conn, table, obj_id)
    if row is None:
        raise NotFound(f"{field}: {kind} {obj_id} not found")
    return row


def ips_of_ports(conn: Connection, port_ids: Sequence[str]) -> dict[str, list[Json]]:
    out: dict[str, list[Json]] = {pid: [] for pid in port_ids}
    if not port_ids:
        return out
    for r in conn.execute(
        sa.select(port_ips).where(port_ips.c.port_id.in_(list(port_ids)))
    ):
        out[r.port_id].append({"subnet_id": r.subnet_id, "ip_address": r.ip_address})
    for ips in out.values():
        ips.sort(key=lambda i: ip_sort_key(i["ip_address"]))
    return out


def port_dicts(conn: Connection, rows: Sequence[Row[Any]]) -> list[Json]:
    ips = ips_of_ports(conn, [r.id for r in rows])
    return [port_dict(r, ips[r.id]) for r in rows]


def network_dicts(conn: Connection, rows: Sequence[Row[Any]]) -> list[Json]:
    ids = [r.id for r in rows]
    subs: dict[str, list[str]] = {i: [] for i in ids}
    if ids:
        for s in conn.execute(sa.select(subnets.c.id, subnets.c.network_id)
                              .where(subnets.c.network_id.in_(ids))
                              .order_by(subnets.c.created_at)):
            subs[s.network_id].append(s.id)
    vnis: dict[str, int] = {}
    if ids:
        vnis = {r.network_id: r.segmentation_id for r in conn.execute(
            sa.select(segments).where(segments.c.network_id.in_(ids)))}
    hosts = bound_hosts(conn, "network", ids)
    dhcp = dhcp_served(conn, ids, hosts)
    return [{**dict(r._mapping), "subnets": subs[r.id], "segmentation_id": vnis.get(r.id),
             "hosts": hosts.get(r.id, []), "dhcp": dhcp.get(r.id, [])}
            for r in rows]


def dhcp_served(conn: Connection, network_ids: Sequence[str] | None,
                bound: dict[str, list[str]] | None = None) -> dict[str, list[Json]]:
    """network id -> its DHCP ports as [{host, port_id, ip_addresses}], by host name; a port
    no bound node serves (reserved, or not yet handed over) shows with host None, last.
    network_ids=None: every network."""
    query = (sa.select(ports.c.id, ports.c.network_id, ports.c.device_id,
                       port_ips.c.ip_address)
             .join(port_ips, port_ips.c.port_id == ports.c.id)
             .where(ports.c.device_owner == DEVICE_OWNER_DHCP))
    if network_ids is not None:
        if not network_ids:
            return {}
        query = query.where(ports.c.network_id.in_(list(network_ids)))
    found: dict[str, dict[str, list[str]]] = {}
    devices: dict[str, str] = {}
    for r in conn.execute(query):
        found.setdefault(r.network_id, {}).setdefault(r.id, []).append(r.ip_address)
        devices[r.id] = r.device_id
    if bound is None:
        bound = bound_hosts(conn, "network", sorted(found))
    out: dict[str, list[Json]] = {}
    for nid, by_port in found.items():
        host_of = {dev(h, nid): h for h in bound.get(nid, ())
                   for dev in (dhcp_device_id, dhcp_adopted_device_id)}
        rows = [{"host": host_of.get(devices[pid]), "port_id": pid,
                 "ip_addresses": sorted(ips, key=ip_sort_key)} for pid, ips in by_port.items()]
        out[nid] = sorted(rows, key=lambda e: (e["host"] is None, e["host"] or "",
                                               e["port_id"]))
    return out


def bound_hosts(conn: Connection, kind: str,
                ids: Sequence[str] | None = None) -> dict[str, list[str]]:
    """resource id -> the nodes serving it (routers: the L3 node; networks: DHCP nodes);
    ids=None: every resource of that kind."""
    query = sa.select(bindings.c.resource_id, bindings.c.host).where(bindings.c.kind == kind)
    if ids is not None:
        if not ids:
            return {}
        query = query.where(bindings.c.resource_id.in_(list(ids)))
    out: dict[str, list[str]] = {}
    for b in conn.execute(query.order_by(bindings.c.host)):
        out.setdefault(b.resource_id, []).append(b.host)
    return out


def router_dicts(conn: Connection, rows: Sequence[Row[Any]]) -> list[Json]:
    ids = [r.id for r in rows]
    ifaces: dict[str, list[Json]] = {i: [] for i in ids}
    if ids:
        for r in conn.execute(
            sa.select(ports.c.id, ports.c.device_id, ports.c.network_id,
                      port_ips.c.subnet_id, port_ips.c.ip_address)
            .join(port_ips, port_ips.c.port_id == ports.c.id)
            .where(ports.c.device_owner == DEVICE_OWNER_ROUTER, ports.c.device_id.in_(ids))
            .order_by(ports.c.created_at)
        ):
            ifaces[r.device_id].append({
                "port_id": r.id, "subnet_id": r.subnet_id, "network_id": r.network_id,
                "ip_address": r.ip_address})
    hosts = bound_hosts(conn, "router", ids)
    return [{**dict(r._mapping), "interfaces": ifaces[r.id], "hosts": hosts.get(r.id, [])}
            for r in rows]


def instance_ports(conn: Connection, ids: Sequence[str]) -> dict[str, list[Json]]:
    out: dict[str, list[Json]] = {i: [] for i in ids}
    if not ids:
        return out
    rows = list(conn.execute(sa.select(ports).where(
        ports.c.device_id.in_(list(ids)), ports.c.device_owner.like("compute:%"))
        .order_by(ports.c.created_at)))
    for p in port_dicts(conn, rows):
        out[p["device_id"]].append(p)
    return out


def port_change(tx: Tx, op: str, port: Row[Any] | Json, ips: Iterable[str]) -> None:
    p = port if isinstance(port, dict) else port._asdict()
    tx.change("port", op, p["id"], {
        "network_id": p["network_id"], "device_id": p["device_id"],
        "device_owner": p["device_owner"], "project_id": p["project_id"],
        "mac_address": p["mac_address"], "ips": sorted(set(ips), key=ip_sort_key),
    })


def subnet_change(tx: Tx, op: str, s: Row[Any] | Json) -> None:
    d = s if isinstance(s, dict) else s._asdict()
    tx.change("subnet", op, d["id"], {
        "network_id": d["network_id"], "project_id": d["project_id"], "cidr": d["cidr"],
        "ip_version": d["ip_version"], "gateway_ip": d["gateway_ip"],
        "enable_dhcp": d["enable_dhcp"], "ipv6_address_mode": d.get("ipv6_address_mode"),
    })


def instance_change(tx: Tx, op: str, row: Row[Any] | Json) -> None:
    d = row if isinstance(row, dict) else row._asdict()
    tx.change("instance", op, d["id"], {
        "project_id": d["project_id"], "key_name": d["key_name"],
        "keypair_id": d["keypair_id"], "hostname": d["hostname"], "name": d["name"],
    })

