"""`http.sockets`: connections served off their accepted sockets, over real TCP sockets."""

from __future__ import annotations

import asyncio
import socket
import time

from openimds.http.server import HttpProtocol, Limits, RawResponse, Request, Response, bind_tcp
from openimds.http.sockets import Acceptor

BIG = bytes(range(256)) * 16384  # 4 MiB: far more than a socket buffer takes at once
CLOSE_WAIT = 8  # TCP_CLOSE_WAIT in the kernel's tcp_info.tcpi_state


def handler(req: Request) -> Response | RawResponse:
    if req.path == "/big":
        return Response(200, BIG, content_type="application/octet-stream")
    if req.path == "/raw":
        return RawResponse(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    return Response(200, f"{req.method} {req.path} {req.peer is not None}".encode())


async def start(limits: Limits | None = None) -> tuple[Acceptor, int]:
    loop = asyncio.get_running_loop()
    sock = bind_tcp("127.0.0.1", 0)
    port = sock.getsockname()[1]
    lim = limits or Limits()
    return Acceptor(loop, sock, lambda: HttpProtocol(handler, lim, loop)), port


def read_answer(sock: socket.socket) -> tuple[bytes, bytes]:
    """One answer framed by Content-Length: (head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n")
                      if ln.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    assert len(body) == length
    return head, body


async def test_keep_alive_requests_and_an_answer_bigger_than_the_socket_buffer() -> None:
    acceptor, port = await start()
    loop = asyncio.get_running_loop()

    def client() -> list[tuple[bytes, bytes]]:
        out = []
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n")
            out.append(read_answer(sock))
            time.sleep(0.1)  # the next request arrives while the socket waits in the loop
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: h\r\n\r\n")
            time.sleep(0.2)  # the server fills the socket buffer and keeps the rest
            out.append(read_answer(sock))
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            out.append(read_answer(sock))
            assert sock.recv(1) == b""  # closed after the last answer, all of it sent
        return out

    try:
        answers = await loop.run_in_executor(None, client)
    finally:
        acceptor.close()
    assert answers[0] == (answers[0][0], b"GET /a True")
    assert answers[0][0].startswith(b"HTTP/1.1 200 ")
    assert answers[1][1] == BIG and answers[2][1] == BIG
    assert b"Connection: close" in answers[2][0]


async def test_a_closing_answer_leaves_with_the_fin() -> None:
    """As with the loop's transports (test_http_layer): when the client reads the last
    answer the connection is already half-closed, so TIME_WAIT stays on the server."""
    acceptor, port = await start()
    loop = asyncio.get_running_loop()

    def one(path: bytes) -> tuple[bytes, int]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            data = sock.recv(65536)
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        return data, state

    try:
        for path, status in ((b"/x", b"200"), (b"/raw", b"201")):
            for _ in range(20):
                data, state = await loop.run_in_executor(None, one, path)
                assert data.startswith(b"HTTP/1.1 " + status) and b"Connection: close" in data
                assert state == CLOSE_WAIT, (path, state)
    finally:
        acceptor.close()


async def test_half_close_timeout_and_a_closed_listener() -> None:
    acceptor, port = await start(Limits(request_timeout_s=0.5, keepalive_timeout_s=0.5))
    loop = asyncio.get_running_loop()

    def client() -> tuple[bytes, bytes, float]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /h HTTP/1.1\r\nHost: h\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)  # still answered, then closed
            half = b""
            while chunk := sock.recv(65536):
                half += chunk
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\n")  # never finished: 408 at the timeout
            slow = b""
            while chunk := sock.recv(65536):
                slow += chunk
        return half, slow, time.monotonic() - t0

    half, slow, secs = await loop.run_in_executor(None, client)
    acceptor.close()
    assert half.startswith(b"HTTP/1.1 200 ") and half.endswith(b"GET /h True")
    assert slow.startswith(b"HTTP/1.1 408 ") and 0.4 <= secs < 5
    refused = await loop.run_in_executor(None, lambda: _connects(port))
    assert not refused
    acceptor.close()  # twice is harmless


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True
