"""Pooled keep-alive HTTP/1.1 connections to one upstream (a Unix socket or host:port).

Rules:
- At most `size` connections exist; callers beyond that wait for one (bounded, as measured:
  an unbounded pool doubled the upstream's CPU per request at c=1000).
- One request per connection at a time (but see `pipeline_depth`); a connection goes back
  to the idle list only when the answer was complete and both sides allow keep-alive.
- A request that fails on a *reused* idle connection before any answer byte arrived is
  retried once on a fresh connection (the upstream closed the idle connection first).
- With `connect_retries`, a connection the upstream *refuses* (ECONNREFUSED, or ENOENT for a
  Unix socket: it is down or being restarted) is tried again that many times,
  `CONNECT_RETRY_DELAY_S` apart, without holding a slot meanwhile (haproxy's `retries 3` and
  its turn-around timer). Only a request that was never written on any connection is
  retried so: one already sent may have been acted on, and not every request is idempotent.
  Connect timeouts are not retried (an upstream too busy to accept gets no extra load).
- With `pipeline_depth` > 1, `send()` calls made in one event-loop iteration are written
  together: up to that many on one *idle* pooled connection, in one write, their answers
  read back in order (`openimds.core.answer_framing` finds where each ends). A request only
  ever waits behind requests sent in the same iteration, at most depth - 1 of them: a batch
  goes to a connection with nothing outstanding, never behind an older, possibly slow
  answer. A batch of one, and `request()`, take the unpipelined path. When a batch ends
  early (the connection closed, a request's own timeout passed, an answer too big or one
  that cannot be framed, e.g. chunked), the request at fault gets its error (504, 502) and
  the others left unanswered are retried once, alone, on a fresh connection (an unframed
  GET is that way read by the full parser); the batch's first request also keeps the
  stale-connection rule above. Only GET and HEAD are batched: any other request is sent
  alone, unpipelined, with the rules above (it may change state: it must never be lost
  or sent twice because of a neighbour in a batch).
- With `worker_paths` (a Unix upstream whose workers each also listen on a socket of their
  own: the agent's `metadata_proxy_socket.w<N>`, the API's `[api] unix_socket.w<N>`) or
  `worker_ports` (a TCP upstream whose workers each also listen on a port of their own on
  `host`: the API's `[api] worker_port_base` + N), each new connection goes to the worker
  address holding the fewest of this pool's connections (ties in turn, from the one after
  the worker connected to last, `worker_order`), so a burst of N connects splits within 1
  whatever the workers' accept timing or SO_REUSEPORT's hash, and a pool that finds nothing
  idle (every connection busy, or all ended) does not put its odd one on worker 0 each
  time. A worker address that refuses (its worker died; a socket file stays until it is
  replaced) is skipped for `REFUSED_SKIP_S`, the connection going to the next one, or to
  the pool's own address (`unix_path` or `host:port`, shared by every worker) when none
  accepts or none exists (one worker: today's path). A connection made so, off its place,
  is retired (closed when next taken from the idle list) after `RETIRE_S`, and made again
  by the same rule: a replaced worker gets its share back.
  Idle connections are kept per worker address; a request takes one of the worker with
  the fewest of this pool's requests in flight (its connections held minus idle; ties in
  turn, `_SpreadIdle.pop`), so the requests split evenly even when the connections cannot
  (a pool of 5 holds 3 on worker 0: "most idle" gave it 0.57-0.70 of the requests). A
  connection that closes while idle (the upstream's keep-alive timeout ends the least
  recently used, under the live ones) leaves its idle list at once, so it is never counted
  as idle.
- Failures are translated here, once: cannot connect -> UpstreamUnavailable (503),
  no answer in time -> UpstreamTimeout (504), garbled or oversized -> UpstreamProtocolError (502).

`UpstreamResponse.raw` holds the answer's bytes exactly as received, so a hop can relay it
verbatim without re-rendering.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl as ssl_module
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import httptools

from openimds.core.answer_framing import NotFramed, frame_answer, header_fields
from openimds.errors import (
    UpstreamProtocolError,
    UpstreamRefused,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from openimds.http.server import RawResponse

__all__ = ["CONNECT_RETRIES", "CONNECT_RETRY_DELAY_S", "MAX_PIPELINE_DEPTH", "REFUSED_SKIP_S",
           "RETIRE_S", "ResultCallback", "UpstreamPool", "UpstreamResponse", "Worker",
           "worker_order"]

# worker_paths / worker_ports: a refused worker address is not tried again for this long; a
# connection made off its place (its worker refused) is closed and made again after RETIRE_S
# (a dead worker is started again after a second, `host.workers.RESPAWN_DELAY_S`).
REFUSED_SKIP_S = 1.0
RETIRE_S = 1.0

# A worker's own address: its Unix socket path (str), or its TCP port on the pool's host.
Worker = str | int


def worker_order(
    listed: Sequence[Worker], counts: dict[Worker, int], refused_at: dict[Worker, float],
    now: float, after: Worker | None = None,
) -> tuple[list[Worker], bool]:
    """Where a pool's next connection is tried, in order: the `listed` workers not refused
    within `REFUSED_SKIP_S` of `now`, fewest of the pool's connections (`counts`) first,
    ties in turn: in listed order from the one after `after` (the worker last connected
    to; from the first when None or no longer listed); and whether any was left out (the
    connection is then off its place, to be made again after `RETIRE_S`).

    Ties in turn, not to the first: a pool finds nothing idle and connects at equal counts
    again and again (its connections ended by the upstream's keep-alive timeout in a lull,
    by `Connection: close` or after each HEAD), and ties to the first gave worker 0 every
    such connection, and the odd one of every burst."""
    start = listed.index(after) + 1 if after is not None and after in listed else 0
    turn = [*listed[start:], *listed[:start]]
    places = sorted((w for w in turn if now - refused_at.get(w, -REFUSED_SKIP_S)
                     >= REFUSED_SKIP_S), key=lambda w: counts.get(w, 0))
    return places, len(places) < len(listed)


log = logging.getLogger(__name__)

CONNECT_RETRIES = 3  # haproxy's `retries 3` in Neutron's config
# haproxy's turn-around timer before each retry, min(timeout connect, 1 s): an upstream being
# restarted (kill -9, respawned in ~1-2 s) costs a VM latency, not a 503 (bench/faults.py)
CONNECT_RETRY_DELAY_S = 1.0
# Our hops' servers queue at most 32 pipelined requests per connection before they pause
# reading (http.server.MAX_PIPELINE): a deeper batch would only wait in the socket.
MAX_PIPELINE_DEPTH = 32

# Hop-by-hop headers never forwarded (RFC 9110 §7.6.1), plus framing we recompute.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"expect", b"proxy-authorization",
})


class UpstreamResponse(RawResponse):
    """A complete upstream answer. Header names are lower-cased bytes.

    It is also the `RawResponse` a hop relays: its bytes exactly as received (`data`, the
    same object as `raw`), closing the client's connection after it when the upstream
    ended its own (`close`). A relaying hop hands it to its server as it is, with no
    second object per answer."""

    __slots__ = ("body", "headers", "keep_alive", "raw", "status")

    def __init__(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, raw: bytes,
        keep_alive: bool,
    ) -> None:
        self.data = raw
        self.close = not keep_alive
        self.status = status
        self.headers = headers
        self.body = body
        self.raw = raw
        self.keep_alive = keep_alive

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


# Receives the complete answer, or the UpstreamError (or bug) that ended the exchange.
ResultCallback = Callable[["UpstreamResponse | BaseException"], None]


class _Closed(Exception):
    """The connection closed; `got_bytes` says whether any answer had started."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__("connection closed")
        self.got_bytes = got_bytes


# Why a batch ended with requests unanswered (see `_Conn.begin_batch`).
CLOSED, OVERSIZED, UNFRAMED = "closed", "oversized", "unframed"

# Receives (connection, requests left unanswered in order, why, reason); called once per
# batch, also when every request was answered ([], "").
BatchEnd = Callable[["_Conn", "list[_QueuedSend]", str, str], None]


class _Conn(asyncio.Protocol):
    __slots__ = ("_batch", "_body", "_buf", "_done", "_headers", "_head_only", "_last_head",
                 "_last_framing", "_max", "_parser", "_raw", "_raw_len", "_status", "closed",
                 "deadline", "loop", "on_batch_end", "on_lost", "on_result", "retire", "timed_out",
                 "timer", "timer_at", "transport", "waiter", "worker")
    keep_fields = True  # pipelined answers: fill headers and body, as the parser does

    def __init__(self, max_response_bytes: int) -> None:
        self.transport: asyncio.Transport | None = None
        # Kept: asyncio.get_running_loop() is a getpid() syscall per call on Python 3.11.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.closed = False
        self.waiter: asyncio.Future[UpstreamResponse] | None = None
        self.on_result: ResultCallback | None = None
        # Callback exchanges: one timer per connection, moved lazily (see UpstreamPool.send).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0  # when it fires (kept: timer.when() is a call)
        self.deadline = 0.0
        self.timed_out = False
        self._max = max_response_bytes
        self._parser: httptools.HttpResponseParser | None = None
        self._raw: list[bytes] = []
        self._raw_len = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._status = 0
        self._head_only = False
        self._done = False
        # A pipelined batch: requests written, oldest first, and answer bytes not yet framed.
        self._batch: deque[_QueuedSend] = deque()
        self._buf = b""
        self.on_batch_end: BatchEnd | None = None
        # The last head `frame_answer` accepted here and its (status, keep-alive, body
        # length): see `_receive_batch`.
        self._last_head = b""
        self._last_framing = (0, False, 0)
        # worker_paths/ports: the worker address it is on, and the pool's count to take it off
        self.worker: Worker | None = None
        self.on_lost: Callable[[_Conn], None] | None = None
        self.retire = False  # made off its place: close when next taken (UpstreamPool)

    def _forget(self) -> None:
        on_lost = self.on_lost
        if on_lost is not None:
            self.on_lost = None
            on_lost(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check here.
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._forget()
        if self._batch:
            self._end_batch(CLOSED)
        elif self._pending():
            self._settle(_Closed(self._raw_len > 0))
        self._parser = None  # break the conn <-> parser cycle

    def _pending(self) -> bool:
        waiter = self.waiter
        return self.on_result is not None or (waiter is not None and not waiter.done())

    def _settle(self, result: UpstreamResponse | BaseException) -> None:
        """Hand the outcome to whoever waits: a callback (at once) or a future."""
        callback = self.on_result
        if callback is not None:
            self.on_result = None
            callback(result)
            return
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if isinstance(result, BaseException):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)

    def begin(self, data: bytes, head_only: bool) -> asyncio.Future[UpstreamResponse]:
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self._start(data, head_only)
        return self.waiter

    def begin_with_callback(
        self, data: bytes, head_only: bool, callback: ResultCallback, timeout_s: float,
    ) -> None:
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        self.waiter = None
        self.on_result = callback
        self.timed_out = False
        deadline = self.deadline = loop.time() + timeout_s
        self._arm(deadline)
        self._start(data, head_only)

    def begin_batch(
        self, batch: list[_QueuedSend], deadline: float, on_end: BatchEnd,
    ) -> None:
        """Write every request of `batch` (deadlines set; `deadline` the earliest) in one
        write. Each answer goes to its request's `on_result` as it is framed, in order;
        then `on_end` is called once: with [] when all were answered, else with the
        requests left and why."""
        loop = self.loop
        if loop is None:
            loop = self.loop = asyncio.get_running_loop()
        assert self.transport is not None and not self._batch
        self.on_result = None
        self.waiter = None
        self.timed_out = False
        self._batch.extend(batch)
        self._buf = b""
        self.on_batch_end = on_end
        self.deadline = deadline
        self._arm(deadline)
        self.transport.write(b"".join([item.data for item in batch]))

    def _receive_batch(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        size = len(buf)
        batch = self._batch
        start = 0
        while batch:
            item = batch[0]
            last = self._last_head
            if last and not item.head_only and buf.startswith(last, start):
                # An upstream answers with the same few heads (the API's, per document):
                # the head this connection framed last, found again at `start`, frames
                # the same (a head ends at its first blank line, which these bytes hold
                # once, at their end), without frame_answer's search, slice and lookup.
                body_start = start + len(last)
                status, keep_alive, length = self._last_framing
                end = body_start + length
            else:
                try:
                    framed = frame_answer(buf, start, item.head_only)
                except NotFramed as exc:
                    self._end_batch(UNFRAMED, str(exc))
                    return
                if framed is None:  # the head is still to come
                    if size - start > self._max:
                        self._end_batch(OVERSIZED, f"upstream answer exceeds {self._max} bytes")
                        return
                    break
                end, body_start, status, keep_alive = framed
                if not item.head_only:  # (a HEAD's answer frames without its length)
                    self._last_head = buf[start:body_start]
                    self._last_framing = (status, keep_alive, end - body_start)
            if end - start > self._max:
                self._end_batch(OVERSIZED, f"upstream answer exceeds {self._max} bytes")
                return
            if end > size:
                break  # the rest of this answer is still to come
            raw = buf if start == 0 and end == size else buf[start:end]
            if self.keep_fields:
                fields = header_fields(buf, start, body_start)
                body = buf[body_start:end]
            else:
                fields, body = [], b""
            batch.popleft()
            start = end
            try:
                item.on_result(UpstreamResponse(status, fields, body, raw, keep_alive))
            except Exception:  # one caller's bug must not strand the answers behind it
                log.exception("http.client.callback_failed")
            if not keep_alive:
                # The upstream ends the connection after this answer: none of the rest come.
                self.close()
                self._end_batch(CLOSED if batch else "")
                return
        self._buf = buf[start:] if start < size else b""
        if not batch:
            if self._buf:
                self.close()  # bytes nobody asked for: the connection is out of step
            self._end_batch("")

    def _end_batch(self, why: str, reason: str = "") -> None:
        """The batch is over: close unless every answer came, and tell the pool."""
        left = list(self._batch)
        self._batch.clear()
        self._buf = b""
        on_end = self.on_batch_end
        self.on_batch_end = None
        if why:
            self.close()
        if on_end is not None:
            on_end(self, left, why, reason)

    def _arm(self, deadline: float) -> None:
        """The connection's one timer fires by `deadline` (moved lazily: it may fire earlier
        and re-arm itself for `self.deadline`)."""
        timer = self.timer
        if timer is not None and self.timer_at > deadline:
            timer.cancel()
            timer = None
        if timer is None:
            assert self.loop is not None
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.on_result is None and not self._batch:
            return  # idle: the next exchange arms it again
        loop = self.loop or asyncio.get_running_loop()
        if self._batch:
            # The earliest deadline of the requests still unanswered (kept lazily: not
            # recomputed per answer, only when the timer fires).
            self.deadline = min(queued.deadline for queued in self._batch)
        if loop.time() < self.deadline:
            self.timer_at = self.deadline
            self.timer = loop.call_at(self.deadline, self._on_timer)
            return
        self.timed_out = True
        self.close()  # connection_lost settles the exchange

    def _start(self, data: bytes, head_only: bool) -> None:
        assert self.transport is not None
        if self._parser is None:
            # One parser per connection: llhttp starts over after each complete answer.
            self._parser = httptools.HttpResponseParser(self)
        self._raw = []
        self._raw_len = 0
        self._headers = []
        self._body = []
        self._status = 0
        self._head_only = head_only
        self._done = False
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self._batch:
            self._receive_batch(data)
            return
        if self._parser is None or (self.on_result is None and not self._pending()):
            # Bytes nobody asked for: the connection is out of step; drop it.
            self.close()
            return
        self._raw.append(data)
        self._raw_len += len(data)
        if self._raw_len > self._max:
            self.close()
            self._settle(UpstreamProtocolError(f"upstream answer exceeds {self._max} bytes"))
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.close()
            if self._pending():
                self._settle(UpstreamProtocolError(f"garbled upstream answer: {exc}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._status = self._parser.get_status_code()
        if self._head_only:
            # httptools cannot be told to skip a HEAD answer's body: finish here and never
            # reuse this connection. The answer's own keep-alive is still reported: a hop
            # relaying it must not close its client's connection (and drop the requests
            # pipelined after the HEAD) because of how we treat ours.
            keep_alive = bool(self._parser.should_keep_alive())
            self.close()
            self._complete(keep_alive=keep_alive)

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        if 100 <= self._status < 200:
            # Interim answer (e.g. 100 Continue): keep waiting for the final one.
            self._raw = []
            self._headers = []
            self._body = []
            return
        self._complete(keep_alive=bool(self._parser.should_keep_alive()))

    def _complete(self, *, keep_alive: bool) -> None:
        if self._done:
            return
        self._done = True
        raw = self._raw[0] if len(self._raw) == 1 else b"".join(self._raw)
        body = b"".join(self._body)
        if self._pending():
            self._settle(UpstreamResponse(self._status, self._headers, body, raw, keep_alive))

    def close(self) -> None:
        self.closed = True
        self._forget()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            self.transport.close()


class _QueuedSend:
    """A send() waiting for a connection slot or for its iteration's batch to be written."""

    __slots__ = ("data", "deadline", "head_only", "on_result", "queued_at", "safe",
                 "timeout_s")

    def __init__(
        self, queued_at: float, data: bytes, head_only: bool, on_result: ResultCallback,
        timeout_s: float | None,
    ) -> None:
        self.queued_at = queued_at
        self.data = data
        self.head_only = head_only
        self.on_result = on_result
        self.timeout_s = timeout_s
        self.deadline = 0.0  # set when it is written in a batch
        # GET or HEAD: safe to pipeline, and to send again if its answer was lost.
        self.safe = head_only or data.startswith(b"GET ")


def _report(
    task: asyncio.Future[UpstreamResponse], on_result: ResultCallback, where: str,
) -> None:
    if task.cancelled():
        on_result(UpstreamUnavailable(f"request to {where} cancelled"))
    else:
        on_result(task.exception() or task.result())


def _retire(conn: _Conn) -> None:
    conn.retire = True


class _SpreadIdle:
    """The idle connections of a pool with worker addresses: a LIFO per worker, taken
    from the one with the fewest of the pool's requests in flight (`held`, the pool's
    count of its connections per worker, less its idle ones), ties to the first from the
    turn on: the worker after the one taken last (with two, a tie goes to the one not
    taken last, so forced picks and ties alternate and neither is favoured).

    One LIFO for all split the requests unevenly however evenly the connections were (the
    connection answered first is taken first, and its worker gets the next request too:
    agent CPU 0.70/0.30 measured); the worker with the most idle ones is the fewest in
    flight only when each holds as many connections (a pool's odd one is on worker 0: API
    0.57-0.70 of the requests there)."""

    __slots__ = ("_by", "_count", "_held", "_queues", "_turn", "_workers")

    def __init__(self, held: dict[Worker, int]) -> None:
        self._held = held
        self._by: dict[Worker | None, deque[_Conn]] = {}
        self._queues: list[deque[_Conn]] = []  # the same deques, for the turn
        self._workers: list[Worker | None] = []  # each queue's worker
        self._count = 0
        self._turn = 0

    def __len__(self) -> int:
        return self._count

    def append(self, conn: _Conn) -> None:
        idle = self._by.get(conn.worker)
        if idle is None:
            idle = self._by[conn.worker] = deque()
            self._queues.append(idle)
            self._workers.append(conn.worker)
        idle.append(conn)
        self._count += 1

    def discard(self, conn: _Conn) -> None:
        """Take `conn` off its idle list if it is there (it closed while idle: left in,
        it would count as idle, its worker seeming to have one request fewer in flight,
        for as long as live connections above it keep it from being popped)."""
        idle = self._by.get(conn.worker)
        if idle is not None:
            try:
                idle.remove(conn)  # a scan of one worker's idle list, once per close
            except ValueError:
                return  # not idle: in use, or already taken
            self._count -= 1

    def pop(self) -> _Conn:
        if not self._count:
            raise IndexError("pop from an empty idle list")
        # Once per request on a spread pool: one pass over the queues, no lists built
        # (building them cost as much again as the pop).
        queues = self._queues
        workers = self._workers
        held = self._held
        count = len(queues)
        index = self._turn
        found = False
        best_index = best_busy = 0
        for _ in range(count):
            free = len(queues[index])
            if free:
                worker = workers[index]
                # The shared address (None) is not counted in `held`: nothing in flight is
                # assumed (its connections are off their place and retire within RETIRE_S).
                busy = 0 if worker is None else held.get(worker, 0) - free
                if not found or busy < best_busy:
                    found, best_index, best_busy = True, index, busy
            index = index + 1 if index + 1 < count else 0
        self._turn = best_index + 1 if best_index + 1 < count else 0
        self._count -= 1
        return queues[best_index].pop()


class _RawConn(_Conn):
    """A connection that keeps only the raw answer (for relaying): no per-header or body
    callbacks from the parser. Answers carry headers=[] and body=b""."""

    __slots__ = ()
    keep_fields = False
    on_header = None  # type: ignore[assignment]
    on_body = None  # type: ignore[assignment]


class UpstreamPool:
    """Keep-alive connections to one upstream; see the module docstring for the rules."""

    def __init__(
        self, *, unix_path: str | None = None, host: str | None = None, port: int | None = None,
        ssl: ssl_module.SSLContext | None = None, server_hostname: str | None = None,
        size: int = 64, connect_timeout_s: float = 5.0, timeout_s: float = 60.0,
        max_response_bytes: int = 16 * 1024 * 1024, raw_only: bool = False,
        connect_retries: int = 0, pipeline_depth: int = 1,
        worker_paths: Callable[[], list[str]] | None = None, worker_ports: Sequence[int] = (),
    ) -> None:
        if (unix_path is None) == (host is None):
            raise ValueError("UpstreamPool needs exactly one of unix_path or host")
        if worker_paths is not None and unix_path is None:
            raise ValueError("worker_paths needs unix_path (the socket every worker shares)")
        if worker_ports and host is None:
            raise ValueError("worker_ports needs host (and port, which every worker shares)")
        if not 1 <= pipeline_depth <= MAX_PIPELINE_DEPTH:
            raise ValueError(f"pipeline_depth must be 1-{MAX_PIPELINE_DEPTH}, "
                             f"not {pipeline_depth}")
        self.unix_path = unix_path
        self.host = host
        self.port = port
        self.ssl = ssl
        self.server_hostname = server_hostname
        self.size = size
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.max_response_bytes = max_response_bytes
        self.connect_retries = connect_retries
        self.pipeline_depth = pipeline_depth
        ports: list[Worker] = list(worker_ports)
        # the workers' own addresses now (socket files come and go; ports are configured)
        self._workers: Callable[[], Sequence[Worker]] | None = (
            worker_paths if worker_paths is not None else (lambda: ports) if ports else None)
        self._spread: dict[Worker, int] = {}  # worker -> this pool's connections on it
        self._refused_at: dict[Worker, float] = {}  # worker -> its last refused connect
        self._connected_last: Worker | None = None  # worker_order's turn for ties
        # send() calls of this loop iteration, written by _flush (pipeline_depth > 1 only)
        self._pending: list[_QueuedSend] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        # raw_only: answers are relayed verbatim; skip parsing headers and body into objects.
        self._conn_class = _RawConn if raw_only else _Conn
        self._idle: deque[_Conn] | _SpreadIdle = (
            deque() if self._workers is None else _SpreadIdle(self._spread))
        self._free = size  # connection slots not in use
        # Who waits for a slot, in order: request() futures, or send() calls (queued time,
        # arguments) that are started right from _release without a Task.
        self._slot_waiters: deque[asyncio.Future[None] | _QueuedSend] = deque()
        if unix_path is not None:
            self._host_header = b"localhost"
            self.where = f"unix:{unix_path}"
            self._host_text = ""
        else:
            hp = f"[{host}]" if host and ":" in host else str(host)
            self._host_header = f"{hp}:{port}".encode()
            self.where = f"{hp}:{port}"
            self._host_text = hp

    def connections_by_socket(self) -> dict[Worker, int]:
        """worker_paths/ports: this pool's open connections on each worker address."""
        return {worker: n for worker, n in self._spread.items() if n}

    async def _connect(self) -> _Conn:
        if self._workers is None:
            return await self._open(None)
        # Fewest of our connections first (see the module docstring): deterministic, where
        # the workers' accepts on a shared socket are not (one takes a whole burst), nor
        # SO_REUSEPORT's hash of a shared port.
        loop = asyncio.get_running_loop()
        counts = self._spread
        places, off_place = worker_order(self._workers(), counts, self._refused_at,
                                         loop.time(), self._connected_last)
        for worker in places:
            counts[worker] = counts.get(worker, 0) + 1  # at once: a burst's connects interleave
            self._connected_last = worker  # the next tie goes to the one after it
            try:
                conn = await self._open(worker)
            except UpstreamRefused:
                counts[worker] -= 1
                self._refused_at[worker] = loop.time()
                off_place = True
                continue
            except BaseException:
                counts[worker] -= 1
                raise
            conn.worker = worker
            conn.on_lost = self._lost
            break
        else:  # no worker address, or none accepts: the shared one
            conn = await self._open(None)
        if off_place:
            loop.call_later(RETIRE_S, _retire, conn)
        return conn

    def _lost(self, conn: _Conn) -> None:
        if conn.worker is not None:
            self._spread[conn.worker] -= 1
            if isinstance(self._idle, _SpreadIdle):
                self._idle.discard(conn)

    async def _open(self, worker: Worker | None) -> _Conn:
        """A new connection to `worker` (a Unix socket path, a TCP port on `host`), or with
        None to the pool's own address."""
        loop = asyncio.get_running_loop()
        max_bytes = self.max_response_bytes
        conn_class = self._conn_class
        if isinstance(worker, str):
            where, unix_path, port = f"unix:{worker}", worker, None
        elif isinstance(worker, int):
            where, unix_path, port = f"{self._host_text}:{worker}", None, worker
        else:
            where, unix_path, port = self.where, self.unix_path, self.port
        try:
            if unix_path is not None:
                coro = loop.create_unix_connection(lambda: conn_class(max_bytes), unix_path)
            else:
                assert self.host is not None and port is not None
                coro = loop.create_connection(
                    lambda: conn_class(max_bytes), self.host, port, ssl=self.ssl,
                    server_hostname=self.server_hostname if self.ssl else None,
                )
            _, conn = await asyncio.wait_for(coro, self.connect_timeout_s)
        except TimeoutError:
            raise UpstreamUnavailable(
                f"connect to {where} timed out after {self.connect_timeout_s}s"
            ) from None
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            raise UpstreamRefused(f"cannot connect to {where}: {exc}") from exc
        except (OSError, ssl_module.SSLError) as exc:
            raise UpstreamUnavailable(f"cannot connect to {where}: {exc}") from exc
        return conn

    def encode_request(
        self, method: str, target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes,
    ) -> bytes:
        """The request bytes: caller headers minus hop-by-hop ones, with our framing."""
        lines = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
        has_host = False
        for name, value in headers:
            low = name.lower()
            if low in HOP_BY_HOP:
                continue
            if low == b"host":
                has_host = True
            lines.append(name + b": " + value + b"\r\n")
        if not has_host:
            lines.append(b"Host: " + self._host_header + b"\r\n")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"Content-Length: " + str(len(body)).encode() + b"\r\n")
        lines.append(b"\r\n")
        if body:
            lines.append(body)
        return b"".join(lines)

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"", *, timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send one request and return the complete answer."""
        return await self.request_encoded(
            self.encode_request(method, target, headers, body), method == "HEAD", timeout_s)

    async def request_encoded(
        self, data: bytes, head_only: bool, timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """`request()` with bytes made by `encode_request`."""
        return await self._request_encoded(data, head_only, timeout_s, self.connect_retries)

    async def _request_encoded(
        self, data: bytes, head_only: bool, timeout_s: float | None, retries: int,
        *, written: bool = False, fresh: bool = False,
    ) -> UpstreamResponse:
        while True:
            await self._acquire()
            try:
                return await self._exchange(data, head_only, timeout_s, written=written,
                                            fresh=fresh)
            except UpstreamRefused:
                if retries <= 0:
                    raise
            finally:
                self._release()
            retries -= 1  # refused: nothing was sent; wait, slot given back, and again
            await asyncio.sleep(CONNECT_RETRY_DELAY_S)

    async def _exchange(
        self, data: bytes, head_only: bool, timeout_s: float | None, *, written: bool = False,
        fresh: bool = False,
    ) -> UpstreamResponse:
        """One request (already encoded) on a slot the caller holds. `written`: the request
        was already written on a connection once, so a refused connect is not retriable;
        `fresh`: on a new connection (so this is its only retry)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        for attempt in (0, 1):
            conn, reused = (None, False) if fresh else self._take_idle()
            if conn is None:
                try:
                    conn = await self._connect()
                except UpstreamRefused as exc:
                    if written:
                        raise UpstreamUnavailable(exc.reason) from exc
                    raise
            written = True
            try:
                resp = await asyncio.wait_for(conn.begin(data, head_only), timeout)
            except _Closed as exc:
                conn.close()
                if reused and not exc.got_bytes and attempt == 0:
                    continue
                raise UpstreamProtocolError(
                    f"{self.where} closed the connection before a complete answer"
                ) from None
            except TimeoutError:
                conn.close()
                raise UpstreamTimeout(
                    f"no answer from {self.where} within {timeout}s"
                ) from None
            except BaseException:
                conn.close()
                raise
            conn.waiter = None
            if resp.keep_alive and not conn.closed:
                self._idle.append(conn)
            else:
                conn.close()
            return resp
        raise AssertionError("unreachable")  # pragma: no cover

    async def _acquire(self) -> None:
        if self._free > 0:
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.connect_timeout_s)
        except TimeoutError:
            raise UpstreamUnavailable(
                f"all {self.size} connections to {self.where} busy"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        """Give a slot back, or straight to the next waiter."""
        if not self._slot_waiters:
            self._free += 1
            return
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if isinstance(waiter, asyncio.Future):
                if not waiter.done():
                    waiter.set_result(None)
                    return
                continue
            now = asyncio.get_running_loop().time()
            if self._expired(waiter, now):
                continue
            run = [waiter]
            while (len(run) < self.pipeline_depth and self._slot_waiters
                   and isinstance(self._slot_waiters[0], _QueuedSend)):
                queued = self._slot_waiters.popleft()
                assert isinstance(queued, _QueuedSend)
                if not self._expired(queued, now):
                    run.append(queued)
            started = self._start_with_slot(run, 0)
            self._slot_waiters.extendleft(reversed(run[started:]))
            return
        self._free += 1

    def _expired(self, queued: _QueuedSend, now: float) -> bool:
        """A queued send that waited longer than connect_timeout_s for a slot fails."""
        if now - queued.queued_at <= self.connect_timeout_s:
            return False
        queued.on_result(UpstreamUnavailable(f"all {self.size} connections to {self.where} busy"))
        return True

    def send(
        self, method: str, target: str, headers: Iterable[tuple[bytes, bytes]], body: bytes,
        on_result: ResultCallback, *, timeout_s: float | None = None,
    ) -> None:
        """`request()` for callback-style callers: `on_result(answer or error)` is called once.

        With an idle pooled connection, no Task, future or wait_for is involved and
        `on_result` runs straight from the read callback; a call finding every slot busy is
        queued and started by the `_release` that frees one. Only connecting and retrying a
        stale connection use a Task. Same rules and errors as `request()`.
        """
        self.send_encoded(self.encode_request(method, target, headers, body),
                          method == "HEAD", on_result, timeout_s=timeout_s)

    def send_encoded(
        self, data: bytes, head_only: bool, on_result: ResultCallback, *,
        timeout_s: float | None = None,
    ) -> None:
        """`send()` with the request bytes already made by `encode_request` (a hop that
        forwards the same request again and again keeps them)."""
        if self.pipeline_depth > 1:
            # Written by _flush once this iteration's callbacks are done, with the others.
            pending = self._pending
            pending.append(_QueuedSend(0.0, data, head_only, on_result, timeout_s))
            if len(pending) == 1:
                loop = self._loop
                if loop is None:
                    loop = self._loop = asyncio.get_running_loop()
                loop.call_soon(self._flush)
            return
        if self._free > 0:
            self._free -= 1
            self._send_with_slot(data, head_only, on_result, timeout_s)
        else:
            # All slots busy: queue; the next _release starts it (waiting at most
            # connect_timeout_s, checked when its turn comes).
            self._slot_waiters.append(_QueuedSend(
                asyncio.get_running_loop().time(), data, head_only, on_result, timeout_s))

    def _flush(self) -> None:
        """Start the send() calls this iteration queued, in order, each batch on one slot;
        past the pool's size they wait for a slot, as unpipelined ones do."""
        pending = self._pending
        self._pending = []
        start, count = 0, len(pending)
        while start < count:
            if self._free <= 0:
                assert self._loop is not None
                now = self._loop.time()
                for queued in pending[start:]:
                    queued.queued_at = now
                    self._slot_waiters.append(queued)
                return
            self._free -= 1
            try:
                start += self._start_with_slot(pending, start)
            except Exception as exc:  # a bug: fail that send, not the ones queued behind it
                self._release()
                pending[start].on_result(exc)
                start += 1

    def _start_with_slot(self, sends: list[_QueuedSend], start: int) -> int:
        """Start `sends[start:]` on the one slot the caller holds: up to pipeline_depth of
        them as a batch on an idle connection, or (alone, or no idle connection to share)
        only the first, unpipelined. Returns how many were started."""
        # Only GET and HEAD join a batch: a request that may change state (a POST of the
        # password) goes alone, so it keeps every rule of the unpipelined path and never
        # fails because of a neighbour's answer or a stale connection it shared.
        limit = min(start + self.pipeline_depth, len(sends))
        end = start
        while end < limit and sends[end].safe:
            end += 1
        count = end - start
        conn = self._take_idle()[0] if count > 1 else None
        if conn is None:
            first = sends[start]
            self._send_with_slot(first.data, first.head_only, first.on_result, first.timeout_s)
            return 1
        batch = sends[start:start + count]
        assert self._loop is not None
        now = self._loop.time()
        default = self.timeout_s
        earliest = float("inf")
        for queued in batch:
            deadline = queued.deadline = now + (
                default if queued.timeout_s is None else queued.timeout_s)
            if deadline < earliest:
                earliest = deadline
        conn.begin_batch(batch, earliest, self._batch_ended)
        return count

    def _batch_ended(
        self, conn: _Conn, left: list[_QueuedSend], why: str, reason: str,
    ) -> None:
        """Pool the connection again if every answer came; settle what is left (see the
        module docstring)."""
        if not why and not conn.closed:
            self._idle.append(conn)
        else:
            conn.close()
        self._release()
        if not left:
            return
        assert self._loop is not None
        now = self._loop.time()
        for index, queued in enumerate(left):
            if conn.timed_out and queued.deadline <= now:
                timeout = self.timeout_s if queued.timeout_s is None else queued.timeout_s
                queued.on_result(
                    UpstreamTimeout(f"no answer from {self.where} within {timeout}s"))
            elif index == 0 and why == OVERSIZED:
                queued.on_result(UpstreamProtocolError(reason))
            else:
                # Only GET and HEAD are batched (`_QueuedSend.safe`): once more, alone (where an
                # unframed answer is read by the full parser).
                self._retry_alone(queued)

    def _retry_alone(self, queued: _QueuedSend) -> None:
        task = asyncio.ensure_future(self._request_encoded(
            queued.data, queued.head_only, queued.timeout_s, 0, written=True, fresh=True))
        on_result = queued.on_result
        task.add_done_callback(lambda t: _report(t, on_result, self.where))

    def _send_with_slot(
        self, data: bytes, head_only: bool, on_result: ResultCallback, timeout_s: float | None,
    ) -> None:
        conn, _ = self._take_idle()
        if conn is None:  # connect first: that needs a Task
            task = asyncio.ensure_future(self._exchange_releasing(data, head_only, timeout_s))
            task.add_done_callback(lambda t: _report(t, on_result, self.where))
            return
        timeout = self.timeout_s if timeout_s is None else timeout_s

        def done(result: UpstreamResponse | BaseException) -> None:
            if isinstance(result, UpstreamResponse):
                if result.keep_alive and not conn.closed:
                    self._idle.append(conn)
                else:
                    conn.close()
                self._release()
                on_result(result)
                return
            conn.close()
            self._release()
            if conn.timed_out:
                on_result(UpstreamTimeout(f"no answer from {self.where} within {timeout}s"))
            elif isinstance(result, _Closed) and not result.got_bytes:
                # The upstream closed the idle connection first: once more, fresh (written
                # once already: a refused connect is not retried).
                task = asyncio.ensure_future(
                    self._request_encoded(data, head_only, timeout_s, 0, written=True))
                task.add_done_callback(lambda t: _report(t, on_result, self.where))
            elif isinstance(result, _Closed):
                on_result(UpstreamProtocolError(
                    f"{self.where} closed the connection before a complete answer"))
            else:
                on_result(result)

        conn.begin_with_callback(data, head_only, done, timeout)

    async def _exchange_releasing(
        self, data: bytes, head_only: bool, timeout_s: float | None,
    ) -> UpstreamResponse:
        try:
            return await self._exchange(data, head_only, timeout_s)
        except UpstreamRefused:
            if self.connect_retries <= 0:
                raise
        finally:
            self._release()
        await asyncio.sleep(CONNECT_RETRY_DELAY_S)
        return await self._request_encoded(data, head_only, timeout_s, self.connect_retries - 1)

    def _take_idle(self) -> tuple[_Conn | None, bool]:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                if conn.retire:  # made off its place (worker_paths): make it again
                    conn.close()
                    continue
                return conn, True
        return None, False

    async def close(self) -> None:
        """Close every idle connection."""
        while self._idle:
            conn = self._idle.pop()
            with contextlib.suppress(Exception):
                conn.close()
