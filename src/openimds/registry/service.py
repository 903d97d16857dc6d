"""The registry's operations: validate input, read and write the store, shape the answers.

Each public method is one transaction (reads in `Store.read()`, writes in `Store.write()`),
takes plain JSON-like values and returns JSON-ready dicts. Input errors raise `BadRequest`
naming the field; missing objects `NotFound`; clashes `Conflict`. The methods block (they
run SQL): the REST app calls them in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import secrets
import uuid
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from openimds.core import ipam
from openimds.core.models import (
    DEVICE_OWNER_DHCP,
    DEVICE_OWNER_INSTANCE,
    DEVICE_OWNER_ROUTER,
    MAX_PASSWORD_CHARS,
    MAX_USER_DATA_BYTES,
    dhcp_device_id,
    parse_hostname,
    parse_metadata,
    parse_name,
    parse_public_key,
    sanitize_hostname,
)
from openimds.errors import BadRequest, Conflict, NotFound
from openimds.registry.client import ResyncRequired
from openimds.registry.store import (
    Store,
    Tx,
    changes,
    instances,
    keypairs,
    networks,
    port_ips,
    ports,
    projects,
    routers,
    subnets,
)

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "default"
MAX_WAIT_S = 60.0

Json = dict[str, Any]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _new_id() -> str:
    return str(uuid.uuid4())


def _body(raw: Any, allowed: Iterable[str]) -> Json:
    if not isinstance(raw, dict):
        raise BadRequest(f"body: expected a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise BadRequest(f"{unknown[0]}: unknown field")
    return raw


def _opt_str(body: Json, key: str) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _req_id(body: Json, key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key}: required, expected an ID string")
    return value


def _bool(body: Json, key: str, default: bool) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{key}: expected true or false, got {value!r}")
    return value


def _ip_sort_key(ip: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(ip)
    return (addr.version, int(addr))


class Registry:
    """All registry operations over one `Store`."""

    def __init__(self, store: Store, *, max_page_size: int = 1000) -> None:
        self.store = store
        self.max_page_size = max_page_size

    # ------------------------------------------------------------------ helpers

    def _page(
        self, conn: Connection, table: sa.Table, where: Sequence[Any], limit: Any, marker: Any,
    ) -> tuple[list[Row[Any]], str | None]:
        size = self.max_page_size
        if limit is not None:
            try:
                size = int(limit)
            except (TypeError, ValueError):
                raise BadRequest(f"limit: {limit!r} is not an integer") from None
            if size < 1:
                raise BadRequest(f"limit: {limit!r} must be at least 1")
            size = min(size, self.max_page_size)
        query = sa.select(table).where(*where)
        if marker:
            query = query.where(table.c.id > str(marker))
        rows = list(conn.execute(query.order_by(table.c.id).limit(size + 1)))
        if len(rows) > size:
            return rows[:size], str(rows[size - 1].id)
        return rows, None

    def _get_row(self, conn: Connection, table: sa.Table, kind: str, obj_id: str) -> Row[Any]:
        row = conn.execute(sa.select(table).where(table.c.id == obj_id)).first()
        if row is None:
            raise NotFound(f"{kind} {obj_id} not found")
        return row

    def _ref_row(
        self, conn: Connection, table: sa.Table, kind: str, field: str, obj_id: str
    ) -> Row[Any]:
        """A referenced object from a request body: missing = 404 naming the field."""
        row = conn.execute(sa.select(table).where(table.c.id == obj_id)).first()
        if row is None:
            raise NotFound(f"{field}: {kind} {obj_id} not found")
        return row

    def _ensure_project(self, tx: Tx, ref: Any) -> str:
        """The project with this id or name, created by name when missing."""
        if ref is None:
            ref = DEFAULT_PROJECT
        name = parse_name(ref, "project_id")
        conn = tx.conn
        row = conn.execute(
            sa.select(projects.c.id).where(sa.or_(projects.c.id == name, projects.c.name == name))
        ).first()
        if row is not None:
            return str(row.id)
        try:
            pid = str(uuid.UUID(name))
        except ValueError:
            pid = _new_id()
        conn.execute(projects.insert().values(
            id=pid, name=name, created_at=_now(), revision=tx.revision))
        tx.change("project", "create", pid, {"name": name})
        return pid

    def _find_project(self, conn: Connection, ref: str) -> str | None:
        row = conn.execute(
            sa.select(projects.c.id).where(sa.or_(projects.c.id == ref, projects.c.name == ref))
        ).first()
        return None if row is None else str(row.id)

    def _ips_of_ports(self, conn: Connection, port_ids: Sequence[str]) -> dict[str, list[Json]]:
        out: dict[str, list[Json]] = {pid: [] for pid in port_ids}
        if not port_ids:
            return out
        for r in conn.execute(
            sa.select(port_ips).where(port_ips.c.port_id.in_(list(port_ids)))
        ):
            out[r.port_id].append({"subnet_id": r.subnet_id, "ip_address": r.ip_address})
        for ips in out.values():
            ips.sort(key=lambda i: _ip_sort_key(i["ip_address"]))
        return out

    def _port_dicts(self, conn: Connection, rows: Sequence[Row[Any]]) -> list[Json]:
        ips = self._ips_of_ports(conn, [r.id for r in rows])
        return [_port_dict(r, ips[r.id]) for r in rows]

    def _port_change(self, tx: Tx, op: str, port: Row[Any] | Json, ips: Iterable[str]) -> None:
        p = port if isinstance(port, dict) else port._asdict()
        tx.change("port", op, p["id"], {
            "network_id": p["network_id"], "device_id": p["device_id"],
            "device_owner": p["device_owner"], "project_id": p["project_id"],
            "mac_address": p["mac_address"], "ips": sorted(set(ips), key=_ip_sort_key),
        })

    def _subnet_change(self, tx: Tx, op: str, s: Row[Any] | Json) -> None:
        d = s if isinstance(s, dict) else s._asdict()
        tx.change("subnet", op, d["id"], {
            "network_id": d["network_id"], "project_id": d["project_id"], "cidr": d["cidr"],
            "ip_version": d["ip_version"], "gateway_ip": d["gateway_ip"],
            "enable_dhcp": d["enable_dhcp"],
        })

    def _instance_change(self, tx: Tx, op: str, row: Row[Any] | Json) -> None:
        d = row if isinstance(row, dict) else row._asdict()
        tx.change("instance", op, d["id"], {
            "project_id": d["project_id"], "key_name": d["key_name"],
            "keypair_id": d["keypair_id"], "hostname": d["hostname"], "name": d["name"],
        })

    def _new_mac(self, conn: Connection) -> str:
        for _ in range(64):
            mac = ipam.generate_mac(secrets.token_bytes)
            if conn.execute(
                sa.select(ports.c.id).where(ports.c.mac_address == mac)
            ).first() is None:
                return mac
        raise Conflict("could not find a free MAC address after 64 tries")

    def _used_ips(self, conn: Connection, subnet_id: str) -> set[ipam.IPAddress]:
        return {
            ipaddress.ip_address(v) for v in conn.execute(
                sa.select(port_ips.c.ip_address).where(port_ips.c.subnet_id == subnet_id)
            ).scalars()
        }

    def _free_ip(self, conn: Connection, subnet: Row[Any]) -> ipam.IPAddress | None:
        used = self._used_ips(conn, subnet.id)
        if subnet.gateway_ip:
            used.add(ipaddress.ip_address(subnet.gateway_ip))
        pools = [
            ipam.Pool(ipaddress.ip_address(p["start"]), ipaddress.ip_address(p["end"]))
            for p in subnet.allocation_pools
        ]
        return ipam.first_free(pools, used)

    def _allocate(
        self, conn: Connection, network_id: str, requests: Any, *, device_owner: str,
        field: str = "fixed_ips",
    ) -> list[tuple[str, str]]:
        """(subnet_id, ip) pairs for a new port on network_id."""
        subs = list(conn.execute(
            sa.select(subnets).where(subnets.c.network_id == network_id)
            .order_by(subnets.c.created_at, subnets.c.id)
        ))
        if not subs:
            raise BadRequest(f"network_id: network {network_id} has no subnets")
        out: list[tuple[str, str]] = []
        if requests is None:
            for version in (4, 6):
                candidates = [s for s in subs if s.ip_version == version]
                for s in candidates:
                    ip = self._free_ip(conn, s)
                    if ip is not None:
                        out.append((s.id, str(ip)))
                        break
            if not out:
                cidrs = ", ".join(s.cidr for s in subs)
                raise Conflict(f"no free IP address left on network {network_id} ({cidrs})")
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
                ip = self._free_ip(conn, subnet)
                if ip is None:
                    raise Conflict(f"no free IP address left on subnet {subnet.cidr}")
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
            if addr.version != net.version or addr not in net:
                raise BadRequest(f"{where}.ip_address: {addr} is not inside subnet {net}")
            ipam.validate_fixed_ip(net, addr, f"{where}.ip_address")
            if subnet.gateway_ip == str(addr) and device_owner != DEVICE_OWNER_ROUTER:
                raise Conflict(f"IP address {addr} is the gateway of subnet {net}")
            if addr in self._used_ips(conn, subnet.id) or any(ip == str(addr) for _, ip in out):
                raise Conflict(f"IP address {addr} is already in use on network {network_id}")
            out.append((subnet.id, str(addr)))
        return out

    def _insert_port(
        self, tx: Tx, *, network_id: str, project_id: str, device_id: str, device_owner: str,
        fixed: list[tuple[str, str]], name: str = "", mac: str | None = None,
        port_id: str | None = None,
    ) -> Json:
        conn = tx.conn
        if mac is None:
            mac = self._new_mac(conn)
        elif conn.execute(sa.select(ports.c.id).where(ports.c.mac_address == mac)).first():
            raise Conflict(f"MAC address {mac} is already in use")
        values = {
            "id": port_id or _new_id(), "name": name, "network_id": network_id,
            "project_id": project_id, "mac_address": mac, "device_id": device_id,
            "device_owner": device_owner, "created_at": _now(), "revision": tx.revision,
        }
        conn.execute(ports.insert().values(**values))
        if fixed:
            conn.execute(port_ips.insert(), [
                {"port_id": values["id"], "subnet_id": sid, "network_id": network_id,
                 "ip_address": ip} for sid, ip in fixed
            ])
        self._port_change(tx, "create", values, [ip for _, ip in fixed])
        return _port_dict(values, [{"subnet_id": s, "ip_address": ip} for s, ip in fixed])

    def _delete_port(self, tx: Tx, port: Row[Any]) -> None:
        conn = tx.conn
        ips = list(conn.execute(
            sa.select(port_ips.c.ip_address).where(port_ips.c.port_id == port.id)).scalars())
        conn.execute(port_ips.delete().where(port_ips.c.port_id == port.id))
        conn.execute(ports.delete().where(ports.c.id == port.id))
        self._port_change(tx, "delete", port, ips)

    # ------------------------------------------------------------------ health, projects

    def health(self) -> Json:
        with self.store.read() as conn:
            return {"status": "ok", "revision": self.store.revision(conn)}

    def create_project(self, raw: Any) -> Json:
        body = _body(raw, {"name", "id"})
        name = parse_name(body.get("name"))
        with self.store.write() as tx:
            if tx.conn.execute(sa.select(projects.c.id).where(
                    sa.or_(projects.c.name == name, projects.c.id == name))).first():
                raise Conflict(f"project {name!r} already exists")
            pid = _opt_str(body, "id") or _new_id()
            tx.conn.execute(projects.insert().values(
                id=pid, name=name, created_at=_now(), revision=tx.revision))
            tx.change("project", "create", pid, {"name": name})
            return {"id": pid, "name": name, "created_at": _now(), "revision": tx.revision}

    def list_projects(self, q: dict[str, str]) -> Json:
        where = [projects.c.name == q["name"]] if q.get("name") else []
        with self.store.read() as conn:
            rows, nxt = self._page(conn, projects, where, q.get("limit"), q.get("marker"))
            return {"projects": [dict(r._mapping) for r in rows], "next": nxt}

    def get_project(self, pid: str) -> Json:
        with self.store.read() as conn:
            row = conn.execute(sa.select(projects).where(
                sa.or_(projects.c.id == pid, projects.c.name == pid))).first()
            if row is None:
                raise NotFound(f"project {pid} not found")
            return dict(row._mapping)

    # ------------------------------------------------------------------ networks

    def create_network(self, raw: Any) -> Json:
        body = _body(raw, {"name", "project_id", "mtu"})
        name = parse_name(body.get("name"))
        mtu = body.get("mtu", 1500)
        if not isinstance(mtu, int) or isinstance(mtu, bool) or not 68 <= mtu <= 65535:
            raise BadRequest(f"mtu: {mtu!r} is not an integer between 68 and 65535")
        with self.store.write() as tx:
            pid = self._ensure_project(tx, body.get("project_id"))
            values: Json = {"id": _new_id(), "name": name, "project_id": pid, "mtu": mtu,
                      "created_at": _now(), "revision": tx.revision}
            tx.conn.execute(networks.insert().values(**values))
            tx.change("network", "create", values["id"],
                      {"name": name, "project_id": pid, "mtu": mtu})
            return {**values, "subnets": []}

    def _network_dicts(self, conn: Connection, rows: Sequence[Row[Any]]) -> list[Json]:
        ids = [r.id for r in rows]
        subs: dict[str, list[str]] = {i: [] for i in ids}
        if ids:
            for s in conn.execute(sa.select(subnets.c.id, subnets.c.network_id)
                                  .where(subnets.c.network_id.in_(ids))
                                  .order_by(subnets.c.created_at)):
                subs[s.network_id].append(s.id)
        return [{**dict(r._mapping), "subnets": subs[r.id]} for r in rows]

    def list_networks(self, q: dict[str, str]) -> Json:
        where = []
        if q.get("name"):
            where.append(networks.c.name == q["name"])
        with self.store.read() as conn:
            if q.get("project_id"):
                where.append(networks.c.project_id == (
                    self._find_project(conn, q["project_id"]) or q["project_id"]))
            rows, nxt = self._page(conn, networks, where, q.get("limit"), q.get("marker"))
            return {"networks": self._network_dicts(conn, rows), "next": nxt}

    def get_network(self, nid: str) -> Json:
        with self.store.read() as conn:
            return self._network_dicts(conn, [self._get_row(conn, networks, "network", nid)])[0]

    def delete_network(self, nid: str) -> Json:
        with self.store.write() as tx:
            conn = tx.conn
            net = self._get_row(conn, networks, "network", nid)
            held = list(conn.execute(sa.select(ports).where(
                ports.c.network_id == nid, ports.c.device_owner != DEVICE_OWNER_DHCP)))
            if held:
                ids = ", ".join(p.id for p in held[:5])
                raise Conflict(f"network {nid} still has {len(held)} port(s): {ids}")
            for p in conn.execute(sa.select(ports).where(ports.c.network_id == nid)).all():
                self._delete_port(tx, p)
            for s in conn.execute(sa.select(subnets).where(subnets.c.network_id == nid)).all():
                conn.execute(subnets.delete().where(subnets.c.id == s.id))
                self._subnet_change(tx, "delete", s)
            conn.execute(networks.delete().where(networks.c.id == nid))
            tx.change("network", "delete", nid, {"name": net.name, "project_id": net.project_id,
                                                 "mtu": net.mtu})
            return {}

    # ------------------------------------------------------------------ subnets

    def create_subnet(self, raw: Any) -> Json:
        body = _body(raw, {"name", "network_id", "cidr", "gateway_ip", "enable_dhcp",
                           "allocation_pools", "dns_nameservers", "host_routes", "ip_version",
                           "project_id"})
        name = parse_name(body.get("name", ""), required=False)
        network_id = _req_id(body, "network_id")
        net = ipam.parse_cidr(body.get("cidr"))
        if body.get("ip_version") not in (None, net.version):
            raise BadRequest(f"ip_version: {body['ip_version']!r} does not match cidr {net}")
        gateway: ipam.IPAddress | None
        if "gateway_ip" not in body:
            gateway = ipam.default_gateway(net)
        elif body["gateway_ip"] is None:
            gateway = None
        else:
            gateway = ipam.parse_ip(body["gateway_ip"], "gateway_ip")
            ipam.validate_fixed_ip(net, gateway, "gateway_ip")
        enable_dhcp = _bool(body, "enable_dhcp", True)
        if body.get("allocation_pools") is None:
            pools = ipam.default_pools(net, gateway)
        else:
            pools = ipam.parse_pools(body["allocation_pools"], net, gateway)
        dns = ipam.parse_dns(body.get("dns_nameservers") or [])
        routes = ipam.parse_host_routes(body.get("host_routes") or [], net)
        with self.store.write() as tx:
            conn = tx.conn
            network = self._ref_row(conn, networks, "network", "network_id", network_id)
            existing = list(conn.execute(
                sa.select(subnets.c.cidr).where(subnets.c.network_id == network_id)).scalars())
            clash = ipam.overlapping(net, [ipaddress.ip_network(c) for c in existing])
            if clash is not None:
                raise Conflict(f"cidr: {net} overlaps subnet {clash} on network {network_id}")
            pid = (self._ensure_project(tx, body["project_id"]) if body.get("project_id")
                   else network.project_id)
            values = {
                "id": _new_id(), "name": name, "network_id": network_id, "project_id": pid,
                "ip_version": net.version, "cidr": str(net),
                "gateway_ip": None if gateway is None else str(gateway),
                "enable_dhcp": enable_dhcp, "allocation_pools": [p.as_dict() for p in pools],
                "dns_nameservers": dns, "host_routes": routes, "created_at": _now(),
                "revision": tx.revision,
            }
            conn.execute(subnets.insert().values(**values))
            self._subnet_change(tx, "create", values)
            if enable_dhcp:
                self._add_dhcp_ip(tx, network, values)
            return _subnet_dict(values)

    def _add_dhcp_ip(self, tx: Tx, network: Row[Any], subnet: Json) -> None:
        conn = tx.conn
        row = conn.execute(sa.select(subnets).where(subnets.c.id == subnet["id"])).one()
        ip = self._free_ip(conn, row)
        if ip is None:
            raise Conflict(f"no free IP address for the DHCP port on subnet {subnet['cidr']}")
        port = conn.execute(sa.select(ports).where(
            ports.c.network_id == network.id, ports.c.device_owner == DEVICE_OWNER_DHCP)).first()
        if port is None:
            self._insert_port(
                tx, network_id=network.id, project_id=network.project_id,
                device_id=dhcp_device_id(network.id), device_owner=DEVICE_OWNER_DHCP,
                fixed=[(subnet["id"], str(ip))],
            )
            return
        before = list(conn.execute(sa.select(port_ips.c.ip_address)
                                   .where(port_ips.c.port_id == port.id)).scalars())
        conn.execute(port_ips.insert().values(port_id=port.id, subnet_id=subnet["id"],
                                              network_id=network.id, ip_address=str(ip)))
        conn.execute(ports.update().where(ports.c.id == port.id).values(revision=tx.revision))
        self._port_change(tx, "update", port, [*before, str(ip)])

    def list_subnets(self, q: dict[str, str]) -> Json:
        where = []
        for key in ("network_id", "name", "cidr"):
            if q.get(key):
                where.append(subnets.c[key] == q[key])
        with self.store.read() as conn:
            rows, nxt = self._page(conn, subnets, where, q.get("limit"), q.get("marker"))
            return {"subnets": [_subnet_dict(r._asdict()) for r in rows], "next": nxt}

    def get_subnet(self, sid: str) -> Json:
        with self.store.read() as conn:
            return _subnet_dict(self._get_row(conn, subnets, "subnet", sid)._asdict())

    def delete_subnet(self, sid: str) -> Json:
        with self.store.write() as tx:
            conn = tx.conn
            subnet = self._get_row(conn, subnets, "subnet", sid)
            users = list(conn.execute(
                sa.select(ports.c.id, ports.c.device_owner).join(
                    port_ips, port_ips.c.port_id == ports.c.id)
                .where(port_ips.c.subnet_id == sid, ports.c.device_owner != DEVICE_OWNER_DHCP)
            ))
            if users:
                ids = ", ".join(f"{u.id} ({u.device_owner or 'no owner'})" for u in users[:5])
                raise Conflict(f"subnet {sid} is still used by {len(users)} port(s): {ids}")
            for port in conn.execute(sa.select(ports).join(
                    port_ips, port_ips.c.port_id == ports.c.id)
                    .where(port_ips.c.subnet_id == sid)).all():
                before = list(conn.execute(sa.select(port_ips.c.ip_address)
                                           .where(port_ips.c.port_id == port.id)).scalars())
                conn.execute(port_ips.delete().where(
                    port_ips.c.port_id == port.id, port_ips.c.subnet_id == sid))
                left = conn.execute(sa.select(port_ips.c.ip_address)
                                    .where(port_ips.c.port_id == port.id)).first()
                if left is None:
                    conn.execute(ports.delete().where(ports.c.id == port.id))
                    self._port_change(tx, "delete", port, before)
                else:
                    conn.execute(ports.update().where(ports.c.id == port.id)
                                 .values(revision=tx.revision))
                    self._port_change(tx, "update", port, before)
            conn.execute(subnets.delete().where(subnets.c.id == sid))
            self._subnet_change(tx, "delete", subnet)
            return {}

    # ------------------------------------------------------------------ routers

    def _router_dicts(self, conn: Connection, rows: Sequence[Row[Any]]) -> list[Json]:
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
        return [{**dict(r._mapping), "interfaces": ifaces[r.id]} for r in rows]

    def create_router(self, raw: Any) -> Json:
        body = _body(raw, {"name", "project_id"})
        name = parse_name(body.get("name"))
        with self.store.write() as tx:
            pid = self._ensure_project(tx, body.get("project_id"))
            values: Json = {"id": _new_id(), "name": name, "project_id": pid,
                            "created_at": _now(),
                      "revision": tx.revision}
            tx.conn.execute(routers.insert().values(**values))
            tx.change("router", "create", values["id"], {"name": name, "project_id": pid})
            return {**values, "interfaces": []}

    def list_routers(self, q: dict[str, str]) -> Json:
        where = [routers.c.name == q["name"]] if q.get("name") else []
        with self.store.read() as conn:
            rows, nxt = self._page(conn, routers, where, q.get("limit"), q.get("marker"))
            return {"routers": self._router_dicts(conn, rows), "next": nxt}

    def get_router(self, rid: str) -> Json:
        with self.store.read() as conn:
            return self._router_dicts(conn, [self._get_row(conn, routers, "router", rid)])[0]

    def delete_router(self, rid: str) -> Json:
        with self.store.write() as tx:
            router = self._get_row(tx.conn, routers, "router", rid)
            n = tx.conn.execute(sa.select(sa.func.count()).select_from(ports).where(
                ports.c.device_owner == DEVICE_OWNER_ROUTER, ports.c.device_id == rid)).scalar()
            if n:
                raise Conflict(f"router {rid} still has {n} interface(s)")
            tx.conn.execute(routers.delete().where(routers.c.id == rid))
            tx.change("router", "delete", rid, {"name": router.name,
                                                "project_id": router.project_id})
            return {}

    def add_interface(self, rid: str, raw: Any) -> Json:
        body = _body(raw, {"subnet_id"})
        sid = _req_id(body, "subnet_id")
        with self.store.write() as tx:
            conn = tx.conn
            router = self._get_row(conn, routers, "router", rid)
            subnet = self._ref_row(conn, subnets, "subnet", "subnet_id", sid)
            if subnet.gateway_ip is None:
                raise BadRequest(f"subnet_id: subnet {sid} ({subnet.cidr}) has no gateway_ip")
            attached = list(conn.execute(
                sa.select(subnets.c.id, subnets.c.cidr)
                .join(port_ips, port_ips.c.subnet_id == subnets.c.id)
                .join(ports, ports.c.id == port_ips.c.port_id)
                .where(ports.c.device_owner == DEVICE_OWNER_ROUTER, ports.c.device_id == rid)))
            if any(a.id == sid for a in attached):
                raise Conflict(f"subnet {sid} is already attached to router {rid}")
            net = ipaddress.ip_network(subnet.cidr)
            clash = ipam.overlapping(net, [ipaddress.ip_network(a.cidr) for a in attached])
            if clash is not None:
                raise BadRequest(f"subnet_id: {net} overlaps {clash} already on router {rid}")
            holder = conn.execute(sa.select(port_ips.c.port_id).where(
                port_ips.c.network_id == subnet.network_id,
                port_ips.c.ip_address == subnet.gateway_ip)).first()
            if holder is not None:
                raise Conflict(
                    f"gateway IP {subnet.gateway_ip} of subnet {sid} is taken by port "
                    f"{holder.port_id}")
            port = self._insert_port(
                tx, network_id=subnet.network_id, project_id=router.project_id, device_id=rid,
                device_owner=DEVICE_OWNER_ROUTER, fixed=[(sid, subnet.gateway_ip)],
            )
            conn.execute(routers.update().where(routers.c.id == rid).values(revision=tx.revision))
            tx.change("router", "update", rid, {"name": router.name,
                                                "project_id": router.project_id})
            conn.execute(subnets.update().where(subnets.c.id == sid).values(revision=tx.revision))
            self._subnet_change(tx, "update", subnet)
            return port

    def remove_interface(self, rid: str, raw: Any) -> Json:
        body = _body(raw, {"subnet_id"})
        sid = _req_id(body, "subnet_id")
        with self.store.write() as tx:
            conn = tx.conn
            router = self._get_row(conn, routers, "router", rid)
            subnet = self._ref_row(conn, subnets, "subnet", "subnet_id", sid)
            port = conn.execute(
                sa.select(ports).join(port_ips, port_ips.c.port_id == ports.c.id)
                .where(ports.c.device_owner == DEVICE_OWNER_ROUTER, ports.c.device_id == rid,
                       port_ips.c.subnet_id == sid)).first()
            if port is None:
                raise NotFound(f"router {rid} has no interface on subnet {sid}")
            self._delete_port(tx, port)
            conn.execute(routers.update().where(routers.c.id == rid).values(revision=tx.revision))
            tx.change("router", "update", rid, {"name": router.name,
                                                "project_id": router.project_id})
            conn.execute(subnets.update().where(subnets.c.id == sid).values(revision=tx.revision))
            self._subnet_change(tx, "update", subnet)
            return {}

    # ------------------------------------------------------------------ ports

    def create_port(self, raw: Any) -> Json:
        body = _body(raw, {"network_id", "fixed_ips", "device_id", "device_owner",
                           "mac_address", "name", "project_id"})
        network_id = _req_id(body, "network_id")
        name = parse_name(body.get("name", ""), required=False)
        device_id = parse_name(body.get("device_id", ""), "device_id", required=False)
        owner = parse_name(body.get("device_owner", ""), "device_owner", required=False)
        mac = body.get("mac_address")
        if mac is not None:
            if not isinstance(mac, str) or not ipam.is_valid_mac(mac):
                raise BadRequest(f"mac_address: {mac!r} is not a unicast MAC address")
            mac = mac.lower()
        with self.store.write() as tx:
            network = self._ref_row(tx.conn, networks, "network", "network_id", network_id)
            pid = (self._ensure_project(tx, body["project_id"]) if body.get("project_id")
                   else network.project_id)
            fixed = self._allocate(tx.conn, network_id, body.get("fixed_ips"),
                                   device_owner=owner)
            return self._insert_port(tx, network_id=network_id, project_id=pid,
                                     device_id=device_id, device_owner=owner, fixed=fixed,
                                     name=name, mac=mac)

    def list_ports(self, q: dict[str, str]) -> Json:
        where: list[Any] = []
        for key in ("network_id", "device_id", "device_owner", "project_id", "mac_address"):
            if q.get(key):
                where.append(ports.c[key] == q[key])
        if q.get("ip_address"):
            ip = str(ipam.normalize_ip(ipam.parse_ip(q["ip_address"], "ip_address")))
            where.append(ports.c.id.in_(
                sa.select(port_ips.c.port_id).where(port_ips.c.ip_address == ip)))
        with self.store.read() as conn:
            rows, nxt = self._page(conn, ports, where, q.get("limit"), q.get("marker"))
            return {"ports": self._port_dicts(conn, rows), "next": nxt}

    def get_port(self, port_id: str) -> Json:
        with self.store.read() as conn:
            return self._port_dicts(conn, [self._get_row(conn, ports, "port", port_id)])[0]

    def delete_port(self, port_id: str) -> Json:
        with self.store.write() as tx:
            port = self._get_row(tx.conn, ports, "port", port_id)
            if port.device_owner == DEVICE_OWNER_ROUTER:
                raise Conflict(f"port {port_id} is a router interface: use remove_interface")
            if port.device_owner.startswith("compute:") and tx.conn.execute(
                    sa.select(instances.c.id).where(instances.c.id == port.device_id)).first():
                raise Conflict(f"port {port_id} belongs to instance {port.device_id}: "
                               "delete the instance")
            self._delete_port(tx, port)
            return {}

    # ------------------------------------------------------------------ keypairs

    def create_keypair(self, raw: Any) -> Json:
        body = _body(raw, {"name", "public_key", "project_id"})
        name = parse_name(body.get("name"))
        key = parse_public_key(body.get("public_key"))
        with self.store.write() as tx:
            pid = self._ensure_project(tx, body.get("project_id"))
            if tx.conn.execute(sa.select(keypairs.c.id).where(
                    keypairs.c.project_id == pid, keypairs.c.name == name)).first():
                raise Conflict(f"key pair {name!r} already exists in project {pid}")
            values: Json = {"id": _new_id(), "name": name, "project_id": pid,
                      "public_key": key.text, "fingerprint": key.fingerprint, "type": key.type,
                      "created_at": _now(), "revision": tx.revision}
            tx.conn.execute(keypairs.insert().values(**values))
            tx.change("keypair", "create", values["id"], {"name": name, "project_id": pid})
            return values

    def list_keypairs(self, q: dict[str, str]) -> Json:
        where: list[Any] = []
        if q.get("name"):
            where.append(keypairs.c.name == q["name"])
        with self.store.read() as conn:
            if q.get("project_id"):
                where.append(keypairs.c.project_id == (
                    self._find_project(conn, q["project_id"]) or q["project_id"]))
            rows, nxt = self._page(conn, keypairs, where, q.get("limit"), q.get("marker"))
            return {"keypairs": [dict(r._mapping) for r in rows], "next": nxt}

    def get_keypair(self, kid: str) -> Json:
        with self.store.read() as conn:
            return dict(self._get_row(conn, keypairs, "keypair", kid)._mapping)

    def delete_keypair(self, kid: str) -> Json:
        with self.store.write() as tx:
            kp = self._get_row(tx.conn, keypairs, "keypair", kid)
            tx.conn.execute(keypairs.delete().where(keypairs.c.id == kid))
            tx.change("keypair", "delete", kid, {"name": kp.name, "project_id": kp.project_id})
            return {}

    # ------------------------------------------------------------------ instances

    def create_instance(self, raw: Any) -> Json:
        body = _body(raw, {"name", "network_id", "fixed_ip", "key_name", "user_data",
                           "metadata", "availability_zone", "flavor", "project_id", "hostname",
                           "image_id", "id"})
        name = parse_name(body.get("name"))
        network_id = _req_id(body, "network_id")
        iid = _opt_str(body, "id") or _new_id()
        try:
            iid = str(uuid.UUID(iid))
        except ValueError:
            raise BadRequest(f"id: {iid!r} is not a UUID") from None
        hostname = (parse_hostname(body["hostname"]) if body.get("hostname") is not None
                    else sanitize_hostname(name, iid))
        user_data = _parse_user_data(body.get("user_data"))
        meta = parse_metadata(body.get("metadata") or {})
        az = parse_name(body.get("availability_zone", "nova"), "availability_zone")
        flavor = parse_name(body.get("flavor", "m1.small"), "flavor")
        image_id = _opt_str(body, "image_id")
        key_name = _opt_str(body, "key_name")
        requests = None
        if body.get("fixed_ip") is not None:
            requests = [{"ip_address": body["fixed_ip"]}]
        with self.store.write() as tx:
            conn = tx.conn
            network = self._ref_row(conn, networks, "network", "network_id", network_id)
            pid = (self._ensure_project(tx, body["project_id"]) if body.get("project_id")
                   else network.project_id)
            keypair = None
            if key_name is not None:
                kp = conn.execute(sa.select(keypairs).where(
                    keypairs.c.project_id == pid, keypairs.c.name == key_name)).first()
                if kp is None:
                    raise BadRequest(f"key_name: no key pair {key_name!r} in project {pid}")
                keypair = {k: getattr(kp, k) for k in
                           ("id", "name", "public_key", "type", "fingerprint")}
            if conn.execute(sa.select(instances.c.id).where(instances.c.id == iid)).first():
                raise Conflict(f"instance {iid} already exists")
            try:
                fixed = self._allocate(conn, network_id, requests,
                                       device_owner=DEVICE_OWNER_INSTANCE, field="fixed_ip")
            except BadRequest as exc:
                raise BadRequest(exc.reason.replace("fixed_ip[0].ip_address", "fixed_ip")) \
                    from None
            port = self._insert_port(
                tx, network_id=network_id, project_id=pid, device_id=iid,
                device_owner=DEVICE_OWNER_INSTANCE, fixed=fixed,
            )
            values = {
                "id": iid, "name": name, "hostname": hostname, "project_id": pid,
                "availability_zone": az, "flavor": flavor, "launch_index": 0,
                "key_name": key_name, "keypair_id": keypair["id"] if keypair else None,
                "keypair": keypair, "metadata": meta, "user_data": user_data,
                "image_id": image_id, "ec2_id": self.store.next_ec2_id(tx), "password": None,
                "created_at": _now(), "revision": tx.revision,
            }
            conn.execute(instances.insert().values(**values))
            self._instance_change(tx, "create", values)
            return _instance_dict(values, [port])

    def _instance_ports(self, conn: Connection, ids: Sequence[str]) -> dict[str, list[Json]]:
        out: dict[str, list[Json]] = {i: [] for i in ids}
        if not ids:
            return out
        rows = list(conn.execute(sa.select(ports).where(
            ports.c.device_id.in_(list(ids)), ports.c.device_owner.like("compute:%"))
            .order_by(ports.c.created_at)))
        for p in self._port_dicts(conn, rows):
            out[p["device_id"]].append(p)
        return out

    def list_instances(self, q: dict[str, str]) -> Json:
        where: list[Any] = []
        if q.get("name"):
            where.append(instances.c.name == q["name"])
        with self.store.read() as conn:
            if q.get("project_id"):
                where.append(instances.c.project_id == (
                    self._find_project(conn, q["project_id"]) or q["project_id"]))
            rows, nxt = self._page(conn, instances, where, q.get("limit"), q.get("marker"))
            pmap = self._instance_ports(conn, [r.id for r in rows])
            return {"instances": [_instance_dict(r._asdict(), pmap[r.id]) for r in rows],
                    "next": nxt}

    def get_instance(self, iid: str) -> Json:
        with self.store.read() as conn:
            row = self._get_row(conn, instances, "instance", iid)
            return _instance_dict(row._asdict(), self._instance_ports(conn, [iid])[iid])

    def update_instance(self, iid: str, raw: Any) -> Json:
        body = _body(raw, {"name", "metadata", "metadata_unset"})
        changes_: Json = {}
        if "name" in body:
            changes_["name"] = parse_name(body["name"])
        merge = parse_metadata(body.get("metadata") or {})
        unset = body.get("metadata_unset") or []
        if not isinstance(unset, list) or not all(isinstance(k, str) for k in unset):
            raise BadRequest(f"metadata_unset: expected a list of keys, got {unset!r}")
        with self.store.write() as tx:
            row = self._get_row(tx.conn, instances, "instance", iid)
            meta = dict(row.metadata)
            missing = [k for k in unset if k not in meta and k not in merge]
            if missing:
                raise NotFound(f"metadata_unset: instance {iid} has no property {missing[0]!r}")
            meta.update(merge)
            for k in unset:
                meta.pop(k, None)
            parse_metadata(meta)
            changes_["metadata"] = meta
            changes_["revision"] = tx.revision
            tx.conn.execute(instances.update().where(instances.c.id == iid).values(**changes_))
            values = {**row._asdict(), **changes_}
            self._instance_change(tx, "update", values)
            return _instance_dict(values, self._instance_ports(tx.conn, [iid])[iid])

    def delete_instance(self, iid: str) -> Json:
        with self.store.write() as tx:
            row = self._get_row(tx.conn, instances, "instance", iid)
            for p in tx.conn.execute(sa.select(ports).where(
                    ports.c.device_id == iid, ports.c.device_owner.like("compute:%"))).all():
                self._delete_port(tx, p)
            tx.conn.execute(instances.delete().where(instances.c.id == iid))
            self._instance_change(tx, "delete", row)
            return {}

    def get_password(self, iid: str) -> Json:
        with self.store.read() as conn:
            return {"password": self._get_row(conn, instances, "instance", iid).password}

    def set_password(self, iid: str, raw: Any) -> Json:
        body = _body(raw, {"password"})
        pw = body.get("password")
        if not isinstance(pw, str):
            raise BadRequest(f"password: expected a string, got {type(pw).__name__}")
        if len(pw) > MAX_PASSWORD_CHARS:
            raise BadRequest(f"password: {len(pw)} characters, more than {MAX_PASSWORD_CHARS}")
        with self.store.write() as tx:
            row = self._get_row(tx.conn, instances, "instance", iid)
            if row.password:
                raise Conflict(f"instance {iid} already has a password")
            tx.conn.execute(instances.update().where(instances.c.id == iid)
                            .values(password=pw, revision=tx.revision))
            self._instance_change(tx, "update", row)
            return {"password": pw}

    def clear_password(self, iid: str) -> Json:
        with self.store.write() as tx:
            row = self._get_row(tx.conn, instances, "instance", iid)
            tx.conn.execute(instances.update().where(instances.c.id == iid)
                            .values(password=None, revision=tx.revision))
            self._instance_change(tx, "update", row)
            return {"password": None}

    # ------------------------------------------------------------------ read models

    def view(self, iid: str) -> Json:
        """Everything the metadata API needs about one instance, in one read transaction."""
        with self.store.read() as conn:
            rev = self.store.revision(conn)
            row = self._get_row(conn, instances, "instance", iid)
            rows = list(conn.execute(_VIEW_PORTS, {"iid": iid}))
            net_ids = sorted({r.network_id for r in rows})
            sub_rows = (list(conn.execute(_VIEW_SUBNETS, {"net_ids": net_ids}))
                        if net_ids else [])
        subs_by_net: dict[str, list[Json]] = {}
        seen: set[str] = set()
        for s in sub_rows:
            if s.id in seen:
                continue
            seen.add(s.id)
            subs_by_net.setdefault(s.network_id, []).append({
                "id": s.id, "cidr": s.cidr, "ip_version": s.ip_version,
                "gateway_ip": s.gateway_ip, "enable_dhcp": s.enable_dhcp,
                "dns_nameservers": s.dns_nameservers, "host_routes": s.host_routes,
                "isolated": s.gw_port_id is None, "dhcp_ip": s.dhcp_ip,
            })
        view_ports: dict[str, Json] = {}
        port_rows: dict[str, Row[Any]] = {}
        for r in rows:
            p = view_ports.get(r.id)
            if p is None:
                port_rows[r.id] = r
                p = view_ports[r.id] = {
                    "id": r.id, "mac_address": r.mac_address, "network_id": r.network_id,
                    "device_owner": r.device_owner, "fixed_ips": [],
                    "network": {"id": r.network_id, "name": r.net_name, "mtu": r.net_mtu},
                    "subnets": subs_by_net.get(r.network_id, []),
                }
            if r.ip_address is not None:
                p["fixed_ips"].append({"subnet_id": r.subnet_id, "ip_address": r.ip_address})
        plist = list(view_ports.values())
        for p in plist:
            p["fixed_ips"].sort(key=lambda i: _ip_sort_key(i["ip_address"]))
        inst = _instance_dict(row._asdict(), [
            _port_dict(port_rows[p["id"]]._asdict(), p["fixed_ips"]) for p in plist])
        inst["password"] = row.password
        kp = row.keypair
        return {"revision": rev, "instance": inst,
                "keypair": dict(kp) if kp else None, "ports": plist}

    def lookup(self, q: dict[str, str]) -> Json:
        router_id, network_id = q.get("router_id"), q.get("network_id")
        if bool(router_id) == bool(network_id):
            raise BadRequest("router_id: give exactly one of router_id and network_id")
        if not q.get("ip"):
            raise BadRequest("ip: required")
        ip = str(ipam.normalize_ip(ipam.parse_ip(q["ip"], "ip")))
        query = _LOOKUP_ROUTER if router_id else _LOOKUP_NETWORK
        params = {"ip": ip, "ref": router_id or network_id}
        with self.store.read() as conn:
            rev = self.store.revision(conn)
            found = [dict(r._mapping) for r in conn.execute(query, params)]
        return {"revision": rev, "ports": found}

    def topology(self) -> Json:
        with self.store.read() as conn:
            rev = self.store.revision(conn)
            nets = self._network_dicts(conn, list(conn.execute(
                sa.select(networks).order_by(networks.c.id))))
            subs = [_subnet_dict(r._asdict()) for r in conn.execute(
                sa.select(subnets).order_by(subnets.c.id))]
            rts = self._router_dicts(conn, list(conn.execute(
                sa.select(routers).order_by(routers.c.id))))
            prows = list(conn.execute(
                sa.select(ports, instances.c.hostname.label("hostname"))
                .outerjoin(instances, sa.and_(instances.c.id == ports.c.device_id,
                                              ports.c.device_owner.like("compute:%")))
                .order_by(ports.c.id)))
            ips: dict[str, list[Json]] = {r.id: [] for r in prows}
            for r in conn.execute(sa.select(port_ips)):
                if r.port_id in ips:
                    ips[r.port_id].append({"subnet_id": r.subnet_id,
                                           "ip_address": r.ip_address})
        plist = []
        for r in prows:
            fixed = sorted(ips[r.id], key=lambda i: _ip_sort_key(i["ip_address"]))
            plist.append({**_port_dict(r._asdict(), fixed), "hostname": r.hostname})
        return {"revision": rev, "networks": nets, "subnets": subs, "routers": rts,
                "ports": plist}

    def changes(self, since: int, limit: int | None = None) -> Json:
        """Changes newer than since, whole revisions only; ResyncRequired outside the window."""
        size = min(limit or self.max_page_size, self.max_page_size)
        with self.store.read() as conn:
            rev = self.store.revision(conn)
            floor = self.store.floor(conn)
            if since > rev or since < floor:
                raise ResyncRequired(
                    f"since: revision {since} is outside the retained window "
                    f"({floor}..{rev}); reload everything", rev)
            rows = list(conn.execute(
                sa.select(changes).where(changes.c.revision > since)
                .order_by(changes.c.seq).limit(size + 1)))
            if len(rows) > size:
                cut = rows[size].revision
                if rows[0].revision == cut:
                    rows = list(conn.execute(sa.select(changes).where(
                        changes.c.revision == cut).order_by(changes.c.seq)))
                else:
                    rows = [r for r in rows if r.revision < cut]
        out = [{"revision": r.revision, "kind": r.kind, "op": r.op, "id": r.obj_id,
                "attrs": r.attrs} for r in rows]
        return {"revision": out[-1]["revision"] if out else rev, "changes": out}


# ---------------------------------------------------------------------- prepared queries
# Built once: constructing SQLAlchemy statements per call costs more than running them.


def _view_subnets_query() -> sa.Select[Any]:
    dhcp = port_ips.alias("dhcp_ip")
    dhcp_port = ports.alias("dhcp_port")
    gw = port_ips.alias("gw_ip")
    gw_port = ports.alias("gw_port")
    return (
        sa.select(subnets, dhcp.c.ip_address.label("dhcp_ip"), gw_port.c.id.label("gw_port_id"))
        .outerjoin(dhcp_port, sa.and_(dhcp_port.c.network_id == subnets.c.network_id,
                                      dhcp_port.c.device_owner == DEVICE_OWNER_DHCP))
        .outerjoin(dhcp, sa.and_(dhcp.c.port_id == dhcp_port.c.id,
                                 dhcp.c.subnet_id == subnets.c.id))
        .outerjoin(gw, sa.and_(gw.c.subnet_id == subnets.c.id,
                               gw.c.ip_address == subnets.c.gateway_ip))
        .outerjoin(gw_port, sa.and_(gw_port.c.id == gw.c.port_id,
                                    gw_port.c.device_owner == DEVICE_OWNER_ROUTER))
        .where(subnets.c.network_id.in_(sa.bindparam("net_ids", expanding=True)))
        .order_by(subnets.c.created_at, subnets.c.id)
    )


_VIEW_SUBNETS = _view_subnets_query()
_VIEW_PORTS = (
    sa.select(ports, networks.c.name.label("net_name"), networks.c.mtu.label("net_mtu"),
              port_ips.c.subnet_id, port_ips.c.ip_address)
    .join(networks, networks.c.id == ports.c.network_id)
    .outerjoin(port_ips, port_ips.c.port_id == ports.c.id)
    .where(ports.c.device_id == sa.bindparam("iid"), ports.c.device_owner.like("compute:%"))
    .order_by(ports.c.created_at, ports.c.id)
)
_LOOKUP_COLUMNS = (ports.c.id, ports.c.network_id, ports.c.device_id, ports.c.device_owner,
                   ports.c.project_id, ports.c.mac_address)
# Neutron's two RPCs in one query: the router's networks, then the ports holding the IP there.
_LOOKUP_ROUTER = (
    sa.select(*_LOOKUP_COLUMNS).join(port_ips, port_ips.c.port_id == ports.c.id)
    .where(port_ips.c.ip_address == sa.bindparam("ip"),
           port_ips.c.network_id.in_(
               sa.select(ports.c.network_id).where(
                   ports.c.device_id == sa.bindparam("ref"),
                   ports.c.device_owner == DEVICE_OWNER_ROUTER).scalar_subquery()))
    .order_by(ports.c.id)
)
_LOOKUP_NETWORK = (
    sa.select(*_LOOKUP_COLUMNS).join(port_ips, port_ips.c.port_id == ports.c.id)
    .where(port_ips.c.ip_address == sa.bindparam("ip"),
           port_ips.c.network_id == sa.bindparam("ref"))
    .order_by(ports.c.id)
)


# ---------------------------------------------------------------------- shaping


def _parse_user_data(raw: Any) -> bytes | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise BadRequest("user_data: expected base64 text")
    if len(raw) > (MAX_USER_DATA_BYTES * 4) // 3 + 8:
        raise BadRequest(f"user_data: larger than {MAX_USER_DATA_BYTES} bytes")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("user_data: not valid base64") from None
    if len(data) > MAX_USER_DATA_BYTES:
        raise BadRequest(f"user_data: {len(data)} bytes, larger than {MAX_USER_DATA_BYTES}")
    return data


def _port_dict(row: Row[Any] | Json, fixed_ips: list[Json]) -> Json:
    d = row if isinstance(row, dict) else row._asdict()
    return {
        "id": d["id"], "name": d.get("name", ""), "network_id": d["network_id"],
        "project_id": d["project_id"], "mac_address": d["mac_address"],
        "fixed_ips": fixed_ips, "device_id": d["device_id"],
        "device_owner": d["device_owner"], "created_at": d.get("created_at"),
        "revision": d.get("revision"),
    }


def _subnet_dict(d: Json) -> Json:
    keys = ("id", "name", "network_id", "project_id", "ip_version", "cidr", "gateway_ip",
            "enable_dhcp", "allocation_pools", "dns_nameservers", "host_routes", "created_at",
            "revision")
    return {k: d[k] for k in keys}


def _instance_dict(d: Json, port_list: list[Json]) -> Json:
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
        "ports": port_list,
    }
