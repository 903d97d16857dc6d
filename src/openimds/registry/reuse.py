"""IP reuse hold: a port that takes an address some other port left moments ago is
acknowledged only after every metadata agent has either seen the release or stopped
trusting its cache.

The contract (docs/architecture.md, "IP reuse"):

- A metadata agent trusts its cache and warm index only for `LEASE_S` after it *sent* the
  latest feed call whose answer it has applied, or that found nothing new (its lease; the
  registry announces `lease_s` and `hold_s` in every `/v1/changes` and `/v1/health`
  answer). A feed call received after a commit answers with that commit, so an agent that
  still trusts at time t has applied every commit older than t - LEASE_S. While no registry
  answers it serves callers it knows, but only until hold_s after that send (the operator's
  `[registry] reuse_hold`: the outage a known VM rides out).
- A write that binds an address (a port create or update: (network, ip), the link-local
  address of its MAC, and the scope of every router on its network) within
  `hold_s + SLACK_S` of a release of the same address or router scope (a port delete or
  update, a router interface removed) is answered hold_s after its own commit
  (`Tx.hold_s`, slept by the REST layer). The new VM cannot ask before its port exists, so
  its first request reaches the agent more than hold_s after the release: the agent has
  applied it, or asks the registry, and no longer serves what it knew.
- A release's timestamp is taken by the statement that records it, one of its
  transaction's last, in the database's clock (so registry processes on several hosts
  agree). The one remaining assumption: a release commits within `SLACK_S` of that
  statement (a SQLite fsync, a PostgreSQL commit). Only durations are compared across
  hosts, never wall clocks.

Releases are recorded per address and per router (`store.releases`), so reuse elsewhere
never waits; rows older than the window are pruned by the next release. Automatic
allocation skips the addresses still in the window while another is free (it reads these
rows, registry/ipalloc.py), so only a requested fixed IP or an exhausted pool waits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from openimds.config import RegistrySettings
from openimds.core.ipam import link_local_address
from openimds.core.models import DEVICE_OWNER_ROUTER
from openimds.errors import BadRequest
from openimds.registry.store import Tx, port_ips, ports, releases

__all__ = ["DB_NOW", "DEFAULT_HOLD_S", "LEASE_S", "MIN_HOLD_S", "SLACK_S", "ReuseHold",
           "address_key", "released_within", "routers_key", "routers_released_within"]

LEASE_S = 2.0  # an agent's cache is trusted this long after it sent a feed call
# How long a reusing bind's answer waits after its commit, and so how long an agent serves
# known callers after its last feed answer while no registry answers ([registry] reuse_hold):
# long enough to ride out a registry or PostgreSQL restart.
DEFAULT_HOLD_S = RegistrySettings().reuse_hold  # one default, in the settings
MIN_HOLD_S = LEASE_S + 1.0
SLACK_S = 1.0  # a release's commit lands within this of its timestamp


# Built once: every port write runs several of these, and building a statement costs more
# than running it (bench/registry_bench.py). IN lists are expanding parameters. The
# database's clock is read inside the statements that need it, not by a statement of its own.
_NOW = {
    "postgresql": sa.extract("epoch", sa.func.clock_timestamp()),
    "sqlite": sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)"),
}
DB_NOW = _NOW  # the same clock for the IP quarantine of automatic allocation (ipalloc.py)
_ROUTER_SCOPES = sa.select(sa.literal("r:") + ports.c.device_id).where(
    ports.c.network_id.in_(sa.bindparam("nets", expanding=True)),
    ports.c.device_owner == DEVICE_OWNER_ROUTER)
_CURRENT_IPS = sa.select(port_ips.c.ip_address).where(
    port_ips.c.port_id == sa.bindparam("port_id"))
# Is any of these keys, or the scope of a router on these networks, released within the
# window? One statement: a create asks it once.
_HELD = {
    dialect: sa.select(sa.literal(1)).where(
        sa.or_(releases.c.key.in_(sa.bindparam("keys", expanding=True)),
               releases.c.key.in_(_ROUTER_SCOPES)),
        releases.c.at > now - sa.bindparam("window")).limit(1)
    for dialect, now in _NOW.items()
}
_PRUNE = {
    dialect: releases.delete().where(sa.or_(
        releases.c.key.in_(sa.bindparam("keys", expanding=True)),
        releases.c.at < now - sa.bindparam("window")))
    for dialect, now in _NOW.items()
}
_RECORD = {dialect: releases.insert().values(key=sa.bindparam("key"), at=now)
           for dialect, now in _NOW.items()}


def address_key(network_id: str, ip: str) -> str:
    """The release key of an address (as stored) on a network."""
    return f"n:{network_id}:{ip}"


def routers_key(network_id: str) -> str:
    """`Tx.released_seen`'s key for "a router on this network had its scope released"."""
    return f"routers:{network_id}"


def released_within(dialect: str, key: Any) -> Any:
    """SQL: release `key` (an expression) happened within the window (bind "window"), by the
    database's clock: the hold's own test, for a statement a write runs anyway to ask on
    the way (`Tx.released_seen`) instead of in a statement of its own."""
    return sa.exists().where(releases.c.key == key,
                             releases.c.at > _NOW[dialect] - sa.bindparam("window"))


def routers_released_within(dialect: str, network_id: Any) -> Any:
    """SQL: the scope of a router on this network (an expression) was released within the
    window (`released_within`)."""
    return sa.exists().where(
        releases.c.key.in_(sa.select(sa.literal("r:") + ports.c.device_id).where(
            ports.c.network_id == network_id, ports.c.device_owner == DEVICE_OWNER_ROUTER)),
        releases.c.at > _NOW[dialect] - sa.bindparam("window"))


def _dialect(conn: Connection) -> str:
    return "postgresql" if conn.dialect.name == "postgresql" else "sqlite"


def _addresses(attrs: Mapping[str, Any]) -> list[str]:
    net = str(attrs.get("network_id") or "")
    out = [address_key(net, ip) for ip in attrs.get("ips") or ()]
    mac = attrs.get("mac_address")
    if isinstance(mac, str):
        try:  # link-local callers are found by the MAC's EUI-64 address
            out.append(address_key(net, str(link_local_address(mac))))
        except BadRequest:
            pass
    return out


def _own_router(attrs: Mapping[str, Any]) -> list[str]:
    if attrs.get("device_owner") == DEVICE_OWNER_ROUTER and attrs.get("device_id"):
        return [f"r:{attrs['device_id']}"]
    return []


def _current_ips(tx: Tx, port_id: str) -> set[str]:
    return set(tx.conn.execute(_CURRENT_IPS, {"port_id": port_id}).scalars())


@dataclass(frozen=True, slots=True)
class ReuseHold:
    """The hold, for one registry's `hold_s` (at least `MIN_HOLD_S`)."""

    hold_s: float = DEFAULT_HOLD_S

    @property
    def window_s(self) -> float:
        return self.hold_s + SLACK_S

    def __call__(self, tx: Tx) -> None:
        """`Store.before_commit`: record this write's releases, and set `tx.hold_s` if it
        binds an address or router scope released within the window (its own releases
        included)."""
        released: list[str] = []
        claimed: list[str] = []
        claim_nets: list[str] = []
        for change in tx.changes:
            if change["kind"] != "port":
                continue
            attrs = change["attrs"]
            op = change["op"]
            if op == "delete":
                released += _addresses(attrs) + _own_router(attrs)
                continue
            if op != "create":  # an update lists the IPs before and after: gone = released
                kept = _current_ips(tx, str(change["obj_id"]))
                net = str(attrs.get("network_id") or "")
                released += [f"n:{net}:{ip}" for ip in attrs.get("ips") or () if ip not in kept]
                attrs = {**attrs, "ips": sorted(kept)}
            claimed += _addresses(attrs) + _own_router(attrs)
            claim_nets.append(str(attrs.get("network_id") or ""))
        if not released and not claimed:
            return
        conn = tx.conn
        dialect = _dialect(conn)
        window = {"window": self.window_s}
        if released:
            # recorded first, so the check below also sees what this write itself released
            keys = sorted(set(released))
            conn.execute(_PRUNE[dialect], {"keys": keys, **window})
            conn.execute(_RECORD[dialect], [{"key": k} for k in keys])
        if claimed:
            # a new port on a network is also reached through each router on it: a scope that
            # lost an interface moments ago may still map this address to the old port
            keys = sorted(set(claimed))
            nets = sorted(set(claim_nets))
            seen = tx.released_seen
            at_commit = tx.asked_at_commit
            asked = [*keys, *(routers_key(n) for n in nets)]
            if (not released and tx.reuse_window_s >= self.window_s
                    and all(k in seen or k in at_commit for k in asked)):
                # every one was asked already by a statement of this write (a create's
                # network read and address take), after its revision bump: the same answer
                # (the writers are serialized, and this one released nothing); asked a few
                # ms earlier, a window ending then holds at least as much
                if any(k in at_commit for k in asked):
                    # an address taken with the commit: its answer comes back with it
                    tx.on_commit.append(lambda: self._hold_if_seen(tx, asked))
                    return
                held = any(seen[k] for k in asked)
            else:
                held = conn.execute(_HELD[dialect], {"keys": keys, "nets": nets,
                                                     **window}).first() is not None
            if held:
                tx.hold_s = self.hold_s

    def _hold_if_seen(self, tx: Tx, keys: list[str]) -> None:
        """Once the commit is back: hold if one of keys was released within the window (a
        key left unanswered counts as released)."""
        if any(tx.released_seen.get(k, True) for k in keys):
            tx.hold_s = self.hold_s
