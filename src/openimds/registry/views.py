"""The read models the agents use: the metadata view, caller lookup, topology, changes.

Each is one read transaction of a few indexed queries whose statements are built once at
import (building a SQLAlchemy statement costs more than running it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row

from openimds.core import ipam
from openimds.core.models import DEVICE_OWNER_DHCP, DEVICE_OWNER_ROUTER
from openimds.errors import BadRequest
from openimds.registry.client import ResyncRequired
from openimds.registry.records import (
    Json,
    get_row,
    instance_dict,
    ip_sort_key,
    network_dicts,
    port_dict,
    router_dicts,
    subnet_dict,
)
from openimds.registry.reuse import DEFAULT_HOLD_S, LEASE_S
from openimds.registry.store import (
    Store,
    instances,
    networks,
    port_ips,
    ports,
    routers,
    subnets,
)
from openimds.registry.store import (
    changes as changes_table,
)
from openimds.registry.store import (
    state as state_table,
)


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
_ROUTER_NETWORKS = (
    sa.select(ports.c.network_id).where(
        ports.c.device_id == sa.bindparam("ref"),
        ports.c.device_owner == DEVICE_OWNER_ROUTER).scalar_subquery())
_BY_IP = sa.select(*_LOOKUP_COLUMNS).join(port_ips, port_ips.c.port_id == ports.c.id).where(
    port_ips.c.ip_address == sa.bindparam("ip"))
_LOOKUP_ROUTER = _BY_IP.where(port_ips.c.network_id.in_(_ROUTER_NETWORKS)).order_by(ports.c.id)
_LOOKUP_NETWORK = _BY_IP.where(port_ips.c.network_id == sa.bindparam("ref")).order_by(ports.c.id)
# A link-local IPv6 source is matched by the MAC its EUI-64 was derived from (Neutron's
# get_mac_addr_by_ipv6), on the same networks.
_BY_MAC = sa.select(*_LOOKUP_COLUMNS).where(ports.c.mac_address == sa.bindparam("mac"))
_LOOKUP_ROUTER_MAC = _BY_MAC.where(ports.c.network_id.in_(_ROUTER_NETWORKS)).order_by(ports.c.id)
_LOOKUP_NETWORK_MAC = _BY_MAC.where(ports.c.network_id == sa.bindparam("ref")).order_by(
    ports.c.id)


def view(store: Store, iid: str) -> Json:
    """Everything the metadata API needs about one instance, in one read transaction."""
    with store.read() as conn:
        rev = store.revision(conn)
        row = get_row(conn, instances, "instance", iid)
        rows = list(conn.execute(_VIEW_PORTS, {"iid": iid}))
        net_ids = sorted({r.network_id for r in rows})
        sub_rows = (list(conn.execute(_VIEW_SUBNETS, {"net_ids": net_ids}))
                    if net_ids else [])
    subs_by_net: dict[str, list[Json]] = {}
    seen: dict[str, Json] = {}
    for s in sub_rows:  # one row per (subnet, DHCP port): a network has one per DHCP node
        entry = seen.get(s.id)
        if entry is None:
            entry = seen[s.id] = {
                "id": s.id, "cidr": s.cidr, "ip_version": s.ip_version,
                "gateway_ip": s.gateway_ip, "enable_dhcp": s.enable_dhcp,
                "dns_nameservers": s.dns_nameservers, "host_routes": s.host_routes,
                "isolated": s.gw_port_id is None, "dhcp_ip": None, "dhcp_ips": [],
                "ipv6_address_mode": s.ipv6_address_mode,
            }
            subs_by_net.setdefault(s.network_id, []).append(entry)
        if s.dhcp_ip is not None and s.dhcp_ip not in entry["dhcp_ips"]:
            entry["dhcp_ips"].append(s.dhcp_ip)
    for entry in seen.values():
        # dhcp_ip: the lowest DHCP port address, the next hop network_data.json gives static
        # guests for 169.254.169.254 (stable: a port keeps its address when it moves node)
        entry["dhcp_ips"].sort(key=ip_sort_key)
        entry["dhcp_ip"] = entry["dhcp_ips"][0] if entry["dhcp_ips"] else None
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
        p["fixed_ips"].sort(key=lambda i: ip_sort_key(i["ip_address"]))
    inst = instance_dict(row._asdict(), [
        port_dict(port_rows[p["id"]]._asdict(), p["fixed_ips"]) for p in plist])
    del inst["host"]  # not part of the view (one query less on the API's miss path)
    inst["password"] = row.password
    kp = row.keypair
    return {"revision": rev, "instance": inst,
            "keypair": dict(kp) if kp else None, "ports": plist}


def lookup(store: Store, q: dict[str, str]) -> Json:
    router_id, network_id = q.get("router_id"), q.get("network_id")
    if bool(router_id) == bool(network_id):
        raise BadRequest("router_id: give exactly one of router_id and network_id")
    if not q.get("ip"):
        raise BadRequest("ip: required")
    addr = ipam.normalize_ip(ipam.parse_ip(q["ip"].split("%", 1)[0], "ip"))
    params = {"ip": str(addr), "ref": router_id or network_id}
    if addr.version == 6 and addr.is_link_local:
        mac = ipam.mac_from_eui64(addr)
        if mac is None:  # privacy / stable-privacy address: no MAC to match (LP#1460177)
            with store.read() as conn:
                return {"revision": store.revision(conn), "ports": []}
        params["mac"] = mac
        query = _LOOKUP_ROUTER_MAC if router_id else _LOOKUP_NETWORK_MAC
    else:
        query = _LOOKUP_ROUTER if router_id else _LOOKUP_NETWORK
    with store.read() as conn:
        rev = store.revision(conn)
        found = [dict(r._mapping) for r in conn.execute(query, params)]
    return {"revision": rev, "ports": found}


def topology(store: Store) -> Json:
    with store.read() as conn:
        rev = store.revision(conn)
        nets = network_dicts(conn, list(conn.execute(
            sa.select(networks).order_by(networks.c.id))))
        subs = [subnet_dict(r._asdict()) for r in conn.execute(
            sa.select(subnets).order_by(subnets.c.id))]
        rts = router_dicts(conn, list(conn.execute(
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
        fixed = sorted(ips[r.id], key=lambda i: ip_sort_key(i["ip_address"]))
        plist.append({**port_dict(r._asdict(), fixed), "hostname": r.hostname})
    return {"revision": rev, "networks": nets, "subnets": subs, "routers": rts,
            "ports": plist}


# Revision order is seq order (a writer bumps the revision under the write lock before it
# appends its changes); ordering by (revision, seq) lets the revision index answer from
# `since` on, where ORDER BY seq alone scanned the whole retained table. attrs as the text
# the column stores (SQLAlchemy's json.dumps; PostgreSQL's json type keeps its input as
# given): a page's JSON body takes it as it is, not decoded and encoded again row by row.
_RAW_ATTRS = sa.cast(changes_table.c.attrs, sa.Text).label("attrs")
_FEED_COLUMNS = (changes_table.c.seq, changes_table.c.revision, changes_table.c.kind,
                 changes_table.c.op, changes_table.c.obj_id, _RAW_ATTRS)
_CHANGES_SINCE = (sa.select(*_FEED_COLUMNS)
                  .where(changes_table.c.revision > sa.bindparam("since"))
                  .order_by(changes_table.c.revision, changes_table.c.seq)
                  .limit(sa.bindparam("size")))
_CHANGES_AT = (sa.select(*_FEED_COLUMNS)
               .where(changes_table.c.revision == sa.bindparam("revision"))
               .order_by(changes_table.c.seq))
# The window (state's revision and floor) and the page in one statement: a feed call is one
# round trip to PostgreSQL besides BEGIN and COMMIT. No change newer: one row of NULLs.
_PAGE = _CHANGES_SINCE.subquery()
_WINDOW_AND_PAGE = (
    sa.select(state_table.c.revision.label("head"), state_table.c.floor,
              *[c for c in _PAGE.c])
    .select_from(state_table.outerjoin(_PAGE, sa.true()))
    .where(state_table.c.id == 1)
    .order_by(_PAGE.c.revision, _PAGE.c.seq))
_ESC = json.encoder.encode_basestring_ascii  # json.dumps' own string encoder


@dataclass(frozen=True, slots=True)
class Page:
    """A feed page as the REST API sends it: its JSON body, encoded once in the worker
    thread (every long-poll a page wakes sends the same bytes), and how many changes it
    holds (a long-poll answers only a page with some)."""

    count: int
    body: bytes


def feed_row(revision: int, kind: str, op: str, obj_id: str, attrs: str) -> str:
    """One change as the feed's JSON shows it (json.dumps' format), attrs already JSON."""
    return (f'{{"revision": {revision}, "kind": {_ESC(kind)}, "op": {_ESC(op)}, '
            f'"id": {_ESC(obj_id)}, "attrs": {attrs}}}')


def _page(revision: int, rows: list[str], head: int, hold_s: float) -> Page:
    # head: the registry's revision when this was read (a page that ends below it is not the
    # whole story); lease_s: how long a consumer may trust what it applied, hold_s: how long
    # it may serve what it knew while no registry answers (registry/reuse.py)
    body = (f'{{"revision": {revision}, "changes": [{", ".join(rows)}], "head": {head}, '
            f'"lease_s": {json.dumps(LEASE_S)}, "hold_s": {json.dumps(hold_s)}}}')
    return Page(len(rows), body.encode())


def changes_page(store: Store, since: int, size: int, hold_s: float = DEFAULT_HOLD_S) -> Page:
    """At most about size changes newer than since, whole revisions only (a revision larger
    than size comes whole); ResyncRequired outside the retained window."""
    with store.read() as conn:
        page = conn.execute(_WINDOW_AND_PAGE, {"since": since, "size": size + 1}).all()
        rev, floor = int(page[0].head), int(page[0].floor)
        if since > rev or since < floor:
            raise ResyncRequired(
                f"since: revision {since} is outside the retained window "
                f"({floor}..{rev}); reload everything", rev)
        rows: list[Any] = [r for r in page if r.seq is not None]
        if len(rows) > size:
            cut = rows[size].revision
            if rows[0].revision == cut:
                rows = list(conn.execute(_CHANGES_AT, {"revision": cut}))
            else:
                rows = [r for r in rows if r.revision < cut]
    return _page(rows[-1].revision if rows else rev,
                 [feed_row(r.revision, r.kind, r.op, r.obj_id, r.attrs) for r in rows],
                 rev, hold_s)


def fed(revision: int, rows: list[tuple[str, str, str, str]],
        hold_s: float = DEFAULT_HOLD_S) -> Page:
    """`changes_page(store, revision - 1, size)` as it reads right after the write of
    `revision` committed, from that write's own change rows (`AckHold.fed`: kind, op, id,
    attrs as the column stored them): its revision is whole in any page size and
    `revision - 1` is inside the window (retention >= 10)."""
    return _page(revision, [feed_row(revision, *r) for r in rows], revision, hold_s)
