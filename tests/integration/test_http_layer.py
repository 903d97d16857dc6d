"""The lean HTTP layer over real sockets: framing, limits, pipelining, pooled upstreams."""

from __future__ import annotations

import asyncio
import socket

import pytest

from openimds.errors import (
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from openimds.http.client import UpstreamPool
from openimds.http.server import (
    Limits,
    RawResponse,
    Request,
    Response,
    TimeoutCounts,
    bind_tcp,
    bind_unix,
    error_response,
    serve,
)


async def echo(req: Request) -> Response:
    await asyncio.sleep(0)
    body = f"{req.method} {req.path} q={req.query} n={len(req.body)}".encode()
    return Response(200, body, headers=[("X-Seen-Host", (req.header(b"host") or b"").decode())])


def sync_handler(req: Request) -> Response:
    if req.path == "/raw":
        return RawResponse(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")  # type: ignore[return-value]
    if req.path == "/boom":
        raise RuntimeError("bug")
    return Response(200, req.path.encode())


async def start(handler, limits: Limits | None = None):
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = await serve(handler, sock, limits)
    return server, port


async def exchange(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = await asyncio.wait_for(reader.read(-1), 5) if read_until_close else b""
    writer.close()
    return out


async def test_keepalive_and_pipelining_keep_order() -> None:
    server, port = await start(echo)
    try:
        reqs = b"".join(
            f"GET /p{i}?x={i} HTTP/1.1\r\nHost: h\r\n\r\n".encode() for i in range(5)
        ) + b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        out = await exchange(port, reqs)
        bodies = [part for part in out.split(b"\r\n\r\n")[1:]]
        assert out.count(b"HTTP/1.1 200 OK") == 6
        order = [b.split(b"HTTP/1.1")[0] for b in bodies]
        assert order[:5] == [f"GET /p{i} q=x={i} n=0".encode() for i in range(5)]
        assert out.rstrip().endswith(b"GET /last q= n=0")
        assert b"Connection: close" in out
    finally:
        server.close()


class _CountingTransport:
    """The real transport, with its writes counted (everything else passes through)."""

    def __init__(self, transport: asyncio.Transport, writes: list[int]) -> None:
        self._t = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        self._writes.append(len(data))
        self._t.write(data)

    def __getattr__(self, name: str):
        return getattr(self._t, name)


async def test_pipelined_answers_of_one_read_leave_in_one_write(monkeypatch) -> None:
    # A pipelining client's batch arrives in one read; answering each request with its own
    # write was a syscall per request (wrk -s pipeline: most of the server's CPU).
    from openimds.http import server as server_mod

    writes: list[int] = []
    original = server_mod.HttpProtocol.connection_made

    def counted(self, transport) -> None:
        original(self, _CountingTransport(transport, writes))

    monkeypatch.setattr(server_mod.HttpProtocol, "connection_made", counted)
    server, port = await start(sync_handler)
    try:
        n = 16
        reqs = b"".join(f"GET /p{i} HTTP/1.1\r\nHost: h\r\n\r\n".encode() for i in range(n))
        reqs += b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        out = await exchange(port, reqs)
        assert out.count(b"HTTP/1.1 200 OK") == n + 1
        bodies = [part.split(b"HTTP/1.1")[0] for part in out.split(b"\r\n\r\n")[1:]]
        assert bodies == [f"/p{i}".encode() for i in range(n)] + [b"/last"]
        # One read carries all 17 requests (a few hundred bytes, one send on loopback);
        # allow it to arrive in a few reads, never one write per answer.
        assert 1 <= len(writes) <= 4, writes
        assert sum(writes) == len(out)
    finally:
        server.close()


async def test_sync_handler_raw_and_errors() -> None:
    server, port = await start(sync_handler)
    try:
        out = await exchange(port, b"GET /raw HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 201 Created") and out.endswith(b"ok")
        # a relayed answer says it closes, as a rendered one does (RFC 9112 section 9.6)
        assert b"\r\nConnection: close\r\n" in out
        assert b"\r\nConnection: close\r\n" in await exchange(
            port, b"GET /abc HTTP/1.1\r\nConnection: close\r\n\r\n")
        out = await exchange(port, b"GET /boom HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 500 ")
        out = await exchange(port, b"HEAD /abc HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert b"Content-Length: 4" in out and out.endswith(b"\r\n\r\n")
    finally:
        server.close()


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n" + b"X-Big: " + b"a" * 20000 + b"\r\n\r\n", b"431"),
        (b"POST / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n", b"413"),
        (b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
    ],
)
async def test_bad_requests_get_a_status_and_a_reason(data: bytes, status: bytes) -> None:
    server, port = await start(echo)
    try:
        out = await exchange(port, data)
        assert out.startswith(b"HTTP/1.1 " + status), out[:80]
        assert b"Connection: close" in out
        assert out.split(b"\r\n\r\n", 1)[1].strip()  # a one-line reason
    finally:
        server.close()


def ended(counts: TimeoutCounts) -> tuple[int, int, int, int]:
    """(write, request, idle, silent)."""
    return counts.write, counts.request, counts.idle, counts.silent


async def test_slow_client_times_out_with_408() -> None:
    counts = TimeoutCounts()
    server, port = await start(echo, Limits(request_timeout_s=0.3, timeouts=counts))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never finishes
        out = await asyncio.wait_for(reader.read(-1), 5)
        assert out.startswith(b"HTTP/1.1 408")
        writer.close()
        assert ended(counts) == (0, 1, 0, 0)
    finally:
        server.close()


async def test_a_request_begun_on_an_idle_connection_gets_the_whole_request_timeout() -> None:
    # The request timeout starts when a request's first bytes arrive, not at the answer
    # before it: a head begun late in a short keep-alive wait is not cut off by that wait.
    counts = TimeoutCounts()
    server, port = await start(echo, Limits(keepalive_timeout_s=0.3, request_timeout_s=1.5,
                                            timeouts=counts))
    loop = asyncio.get_running_loop()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"GET /one"), 5)
        assert first.startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.15)
        writer.write(b"GET /two HTTP/1.1\r\nHost: x\r\n")  # never finishes
        t0 = loop.time()
        out = await asyncio.wait_for(reader.read(-1), 5)
        waited = loop.time() - t0
        assert out.startswith(b" q= n=0")  # the rest of the first answer
        assert b"HTTP/1.1 408" in out
        assert 1.4 <= waited < 1.5 + 0.25 + 0.5  # the request timeout, a wheel tick late at most
        writer.close()
        assert ended(counts) == (0, 1, 0, 0)
    finally:
        server.close()


async def test_idle_keepalive_closes_silently() -> None:
    counts = TimeoutCounts()
    server, port = await start(echo, Limits(keepalive_timeout_s=0.2, timeouts=counts))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        out = await asyncio.wait_for(reader.read(-1), 5)  # until the idle close
        assert out.count(b"HTTP/1.1 ") == 1 and b"408" not in out
        writer.close()
        assert ended(counts) == (0, 0, 1, 0)  # answered, then quiet: the routine expiry
    finally:
        server.close()


async def test_a_connection_that_never_sends_a_byte_is_counted_silent() -> None:
    # Not the keep-alive expiry (`idle`) an operator ignores: the one to alert on.
    counts = TimeoutCounts()
    server, port = await start(echo, Limits(request_timeout_s=0.2, keepalive_timeout_s=60,
                                            timeouts=counts))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        out = await asyncio.wait_for(reader.read(-1), 5)  # until the server closes it
        assert out == b""  # closed without an unprompted 408
        writer.close()
        assert ended(counts) == (0, 0, 0, 1)
    finally:
        server.close()


async def test_a_closing_answer_leaves_with_the_fin() -> None:
    """The last answer on a connection and the server's FIN leave in one segment: when the
    client's read returns the answer, the connection is already half-closed (CLOSE_WAIT), so
    the client is never the first to close and TIME_WAIT stays on the server's side."""
    server, port = await start(sync_handler)
    close_wait = 8  # TCP_CLOSE_WAIT in the kernel's tcp_info.tcpi_state
    loop = asyncio.get_running_loop()

    def one(request: bytes) -> tuple[bytes, int]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(request)
            data = sock.recv(65536)
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        return data, state

    try:
        for path, status in ((b"/x", b"200"), (b"/raw", b"201")):  # a Response, a RawResponse
            for _ in range(20):
                data, state = await loop.run_in_executor(None, one, (
                    b"GET " + path + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"))
                assert data.startswith(b"HTTP/1.1 " + status) and b"Connection: close" in data
                assert state == close_wait, (path, state)
    finally:
        server.close()


async def test_pool_reuses_connections_and_relays_raw() -> None:
    peers: set[tuple[str, int] | None] = set()

    async def recording(req: Request) -> Response:
        peers.add(req.peer)
        return await echo(req)

    server, port = await start(recording)
    pool = UpstreamPool(host="127.0.0.1", port=port, size=4)
    try:
        results = await asyncio.gather(*[
            pool.request("GET", f"/r{i}", [(b"Host", b"vm")]) for i in range(40)
        ])
        assert [r.status for r in results] == [200] * 40
        assert results[7].body == b"GET /r7 q= n=0"
        assert results[7].raw.startswith(b"HTTP/1.1 200 OK")
        assert results[7].raw.endswith(b"GET /r7 q= n=0")
        assert results[0].header(b"x-seen-host") == b"vm"
        assert 1 <= len(peers) <= 4  # 40 requests over at most `size` connections
        post = await pool.request("POST", "/p", [], b"x" * 100)
        assert post.body == b"POST /p q= n=100"
        head = await pool.request("HEAD", "/h")
        assert head.status == 200 and head.body == b""
        after_head = await pool.request("GET", "/again")
        assert after_head.body == b"GET /again q= n=0"
    finally:
        await pool.close()
        server.close()


async def test_pool_retries_a_stale_idle_connection(tmp_path) -> None:
    path = str(tmp_path / "stale.sock")
    server = await serve(echo, bind_unix(path), Limits(keepalive_timeout_s=0.1))
    pool = UpstreamPool(unix_path=path, size=2)
    try:
        assert (await pool.request("GET", "/one")).status == 200
        await asyncio.sleep(0.3)  # the server closes the idle keep-alive connection
        assert (await pool.request("GET", "/two")).body == b"GET /two q= n=0"
    finally:
        await pool.close()
        server.close()


async def test_pool_failures_map_to_503_504_502(tmp_path) -> None:
    missing = UpstreamPool(unix_path=str(tmp_path / "nothing.sock"))
    with pytest.raises(UpstreamUnavailable):
        await missing.request("GET", "/")
    assert UpstreamUnavailable("x").status == 503

    async def hang(req: Request) -> Response:
        await asyncio.sleep(30)
        return error_response(500, "never")

    server, port = await start(hang)
    pool = UpstreamPool(host="127.0.0.1", port=port, timeout_s=0.2)
    with pytest.raises(UpstreamTimeout):
        await pool.request("GET", "/")
    server.close()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"THIS IS NOT HTTP\r\n\r\n")
        await writer.drain()
        writer.close()

    gsrv = await asyncio.start_server(garbage, "127.0.0.1", 0)
    gport = gsrv.sockets[0].getsockname()[1]
    pool = UpstreamPool(host="127.0.0.1", port=gport)
    with pytest.raises(UpstreamProtocolError):
        await pool.request("GET", "/")
    gsrv.close()


async def test_pool_retries_a_refused_connect_but_never_a_sent_request() -> None:
    """connect_retries: a refused connect (nothing sent) is tried again 1 s later, through
    both request() and send(); a request already written on a connection the upstream then
    dropped is not, though the upstream listens again within the retry window."""
    seen: list[bytes] = []
    drop_next = False

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            seen.append(data)
            if drop_next:
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens: connects are refused
    pool = UpstreamPool(host="127.0.0.1", port=port, connect_retries=3)
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []

    async def listen_later() -> None:
        await asyncio.sleep(0.5)
        servers.append(await asyncio.start_server(upstream, "127.0.0.1", port))

    try:
        waiting = asyncio.ensure_future(listen_later())
        assert (await pool.request("GET", "/late")).status == 200
        await waiting
        assert len(seen) == 1
        servers.pop().close()
        await pool.close()
        got: asyncio.Future[object] = loop.create_future()
        waiting = asyncio.ensure_future(listen_later())
        pool.send("PUT", "/late", [], b"x", got.set_result)
        assert getattr(await got, "status", None) == 200
        await waiting
        assert len(seen) == 2 and seen[1].startswith(b"PUT /late")

        drop_next = True  # the next request is read, then the connection and port go
        servers[0].close()
        with pytest.raises(UpstreamUnavailable) as failed:
            waiting = asyncio.ensure_future(listen_later())
            await pool.request("POST", "/once", [], b"y")
        assert not isinstance(failed.value, UpstreamRefused)
        await waiting
        await asyncio.sleep(1.5)  # past a retry's turn: the back upstream sees nothing
        assert len(seen) == 3 and seen[2].startswith(b"POST /once")
    finally:
        await pool.close()
        for server in servers:
            server.close()


def test_unix_socket_mode_and_stale_file(tmp_path) -> None:
    path = tmp_path / "d" / "s.sock"
    first = bind_unix(str(path), mode=0o664, backlog=16)
    first.close()
    second = bind_unix(str(path), mode=0o644)  # a stale socket file is replaced
    try:
        assert (path.stat().st_mode & 0o777) == 0o644
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(str(path))
    finally:
        second.close()
