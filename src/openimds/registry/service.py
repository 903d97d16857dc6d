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
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from openimds.core import ipam, nodes
from openimds.core.models import (
    DEVICE_OWNER_DHCP,
    DEVICE_OWNER_INSTANCE,
    DEVICE_OWNER_ROUTER,
    MAX_PASSWORD_CHARS,
    MAX_USER_DATA_BYTES,
    parse_hostname,
    parse_metadata,
    parse_name,
    parse_public_key,
    sanitize_hostname,
)
from openimds.errors import BadRequest, Conflict, NotFound
from openimds.registry import dhcp_ports, ipalloc, reuse, scheduler, views
from openimds.registry.allocation import (
    allocate,
    delete_port,
    insert_port,
    network_read,
    port_network,
)
from openimds.registry.records import (
    Json,
    bound_hosts,
    by_id,
    get_row,
    hosts_of,
    instance_change,
    instance_dict,
    instance_ports,
    network_dicts,
    new_id,
    now,
    port_change,
    port_dicts,
    ref_row,
    router_dicts,
    subnet_change,
    subnet_dict,
)
from openimds.registry.store import (
    StaleTake,
    Store,
    Tx,
    agents,
    allocate_segment,
    instance_hosts,
    instances,
    keypairs,
    networks,
    port_ips,
    ports,
    projects,
    retired_instances,
    routers,
    segments,
    subnets,
)
from openimds.registry.store import changes as changes_table

log = logging.getLogger(__name__)

DEFAULT_PROJECT = "default"
# inline (no implicit RETURNING): both run in the commit's pipeline (Tx.later)
_INSERT_INSTANCE = instances.insert().inline()
_INSERT_INSTANCE_HOST = instance_hosts.insert().inline()
_AGENTS = sa.select(agents.c.host, agents.c.type, agents.c.alive, agents.c.heartbeat_at,
                    agents.c.peers)
# Changes the reaper's plan cannot ignore outright (then instance ports are skipped by owner).
_PLACEMENT_CHANGES = sa.select(changes_table.c.kind, changes_table.c.attrs).where(
    changes_table.c.revision > sa.bindparam("since"),
    changes_table.c.kind.notin_(("instance", "keypair", "project")))
MAX_WAIT_S = 60.0







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


def _checked_if_stale(write: Callable[[bool], Json]) -> Json:
    """A create, `write(checked)`: first with its automatic addresses taken at the commit
    trusting the subnets' free state (checked=False, PostgreSQL: `ipalloc.pick`'s read);
    if that state was out of step (`StaleTake`, nothing kept), once more with each take
    checked against port_ips, which repairs the state."""
    try:
        return write(False)
    except StaleTake as exc:
        log.warning("registry.ip_take_retried reason=%s", exc.reason)
        return write(True)


def _find_keypair(conn: Connection, name: str, project_id: str) -> Row[Any]:
    """The key pair named so in the instance's project; failing that (Nova keeps key pairs
    per user, not per project), the one key pair of that name in any project."""
    kp = conn.execute(sa.select(keypairs).where(
        keypairs.c.project_id == project_id, keypairs.c.name == name)).first()
    if kp is not None:
        return kp
    found = conn.execute(sa.select(keypairs).where(keypairs.c.name == name).limit(2)).all()
    if len(found) == 1:
        return found[0]
    if not found:
        raise BadRequest(f"key_name: no key pair named {name!r}")
    raise BadRequest(f"key_name: {name!r} names key pairs in several projects, none in "
                     f"project {project_id}")


class Registry:
    """All registry operations over one `Store`."""

    def __init__(self, store: Store, *, max_page_size: int = 1000,
                 policy: scheduler.Policy | None = None,
                 reuse_hold: float = reuse.DEFAULT_HOLD_S) -> None:
        self.store = store
        self.reuse = reuse.ReuseHold(max(reuse_hold, reuse.MIN_HOLD_S))
        store.before_commit = self.reuse  # a reused IP waits for the agents' leases
        store.reuse_window_s = self.reuse.window_s  # and automatic picks avoid it meanwhile
        self.max_page_size = max_page_size
        self.policy = policy or scheduler.Policy(down_time_s=10.0, dhcp_per_network=1)
        # No agent is declared dead before this process has been up for agent_down_time:
        # after a registry outage every heartbeat looks old, and the agents need one report
        # interval to show they are alive (else the first to report would take everything).
        self._expire_after = time.monotonic() + self.policy.down_time_s
        # (revision, agents' liveness) at which the reaper last found nothing to do.
        self._quiet: tuple[int, tuple[Any, ...]] | None = None
        # DHCP ports written before one-port-per-node (device_id dhcp-<network>) are handed
        # to their nodes by the first reconcile (scheduler.plan check_dhcp).
        self._dhcp_checked = False

    # ------------------------------------------------------------------ nodes, scheduling

    def _may_expire(self) -> bool:
        return time.monotonic() >= self._expire_after

    def _schedule(self, tx: Tx) -> None:
        scheduler.apply(tx, time.time(), self.policy, expire=self._may_expire())

    def heartbeat(self, raw: Any) -> Json:
        """One agent's report: (host, type) is alive now. A known alive agent costs a read of
        its peers and one UPDATE (no revision, no change row); a new or revived one is a
        "host" change and runs the scheduler (it may take unplaced work; it takes nothing
        back). The answer's `peers` (other alive agents of this type, kept in the row) tells
        the agent whether to fence itself on a registry outage (registry/heartbeat.py)."""
        body = _body(raw, {"host", "type"})
        host = parse_name(body.get("host"), "host")
        type_ = body.get("type")
        if type_ not in nodes.AGENT_TYPES:
            known = ", ".join(sorted(nodes.AGENT_TYPES))
            raise BadRequest(f"type: {type_!r} is not one of {known}")
        at = time.time()
        expire = self._may_expire()
        this = (agents.c.host == host) & (agents.c.type == type_)
        with self.store.quiet_write() as conn:
            n = scheduler.peers(conn, host, type_, at, self.policy, expire=expire)
            updated = conn.execute(agents.update().where(this, agents.c.alive.is_(True))
                                   .values(heartbeat_at=at, peers=n)).rowcount
        if not updated:
            with self.store.write(allow_empty=True) as tx:
                row = scheduler.agent_row(tx.conn, host, type_)
                if row is None:
                    tx.conn.execute(agents.insert().values(
                        host=host, type=type_, heartbeat_at=at, alive=True, created_at=now(),
                        revision=tx.revision))
                    tx.change("host", "create", host, {"type": type_, "alive": True})
                elif not row.alive:
                    tx.conn.execute(agents.update().where(this)
                                    .values(heartbeat_at=at, alive=True, revision=tx.revision))
                    tx.change("host", "update", host, {"type": type_, "alive": True})
                if tx.changes:
                    self._schedule(tx)
                n = scheduler.peers(tx.conn, host, type_, at, self.policy, expire=expire)
                tx.conn.execute(agents.update().where(this).values(peers=n))
        return {"host": host, "type": type_, "alive": True,
                "heartbeat_at": scheduler.iso(at),
                "agent_down_time": self.policy.down_time_s, "peers": n}

    def reconcile(self) -> bool:
        """Declare silent agents dead and move or place work; True if anything changed.
        A read first: the write (and its lock) is taken only when there is work, and the
        plan only when something it reads changed since it last found nothing to do."""
        at = time.time()
        expire = self._may_expire()
        check = not self._dhcp_checked
        with self.store.read() as conn:
            liveness = self._liveness(conn, at, expire)
            revision, floor = self.store.window(conn)
            if not check and self._settled(conn, liveness, floor):
                self._quiet = (revision, liveness)
                return False
            if not scheduler.plan(conn, at, self.policy, expire=expire, check_dhcp=check):
                self._quiet = (revision, liveness)
                self._dhcp_checked = True
                return False
        self._quiet = None
        with self.store.write(allow_empty=True) as tx:
            done = scheduler.apply(tx, at, self.policy, expire=expire, check_dhcp=check)
            if done:
                log.info("registry.rescheduled expired=%s moves=%s dhcp_ports=%s",
                         done.expired, {k: v for k, v in done.moves.items() if v},
                         done.dhcp_stale)
        self._dhcp_checked = True
        return bool(tx.changes)

    def _liveness(self, conn: Connection, at: float, expire: bool) -> tuple[Any, ...]:
        """What `scheduler.plan` reads of the agents: who is alive by the rule, who is still
        flagged alive, who was told it had no peers (a few rows; heartbeat times only count
        through the rule)."""
        return (expire, tuple(sorted(
            (a.host, a.type, scheduler.alive_at(a, at, self.policy, expire=expire),
             bool(a.alive), a.peers) for a in conn.execute(_AGENTS))))

    def _settled(self, conn: Connection, liveness: tuple[Any, ...], floor: int) -> bool:
        """True when the last plan found nothing to do and nothing it reads has changed:
        the same liveness, and no change since of a kind that could place or be placed.
        plan() reads agents, routers, networks and bindings; instances, key pairs,
        projects and instance ports are none of these (any other change, or a window the
        feed no longer holds, plans again)."""
        if self._quiet is None or self._quiet[1] != liveness or self._quiet[0] < floor:
            return False
        for kind, attrs in conn.execute(_PLACEMENT_CHANGES, {"since": self._quiet[0]}):
            if kind != "port" or not str((attrs or {}).get("device_owner", "")).startswith(
                    "compute:"):
                return False
        return True

    def list_hosts(self, q: dict[str, str]) -> Json:
        with self.store.read() as conn:
            return {"hosts": scheduler.hosts_report(conn, time.time(), self.policy),
                    "next": None}

    def delete_host(self, name: str) -> Json:
        """Forget a decommissioned node: its agents' rows go and whatever was still bound to
        it is placed on alive nodes. 409 while any of its agents is alive."""
        with self.store.write() as tx:
            rows = list(tx.conn.execute(sa.select(agents).where(agents.c.host == name)))
            if not rows:
                raise NotFound(f"host {name} not found")
            at = time.time()
            alive = [r.type for r in rows
                     if r.alive and at - float(r.heartbeat_at) <= self.policy.down_time_s]
            if alive:
                raise Conflict(f"host {name} is alive ({', '.join(alive)} agent heartbeats "
                               f"within {self.policy.down_time_s:g} s): stop it first")
            tx.conn.execute(agents.delete().where(agents.c.host == name))
            tx.change("host", "delete", name, {"types": sorted(r.type for r in rows)})
            self._schedule(tx)
            return {}

    def get_host(self, name: str) -> Json:
        for h in self.list_hosts({})["hosts"]:
            if h["name"] == name:
                return dict(h)
        raise NotFound(f"host {name} not found")

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
            pid = new_id()
        conn.execute(projects.insert().values(
            id=pid, name=name, created_at=now(), revision=tx.revision))
        tx.change("project", "create", pid, {"name": name})
        return pid

    def _find_project(self, conn: Connection, ref: str) -> str | None:
        row = conn.execute(
            sa.select(projects.c.id).where(sa.or_(projects.c.id == ref, projects.c.name == ref))
        ).first()
        return None if row is None else str(row.id)












    # ------------------------------------------------------------------ health, projects

    def health(self) -> Json:
        with self.store.read() as conn:
            # lease_s: a consumer that resyncs from this revision may trust what it then
            # loads for that long (registry/reuse.py)
            return {"status": "ok", "revision": self.store.revision(conn),
                    "lease_s": reuse.LEASE_S, "hold_s": self.reuse.hold_s}

    def create_project(self, raw: Any) -> Json:
        body = _body(raw, {"name", "id"})
        name = parse_name(body.get("name"))
        with self.store.write() as tx:
            if tx.conn.execute(sa.select(projects.c.id).where(
                    sa.or_(projects.c.name == name, projects.c.id == name))).first():
                raise Conflict(f"project {name!r} already exists")
            pid = _opt_str(body, "id") or new_id()
            tx.conn.execute(projects.insert().values(
                id=pid, name=name, created_at=now(), revision=tx.revision))
            tx.change("project", "create", pid, {"name": name})
            return {"id": pid, "name": name, "created_at": now(), "revision": tx.revision}

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
            values: Json = {"id": new_id(), "name": name, "project_id": pid, "mtu": mtu,
                      "created_at": now(), "revision": tx.revision}
            tx.conn.execute(networks.insert().values(**values))
            vni = allocate_segment(tx.conn, values["id"])
            tx.change("network", "create", values["id"],
                      {"name": name, "project_id": pid, "mtu": mtu})
            self._schedule(tx)
            hosts = bound_hosts(tx.conn, "network", [values["id"]])
            return {**values, "subnets": [], "segmentation_id": vni,
                    "hosts": hosts.get(values["id"], [])}


    def list_networks(self, q: dict[str, str]) -> Json:
        where = []
        if q.get("name"):
            where.append(networks.c.name == q["name"])
        with self.store.read() as conn:
            if q.get("project_id"):
                where.append(networks.c.project_id == (
                    self._find_project(conn, q["project_id"]) or q["project_id"]))
            rows, nxt = self._page(conn, networks, where, q.get("limit"), q.get("marker"))
            return {"networks": network_dicts(conn, rows), "next": nxt}

    def get_network(self, nid: str) -> Json:
        with self.store.read() as conn:
            return network_dicts(conn, [get_row(conn, networks, "network", nid)])[0]

    def delete_network(self, nid: str) -> Json:
        with self.store.write() as tx:
            conn = tx.conn
            net = get_row(conn, networks, "network", nid)
            held = list(conn.execute(sa.select(ports).where(
                ports.c.network_id == nid, ports.c.device_owner != DEVICE_OWNER_DHCP)))
            if held:
                ids = ", ".join(p.id for p in held[:5])
                raise Conflict(f"network {nid} still has {len(held)} port(s): {ids}")
            for p in conn.execute(sa.select(ports).where(ports.c.network_id == nid)).all():
                delete_port(tx, p)
            for s in conn.execute(sa.select(subnets).where(subnets.c.network_id == nid)).all():
                ipalloc.drop(tx, s.id)
                conn.execute(subnets.delete().where(subnets.c.id == s.id))
                subnet_change(tx, "delete", s)
            conn.execute(segments.delete().where(segments.c.network_id == nid))
            conn.execute(networks.delete().where(networks.c.id == nid))
            scheduler.unbind(tx, "network", nid)
            tx.change("network", "delete", nid, {"name": net.name, "project_id": net.project_id,
                                                 "mtu": net.mtu})
            return {}

    # ------------------------------------------------------------------ subnets

    def create_subnet(self, raw: Any) -> Json:
        body = _body(raw, {"name", "network_id", "cidr", "gateway_ip", "enable_dhcp",
                           "allocation_pools", "dns_nameservers", "host_routes", "ip_version",
                           "project_id", "ipv6_address_mode", "ipv6_ra_mode"})
        name = parse_name(body.get("name", ""), required=False)
        network_id = _req_id(body, "network_id")
        net = ipam.parse_cidr(body.get("cidr"))
        if body.get("ip_version") not in (None, net.version):
            raise BadRequest(f"ip_version: {body['ip_version']!r} does not match cidr {net}")
        address_mode, ra_mode = ipam.parse_ipv6_modes(
            body.get("ipv6_address_mode"), body.get("ipv6_ra_mode"), net)
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
            network = ref_row(conn, networks, "network", "network_id", network_id)
            existing = list(conn.execute(
                sa.select(subnets.c.cidr).where(subnets.c.network_id == network_id)).scalars())
            clash = ipam.overlapping(net, [ipaddress.ip_network(c) for c in existing])
            if clash is not None:
                raise Conflict(f"cidr: {net} overlaps subnet {clash} on network {network_id}")
            pid = (self._ensure_project(tx, body["project_id"]) if body.get("project_id")
                   else network.project_id)
            values = {
                "id": new_id(), "name": name, "network_id": network_id, "project_id": pid,
                "ip_version": net.version, "cidr": str(net),
                "gateway_ip": None if gateway is None else str(gateway),
                "enable_dhcp": enable_dhcp, "allocation_pools": [p.as_dict() for p in pools],
                "dns_nameservers": dns, "host_routes": routes, "created_at": now(),
                "revision": tx.revision, "ipv6_address_mode": address_mode,
                "ipv6_ra_mode": ra_mode,
            }
            conn.execute(subnets.insert().values(**values))
            if address_mode not in ipam.AUTO_ADDRESS_MODES:
                # its free addresses are its pools; the writes after keep them in step
                ipalloc.build(tx, conn.execute(sa.select(subnets).where(
                    subnets.c.id == values["id"])).one())
            subnet_change(tx, "create", values)
            if enable_dhcp:
                self._add_dhcp_ip(tx, network, values)
            if address_mode in ipam.AUTO_ADDRESS_MODES:
                self._add_auto_addresses(tx, values, net)
            return subnet_dict(values)

    def _add_auto_addresses(self, tx: Tx, subnet: Json, net: ipam.IPNetwork) -> None:
        """A new SLAAC/stateless subnet addresses the network's existing ports too (as
        Neutron's _add_auto_addrs_on_network_ports): each non-router, non-DHCP port gains
        the EUI-64 address of its MAC."""
        conn = tx.conn
        for port in conn.execute(sa.select(ports).where(
                ports.c.network_id == subnet["network_id"],
                ports.c.device_owner.not_in((DEVICE_OWNER_ROUTER, DEVICE_OWNER_DHCP)))).all():
            before = list(conn.execute(sa.select(port_ips.c.ip_address)
                                       .where(port_ips.c.port_id == port.id)).scalars())
            ip = str(ipam.eui64_address(net, port.mac_address))
            conn.execute(port_ips.insert().values(port_id=port.id, subnet_id=subnet["id"],
                                                  network_id=port.network_id, ip_address=ip))
            conn.execute(ports.update().where(ports.c.id == port.id)
                         .values(revision=tx.revision))
            port_change(tx, "update", port, [*before, ip])

    def _add_dhcp_ip(self, tx: Tx, network: Row[Any], subnet: Json) -> None:
        """Every DHCP port of the network gains an address on the new subnet; each DHCP node
        of the network without a port gets one (registry/dhcp_ports.py)."""
        hosts = bound_hosts(tx.conn, "network", [network.id]).get(network.id, [])
        dhcp_ports.add_subnet(tx, network, subnet["id"], hosts)

    def list_subnets(self, q: dict[str, str]) -> Json:
        where = []
        for key in ("network_id", "name", "cidr"):
            if q.get(key):
                where.append(subnets.c[key] == q[key])
        with self.store.read() as conn:
            rows, nxt = self._page(conn, subnets, where, q.get("limit"), q.get("marker"))
            return {"subnets": [subnet_dict(r._asdict()) for r in rows], "next": nxt}

    def get_subnet(self, sid: str) -> Json:
        with self.store.read() as conn:
            return subnet_dict(get_row(conn, subnets, "subnet", sid)._asdict())

    def delete_subnet(self, sid: str) -> Json:
        with self.store.write() as tx:
            conn = tx.conn
            subnet = get_row(conn, subnets, "subnet", sid)
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
                    port_change(tx, "delete", port, before)
                else:
                    conn.execute(ports.update().where(ports.c.id == port.id)
                                 .values(revision=tx.revision))
                    port_change(tx, "update", port, before)
            ipalloc.drop(tx, sid)
            conn.execute(subnets.delete().where(subnets.c.id == sid))
            subnet_change(tx, "delete", subnet)
            return {}

    # ------------------------------------------------------------------ routers


    def create_router(self, raw: Any) -> Json:
        body = _body(raw, {"name", "project_id"})
        name = parse_name(body.get("name"))
        with self.store.write() as tx:
            pid = self._ensure_project(tx, body.get("project_id"))
            values: Json = {"id": new_id(), "name": name, "project_id": pid,
                            "created_at": now(),
                      "revision": tx.revision}
            tx.conn.execute(routers.insert().values(**values))
            tx.change("router", "create", values["id"], {"name": name, "project_id": pid})
            self._schedule(tx)
            hosts = bound_hosts(tx.conn, "router", [values["id"]])
            return {**values, "interfaces": [], "hosts": hosts.get(values["id"], [])}

    def list_routers(self, q: dict[str, str]) -> Json:
        where = [routers.c.name == q["name"]] if q.get("name") else []
        with self.store.read() as conn:
            rows, nxt = self._page(conn, routers, where, q.get("limit"), q.get("marker"))
            return {"routers": router_dicts(conn, rows), "next": nxt}

    def get_router(self, rid: str) -> Json:
        with self.store.read() as conn:
            return router_dicts(conn, [get_row(conn, routers, "router", rid)])[0]

    def delete_router(self, rid: str) -> Json:
        with self.store.write() as tx:
            router = get_row(tx.conn, routers, "router", rid)
            n = tx.conn.execute(sa.select(sa.func.count()).select_from(ports).where(
                ports.c.device_owner == DEVICE_OWNER_ROUTER, ports.c.device_id == rid)).scalar()
            if n:
                raise Conflict(f"router {rid} still has {n} interface(s)")
            tx.conn.execute(routers.delete().where(routers.c.id == rid))
            scheduler.unbind(tx, "router", rid)
            tx.change("router", "delete", rid, {"name": router.name,
                                                "project_id": router.project_id})
            return {}

    def add_interface(self, rid: str, raw: Any) -> Json:
        body = _body(raw, {"subnet_id"})
        sid = _req_id(body, "subnet_id")
        with self.store.write() as tx:
            conn = tx.conn
            router = get_row(conn, routers, "router", rid)
            subnet = ref_row(conn, subnets, "subnet", "subnet_id", sid)
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
            port = insert_port(
                tx, network_id=subnet.network_id, project_id=router.project_id, device_id=rid,
                device_owner=DEVICE_OWNER_ROUTER, fixed=[(sid, subnet.gateway_ip)],
            )
            conn.execute(routers.update().where(routers.c.id == rid).values(revision=tx.revision))
            tx.change("router", "update", rid, {"name": router.name,
                                                "project_id": router.project_id})
            conn.execute(subnets.update().where(subnets.c.id == sid).values(revision=tx.revision))
            subnet_change(tx, "update", subnet)
            return port

    def remove_interface(self, rid: str, raw: Any) -> Json:
        body = _body(raw, {"subnet_id"})
        sid = _req_id(body, "subnet_id")
        with self.store.write() as tx:
            conn = tx.conn
            router = get_row(conn, routers, "router", rid)
            subnet = ref_row(conn, subnets, "subnet", "subnet_id", sid)
            port = conn.execute(
                sa.select(ports).join(port_ips, port_ips.c.port_id == ports.c.id)
                .where(ports.c.device_owner == DEVICE_OWNER_ROUTER, ports.c.device_id == rid,
                       port_ips.c.subnet_id == sid)).first()
            if port is None:
                raise NotFound(f"router {rid} has no interface on subnet {sid}")
            delete_port(tx, port)
            conn.execute(routers.update().where(routers.c.id == rid).values(revision=tx.revision))
            tx.change("router", "update", rid, {"name": router.name,
                                                "project_id": router.project_id})
            conn.execute(subnets.update().where(subnets.c.id == sid).values(revision=tx.revision))
            subnet_change(tx, "update", subnet)
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

        def write(checked: bool) -> Json:
            read = network_read(self.store.backend, network_id, self.store.reuse_window_s)
            with self.store.write(first=read.query) as tx:
                network = port_network(tx, read)
                pid = (self._ensure_project(tx, body["project_id"]) if body.get("project_id")
                       else network.project_id)
                fixed = allocate(tx, network_id, body.get("fixed_ips"),
                                 mac=mac or network.mac, device_owner=owner,
                                 subs=network.subnets, picks=None if checked else network.picks)
                # a drawn MAC is free by the network's read: no re-check at insert; the port
                # and its addresses go in with the change rows, in the commit's round trip
                # on PostgreSQL (as an instance's): nothing below reads them back (the
                # reuse hold asks about its own router scope by key, not through ports)
                return insert_port(tx, network_id=network_id, project_id=pid,
                                   device_id=device_id, device_owner=owner, fixed=fixed,
                                   name=name, mac=mac or network.mac, mac_checked=mac is None,
                                   later=True)

        return _checked_if_stale(write)

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
            return {"ports": port_dicts(conn, rows), "next": nxt}

    def get_port(self, port_id: str) -> Json:
        with self.store.read() as conn:
            return port_dicts(conn, [get_row(conn, ports, "port", port_id)])[0]

    def delete_port(self, port_id: str) -> Json:
        with self.store.write() as tx:
            port = get_row(tx.conn, ports, "port", port_id)
            if port.device_owner == DEVICE_OWNER_ROUTER:
                raise Conflict(f"port {port_id} is a router interface: use remove_interface")
            if port.device_owner.startswith("compute:") and tx.conn.execute(
                    sa.select(instances.c.id).where(instances.c.id == port.device_id)).first():
                raise Conflict(f"port {port_id} belongs to instance {port.device_id}: "
                               "delete the instance")
            delete_port(tx, port)
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
            values: Json = {"id": new_id(), "name": name, "project_id": pid,
                      "public_key": key.text, "fingerprint": key.fingerprint, "type": key.type,
                      "created_at": now(), "revision": tx.revision}
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
            return dict(get_row(conn, keypairs, "keypair", kid)._mapping)

    def delete_keypair(self, kid: str) -> Json:
        with self.store.write() as tx:
            kp = get_row(tx.conn, keypairs, "keypair", kid)
            tx.conn.execute(keypairs.delete().where(keypairs.c.id == kid))
            tx.change("keypair", "delete", kid, {"name": kp.name, "project_id": kp.project_id})
            return {}

    # ------------------------------------------------------------------ instances

    def create_instance(self, raw: Any) -> Json:
        body = _body(raw, {"name", "network_id", "fixed_ip", "key_name", "user_data",
                           "metadata", "availability_zone", "flavor", "project_id", "hostname",
                           "image_id", "id", "host"})
        name = parse_name(body.get("name"))
        network_id = _req_id(body, "network_id")
        given = _opt_str(body, "id")
        iid = new_id()
        if given is not None:
            try:
                iid = str(uuid.UUID(given))
            except ValueError:
                raise BadRequest(f"id: {given!r} is not a UUID") from None
        hostname = (parse_hostname(body["hostname"]) if body.get("hostname") is not None
                    else sanitize_hostname(name, iid))
        user_data = _parse_user_data(body.get("user_data"))
        meta = parse_metadata(body.get("metadata") or {})
        az = parse_name(body.get("availability_zone", "nova"), "availability_zone")
        flavor = parse_name(body.get("flavor", "m1.small"), "flavor")
        image_id = _opt_str(body, "image_id")
        key_name = _opt_str(body, "key_name")
        host = parse_name(body["host"], "host") if body.get("host") is not None else None
        requests = None
        if body.get("fixed_ip") is not None:
            requests = [{"ip_address": body["fixed_ip"]}]

        def write(checked: bool) -> Json:
            read = network_read(self.store.backend, network_id, self.store.reuse_window_s)
            with self.store.write(ec2_id=True, first=read.query) as tx:
                conn = tx.conn
                network = port_network(tx, read)
                mac = network.mac
                pid = (self._ensure_project(tx, body["project_id"]) if body.get("project_id")
                       else network.project_id)
                keypair = None
                if key_name is not None:
                    kp = _find_keypair(conn, key_name, pid)
                    keypair = {k: getattr(kp, k) for k in
                               ("id", "name", "public_key", "type", "fingerprint")}
                # An ID we drew ourselves is a fresh random UUID: only a caller's can be taken.
                if given is not None and by_id(conn, instances, iid) is not None:
                    raise Conflict(f"instance {iid} already exists")
                retired = by_id(conn, retired_instances, iid) if given is not None else None
                if retired is not None:
                    raise Conflict(f"id: instance {iid} was deleted at {retired.deleted_at}; an "
                                   "instance ID is never reused (a metadata API may still hold "
                                   "the deleted instance's documents)")
                try:
                    fixed = allocate(tx, network_id, requests, mac=mac,
                                     device_owner=DEVICE_OWNER_INSTANCE, field="fixed_ip",
                                     subs=network.subnets,
                                     picks=None if checked else network.picks)
                except BadRequest as exc:
                    raise BadRequest(exc.reason.replace("fixed_ip[0].ip_address", "fixed_ip")) \
                        from None
                # the port, its addresses and the instance go in with the change rows, in the
                # commit's round trip on PostgreSQL: nothing below reads them back
                port = insert_port(
                    tx, network_id=network_id, project_id=pid, device_id=iid,
                    device_owner=DEVICE_OWNER_INSTANCE, fixed=fixed, mac=mac, mac_checked=True,
                    later=True,
                )
                values = {
                    "id": iid, "name": name, "hostname": hostname, "project_id": pid,
                    "availability_zone": az, "flavor": flavor, "launch_index": 0,
                    "key_name": key_name, "keypair_id": keypair["id"] if keypair else None,
                    "keypair": keypair, "metadata": meta, "user_data": user_data,
                    "image_id": image_id, "ec2_id": tx.ec2_id, "password": None,
                    "created_at": now(), "revision": tx.revision,
                }
                tx.later(_INSERT_INSTANCE, values)
                if host is not None:
                    tx.later(_INSERT_INSTANCE_HOST, {"instance_id": iid, "host": host})
                instance_change(tx, "create", values)
                return instance_dict(values, [port], host)

        return _checked_if_stale(write)


    def list_instances(self, q: dict[str, str]) -> Json:
        where: list[Any] = []
        if q.get("name"):
            where.append(instances.c.name == q["name"])
        with self.store.read() as conn:
            if q.get("project_id"):
                where.append(instances.c.project_id == (
                    self._find_project(conn, q["project_id"]) or q["project_id"]))
            rows, nxt = self._page(conn, instances, where, q.get("limit"), q.get("marker"))
            pmap = instance_ports(conn, [r.id for r in rows])
            hosts = hosts_of(conn, [r.id for r in rows])
            return {"instances": [instance_dict(r._asdict(), pmap[r.id], hosts.get(r.id))
                                  for r in rows],
                    "next": nxt}

    def get_instance(self, iid: str) -> Json:
        with self.store.read() as conn:
            row = get_row(conn, instances, "instance", iid)
            return instance_dict(row._asdict(), instance_ports(conn, [iid])[iid],
                                 hosts_of(conn, [iid]).get(iid))

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
            row = get_row(tx.conn, instances, "instance", iid)
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
            instance_change(tx, "update", values)
            return instance_dict(values, instance_ports(tx.conn, [iid])[iid],
                                 hosts_of(tx.conn, [iid]).get(iid))

    def delete_instance(self, iid: str) -> Json:
        with self.store.write() as tx:
            row = get_row(tx.conn, instances, "instance", iid)
            for p in tx.conn.execute(sa.select(ports).where(
                    ports.c.device_id == iid, ports.c.device_owner.like("compute:%"))).all():
                delete_port(tx, p)
            tx.conn.execute(instance_hosts.delete().where(instance_hosts.c.instance_id == iid))
            tx.conn.execute(instances.delete().where(instances.c.id == iid))
            tx.conn.execute(retired_instances.insert().values(id=iid, deleted_at=now()))
            instance_change(tx, "delete", row)
            return {}

    def get_password(self, iid: str) -> Json:
        with self.store.read() as conn:
            return {"password": get_row(conn, instances, "instance", iid).password}

    def set_password(self, iid: str, raw: Any) -> Json:
        body = _body(raw, {"password"})
        pw = body.get("password")
        if not isinstance(pw, str):
            raise BadRequest(f"password: expected a string, got {type(pw).__name__}")
        if len(pw) > MAX_PASSWORD_CHARS:
            raise BadRequest(f"password: {len(pw)} characters, more than {MAX_PASSWORD_CHARS}")
        with self.store.write() as tx:
            row = get_row(tx.conn, instances, "instance", iid)
            if row.password:
                raise Conflict(f"instance {iid} already has a password")
            tx.conn.execute(instances.update().where(instances.c.id == iid)
                            .values(password=pw, revision=tx.revision))
            instance_change(tx, "update", row)
            return {"password": pw}

    def clear_password(self, iid: str) -> Json:
        with self.store.write() as tx:
            row = get_row(tx.conn, instances, "instance", iid)
            tx.conn.execute(instances.update().where(instances.c.id == iid)
                            .values(password=None, revision=tx.revision))
            instance_change(tx, "update", row)
            return {"password": None}

    # ------------------------------------------------------------------ read models

    def view(self, iid: str) -> Json:
        return views.view(self.store, iid)

    def lookup(self, q: dict[str, str]) -> Json:
        return views.lookup(self.store, q)

    def topology(self) -> Json:
        return views.topology(self.store)

    def changes(self, since: int, limit: int | None = None) -> Json:
        """`changes_page` as a dict (for in-process callers; the REST API sends its body)."""
        page: Json = json.loads(self.changes_page(since, limit).body)
        return page

    def changes_page(self, since: int, limit: int | None = None) -> views.Page:
        """At most `limit` (capped at `max_page_size`) changes newer than `since`, as the
        REST API sends them: the page's JSON body (`views.changes_page`)."""
        return views.changes_page(self.store, since, min(limit or self.max_page_size,
                                                         self.max_page_size),
                                  self.reuse.hold_s)

    def fed(self, revision: int, rows: list[tuple[str, str, str, str]]) -> views.Page:
        """The feed's page after `revision` from the write's own rows (`views.fed`)."""
        return views.fed(revision, rows, self.reuse.hold_s)

    # ------------------------------------------------------------------ start-up

    def warm_up(self) -> None:
        """Run the hot paths once on throw-away objects, all rolled back (`Store.rehearsal`:
        nothing is committed or fed), on each connection the pool keeps (`Store.rehearse`).
        SQLAlchemy compiles each statement on its first use: unwarmed, the first `server
        create` after start-up compiled a dozen of them and took 3-9 times a warm one; on
        PostgreSQL each new connection's first create took another 2.4-6 ms
        (docs/benchmarks.md, "Create p99: the first create")."""
        self.store.rehearse(self._rehearse_hot_paths)

    def _rehearse_hot_paths(self) -> None:
        name = "openimds-warm-up"
        net = self.create_network({"name": name})
        # TEST-NET-1; one-address pools, so the automatic pick below and a fixed IP taken
        # each remove a whole range (the statements that end a range, not shorten it)
        subnet = self.create_subnet({"name": name, "network_id": net["id"],
                                     "cidr": "192.0.2.0/24", "allocation_pools": [
                                         {"start": "192.0.2.9", "end": "192.0.2.9"},
                                         {"start": "192.0.2.11", "end": "192.0.2.200"},
                                         {"start": "192.0.2.250", "end": "192.0.2.250"}]})
        router = self.create_router({"name": name})
        self.add_interface(router["id"], {"subnet_id": subnet["id"]})
        head = int(self.health()["revision"])
        iid = self.create_instance({"name": name, "network_id": net["id"]})["id"]
        shortened = self.create_instance({"name": name, "network_id": net["id"]})["id"]
        self.update_instance(iid, {"metadata": {"warm": "up"}})
        self.view(iid)
        self.changes(head)
        with self.store.read() as conn:  # the reaper's, from its second round on
            conn.execute(_PLACEMENT_CHANGES, {"since": head}).all()
        self.delete_instance(iid)
        self.delete_instance(shortened)
        fixed = self.create_instance({"name": name + "-fixed", "network_id": net["id"],
                                      "fixed_ip": "192.0.2.250"})["id"]
        self.delete_instance(fixed)
        # a subnet whose pool is used up but for an address given back: the next create
        # takes the released address (the statements that look through the releases and
        # take one; a churning subnet's creates run them once its ranges are gone)
        full = self.create_network({"name": name + "-full"})
        self.create_subnet({"name": name + "-full", "network_id": full["id"],
                            "cidr": "198.51.100.0/24", "enable_dhcp": False,  # no DHCP port
                            "allocation_pools": [
                                {"start": "198.51.100.9", "end": "198.51.100.9"}]})
        gone = self.create_instance({"name": name, "network_id": full["id"]})["id"]
        self.delete_instance(gone)
        self.create_instance({"name": name, "network_id": full["id"]})
