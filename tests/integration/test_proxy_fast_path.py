"""The proxy's fast path for a connection's first request (`metadata.proxy.FirstRequests`).

Two listeners in one lab, in front of one recording agent: **fast** (as shipped) and
**slow** (`first_memo = 0`: every request through `HttpProtocol` and the handler). The
same bytes sent to both must reach the agent as the same bytes and come back as the same
answer; the fast one must have taken the fast path (`Forwarder.first_hits`). Real sockets:
TCP on loopback for the VM side, a Unix socket to the agent, the proxy on uvloop in a
thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import re
import socket
import socketserver
import struct
import tempfile
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openimds.core.proxy_rules import ListenerSpec
from openimds.http.client import UpstreamPool
from openimds.http.server import Limits, TimeoutCounts, bind_tcp
from openimds.log import access_line
from openimds.metadata.proxy import Forwarder, Listener

ROUTER_ID = "11111111-2222-4333-8444-555555555555"
OK = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n"
      b'{"uuid": "vm1"}')
_LIMITED_BODY = b"429 Too Many Requests: rate limit exceeded for this instance; retry in 30 s\n"
LIMITED = (b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: text/plain\r\n"
           b"Retry-After: 30\r\nRateLimit-Policy: \"burst\";q=10;w=30\r\n"
           b"RateLimit: \"burst\";r=0;t=30\r\nContent-Length: %d\r\n\r\n%s"
           % (len(_LIMITED_BODY), _LIMITED_BODY))
_RID = re.compile(rb"(\r\nX-Openimds-Request-Id: )[^\r]*", re.I)


class Agent(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Records each request head it gets (raw bytes) and answers `answer`, keep-alive."""

    daemon_threads = True

    def __init__(self, path: Path) -> None:
        self.heads: list[bytes] = []
        self.answer = OK
        self.lock = threading.Lock()
        super().__init__(str(path), _AgentHandler)


class _AgentHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        agent: Agent = self.server  # type: ignore[assignment]
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                try:
                    chunk = self.request.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            with agent.lock:
                agent.heads.append(head + b"\r\n\r\n")
                answer = agent.answer
            head_only = head.startswith(b"HEAD ")
            with contextlib.suppress(OSError):
                self.request.sendall(answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
                                     if head_only else answer)


class Lab:
    """Listeners `fast` and `slow` on loopback, in their own uvloop thread."""

    def __init__(self, *, first_memo: int = 4096, cap: int | None = None,
                 access_log: bool = False, agent: bool = True,
                 request_timeout_s: float = 20.0, keepalive_timeout_s: float = 20.0) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="fastpath-"))
        self.agent_path = self.tmp / "agent.sock"
        self.agent = Agent(self.agent_path) if agent else None
        self.first_memo = first_memo
        self.cap = cap
        self.access_log = access_log
        self.request_timeout_s = request_timeout_s
        self.keepalive_timeout_s = keepalive_timeout_s
        self.timeouts = {"fast": TimeoutCounts(), "slow": TimeoutCounts()}
        self.loop: Any = None
        self.ports: dict[str, int] = {}
        self.fwd: dict[str, Forwarder] = {}
        self.listeners: dict[str, Listener] = {}
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Lab:
        import uvloop

        if self.agent is not None:
            threading.Thread(target=self.agent.serve_forever, daemon=True).start()
        self.loop = uvloop.new_event_loop()
        self._thread.start()
        assert self._ready.wait(10), "lab did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if self.agent is not None:
            self.agent.shutdown()
            self.agent.server_close()

    def _run(self) -> None:
        loop = self.loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(self._start())
        self._ready.set()
        loop.run_forever()
        for listener in self.listeners.values():
            listener.close()
        loop.run_until_complete(self.pool.close())
        loop.close()

    async def _start(self) -> None:
        self.pool = UpstreamPool(unix_path=str(self.agent_path), size=8, connect_timeout_s=2.0,
                                 timeout_s=5.0, raw_only=True)
        for name, memo in (("fast", self.first_memo), ("slow", 0)):
            limits = Limits(request_timeout_s=self.request_timeout_s,
                            keepalive_timeout_s=self.keepalive_timeout_s,
                            timeouts=self.timeouts[name])
            fwd = Forwarder(self.pool, first_memo=memo, access_log=self.access_log)
            spec = ListenerSpec(f"router-{name}", "test", "127.0.0.1", 1, ROUTER_ID, None)
            listener = Listener(spec, 0, self.cap)
            sock = bind_tcp("127.0.0.1", 0)
            self.ports[name] = sock.getsockname()[1]
            await listener.start(sock, fwd, limits)
            self.fwd[name], self.listeners[name] = fwd, listener

    def call(self, fn: Callable[[], Any]) -> Any:
        """`fn()` on the proxy's loop (its state is the loop's)."""
        return asyncio.run_coroutine_threadsafe(_call(fn), self.loop).result(10)

    def connect(self, name: str, data: bytes, source: str = "127.0.0.1") -> socket.socket:
        """A connection to listener `name` from `source` whose first read holds all of
        `data`: the loop is held until the kernel has it (the client's send queue is empty,
        i.e. acked), so the accept and the first read come after it, as on a busy proxy."""
        gate, held = threading.Event(), threading.Event()

        def hold() -> None:
            held.set()
            gate.wait(30)

        self.loop.call_soon_threadsafe(hold)
        assert held.wait(10)
        sock = socket.create_connection(("127.0.0.1", self.ports[name]), timeout=20,
                                        source_address=(source, 0))
        try:
            sock.sendall(data)
            wait_for(lambda: _unacked(sock) == 0, "the proxy's kernel took the request")
        finally:
            gate.set()
        return sock

    def connect_first(self, name: str) -> socket.socket:
        """A connection the proxy accepted (it is in the listener's set) before any byte of
        its request came: what an idle proxy sees, woken by the handshake's last ACK."""
        listener = self.listeners[name]
        before = self.call(lambda: len(listener.conns))
        sock = socket.create_connection(("127.0.0.1", self.ports[name]), timeout=20)
        wait_for(lambda: self.call(lambda: len(listener.conns)) == before + 1,
                 "the proxy accepted the connection")
        return sock

    def ask(self, name: str, data: bytes, source: str = "127.0.0.1") -> bytes:
        """`data` as one first read on a new connection from `source`; everything until the
        proxy closes."""
        with self.connect(name, data, source) as sock:
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out

    def heads(self) -> list[bytes]:
        assert self.agent is not None
        with self.agent.lock:
            out, self.agent.heads[:] = list(self.agent.heads), []
        return out


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


def _unacked(sock: socket.socket) -> int:
    """Bytes the peer's kernel has not acknowledged yet (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


def read_answers(sock: socket.socket, n: int) -> bytes:
    """The bytes of `n` answers from a keep-alive connection (the test's answers are OK)."""
    out = b""
    while len(out) < n * len(OK):
        chunk = sock.recv(65536)
        assert chunk, f"closed after {out!r}"
        out += chunk
    return out


def masked(heads: list[bytes]) -> list[bytes]:
    return [_RID.sub(rb"\1<id>", h) for h in heads]


def wait_for(check: Callable[[], bool], what: str) -> None:
    end = time.monotonic() + 30.0  # a loaded machine may delay it; ends once it holds
    while not check():
        assert time.monotonic() < end, what
        time.sleep(0.02)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab() as lab:
        yield lab


REQUESTS = [
    b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"Connection: close\r\n\r\n",
    b"GET /latest/meta-data/instance-id HTTP/1.0\r\nHost: 169.254.169.254\r\n"
    b"User-Agent: Cloud-Init/23.4\r\n\r\n",
    b"HEAD /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"Connection: close\r\n\r\n",
    # absolute-form target: the slow path rewrites it and the Host
    b"GET http://169.254.169.254/openstack HTTP/1.1\r\nHost: evil\r\nConnection: close\r\n\r\n",
    # every identity header a VM could forge, and a guest request ID that is kept
    b"GET /openstack/latest/user_data HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\nX_Forwarded_For: 9.9.9.9\r\nForwarded: for=6.6.6.6\r\n"
    b"X-Neutron-Router-ID: evil-router\r\nx-neutron-network-id: evil\r\n"
    b"X-Instance-ID: victim\r\nX-Instance-ID-Signature: forged\r\nX-Tenant-ID: victim\r\n"
    b"X-Request-Id: req-1234\r\nConnection: close\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", REQUESTS, ids=["close", "http10", "head", "absolute",
                                                         "spoofed"])
def test_a_repeated_request_takes_the_fast_path_with_the_slow_paths_effect(
    lab: Lab, request_bytes: bytes,
) -> None:
    """Three copies each way: the agent gets the same bytes (request IDs aside), the VM the
    same answer, and only the fast listener's requests took the fast path."""
    slow_answers = [lab.ask("slow", request_bytes) for _ in range(3)]
    slow_heads = lab.heads()
    fast_answers = [lab.ask("fast", request_bytes) for _ in range(3)]
    fast_heads = lab.heads()
    assert len(slow_heads) == len(fast_heads) == 3
    assert masked(fast_heads) == masked(slow_heads)
    assert fast_answers == slow_answers
    assert slow_answers[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close\r\n" in slow_answers[0]
    assert lab.fwd["fast"].first_hits == 3
    assert lab.fwd["slow"].first_hits == 0
    if b"X-Request-Id" in request_bytes:  # the guest's ID goes upstream on a hit too
        assert all(b"\r\nX-Openimds-Request-Id: req-1234\r\n" in h for h in fast_heads)


def test_a_vm_sent_forwarded_for_is_stripped_on_a_hit(lab: Lab) -> None:
    req = (b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n"
           b"X-Forwarded-For: 6.6.6.6\r\nX-Neutron-Router-ID: evil\r\nConnection: close\r\n\r\n")
    for _ in range(3):
        lab.ask("fast", req)
    heads = lab.heads()
    assert lab.fwd["fast"].first_hits == 3
    for head in heads:
        lower = head.lower()
        assert lower.count(b"x-forwarded-for:") == 1
        assert b"\r\nx-forwarded-for: 127.0.0.1\r\n" in lower
        assert lower.count(b"x-neutron-router-id:") == 1
        assert f"\r\nx-neutron-router-id: {ROUTER_ID}\r\n".encode() in lower
        assert b"6.6.6.6" not in head and b"evil" not in head


def test_the_same_bytes_from_another_vm_are_a_hit_with_its_own_address(lab: Lab) -> None:
    """What a read is kept as does not depend on who sent it (a boot storm: a thousand
    VMs sending cloud-init's same 28 requests keep 28 entries, not 28,000): another
    source's first copy is a hit, and the agent still gets each source's own address."""
    req = (b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: 169.254.169.254\r\n"
           b"X-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n")
    sources = ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.4"]
    fast = [lab.ask("fast", req, source) for source in sources]
    fast_heads = lab.heads()
    slow = [lab.ask("slow", req, source) for source in sources]
    slow_heads = lab.heads()
    assert fast == slow and fast[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert masked(fast_heads) == masked(slow_heads)
    assert lab.fwd["fast"].first_hits == 4  # the first learned it, every VM's took it
    assert list(lab.fwd["fast"].first) == [req]
    for source, head in zip(sources, fast_heads, strict=True):
        assert head.lower().count(b"x-forwarded-for:") == 1
        assert f"\r\nX-Forwarded-For: {source}\r\n".encode() in head
        assert f"\r\nX-Neutron-Router-ID: {ROUTER_ID}\r\n".encode() in head
        assert b"6.6.6.6" not in head


def test_a_request_differing_by_one_header_byte_misses(lab: Lab) -> None:
    a = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: a\r\n" \
        b"Connection: close\r\n\r\n"
    b = a.replace(b"User-Agent: a", b"User-Agent: b")
    lab.ask("fast", a)
    lab.ask("fast", a)
    assert len(lab.fwd["fast"].first) == 1
    lab.ask("fast", b)
    assert len(lab.fwd["fast"].first) == 2
    heads = lab.heads()
    assert [b"user-agent: b" in h.lower() for h in heads] == [False, False, True]


def test_a_limited_source_still_gets_the_proxys_429_on_a_hit(lab: Lab) -> None:
    """The agent's rate-limit 429 is learned on the fast path; the same bytes then get the
    proxy's own 429 (the agent is not asked again) until the Retry-After ends."""
    assert lab.agent is not None
    lab.agent.answer = LIMITED
    req = b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
    first = lab.ask("fast", req)
    assert first.startswith(b"HTTP/1.1 429 ")
    assert lab.fwd["fast"].first_hits == 1
    for _ in range(3):
        again = lab.ask("fast", req)
        assert again.startswith(b"HTTP/1.1 429 ")
        assert re.search(rb"\r\nRetry-After: \d+\r\n", again)
        assert b"Connection: close" in again
    assert len(lab.heads()) == 1  # the agent was asked once
    assert lab.fwd["fast"].limited.answered == 3
    assert lab.fwd["fast"].first_hits == 1  # the 429s took the slow path


def test_the_memo_is_bounded_and_drops_the_oldest() -> None:
    with Lab(first_memo=3) as lab:
        reqs = [f"GET /latest/meta-data/{n} HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
                .encode() for n in range(6)]
        for req in reqs * 2:
            assert lab.ask("fast", req).startswith(b"HTTP/1.1 200 OK\r\n")
        memo = lab.fwd["fast"].first
        assert len(memo) == 3
        kept = set(memo)  # keyed by the bytes
        assert kept == set(reqs[3:])
        assert lab.fwd["fast"].first_hits == 12
        heads = lab.heads()
        assert [h.split(b" ")[1] for h in heads] == [r.split(b" ")[1] for r in reqs * 2]


def test_a_keep_alive_hit_goes_on_as_a_normal_connection(lab: Lab) -> None:
    """The first answer comes from the fast path; the connection then stays open and later
    requests on it are served as always, in order, until the VM closes it."""
    first = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
    then = b"GET /latest/user-data HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
    listener = lab.listeners["fast"]
    for _ in range(2):
        with lab.connect("fast", first) as sock:
            assert read_answers(sock, 1) == OK  # relayed verbatim: no Connection: close
            sock.sendall(then + then)  # pipelined on the same connection
            assert read_answers(sock, 2) == OK + OK
            assert lab.call(lambda: len(listener.conns)) == 1
        wait_for(lambda: lab.call(lambda: len(listener.conns)) == 0,
                 "the connection left the listener's set after the VM closed it")
    assert lab.fwd["fast"].first_hits == 2
    paths = [h.split(b" ")[1] for h in lab.heads()]
    assert paths == [b"/latest/meta-data/", b"/latest/user-data", b"/latest/user-data"] * 2


def test_an_answered_connection_that_goes_quiet_is_counted_idle_not_silent() -> None:
    """The routine keep-alive expiry: after an answer (the fast path's first one, which
    hands the connection on, or the slow path's) nothing more comes; closed at the
    keep-alive timeout and counted `idle`, once."""
    first = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
    with Lab(keepalive_timeout_s=0.5) as lab:
        for name in ("slow", "fast"):
            with lab.connect(name, first) as sock:
                assert read_answers(sock, 1) == OK
                t0 = time.monotonic()
                assert _read_all(sock) == b""  # the keep-alive close, no unprompted 408
                assert time.monotonic() - t0 < 0.5 + 1.0, name
            counts = lab.timeouts[name]
            assert lab.call(lambda counts=counts: (counts.idle, counts.silent,
                                                   counts.request)) == (1, 0, 0), name
        assert lab.fwd["fast"].first_hits == 1  # the fast one was the fast path's


def test_the_connection_cap_holds_on_the_fast_path() -> None:
    with Lab(cap=1) as lab:
        req = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        assert lab.ask("fast", req).startswith(b"HTTP/1.1 200 ")  # learned, a hit
        cap = lab.listeners["fast"].cap
        assert cap is not None
        with socket.create_connection(("127.0.0.1", lab.ports["fast"]), timeout=20):
            wait_for(lambda: lab.call(lambda: cap.counts.get("127.0.0.1", 0)) == 1,
                     "the idle connection counted")
            refused = lab.ask("fast", req)
            assert refused.startswith(b"HTTP/1.1 429 ")
            assert b"too many connections from this address" in refused
        wait_for(lambda: lab.call(lambda: cap.counts.get("127.0.0.1", 0)) == 0,
                 "the idle connection released its count")
        assert lab.ask("fast", req).startswith(b"HTTP/1.1 200 ")
        assert lab.fwd["fast"].first_hits == 2
        assert len(lab.heads()) == 2  # the refused one never reached the agent
        assert cap.rejected == 1


def test_an_unreachable_agent_is_the_same_503_on_both_paths() -> None:
    with Lab(agent=False) as lab:
        req = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        fast = [lab.ask("fast", req) for _ in range(2)]
        slow = lab.ask("slow", req)
        assert fast == [slow, slow]
        assert slow.startswith(b"HTTP/1.1 503 ")
        assert b"the metadata agent is unavailable" in slow
        assert lab.fwd["fast"].first_hits == 2
        assert lab.fwd["fast"].hop.upstream_errors == {503: 2}


def test_counts_and_the_access_line_on_a_hit(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(access_line, "_stream", None)  # through logging: caplog sees it
    caplog.set_level(logging.INFO, logger="openimds.access")
    with Lab(access_log=True) as lab:
        req = b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: h\r\n" \
              b"Connection: close\r\n\r\n"
        for _ in range(3):
            lab.ask("fast", req)
        fwd = lab.fwd["fast"]
        assert fwd.first_hits == 3
        families = {m.name: m for m in lab.call(fwd.metric_families)}
        assert families["openimds_proxy_first_request_hits"].samples[0].value == 3
        assert families["openimds_proxy_first_request_kept"].samples[0].value == 1
        assert fwd.hop.begun == 3
        assert sum(fwd.hop.codes.values()) == 3
        wait_for(lambda: len([r for r in caplog.records if "proxy request_id=" in
                              r.getMessage()]) == 3, "one access line per request")
    lines = [r.getMessage() for r in caplog.records if "proxy request_id=" in r.getMessage()]
    ids = {re.search(r"request_id=(\S+)", line).group(1) for line in lines}  # type: ignore[union-attr]
    assert len(ids) == 3  # each request its own ID
    for line in lines:
        assert " ip=127.0.0.1 " in line and f"router={ROUTER_ID}" in line
        assert " status=200 " in line and "method=GET path=/openstack/latest/meta_data.json" in line


@pytest.mark.parametrize(("data", "answer"), [
    (b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n",  # pipelined
     b"HTTP/1.1 200 "),
    (b"GET /a HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
     b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 "),
    # a long poll (the recording agent answers it at once)
    (b"GET /a?wait_for_change=1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
     b"HTTP/1.1 200 "),
    # a body that never comes: the half-close ends it, on both
    (b"GET /a HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nConnection: close\r\n\r\n", b""),
    (b"GET /a HTTP/2.0\r\nHost: h\r\n\r\n", b"HTTP/1.1 505 "),
    (b"GET /a HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
     b"HTTP/1.1 200 "),
])
def test_what_the_fast_path_does_not_keep(lab: Lab, data: bytes, answer: bytes) -> None:
    """First reads that are not one plain bodyless request are remembered as such and
    answered by the slow path, exactly as the slow listener answers them."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(lab.connect(name, data)) for name in ("slow", "fast")]
        answers = []
        for sock in socks:
            if b"wait_for_change" not in data:  # a half-close would give a long poll up
                sock.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            answers.append(_RID.sub(rb"\1<id>", out))
    assert answers[0] == answers[1]
    assert answers[0].startswith(answer) if answer else answers[0] == b""
    assert lab.fwd["fast"].first_hits == 0
    assert list(lab.fwd["fast"].first.values()) == [None]


def test_later_keep_alive_reads_take_the_fast_path_with_the_slow_paths_effect(
    lab: Lab,
) -> None:
    """One request per read on a kept-alive connection (spoofed identity headers, a
    pipelined pair, a request split over two reads, HTTP/1.0 keep-alive): the agent gets
    the same bytes and the VM the same answers on both listeners; whole single reads after
    the first were fast-path hits on the fast listener only."""
    plain = (b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n"
             b"X-Forwarded-For: 6.6.6.6\r\nX-Neutron-Router-ID: evil\r\n"
             b"X-Neutron-Network-ID: evil\r\n\r\n")
    http10 = b"GET /a HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"
    reads = [[plain], [plain], [plain + plain], [plain[:20], plain[20:]], [http10], [plain]]
    answers: dict[str, bytes] = {}
    heads: dict[str, list[bytes]] = {}
    for name in ("slow", "fast"):
        with lab.connect(name, plain) as sock:
            got = read_answers(sock, 1)
            for chunks in reads:
                for chunk in chunks:
                    sock.sendall(chunk)
                    if len(chunks) > 1:
                        time.sleep(0.05)  # a separate read (a partial request)
                got += read_answers(sock, plain.count(b"GET ") * len(chunks)
                                    if len(chunks) == 1 else 1)
            answers[name] = got
        heads[name] = masked(lab.heads())
    assert answers["fast"] == answers["slow"]
    assert heads["fast"] == heads["slow"]
    assert len(heads["fast"]) == 8
    for head in heads["fast"]:
        assert b"6.6.6.6" not in head and b"evil" not in head
    assert lab.fwd["slow"].first_hits == 0
    # the first read, three single whole reads of `plain`, the HTTP/1.0 keep-alive one
    assert lab.fwd["fast"].first_hits == 5


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


@pytest.mark.parametrize("request_bytes", [REQUESTS[0], REQUESTS[4]], ids=["close", "spoofed"])
def test_a_request_that_comes_after_the_accept_takes_the_fast_path_too(
    lab: Lab, request_bytes: bytes,
) -> None:
    """The first read is not there when the proxy accepts: the fast listener waits for it
    without a protocol object and relays it as a hit, with the slow path's effect."""
    for _ in range(2):  # learn it, then hit it, on a connection that is already there
        lab.ask("fast", request_bytes)
    lab.heads()
    answers: dict[str, bytes] = {}
    heads: dict[str, list[bytes]] = {}
    for name in ("slow", "fast"):
        with lab.connect_first(name) as sock:
            time.sleep(0.05)
            sock.sendall(request_bytes)
            answers[name] = _read_all(sock)
        heads[name] = masked(lab.heads())
    assert answers["fast"] == answers["slow"]
    assert answers["fast"].startswith(b"HTTP/1.1 200 OK\r\n")
    assert heads["fast"] == heads["slow"] and len(heads["fast"]) == 1
    assert lab.fwd["fast"].first_hits == 3
    listener = lab.listeners["fast"]
    wait_for(lambda: lab.call(lambda: len(listener.conns)) == 0, "nothing left in the set")


def test_a_keep_alive_request_after_the_accept_goes_on_as_a_normal_connection(lab: Lab) -> None:
    first = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n"
    lab.ask("fast", first.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    listener = lab.listeners["fast"]
    for _ in range(2):
        with lab.connect_first("fast") as sock:
            sock.sendall(first)
            assert read_answers(sock, 1) == OK
            sock.sendall(first + first)
            assert read_answers(sock, 2) == OK + OK
            assert lab.call(lambda: len(listener.conns)) == 1
        wait_for(lambda: lab.call(lambda: len(listener.conns)) == 0, "closed by the VM")
    # the close one, then each connection's first read (a read learned is relayed as a
    # hit too); the pipelined pair takes the parser
    assert lab.fwd["fast"].first_hits == 1 + 2
    assert len(lab.heads()) == 1 + 2 * 3


def test_a_connection_that_never_sends_is_closed_at_the_request_timeout() -> None:
    """On both listeners: no answer, closed within the request timeout (the slow path's
    wheel may be a tick late), counted as a silent close (not idle: that is the keep-alive
    expiry of an answered one); its source's count given back."""
    with Lab(request_timeout_s=1.0, cap=2) as lab:
        for name in ("slow", "fast"):
            with lab.connect_first(name) as sock:
                t0 = time.monotonic()
                assert _read_all(sock) == b""
                secs = time.monotonic() - t0
            assert 0.8 <= secs < 1.0 + 1.0, (name, secs)
            counts = lab.timeouts[name]
            assert lab.call(lambda counts=counts: (counts.silent, counts.idle)) == (1, 0)
            cap = lab.listeners[name].cap
            assert cap is not None
            wait_for(lambda cap=cap: lab.call(lambda: dict(cap.counts)) == {},
                     "the count given back")
        assert lab.fwd["fast"].first_hits == 0
        assert lab.heads() == []


def test_waiting_connections_count_against_the_cap_and_close_with_the_listener() -> None:
    with Lab(cap=2) as lab:
        req = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        assert lab.ask("fast", req).startswith(b"HTTP/1.1 200 ")
        listener = lab.listeners["fast"]
        cap = listener.cap
        assert cap is not None
        waiting = [lab.connect_first("fast") for _ in range(2)]
        try:
            assert lab.call(lambda: cap.counts.get("127.0.0.1", 0)) == 2
            refused = lab.ask("fast", req)
            assert refused.startswith(b"HTTP/1.1 429 ")
            assert cap.rejected == 1
            waiting[0].sendall(req)  # a waiting one is still served, as a hit
            assert _read_all(waiting[0]).startswith(b"HTTP/1.1 200 ")
            assert lab.fwd["fast"].first_hits == 2
            wait_for(lambda: lab.call(lambda: len(listener.conns)) == 1, "one left waiting")
            lab.call(listener.close)  # the listener goes: so does the waiting connection
            waiting[1].settimeout(5)
            assert _read_all(waiting[1]) == b""
            assert lab.call(lambda: len(listener.conns)) == 0
            assert lab.call(lambda: cap.counts.get("127.0.0.1", 0)) == 0
        finally:
            for sock in waiting:
                sock.close()


def test_a_waiting_connection_that_sends_half_a_request_or_hangs_up_gets_the_slow_path() -> None:
    """A first read that comes after the accept but is not a whole kept request (half a
    head, then the rest) is answered as the slow listener answers it; one that hangs up
    without a byte is closed, and its source's count given back."""
    with Lab(cap=4) as lab:
        req = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        answers = {}
        for name in ("slow", "fast"):
            with lab.connect_first(name) as sock:
                sock.sendall(req[:20])
                time.sleep(0.05)  # a read of its own
                sock.sendall(req[20:])
                answers[name] = _read_all(sock)
        assert answers["fast"] == answers["slow"]
        assert answers["fast"].startswith(b"HTTP/1.1 200 ")
        assert lab.fwd["fast"].first_hits == 0
        cap = lab.listeners["fast"].cap
        assert cap is not None
        sock = lab.connect_first("fast")
        assert lab.call(lambda: cap.counts.get("127.0.0.1", 0)) == 1
        sock.close()
        wait_for(lambda: lab.call(lambda: dict(cap.counts)) == {}, "the count given back")
        wait_for(lambda: lab.call(lambda: len(lab.listeners["fast"].conns)) == 0,
                 "the hung-up connection left the set")
        assert len(lab.heads()) == 2


def test_waiting_connections_expire_together_and_in_order() -> None:
    """Silent connections opened one after another each close at their own request timeout
    (one timer for all of them), every one counted."""
    with Lab(request_timeout_s=1.0) as lab:
        socks, opened = [], []
        try:
            for _ in range(3):
                socks.append(lab.connect_first("fast"))
                opened.append(time.monotonic())
                time.sleep(0.3)
            for sock, t0 in zip(socks, opened, strict=True):
                assert _read_all(sock) == b""
                assert 0.8 <= time.monotonic() - t0 < 2.0
        finally:
            for sock in socks:
                sock.close()
        counts = lab.timeouts["fast"]
        assert lab.call(lambda: (counts.silent, counts.idle)) == (3, 0)
        assert lab.call(lambda: len(lab.listeners["fast"].conns)) == 0


def test_two_listeners_share_one_wait_set_that_closes_with_the_last() -> None:
    """The connections waiting for their first bytes on every listener of one forwarder
    are in one epoll set (`_FirstWaits`): a waiting connection on each is served, one
    listener's close leaves the other's waiting connection served, and the set's fd is
    closed with the last listener."""
    with Lab() as lab:
        req = b"GET /latest/meta-data/ HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        fwd = lab.fwd["fast"]
        first = lab.listeners["fast"]
        second = Listener(ListenerSpec("router-fast2", "test", "127.0.0.1", 1, ROUTER_ID, None),
                          0)
        sock = bind_tcp("127.0.0.1", 0)
        port2 = sock.getsockname()[1]
        limits = fwd.first_limits
        assert limits is not None
        asyncio.run_coroutine_threadsafe(second.start(sock, fwd, limits), lab.loop).result(10)
        waits = lab.call(lambda: fwd.first_waits)
        assert waits is not None
        assert lab.call(lambda: waits._users) == 2
        a = lab.connect_first("fast")
        b = socket.create_connection(("127.0.0.1", port2), timeout=20)
        try:
            wait_for(lambda: lab.call(lambda: len(waits._waiting)) == 2, "both wait in the set")
            a.sendall(req)
            assert _read_all(a).startswith(b"HTTP/1.1 200 ")
            lab.call(first.close)  # one listener goes; the other's waiting connection stays
            assert lab.call(lambda: fwd.first_waits) is waits
            assert lab.call(lambda: len(waits._waiting)) == 1
            b.sendall(req)
            assert _read_all(b).startswith(b"HTTP/1.1 200 ")
            assert fwd.first_hits == 2
            lab.call(second.close)
            assert lab.call(lambda: fwd.first_waits) is None
            assert waits._ep.closed
        finally:
            a.close()
            b.close()
