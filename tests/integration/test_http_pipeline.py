"""UpstreamPool with pipeline_depth > 1: send() calls of one loop iteration share a pooled
connection, over real sockets, against the lean server and hand-written upstreams."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from openimds.config import load_settings
from openimds.errors import UpstreamProtocolError, UpstreamTimeout
from openimds.http.client import UpstreamPool, UpstreamResponse
from openimds.http.server import Request, Response, bind_tcp, serve
from openimds.metadata.agent import make_pool
from openimds.metadata.proxy import pool_from_settings

Result = UpstreamResponse | BaseException


def start(pool: UpstreamPool, method: str, target: str, body: bytes = b"",
          timeout_s: float | None = None) -> asyncio.Future[Result]:
    """One send(); its result as a future (several calls in a row: one loop iteration)."""
    fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
    pool.send(method, target, [], body, fut.set_result, timeout_s=timeout_s)
    return fut


async def result(fut: asyncio.Future[Result]) -> Result:
    return await asyncio.wait_for(fut, 10)


def ok(res: Result) -> UpstreamResponse:
    assert isinstance(res, UpstreamResponse), res
    assert res.status == 200, res.raw
    return res


class Lean:
    """The lean server as upstream: answers `<path> <client port>`; /hold/NAME waits for
    `release(NAME)`; /big answers 4 KiB."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.events: dict[str, asyncio.Event] = {}

    def event(self, name: str) -> asyncio.Event:
        return self.events.setdefault(name, asyncio.Event())

    async def handler(self, req: Request) -> Response:
        self.seen.append(req.path)
        if req.path.startswith("/hold/"):
            await self.event(req.path[6:]).wait()
        if req.path == "/big":
            return Response(200, b"b" * 4096)
        assert req.peer is not None
        return Response(200, f"{req.path} {req.peer[1]}".encode())


@pytest.fixture
async def lean() -> AsyncIterator[tuple[Lean, int]]:
    up = Lean()
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = await serve(up.handler, sock)
    try:
        yield up, port
    finally:
        for event in up.events.values():
            event.set()
        server.close()


def port_of(res: Result) -> bytes:
    return ok(res).body.split()[1]


async def test_one_iteration_shares_one_connection_and_answers_in_order(
    lean: tuple[Lean, int],
) -> None:
    up, port = lean
    pool = UpstreamPool(host="127.0.0.1", port=port, size=8, pipeline_depth=8)
    try:
        warm = ok(await result(start(pool, "GET", "/warm")))
        futs = [start(pool, "GET", f"/r{i}") for i in range(6)]
        got = [ok(await result(f)) for f in futs]
        assert [r.body.split()[0] for r in got] == [f"/r{i}".encode() for i in range(6)]
        # All six went on the pooled connection the warm-up made: one batch, one connection.
        assert {port_of(r) for r in got} == {port_of(warm)}
        assert len(pool._idle) == 1
        # A second batch reuses it again, and the pool's headers/body are filled.
        head = await result(start(pool, "HEAD", "/h"))
        assert isinstance(head, UpstreamResponse) and head.body == b""
        futs = [start(pool, "GET", "/s1"), start(pool, "HEAD", "/s2"), start(pool, "GET", "/s3")]
        s1, s2, s3 = [await result(f) for f in futs]
        assert ok(s1).body.startswith(b"/s1 ") and ok(s3).body.startswith(b"/s3 ")
        assert isinstance(s2, UpstreamResponse) and s2.status == 200 and s2.body == b""
        assert (b"content-type", b"text/plain; charset=UTF-8") in ok(s1).headers
    finally:
        await pool.close()


async def test_a_slow_answer_holds_only_its_own_batch(lean: tuple[Lean, int]) -> None:
    up, port = lean
    pool = UpstreamPool(host="127.0.0.1", port=port, size=8, pipeline_depth=2)
    try:
        ok(await result(start(pool, "GET", "/warm")))
        slow = start(pool, "GET", "/hold/a")
        behind = start(pool, "GET", "/f1")  # same batch: waits behind the slow one
        others = [start(pool, "GET", "/f2"), start(pool, "GET", "/f3")]  # past the depth
        for fut in others:
            ok(await result(fut))
        # Sent in a later iteration: never queued behind the outstanding slow answer.
        ok(await result(start(pool, "GET", "/later")))
        await asyncio.sleep(0.05)
        assert not slow.done() and not behind.done()
        up.event("a").set()
        assert ok(await result(slow)).body.startswith(b"/hold/a")
        assert ok(await result(behind)).body.startswith(b"/f1")
        assert port_of(slow.result()) == port_of(behind.result())
    finally:
        await pool.close()


async def test_sends_queued_for_a_slot_leave_as_one_batch(lean: tuple[Lean, int]) -> None:
    up, port = lean
    pool = UpstreamPool(host="127.0.0.1", port=port, size=1, pipeline_depth=4)
    try:
        first = port_of(await result(start(pool, "GET", "/warm")))
        hold = start(pool, "GET", "/hold/q")
        await asyncio.sleep(0.05)  # the only slot is busy: the next four wait for it
        queued = [start(pool, "GET", f"/q{i}") for i in range(4)]
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in queued)
        up.event("q").set()
        assert port_of(await result(hold)) == first
        ports = {port_of(await result(f)) for f in queued}
        assert ports == {first}  # one connection throughout: the pool's size held
    finally:
        await pool.close()


async def test_an_oversized_answer_fails_alone(lean: tuple[Lean, int]) -> None:
    up, port = lean
    pool = UpstreamPool(host="127.0.0.1", port=port, size=4, pipeline_depth=4,
                        max_response_bytes=1024)
    try:
        ok(await result(start(pool, "GET", "/warm")))
        big, after = start(pool, "GET", "/big"), start(pool, "GET", "/after")
        res = await result(big)
        assert isinstance(res, UpstreamProtocolError) and "exceeds 1024 bytes" in str(res)
        ok(await result(after))  # retried alone: a GET may be sent again
        assert up.seen.count("/after") == 2
    finally:
        await pool.close()


async def test_each_request_keeps_its_own_timeout(lean: tuple[Lean, int]) -> None:
    up, port = lean
    pool = UpstreamPool(host="127.0.0.1", port=port, size=4, pipeline_depth=4, timeout_s=30)
    try:
        ok(await result(start(pool, "GET", "/warm")))
        hung = start(pool, "GET", "/hold/never", timeout_s=0.3)
        patient = start(pool, "GET", "/patient")  # behind it, with the pool's 30 s
        res = await result(hung)
        assert isinstance(res, UpstreamTimeout) and "0.3s" in str(res)
        # The connection was closed with the timeout; the one behind, not yet late, is
        # retried alone and answered.
        assert ok(await result(patient)).body.startswith(b"/patient")
        # A short timeout already answered does not cut short the one behind it.
        quick = start(pool, "GET", "/quick", timeout_s=0.3)
        held = start(pool, "GET", "/hold/t")
        ok(await result(quick))
        await asyncio.sleep(0.6)  # past the answered one's deadline
        assert not held.done()
        up.event("t").set()
        assert ok(await result(held)).body.startswith(b"/hold/t")
        assert up.seen.count("/hold/t") == 1
        assert port_of(quick.result()) == port_of(held.result())  # they shared a batch
    finally:
        await pool.close()


# -- hand-written upstreams: answers the lean server never sends ---------------------------

Plan = Callable[[int, int, str, str], Awaitable[bytes | None]]


def split_requests(buf: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """(method, path) of each complete request in `buf`, and the rest."""
    out = []
    while (end := buf.find(b"\r\n\r\n")) >= 0:
        head = buf[:end].decode()
        length = 0
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.lower() == "content-length":
                length = int(value)
        if len(buf) < end + 4 + length:
            break
        method, path, _ = head.split(" ", 2)
        out.append((method, path))
        buf = buf[end + 4 + length:]
    return out, buf


def plain(body: str) -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode()


class Scripted:
    """An upstream whose answer to each request is chosen by `plan(connection number,
    request number on it, method, path)`: bytes to write, or None to close at once."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.seen: Counter[str] = Counter()
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn, count, buf = self.connections, 0, b""
        try:
            while chunk := await reader.read(65536):
                reqs, buf = split_requests(buf + chunk)
                self.seen.update(f"{method} {path}" for method, path in reqs)  # all received
                for method, path in reqs:
                    count += 1
                    out = await self.plan(conn, count, method, path)
                    if out is None:
                        return
                    writer.write(out)
        finally:
            writer.close()


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[[Plan], Awaitable[tuple[Scripted, int]]]]:
    servers: list[asyncio.Server] = []

    async def make(plan: Plan) -> tuple[Scripted, int]:
        up = Scripted(plan)
        server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
        servers.append(server)
        return up, server.sockets[0].getsockname()[1]

    yield make
    for server in servers:
        server.close()


async def test_connection_closed_mid_batch_retries_what_it_held_and_a_post_goes_alone(
    scripted: Callable[[Plan], Awaitable[tuple[Scripted, int]]],
) -> None:
    async def plan(conn: int, count: int, method: str, path: str) -> bytes | None:
        if conn == 1 and count == 3:
            return None  # answered the warm-up and the batch's first, then dies
        return plain(f"{method} {path} {conn}")

    up, port = await scripted(plan)
    pool = UpstreamPool(host="127.0.0.1", port=port, size=4, pipeline_depth=4)
    try:
        ok(await result(start(pool, "GET", "/warm")))
        futs = [start(pool, "GET", "/a"), start(pool, "GET", "/b"),
                start(pool, "HEAD", "/d"), start(pool, "POST", "/c", b"once")]
        a, b, d, c = [await result(f) for f in futs]
        assert ok(a).raw.endswith(b"GET /a 1")
        ok(b), ok(d)
        assert up.seen["GET /b"] == 2 and up.seen["HEAD /d"] == 2  # retried once each
        # The POST was not in the batch that died: sent alone, once, and answered.
        assert ok(c).body.startswith(b"POST /c") and up.seen["POST /c"] == 1
    finally:
        await pool.close()


async def test_a_batch_closed_before_any_answer_byte_keeps_the_stale_rule(
    scripted: Callable[[Plan], Awaitable[tuple[Scripted, int]]],
) -> None:
    async def plan(conn: int, count: int, method: str, path: str) -> bytes | None:
        if conn == 1 and count == 2:
            return None  # the pooled connection dies with the whole batch unanswered
        return plain(f"{method} {path} {conn}")

    up, port = await scripted(plan)
    pool = UpstreamPool(host="127.0.0.1", port=port, size=4, pipeline_depth=4)
    try:
        ok(await result(start(pool, "GET", "/warm")))
        futs = [start(pool, "GET", "/first"), start(pool, "GET", "/second"),
                start(pool, "POST", "/third", b"x")]
        first, second, third = [await result(f) for f in futs]
        # Both GETs of the dead batch are sent again, alone; the POST never shared it.
        assert ok(first).body.startswith(b"GET /first") and up.seen["GET /first"] == 2
        assert ok(second).body.startswith(b"GET /second") and up.seen["GET /second"] == 2
        assert ok(third).body.startswith(b"POST /third") and up.seen["POST /third"] == 1
    finally:
        await pool.close()


async def test_a_chunked_answer_ends_pipelining_on_that_connection(
    scripted: Callable[[Plan], Awaitable[tuple[Scripted, int]]],
) -> None:
    async def plan(conn: int, count: int, method: str, path: str) -> bytes | None:
        if path.startswith("/chunk"):
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"5\r\nhello\r\n0\r\n\r\n")
        return plain(f"{method} {path} {conn}")

    up, port = await scripted(plan)
    pool = UpstreamPool(host="127.0.0.1", port=port, size=4, pipeline_depth=4)
    try:
        ok(await result(start(pool, "GET", "/warm")))
        futs = [start(pool, "GET", "/x"), start(pool, "GET", "/chunk"), start(pool, "GET", "/y")]
        x, chunk, y = [await result(f) for f in futs]
        assert ok(x).raw.endswith(b"GET /x 1")
        # Not framed: that connection is dropped and the GETs left are sent again, alone,
        # where the full parser reads the chunked answer.
        assert ok(chunk).body == b"hello" and up.seen["GET /chunk"] == 2
        assert ok(y).body.startswith(b"GET /y") and up.seen["GET /y"] == 2
        # A POST is never batched: its chunked answer is read by the full parser, once.
        ok(await result(start(pool, "GET", "/warm2")))
        futs = [start(pool, "GET", "/z"), start(pool, "POST", "/chunk-post", b"p")]
        z, post = [await result(f) for f in futs]
        ok(z)
        assert ok(post).body == b"hello" and up.seen["POST /chunk-post"] == 1
    finally:
        await pool.close()


async def test_bytes_past_the_last_answer_drop_the_connection(
    scripted: Callable[[Plan], Awaitable[tuple[Scripted, int]]],
) -> None:
    async def plan(conn: int, count: int, method: str, path: str) -> bytes | None:
        extra = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray" if path == "/two" else b""
        return plain(f"{path} {conn}") + extra

    up, port = await scripted(plan)
    pool = UpstreamPool(host="127.0.0.1", port=port, size=4, pipeline_depth=4)
    try:
        ok(await result(start(pool, "GET", "/warm")))
        one, two = start(pool, "GET", "/one"), start(pool, "GET", "/two")
        assert ok(await result(one)).raw.endswith(b"/one 1")
        assert ok(await result(two)).raw.endswith(b"/two 1")
        # The stray answer put that connection out of step: the next request gets a new one.
        assert ok(await result(start(pool, "GET", "/next"))).raw.endswith(b"/next 2")
    finally:
        await pool.close()


async def test_a_head_seen_again_frames_by_its_own_length_and_never_a_head_answer(
    scripted: Callable[[Plan], Awaitable[tuple[Scripted, int]]],
) -> None:
    # The pool reuses the framing of the head a connection framed last when the same bytes
    # start the next answer: a longer Content-Length of the same digits, and the answer
    # to a HEAD (the same head, no body), must each still frame by their own bytes.
    async def plan(conn: int, count: int, method: str, path: str) -> bytes | None:
        body = {"/long": "same-same-same"}.get(path, "same")
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        return head if method == "HEAD" else head + body.encode()

    up, port = await scripted(plan)
    pool = UpstreamPool(host="127.0.0.1", port=port, size=4, pipeline_depth=8, raw_only=True)
    try:
        ok(await result(start(pool, "GET", "/warm")))
        futs = [start(pool, method, path) for method, path in (
            ("GET", "/a"), ("GET", "/b"), ("HEAD", "/h"), ("GET", "/c"), ("GET", "/long"),
            ("GET", "/d"), ("HEAD", "/h2"), ("GET", "/e"))]
        got = [ok(await result(f)).raw for f in futs]
        four = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
        assert got == [four + b"same", four + b"same", four, four + b"same",
                       b"HTTP/1.1 200 OK\r\nContent-Length: 14\r\n\r\nsame-same-same",
                       four + b"same", four, four + b"same"]
        # All framed in step: one connection, each request sent once, still pooled.
        assert up.connections == 1 and set(up.seen.values()) == {1}
        assert len(pool._idle) == 1
    finally:
        await pool.close()


def test_the_hops_pools_take_the_setting_and_held_requests_never_pipeline() -> None:
    settings = load_settings(environ={
        "OPENIMDS_METADATA_AGENT_UPSTREAM_PIPELINE_DEPTH": "5",
        "OPENIMDS_PROXY_UPSTREAM_PIPELINE_DEPTH": "3"})
    assert make_pool(settings).pipeline_depth == 5
    assert pool_from_settings(settings).pipeline_depth == 3
    assert make_pool(settings, long_poll=True).pipeline_depth == 1
    assert pool_from_settings(settings, long_poll=True).pipeline_depth == 1
    with pytest.raises(ValueError, match="pipeline_depth must be 1-32"):
        UpstreamPool(unix_path="/nowhere", pipeline_depth=33)
