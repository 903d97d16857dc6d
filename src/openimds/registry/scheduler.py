"""Agents' heartbeats, node liveness and the placement of routers and networks (SQL side).

The policy is `core.nodes.place`; this module reads the tables, asks it, and writes the
answer. `plan()` is read-only and cheap, so the registry's reaper calls it every tick and
opens a write transaction only when something must change; `apply()` runs inside that
transaction and plans again (another registry process on the same PostgreSQL may have done
the work meanwhile: the write lock on the state row serializes them, so each move happens
once). Every placement change is a change-feed row of the router or network (op "update",
attrs with "hosts"); a node turning alive or dead is a "host" change. Agents learn their
work from `/v1/topology` (`routers[].hosts`, `networks[].hosts`), never by RPC. A network's
DHCP ports follow its bindings in the same transaction (`registry.dhcp_ports`): one per DHCP
node, a moved binding re-binds its port (keeping its IPs), and a dead node's binding that no
free node can take is dropped while a still-bound node adopts its port (`nodes.place_adopting`).

Fencing and takers: every heartbeat answer tells the agent how many other alive agents of its
type exist (`peers`, the rule of `alive_at`), and the agent's row keeps that number. An agent
fences itself on a registry outage only if it had peers; so the work of a dead agent whose
last answer said `peers: 0` does not move (`takers`): it kept serving, and a node that joined
since must not answer the same IPs. Its work waits for it to come back, or for `openimds host
delete`. A dead agent that was told it had peers fenced itself: its work moves to any alive
agent, whether or not those peers are still the ones alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from openimds.core import nodes
from openimds.registry import dhcp_ports
from openimds.registry.records import Json, bound_hosts, dhcp_served, now
from openimds.registry.store import Tx, agents, bindings, networks, routers

TABLES = {"router": routers, "network": networks}


@dataclass(frozen=True, slots=True)
class Policy:
    down_time_s: float
    dhcp_per_network: int

    def wanted(self, kind: str) -> int:
        return 1 if kind == "router" else self.dhcp_per_network


@dataclass(slots=True)
class Plan:
    expired: list[tuple[str, str]] = field(default_factory=list)  # (host, type) now dead
    moves: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # kind -> id -> hosts
    orphans: list[tuple[str, str]] = field(default_factory=list)  # (kind, id) gone
    dhcp_stale: list[str] = field(default_factory=list)  # networks whose DHCP ports lag
    # network id -> {dead host: the bound host that adopts its DHCP port}
    adopted: dict[str, dict[str, str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.expired or self.orphans or self.dhcp_stale
                    or any(self.moves.values()))


def alive_at(row: Any, at: float, policy: Policy, *, expire: bool) -> bool:
    """The one liveness rule: flagged alive and, once the registry may expire agents, a
    heartbeat within agent_down_time."""
    return bool(row.alive) and not (expire and at - float(row.heartbeat_at) > policy.down_time_s)


def plan(conn: Connection, at: float, policy: Policy, *, expire: bool = True,
         check_dhcp: bool = False) -> Plan:
    """What must change now: agents to declare dead, resources to (re)place; with check_dhcp
    also networks whose DHCP ports do not match their bindings (a scan of the DHCP ports:
    the registry does it once at start, since every later binding change syncs its ports)."""
    result = Plan()
    alive: dict[str, set[str]] = {}
    solo_dead: dict[str, set[str]] = {}  # type -> dead hosts told peers=0 (did not fence)
    known: dict[str, set[str]] = {}  # type -> hosts with an agent row (not deleted)
    for a in conn.execute(sa.select(agents)):
        known.setdefault(a.type, set()).add(a.host)
        if alive_at(a, at, policy, expire=expire):
            alive.setdefault(a.type, set()).add(a.host)
            continue
        if a.alive:
            result.expired.append((a.host, a.type))
        if a.peers == 0:
            solo_dead.setdefault(a.type, set()).add(a.host)
    for kind, table in TABLES.items():
        ids = [str(i) for i in conn.execute(sa.select(table.c.id)).scalars()]
        current = bound_hosts(conn, kind)
        result.orphans += [(kind, rid) for rid in sorted(set(current) - set(ids))]
        type_ = nodes.KIND_AGENT[kind]
        takers: dict[str, list[str]] = {h: [] for h in solo_dead.get(type_, ())}
        gone = {h for hosts in current.values() for h in hosts} - known.get(type_, set())
        if kind == "network":
            result.moves[kind], result.adopted = nodes.place_adopting(
                current, ids, alive.get(type_, ()), policy.wanted(kind), takers, gone)
        else:
            result.moves[kind] = nodes.place(current, ids, alive.get(type_, ()),
                                             policy.wanted(kind), takers, gone)
        if kind == "network" and check_dhcp:
            result.dhcp_stale = [n for n in dhcp_ports.stale(conn, current)
                                 if n not in result.moves[kind]]
    return result


def peers(conn: Connection, host: str, type_: str, at: float, policy: Policy, *,
          expire: bool) -> int:
    """How many other agents of this type are alive now (what a heartbeat answer says)."""
    rows = conn.execute(sa.select(agents).where(agents.c.type == type_, agents.c.host != host))
    return sum(1 for r in rows if alive_at(r, at, policy, expire=expire))


def apply(tx: Tx, at: float, policy: Policy, *, expire: bool = True,
          check_dhcp: bool = False) -> Plan:
    """Plan again inside the write transaction and carry it out."""
    conn = tx.conn
    todo = plan(conn, at, policy, expire=expire, check_dhcp=check_dhcp)
    for host, type_ in todo.expired:
        conn.execute(agents.update().where(agents.c.host == host, agents.c.type == type_)
                     .values(alive=False, revision=tx.revision))
        tx.change("host", "update", host, {"type": type_, "alive": False})
    for kind, rid in todo.orphans:
        conn.execute(bindings.delete().where(bindings.c.kind == kind,
                                             bindings.c.resource_id == rid))
    for kind, moves in todo.moves.items():
        table = TABLES[kind]
        for rid, hosts in moves.items():
            set_hosts(tx, kind, rid, hosts)
            row = conn.execute(sa.select(table).where(table.c.id == rid)).one()
            conn.execute(table.update().where(table.c.id == rid).values(revision=tx.revision))
            tx.change(kind, "update", rid, {**change_attrs(kind, row._asdict()), "hosts": hosts})
            if kind == "network":
                dhcp_ports.sync(tx, rid, hosts, todo.adopted.get(rid))
    if todo.dhcp_stale:
        bound = bound_hosts(conn, "network", todo.dhcp_stale)
        for nid in todo.dhcp_stale:
            dhcp_ports.sync(tx, nid, bound.get(nid, []))
    return todo


def set_hosts(tx: Tx, kind: str, rid: str, hosts: list[str]) -> None:
    conn = tx.conn
    conn.execute(bindings.delete().where(bindings.c.kind == kind, bindings.c.resource_id == rid))
    if hosts:
        stamp = now()
        conn.execute(bindings.insert(), [
            {"kind": kind, "resource_id": rid, "host": h, "created_at": stamp} for h in hosts])


def unbind(tx: Tx, kind: str, rid: str) -> None:
    tx.conn.execute(bindings.delete().where(bindings.c.kind == kind,
                                            bindings.c.resource_id == rid))


def change_attrs(kind: str, row: Json) -> Json:
    """The attributes a router or network change row carries (docs/architecture.md)."""
    if kind == "router":
        return {"name": row["name"], "project_id": row["project_id"]}
    return {"name": row["name"], "project_id": row["project_id"], "mtu": row["mtu"]}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


def hosts_report(conn: Connection, at: float, policy: Policy) -> list[Json]:
    """Every node: roles, alive, last heartbeat, agents, and what it serves."""
    out: dict[str, Json] = {}

    def entry(name: str) -> Json:
        return out.setdefault(name, {"name": name, "roles": [], "alive": False,
                                     "last_heartbeat": None, "heartbeat_age_s": None,
                                     "agents": [], "routers": [], "networks": [],
                                     "dhcp": []})

    newest: dict[str, float] = {}
    for a in conn.execute(sa.select(agents).order_by(agents.c.host, agents.c.type)):
        e = entry(a.host)
        age = max(0.0, at - float(a.heartbeat_at))
        # peers: what its last heartbeat answer told it (None: unknown, it fences)
        e["agents"].append({"type": a.type, "alive": bool(a.alive) and age <= policy.down_time_s,
                            "last_heartbeat": iso(float(a.heartbeat_at)),
                            "heartbeat_age_s": round(age, 3), "peers": a.peers})
        newest[a.host] = max(newest.get(a.host, 0.0), float(a.heartbeat_at))
    for name, ts in newest.items():
        e = out[name]
        e["roles"] = nodes.roles_of(a["type"] for a in e["agents"])
        e["alive"] = all(a["alive"] for a in e["agents"])
        e["last_heartbeat"] = iso(ts)
        e["heartbeat_age_s"] = round(max(0.0, at - ts), 3)
    for b in conn.execute(sa.select(bindings).order_by(bindings.c.resource_id)):
        entry(b.host)[f"{b.kind}s"].append(b.resource_id)
    for nid, served in sorted(dhcp_served(conn, None).items()):
        for s in served:
            if s["host"] is not None:
                entry(s["host"])["dhcp"].append({"network_id": nid, "port_id": s["port_id"],
                                                 "ip_addresses": s["ip_addresses"]})
    return [out[k] for k in sorted(out)]


def agent_row(conn: Connection, host: str, type_: str) -> Any:
    return conn.execute(sa.select(agents).where(agents.c.host == host,
                                                agents.c.type == type_)).first()
