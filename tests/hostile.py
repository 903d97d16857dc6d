"""Harness for the hostile-bytes tests: the lean HTTP server and the namespace proxy's request
path on real loopback sockets, in a thread with its own uvloop loop, in front of a strict
recording upstream that parses what reached it by itself (so a request the proxy let through
"hidden" in another shows up as a second request or a framing violation there).

    with HostileLab() as lab:
        answers, closed = lab.send(lab.proxy_port, b"GET / HTTP/1.1\\r\\n\\r\\n")
        lab.upstream.requests  # what reached the "agent"
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openimds.core.proxy_rules import ListenerSpec
from openimds.http.client import UpstreamPool
from openimds.http.server import Limits, Request, Response, TimeoutCounts, bind_tcp, serve
from openimds.metadata.proxy import Forwarder, Listener

ROUTER_ID = "11111111-2222-4333-8444-555555555555"
TIMEOUT_S = 1.0  # the servers' request and keep-alive timeouts in these tests
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.1")


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[bytes, bytes]]
    body: bytes


@dataclass
class StrictUpstream:
    """A Unix-socket HTTP/1.1 server with its own strict parser, answering 200 to each request.

    Anything that is not exactly `METHOD SP target SP HTTP/1.1 CRLF`, token headers with
    `: ` values free of control bytes, at most one Content-Length (digits), no
    Transfer-Encoding, and a body of exactly that length, is a `violation`: what reached it was
    not what our upstream client promises to send.
    """

    path: Path
    requests: list[Seen] = field(default_factory=list)
    violations: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(self.path))
        self._sock.listen(256)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.violations.clear()

    def close(self) -> None:
        self._stop = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _violation(self, data: bytes) -> None:
        with self.lock:
            self.violations.append(data[:300])

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buf:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        if buf:
                            self._violation(b"EOF mid-request: " + buf)
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                seen = self._parse(head)
                if seen is None:
                    return
                length = next((int(v) for k, v in seen.headers if k == b"content-length"), 0)
                while len(buf) < length:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        self._violation(b"EOF mid-body: " + head)
                        return
                    buf += chunk
                seen.body, buf = buf[:length], buf[length:]
                with self.lock:
                    self.requests.append(seen)
                n = len(self.requests)
                body = f"upstream answer {n}\n".encode()
                with contextlib.suppress(OSError):
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
                                 + (b"" if seen.method == "HEAD" else body))

    def _parse(self, head: bytes) -> Seen | None:
        lines = head.split(b"\r\n")
        m = _REQUEST_LINE.fullmatch(lines[0])
        if m is None:
            self._violation(b"request line: " + head)
            return None
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b": ")
            if not sep or not _TOKEN.fullmatch(name) or any(
                    b < 0x20 and b != 0x09 or b == 0x7F for b in value):
                self._violation(b"header line: " + line)
                return None
            headers.append((name.lower(), value))
        names = [k for k, _ in headers]
        lengths = [v for k, v in headers if k == b"content-length"]
        if b"transfer-encoding" in names or len(lengths) > 1 or (
                lengths and not lengths[0].isdigit()):
            self._violation(b"framing: " + head)
            return None
        return Seen(m.group(1).decode(), m.group(2).decode("latin-1"), headers, b"")


class HostileLab:
    """Lean server (echo handler) and proxy listener on loopback, in their own loop thread."""

    def __init__(self, limits: Limits | None = None, *,
                 max_connections_per_source: int | None = None) -> None:
        # (the default's timeout counts are both servers': a test reads what it added)
        self.limits = limits or Limits(request_timeout_s=TIMEOUT_S,
                                       keepalive_timeout_s=TIMEOUT_S, timeouts=TimeoutCounts())
        self.max_connections_per_source = max_connections_per_source
        self.tmp = Path(tempfile.mkdtemp(prefix="hostile-"))
        self.upstream = StrictUpstream(self.tmp / "agent.sock")
        self.lean_requests: list[Request] = []
        self.loop_errors: list[dict[str, Any]] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ready = threading.Event()
        self.lean_port = 0
        self.proxy_port = 0

    def __enter__(self) -> HostileLab:
        import uvloop

        self.loop = uvloop.new_event_loop()
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("hostile lab did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.upstream.close()

    def _run(self) -> None:
        loop = self.loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(lambda _loop, ctx: self.loop_errors.append(ctx))
        loop.run_until_complete(self._start())
        self._ready.set()
        loop.run_forever()
        self.listener.close()
        self.lean_server.close()
        with contextlib.suppress(Exception):
            loop.run_until_complete(self.pool.close())
        loop.close()

    async def _start(self) -> None:
        def echo(req: Request) -> Response:
            self.lean_requests.append(req)
            return Response(200, f"{req.method} {req.target} {len(req.body)}\n".encode())

        sock = bind_tcp("127.0.0.1", 0)
        self.lean_port = sock.getsockname()[1]
        self.lean_server = await serve(echo, sock, self.limits)
        self.pool = UpstreamPool(unix_path=str(self.upstream.path), size=8,
                                 connect_timeout_s=2.0, timeout_s=5.0, raw_only=True)
        spec = ListenerSpec("router-x", "test", "127.0.0.1", 1, ROUTER_ID, None)
        self.listener = Listener(spec, 0, self.max_connections_per_source)
        psock = bind_tcp("127.0.0.1", 0)
        self.proxy_port = psock.getsockname()[1]
        await self.listener.start(psock, Forwarder(self.pool), self.limits)

    def reset(self) -> None:
        self.upstream.reset()
        self.lean_requests.clear()

    @staticmethod
    def send(port: int, data: bytes, *, half_close: bool = True,
             deadline_s: float = TIMEOUT_S + 2.0) -> tuple[bytes, bool, float]:
        """Send `data`, read until the server closes; (bytes read, closed by server, seconds).

        `closed` is False if the server still held the connection at the deadline (a hang).
        """
        t0 = time.monotonic()
        out = b""
        with socket.create_connection(("127.0.0.1", port), timeout=deadline_s) as sock:
            with contextlib.suppress(OSError):  # the server may close before we are done
                sock.sendall(data)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
            end = t0 + deadline_s
            while True:
                left = end - time.monotonic()
                if left <= 0:
                    return out, False, time.monotonic() - t0
                sock.settimeout(left)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    return out, False, time.monotonic() - t0
                except ConnectionResetError:
                    return out, True, time.monotonic() - t0
                if not chunk:
                    return out, True, time.monotonic() - t0
                out += chunk


def parse_answers(
    data: bytes, *, heads: bool = False,
) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Split a byte stream of responses (Content-Length framed); raises on anything else.

    `heads`: some requests may have been HEAD: a 200 followed directly by the next status
    line (or the end) has no body, whatever its Content-Length says.
    """
    answers = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"truncated response: {data[:200]!r}")
        lines = head.split(b"\r\n")
        m = re.fullmatch(rb"HTTP/1\.1 (\d{3}) [^\r\n]*", lines[0])
        if m is None:
            raise AssertionError(f"bad status line: {lines[0][:200]!r}")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get(b"content-length", b"0"))
        if heads and m.group(1) == b"200" and (not rest or rest.startswith(b"HTTP/1.1 ")):
            length = 0
        body, data = rest[:length], rest[length:]
        if len(body) < length:
            raise AssertionError(f"truncated body: {head[:200]!r}")
        answers.append((int(m.group(1)), headers, body))
    return answers
