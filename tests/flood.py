"""A client that pipelines requests and does not read its answers, and a lean server for it.

The server, a real process (`Service(..., [PYTHON, flood.__file__, ...])`):

    python tests/flood.py --tcp 127.0.0.1:PORT [--loop uvloop|asyncio|sockets]
                          [--write-timeout S] [--idle-timeout S]
    python tests/flood.py --unix PATH      # the agent behind a real `openimds proxy`

answers `GET /n/<i>` with ANSWER_BODY bytes starting `<i>:`, so the client can check that
every answer came, whole and in order; `GET /big` with BIG_BODY bytes; `GET /stats` (asked
on another connection) with how many /n/ requests it answered and the connections its
timeouts ended (`Limits.timeouts`), as JSON. `--loop sockets`
serves off accepted sockets (`http.sockets`, the proxy's VM side) on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repo's src first, as the tests see it
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from openimds.http.server import (
    AnyResponse,
    HttpProtocol,
    Limits,
    Request,
    Response,
    TimeoutCounts,
    bind_tcp,
    bind_unix,
    error_response,
    serve,
)

ANSWER_BODY = 1024
BIG_BODY = 16 << 20  # far more than the kernel's buffers on both ends take
CLIENT_BUFFER = 65536  # the client's SO_SNDBUF/SO_RCVBUF: the kernel holds little of a flood
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state


def body_for(i: int) -> bytes:
    head = b"%d:" % i
    return head + b"x" * (ANSWER_BODY - len(head))


def request_for(i: int) -> bytes:
    return b"GET /n/%d HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n" % i


# -- the server ---------------------------------------------------------------------------

def _handler(timeouts: TimeoutCounts) -> Callable[[Request], AnyResponse]:
    handled = [0]
    big = b"b" * BIG_BODY

    def handle(req: Request) -> AnyResponse:
        path = req.path
        if path.startswith("/n/"):
            handled[0] += 1
            return Response(200, body_for(int(path[3:])),
                            content_type="application/octet-stream")
        if path == "/stats":
            ended = {"write": timeouts.write, "request": timeouts.request,
                     "idle": timeouts.idle, "silent": timeouts.silent}
            return Response(200, json.dumps({"handled": handled[0], "timeouts": ended}).encode(),
                            content_type="application/json")
        if path == "/big":
            return Response(200, big, content_type="application/octet-stream")
        return error_response(404, f"no such path: {path}")

    return handle


async def _serve(args: argparse.Namespace) -> None:
    from openimds.http.sockets import Acceptor

    loop = asyncio.get_running_loop()
    timeouts = TimeoutCounts()
    handle = _handler(timeouts)
    limits = Limits(write_timeout_s=args.write_timeout, request_timeout_s=args.idle_timeout,
                    keepalive_timeout_s=args.idle_timeout, timeouts=timeouts)
    if args.unix:
        sock = bind_unix(args.unix)
    else:
        host, _, port = args.tcp.rpartition(":")
        sock = bind_tcp(host, int(port))
    if args.loop == "sockets":
        Acceptor(loop, sock, lambda: HttpProtocol(handle, limits, loop))
    else:
        await serve(handle, sock, limits)
    await asyncio.Event().wait()  # until SIGTERM


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--tcp", help="HOST:PORT")
    where.add_argument("--unix", help="socket path")
    p.add_argument("--loop", choices=("uvloop", "asyncio", "sockets"), default="uvloop")
    p.add_argument("--write-timeout", type=float, default=30.0)
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="request and keep-alive timeouts")
    args = p.parse_args()
    if args.loop == "asyncio":
        asyncio.run(_serve(args))
    else:
        import uvloop

        uvloop.run(_serve(args))
    return 0


# -- the client ---------------------------------------------------------------------------

def flood_socket(sock: socket.socket) -> socket.socket:
    """Small kernel buffers on the client's end (set before connect): what it sends beyond
    them waits for the server to read, what the server answers waits in the server."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_BUFFER)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_BUFFER)
    return sock


@dataclass
class Flood:
    """What `flood` sent: `whole` requests (/n/0 .. /n/whole-1), maybe the first bytes of the
    next one; `rest`: that one's bytes still unsent (b"" if it stopped on a boundary)."""

    whole: int
    sent_bytes: int
    total_bytes: int
    rest: bytes
    reset: bool  # the server ended the connection while it was being flooded

    @property
    def stalled(self) -> bool:
        return self.sent_bytes < self.total_bytes

    @property
    def expected(self) -> int:
        """Answers due once `rest` is sent too."""
        return self.whole + (1 if self.rest else 0)


def flood(sock: socket.socket, total_bytes: int, stall_s: float = 3.0,
          request: Callable[[int], bytes] = request_for) -> Flood:
    """Pipeline /n/0, /n/1, ... (or `request(i)`) without reading a byte, until the socket
    takes nothing for stall_s (the server stopped reading) or total_bytes went out (it never
    did). A slow server on a loaded machine can only make it stop later, never earlier: the
    kernel's buffers do not empty unless the server reads."""
    stream = bytearray()
    ends: list[int] = []
    i = 0
    while len(stream) < total_bytes:
        stream += request(i)
        ends.append(len(stream))
        i += 1
    view = memoryview(stream)
    sock.setblocking(False)
    off = 0
    reset = False
    while off < len(stream):
        try:
            off += sock.send(view[off:off + 65536])
            continue
        except BlockingIOError:
            pass
        except (ConnectionResetError, BrokenPipeError):
            reset = True
            break
        _, writable, _ = select.select([], [sock], [], stall_s)
        if not writable:
            break
    whole = bisect.bisect_right(ends, off)  # requests that went out to their last byte
    start = ends[whole - 1] if whole else 0
    rest = bytes(view[off:ends[whole]]) if whole < len(ends) and off > start else b""
    return Flood(whole, off, len(stream), rest, reset)


def drain(sock: socket.socket, sent: Flood, timeout: float = 180.0) -> list[tuple[int, bytes]]:
    """Send the rest of the cut request and read every answer due: [(status, body)].
    `timeout` bounds the whole (a loaded machine relays ~10k answers in seconds)."""
    sock.setblocking(False)
    rest = sent.rest
    buf = bytearray()
    out: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < sent.expected:
        left = deadline - time.monotonic()
        assert left > 0, f"{len(out)} of {sent.expected} answers in {timeout} s"
        readable, writable, _ = select.select([sock], [sock] if rest else [], [], left)
        if writable:
            rest = rest[sock.send(rest):]
        if not readable:
            continue
        chunk = sock.recv(1 << 20)
        assert chunk, f"closed after {len(out)} of {sent.expected} answers"
        buf += chunk
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buf[:end])
            length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            if len(buf) < end + 4 + length:
                break
            out.append((int(head.split(b" ", 2)[1]), bytes(buf[end + 4:end + 4 + length])))
            del buf[:end + 4 + length]
    assert not buf, f"{len(buf)} bytes after the last answer due"
    return out


def check_answers(answers: list[tuple[int, bytes]], count: int) -> None:
    """Exactly /n/0 .. /n/count-1's answers, in order, each whole."""
    assert len(answers) == count
    for i, (status, body) in enumerate(answers):
        assert status == 200 and body == body_for(i), (i, status, body[:40])


def tcp_state(sock: socket.socket) -> int:
    return int(struct.unpack("B", sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1))[0])


def wait_closed(sock: socket.socket, timeout: float = 90.0) -> int:
    """Poll until the server ended the connection (a reset: nothing of the queued answers
    can go before a FIN); returns the final TCP state, TCP_ESTABLISHED if it never did."""
    deadline = time.monotonic() + timeout
    state = tcp_state(sock)
    while state == TCP_ESTABLISHED and time.monotonic() < deadline:
        time.sleep(0.1)
        state = tcp_state(sock)
    return state


def wait_hung_up(sock: socket.socket, timeout: float = 90.0) -> bool:
    """Poll (reading nothing) until the server ended the connection: True once it did.
    For Unix sockets too, where TCP_INFO says nothing."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP | select.POLLRDHUP | select.POLLERR)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        for _, events in poller.poll(min(left, 0.1) * 1000):
            if events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR):
                return True
    return False


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


if __name__ == "__main__":
    sys.exit(main())
