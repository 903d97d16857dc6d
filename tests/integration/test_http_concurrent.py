"""Pipelined safe requests start together, over real sockets: answers still leave in request
order (those ready together in one write); a request that is not safe runs alone."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from openimds.http import server as server_mod
from openimds.http.server import (
    MAX_PIPELINE,
    AnyResponse,
    Deferred,
    Request,
    Response,
    bind_tcp,
    serve,
)


class _LoggedTransport:
    """The real transport, each write logged as the answer bodies it carries."""

    def __init__(self, transport: asyncio.Transport, log: list[str]) -> None:
        self._t = transport
        self._log = log

    def write(self, data: bytes) -> None:
        bodies = [part.split(b"HTTP/1.1")[0].decode() for part in data.split(b"\r\n\r\n")[1:]]
        self._log.append("write " + ",".join(bodies))
        self._t.write(data)

    def __getattr__(self, name: str):
        return getattr(self._t, name)


class _Gated:
    """A handler: /gate/* awaits its gate (a task), /deferred/* a Deferred resolved on the
    next loop iteration, anything else answers at once; every start is logged."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.gates: dict[str, asyncio.Event] = {}

    def gate(self, path: str) -> asyncio.Event:
        return self.gates.setdefault(path, asyncio.Event())

    def __call__(self, req: Request) -> AnyResponse | Awaitable[AnyResponse] | Deferred:
        self.log.append(f"start {req.method} {req.path}")
        if req.path.startswith("/gate/"):
            return self._gated(req.path)
        if req.path.startswith("/deferred/"):
            deferred = Deferred()
            asyncio.get_running_loop().call_soon(deferred.resolve, Response(200, req.path.encode()))
            return deferred
        return Response(200, req.path.encode())

    async def _gated(self, path: str) -> Response:
        await self.gate(path).wait()
        self.log.append(f"done {path}")
        return Response(200, path.encode())


@pytest.fixture
def logged(monkeypatch) -> list[str]:
    log: list[str] = []
    original = server_mod.HttpProtocol.connection_made

    def wrapped(self, transport) -> None:
        original(self, _LoggedTransport(transport, log))

    monkeypatch.setattr(server_mod.HttpProtocol, "connection_made", wrapped)
    return log


async def _until(cond: Callable[[], bool], what: str) -> None:
    # Generous: on a loaded CI machine the loop may be slow; the feature makes it happen
    # within a few iterations, its absence never.
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


async def _connect(handler: _Gated):
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = await serve(handler, sock)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return server, reader, writer


def _get(path: str, method: str = "GET", *, last: bool = False, body: bytes = b"") -> bytes:
    close = "Connection: close\r\n" if last else ""
    length = f"Content-Length: {len(body)}\r\n" if body or method == "POST" else ""
    return f"{method} {path} HTTP/1.1\r\nHost: h\r\n{length}{close}\r\n".encode() + body


def _bodies(out: bytes) -> list[str]:
    return [part.split(b"HTTP/1.1")[0].decode() for part in out.split(b"\r\n\r\n")[1:]]


async def test_pipelined_gets_run_together_and_are_answered_in_order(logged) -> None:
    handler = _Gated(logged)
    server, reader, writer = await _connect(handler)
    try:
        writer.write(_get("/gate/a") + _get("/deferred/b") + _get("/plain/c", "HEAD")
                     + _get("/gate/d") + _get("/plain/e") + _get("/plain/z", last=True))
        await writer.drain()
        # Every one started while /gate/a still waits (one at a time, /deferred/b would
        # start only after /gate/a's answer).
        await _until(lambda: "start GET /plain/e" in logged, "all five started")
        assert [e for e in logged if e.startswith("start")] == [
            "start GET /gate/a", "start GET /deferred/b", "start HEAD /plain/c",
            "start GET /gate/d", "start GET /plain/e"]  # /plain/z closes: it waits
        for _ in range(5):
            await asyncio.sleep(0)  # /deferred/b resolves meanwhile: held, not written
        assert not any(e.startswith("write") for e in logged), logged
        handler.gate("/gate/d").set()  # the later one finishes first
        await _until(lambda: "done /gate/d" in logged, "/gate/d finished")
        for _ in range(5):
            await asyncio.sleep(0)
        assert not any(e.startswith("write") for e in logged), logged
        handler.gate("/gate/a").set()
        out = await asyncio.wait_for(reader.read(-1), 5)
        # Request order, HEAD without a body; the answers ready together in one write.
        # (/plain/z starts once the five are answered, its answer joins their write.)
        assert out.count(b"HTTP/1.1 200 OK") == 6
        assert b"Content-Length: 8\r\n\r\nHTTP/1.1 200" in out  # the HEAD: head only
        expected = ["/gate/a", "/deferred/b", "", "/gate/d", "/plain/e", "/plain/z"]
        assert [e for e in logged if e.startswith("write")] == ["write " + ",".join(expected)]
        assert _bodies(out) == expected
        assert logged.index("done /gate/d") < logged.index("done /gate/a")
    finally:
        writer.close()
        server.close()


async def test_a_post_waits_for_the_gets_before_it_and_the_gets_after_wait_for_it(
    logged,
) -> None:
    handler = _Gated(logged)
    server, reader, writer = await _connect(handler)
    try:
        writer.write(_get("/gate/a") + _get("/gate/b") + _get("/deferred/p", "POST", body=b"x")
                     + _get("/gate/c") + _get("/plain/d") + _get("/plain/z", last=True))
        await writer.drain()
        await _until(lambda: "start GET /gate/b" in logged, "both GETs started")
        for _ in range(5):
            await asyncio.sleep(0)
        assert logged == ["start GET /gate/a", "start GET /gate/b"]  # the POST waits
        handler.gate("/gate/b").set()
        await _until(lambda: "done /gate/b" in logged, "/gate/b finished")
        for _ in range(5):
            await asyncio.sleep(0)
        assert "start POST /deferred/p" not in logged  # /gate/a is not answered yet
        handler.gate("/gate/a").set()
        await _until(lambda: "start GET /gate/c" in logged, "/gate/c started")
        handler.gate("/gate/c").set()
        out = await asyncio.wait_for(reader.read(-1), 5)
        assert _bodies(out) == ["/gate/a", "/gate/b", "/deferred/p", "/gate/c", "/plain/d",
                                "/plain/z"]
        # The POST started once both GETs had their answers (written with the POST's start,
        # in the same callback: one write), the GETs behind it once the POST's was written;
        # those two then ran together.
        assert logged == [
            "start GET /gate/a", "start GET /gate/b", "done /gate/b", "done /gate/a",
            "start POST /deferred/p", "write /gate/a,/gate/b", "write /deferred/p",
            "start GET /gate/c", "start GET /plain/d", "done /gate/c",
            "start GET /plain/z", "write /gate/c,/plain/d,/plain/z"], logged
    finally:
        writer.close()
        server.close()


async def test_at_most_max_pipeline_start_together(logged) -> None:
    handler = _Gated(logged)
    server, reader, writer = await _connect(handler)
    n = MAX_PIPELINE + 8
    try:
        writer.write(b"".join(_get(f"/gate/{i}", last=i == n - 1) for i in range(n)))
        await writer.drain()
        await _until(lambda: len(logged) >= MAX_PIPELINE, "the first batch started")
        for _ in range(5):
            await asyncio.sleep(0)
        assert len(logged) == MAX_PIPELINE, logged
        for i in range(n):
            handler.gate(f"/gate/{i}").set()
        out = await asyncio.wait_for(reader.read(-1), 5)
        assert _bodies(out) == [f"/gate/{i}" for i in range(n)]
        starts = [e for e in logged if e.startswith("start")]
        assert starts == [f"start GET /gate/{i}" for i in range(n)]
    finally:
        writer.close()
        server.close()
