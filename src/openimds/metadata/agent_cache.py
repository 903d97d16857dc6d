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
- The cache is read only while `trust()` says the feed is live and within its lease
  (`metadata.feed_lease`: a reused IP is never answered from an entry the feed may not have
  invalidated yet); otherwise every request asks the registry (still single-flight).
- A registry outage costs nothing known: while no registry answers, nothing can change (every
  write goes through it), so when a lookup fails the caller's entry, if the cache or the
  index holds one, is served ("known"), and for `DOWN_HOLD_S` after a failed lookup known
  callers are served without asking again, as long as `may_know()` (the agent: within its
  feed lease's hold, after which a reused address may belong to a new VM; a registry that
  is only cut off from us may still take writes). Only an unknown caller gets the error
  (the agent answers 503, never a guess). The feed catches up from where it was once the registry is
  back (`ChangeFollower(resume=True)`), and a lookup that succeeds calls `on_registry_back`
  so the follower retries at once.
- Warm index (`PortIndex`): the registry's lookup answered locally. Loaded from
  `/v1/topology` on the first batch and on every resync, then kept exact by the feed (port
  creates and deletes carry the whole port; a port update drops the port, so its IPs are
  asked of the registry until the next load; router interfaces are ports too). The first
  request of a new VM whose port the feed already delivered is a hit, with no registry
  query. An index answer is used only when it finds ports (a port the feed has not
  delivered yet is still looked up); it obeys the same trust rule as the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from openimds.core.caller import Caller, Resolution, resolve
from openimds.core.ipam import link_local_address
from openimds.core.models import DEVICE_OWNER_ROUTER
from openimds.errors import BadRequest, OpenImdsError, UpstreamError

__all__ = [
    "CacheEntry", "CallerCache", "Generations", "LookupResult", "PortIndex", "Resolver", "Stats",
]

log = logging.getLogger(__name__)
DOWN_HOLD_S = 0.25  # after a failed lookup, serve known callers without asking for this long
_LOAD_RETRY_MIN_S = 0.5
_LOAD_RETRY_MAX_S = 5.0
_MAX_PENDING = 200_000  # feed changes buffered while the index loads
_LINK_LOCAL_V6 = ("fe8", "fe9", "fea", "feb")  # fe80::/10, as normalised (lower case)

Key = tuple[str, str, str]
Slot = Key | set[Key]  # a secondary index's value: one key, or several
ROUTER_INTERFACE_OWNERS = frozenset({
    "network:router_interface", "network:ha_router_replicated_interface",
    "network:router_interface_distributed",
})
_K = TypeVar("_K", bound=Hashable)
_V = TypeVar("_V")


class Generations(Generic[_K, _V]):
    """A bounded map that keeps its working set: two generations of at most `bound` each.

    New keys go into `young`; when it is full it becomes the old generation (the previous
    old one is dropped whole) and a new young one starts. A key found only in the old one
    is moved back into the young one (`promote`). So a key asked for at least once per
    `bound` new keys stays, whatever else comes, while at most 2 x `bound` entries are held
    and every operation is O(1) (a dropped generation is freed in one go, amortised over the
    `bound` insertions that filled it). Clear-when-full, instead, dropped the working set
    with the rest each time a stream of new keys (a boot storm, a hostile VM) filled it.

    Hot callers look in `young` first themselves (`m.young.get(k) or m.promote(k)`): one
    dict lookup for a key in use, no method call. Values must be truthy (objects, tuples).
    """

    __slots__ = ("bound", "old", "rotations", "young")

    def __init__(self, bound: int) -> None:
        self.bound = max(1, bound)
        self.young: dict[_K, _V] = {}
        self.old: dict[_K, _V] = {}
        self.rotations = 0  # how many times the young generation became the old one

    def __len__(self) -> int:
        return len(self.young) + len(self.old)

    def get(self, key: _K) -> _V | None:
        value = self.young.get(key)
        return value if value is not None else self.promote(key)

    def promote(self, key: _K) -> _V | None:
        """The old generation's value for `key`, moved into the young one; else None."""
        value = self.old.pop(key, None)
        if value is not None:
            self.put(key, value)
        return value

    def put(self, key: _K, value: _V) -> None:
        young = self.young
        if len(young) >= self.bound and key not in young:
            self.old = young
            self.young = young = {}
            self.rotations += 1
        else:
            self.old.pop(key, None)  # one entry per key: the young one shadows no old one
        young[key] = value

    def clear(self) -> None:
        self.young = {}
        self.old = {}


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


def _own(text: str) -> str:
    """A new string equal to `text` (str() and slicing hand back the same object)."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")


def trim_heap() -> None:
    """Hand the pages a large transient freed back to the system (glibc's malloc_trim).

    A topology answer at 10,000 instances is several MB of JSON parsed into ~30 MB of
    objects, of which the index keeps ~6 MB; what was freed stayed mapped, so the agent's
    RSS kept the load's peak (bench/scale_bench.py: +34 MB at 10,000 instances, 3.4 KiB
    per instance; +17 MB with the index's own copies (`_own`) and this). Elsewhere (musl,
    macOS) there is no malloc_trim: nothing to do.
    """
    try:
        import ctypes  # here, not at import: only an index load pays for it

        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):
        pass


def key_of(caller: Caller) -> Key:
    kind, ident = caller.scope
    return (kind, ident, caller.ip)


class _Port:
    """One port as the lookup needs it (slots: ~100 bytes plus its strings)."""

    __slots__ = ("device_id", "device_owner", "ips", "network_id", "project_id")

    def __init__(self, network_id: str, device_id: str, device_owner: str, project_id: str,
                 ips: tuple[str, ...]) -> None:
        self.network_id = network_id
        self.device_id = device_id
        self.device_owner = device_owner
        self.project_id = project_id
        self.ips = ips


class PortIndex:
    """(network, ip) -> port and router -> its networks, exact at `revision`.

    Pure: `install(topology)` loads it, `apply_change(row)` follows the feed. While a load is
    in flight (`begin_load`), feed changes are buffered and replayed after the topology
    (only those newer than the topology's revision). `find` answers what the registry's
    `/v1/lookup` would, or None when it does not know (not loaded, or no port there).
    """

    def __init__(self) -> None:
        self.loaded = False
        self.revision = 0
        self._topology_revision = 0  # changes at or below it are in the loaded topology
        self.loads = 0
        self._ports: dict[str, _Port] = {}
        self._by_addr: dict[tuple[str, str], str] = {}
        self._clashes: set[tuple[str, str]] = set()  # two ports claim one address: ask
        self._router_nets: dict[str, dict[str, int]] = {}
        self._pending: list[Mapping[str, Any]] | None = None

    def __len__(self) -> int:
        return len(self._ports)

    @property
    def loading(self) -> bool:
        return self._pending is not None

    def begin_load(self) -> None:
        """Stop answering; buffer feed changes until `install` or `abort_load`."""
        self.loaded = False
        self._pending = []

    def abort_load(self) -> None:
        self._pending = None
        self._reset()

    def drop(self) -> None:
        """Forget everything (a resync): nothing is answered until the next install."""
        self.loaded = False
        self._reset()

    def install(self, topology: Mapping[str, Any]) -> None:
        """Load from a /v1/topology answer, then replay the changes buffered meanwhile."""
        self._reset()
        self.revision = self._topology_revision = int(topology.get("revision") or 0)
        for port in topology.get("ports") or ():
            ips = tuple(str(i.get("ip_address")) for i in port.get("fixed_ips") or ()
                        if i.get("ip_address"))
            self._add(str(port.get("id") or ""), port, ips)
        pending, self._pending = self._pending or [], None
        self.loaded = True
        self.loads += 1
        for change in pending:
            self.apply_change(change)

    def apply_change(self, change: Mapping[str, Any]) -> None:
        if self._pending is not None:
            if len(self._pending) >= _MAX_PENDING:  # give up this load; the next one redoes it
                self._pending = None
                self.loaded = False
                self._reset()
                return
            self._pending.append(change)
            return
        if not self.loaded:
            return
        rev = int(change.get("revision") or 0)
        if rev <= self._topology_revision:
            return  # already in the topology this index was loaded from
        # one write's changes share a revision: each of them applies (a port created with
        # its project, or the second port of a deleted instance, must not be skipped)
        self.revision = max(self.revision, rev)
        kind, op = change.get("kind"), change.get("op")
        ident = str(change.get("id") or "")
        attrs = change.get("attrs") or {}
        if kind == "port" and isinstance(attrs, Mapping):
            self._remove(ident)
            if op == "create":
                self._add(ident, attrs, tuple(str(ip) for ip in attrs.get("ips") or ()))
            # an update lists the IPs before and after: the port is asked of the registry
        elif kind == "router" and op == "delete":
            self._router_nets.pop(ident, None)
        elif kind not in ("port", "router", "network", "subnet", "instance", "project",
                          "keypair", "host"):  # host: a node's liveness, not an address
            self.drop()  # a change we do not understand: know nothing rather than guess

    def find(self, caller: Caller) -> list[dict[str, str]] | None:
        """The ports the registry's lookup would return (sorted by id), or None."""
        if not self.loaded or caller.ip.startswith(_LINK_LOCAL_V6):
            return None  # link-local v6 callers are matched by MAC: the registry decides
        kind, ident = caller.scope
        nets = (self._router_nets.get(ident, {}) if kind == "router" else (ident,))
        ids = []
        for net in nets:
            addr = (net, caller.ip)
            if addr in self._clashes:
                return None
            pid = self._by_addr.get(addr)
            if pid is not None:
                ids.append(pid)
        if not ids:
            return None
        out = []
        for pid in sorted(ids):
            p = self._ports[pid]
            out.append({"id": pid, "network_id": p.network_id, "device_id": p.device_id,
                        "device_owner": p.device_owner, "project_id": p.project_id})
        return out

    # -- internals
    def _reset(self) -> None:
        self._ports.clear()
        self._by_addr.clear()
        self._clashes.clear()
        self._router_nets.clear()

    def _add(self, pid: str, attrs: Mapping[str, Any], ips: tuple[str, ...]) -> None:
        if not pid:
            return
        # Own copies of what is kept, not the parsed answer's strings: holding ~3 of each
        # port's ~12 parsed objects kept every page of the parse in use (see trim_heap).
        pid = _own(pid)
        ips = tuple(_own(ip) for ip in ips)
        intern = sys.intern  # network, project and router ids repeat across ports
        port = _Port(intern(_own(str(attrs.get("network_id") or ""))),
                     _own(str(attrs.get("device_id") or "")),
                     intern(_own(str(attrs.get("device_owner") or ""))),
                     intern(_own(str(attrs.get("project_id") or ""))), ips)
        self._ports[pid] = port
        for ip in ips:
            addr = (port.network_id, ip)
            if self._by_addr.setdefault(addr, pid) != pid:
                self._clashes.add(addr)
        if port.device_owner == DEVICE_OWNER_ROUTER and port.device_id:
            nets = self._router_nets.setdefault(intern(port.device_id), {})
            nets[port.network_id] = nets.get(port.network_id, 0) + 1

    def _remove(self, pid: str) -> None:
        port = self._ports.pop(pid, None)
        if port is None:
            return
        for ip in port.ips:
            addr = (port.network_id, ip)
            if self._by_addr.get(addr) == pid:
                del self._by_addr[addr]
            self._clashes.discard(addr)
        if port.device_owner == DEVICE_OWNER_ROUTER and port.device_id:
            nets = self._router_nets.get(port.device_id)
            if nets is not None:
                left = nets.get(port.network_id, 0) - 1
                if left > 0:
                    nets[port.network_id] = left
                else:
                    nets.pop(port.network_id, None)
                if not nets:
                    del self._router_nets[port.device_id]


class CallerCache:
    """(router|network, ip) -> Resolution, bounded, invalidated by registry changes."""

    def __init__(self, size: int, *, max_tombstones: int | None = None) -> None:
        self.size = size
        self._max_tombstones = max_tombstones if max_tombstones is not None else max(
            4096, 4 * size)
        self._entries: OrderedDict[Key, CacheEntry] = OrderedDict()
        # secondary indexes: what a change names -> the keys it affects
        self._by_ip: dict[str, Slot] = {}
        self._by_scope: dict[tuple[str, str], Slot] = {}
        self._by_port: dict[str, Slot] = {}
        self._by_network: dict[str, Slot] = {}
        self._by_instance: dict[str, Slot] = {}
        # tombstones: the newest change revision that touched each name
        self._t_ip: dict[str, int] = {}
        self._t_scope: dict[tuple[str, str], int] = {}
        self._t_port: dict[str, int] = {}
        self._t_network: dict[str, int] = {}
        self._t_instance: dict[str, int] = {}
        self._t_count = 0
        self._floor = 0  # nothing that answered at or below this revision is inserted
        # Bumped by whatever may change what a caller resolves to (an entry unlinked,
        # evicted or cleared, any feed row, an index load): the agent's caller memo keeps the
        # epoch it last checked an entry at, and skips this cache's lookup while it holds.
        self.epoch = 0
        self.evictions = 0
        self.invalidations = 0
        self.index = PortIndex()
        # called by clear() (a resync or the first batch): the index must be reloaded
        self.on_reload: Callable[[], None] | None = None

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
            self.epoch += 1
        return True

    def forget(self, caller: Caller) -> None:
        key = key_of(caller)
        if key in self._entries:
            self._unlink(key)

    def clear(self, revision: int) -> None:
        """Drop everything (feed resync): nothing answered at or before `revision` returns;
        the index is reloaded (`on_reload`)."""
        self._clear_entries(revision)
        if self.on_reload is not None:
            self.index.drop()
            self.on_reload()

    def _clear_entries(self, revision: int) -> None:
        self.epoch += 1
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
        self.epoch += 1  # the index changes with any row, even one that drops nothing
        before = len(self._entries)
        was_loaded = self.index.loaded
        self.index.apply_change(change)
        if was_loaded and not self.index.loaded and self.on_reload is not None:
            self.on_reload()
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
                self._clear_entries(rev)
            else:
                self._touch(self._by_network, self._t_network, net, rev)
                self._touch(self._by_scope, self._t_scope, ("network", net), rev)
        elif kind == "instance":
            if op == "delete":
                self._touch(self._by_instance, self._t_instance, ident, rev)
        elif kind in ("project", "keypair", "host"):  # host: a node turned alive or dead
            pass
        else:
            self._clear_entries(rev)
        dropped = before - len(self._entries)
        self.invalidations += dropped
        return dropped

    # -- internals ----------------------------------------------------------------------
    def _touch(self, index: dict[_K, Slot], tombs: dict[_K, int], name: _K, rev: int) -> None:
        for key in self._keys(index, name):
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

    def _names(self, key: Key, res: Resolution) -> list[tuple[dict[Any, Slot], Any]]:
        return [
            (self._by_ip, key[2]),
            (self._by_scope, (key[0], key[1])),
            (self._by_port, res.port_id),
            (self._by_network, res.network_id),
            (self._by_instance, res.instance_id),
        ]

    # A name maps to its one key (the common case: one IP, port and instance per entry) or,
    # from the second on, to a set of keys: a set per name cost ~200 bytes per entry each.
    def _index(self, key: Key, res: Resolution) -> None:
        for index, name in self._names(key, res):
            keys = index.get(name)
            if keys is None:
                index[name] = key
            elif isinstance(keys, set):
                keys.add(key)
            elif keys != key:
                index[name] = {keys, key}

    def _unindex(self, key: Key, entry: CacheEntry) -> None:
        for index, name in self._names(key, entry.resolution):
            self._discard(index, name, key)

    @staticmethod
    def _keys(index: dict[Any, Slot], name: Any) -> list[Key]:
        keys = index.get(name)
        if keys is None:
            return []
        return list(keys) if isinstance(keys, set) else [keys]

    @staticmethod
    def _discard(index: dict[Any, Slot], name: Any, key: Key) -> None:
        keys = index.get(name)
        if keys is None:
            return
        if not isinstance(keys, set):
            if keys == key:
                del index[name]
            return
        keys.discard(key)
        if len(keys) == 1:
            index[name] = next(iter(keys))
        elif not keys:
            del index[name]

    def _unlink(self, key: Key) -> None:
        self.epoch += 1
        entry = self._entries.pop(key)
        self._unindex(key, entry)


@dataclass(slots=True)
class Stats:
    """Counters the agent exposes (stats endpoint, final log line, benchmark, metrics)."""

    hits: int = 0
    misses: int = 0
    shared: int = 0
    registry_queries: int = 0
    registry_errors: int = 0
    uncached: int = 0  # lookups made because the feed was down
    index_hits: int = 0  # answered from the warm index (counted in hits or known too)
    known: int = 0  # served what was known while the registry did not answer
    index_loads: int = 0
    index_load_errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class Resolver:
    """Caller -> Resolution through the cache and the warm index, with single-flight
    registry lookups. `topology` (an async /v1/topology) enables the index."""

    def __init__(
        self, lookup: Callable[[Caller], Awaitable[LookupResult]], cache: CallerCache,
        trust: Callable[[], bool], *,
        topology: Callable[[], Awaitable[Mapping[str, Any]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lookup = lookup
        self.cache = cache
        self._trust = trust
        self._topology = topology
        self._clock = clock
        self._inflight: dict[Key, asyncio.Future[Resolution]] = {}
        self._down_until = 0.0
        self._load_task: asyncio.Task[None] | None = None
        self._load_again = False
        self._load_wanted = False
        self.stats = Stats()
        # called when a lookup succeeds after failing (the follower should retry now)
        self.on_registry_back: Callable[[], None] | None = None
        # whether what is known may still be served while no registry answers (the agent:
        # within its feed lease's hold, metadata.feed_lease; a reused IP waits that long)
        self.may_know: Callable[[], bool] = lambda: True
        # called when the cache is untrusted: True if trust is back (the agent renewed its
        # feed lease with one shared feed call), so the hit is answered without a lookup
        self.regain: Callable[[], Awaitable[bool]] | None = None
        if topology is not None:
            cache.on_reload = self._want_load

    # -- the warm index -------------------------------------------------------------------
    def _want_load(self) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self._load_wanted = True  # started by the next request, inside the loop
            return
        self._load_wanted = False
        if self._load_task is not None and not self._load_task.done():
            self._load_again = True
            return
        self._load_task = asyncio.ensure_future(self._load())

    async def _load(self) -> None:
        assert self._topology is not None
        index = self.cache.index
        delay = _LOAD_RETRY_MIN_S
        while True:
            self._load_again = False
            index.begin_load()
            try:
                topology = await self._topology()
            except asyncio.CancelledError:
                index.abort_load()
                raise
            except Exception as exc:  # registry down or a bad answer: retry; lookups cover
                index.abort_load()
                self.stats.index_load_errors += 1
                log.warning("agent.index_load_failed error=%r retry_in_s=%.1f", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _LOAD_RETRY_MAX_S)
                continue
            if self._load_again:
                continue  # a resync came in while loading: load again, from then
            index.install(topology)
            self.cache.epoch += 1
            del topology  # the parsed answer: ~10x what the index keeps of it
            trim_heap()
            self.stats.index_loads += 1
            log.info("agent.index_loaded revision=%d ports=%d", index.revision, len(index))
            return

    def _from_index(self, caller: Caller) -> Resolution | None:
        ports = self.cache.index.find(caller)
        if ports is None:
            return None
        try:
            res = resolve(caller, ports)
        except OpenImdsError:
            return None  # ambiguous or deviceless: the registry's answer decides
        self.cache.put(caller, res, self.cache.index.revision)
        self.stats.index_hits += 1
        return res

    def _known(self, caller: Caller) -> Resolution | None:
        res = self.cache.get(caller)
        return res if res is not None else self._from_index(caller)

    # -- answering ------------------------------------------------------------------------
    def cached(self, caller: Caller) -> Resolution | None:
        """A cache (or index) hit, only while the feed is live, or what is known while the
        registry does not answer (no I/O, no await)."""
        if self._trust():
            res = self.cache.get(caller)
            if res is None:
                if self._load_wanted:
                    self._want_load()
                res = self._from_index(caller)
                if res is None:
                    return None
            self.stats.hits += 1
            return res
        if self._down_until and self._clock() < self._down_until and self.may_know():
            res = self._known(caller)
            if res is not None:
                self.stats.known += 1
            return res
        return None

    async def resolve(self, caller: Caller, *, use_cache: bool = True) -> tuple[Resolution, str]:
        """(resolution, "hit" | "miss" | "shared" | "known"). Raises ResolutionError, or the
        lookup's error when the registry does not answer and the caller is not known."""
        if use_cache:
            res = self.cached(caller)
            if res is not None:
                return res, "hit" if self._trust() else "known"
            if self.regain is not None and not self._trust() and await self.regain():
                res = self.cached(caller)
                if res is not None:
                    return res, "hit"
        key = key_of(caller)
        fut = self._inflight.get(key)
        if fut is not None:
            self.stats.shared += 1
            source = "shared"
        else:
            fut = asyncio.ensure_future(self._fetch(caller, key))
            self._inflight[key] = fut
            fut.add_done_callback(lambda f: self._done(key, f))
            self.stats.misses += 1
            source = "miss"
        try:
            return await asyncio.shield(fut), source
        except UpstreamError:
            known = self._known(caller) if use_cache and self.may_know() else None
            if known is None:
                raise
            self.stats.known += 1
            return known, "known"

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
        except UpstreamError:
            self.stats.registry_errors += 1
            self._down_until = self._clock() + DOWN_HOLD_S
            raise
        except BaseException:
            self.stats.registry_errors += 1
            raise
        if self._down_until:
            self._down_until = 0.0
            if self.on_registry_back is not None:
                self.on_registry_back()
        res = resolve(caller, result.ports)
        self.cache.put(caller, res, result.revision)
        return res

    def forget(self, caller: Caller) -> None:
        self.cache.forget(caller)

    async def aclose(self) -> None:
        """Stop a running index load."""
        task, self._load_task = self._load_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
