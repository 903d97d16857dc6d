"""metadata.agent_cache: the never-stale caller cache and the single-flight resolver."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from openimds.core.caller import Caller, Resolution
from openimds.errors import AmbiguousCaller, UnknownCaller, UpstreamUnavailable
from openimds.metadata.agent_cache import CallerCache, LookupResult, Resolver

R1, R2, N1, N2 = "router-1", "router-2", "net-1", "net-2"


def res(inst: str = "i1", port: str = "p1", net: str = N1) -> Resolution:
    return Resolution(instance_id=inst, project_id="t1", port_id=port, network_id=net)


def port_change(rev: int, pid: str, ips: list[str], **attrs: Any) -> dict[str, Any]:
    return {"revision": rev, "kind": "port", "op": attrs.pop("op", "update"), "id": pid,
            "attrs": {"network_id": N1, "ips": ips, **attrs}}


def test_put_get_and_lru_bound() -> None:
    cache = CallerCache(2)
    a, b, c = (Caller(f"10.0.0.{i}", router_id=R1) for i in (1, 2, 3))
    assert cache.put(a, res("ia", "pa"), 5)
    assert cache.put(b, res("ib", "pb"), 5)
    assert cache.get(a) == res("ia", "pa")  # a is now most recent
    assert cache.put(c, res("ic", "pc"), 5)
    assert len(cache) == 2 and cache.get(b) is None and cache.get(a) is not None
    assert cache.evictions == 1


def test_size_zero_disables() -> None:
    cache = CallerCache(0)
    assert not cache.put(Caller("10.0.0.1", router_id=R1), res(), 1)
    assert len(cache) == 0


def test_same_ip_other_scope_is_another_entry() -> None:
    cache = CallerCache(10)
    cache.put(Caller("10.0.0.5", router_id=R1), res("i1", "p1", N1), 1)
    cache.put(Caller("10.0.0.5", router_id=R2), res("i2", "p2", N2), 1)
    assert cache.get(Caller("10.0.0.5", router_id=R1)) == res("i1", "p1", N1)
    assert cache.get(Caller("10.0.0.5", router_id=R2)) == res("i2", "p2", N2)
    assert cache.get(Caller("10.0.0.5", network_id=N1)) is None


def test_names_shared_by_several_entries_drop_them_all_and_only_them() -> None:
    """A secondary index holds one key per name until a second entry shares it."""
    cache = CallerCache(10)
    a, b = Caller("10.0.0.5", router_id=R1), Caller("10.0.0.5", router_id=R2)
    c = Caller("10.0.0.6", router_id=R1)
    cache.put(a, res("i1", "p1", N1), 1)
    cache.put(b, res("i2", "p2", N2), 1)  # shares the IP with a
    cache.put(c, res("i1", "p3", N1), 1)  # shares the instance with a
    cache.forget(b)  # the IP's slot goes back to one key (a)
    assert cache.apply_change(port_change(2, "p9", ["10.0.0.5"])) == 1
    assert cache.get(a) is None and cache.get(c) is not None
    cache.put(a, res("i1", "p1", N1), 3)
    cache.put(b, res("i2", "p2", N2), 3)
    assert cache.apply_change(port_change(4, "p9", ["10.0.0.5"])) == 2
    assert cache.apply_change({"revision": 5, "kind": "instance", "op": "delete", "id": "i1",
                               "attrs": {}}) == 1
    assert len(cache) == 0


def test_cache_memory_per_entry_is_small() -> None:
    import tracemalloc
    import uuid

    n = 5000
    callers = [Caller(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", router_id=f"r{i // 10}")
               for i in range(n)]
    answers = [res(str(uuid.uuid4()), str(uuid.uuid4()), f"n{i // 10}") for i in range(n)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    cache = CallerCache(n)
    for caller, answer in zip(callers, answers, strict=True):
        cache.put(caller, answer, 1)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(cache) == n
    # the entry and its secondary indexes, not the caller's strings (the agent has those)
    assert used / n < 1024, used / n


def test_port_change_drops_its_ips_only() -> None:
    cache = CallerCache(10)
    five, six = Caller("10.0.0.5", router_id=R1), Caller("10.0.0.6", router_id=R1)
    cache.put(five, res("i1", "p1"), 1)
    cache.put(six, res("i2", "p2"), 1)
    assert cache.apply_change(port_change(2, "p9", ["10.0.0.5"], op="create")) == 1
    assert cache.get(five) is None and cache.get(six) is not None


def test_port_change_drops_the_link_local_caller_of_its_mac() -> None:
    cache = CallerCache(8)
    ll = Caller("fe80::5054:ff:fede:5bbf", network_id=N1)
    # a lookup that answered before a change of the port holding that MAC is not kept
    cache.apply_change(port_change(7, "p-other", [], mac_address="52:54:00:de:5b:bf"))
    assert not cache.put(ll, res(port="p9"), 6)
    assert cache.put(ll, res(port="p9"), 7)
    cache.apply_change(port_change(8, "p-other", [], mac_address="52:54:00:de:5b:bb"))
    assert cache.get(ll) is not None
    cache.apply_change(port_change(9, "p-other", [], mac_address="52:54:00:de:5b:bf"))
    assert cache.get(ll) is None


def test_port_change_by_id_without_ips() -> None:
    cache = CallerCache(10)
    c = Caller("10.0.0.5", network_id=N1)
    cache.put(c, res("i1", "p1"), 1)
    cache.apply_change(port_change(2, "p1", []))
    assert cache.get(c) is None


def test_router_interface_change_drops_router_scope() -> None:
    cache = CallerCache(10)
    c = Caller("10.0.0.5", router_id=R1)
    other = Caller("10.9.0.5", router_id=R2)
    cache.put(c, res(), 1)
    cache.put(other, res("i2", "p2", N2), 1)
    cache.apply_change(port_change(2, "rp", ["10.1.0.1"], device_owner="network:router_interface",
                                   device_id=R1, op="create"))
    assert cache.get(c) is None and cache.get(other) is not None


@pytest.mark.parametrize("change,gone", [
    ({"kind": "router", "op": "update", "id": R1, "attrs": {}}, True),
    ({"kind": "router", "op": "update", "id": R2, "attrs": {}}, False),
    ({"kind": "network", "op": "delete", "id": N1, "attrs": {}}, True),
    ({"kind": "subnet", "op": "update", "id": "s", "attrs": {"network_id": N1}}, True),
    ({"kind": "subnet", "op": "update", "id": "s", "attrs": {"network_id": N2}}, False),
    ({"kind": "subnet", "op": "update", "id": "s", "attrs": {}}, True),
    ({"kind": "instance", "op": "delete", "id": "i1", "attrs": {}}, True),
    ({"kind": "instance", "op": "update", "id": "i1", "attrs": {}}, False),
    ({"kind": "keypair", "op": "create", "id": "k", "attrs": {}}, False),
    ({"kind": "mystery", "op": "create", "id": "x", "attrs": {}}, True),
])
def test_change_kinds(change: dict[str, Any], gone: bool) -> None:
    cache = CallerCache(10)
    c = Caller("10.0.0.5", router_id=R1)
    cache.put(c, res("i1", "p1", N1), 1)
    cache.apply_change({"revision": 2, **change})
    assert (cache.get(c) is None) is gone


def test_resync_clears() -> None:
    cache = CallerCache(10)
    c = Caller("10.0.0.5", router_id=R1)
    cache.put(c, res(), 1)
    cache.clear(7)
    assert cache.get(c) is None
    assert not cache.put(c, res(), 6)  # answered before the resync point
    assert cache.put(c, res(), 7)


def test_late_lookup_answer_is_not_cached_over_a_newer_change() -> None:
    cache = CallerCache(10)
    c = Caller("10.0.0.5", router_id=R1)
    # the feed already delivered revision 10 (port for that IP deleted) ...
    cache.apply_change(port_change(10, "p1", ["10.0.0.5"], op="delete"))
    # ... and a lookup that answered at revision 9 comes back late: refused
    assert not cache.put(c, res(), 9)
    # a lookup that answered at 10 or later reflects that change: fine
    assert cache.put(c, res("i2", "p2"), 10)


def test_tombstone_overflow_collapses_to_floor() -> None:
    cache = CallerCache(10, max_tombstones=3)
    for i in range(5):
        cache.apply_change(port_change(100 + i, f"p{i}", [f"10.0.1.{i}"]))
    c = Caller("10.0.2.1", router_id=R1)
    assert not cache.put(c, res(), 50)  # unknown whether touched: be conservative
    assert cache.put(c, res(), 104)


def test_forget() -> None:
    cache = CallerCache(10)
    c = Caller("10.0.0.5", router_id=R1)
    cache.put(c, res(), 1)
    cache.forget(c)
    cache.forget(c)
    assert cache.get(c) is None


class FakeRegistry:
    def __init__(self) -> None:
        self.ports: dict[tuple[str, str], list[dict[str, str]]] = {}
        self.calls = 0
        self.revision = 1
        self.delay = 0.0
        self.down = False

    async def lookup(self, caller: Caller) -> LookupResult:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.down:
            raise UpstreamUnavailable("registry down")
        return LookupResult(self.revision, self.ports.get((caller.scope[1], caller.ip), []))


def add_port(reg: FakeRegistry, scope: str, ip: str, inst: str, pid: str) -> None:
    reg.ports.setdefault((scope, ip), []).append(
        {"id": pid, "network_id": N1, "device_id": inst, "project_id": "t1"})


async def test_single_flight_boot_storm() -> None:
    reg = FakeRegistry()
    reg.delay = 0.05
    for i in range(50):
        add_port(reg, R1, f"10.0.0.{i}", f"i{i}", f"p{i}")
    trusted = True
    resolver = Resolver(reg.lookup, CallerCache(100), lambda: trusted)
    callers = [Caller(f"10.0.0.{i % 50}", router_id=R1) for i in range(1000)]
    results = await asyncio.gather(*(resolver.resolve(c) for c in callers))
    assert reg.calls == 50
    assert resolver.stats.registry_queries == 50
    assert {r.instance_id for r, _ in results} == {f"i{i}" for i in range(50)}
    sources = [s for _, s in results]
    assert sources.count("miss") == 50 and sources.count("shared") == 950
    # afterwards: hits, no queries
    await asyncio.gather(*(resolver.resolve(c) for c in callers[:100]))
    assert reg.calls == 50 and resolver.stats.hits == 100


async def test_untrusted_feed_asks_every_time() -> None:
    reg = FakeRegistry()
    add_port(reg, R1, "10.0.0.5", "i1", "p1")
    trusted = False
    resolver = Resolver(reg.lookup, CallerCache(100), lambda: trusted)
    c = Caller("10.0.0.5", router_id=R1)
    for _ in range(3):
        r, source = await resolver.resolve(c)
        assert r.instance_id == "i1" and source == "miss"
    assert reg.calls == 3 and resolver.stats.uncached == 3
    trusted = True
    assert (await resolver.resolve(c))[1] == "hit"


async def test_registry_down_propagates_to_every_waiter() -> None:
    reg = FakeRegistry()
    reg.down = True
    reg.delay = 0.02
    resolver = Resolver(reg.lookup, CallerCache(100), lambda: False)
    c = Caller("10.0.0.5", router_id=R1)
    out = await asyncio.gather(*(resolver.resolve(c) for _ in range(10)),
                               return_exceptions=True)
    assert all(isinstance(e, UpstreamUnavailable) for e in out)
    assert reg.calls == 1 and resolver.stats.registry_errors == 1


async def test_zero_and_two_ports_are_not_cached() -> None:
    reg = FakeRegistry()
    resolver = Resolver(reg.lookup, CallerCache(100), lambda: True)
    c = Caller("10.0.0.5", router_id=R1)
    with pytest.raises(UnknownCaller):
        await resolver.resolve(c)
    add_port(reg, R1, "10.0.0.5", "i1", "p1")
    add_port(reg, R1, "10.0.0.5", "i2", "p2")
    with pytest.raises(AmbiguousCaller):
        await resolver.resolve(c)
    assert reg.calls == 2 and len(resolver.cache) == 0


async def test_leader_cancelled_followers_still_answered() -> None:
    reg = FakeRegistry()
    reg.delay = 0.05
    add_port(reg, R1, "10.0.0.5", "i1", "p1")
    resolver = Resolver(reg.lookup, CallerCache(100), lambda: True)
    c = Caller("10.0.0.5", router_id=R1)
    leader = asyncio.ensure_future(resolver.resolve(c))
    await asyncio.sleep(0)
    follower = asyncio.ensure_future(resolver.resolve(c))
    await asyncio.sleep(0)
    leader.cancel()
    r, source = await follower
    assert r.instance_id == "i1" and source == "shared" and reg.calls == 1


async def test_change_during_lookup_keeps_the_answer_out_of_the_cache() -> None:
    reg = FakeRegistry()
    reg.delay = 0.05
    reg.revision = 4
    add_port(reg, R1, "10.0.0.5", "old", "p1")
    resolver = Resolver(reg.lookup, CallerCache(100), lambda: True)
    c = Caller("10.0.0.5", router_id=R1)
    task = asyncio.ensure_future(resolver.resolve(c))
    await asyncio.sleep(0.01)
    resolver.cache.apply_change(port_change(5, "p1", ["10.0.0.5"], op="delete"))
    r, _ = await task
    assert r.instance_id == "old"  # the answer reflected revision 4, true when asked
    assert resolver.cache.get(c) is None  # but it is not kept


# --- the warm index --------------------------------------------------------------------------

ROUTER_OWNER = "network:router_interface"


def topo_port(pid: str, net: str, ips: list[str], device: str,
              owner: str = "compute:nova") -> dict[str, Any]:
    return {"id": pid, "network_id": net, "device_id": device, "device_owner": owner,
            "project_id": "t1", "fixed_ips": [{"subnet_id": "s", "ip_address": i} for i in ips]}


def created(rev: int, pid: str, net: str, ips: list[str], device: str,
            owner: str = "compute:nova", op: str = "create") -> dict[str, Any]:
    return {"revision": rev, "kind": "port", "op": op, "id": pid,
            "attrs": {"network_id": net, "device_id": device, "device_owner": owner,
                      "project_id": "t1", "ips": ips}}


def topology(rev: int = 10) -> dict[str, Any]:
    return {"revision": rev, "ports": [
        topo_port("rp1", N1, ["10.0.0.1"], R1, ROUTER_OWNER),
        topo_port("p1", N1, ["10.0.0.5"], "i1"),
        topo_port("p2", N2, ["10.0.0.5"], "i2"),  # same IP, another network, not on R1
    ]}


def found(index: Any, caller: Caller) -> list[str] | None:
    ports = index.find(caller)
    return None if ports is None else [p["device_id"] for p in ports]


def test_index_answers_what_the_registry_lookup_would() -> None:
    cache = CallerCache(10)
    index = cache.index
    assert found(index, Caller("10.0.0.5", network_id=N1)) is None  # not loaded: ask
    index.install(topology())
    assert found(index, Caller("10.0.0.5", network_id=N1)) == ["i1"]
    assert found(index, Caller("10.0.0.5", network_id=N2)) == ["i2"]
    assert found(index, Caller("10.0.0.5", router_id=R1)) == ["i1"]
    assert found(index, Caller("10.0.0.5", router_id=R2)) is None  # unknown router
    assert found(index, Caller("10.0.0.9", network_id=N1)) is None  # no port: ask
    # a router interface on N2 puts 10.0.0.5 of N2 in R1's scope too: two ports
    cache.apply_change(created(11, "rp2", N2, ["10.0.0.1"], R1, ROUTER_OWNER))
    assert found(index, Caller("10.0.0.5", router_id=R1)) == ["i1", "i2"]
    cache.apply_change(created(12, "rp2", N2, ["10.0.0.1"], R1, ROUTER_OWNER, op="delete"))
    assert found(index, Caller("10.0.0.5", router_id=R1)) == ["i1"]
    # a new VM's port: known at once; its deletion: gone at once
    cache.apply_change(created(13, "p3", N1, ["10.0.0.7"], "i3"))
    assert found(index, Caller("10.0.0.7", router_id=R1)) == ["i3"]
    cache.apply_change(created(14, "p3", N1, ["10.0.0.7"], "i3", op="delete"))
    assert found(index, Caller("10.0.0.7", router_id=R1)) is None
    # an update lists before+after IPs: the port is dropped, the registry decides
    cache.apply_change(created(15, "p1", N1, ["10.0.0.5", "10.0.0.6"], "i1", op="update"))
    assert found(index, Caller("10.0.0.5", network_id=N1)) is None
    # an old change (already in what was loaded) is ignored
    cache.apply_change(created(9, "p9", N1, ["10.0.0.9"], "i9"))
    assert found(index, Caller("10.0.0.9", network_id=N1)) is None
    assert index.revision == 15


def test_index_replays_changes_that_arrive_while_it_loads() -> None:
    cache = CallerCache(10)
    index = cache.index
    index.begin_load()
    cache.apply_change(created(9, "p8", N1, ["10.0.0.8"], "i8"))  # in the topology already
    cache.apply_change(created(11, "p1", N1, ["10.0.0.5"], "i1", op="delete"))
    cache.apply_change(created(12, "p4", N1, ["10.0.0.4"], "i4"))
    assert found(index, Caller("10.0.0.4", network_id=N1)) is None  # loading
    index.install(topology(10))
    assert found(index, Caller("10.0.0.5", network_id=N1)) is None  # deleted at 11
    assert found(index, Caller("10.0.0.4", network_id=N1)) == ["i4"]
    assert found(index, Caller("10.0.0.8", network_id=N1)) is None  # 9 <= 10: skipped
    assert index.revision == 12 and len(index) == 3  # rp1, p2, p4


def test_index_applies_every_change_of_one_write() -> None:
    # one write's changes share its revision: a project created with the instance's port,
    # both ports of a deleted two-port instance
    cache = CallerCache(10)
    index = cache.index
    index.begin_load()
    index.install(topology(10))
    cache.apply_change({"revision": 11, "kind": "project", "op": "create", "id": "p-new",
                        "attrs": {"name": "p-new"}})
    cache.apply_change(created(11, "p5", N1, ["10.0.0.50"], "i5"))
    assert found(index, Caller("10.0.0.50", network_id=N1)) == ["i5"]
    cache.apply_change(created(12, "p6", N1, ["10.0.0.60"], "i6"))
    cache.apply_change(created(12, "p7", N1, ["10.0.0.61"], "i6"))
    cache.apply_change(created(13, "p6", N1, ["10.0.0.60"], "i6", op="delete"))
    cache.apply_change(created(13, "p7", N1, ["10.0.0.61"], "i6", op="delete"))
    assert found(index, Caller("10.0.0.60", network_id=N1)) is None
    assert found(index, Caller("10.0.0.61", network_id=N1)) is None
    assert index.revision == 13


def test_index_memory_per_port_is_small_and_holds_nothing_of_the_answer() -> None:
    """Measured with the parsed answer dropped: the index keeps its own copies, so the
    answer's memory is freed whole (a string kept per port held every page of it)."""
    import json
    import tracemalloc
    import uuid

    ports = [topo_port(str(uuid.uuid4()), N1, [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"],
                       str(uuid.uuid4())) for i in range(5000)]
    text = json.dumps({"revision": 1, "ports": ports})
    del ports
    index = CallerCache(10).index
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index.install(json.loads(text))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(index) == 5000
    assert used / 5000 < 1024, used / 5000
    topo = json.loads(text)
    index.install(topo)
    parsed = {id(v) for p in topo["ports"]
              for v in (p["id"], p["device_id"], p["network_id"], p["project_id"],
                        p["fixed_ips"][0]["ip_address"])}
    assert not parsed & {id(v) for pid, port in index._ports.items()
                         for v in (pid, port.device_id, port.network_id, port.project_id,
                                   *port.ips)}


class TopologyRegistry(FakeRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.topology_calls = 0
        self.topology_rev = 10

    async def topology(self) -> dict[str, Any]:
        self.topology_calls += 1
        await asyncio.sleep(self.delay)
        if self.down:
            raise UpstreamUnavailable("registry down")
        return topology(self.topology_rev)


async def test_first_request_of_a_new_vm_is_a_hit_without_a_lookup() -> None:
    reg = TopologyRegistry()
    cache = CallerCache(100)
    resolver = Resolver(reg.lookup, cache, lambda: True, topology=reg.topology)
    cache.clear(10)  # the first batch: load the index
    for _ in range(50):
        if cache.index.loaded:
            break
        await asyncio.sleep(0.01)
    assert cache.index.loaded and reg.topology_calls == 1
    cache.apply_change(created(11, "p7", N1, ["10.0.0.7"], "new-vm"))
    res_, source = await resolver.resolve(Caller("10.0.0.7", router_id=R1))
    assert res_.instance_id == "new-vm" and source == "hit"
    assert reg.calls == 0 and resolver.stats.index_hits == 1
    # its deletion is seen at once: the next request asks the registry
    cache.apply_change(created(12, "p7", N1, ["10.0.0.7"], "new-vm", op="delete"))
    with pytest.raises(UnknownCaller):
        await resolver.resolve(Caller("10.0.0.7", router_id=R1))
    assert reg.calls == 1


async def test_index_load_retries_while_the_registry_is_down() -> None:
    reg = TopologyRegistry()
    reg.down = True
    cache = CallerCache(100)
    resolver = Resolver(reg.lookup, cache, lambda: True, topology=reg.topology)
    cache.clear(10)
    await asyncio.sleep(0.05)
    assert not cache.index.loaded and resolver.stats.index_load_errors == 1
    reg.down = False
    for _ in range(200):
        if cache.index.loaded:
            break
        await asyncio.sleep(0.01)
    assert cache.index.loaded
    await resolver.aclose()


async def test_registry_down_serves_what_is_known_and_only_that() -> None:
    reg = TopologyRegistry()
    trusted = True
    cache = CallerCache(100)
    resolver = Resolver(reg.lookup, cache, lambda: trusted, topology=reg.topology)
    cache.clear(10)
    while not cache.index.loaded:
        await asyncio.sleep(0.01)
    add_port(reg, R1, "10.0.0.9", "i9", "p9")
    reg.revision = 10
    assert (await resolver.resolve(Caller("10.0.0.9", router_id=R1)))[0].instance_id == "i9"
    # the feed and the registry go down
    trusted, reg.down = False, True
    for ip, want in (("10.0.0.5", "i1"), ("10.0.0.9", "i9")):  # index, cache
        r, source = await resolver.resolve(Caller(ip, router_id=R1))
        assert (r.instance_id, source) == (want, "known")
    calls = reg.calls
    # within the hold window no lookup is even tried for a known caller
    assert resolver.cached(Caller("10.0.0.5", router_id=R1)) is not None
    assert reg.calls == calls
    with pytest.raises(UpstreamUnavailable):  # never seen: no guess
        await resolver.resolve(Caller("10.0.0.77", router_id=R1))
    assert resolver.stats.known == 3
    # past the feed lease's hold a reused address may belong to a new VM (the registry may
    # only be cut off from us and still take writes): nothing known is served any more
    resolver.may_know = lambda: False
    assert resolver.cached(Caller("10.0.0.5", router_id=R1)) is None
    for ip in ("10.0.0.5", "10.0.0.9"):
        with pytest.raises(UpstreamUnavailable):
            await resolver.resolve(Caller(ip, router_id=R1))
    assert resolver.stats.known == 3


def test_node_liveness_changes_keep_cache_and_index_but_unknown_kinds_do_not() -> None:
    cache = CallerCache(10)
    cache.index.install(topology())
    reloads: list[int] = []
    cache.on_reload = lambda: reloads.append(1)
    c = Caller("10.0.0.5", network_id=N1)
    cache.put(c, res(), 10)
    cache.apply_change({"revision": 11, "kind": "host", "op": "create", "id": "node-1",
                        "attrs": {"type": "metadata", "alive": True}})
    assert cache.get(c) is not None and cache.index.loaded and not reloads
    # a restore (or any kind this release does not know): nothing is trusted any more
    cache.apply_change({"revision": 12, "kind": "registry", "op": "restore", "id": "",
                        "attrs": {}})
    assert cache.get(c) is None and not cache.index.loaded and reloads == [1]

