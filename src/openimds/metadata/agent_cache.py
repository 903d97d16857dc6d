"""The agent's caller cache and single-flight resolver: never stale, one registry query per miss.

Rules:
- Key: (scope kind, scope id, ip), where the scope is the router or network the request came
  through; value: the `Resolution` (instance, project, port, port network) and the registry
  revision the lookup answered at. Only positive answers are cached (a port that is not yet
  visible must be found on the VM's next try).
- Bounded LRU of `size` entries (0 disables caching; single-flight still applies).
- Invalidation comes from the registry's change feed (`apply_change`, `clear`). A change at
  revision r drops every entry it could affect: a port change drops entries for each IP it
  lists (before and after) and for the link-local EUI-64 address of its MAC, for its port
  id and, for a router interface, for its router; a
  router change drops that router's entries; a network or subnet change drops entries scoped
  to, or resolved on, that network; an instance deletion drops its entries; an unknown kind
  drops everything.
- Races: a lookup that answered at revision N is inserted only if no change newer than N has
  already touched its IP, scope, port, network or instance ("tombstones", bounded; when they
  overflow they collapse into one floor revision below which nothing is inserted). Changes
  newer than N that arrive later delete the entry as usual. So an entry never outlives a
  change the feed delivered.
- The cache is read only while `trust()` says the feed is live; otherwise every request asks
  the registry (still single-flight). If the registry cannot answer, the error propagates:
  the agent answers 503, never a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from openimds.core.caller import Caller, Resolution, resolve
from openimds.core.ipam import link_local_address
from openimds.errors import BadRequest

__all__ = ["CacheEntry", "CallerCache", "LookupResult", "Resolver", "Stats"]

Key = tuple[str, str, str]
ROUTER_INTERFACE_OWNERS = frozenset({
    "network:router_interface", "network:ha_router_replicated_interface",
    "network:router_interface_distributed",
})
_K = TypeVar("_K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class LookupResult:
    """What one registry `/v1/lookup` query returned."""

    revision: int
    ports: Sequence[Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class CacheEntry:
    resolution: Resolution
    revision: int


def _link_local_of(mac: Any) -> str | None:
    if not isinstance(mac, str):
        return None
    try:
        return str(link_local_address(mac))
    except BadRequest:
        return None


def key_of(caller: Caller) -> Key:
    kind, ident = caller.scope
    return (kind, ident, caller.ip)


class CallerCache:
    """(router|network, ip) -> Resolution, bounded, invalidated by registry changes."""

    def __init__(self, size: int, *, max_tombstones: int | None = None) -> None:
        self.size = size
        self._max_tombstones = max_tombstones if max_tombstones is not None else max(
            4096, 4 * size)
        self._entries: OrderedDict[Key, CacheEntry] = OrderedDict()
        # secondary indexes: what a change names -> the keys it affects
        self._by_ip: dict[str, set[Key]] = {}
        self._by_scope: dict[tuple[str, str], set[Key]] = {}
        self._by_port: dict[str, set[Key]] = {}
        self._by_network: dict[str, set[Key]] = {}
        self._by_instance: dict[str, set[Key]] = {}
        # tombstones: the newest change revision that touched each name
        self._t_ip: dict[str, int] = {}
        self._t_scope: dict[tuple[str, str], int] = {}
        self._t_port: dict[str, int] = {}
        self._t_network: dict[str, int] = {}
        self._t_instance: dict[str, int] = {}
        self._t_count = 0
        self._floor = 0  # nothing that answered at or below this revision is inserted
        self.evictions = 0
        self.invalidations = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, caller: Caller) -> Resolution | None:
        key = key_of(caller)
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.resolution

    def put(self, caller: Caller, resolution: Resolution, revision: int) -> bool:
        """Insert unless a change newer than `revision` already touched it; True if stored."""
        if self.size <= 0:
            return False
        key = key_of(caller)
        scope = caller.scope
        newest = max(
            self._floor,
            self._t_ip.get(caller.ip, 0),
            self._t_scope.get(scope, 0),
            self._t_port.get(resolution.port_id, 0),
            self._t_network.get(resolution.network_id, 0),
            self._t_network.get(scope[1], 0) if scope[0] == "network" else 0,
            self._t_instance.get(resolution.instance_id, 0),
        )
        if newest > revision:
            return False
        if key in self._entries:
            self._unlink(key)
        self._entries[key] = CacheEntry(resolution, revision)
        self._index(key, resolution)
        while len(self._entries) > self.size:
            old, old_entry = self._entries.popitem(last=False)
            self._unindex(old, old_entry)
            self.evictions += 1
        return True

    def forget(self, caller: Caller) -> None:
        key = key_of(caller)
        if key in self._entries:
            self._unlink(key)

    def clear(self, revision: int) -> None:
        """Drop everything (feed resync): nothing answered at or before `revision` returns."""
        self.invalidations += len(self._entries)
        self._entries.clear()
        for index in (self._by_ip, self._by_scope, self._by_port, self._by_network,
                      self._by_instance):
            index.clear()
        self._reset_tombstones(revision)

    def apply_change(self, change: Mapping[str, Any]) -> int:
        """Apply one change-feed row; returns how many entries it dropped."""
        rev = int(change.get("revision") or 0)
        kind = change.get("kind")
        op = change.get("op")
        ident = str(change.get("id") or "")
        attrs = change.get("attrs") or {}
        if not isinstance(attrs, Mapping):
            attrs = {}
        before = len(self._entries)
        if kind == "port":
            for ip in attrs.get("ips") or ():
                self._touch(self._by_ip, self._t_ip, str(ip), rev)
            link_local = _link_local_of(attrs.get("mac_address"))
            if link_local is not None:  # link-local callers are the port's MAC (EUI-64)
                self._touch(self._by_ip, self._t_ip, link_local, rev)
            self._touch(self._by_port, self._t_port, ident, rev)
            if attrs.get("device_owner") in ROUTER_INTERFACE_OWNERS and attrs.get("device_id"):
                self._touch(self._by_scope, self._t_scope, ("router", str(attrs["device_id"])),
                            rev)
            if attrs.get("device_id"):
                self._touch(self._by_instance, self._t_instance, str(attrs["device_id"]), rev)
        elif kind == "router":
            self._touch(self._by_scope, self._t_scope, ("router", ident), rev)
        elif kind in ("network", "subnet"):
            net = ident if kind == "network" else str(attrs.get("network_id") or "")
            if not net:
                self.clear(rev)
            else:
                self._touch(self._by_network, self._t_network, net, rev)
                self._touch(self._by_scope, self._t_scope, ("network", net), rev)
        elif kind == "instance":
            if op == "delete":
                self._touch(self._by_instance, self._t_instance, ident, rev)
        elif kind in ("project", "keypair", "host"):  # host: a node turned alive or dead
            pass
        else:
            self.clear(rev)
        dropped = before - len(self._entries)
        self.invalidations += dropped
        return dropped

    # -- internals ----------------------------------------------------------------------
    def _touch(self, index: dict[_K, set[Key]], tombs: dict[_K, int], name: _K, rev: int) -> None:
        for key in list(index.get(name, ())):
            self._unlink(key)
        if tombs.get(name, -1) < rev:
            if name not in tombs:
                self._t_count += 1
            tombs[name] = rev
        if self._t_count > self._max_tombstones:
            self._reset_tombstones(max(rev, self._floor))

    def _reset_tombstones(self, floor: int) -> None:
        self._floor = max(self._floor, floor)
        for tombs in (self._t_ip, self._t_scope, self._t_port, self._t_network,
                      self._t_instance):
            tombs.clear()
        self._t_count = 0

    def _names(self, key: Key, res: Resolution) -> list[tuple[dict[Any, set[Key]], Any]]:
        return [
            (self._by_ip, key[2]),
            (self._by_scope, (key[0], key[1])),
            (self._by_port, res.port_id),
            (self._by_network, res.network_id),
            (self._by_instance, res.instance_id),
        ]

    def _index(self, key: Key, res: Resolution) -> None:
        for index, name in self._names(key, res):
            index.setdefault(name, set()).add(key)

    def _unindex(self, key: Key, entry: CacheEntry) -> None:
        for index, name in self._names(key, entry.resolution):
            self._discard(index, name, key)

    @staticmethod
    def _discard(index: dict[Any, set[Key]], name: Any, key: Key) -> None:
        keys = index.get(name)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del index[name]

    def _unlink(self, key: Key) -> None:
        entry = self._entries.pop(key)
        self._unindex(key, entry)


@dataclass(slots=True)
class Stats:
    """Counters the agent exposes (stats endpoint, final log line, benchmark)."""

    hits: int = 0
    misses: int = 0
    shared: int = 0
    registry_queries: int = 0
    registry_errors: int = 0
    uncached: int = 0  # lookups made because the feed was down
    extra: dict[str, int] = field(default_factory=dict)


class Resolver:
    """Caller -> Resolution through the cache, with single-flight registry lookups."""

    def __init__(
        self, lookup: Callable[[Caller], Awaitable[LookupResult]], cache: CallerCache,
        trust: Callable[[], bool],
    ) -> None:
        self._lookup = lookup
        self.cache = cache
        self._trust = trust
        self._inflight: dict[Key, asyncio.Future[Resolution]] = {}
        self.stats = Stats()

    def cached(self, caller: Caller) -> Resolution | None:
        """A cache hit, only while the feed is live (no I/O, no await)."""
        if not self._trust():
            return None
        res = self.cache.get(caller)
        if res is not None:
            self.stats.hits += 1
        return res

    async def resolve(self, caller: Caller, *, use_cache: bool = True) -> tuple[Resolution, str]:
        """(resolution, "hit" | "miss" | "shared"). Raises ResolutionError or the lookup's error."""
        if use_cache:
            res = self.cached(caller)
            if res is not None:
                return res, "hit"
        key = key_of(caller)
        fut = self._inflight.get(key)
        if fut is not None:
            self.stats.shared += 1
            return await asyncio.shield(fut), "shared"
        fut = asyncio.ensure_future(self._fetch(caller, key))
        self._inflight[key] = fut
        fut.add_done_callback(lambda f: self._done(key, f))
        self.stats.misses += 1
        return await asyncio.shield(fut), "miss"

    def _done(self, key: Key, fut: asyncio.Future[Resolution]) -> None:
        if self._inflight.get(key) is fut:
            del self._inflight[key]
        if not fut.cancelled():
            # mark retrieved: waiters may all have gone away (client disconnects)
            with contextlib.suppress(BaseException):
                fut.exception()

    async def _fetch(self, caller: Caller, key: Key) -> Resolution:
        trusted = self._trust()
        if not trusted:
            self.stats.uncached += 1
        self.stats.registry_queries += 1
        try:
            result = await self._lookup(caller)
        except BaseException:
            self.stats.registry_errors += 1
            raise
        res = resolve(caller, result.ports)
        self.cache.put(caller, res, result.revision)
        return res

    def forget(self, caller: Caller) -> None:
        self.cache.forget(caller)
