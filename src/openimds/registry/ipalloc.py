"""Free-IP allocation on a subnet in O(1) statements: its availability ranges (SQL side).

The model is `core.ipranges`: a subnet's free pool addresses are ``ip_ranges`` (spans never
handed out since the state was built) plus ``ip_released`` (addresses ports gave back). A
pick reads the lowest range start, the lowest released address out of the IP quarantine
(not in ``releases`` within the reuse hold's window, registry/reuse.py: the same record the
acknowledgement hold reads) and the lowest released one, in one statement, whatever the
number of ports on the subnet; before 0010 it parsed every used address of the subnet.

Every write that takes or gives back a pool address keeps the state in step, inside its own
transaction (so a crash loses neither): `pick` (automatic addresses: instance and port
creates, DHCP ports), `take` (an address asked for), `release` (a port deleted). Writers are
serialized (SQLite's write lock, PostgreSQL's ``state`` row lock taken by every write), and
``UNIQUE (network_id, ip_address)`` on port_ips stays the backstop. A subnet without its
``ip_alloc`` row (a database migrated to 0010, a restored backup of an older schema) is built
from port_ips by its first pick, once, in O(its ports); a backup carries the state as it
carries port_ips (one snapshot). A pick checks its address against port_ips (one
indexed point query) and repairs the state if some write took it behind its back.

Auto-address IPv6 subnets (SLAAC, DHCPv6-stateless) hand out EUI-64 addresses, never pool
addresses: they have no state. Gateways and addresses outside the pools are not tracked.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from openimds.core import ipam, ipranges
from openimds.registry.records import now
from openimds.registry.reuse import DB_NOW, address_key, released_within
from openimds.registry.store import (
    Tx,
    ip_alloc,
    ip_ranges,
    ip_released,
    port_ips,
    releases,
    subnets,
)

__all__ = ["build", "drop", "pick", "problems", "release", "take"]

log = logging.getLogger(__name__)

_S: sa.BindParameter[str] = sa.bindparam("sid")
_K: sa.BindParameter[bytes] = sa.bindparam("k")
_R = ip_ranges.c
_F = ip_released.c
_BYTES = sa.LargeBinary()


def _part(src: int, key: Any, last: Any, where: Sequence[Any], table: sa.FromClause,
          order: Any | None) -> Any:
    # correlate_except: inside the network's read (`lateral_pick`), the subnet is its row
    sel = sa.select(sa.literal(src).label("src"), key.label("k"), last.label("l")) \
        .select_from(table).where(*where).correlate_except(table)
    if order is not None:
        sel = sel.order_by(order).limit(1)
    return sa.select(sel.subquery())


def _quarantine_free(now: Any, column: Any) -> Any:
    """No release of this address within the window (by the database's clock)."""
    return ~sa.exists().where(
        releases.c.key == sa.bindparam("prefix", type_=sa.String) + column,
        releases.c.at > now - sa.bindparam("window"))


# The lowest released addresses a pick looks through for one out of quarantine. Bounded: a
# mass delete leaves thousands quarantined at once (5,000 cost 3.6 ms of CPU per pick,
# unbounded); past the bound a pick takes the lowest range start instead, and only a subnet
# with no range left looks further (`_FREE_RELEASED`).
RELEASED_LOOKAHEAD = 64


def _pick_rows(now: Any, sid: Any) -> Any:
    """One statement per pick: src 0 the lowest range, 1 the lowest released address out of
    quarantine among the lowest RELEASED_LOOKAHEAD, 2 the lowest released one, 3 the
    subnet's state exists. sid: the subnet's id (a bind, or a column the network's read
    joins it to: `lateral_pick`)."""
    lowest = (sa.select(_F.key, _F.ip_address).where(_F.subnet_id == sid)
              .order_by(_F.key).limit(RELEASED_LOOKAHEAD).correlate_except(ip_released)
              .subquery())
    return sa.union_all(
        _part(0, _R.first_key, _R.last_key, [_R.subnet_id == sid], ip_ranges, _R.first_key),
        _part(1, lowest.c.key, lowest.c.key, [_quarantine_free(now, lowest.c.ip_address)],
              lowest, lowest.c.key),
        _part(2, _F.key, _F.key, [_F.subnet_id == sid], ip_released, _F.key),
        _part(3, sa.cast(sa.null(), _BYTES), sa.cast(sa.null(), _BYTES),
              [ip_alloc.c.subnet_id == sid], ip_alloc, None),
    )


_PICK = {dialect: _pick_rows(now, _S) for dialect, now in DB_NOW.items()}
# The same rows for every subnet of a network, for its read to join (PostgreSQL: LATERAL)
LATERAL_PICK = _pick_rows(DB_NOW["postgresql"], subnets.c.id).subquery().lateral("pick")
_FREE_RELEASED = {
    dialect: sa.select(_F.key).where(_F.subnet_id == _S, _quarantine_free(now, _F.ip_address))
    .order_by(_F.key).limit(1)
    for dialect, now in DB_NOW.items()
}
_IP_TAKEN = sa.select(port_ips.c.port_id).where(
    port_ips.c.network_id == sa.bindparam("network_id"),
    port_ips.c.ip_address == sa.bindparam("ip"))
_RANGE_DELETE = ip_ranges.delete().where(_R.subnet_id == _S, _R.first_key == _K)
_RANGE_START = (ip_ranges.update().where(_R.subnet_id == _S, _R.first_key == _K)
                .values(first_key=sa.bindparam("new_first")))
_RANGE_END = (ip_ranges.update().where(_R.subnet_id == _S, _R.first_key == _K)
              .values(last_key=sa.bindparam("new_last")))
_RANGE_INSERT = ip_ranges.insert()
# the span that would hold an address: the last one starting at or below it
_RANGE_AT = (sa.select(_R.first_key, _R.last_key).where(_R.subnet_id == _S, _R.first_key <= _K)
             .order_by(_R.first_key.desc()).limit(1))
_RELEASED_DELETE = ip_released.delete().where(_F.subnet_id == _S, _F.key == _K)
# A pick's removal of its address also says whether a port holds it (`_IP_TAKEN`) and
# whether it was released within the reuse hold's window (the hold's question, asked here
# instead of by a statement of its own: `Tx.released_seen`), in the same statement: two
# round trips fewer per automatic address on PostgreSQL.
_TAKEN_BY = _IP_TAKEN.limit(1).scalar_subquery()
_UNCHECKED = {"released": _RELEASED_DELETE, "range_end": _RANGE_DELETE, "range": _RANGE_START}
_TAKE_CHECKED = {
    dialect: {kind: statement.returning(
        _TAKEN_BY, released_within(dialect, sa.bindparam("hold_key", type_=sa.String)))
        for kind, statement in _UNCHECKED.items()}
    for dialect in DB_NOW
}
# The same removals queued with the commit (`_take_at_commit`), asking only the hold's
# question: whether a port holds the address is UNIQUE (network_id, ip_address)'s to say there
_TAKE_AT_COMMIT = {
    dialect: {kind: statement.returning(
        released_within(dialect, sa.bindparam("hold_key", type_=sa.String)))
        for kind, statement in _UNCHECKED.items()}
    for dialect in DB_NOW
}
# a given-back address joins the free list only where the subnet has state (else the state,
# built later from port_ips, sees it free anyway) and only once
_RELEASE = ip_released.insert().from_select(
    ["subnet_id", "key", "ip_address"],
    sa.select(_S, _K, sa.bindparam("ip", type_=sa.String)).where(
        sa.exists().where(ip_alloc.c.subnet_id == _S),
        ~sa.exists().where(_F.subnet_id == _S, _F.key == _K)))
_SUBNET_IPS = sa.select(port_ips.c.ip_address).where(port_ips.c.subnet_id == _S)
_ALL_RANGES = sa.select(_R.first_key, _R.last_key).where(_R.subnet_id == _S)
_ALL_RELEASED = sa.select(_F.key).where(_F.subnet_id == _S)
_BUILT = sa.select(ip_alloc.c.subnet_id).where(ip_alloc.c.subnet_id == _S)
# Keys of a network's releases: "n:<network>:<address>" (registry/reuse.py)
_NETWORK_RELEASES = sa.select(releases.c.key).where(
    releases.c.key.startswith(sa.bindparam("prefix")))
_REPAIRS_BEFORE_REBUILD = 8


def _dialect(conn: Connection) -> str:
    return "postgresql" if conn.dialect.name == "postgresql" else "sqlite"


def _pool_spans(subnet: Row[Any] | Any) -> list[ipranges.Span]:
    return ipranges.spans_of(
        (int(ipaddress.ip_address(p["start"])), int(ipaddress.ip_address(p["end"])))
        for p in subnet.allocation_pools)


def _tracked(subnet: Row[Any] | Any) -> bool:
    """Auto-address IPv6 subnets give EUI-64 addresses, never pool ones: no state."""
    return not (subnet.ip_version == 6 and subnet.ipv6_address_mode in ipam.AUTO_ADDRESS_MODES)


def _int(text: str) -> int:
    """An address as stored (``str`` of an address) as its integer: inet_pton is several
    times cheaper than an ``ipaddress`` object (a build parses every port's address)."""
    family = socket.AF_INET6 if ":" in text else socket.AF_INET
    return int.from_bytes(socket.inet_pton(family, text), "big")


def _address(n: int, version: int) -> ipam.IPAddress:
    return ipaddress.IPv4Address(n) if version == 4 else ipaddress.IPv6Address(n)


def _key(n: int, version: int) -> bytes:
    return ipranges.key_of(n, version)


def pick(tx: Tx, subnet: Row[Any] | Any, *, take: bool = True,
         read: Sequence[Row[Any]] | None = None) -> ipam.IPAddress | None:
    """The lowest free pool address of the subnet not quarantined (the lowest quarantined one
    when no other is free), taken unless take=False; None when the pools are full.
    read: the pick's rows as the network's read already fetched them in this transaction
    (`LATERAL_PICK`), after its revision bump and before any address of the subnet was taken
    or given back: used for the first look instead of asking again, and an address that look
    finds is taken with the commit (`_take_at_commit`: no round trip of its own)."""
    conn = tx.conn
    version = int(subnet.ip_version)
    args = {"sid": subnet.id, "prefix": f"n:{subnet.network_id}:",
            "window": tx.reuse_window_s}
    statement = _PICK[_dialect(conn)]
    repairs = 0
    while True:
        at_commit = take and read is not None
        rows = {int(r.src): r for r in (conn.execute(statement, args) if read is None
                                         else read)}
        read = None  # the state may have changed since: a second look asks
        if 3 not in rows:
            build(tx, subnet)
            continue
        if repairs > _REPAIRS_BEFORE_REBUILD:  # far out of step: start again from port_ips
            log.warning("registry.ip_state_rebuilt subnet=%s", subnet.id)
            drop(tx, subnet.id)
            build(tx, subnet)
            repairs = 0
            continue
        first = {src: ipranges.int_of(bytes(rows[src].k)) for src in (0, 1, 2) if src in rows}
        if 0 not in first and 1 not in first and 2 in first:
            # no range left and the lowest released are quarantined: look through them all
            # before a pick whose reuse would be held
            free = conn.execute(_FREE_RELEASED[_dialect(conn)], args).scalar()
            if free is not None:
                first[1] = ipranges.int_of(bytes(free))
        choice = ipranges.choose(first.get(0), first.get(1), first.get(2))
        if choice is None:
            return None
        source, n = choice
        ip = _address(n, version)
        key = _key(n, version)
        last = ipranges.int_of(bytes(rows[0].l)) if source == "range" else n
        taken = {"network_id": subnet.network_id, "ip": str(ip)}
        if at_commit:
            _take_at_commit(tx, subnet.id, version, source, key, n, last, taken)
            return ip
        if take:  # taken out of the state whether a port holds it or not
            held = _remove(tx, subnet.id, version, source, key, n, last, taken)
        else:
            held = conn.execute(_IP_TAKEN, taken).first() is not None
        if held:
            # a write took it without telling the state (none should): never hand it out
            log.warning("registry.ip_state_repaired subnet=%s ip=%s", subnet.id, ip)
            if not take:
                _remove(tx, subnet.id, version, source, key, n, last)
            repairs += 1
            continue
        return ip


def _removal(subnet_id: str, version: int, source: str, key: bytes, n: int,
             last: int) -> tuple[str, dict[str, Any]]:
    """Which removal (`_UNCHECKED`'s kind) takes the lowest address n of a range (first n,
    last `last`) or a released one, and its parameters."""
    args: dict[str, Any] = {"sid": subnet_id, "k": key}
    if source != "range":
        return "released", args
    if n == last:
        return "range_end", args
    args["new_first"] = _key(n + 1, version)
    return "range", args


def _take_at_commit(tx: Tx, subnet_id: str, version: int, source: str, key: bytes, n: int,
                    last: int, taken: dict[str, str]) -> None:
    """`_remove`, queued with the commit (`Tx.later`; PostgreSQL: in its round trip). The
    state was read after this write's revision bump, so every other writer's takes are in
    it; that no port holds the address is left to UNIQUE (network_id, ip_address) at the
    commit (a write that went around the state: `StaleTake`, and the caller writes again
    with its takes checked). The hold's question about the address is answered there too
    (`Tx.asked_at_commit`)."""
    kind, args = _removal(subnet_id, version, source, key, n, last)
    hold_key = address_key(taken["network_id"], taken["ip"])

    def answered(row: Any) -> None:
        # no row: the state did not list it after all (not seen happen); ask no more: held
        tx.released_seen[hold_key] = True if row is None else bool(row[0])

    tx.later(_TAKE_AT_COMMIT[_dialect(tx.conn)][kind],
             {**args, "hold_key": hold_key, "window": tx.reuse_window_s}, answered)
    tx.asked_at_commit.add(hold_key)
    tx.unchecked_takes = True


def _remove(tx: Tx, subnet_id: str, version: int, source: str, key: bytes,
            n: int, last: int, taken: dict[str, str] | None = None) -> bool:
    """Take the lowest address n of a range (first n, last `last`) or a released one.
    taken ({network_id, ip}): also tell whether a port holds that address (else False),
    and note in `tx.released_seen` whether it was released within the window."""
    conn = tx.conn
    kind, args = _removal(subnet_id, version, source, key, n, last)
    if taken is None:
        conn.execute(_UNCHECKED[kind], args)
        return False
    hold_key = address_key(taken["network_id"], taken["ip"])
    row = conn.execute(_TAKE_CHECKED[_dialect(conn)][kind],
                       {**args, **taken, "hold_key": hold_key,
                        "window": tx.reuse_window_s}).first()
    if row is None:  # nothing removed (the state had no such entry): ask port_ips itself
        return conn.execute(_IP_TAKEN, taken).first() is not None
    tx.released_seen[hold_key] = bool(row[1])
    return row[0] is not None


def take(tx: Tx, subnet: Row[Any] | Any, ip: ipam.IPAddress) -> None:
    """An address asked for (a requested fixed IP) leaves the free state, wherever it is."""
    if not _tracked(subnet):
        return
    n, version = int(ip), int(subnet.ip_version)
    if not ipranges.in_spans(_pool_spans(subnet), n):
        return
    conn = tx.conn
    args = {"sid": subnet.id, "k": _key(n, version)}
    if conn.execute(_RELEASED_DELETE, args).rowcount:
        return
    row = conn.execute(_RANGE_AT, args).first()
    if row is None:
        return
    first, last = ipranges.int_of(bytes(row.first_key)), ipranges.int_of(bytes(row.last_key))
    if n > last:
        return  # not free by the state (nor by port_ips: the caller checked)
    rest = ipranges.carve((first, last), n)
    start = {"sid": subnet.id, "k": row.first_key}
    if not rest:
        conn.execute(_RANGE_DELETE, start)
    elif n == first:
        conn.execute(_RANGE_START, {**start, "new_first": _key(rest[0][0], version)})
    else:
        conn.execute(_RANGE_END, {**start, "new_last": _key(rest[0][1], version)})
        if len(rest) == 2:
            conn.execute(_RANGE_INSERT, {"subnet_id": subnet.id,
                                         "first_key": _key(rest[1][0], version),
                                         "last_key": _key(rest[1][1], version)})


def release(tx: Tx, given_back: Iterable[tuple[Row[Any] | Any, str]]) -> None:
    """Addresses ports gave back: (subnet row, address as stored) pairs. A pool address of a
    subnet with state joins its released list (quarantined by `releases`)."""
    rows = []
    for subnet, text in given_back:
        if not _tracked(subnet):
            continue
        n = _int(text)
        if ipranges.in_spans(_pool_spans(subnet), n):
            rows.append({"sid": subnet.id, "k": _key(n, int(subnet.ip_version)), "ip": text})
    if rows:
        tx.conn.execute(_RELEASE, rows)


def build(tx: Tx, subnet: Row[Any] | Any) -> None:
    """The subnet's state from port_ips and its pools (O(its ports), once per subnet): free
    spans, minus the addresses the network released recently, which go to the released list
    so the quarantine keeps them aside."""
    conn = tx.conn
    version = int(subnet.ip_version)
    used = [_int(t) for t in conn.execute(_SUBNET_IPS, {"sid": subnet.id}).scalars()]
    if subnet.gateway_ip:
        used.append(_int(subnet.gateway_ip))
    free = ipranges.free_spans(_pool_spans(subnet), used)
    prefix = f"n:{subnet.network_id}:"
    recent = []
    for key in conn.execute(_NETWORK_RELEASES, {"prefix": prefix}).scalars():
        try:
            addr = ipaddress.ip_address(key[len(prefix):])
        except ValueError:
            continue
        if addr.version == version and ipranges.in_spans(free, int(addr)):
            recent.append(int(addr))
    spans = ipranges.free_spans(free, recent)
    conn.execute(ip_alloc.insert(), {"subnet_id": subnet.id, "built_at": now()})
    if spans:
        conn.execute(_RANGE_INSERT, [
            {"subnet_id": subnet.id, "first_key": _key(a, version),
             "last_key": _key(b, version)} for a, b in spans])
    if recent:
        conn.execute(ip_released.insert(), [
            {"subnet_id": subnet.id, "key": _key(n, version),
             "ip_address": str(_address(n, version))} for n in sorted(set(recent))])
    log.info("registry.ip_state_built subnet=%s ranges=%d released=%d used=%d", subnet.id,
             len(spans), len(set(recent)), len(used))


def drop(tx: Tx, subnet_id: str) -> None:
    """The subnet's state, before the subnet itself is deleted."""
    args = {"sid": subnet_id}
    for table in (ip_released, ip_ranges, ip_alloc):
        tx.conn.execute(table.delete().where(table.c.subnet_id == _S), args)


def _merged(spans: Iterable[ipranges.Span]) -> list[ipranges.Span]:
    out: list[ipranges.Span] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def problems(conn: Connection, subnet: Row[Any] | Any) -> list[str] | None:
    """What is wrong with the subnet's state against port_ips and its pools (tests, checks);
    None when it has none (built by its next pick)."""
    if conn.execute(_BUILT, {"sid": subnet.id}).first() is None:
        return None
    version = int(subnet.ip_version)
    used = [_int(t) for t in conn.execute(_SUBNET_IPS, {"sid": subnet.id}).scalars()]
    if subnet.gateway_ip:
        used.append(_int(subnet.gateway_ip))
    truth = _merged(ipranges.free_spans(_pool_spans(subnet), used))
    spans = [(ipranges.int_of(bytes(a)), ipranges.int_of(bytes(b)))
             for a, b in conn.execute(_ALL_RANGES, {"sid": subnet.id})]
    spans += [(n, n) for n in (ipranges.int_of(bytes(k)) for k in
                               conn.execute(_ALL_RELEASED, {"sid": subnet.id}).scalars())]
    out = []
    ordered = sorted(spans)
    for (a1, b1), (a2, b2) in zip(ordered, ordered[1:], strict=False):
        if a2 <= b1:
            out.append(f"overlap: {_address(a1, version)}-{_address(b1, version)} and "
                       f"{_address(a2, version)}-{_address(b2, version)}")
    have = _merged(spans)
    if have != truth:
        def show(spans: list[ipranges.Span]) -> str:
            return ", ".join(f"{_address(a, version)}-{_address(b, version)}"
                             for a, b in spans[:4])
        out.append(f"free by the state: {show(have)} ({len(have)} spans); by port_ips and "
                   f"the pools: {show(truth)} ({len(truth)} spans)")
    return out
