"""UpstreamPool.send: the callback-style request path the namespace proxy uses."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from openimds.errors import UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from openimds.http.client import UpstreamPool, UpstreamResponse
from openimds.http.server import Deferred, Request, Response, bind_tcp, bind_unix, serve


async def send(pool: UpstreamPool, target: str, **kw: float) -> UpstreamResponse | BaseException:
    fut: asyncio.Future[UpstreamResponse | BaseException] = (
        asyncio.get_running_loop().create_future())
    pool.send("GET", target, [(b"x-test", b"1")], b"", fut.set_result, **kw)
    return await asyncio.wait_for(fut, 5)


async def slow_or_echo(req: Request) -> Response:
    if req.path == "/slow":
        await asyncio.sleep(1)
    return Response(200, f"{req.path} {req.header(b'x-test')!r}".encode())


async def test_send_reuses_pooled_connections(tmp_path: Path) -> None:
    path = str(tmp_path / "up.sock")
    server = await serve(slow_or_echo, bind_unix(path))
    pool = UpstreamPool(unix_path=path, size=4)
    try:
        for i in range(5):
            resp = await send(pool, f"/p{i}")
            assert isinstance(resp, UpstreamResponse) and resp.status == 200
            assert resp.body == f"/p{i} b'1'".encode()
            assert resp.raw.endswith(resp.body)
        assert len(pool._idle) == 1  # one connection served them all
        # Several at once: bounded by the pool size, all answered.
        results = await asyncio.gather(*(send(pool, f"/c{i}") for i in range(10)))
        assert all(isinstance(r, UpstreamResponse) and r.status == 200 for r in results)
        assert len(pool._idle) <= 4
    finally:
        await pool.close()
        server.close()


async def test_send_timeout_then_recovers(tmp_path: Path) -> None:
    path = str(tmp_path / "up.sock")
    server = await serve(slow_or_echo, bind_unix(path))
    pool = UpstreamPool(unix_path=path, size=2, timeout_s=0.2)
    try:
        assert isinstance(await send(pool, "/warm"), UpstreamResponse)  # pooled now
        assert isinstance(await send(pool, "/slow"), UpstreamTimeout)
        resp = await send(pool, "/after")
        assert isinstance(resp, UpstreamResponse) and resp.status == 200
    finally:
        await pool.close()
        server.close()


async def test_send_retries_a_stale_connection_and_reports_down(tmp_path: Path) -> None:
    path = str(tmp_path / "up.sock")
    server = await serve(slow_or_echo, bind_unix(path))
    pool = UpstreamPool(unix_path=path, size=2)
    try:
        assert isinstance(await send(pool, "/warm"), UpstreamResponse)
        # The upstream restarts: the pooled connection is stale, the retry connects afresh.
        server.close()
        for conn in list(pool._idle):
            conn.transport.close()  # type: ignore[union-attr]
        await asyncio.sleep(0.05)
        server = await serve(slow_or_echo, bind_unix(path))
        resp = await send(pool, "/again")
        assert isinstance(resp, UpstreamResponse) and resp.status == 200
        server.close()
        await pool.close()
        Path(path).unlink()
        assert isinstance(await send(pool, "/down"), UpstreamUnavailable)
    finally:
        await pool.close()
        server.close()


@pytest.mark.parametrize("answer", [b"garbage\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 9"])
async def test_send_garbled_or_cut_answer(tmp_path: Path, answer: bytes) -> None:
    path = str(tmp_path / "bad.sock")

    async def bad(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(answer)
            await writer.drain()
            if not answer.startswith(b"garbage"):
                writer.close()
                return

    server = await asyncio.start_unix_server(bad, path)
    pool = UpstreamPool(unix_path=path, size=1)
    try:
        result = await send(pool, "/x")
        assert isinstance(result, UpstreamProtocolError)
    finally:
        await pool.close()
        server.close()


async def test_raw_only_pool_keeps_the_raw_answer(tmp_path: Path) -> None:
    path = str(tmp_path / "up.sock")
    server = await serve(slow_or_echo, bind_unix(path))
    pool = UpstreamPool(unix_path=path, size=2, raw_only=True)
    try:
        for target in ("/a", "/b"):  # connect, then the pooled fast path
            resp = await send(pool, target)
            assert isinstance(resp, UpstreamResponse) and resp.status == 200
            assert resp.headers == [] and resp.body == b""
            assert resp.raw.startswith(b"HTTP/1.1 200 ") and resp.raw.endswith(
                f"{target} b'1'".encode())
    finally:
        await pool.close()
        server.close()


async def test_deferred_responses_keep_pipelined_order(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()

    def handler(req: Request) -> Deferred:
        reply = Deferred()
        if req.path == "/now":
            reply.resolve(Response(200, b"now"))  # resolved before returning
        else:
            loop.call_later(0.05 if req.path == "/slow" else 0.0, reply.resolve,
                            Response(200, req.path.encode()))
        return reply

    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = await serve(handler, sock)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(f"GET {p} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
                              for p in ("/slow", "/fast", "/now"))
                     + b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        out = await asyncio.wait_for(reader.read(-1), 5)
        bodies = [chunk.split(b"\r\n\r\n", 1)[1][:5] for chunk in out.split(b"HTTP/1.1 ")[1:]]
        assert bodies == [b"/slow", b"/fast", b"now", b"/last"]
        writer.close()
        # A client gone before the answer: resolving later is harmless.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        await writer.drain()
        writer.close()
        await asyncio.sleep(0.1)
    finally:
        server.close()


async def test_send_queued_too_long_for_a_slot_is_unavailable(tmp_path: Path) -> None:
    path = str(tmp_path / "up.sock")
    server = await serve(slow_or_echo, bind_unix(path))
    pool = UpstreamPool(unix_path=path, size=1, connect_timeout_s=0.2, timeout_s=5)
    try:
        assert isinstance(await send(pool, "/warm"), UpstreamResponse)
        slow = asyncio.ensure_future(send(pool, "/slow"))  # holds the only slot for 1 s
        await asyncio.sleep(0.05)
        quick = asyncio.ensure_future(send(pool, "/queued"))
        assert isinstance(await slow, UpstreamResponse)
        assert isinstance(await quick, UpstreamUnavailable)
        resp = await send(pool, "/next")  # the slot is free again
        assert isinstance(resp, UpstreamResponse) and resp.status == 200
    finally:
        await pool.close()
        server.close()
