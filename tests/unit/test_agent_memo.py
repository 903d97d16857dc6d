"""The agent's hot-path memos: per caller (`_sources`), per path (`_paths`), per known head
(`_hits`), each two generations (`agent_cache.Generations`).

What must hold: the bytes a kept hit sends are the bytes the full rewrite makes; the working
set stays under a stream of new keys while the bound holds; and no kept part ever carries an
identity the cache no longer gives, whichever generation it sits in.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import pytest

from openimds.core.headers import rewrite_request_headers
from openimds.core.signing import sign_instance_id
from openimds.http.client import UpstreamPool
from openimds.http.server import Request
from openimds.metadata import agent as agent_mod
from openimds.metadata.agent_cache import Generations
from tests.unit.test_agent_handler import SECRET, R, call, make, req

RID = b"x-openimds-request-id"


# -- Generations -----------------------------------------------------------------------
def test_generations_hold_at_most_twice_the_bound_and_keep_what_is_asked() -> None:
    g: Generations[int, str] = Generations(4)
    for k in range(4):
        g.put(k, f"v{k}")
    assert len(g.young) == 4 and not g.old
    g.put(100, "new")  # the young generation was full: it is now the old one
    assert g.rotations == 1 and len(g.old) == 4 and list(g.young) == [100]
    assert g.get(2) == "v2" and 2 in g.young and 2 not in g.old  # promoted
    for k in range(200, 300):  # a stream of new keys, key 2 asked after each 3 of them
        g.put(k, "x")
        assert len(g) <= 2 * g.bound
        if k % 3 == 0:
            assert g.get(2) == "v2"
    assert g.get(0) is None  # never asked again: gone with its generation
    assert g.get(2) == "v2"


def test_generations_put_replaces_an_old_entry() -> None:
    g: Generations[int, str] = Generations(2)
    g.put(1, "a")
    g.put(2, "b")
    g.put(3, "c")  # 1, 2 old
    g.put(1, "A")
    assert g.get(1) == "A" and 1 not in g.old and len(g) == 3


# -- the bytes -------------------------------------------------------------------------
def expected(r: Request, inst: str, proj: str, ip: str = "10.0.0.5") -> bytes:
    """What the full rewrite sends for `r` (the path before the memos)."""
    headers = rewrite_request_headers(
        r.headers, forwarded_for=ip, instance_id=inst, tenant_id=proj,
        signature=sign_instance_id(SECRET.encode(), inst), method=r.method.encode(),
        body_length=len(r.body))
    return UpstreamPool(unix_path="/nonexistent").encode_request(
        r.method, r.target, headers, r.body)


def record_sends(api: Any) -> list[bytes]:
    sent: list[bytes] = []
    send = api.send_encoded

    def recorded(data: bytes, head_only: bool, on_result: Any) -> None:
        sent.append(data)
        send(data, head_only, on_result)

    api.send_encoded = recorded
    return sent


@pytest.mark.parametrize("extra,method,body,path", [
    ([], "GET", b"", "/openstack"),
    ([(b"user-agent", b"Cloud-Init/24.1"), (b"accept", b"*/*"), (RID, b"abc-1")], "GET", b"",
     "/latest/meta-data/"),
    ([(RID, b"a"), (b"accept", b"*/*"), (RID, b"b")], "GET", b"", "/openstack"),
    ([(b"connection", b"x-drop-me, keep-alive"), (b"x-drop-me", b"1"), (RID, b"c")], "GET", b"",
     "/openstack"),
    ([(b"connection", b"host"), (RID, b"c")], "GET", b"", "/openstack"),  # Host re-added
    ([(b"x-forwarded-proto", b"https"), (b"x-instance-id", b"victim"), (RID, b"d")], "HEAD",
     b"", "/openstack/latest/meta_data.json"),
    ([(RID, b"e")], "POST", b"", "/openstack/latest/password"),  # Content-Length: 0
    ([(RID, b"f")], "POST", b"pw\x00rid\x00X-Openimds-Splice: \x00\r\n",
     "/openstack/latest/password"),  # a body with both marks: sent whole, never kept
    ([(RID, b"g")], "GET", b"", "/openstack/" + "x" * 300),  # a long target: not kept
    ([(b"x-h%d" % i, b"v") for i in range(30)] + [(RID, b"h")], "GET", b"", "/openstack"),
])
async def test_a_hit_sends_what_the_full_rewrite_makes(
    extra: list[tuple[bytes, bytes]], method: str, body: bytes, path: str,
) -> None:
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1", "proj-1")
    sent = record_sends(api)
    assert (await call(agent, req(path="/warm")))[0] == 200  # the miss: a registry lookup
    for n in range(3):  # the first of this shape (its path made), then kept parts
        r = req(method=method, path=path, body=body, extra=[
            (k, v + b"%d" % n if k == RID else v) for k, v in extra])
        assert (await call(agent, r))[0] == 200
        assert sent[-1] == expected(r, "inst-1", "proj-1")
    assert b"\x00" not in sent[-1].partition(b"\r\n\r\n")[0]


async def test_every_caller_on_a_path_shares_its_path_and_gets_its_own_identity() -> None:
    agent, reg, api = make()
    ips = [f"10.0.0.{i}" for i in range(10, 20)]
    for ip in ips:
        reg.add(R, ip, f"inst-{ip}", f"proj-{ip}")
    sent = record_sends(api)
    for ip in ips:  # the misses: a registry lookup each
        assert (await call(agent, req(xff=ip, path="/warm")))[0] == 200
    for path in ("/openstack", "/latest/meta-data/hostname"):
        for ip in ips:
            for _ in range(2):
                r = req(xff=ip, path=path, extra=[(RID, b"id")])
                assert (await call(agent, r))[0] == 200
                assert sent[-1] == expected(r, f"inst-{ip}", f"proj-{ip}", ip)
    assert len(agent._paths) == 2 and len(agent._sources) == len(ips)  # misses keep none


# -- invalidation, in either generation ------------------------------------------------
def move(agent: Any, reg: Any, ip: str, old: str, new: str, revision: int) -> None:
    """The feed moves `ip` from instance `old` to `new` (port delete, then a new port)."""
    reg.ports[(R, ip)] = []
    reg.add(R, ip, new, f"proj-{new}", pid=f"port-{new}")
    reg.revision = revision + 1
    agent.apply_batch({"revision": revision, "resync": False, "changes": [
        {"revision": revision, "kind": "port", "op": "delete", "id": f"port-{old}",
         "attrs": {"ips": [ip], "device_id": old}}]})


def known(r: Request, key: bytes) -> Request:
    """`r` as the server hands over a known head: with its shape and request ID."""
    r.shape = key
    r.request_id = dict(r.headers).get(RID)
    return r


async def test_a_caller_kept_in_the_old_generation_gets_the_new_identity() -> None:
    agent, reg, api = make()
    agent._sources = Generations(2)
    agent._paths = Generations(2)
    agent._hits = Generations(2)
    reg.add(R, "10.0.0.5", "inst-1")
    for ip in ("10.0.0.6", "10.0.0.7"):
        reg.add(R, ip, f"inst-{ip}")
    sent = record_sends(api)

    def r5(path: str = "/openstack") -> Request:
        return known(req(path=path, extra=[(RID, b"id-5")]), b"head:" + path.encode())

    for _ in range(2):
        assert (await call(agent, r5())) == (200, b"hello inst-1")
    for path in ("/a", "/b"):  # two more paths and callers: .5 and /openstack go old
        for ip in ("10.0.0.6", "10.0.0.7"):
            r = known(req(xff=ip, path=path), b"head:" + ip.encode() + path.encode())
            assert (await call(agent, r))[0] == 200
    key5 = tuple(h for h in r5().headers if h[0] in agent_mod._IDENTITY_NAMES)
    assert key5 in agent._sources.old and key5 not in agent._sources.young
    assert b"head:/openstack" in agent._hits.old
    move(agent, reg, "10.0.0.5", "inst-1", "inst-2", 5)
    assert (await call(agent, r5())) == (200, b"hello inst-2")  # the miss: a lookup
    assert (await call(agent, r5())) == (200, b"hello inst-2")  # kept parts, the old ones'
    assert sent[-1] == expected(r5(), "inst-2", "proj-inst-2")
    assert (await call(agent, r5("/b"))) == (200, b"hello inst-2")
    assert sent[-1] == expected(r5("/b"), "inst-2", "proj-inst-2")
    seen = [dict((k.lower(), v) for k, v in hs) for _, _, hs, _ in api.seen]
    assert [h[b"x-instance-id"] for h in seen if h[b"x-forwarded-for"] == b"10.0.0.5"] == [
        b"inst-1"] * 2 + [b"inst-2"] * 3


async def test_a_deleted_instance_is_never_sent_from_kept_parts() -> None:
    agent, reg, api = make()
    agent._sources = Generations(1)
    reg.add(R, "10.0.0.5", "inst-1")
    reg.add(R, "10.0.0.6", "inst-6")
    for _ in range(2):
        assert (await call(agent, req())) == (200, b"hello inst-1")
    assert (await call(agent, req(xff="10.0.0.6")))[0] == 200  # .5 goes old
    reg.ports[(R, "10.0.0.5")] = []
    reg.revision = 9
    agent.apply_batch({"revision": 8, "resync": False, "changes": [
        {"revision": 8, "kind": "instance", "op": "delete", "id": "inst-1", "attrs": {}}]})
    assert (await call(agent, req()))[0] == 404
    assert [h for _, _, hs, _ in api.seen for h in hs if h[0] == b"X-Instance-ID"].count(
        (b"X-Instance-ID", b"inst-1")) == 2


async def test_an_untrusted_cache_is_asked_whatever_the_memos_hold() -> None:
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1")
    for _ in range(3):
        assert (await call(agent, req())) == (200, b"hello inst-1")
    assert len(reg.calls) == 1
    agent._feed_up = lambda: False
    reg.ports.clear()
    reg.add(R, "10.0.0.5", "inst-2", pid="port-new")
    assert (await call(agent, req())) == (200, b"hello inst-2")
    assert len(reg.calls) == 2


# -- bounds ----------------------------------------------------------------------------
async def test_a_hostile_stream_of_paths_keeps_the_bound_and_the_callers() -> None:
    agent, reg, api = make()
    agent._paths = Generations(64)
    reg.add(R, "10.0.0.5", "inst-1")
    reg.add(R, "10.0.0.6", "inst-6")
    for n in range(1000):
        assert (await call(agent, req(path=f"/x/{n}", extra=[(b"x-junk", b"%d" % n)])))[0] == 200
        assert len(agent._paths) <= 128
        if n % 50 == 0:
            assert (await call(agent, req(xff="10.0.0.6", path="/openstack")))[0] == 200
    assert agent._paths.get(("GET", "/openstack", (b"host", b"169.254.169.254"))) is not None
    assert len(agent._sources) == 2 and len(reg.calls) == 2


def measured(make_one: Any, n: int = 300) -> float:
    """Bytes allocated and kept per call of `make_one(i)` (tracemalloc)."""
    for i in range(-5, 0):
        make_one(i)  # warm: first allocations, interned names
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for i in range(n):
        make_one(i)
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    return sum(s.size_diff for s in after.compare_to(before, "filename")) / n


def fresh(b: bytes) -> bytes:
    """A new object equal to `b` (as the parser makes one per request)."""
    return bytes(bytearray(b))


def test_worst_case_bytes_per_entry_are_what_the_bounds_state() -> None:
    """Entries at their size caps, each of its own objects as parsed requests give them,
    measured: the worst-case figures beside `_SOURCES_MAX`."""
    from openimds.core.caller import Resolution

    agent, _, _ = make()
    router = "r" * 128
    n_extra = agent_mod._PATH_HEADERS_MAX - 2  # host, the request ID
    value = b"v" * ((agent_mod._PATH_BYTES_MAX - 40) // n_extra - 1)

    def big(i: int) -> Request:
        ip = f"10.1.{i % 250}.{i // 250 % 250}"
        pad = agent_mod._SOURCE_BYTES_MAX - len(router) - len(ip)
        r = req(xff=" " * pad + ip, router=router, path="/" + f"{i % 10**8:08d}" * 31,
                extra=[(fresh(b"x"), fresh(value)) for _ in range(n_extra)] + [(RID, b"id")])
        r.headers = [(fresh(k), fresh(v)) for k, v in r.headers]
        return r

    r = big(0)
    _, others, _ = agent._source(r)
    assert len(others) == agent_mod._PATH_HEADERS_MAX
    assert sum(len(a) + len(b) for a, b in others) <= agent_mod._PATH_BYTES_MAX
    kept: list[Any] = []

    def source(i: int) -> None:
        src, _, _ = agent._source(big(i))
        src.identity = agent._identity(src.caller, Resolution(
            f"{i:036d}", "p" * 32, f"port-{i:031d}", "n" * 36))
        assert src.kept

    def path(i: int) -> None:
        r = big(i)
        _, others, rid = agent._source(r)
        assert agent._path(r, others, rid).kept

    def head(i: int) -> None:
        agent._hits.put(b"k" * (1024 - 8) + b"%08d" % (i % 10**8), (kept[0], kept[1]))

    per_source = measured(source)
    assert len(agent._sources) == 305
    src, others, rid = agent._source(r)
    kept[:] = [src, agent._path(r, others, rid)]
    agent._paths.clear()
    per_path = measured(path)
    assert len(agent._paths) == 305
    per_head = measured(head)
    print(f"worst case bytes per entry: source {per_source:.0f}, path {per_path:.0f}, "
          f"known head {per_head:.0f}")
    assert per_source < 1.7 * 1024
    assert per_path < 5 * 1024
    assert per_head < 1.2 * 1024
