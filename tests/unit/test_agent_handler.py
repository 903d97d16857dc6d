"""metadata.agent.MetadataAgent in-process: fake registry and fake API, no sockets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import pytest

from openimds.config import MetadataAgentSettings, Settings
from openimds.core.caller import Caller, Resolution
from openimds.core.signing import sign_instance_id
from openimds.errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from openimds.http.client import UpstreamPool, UpstreamResponse
from openimds.http.server import Deferred, RawResponse, Request, Response
from openimds.metadata.agent import STATS_PATH, MetadataAgent, socket_mode

R, N = "router-1", "net-1"
SECRET = "s3cret"


class FakeRegistry:
    def __init__(self) -> None:
        self.ports: dict[tuple[str, str], list[dict[str, str]]] = {}
        self.calls: list[tuple[str, str | None, str | None]] = []
        self.revision = 1
        self.error: Exception | None = None
        self.delay = 0.0

    async def lookup(self, ip: str, *, router_id: str | None = None,
                     network_id: str | None = None) -> dict[str, Any]:
        self.calls.append((ip, router_id, network_id))
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return {"revision": self.revision,
                "ports": self.ports.get((router_id or network_id or "", ip), [])}

    def add(self, scope: str, ip: str, inst: str, project: str = "proj",
            pid: str | None = None) -> None:
        self.ports.setdefault((scope, ip), []).append(
            {"id": pid or f"port-{inst}", "network_id": N, "device_id": inst,
             "device_owner": "compute:nova", "project_id": project})


class FakeApi:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, list[tuple[bytes, bytes]], bytes]] = []
        self.status = 200
        self.error: Exception | None = None
        self.known: set[str] | None = None
        self.delay = 0.0

    async def request(self, method: str, target: str, headers: Any = (),
                      body: bytes = b"") -> UpstreamResponse:
        hs = list(headers)
        self.seen.append((method, target, hs, body))
        await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        inst = dict(hs)[b"X-Instance-ID"].decode()
        status = self.status
        if self.known is not None and inst not in self.known:
            status = 404
        body_out = f"hello {inst}".encode()
        raw = (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body_out)}\r\n\r\n".encode()
               + body_out)
        return UpstreamResponse(status, [], body_out, raw, True)

    def send(self, method: str, target: str, headers: Any, body: bytes,
             on_result: Any) -> None:
        task = asyncio.ensure_future(self.request(method, target, headers, body))
        task.add_done_callback(lambda t: on_result(t.exception() or t.result()))

    def encode_request(self, method: str, target: str, headers: Any, body: bytes) -> bytes:
        return UpstreamPool(unix_path="/nonexistent").encode_request(
            method, target, headers, body)

    def send_encoded(self, data: bytes, head_only: bool, on_result: Any) -> None:
        """The bytes a hit sends, parsed back into what `request` records."""
        head, _, body = data.partition(b"\r\n\r\n")
        first, *lines = head.split(b"\r\n")
        method, target, _ = first.decode().split(" ")
        headers = [tuple(line.split(b": ", 1)) for line in lines]
        self.send(method, target, headers, body, on_result)


def make(feed: bool = True, **agent_opts: Any) -> tuple[MetadataAgent, FakeRegistry, FakeApi]:
    settings = dataclasses.replace(
        Settings(), metadata_proxy_shared_secret=SECRET,
        metadata_agent=dataclasses.replace(MetadataAgentSettings(), **agent_opts))
    reg, api = FakeRegistry(), FakeApi()
    up = {"v": feed}
    agent = MetadataAgent(settings, registry=reg, upstream=api, feed_up=lambda: up["v"])
    agent.apply_batch({"revision": 0, "changes": [], "resync": False})
    return agent, reg, api


def req(xff: str | None = "10.0.0.5", router: str | None = R, network: str | None = None,
        path: str = "/openstack/latest/meta_data.json", method: str = "GET",
        extra: list[tuple[bytes, bytes]] | None = None, body: bytes = b"") -> Request:
    hs: list[tuple[bytes, bytes]] = [(b"host", b"169.254.169.254")]
    if xff is not None:
        hs.append((b"x-forwarded-for", xff.encode()))
    if router is not None:
        hs.append((b"x-neutron-router-id", router.encode()))
    if network is not None:
        hs.append((b"x-neutron-network-id", network.encode()))
    hs += extra or []
    return Request(method, path, hs, body, "1.1", True, None)


async def settle(out: Any) -> Response | RawResponse:
    """What the server would write: a value, an awaited coroutine, or a resolved Deferred."""
    if isinstance(out, Response | RawResponse):
        return out
    if isinstance(out, Deferred):
        if out._early is not None:
            return out._early
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        out._deliver = fut.set_result  # what HttpProtocol does
        return await fut  # type: ignore[no-any-return]
    return await out  # type: ignore[no-any-return]


async def call(agent: MetadataAgent, r: Request) -> tuple[int, bytes]:
    out = await settle(agent.handle(r))
    if isinstance(out, RawResponse):
        head, _, body = out.data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body
    return out.status, out.body


async def test_forwards_with_signed_headers() -> None:
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1", "proj-1")
    status, body = await call(agent, req(xff="::ffff:10.0.0.5", extra=[
        (b"x-instance-id", b"victim"), (b"x-tenant-id", b"victim")]))
    assert (status, body) == (200, b"hello inst-1")
    method, target, hs, _ = api.seen[0]
    d = dict(hs)
    assert d[b"X-Forwarded-For"] == b"10.0.0.5"
    assert d[b"X-Instance-ID"] == b"inst-1" and d[b"X-Tenant-ID"] == b"proj-1"
    assert d[b"X-Instance-ID-Signature"] == sign_instance_id(SECRET.encode(), "inst-1").encode()
    assert b"victim" not in b"".join(v for _, v in hs)
    assert reg.calls == [("10.0.0.5", R, None)]


async def test_second_request_is_a_cache_hit() -> None:
    agent, reg, _ = make()
    reg.add(R, "10.0.0.5", "inst-1")
    for _ in range(3):
        assert (await call(agent, req()))[0] == 200
    assert len(reg.calls) == 1
    assert agent.stats()["cache_hits"] == 2


async def test_hits_send_kept_bytes_with_each_request_id_and_the_miss_headers() -> None:
    """A hit's API-bound bytes are kept per request (less its ID): each request still
    carries its own ID in its place, and the same headers a miss sends."""
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1", "proj-1")

    def rid(n: int, *more: tuple[bytes, bytes]) -> Request:
        return req(extra=[(b"accept", b"*/*"), (b"x-openimds-request-id", b"id-%d" % n),
                          *more])

    for n in range(4):
        assert (await call(agent, rid(n)))[0] == 200
    # two IDs (not from our proxy, but possible on the socket): the first is the one logged
    # and both pass, as on the miss path
    assert (await call(agent, rid(9, (b"x-openimds-request-id", b"other"))))[0] == 200
    seen = [[(k.lower(), v) for k, v in hs] for _, _, hs, _ in api.seen]
    assert [dict(hs)[b"x-openimds-request-id"] for hs in seen[:4]] == [
        b"id-0", b"id-1", b"id-2", b"id-3"]
    for n, hs in enumerate(seen[:4]):
        assert [h for h in hs if h[0] != b"x-openimds-request-id"] == [
            h for h in seen[0] if h[0] != b"x-openimds-request-id"]  # the miss's headers
        assert (b"x-openimds-request-id", b"id-%d" % n) in hs
    assert [v for k, v in seen[4] if k == b"x-openimds-request-id"] == [b"id-9", b"other"]
    assert all(b"\x00" not in v for hs in seen for _, v in hs)
    # one path per request shape less its caller (not per ID), one source for the caller
    assert len(agent._paths) == 2 and len(agent._sources) == 1


async def test_a_kept_hit_follows_the_cache_when_the_caller_moves() -> None:
    """The hit memo names the caller, but the cache decides the instance: after the feed
    moves the caller's port, the same request shape carries the new identity."""
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1", "proj-1")
    r = req(extra=[(b"x-openimds-request-id", b"id-1")])
    for _ in range(3):
        assert (await call(agent, r)) == (200, b"hello inst-1")
    reg.ports.clear()
    reg.add(R, "10.0.0.5", "inst-2", "proj-2", pid="port-new")
    reg.revision = 6  # the lookup answers after the change: its answer is kept
    agent.apply_batch({"revision": 5, "changes": [
        {"revision": 5, "kind": "port", "op": "delete", "id": "port-inst-1",
         "attrs": {"ips": ["10.0.0.5"], "device_id": "inst-1"}}], "resync": False})
    for _ in range(2):  # the miss, then a hit from the replaced memo entry
        assert (await call(agent, r)) == (200, b"hello inst-2")
    sent = [dict((k.lower(), v) for k, v in hs) for _, _, hs, _ in api.seen]
    assert [h[b"x-instance-id"] for h in sent] == [b"inst-1"] * 3 + [b"inst-2"] * 2
    assert [h[b"x-tenant-id"] for h in sent][-1] == b"proj-2"
    assert sent[-1][b"x-instance-id-signature"] == sign_instance_id(
        SECRET.encode(), "inst-2").encode()
    assert len(agent._paths) == 1 and len(agent._sources) == 1
    assert agent.stats()["cache_hits"] == 3


async def test_a_hit_body_holding_the_id_marker_goes_whole() -> None:
    """The request-ID marker is only looked for in the head: a body may hold its bytes."""
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1", "proj-1")
    body = b"before\x00rid\x00after"
    for extra in ([], [(b"x-openimds-request-id", b"id-1")]):
        for _ in range(2):  # a miss, then a hit
            assert (await call(agent, req(method="POST", body=body, extra=extra)))[0] == 200
    assert [b for _, _, _, b in api.seen] == [body] * 4
    assert [dict((k.lower(), v) for k, v in hs).get(b"x-openimds-request-id")
            for _, _, hs, _ in api.seen] == [None, None, b"id-1", b"id-1"]


async def test_a_lookup_out_of_time_is_answered_503_and_left_to_finish() -> None:
    """The registry client's request is never cancelled (a cancelled httpx request queued
    for a pooled connection can lose that connection for good): the VM gets its 503 at
    registry_timeout, the lookup runs on to its own end, and the next one is answered."""
    agent, reg, api = make(registry_timeout=0.1)
    reg.add(R, "10.0.0.5", "inst-1")
    ends: list[str] = []
    lookup = reg.lookup

    async def recorded(ip: str, **kw: Any) -> dict[str, Any]:
        try:
            out = await lookup(ip, **kw)
        except asyncio.CancelledError:
            ends.append("cancelled")
            raise
        ends.append("finished")
        return out

    reg.lookup = recorded  # type: ignore[method-assign]
    reg.delay = 0.4
    t0 = asyncio.get_running_loop().time()
    resp = await settle(agent.handle(req()))
    assert isinstance(resp, Response) and resp.status == 503
    assert asyncio.get_running_loop().time() - t0 < 0.35 and ends == []
    await asyncio.sleep(0.5)
    assert ends == ["finished"]
    reg.delay = 0.0
    assert (await call(agent, req())) == (200, b"hello inst-1")


async def test_feed_down_asks_every_time_and_registry_down_is_503_for_the_unknown() -> None:
    agent, reg, api = make(feed=False)
    reg.add(R, "10.0.0.5", "inst-1")
    for _ in range(3):
        assert (await call(agent, req()))[0] == 200
    assert len(reg.calls) == 3
    reg.error = ConnectionError("refused")
    # a caller never resolved: 503, never a guess
    resp = await settle(agent.handle(req("10.0.0.6")))
    assert isinstance(resp, Response) and resp.status == 503
    assert ("Retry-After", "2") in list(resp.headers)
    # a known caller: nothing can change while no registry answers, so it is served
    asked = len(reg.calls)
    for _ in range(5):
        status, body = await call(agent, req())
        assert status == 200 and body == b"hello inst-1"
    assert len(reg.calls) <= asked + 1  # the failed lookup holds off the next ones
    assert agent.stats()["served_known_registry_down"] == 5
    # the registry answers again: asked again, and its answer wins
    reg.error = None
    reg.ports[(R, "10.0.0.5")] = [{"id": "p2", "network_id": "n1", "device_id": "inst-2",
                                   "project_id": "t1"}]
    agent.resolver._down_until = 0.0  # the hold window has passed
    status, body = await call(agent, req())
    assert status == 200 and body == b"hello inst-2"


async def test_not_found_and_ambiguous_are_404(caplog: pytest.LogCaptureFixture) -> None:
    agent, reg, _ = make()
    caplog.set_level(logging.WARNING)
    status, body = await call(agent, req(xff="10.0.0.9"))
    assert status == 404 and b"instance not found" in body
    assert "10.0.0.9" in caplog.text and R in caplog.text
    reg.add(R, "10.0.0.7", "a", pid="port-a")
    reg.add(R, "10.0.0.7", "b", pid="port-b")
    status, _ = await call(agent, req(xff="10.0.0.7"))
    assert status == 404
    assert "port-a" in caplog.text and "port-b" in caplog.text


@pytest.mark.parametrize("kw,status", [
    ({"router": R, "network": N}, 400),
    ({"router": None}, 400),
    ({"xff": "garbage"}, 400),
    ({"xff": None}, 400),
])
async def test_bad_headers_are_400_without_lookup(kw: dict[str, Any], status: int) -> None:
    agent, reg, _ = make()
    assert (await call(agent, req(**kw)))[0] == status
    assert reg.calls == []


@pytest.mark.parametrize("exc,status", [
    (UpstreamUnavailable("refused"), 503),
    (UpstreamTimeout("slow"), 504),
    (UpstreamProtocolError("garbled"), 502),
])
async def test_api_failures(exc: Exception, status: int) -> None:
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1")
    api.error = exc
    got, body = await call(agent, req())
    assert got == status and body.endswith(b"\n") and body.count(b"\n") == 1


@pytest.mark.parametrize("exc,status", [
    (UpstreamUnavailable("refused"), 503),
    (UpstreamTimeout("slow"), 504),
    (UpstreamProtocolError("garbled"), 502),
    (RuntimeError("bug"), 500),
])
async def test_api_failures_on_cache_hits(exc: Exception, status: int) -> None:
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1")
    assert (await call(agent, req()))[0] == 200
    api.error = exc
    out = agent.handle(req())
    assert isinstance(out, Deferred)
    got, body = await call(agent, req())
    assert got == status and body.count(b"\n") == 1
    await settle(out)
    assert agent.stats()["in_flight"] == 0


def test_send_raising_synchronously_still_answers() -> None:
    agent, reg, api = make()
    agent.cache.put(parse_caller_for("10.0.0.5"), Resolution("i", "t", "p", N), 1)

    def boom(*a: Any, **k: Any) -> None:
        raise RuntimeError("bug")

    api.send = boom  # type: ignore[method-assign]
    out = agent.handle(req())
    assert isinstance(out, Deferred) and isinstance(out._early, Response)
    assert out._early.status == 500 and agent.stats()["in_flight"] == 0


def parse_caller_for(ip: str) -> Caller:
    return Caller(ip, router_id=R)


@pytest.mark.parametrize("code", [401, 403, 404, 405, 409, 429, 500])
async def test_api_status_passed_through(code: int) -> None:
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1")
    api.status = code
    assert await call(agent, req()) == (code, b"hello inst-1")


async def test_api_404_on_cached_entry_rechecks_registry_once() -> None:
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "old")
    assert (await call(agent, req()))[0] == 200
    # the IP moves to a new instance, but the feed has not said so yet
    reg.ports.clear()
    reg.add(R, "10.0.0.5", "new")
    api.known = {"new"}
    assert await call(agent, req()) == (200, b"hello new")
    assert len(reg.calls) == 2
    assert (await call(agent, req()))[1] == b"hello new"
    assert len(reg.calls) == 2


async def test_saturation_is_503() -> None:
    agent, reg, api = make(max_concurrency=2)
    reg.add(R, "10.0.0.5", "inst-1")
    api.delay = 0.05
    assert (await call(agent, req()))[0] == 200  # cached: hits take the Deferred path
    first = [asyncio.ensure_future(settle(agent.handle(req()))) for _ in range(2)]
    await asyncio.sleep(0.01)
    late = agent.handle(req())
    assert isinstance(late, Response) and late.status == 503
    assert ("Retry-After", "2") in list(late.headers)
    await asyncio.gather(*first)
    assert agent.stats()["in_flight"] == 0


async def test_access_log_and_debug_never_show_signature(
        caplog: pytest.LogCaptureFixture) -> None:
    agent, reg, _ = make()
    reg.add(R, "10.0.0.5", "inst-1")
    caplog.set_level(logging.DEBUG)
    await call(agent, req(extra=[(b"x-instance-id-signature", b"spoofedsig")]))
    access = [r for r in caplog.records if r.name == "openimds.access"]
    assert len(access) == 1
    line = access[0].getMessage()
    assert "ip=10.0.0.5" in line and f"router={R}" in line and "instance=inst-1" in line
    assert "status=200" in line and "ms=" in line
    assert any(r.getMessage().startswith("Request: ") for r in caplog.records)
    sig = sign_instance_id(SECRET.encode(), "inst-1")
    assert sig not in caplog.text and "spoofedsig" not in caplog.text
    assert SECRET not in caplog.text


async def test_stats_only_for_local_clients() -> None:
    agent, _, _ = make()
    status, body = await call(agent, req(xff=None, router=None, path=STATS_PATH))
    assert status == 200 and b"registry_queries" in body
    status, _ = await call(agent, req(path=STATS_PATH, xff="10.0.0.5", router=None))
    assert status == 400


async def test_feed_batches_invalidate_and_resync() -> None:
    agent, reg, _ = make()
    reg.add(R, "10.0.0.5", "inst-1")
    await call(agent, req())
    agent.apply_batch({"revision": 3, "resync": False, "changes": [
        {"revision": 3, "kind": "port", "op": "delete", "id": "port-inst-1",
         "attrs": {"ips": ["10.0.0.5"], "network_id": N}}]})
    await call(agent, req())
    assert len(reg.calls) == 2
    agent.apply_batch({"revision": 9, "resync": True, "changes": []})
    reg.revision = 9
    await call(agent, req())
    assert len(reg.calls) == 3


@pytest.mark.parametrize("mode,user,group,want", [
    ("user", "x", "y", 0o644), ("group", "", "", 0o664), ("all", "", "", 0o666),
    ("deduce", "", "", 0o644), ("deduce", "root", "", 0o644), ("deduce", "0", "nogroup", 0o644),
    ("deduce", "12345", "", 0o664), ("deduce", "12345", "0", 0o664),
    ("deduce", "12345", "root", 0o664), ("deduce", "12345", "54321", 0o666),
])
def test_socket_mode(mode: str, user: str, group: str, want: int) -> None:
    assert socket_mode(mode, user, group, euid=0, egid=0) == want
