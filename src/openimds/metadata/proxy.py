"""The namespace metadata proxy: one process, one event loop, a listener in every namespace.

Neutron runs one haproxy per router and per isolated network (about 4 MB each). Here one
process holds every listener: each listening socket is created inside its namespace
(`host.netns.socket_in_netns`) and then served from the same loop, about 1 KB per listener.

Listeners follow `[proxy] listeners_dir` (docs/architecture.md, "Proxy listener specs"). On
SIGHUP and every `rescan_interval` the proxy converges:
- a new spec opens a listener (IP_FREEBIND, so the address need not exist yet);
- a removed or changed spec closes its listener (an open socket keeps a deleted namespace
  alive, about 230 KB of kernel memory each);
- a namespace that was deleted, or deleted and made again under the same name, closes (and
  then reopens) the listener, found by comparing namespace inodes;
- a spec whose namespace does not exist yet, or whose bind fails, is retried at every scan.

Per request (`core.proxy_rules`): drop every VM-sent identity header, set X-Forwarded-For to
the TCP peer and X-Neutron-Router-ID / X-Neutron-Network-ID to the listener's, forward over
pooled keep-alive Unix-socket connections to the agent and relay its answer verbatim.
Agent unreachable -> 503, no answer in time -> 504, garbled -> 502, each with a one-line body;
the detail goes to the log, not to the VM.

A connection whose first read is one whole bodyless GET/HEAD that some VM sent before
(cloud-init: a new connection per request, the same bytes every time and from every VM) is
relayed from what was kept for those bytes, without parsing it again (`FirstRequests`):
the source's own headers are put into the kept request at the send.

A VM over a limit costs as little as possible: after the agent's rate-limit 429 the proxy
answers that source itself until the Retry-After ends (`LimitedSources`), and its own 429s
(those, and the per-source connection cap's) wait in a bounded tarpit before they leave
(`Tarpit`), so a VM that ignores them gets one answer per connection per delay.

Only one proxy runs per state_path: it holds an flock on `$state_path/proxy/proxy.lock` and
writes its pid to `$state_path/proxy/proxy.pid` once the first convergence is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import gc
import heapq
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from openimds.config import Settings, worker_sockets
from openimds.core.proxy_limits import Limited429, parse_limited_429
from openimds.core.proxy_rules import (
    REQUEST_ID_HEADER,
    ListenerSpec,
    guest_request_id,
    is_spec_filename,
    parse_listener_spec,
    peer_address,
    plan_listeners,
    proxy_headers,
    rewrite_headers,
    spec_name,
)
from openimds.errors import (
    BadRequest,
    OpenImdsError,
    UpstreamError,
    UpstreamTimeout,
)
from openimds.host.limits import raise_nofile_limit
from openimds.host.netns import netns_inode, socket_in_netns, socket_netns_inode
from openimds.http.client import CONNECT_RETRIES, UpstreamPool, UpstreamResponse
from openimds.http.server import (
    Abandonable,
    AnyResponse,
    Deferred,
    Handler,
    HttpProtocol,
    Limits,
    RawResponse,
    Request,
    Response,
    TimeoutCounts,
    closing_answer,
    error_response,
    parse_one,
)
from openimds.http.sockets import Accepted, Acceptor, SocketTransport
from openimds.log import access_line
from openimds.metadata.longpoll import is_long_poll, long_poll_timeout
from openimds.metrics import (
    HopStats,
    Metric,
    ServiceMetrics,
    counter,
    gauge,
    start_metrics_server,
)

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024
GC_THRESHOLD_0 = 20000
LOCK_WAIT_S = 0.5
_IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)
_IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
_MEMO_MAX = 4096  # agent-bound request templates kept (cleared when full)
_MEMO_TARGET_MAX = 256  # longer request targets are not kept
_RID_LINE = b"\r\n" + REQUEST_ID_HEADER + b": "
# Where the proxy's own headers go in a template (`Forwarder.template`): encoded in their
# place, then cut out. A NUL never comes in a parsed header, so the line is found only there.
_SPLICE = ((b"X-Openimds-Splice", b"\x00"),)
_SPLICE_LINE = b"X-Openimds-Splice: \x00\r\n"
_ADDED_MAX = 4096  # per listener: its sources' own header lines kept (cleared when full)
_FIRST_MEMO_MAX = 4096  # first reads kept for the fast path (the oldest goes first)
_FIRST_MAX = 1024  # longer first reads are not kept (they are the keys; cloud-init's ~200 B)
_READ_SIZE = 65536
# Plain ints: `|` on the socket module's IntFlag members is a Python call (~0.5 us).
_DONTWAIT = int(socket.MSG_DONTWAIT)  # the fast path's socket stays blocking: no ioctl
_DONTWAIT_MORE = _DONTWAIT | int(getattr(socket, "MSG_MORE", 0))
_FIRST_WAIT_EVENTS = select.EPOLLIN | select.EPOLLONESHOT  # (errors and hang-ups always)
_FIRST_WAIT_BATCH = 256  # ready waiting connections taken per wake-up (the rest: next one)

# One-line bodies the VM sees; the reason with paths and errno goes to our log only.
_VM_REASONS = {
    503: "the metadata agent is unavailable",
    504: "the metadata agent did not answer in time",
    502: "the metadata agent sent a bad answer",
}


@dataclass(frozen=True, slots=True)
class ProxyPaths:
    directory: Path
    pid_file: Path
    lock_file: Path
    listeners_dir: Path

    @classmethod
    def from_settings(cls, settings: Settings) -> ProxyPaths:
        directory = settings.path("proxy")
        return cls(directory, directory / "proxy.pid", directory / "proxy.lock",
                   Path(settings.proxy.listeners_dir))


def limits_from_settings(
    settings: Settings, timeouts: TimeoutCounts | None = None,
) -> Limits:
    """Neutron's [metadata_haproxy] timeouts applied to the client side (the connections
    they end counted in `timeouts`).

    haproxy's `timeout http-request` bounds receiving a request and `timeout client` bounds
    client inactivity; for a request both apply, so the shorter one wins. A VM that does not
    take its answers is inactive too: `timeout client` is also the write timeout.
    """
    h = settings.metadata_haproxy
    return Limits(
        timeouts=timeouts,
        request_timeout_s=min(h.timeout_http_request, h.timeout_client),
        keepalive_timeout_s=h.timeout_http_keep_alive,
        write_timeout_s=h.timeout_client,
        max_header_bytes=settings.proxy.max_header_bytes,
        max_body_bytes=settings.proxy.max_body_bytes,
    )


def pool_from_settings(settings: Settings, *, long_poll: bool = False) -> UpstreamPool:
    """The pool to the agent; `long_poll`: the one for held requests (`metadata.longpoll`)."""
    h = settings.metadata_haproxy
    return UpstreamPool(
        unix_path=settings.metadata_proxy_socket,
        size=settings.api.max_waits if long_poll else settings.proxy.upstream_pool_size,
        connect_timeout_s=h.timeout_connect,
        timeout_s=long_poll_timeout(settings) if long_poll else h.timeout_server,
        raw_only=True,
        # haproxy's `retries 3`: an agent being restarted (its socket refuses) costs a VM
        # latency, not a 503
        connect_retries=CONNECT_RETRIES,
        # held requests are never batched: one would hold the answers behind it
        pipeline_depth=1 if long_poll else settings.proxy.upstream_pipeline_depth,
        # the agent's workers' own sockets, when it has several: our connections split
        # evenly over them (the shared one gives a whole burst to one worker)
        worker_paths=functools.partial(worker_sockets, settings.metadata_proxy_socket),
    )


class _ErrorLog:
    """Failures logged at most once a second per kind, with a count."""

    __slots__ = ("_event", "_last", "_suppressed")

    def __init__(self, event: str = "proxy.upstream_failed") -> None:
        self._event = event
        self._last: dict[int, float] = {}
        self._suppressed: dict[int, int] = {}

    def report(self, status: int, reason: str) -> None:
        now = time.monotonic()
        if now - self._last.get(status, -10.0) < 1.0:
            self._suppressed[status] = self._suppressed.get(status, 0) + 1
            return
        self._last[status] = now
        more = self._suppressed.pop(status, 0)
        log.warning("%s status=%d reason=%s suppressed=%d", self._event, status, reason, more)


# -- over-limit answers: the proxy's own 429 for a limited source, and the tarpit ----------

LIMITED_RECHECK_S = 5.0  # longest the proxy answers for the agent before asking it again
LIMITED_MAX = 65536  # sources remembered at once, all listeners (a few hundred bytes each)
_EPISODE_GAP_S = 1.0  # a source back within this after its entry ran out: same episode
_LIMIT_LOG_PER_S = 10  # proxy.rate_limited lines per second, all sources (the rest counted)


class _Limited:
    """One source the agent limited: its 429, when it came, until when the proxy answers."""

    __slots__ = ("answer", "at", "until")

    def __init__(self, answer: Limited429, at: float, until: float) -> None:
        self.answer = answer
        self.at = at
        self.until = until


class LimitedSources:
    """Sources the agent answered 429 (rate limit), answered by the proxy itself until the
    agent's Retry-After ends, without an agent hop.

    Keyed per listener by source address: on one listener (one router or network) an
    address is one port, so one VM; a VM on another listener with the same address has its
    own table. At most `recheck_s` without asking the agent again (a port deleted and its
    address given to a new VM costs that VM at most this long), at most `max_entries` in
    all (beyond, the agent keeps answering, as without this table). Requests answered here
    do not reach the agent, so they are not counted there: a source that ignores
    Retry-After still gets no more than its budget, one agent hop per Retry-After.
    """

    __slots__ = ("answered", "episodes", "live", "max_entries", "recheck_s", "_clock",
                 "_expiry", "_log_budget", "_log_second", "_seq", "_suppressed")

    def __init__(self, *, max_entries: int = LIMITED_MAX, recheck_s: float = LIMITED_RECHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.max_entries = max_entries
        self.recheck_s = recheck_s
        self.answered = 0  # 429s sent by the proxy itself
        self.episodes = 0  # sources newly limited
        self.live = 0  # entries in the tables
        # (until, seq, table, host, entry): swept when they ran out, so that tables of
        # sources that went quiet (or of closed listeners) do not keep them
        self._expiry: list[tuple[float, int, dict[str, _Limited], str, _Limited]] = []
        self._seq = 0
        self._log_second = 0
        self._log_budget = _LIMIT_LOG_PER_S
        self._suppressed = 0

    def learn(self, table: dict[str, _Limited], host: str, raw: bytes, scope: str) -> None:
        """An agent's 429 for `host` on the listener of `table`: remember it."""
        now = self._clock()
        prev = table.get(host)
        if prev is not None and prev.until > now:
            return  # requests in flight before the first 429 came back: already known
        answer = parse_limited_429(raw)
        if answer is None:
            return
        self.sweep(now)
        known = table.get(host) is not None
        if not known and self.live >= self.max_entries:
            return
        entry = _Limited(answer, now, now + min(float(answer.retry_after), self.recheck_s))
        if not known:
            self.live += 1
        table[host] = entry
        self._seq += 1
        heapq.heappush(self._expiry, (entry.until, self._seq, table, host, entry))
        if prev is None or now - prev.until > _EPISODE_GAP_S:
            self.episodes += 1
            self._log(now, f"ip={peer_address(host)} {scope} retry_after={answer.retry_after}")

    def refusal(self, table: dict[str, _Limited], host: str,
                entry: _Limited) -> Response | None:
        """The 429 for a remembered source, or None once its time ran out (ask the agent)."""
        now = self._clock()
        if now >= entry.until:
            self.sweep(now)
            return None
        self.answered += 1
        elapsed = now - entry.at
        answer = entry.answer
        return error_response(429, answer.body_reason(elapsed), headers=answer.headers(elapsed))

    def sweep(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] + _EPISODE_GAP_S <= now:
            _, _, table, host, entry = heapq.heappop(expiry)
            if table.get(host) is entry:
                del table[host]
                self.live -= 1

    def _log(self, now: float, what: str) -> None:
        # One line per source and episode, and at most _LIMIT_LOG_PER_S a second in all: a
        # thousand limited VMs must not flood the log either.
        second = int(now)
        if second != self._log_second:
            self._log_second, self._log_budget = second, _LIMIT_LOG_PER_S
        if self._log_budget <= 0:
            self._suppressed += 1
            return
        self._log_budget -= 1
        more, self._suppressed = self._suppressed, 0
        log.warning("proxy.rate_limited %s (answered by the proxy until then) suppressed=%d",
                    what, more)


class _Held(Deferred):
    """An answer the tarpit holds: sent when its timer fires, dropped with its connection."""

    __slots__ = ("_counts", "_host", "_response", "_tarpit", "_timer")

    def __init__(self, tarpit: Tarpit, counts: dict[str, int], host: str,
                 response: AnyResponse) -> None:
        super().__init__()
        self._tarpit: Tarpit | None = tarpit
        self._counts = counts
        self._host = host
        self._response = response
        self._timer: asyncio.TimerHandle | None = None

    def fire(self) -> None:
        self._timer = None
        self._release()
        self.resolve(self._response)

    def cancel(self) -> None:
        """The connection went (or the proxy stops): nothing is sent, the slot is free."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._release()

    def _release(self) -> None:
        tarpit = self._tarpit
        if tarpit is None:
            return
        self._tarpit = None
        tarpit.held -= 1
        tarpit.live.discard(self)
        n = self._counts.get(self._host, 0) - 1
        if n > 0:
            self._counts[self._host] = n
        else:
            self._counts.pop(self._host, None)


class Tarpit:
    """Over-limit and over-cap 429s wait `delay_s` before they leave (`[proxy]
    tarpit_delay`): a VM that ignores Retry-After and asks again at once gets at most one
    answer per connection per delay, instead of thousands a second that each cost the
    node a request's CPU. A held answer is a timer and nothing else (its connection exists
    anyway: answered at once, the VM would just reconnect). At most `per_source` held per
    VM address and listener and `max_held` in all; beyond, the answer goes at once. Only
    answers that are 429 anyway are held: a VM within its limits never waits."""

    __slots__ = ("delay_s", "delayed", "held", "live", "max_held", "overflow", "per_source")

    def __init__(self, delay_s: float = 0.0, per_source: int = 128,
                 max_held: int = 4096) -> None:
        self.delay_s = delay_s
        self.per_source = per_source
        self.max_held = max_held
        self.held = 0
        self.delayed = 0  # answers held (counter)
        self.overflow = 0  # answers sent at once because a bound was reached
        self.live: set[_Held] = set()

    def hold(self, counts: dict[str, int], host: str,
             response: AnyResponse) -> AnyResponse | Deferred:
        """`response` to be sent after the delay (a Deferred), or at once if off or full.
        `counts`: the listener's held answers per source."""
        if self.delay_s <= 0:
            return response
        n = counts.get(host, 0)
        if n >= self.per_source or self.held >= self.max_held:
            self.overflow += 1
            return response
        counts[host] = n + 1
        self.held += 1
        self.delayed += 1
        held = _Held(self, counts, host, response)
        held._timer = asyncio.get_running_loop().call_later(self.delay_s, held.fire)
        self.live.add(held)
        return held

    def release_all(self) -> None:
        """Shutdown: every held answer dropped, its timer cancelled."""
        for held in list(self.live):
            held.cancel()


class Route:
    """What the forwarder keeps per listener: its spec, its sources the agent limited
    (`LimitedSources`), its tarpitted answers per source, and each source's identity
    header lines (`added_for`)."""

    __slots__ = ("added", "held", "limited", "scope", "spec")

    def __init__(self, spec: ListenerSpec, held: dict[str, int]) -> None:
        self.spec = spec
        self.held = held
        # Empty unless some VM is over its budget: then one dict lookup per request.
        self.limited: dict[str, _Limited] = {}
        self.added: dict[str, bytes] = {}
        self.scope = (f"router={spec.router_id}" if spec.router_id else
                      f"network={spec.network_id}")

    def added_for(self, host: str) -> bytes:
        """The header lines the proxy sets for `host` on this listener (`proxy_headers`:
        X-Forwarded-For and the router or network ID), CRLF between them, none after: what
        goes into a `Forwarder.template`. Kept per source (bounded: sources are many)."""
        lines = self.added.get(host)
        if lines is None:
            if len(self.added) >= _ADDED_MAX:
                self.added.clear()
            lines = b"\r\n".join(name + b": " + value
                                  for name, value in proxy_headers(host, self.spec))
            self.added[host] = lines
        return lines


class Forwarder:
    """Relays requests to the agent; shared by every listener."""

    def __init__(
        self, pool: UpstreamPool, *, token_hop_limit: int = 1, access_log: bool = False,
        long_poll: UpstreamPool | None = None,
        count: bool = True, tarpit: Tarpit | None = None, first_memo: int = _FIRST_MEMO_MAX,
    ) -> None:
        self.pool = pool
        self.tarpit = tarpit or Tarpit()  # default: off (delay 0)
        self.limited = LimitedSources()
        self.long_poll = long_poll or pool  # held requests (wait_for_change): own pool
        self.token_hop_limit = token_hop_limit  # IP TTL of PUT (token) answers
        self._errors = _ErrorLog()
        self.hop = HopStats("proxy")  # /metrics (openimds.metrics), read at scrape time
        self.access_log = access_log
        # off ([metrics] enabled = false): no counting at all, not even the plain ints
        self.timed = count or access_log
        self.count = count
        # Request IDs: <8 random hex>-<sequence in hex>, unique per process and start.
        self._id_prefix = os.urandom(4).hex().encode() + b"-"
        self._id_seq = 0
        # The bytes sent to the agent are the request's (rewritten and encoded: ~3 µs) with
        # the proxy's own header lines, which alone depend on the listener and the peer, in
        # one place: kept per request as a template around that place (`template`), so
        # every VM and listener asking for the same paths with the same headers shares one
        # (a boot storm: ~28 for 1,000 VMs, not 28,000). Bounded: keys are VM-chosen.
        self._encoded: dict[tuple[object, ...], _Template | None] = {}
        # What a read comes to, by its bytes: the fast path (`KeptReads`), for every
        # listener of this forwarder (they share one `Limits`, under which a read parses).
        # At most `first_memo` entries (0: no fast path).
        self.first_memo = first_memo
        self.first: dict[bytes, _Hit | None] = {}
        self.first_limits: Limits | None = None
        self.first_hits = 0  # requests answered by the fast path
        self.first_waits: _FirstWaits | None = None  # shared by the listeners' acceptors

    def route(self, spec: ListenerSpec, held: dict[str, int] | None = None) -> Route:
        """One listener's state here; `held`: its tarpit's answers per source (shared with
        its connection cap)."""
        return Route(spec, held if held is not None else {})

    def handler_for(self, spec: ListenerSpec, held: dict[str, int] | None = None,
                    route: Route | None = None) -> Handler:
        """The request handler of one listener (of `route`, else a new one for `spec`)."""
        r = route if route is not None else self.route(spec, held)
        forward = self.forward
        limited = r.limited
        refusal = self.limited.refusal
        hold = self.tarpit.hold
        held_here = r.held
        encoded_for = self.encoded_for
        hop = self.hop
        scope = r.scope
        count, timed = self.count, self.timed

        def handle(req: Request) -> AnyResponse | Deferred | Awaitable[AnyResponse]:
            if count:
                hop.begun += 1
            t0 = perf_counter() if timed else 0.0
            host = req.peer[0] if req.peer else "0.0.0.0"
            if limited:
                known = limited.get(host)
                if known is not None:
                    denied = refusal(limited, host, known)
                    if denied is not None:
                        self._observe(req.method, req.path, 429, t0, self.new_rid(), host,
                                      scope)
                        return hold(held_here, host, denied)
            head, tail, rid = encoded_for(r, req, host)
            if rid is None:
                self._id_seq += 1
                rid = self._id_prefix + b"%x" % self._id_seq
            data = b"".join((head, _RID_LINE, rid, tail))
            if is_long_poll(req.query):
                return Abandonable(self._forward_held(req, data, t0, rid, host, scope,
                                                      limited))
            return forward(req, data, t0, rid, host, scope, limited)

        return handle

    def encoded_for(self, r: Route, req: Request, host: str) -> tuple[bytes, bytes, bytes | None]:
        """The agent-bound request for `req` from `host` on `r`'s listener: the head up to
        where the request ID goes, the rest, and the guest's own request ID (or None)."""
        t = self.template(req)
        if t is not None:
            return t.before + r.added_for(host) + t.after, t.tail, t.rid
        whole = self.pool.encode_request(
            req.method, req.target, rewrite_headers(req.headers, proxy_headers(host, r.spec)),
            req.body)
        cut = whole.index(b"\r\n\r\n")  # where the request ID goes: the header block's end
        return whole[:cut], whole[cut:], guest_request_id(req.headers)

    def template(self, req: Request) -> _Template | None:
        """`req` as the agent gets it, around the place of the proxy's own header lines
        (`Route.added_for`); None for a request with a body or a long target (not kept)."""
        if req.body or len(req.target) > _MEMO_TARGET_MAX:
            return None
        key = (req.method, req.target, *req.headers)
        encoded = self._encoded
        t = encoded.get(key, _UNMADE)
        if t is _UNMADE:
            t = _Template.of(req, self.pool.encode_request(
                req.method, req.target, rewrite_headers(req.headers, _SPLICE), req.body))
            if len(encoded) >= _MEMO_MAX:
                encoded.clear()
            encoded[key] = t
        return t

    def new_rid(self) -> bytes:
        self._id_seq += 1
        return self._id_prefix + b"%x" % self._id_seq

    def forward(
        self, req: Request, data: bytes, t0: float, rid: bytes, host: str, scope: str,
        limited: dict[str, _Limited] | None = None,
    ) -> Deferred:
        """Send the encoded request upstream; the answer is written to the client from the
        upstream's read callback (no Task, no future per request). A rate-limit 429 is
        remembered in `limited` (the listener's table) for the source's next requests."""
        reply = Deferred()
        head_only = req.method == "HEAD"

        def done(result: UpstreamResponse | BaseException) -> None:
            resp, status = self.answer_of(result, limited, host, scope)
            self._observe(req.method, req.path, status, t0, rid, host, scope)
            reply.resolve(resp)

        self.pool.send_encoded(data, head_only, done)
        return reply

    def answer_of(
        self, result: UpstreamResponse | BaseException, limited: dict[str, _Limited] | None,
        host: str, scope: str,
    ) -> tuple[AnyResponse, int]:
        """The VM's answer to what the pool gave (the agent's, relayed verbatim, or ours for
        a failure) and its status; a rate-limit 429 is remembered in `limited`."""
        if isinstance(result, UpstreamResponse):
            if result.status == 429 and limited is not None:
                self.limited.learn(limited, host, result.raw, scope)
            return RawResponse(result.raw, close=not result.keep_alive), result.status
        if isinstance(result, UpstreamError):
            return self._failed(result)
        log.error("proxy.forward_failed error=%r", result)
        return error_response(500, "metadata proxy error"), 500

    def _observe(
        self, method: str, path: str, status: int, t0: float, rid: bytes, host: str,
        scope: str,
    ) -> None:
        if not self.timed:  # [metrics] enabled = false and no access line
            return
        seconds = perf_counter() - t0
        if self.count:
            self.hop.done(status, path, seconds)
        if self.access_log and access_line.enabled:
            access_line.write(
                f"proxy request_id={rid.decode('latin-1')} ip={host} {scope} "
                f"status={status} ms={seconds * 1000.0:.2f} method={method} "
                f"path={path}")

    async def _forward_held(
        self, req: Request, data: bytes, t0: float, rid: bytes, host: str, scope: str,
        limited: dict[str, _Limited] | None = None,
    ) -> AnyResponse:
        """A held request (wait_for_change), over the long-poll pool, as a task: when the
        VM gives up, the server cancels it, which closes the upstream connection, and so on
        up to the API, which then stops holding it."""
        resp: AnyResponse
        try:
            upstream = await self.long_poll.request_encoded(data, req.method == "HEAD")
        except UpstreamError as exc:
            resp, status = self._failed(exc)
        else:
            resp = RawResponse(upstream.raw, close=not upstream.keep_alive)
            status = upstream.status
            if status == 429 and limited is not None:
                self.limited.learn(limited, host, upstream.raw, scope)
        self._observe(req.method, req.path, status, t0, rid, host, scope)
        return resp

    def metric_families(self) -> list[Metric]:
        """The proxy's own 429s and the tarpit, for /metrics."""
        lim, tp = self.limited, self.tarpit
        return [
            counter("openimds_rate_limited",
                    "Requests refused (429) by [metadata_rate_limiting]", lim.answered,
                    hop="proxy"),
            gauge("openimds_proxy_rate_limited_sources",
                  "VM addresses the proxy answers 429 for until their Retry-After ends",
                  lim.live),
            counter("openimds_proxy_rate_limited_episodes",
                    "VM addresses newly limited (one proxy.rate_limited line each)",
                    lim.episodes),
            gauge("openimds_proxy_tarpit_held", "429 answers held by the tarpit now",
                  tp.held),
            counter("openimds_proxy_tarpit_delayed", "429 answers held before sending",
                    tp.delayed),
            counter("openimds_proxy_tarpit_overflow",
                    "429 answers sent at once: tarpit full for that address or in all",
                    tp.overflow),
            # (named when only first reads took the fast path; the name is kept)
            counter("openimds_proxy_first_request_hits",
                    "Requests relayed by the fast path (a read kept by its bytes: a "
                    "connection's first read or a later read of a keep-alive connection)",
                    self.first_hits),
            gauge("openimds_proxy_first_request_kept",
                  "Reads kept for the fast path (bounded; the oldest goes first)",
                  len(self.first)),
        ]

    def _failed(self, exc: UpstreamError) -> tuple[Response, int]:
        status = 504 if isinstance(exc, UpstreamTimeout) else exc.status
        self._errors.report(status, exc.reason)
        self.hop.upstream_error(status)
        return error_response(status, _VM_REASONS.get(status, "metadata proxy error")), status


class _Template:
    """An agent-bound request without the proxy's own header lines: the head is `before`
    + those lines + `after`, then the request ID line, then `tail` (the header block's end,
    and the body). `rid`: the guest's own request ID, or None."""

    __slots__ = ("after", "before", "rid", "tail")

    def __init__(self, before: bytes, after: bytes, tail: bytes, rid: bytes | None) -> None:
        self.before = before
        self.after = after
        self.tail = tail
        self.rid = rid

    @staticmethod
    def of(req: Request, spliced: bytes) -> _Template | None:
        """From `req` encoded with `_SPLICE` in place of the proxy's headers; None if the
        encoding did not put that line once (then each request is encoded whole)."""
        at = spliced.find(_SPLICE_LINE)
        if at < 0 or spliced.find(_SPLICE_LINE, at + 1) >= 0:
            return None
        # the lines put in have no CRLF after the last one: it starts `rest`
        rest = spliced[at + len(_SPLICE_LINE) - 2:]
        cut = rest.index(b"\r\n\r\n")  # where the request ID goes
        return _Template(spliced[:at], rest[:cut], rest[cut:], guest_request_id(req.headers))


_UNMADE = _Template(b"", b"", b"", None)


class SourceCap:
    """Open connections per source address of one listener, capped (`[proxy]
    max_connections_per_source`): one VM cannot take the proxy's sockets from the others.

    A connection over the cap is answered 429 (Retry-After: 1, Connection: close) once its
    request arrived, and closed after OVER_CAP_TIMEOUT_S if none does: it never counts, never
    reaches the agent, and costs its fd for at most that long. The answer goes through the
    tarpit (`tarpit`, `held`: the listener's held answers per source), so a VM reconnecting
    in a loop gets one refusal per connection per delay.
    """

    __slots__ = ("cap", "counts", "held", "rejected", "tarpit", "_log")

    def __init__(self, cap: int, held: dict[str, int] | None = None) -> None:
        self.cap = cap
        self.counts: dict[str, int] = {}
        self.rejected = 0
        self._log = _ErrorLog("proxy.connection_cap")
        self.tarpit: Tarpit | None = None  # set by the listener when it starts
        self.held: dict[str, int] = held if held is not None else {}

    def take(self, host: str) -> bool:
        n = self.counts.get(host, 0)
        if n >= self.cap:
            self.rejected += 1
            self._log.report(429, f"ip={host} open={n} cap={self.cap}")
            return False
        self.counts[host] = n + 1
        return True

    def release(self, host: str) -> None:
        n = self.counts.get(host, 0) - 1
        if n > 0:
            self.counts[host] = n
        else:
            self.counts.pop(host, None)

    def refusal(self) -> RawResponse:
        return RawResponse(error_response(
            429, f"too many connections from this address (at most {self.cap} at once)",
            headers=[("Retry-After", "1")]).encode(keep_alive=False), close=True)

    def refuser(self, host: str) -> Handler:
        """The handler of a connection over the cap: its refusal, through the tarpit."""
        refusal = self.refusal()
        tarpit = self.tarpit
        if tarpit is None or tarpit.delay_s <= 0:
            return lambda _req: refusal
        hold, held = tarpit.hold, self.held
        return lambda _req: hold(held, host, refusal)


OVER_CAP_TIMEOUT_S = 2.0


def _set_hop_limit(sock: object, hops: int) -> None:
    """IP TTL (and IPv6 hop limit) of the packets this socket sends; -1 = the default."""
    family = getattr(sock, "family", socket.AF_INET)
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:
        return
    try:
        if family == socket.AF_INET6:
            setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
            with contextlib.suppress(OSError):  # v4-mapped peers of a dual-stack socket
                setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)
        else:
            setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)
    except OSError as exc:
        log.warning("proxy.hop_limit_failed hops=%d error=%s", hops, exc)


class _ClientProtocol(HttpProtocol):
    """A client connection that its listener can close (each one pins the namespace too).

    An answer to a PUT (the IMDSv2 token request) leaves with IP TTL / hop limit
    `[api] token_hop_limit`, AWS's HttpPutResponseHopLimit: with 1, a container routed or
    NATed behind the VM (one more hop, TTL decremented to 0 there) never sees the token. The
    socket keeps that TTL until the next non-PUT answer on the connection is written, so a
    retransmission of the token answer is limited too.

    A read at a request boundary that is a kept one (`KeptReads`) and keeps the connection
    open goes straight to the agent, as a started request of this connection: its answer
    is written like any other (in order, the timeouts and the hop limit as always); the
    parser, the `Request` and the handler are skipped.
    """

    __slots__ = ("_cap", "_conns", "_hops", "_kept", "_lowered", "_own", "_source")

    def __init__(
        self, handler: Handler, limits: Limits,
        loop: asyncio.AbstractEventLoop, conns: set[Connection],
        cap: SourceCap | None = None, token_hop_limit: int = 1, answered: bool = False,
        kept: KeptReads | None = None,
    ) -> None:
        super().__init__(handler, limits, loop)
        # its first request was answered by the fast path: a later quiet spell is `idle`
        self._answered = answered
        self._kept = kept
        self._conns = conns
        self._own: SocketTransport | None = None
        self._cap = cap
        self._source: str | None = None
        self._hops = token_hop_limit
        self._lowered = False

    def _send(self, req: Request, resp: AnyResponse) -> None:
        if req.method == "PUT":
            if not self._lowered and self._own is not None:
                _set_hop_limit(self._own.get_extra_info("socket"), self._hops)
                self._lowered = True
        elif self._lowered and self._own is not None:
            _set_hop_limit(self._own.get_extra_info("socket"), -1)
            self._lowered = False
        super()._send(req, resp)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._own = transport  # type: ignore[assignment]  # always a SocketTransport
        self._conns.add(transport)  # type: ignore[arg-type]
        super().connection_made(transport)
        cap = self._cap
        if cap is not None:
            host = self._peer[0] if self._peer else ""
            if cap.take(host):
                self._source = host
            else:
                self._handler = cap.refuser(host)
                self._kept = None  # every request gets the refusal
                self._arm(OVER_CAP_TIMEOUT_S)
                return
        if self._answered:  # idle as after an answer, not waiting for a first request
            self._arm(self._limits.keepalive_timeout_s)

    def data_received(self, data: bytes) -> None:
        kept = self._kept
        # At a request boundary with nothing unanswered (a client that pipelines while an
        # answer is pending takes the parser: its requests queue behind that one).
        if (kept is not None and not self._pending and not self._queue
                and not self._in_request and self._last_keep_alive and self._failure is None
                and not self._closing and not self._write_paused and self._peer is not None):
            host = self._peer[0]
            hit = kept.hit(host, data)
            if hit is not None and hit.keep_alive and kept.admits(host):
                kept.send(host, hit, self.begin_answer(hit.req))
                return
        super().data_received(data)

    def eof_received(self) -> bool | None:
        held = self._deferred
        if held is not None and type(held) is _Held:
            # A VM that hangs up while its 429 is held gets none: answered at the EOF, a
            # half-close after each request would skip the tarpit.
            held.cancel()
            return None  # the transport closes
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        held = self._deferred
        if held is not None and type(held) is _Held:  # a tarpitted 429: its timer goes too
            held.cancel()
        if self._own is not None:
            self._conns.discard(self._own)
            self._own = None
        if self._source is not None and self._cap is not None:
            self._cap.release(self._source)
            self._source = None
        super().connection_lost(exc)


class Listener:
    """One open listening socket in one namespace, and its client connections."""

    __slots__ = ("cap", "conns", "held", "netns_inode", "server", "spec")

    def __init__(self, spec: ListenerSpec, inode: int,
                 max_connections_per_source: int | None = None) -> None:
        self.spec = spec
        self.netns_inode = inode
        self.server: Acceptor | None = None
        self.conns: set[Connection] = set()
        self.held: dict[str, int] = {}  # tarpitted answers per source (Tarpit)
        self.cap = (SourceCap(max_connections_per_source, self.held)
                    if max_connections_per_source is not None else None)

    async def start(self, sock: socket.socket, forwarder: Forwarder, limits: Limits) -> None:
        """Serve the listening socket. Connections are served off their accepted sockets
        (`http.sockets`): a VM that asks once per connection costs accept, recv, send
        and close, not an event-loop transport (docs/benchmarks.md, "Toward the limit")."""
        loop = asyncio.get_running_loop()
        route = forwarder.route(self.spec, self.held)
        handler = forwarder.handler_for(self.spec, route=route)
        conns = self.conns
        cap = self.cap
        if cap is not None:
            cap.tarpit = forwarder.tarpit
        hops = forwarder.token_hop_limit

        kept = KeptReads(forwarder, route, limits) if forwarder.first_memo > 0 else None

        def client(answered: bool = False) -> _ClientProtocol:
            return _ClientProtocol(handler, limits, loop, conns, cap, hops, answered, kept)

        # Accepted sockets inherit it: answers are not held back by Nagle's algorithm.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kept is not None:
            self.server = FirstRequests(loop, sock, client, kept, cap, conns)
        else:
            self.server = Acceptor(loop, sock, client)

    def close(self) -> None:
        """Stop listening and close every client connection: nothing pins the namespace."""
        if self.server is not None:
            self.server.close()
        for transport in list(self.conns):
            transport.abort()
        self.conns.clear()


# -- the fast path: a read that is one whole request, kept by its bytes --------------------

class _Hit:
    """What the slow path makes of one read: the agent-bound request (its `_Template`: the
    source's header lines go after `before`, the request ID after `after_rid`; the guest's
    own ID or None), and what answering it depends on."""

    __slots__ = ("after_rid", "answer_head", "before", "closing_head", "head_only",
                 "keep_alive", "method", "path", "req", "rid", "tail")

    def __init__(self, t: _Template, req: Request) -> None:
        self.before = t.before
        self.after_rid = t.after + _RID_LINE
        self.tail = t.tail
        self.rid = t.rid
        self.req = req  # as parsed (peer None); never changed, so shared by its hits
        self.method = req.method
        self.path = req.path
        self.head_only = req.method == "HEAD"
        self.keep_alive = req.keep_alive
        # The last answer's head and its `closing_answer` (`closing`): the agent answers a
        # request with the same head again and again (the document's ETag, length, type).
        self.answer_head = b""
        self.closing_head = b""

    def closing(self, data: bytes) -> bytes:
        """`closing_answer(data)`: the answer framed for a connection that ends after it.
        A head seen last time is not searched and rewritten again (~0.25 µs of ~0.45)."""
        head = self.answer_head
        if head and data.startswith(head):
            # (`head` ends at its first blank line, so `data`'s first one is at the same place)
            return self.closing_head + data[len(head):]
        out = closing_answer(data)
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            end += 4
            self.answer_head = data[:end]
            self.closing_head = out[:len(out) - (len(data) - end)]
        return out


_UNSEEN = _Hit(_UNMADE, Request("GET", "/", [], b"", "1.1", False, None))


class KeptReads:
    """A listener's reads that are exactly one complete bodyless GET/HEAD, kept by their
    bytes: for a connection's first read (`FirstRequests`) and for each later read of a
    keep-alive connection at a request boundary (`_ClientProtocol.data_received`).

    A VM sends the same bytes again and again (cloud-init: a connection per request; a
    keep-alive client: the same few paths), and every VM sends the same bytes as the others
    (the same cloud-init). Everything the slow path makes of such a read (parse, header
    rewrite, the agent-bound bytes, keep-alive) is a function of those bytes, but for the
    proxy's own header lines, which depend on the listener and the peer address and are
    put in at the send (`Route.added_for`); so it is kept (`Forwarder.first`, keyed by the
    bytes) and a later copy from any VM on any listener goes straight to the agent. The
    entry is made by the slow path's own code: `parse_one` (None for a partial, pipelined,
    malformed, upgrade or `Expect` read) and `Forwarder.template`. A long poll is not kept.
    """

    __slots__ = ("fwd", "limits", "memo", "route")

    def __init__(self, forwarder: Forwarder, route: Route, limits: Limits) -> None:
        if forwarder.first_limits is None:
            forwarder.first_limits = limits
        elif forwarder.first_limits is not limits:  # a read kept under one, hit under another
            raise ValueError("the listeners of one Forwarder must share one Limits")
        self.fwd = forwarder
        self.route = route
        self.limits = limits
        self.memo = forwarder.first

    def hit(self, host: str, data: bytes) -> _Hit | None:
        """What `data` from `host` comes to (None: not for the fast path)."""
        if len(data) > _FIRST_MAX:
            return None
        hit = self.memo.get(data, _UNSEEN)
        if hit is _UNSEEN:  # (only reads that passed this test are kept)
            if not (data.endswith(b"\r\n\r\n") and data.startswith((b"GET ", b"HEAD "))):
                return None
            hit = self._learn(data)
        return hit

    def _learn(self, data: bytes) -> _Hit | None:
        req = parse_one(data, self.limits, asyncio.get_running_loop())
        hit = None
        if (req is not None and req.method in ("GET", "HEAD") and not req.body
                and not is_long_poll(req.query)):
            t = self.fwd.template(req)
            if t is not None:
                hit = _Hit(t, req)
        memo = self.memo
        while len(memo) >= self.fwd.first_memo:
            del memo[next(iter(memo))]  # the oldest first
        memo[data] = hit
        return hit

    def admits(self, host: str) -> bool:
        """False: the slow path must answer `host` (a source the proxy answers 429 for, or
        the agent again once that ran out)."""
        limited = self.route.limited
        return not limited or host not in limited

    def send(self, host: str, hit: _Hit, then: Callable[[AnyResponse], None]) -> None:
        """Send a kept request (of a source it `admits`) to the agent; `then(answer)` once
        it is answered, after the counts and the access line."""
        fwd = self.fwd
        timed = fwd.timed  # (count implies timed)
        if fwd.count:
            fwd.hop.begun += 1
        t0 = perf_counter() if timed else 0.0
        rid = hit.rid
        if rid is None:
            fwd._id_seq += 1
            rid = fwd._id_prefix + b"%x" % fwd._id_seq
        fwd.first_hits += 1

        def done(result: UpstreamResponse | BaseException) -> None:
            # The agent's answer, relayed: `answer_of` without its calls (a 429, a failure
            # or an answer that ends the connection take it in full).
            if type(result) is UpstreamResponse and result.keep_alive and result.status != 429:
                resp: AnyResponse = RawResponse(result.raw)
                status = result.status
            else:
                route = self.route
                resp, status = fwd.answer_of(result, route.limited, host, route.scope)
            if timed:
                fwd._observe(hit.method, hit.path, status, t0, rid, host, self.route.scope)
            then(resp)

        fwd.pool.send_encoded(
            b"".join((hit.before, self.route.added_for(host), hit.after_rid, rid, hit.tail)),
            hit.head_only, done)


class FirstRequests(Acceptor):
    """A listener's acceptor, with the fast path for a connection's first request.

    When a new connection's first read is a kept one (`KeptReads`), it goes straight to
    the agent and the answer is written to the accepted socket from the pool's callback
    (`_Relay`): no protocol, parser, Request or transport object for it. What the slow path
    does around the request happens here too: the hop's counts, the access line, the
    per-source connection cap, the listener's connection set. A source the proxy answers
    429 for or one at its connection cap takes the slow path, which answers it as always;
    so does every other first read. After a keep-alive answer the connection goes on as a
    normal one (`_ClientProtocol`), whose later kept reads take the fast path there.

    A connection accepted before its request arrived (an idle proxy is woken by the
    handshake's last ACK, the request follows a moment later: a quarter to a half of the
    connections at modest rates) waits for its first bytes in the acceptors' own epoll set
    (`_FirstWaits`), not with a protocol object: in the listener's connection set and its
    source's count meanwhile, and closed without an answer at the request timeout, as the
    slow path closes a connection that never sent a byte.
    """

    __slots__ = ("_cap", "_client", "_conns", "_kept", "_timer", "_waiting", "_waits")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
        client: Callable[..., _ClientProtocol], kept: KeptReads, cap: SourceCap | None,
        conns: set[Connection],
    ) -> None:
        super().__init__(loop, sock, client)
        self._client = client
        self._kept = kept
        self._cap = cap
        self._conns = conns
        # waiting for their first bytes, oldest (so earliest deadline) first; one timer
        self._waiting: dict[_FirstWait, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._waits = _FirstWaits.attach(loop, kept.fwd)

    def serve(self, sock: Accepted, peer: Any, data: bytes | None = None) -> None:
        self.first_read(sock, peer, False)

    def first_read(self, sock: Accepted, peer: Any, waited: bool) -> None:
        """Read a new connection's first bytes; relay them if kept, else the slow path.
        `waited`: the loop said they are there (`_FirstWait`)."""
        try:
            data = sock.recv(_READ_SIZE, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            if not waited and self._wait(sock, peer):
                return
            data = None  # the slow path waits for it
        except OSError:
            sock.close()  # reset before a byte came: nothing to answer
            return
        if data:
            try:
                hit = self._kept.hit(peer[0], data)
                if hit is not None and self._relay(sock, peer, hit):
                    return
            except Exception:  # a bug here must not reach the loop or leak the socket
                log.exception("proxy.fast_path_failed peer=%s", peer)
                sock.close()
                return
        super().serve(sock, peer, data)

    def _wait(self, sock: Accepted, peer: Any) -> bool:
        """Wait for the first bytes (False: at the source's cap, the slow path refuses)."""
        host = peer[0]
        cap = self._cap
        if cap is not None and cap.counts.get(host, 0) >= cap.cap:
            return False
        loop = self._loop
        waiter = _FirstWait(self, sock, peer,
                            loop.time() + self._kept.limits.request_timeout_s)
        if not self._waits.add(sock.fileno(), waiter):
            return False  # (out of kernel memory for it) the slow path waits instead
        if cap is not None:
            cap.take(host)
        self._conns.add(waiter)
        self._waiting[waiter] = None
        if self._timer is None:
            self._timer = loop.call_at(waiter.deadline, self._expire)
        return True

    def _expire(self) -> None:
        """The request timeout of the oldest waiting connections: closed (no byte came)."""
        self._timer = None
        now = self._loop.time()
        due: list[_FirstWait] = []
        for waiter in self._waiting:  # one pass (a fresh iter() per entry would rescan
            if waiter.deadline > now:  # the dict's freed slots: quadratic in a storm)
                self._timer = self._loop.call_at(waiter.deadline, self._expire)
                break
            due.append(waiter)
        counts = self._kept.limits.timeouts
        for waiter in due:
            waiter.expire(counts)

    def close(self) -> None:
        if self._sock is not None:
            self._waits.detach()
        super().close()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _relay(self, sock: Accepted, peer: Any, hit: _Hit) -> bool:
        """Send a kept first request to the agent; False: the slow path must answer it."""
        host = peer[0]
        cap = self._cap
        if cap is not None and cap.counts.get(host, 0) >= cap.cap:
            return False  # refused there, through the tarpit
        kept = self._kept
        if not kept.admits(host):
            return False  # the proxy's own 429 (or the agent again): the slow path's
        if cap is not None:
            cap.take(host)
        relay = _Relay(self, sock, peer, hit)
        self._conns.add(relay)  # before the send: its answer may come at once
        try:
            kept.send(host, hit, relay.done)
        except BaseException:
            relay.abort()  # out of the set, the source's count given back
            raise
        return True

    def go_on(self, sock: Accepted, peer: Any, rest: bytes, keep: bool) -> None:
        """A connection whose first answer the fast path wrote: a normal connection from
        here (keep-alive), or the end of an answer the socket did not take at once."""
        sock.setblocking(False)
        proto = self._client(True)
        transport = SocketTransport(self._loop, sock, peer, proto)
        if not keep:
            transport.cork()
        if rest:
            transport.write(rest)
        if keep:
            transport.start()
        else:
            # in the listener's set (and the source's count) until the rest left
            proto.connection_made(transport)  # type: ignore[arg-type]
            transport.close()


class _FirstWaits:
    """The connections of every listener that wait for their first bytes (`_FirstWait`),
    in one private epoll set that the loop watches as one fd.

    Registering a socket there is one epoll_ctl (one-shot, and its close takes it out),
    where the loop's add_reader and remove_reader per socket were an ioctl (libuv makes
    the fd non-blocking), four epoll_ctl calls and a poll handle made and freed: ~2 µs
    more per waiting connection, and at modest rates a third to a half of the connections
    wait (docs/benchmarks.md, "Toward the limit"). One set per loop and Forwarder, shared
    by its acceptors (`attach`), closed with the last of them (`detach`)."""

    __slots__ = ("_ep", "_fwd", "_loop", "_users", "_waiting")

    def __init__(self, loop: asyncio.AbstractEventLoop, fwd: Forwarder) -> None:
        self._loop = loop
        self._fwd = fwd
        self._ep = select.epoll()
        self._users = 0
        self._waiting: dict[int, _FirstWait] = {}  # by fd: only open sockets are in it
        loop.add_reader(self._ep.fileno(), self._ready)

    @classmethod
    def attach(cls, loop: asyncio.AbstractEventLoop, fwd: Forwarder) -> _FirstWaits:
        """The forwarder's set on `loop` (made if none), with one more acceptor using it."""
        waits = fwd.first_waits
        if waits is None or waits._loop is not loop:
            waits = fwd.first_waits = cls(loop, fwd)
        waits._users += 1
        return waits

    def detach(self) -> None:
        """An acceptor that used the set closes; the last one closes the set."""
        self._users -= 1
        if self._users <= 0 and not self._ep.closed:
            self._loop.remove_reader(self._ep.fileno())
            self._ep.close()
            if self._fwd.first_waits is self:
                self._fwd.first_waits = None

    def add(self, fd: int, waiter: _FirstWait) -> bool:
        """Wait for `fd` to be readable (False: it could not be registered)."""
        try:
            self._ep.register(fd, _FIRST_WAIT_EVENTS)
        except (OSError, ValueError):  # ENOMEM, ENOSPC (max_user_watches); a closed set
            return False
        self._waiting[fd] = waiter
        return True

    def forget(self, fd: int) -> None:
        """`fd`'s waiter is done with it (readable, or about to be closed)."""
        self._waiting.pop(fd, None)

    def _ready(self) -> None:
        try:
            events = self._ep.poll(0, _FIRST_WAIT_BATCH)
        except (OSError, ValueError):  # EINTR; closed by a callback of this iteration
            return
        waiting = self._waiting
        for fd, _ in events:
            waiter = waiting.pop(fd, None)
            if waiter is not None:
                waiter.readable()


class _FirstWait:
    """A new connection whose first bytes are not there yet (`FirstRequests`)."""

    __slots__ = ("_acceptor", "_peer", "_sock", "deadline")

    def __init__(self, acceptor: FirstRequests, sock: Accepted, peer: Any,
                 deadline: float) -> None:
        self._acceptor = acceptor
        self._sock: Accepted | None = sock
        self._peer = peer
        self.deadline = deadline

    def readable(self) -> None:
        sock = self._release()
        if sock is None:
            return
        try:
            self._acceptor.first_read(sock, self._peer, True)
        except Exception:  # a loop callback: never raise into it, never leak the socket
            log.exception("proxy.fast_path_failed peer=%s", self._peer)
            sock.close()

    def expire(self, counts: TimeoutCounts | None) -> None:
        """No byte within the request timeout: closed without an answer, counted as the
        slow path counts it (a silent close)."""
        sock = self._release()
        if sock is not None:
            if counts is not None:
                counts.silent += 1
            sock.close()

    def _release(self) -> Accepted | None:
        sock, self._sock = self._sock, None
        if sock is not None:
            a = self._acceptor
            del a._waiting[self]
            a._conns.discard(self)
            if a._cap is not None:
                a._cap.release(self._peer[0])
            a._waits.forget(sock.fileno())  # (its close takes it out of the epoll set)
        return sock

    def abort(self) -> None:
        """The listener closes: the connection goes."""
        sock = self._release()
        if sock is not None:
            sock.close()


class _Relay:
    """A first request the fast path sent to the agent: writes the answer as the slow path
    would (`HttpProtocol._send`), then closes or hands the connection on."""

    __slots__ = ("_acceptor", "_hit", "_peer", "_sock")

    def __init__(self, acceptor: FirstRequests, sock: Accepted, peer: Any,
                 hit: _Hit) -> None:
        self._acceptor = acceptor
        self._sock: Accepted | None = sock
        self._peer = peer
        self._hit = hit

    def done(self, resp: AnyResponse) -> None:
        hit = self._hit
        if isinstance(resp, RawResponse):
            keep = hit.keep_alive and not resp.close
            # framed for a keep-alive hop: when the connection closes after it, say so
            data = resp.data if keep else hit.closing(resp.data)
        else:
            keep = hit.keep_alive
            data = resp.encode(keep_alive=keep, head=hit.head_only)
        sock = self._release()
        if sock is None:
            return  # the listener closed meanwhile
        try:
            # not kept: the answer leaves with the FIN (MSG_MORE, then close)
            sent = sock.send(data, _DONTWAIT if keep else _DONTWAIT_MORE)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:  # the VM went away
            sock.close()
            return
        if keep or sent < len(data):
            try:
                self._acceptor.go_on(sock, self._peer, data[sent:], keep)
            except Exception:  # runs in the pool's read callback: never raise into it
                log.exception("proxy.fast_path_failed peer=%s", self._peer)
                sock.close()
        else:
            sock.close()

    def _release(self) -> Accepted | None:
        sock, self._sock = self._sock, None
        if sock is not None:
            a = self._acceptor
            a._conns.discard(self)
            if a._cap is not None:
                a._cap.release(self._peer[0])
        return sock

    def abort(self) -> None:
        """The listener closes: the connection goes, its answer will be dropped."""
        sock = self._release()
        if sock is not None:
            sock.close()


Connection = SocketTransport | _Relay | _FirstWait  # what a listener's connection set holds


def open_listening_socket(
    spec: ListenerSpec, *, reuse_port: bool = False,
) -> tuple[socket.socket, int]:
    """A bound, listening, non-blocking socket inside spec.netns, and that namespace's inode.
    `reuse_port` (proxy workers): SO_REUSEPORT, each worker listens and the kernel spreads
    the VMs' connections over them.

    Raises FileNotFoundError if the namespace does not exist, OSError if the bind fails.
    """
    family = socket.AF_INET6 if spec.is_ipv6 else socket.AF_INET
    sock = socket_in_netns(spec.netns, family, socket.SOCK_STREAM)
    try:
        inode = socket_netns_inode(sock)  # the namespace the socket really lives in
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if spec.is_ipv6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_FREEBIND, 1)
            # "::" serves IPv4 too (Neutron's `bind :::9697`), whatever bindv6only says
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                            0 if spec.host == "::" else 1)
        else:
            sock.setsockopt(socket.SOL_IP, _IP_FREEBIND, 1)
        if spec.interface is not None:
            # resolved in the socket's namespace; a link-local bind needs it (ENODEV until
            # the agent made the device: retried at the next scan)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                            spec.interface.encode())
        sock.bind((spec.host, spec.port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock, inode


class NamespaceProxy:
    """Keeps one listener open per spec file; see the module docstring."""

    def __init__(
        self, listeners_dir: Path, forwarder: Forwarder, limits: Limits,
        rescan_interval_s: float, max_connections_per_source: int | None = None,
        *, reuse_port: bool = False,
    ) -> None:
        self.max_connections_per_source = max_connections_per_source
        self.listeners_dir = listeners_dir
        self.reuse_port = reuse_port
        self.forwarder = forwarder
        self.limits = limits
        self.rescan_interval_s = rescan_interval_s
        self.listeners: dict[str, Listener] = {}
        # file name -> (identity of the file version, parsed spec or None if invalid)
        self._files: dict[str, tuple[tuple[int, int, int], ListenerSpec | None]] = {}
        self._pending: dict[str, str] = {}  # spec name -> last reason it could not open
        self._wake = asyncio.Event()
        self._stopping = False
        self.counts = {"opened": 0, "closed": 0, "converges": 0, "converge_failures": 0,
                       "refused_closed": 0}  # connection-cap refusals of closed listeners

    def metric_families(self) -> list[Metric]:
        """Listeners, namespaces and client connections for /metrics."""
        c = self.counts
        lsn = list(self.listeners.values())
        return [
            gauge("openimds_proxy_listeners", "Listening sockets open (one per spec)", len(lsn)),
            gauge("openimds_proxy_listeners_pending",
                  "Specs not served yet (namespace missing, bind failed; retried)",
                  len(self._pending)),
            gauge("openimds_proxy_namespaces", "Network namespaces with a listener",
                  len({x.netns_inode for x in lsn})),
            gauge("openimds_proxy_connections", "Client connections open",
                  sum(len(x.conns) for x in lsn)),
            counter("openimds_proxy_connections_refused",
                    "Connections over [proxy] max_connections_per_source (answered 429)",
                    c["refused_closed"] + sum(x.cap.rejected for x in lsn if x.cap)),
            counter("openimds_proxy_listeners_opened", "Listeners opened", c["opened"]),
            counter("openimds_proxy_listeners_closed", "Listeners closed", c["closed"]),
            counter("openimds_proxy_converges", "Listener directory scans", c["converges"]),
            counter("openimds_proxy_converge_failures", "Scans that failed (a bug)",
                    c["converge_failures"]),
        ]

    def read_specs(self) -> dict[str, ListenerSpec]:
        """The valid specs in listeners_dir; files are re-parsed only when they changed."""
        specs: dict[str, ListenerSpec] = {}
        seen: set[str] = set()
        try:
            entries = list(os.scandir(self.listeners_dir))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if not is_spec_filename(entry.name):
                continue
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            seen.add(entry.name)
            cached = self._files.get(entry.name)
            if cached is None or cached[0] != key:
                spec = self._parse_file(entry.path, spec_name(entry.name))
                cached = (key, spec)
                self._files[entry.name] = cached
            if cached[1] is not None:
                specs[cached[1].name] = cached[1]
        for gone in self._files.keys() - seen:
            del self._files[gone]
        return specs

    @staticmethod
    def _parse_file(path: str, name: str) -> ListenerSpec | None:
        try:
            with open(path, "rb") as fh:
                return parse_listener_spec(name, fh.read(65536))
        except FileNotFoundError:
            return None
        except (BadRequest, OSError) as exc:
            log.warning("proxy.bad_spec file=%s reason=%s", path, exc)
            return None

    async def converge(self) -> None:
        desired = self.read_specs()
        current = {name: lst.spec for name, lst in self.listeners.items()}
        to_open, to_close = plan_listeners(desired, current)
        for name in to_close:
            self._close(name, "spec removed" if name not in desired else "spec changed")
        # A namespace deleted (or deleted and made again) under an open listener.
        for name, lst in list(self.listeners.items()):
            try:
                inode = netns_inode(lst.spec.netns)
            except (FileNotFoundError, ValueError):
                inode = -1
            if inode != lst.netns_inode:
                self._close(name, "namespace gone" if inode < 0 else "namespace replaced")
                to_open.append(lst.spec)
        for name in list(self._pending):
            if name not in desired:
                del self._pending[name]
        for spec in to_open:
            await self._open(spec)

    async def _open(self, spec: ListenerSpec) -> None:
        try:
            sock, inode = open_listening_socket(spec, reuse_port=self.reuse_port)
        except FileNotFoundError:
            self._note_pending(spec, f"namespace {spec.netns} does not exist yet")
            return
        except OSError as exc:
            self._note_pending(spec, f"cannot listen on {spec.host}:{spec.port}: {exc}")
            return
        listener = Listener(spec, inode, self.max_connections_per_source)
        try:
            await listener.start(sock, self.forwarder, self.limits)
        except OSError as exc:
            sock.close()
            self._note_pending(spec, f"cannot serve {spec.host}:{spec.port}: {exc}")
            return
        self.listeners[spec.name] = listener
        self.counts["opened"] += 1
        self._pending.pop(spec.name, None)
        log.info("proxy.listener_opened name=%s netns=%s addr=%s:%d", spec.name, spec.netns,
                 spec.host, spec.port)

    def _note_pending(self, spec: ListenerSpec, reason: str) -> None:
        if self._pending.get(spec.name) != reason:
            log.info("proxy.listener_pending name=%s reason=%s (retrying)", spec.name, reason)
        self._pending[spec.name] = reason

    def _close(self, name: str, why: str) -> None:
        lst = self.listeners.pop(name, None)
        if lst is None:
            return
        lst.close()
        self.counts["closed"] += 1
        if lst.cap is not None:
            self.counts["refused_closed"] += lst.cap.rejected
        log.info("proxy.listener_closed name=%s netns=%s reason=%s", name, lst.spec.netns, why)

    def wake(self) -> None:
        """Converge now (SIGHUP)."""
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self, on_first_converge: Callable[[], None] | None = None) -> None:
        await self.converge()
        if on_first_converge is not None:
            on_first_converge()
        log.info("proxy.ready listeners=%d pending=%d dir=%s", len(self.listeners),
                 len(self._pending), self.listeners_dir)
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.rescan_interval_s)
            self._wake.clear()
            if self._stopping:
                break
            try:
                self.counts["converges"] += 1
                await self.converge()
            except Exception:  # a bug must not take every listener down
                self.counts["converge_failures"] += 1
                log.exception("proxy.converge_failed")

    def close_all(self) -> None:
        for name in list(self.listeners):
            self._close(name, "proxy stopping")
        self.forwarder.tarpit.release_all()


# -- process-level plumbing --------------------------------------------------------------

def acquire_lock(paths: ProxyPaths) -> int:
    """Take the proxy's flock (held until exit); raise if another proxy holds it."""
    paths.directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    # Agents probe the lock with a brief flock of their own (agents.l3.proxy_running): retry
    # for a moment so such a probe cannot make a starting proxy give up.
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
        os.close(fd)
        other = read_pid(paths.pid_file)
        who = f"pid {other}" if other else "another process"
        raise OpenImdsError(
            f"another openimds proxy ({who}) already runs: {paths.lock_file} is locked"
        ) from None
    return fd


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0") or None
    except (FileNotFoundError, ValueError):
        return None


def write_pid(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def remove_pid(path: Path) -> None:
    if read_pid(path) == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


async def run_proxy(
    settings: Settings, *, worker_ready: Callable[[], None] | None = None, worker: int = 0,
) -> int:
    """Run until SIGTERM/SIGINT. The caller holds the lock (see `main`). A worker
    (`worker_ready` given) listens with SO_REUSEPORT and reports readiness to its parent,
    which owns the pid file."""
    paths = ProxyPaths.from_settings(settings)
    paths.listeners_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    pool = pool_from_settings(settings)
    long_poll = pool_from_settings(settings, long_poll=True)
    p = settings.proxy
    forwarder = Forwarder(pool, token_hop_limit=settings.api.token_hop_limit,
                          access_log=p.access_log, long_poll=long_poll,
                          count=settings.metrics.enabled,
                          tarpit=Tarpit(p.tarpit_delay, p.tarpit_max_per_source, p.tarpit_max))
    proxy = NamespaceProxy(paths.listeners_dir, forwarder,
                           limits_from_settings(settings, forwarder.hop.count_timeouts()),
                           settings.proxy.rescan_interval,
                           settings.proxy.max_connections_per_source,
                           reuse_port=worker_ready is not None)
    metrics = ServiceMetrics("proxy", worker=worker)
    metrics.hops.append(forwarder.hop)
    metrics.add(proxy.metric_families)
    metrics.add(forwarder.metric_families)
    metrics_start: list[asyncio.Task[asyncio.AbstractServer | None]] = []
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, proxy.wake)
    loop.add_signal_handler(signal.SIGTERM, proxy.stop)
    loop.add_signal_handler(signal.SIGINT, proxy.stop)
    def ready() -> None:
        # Everything made so far lives as long as the process: keep it out of the cyclic
        # collector's way, and collect young objects less often (each client connection
        # leaves a protocol <-> parser cycle; the collector was ~6% of the proxy's CPU in
        # one-request-per-connection load).
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD_0, 20, 20)
        # In the host namespace, like every operator listener (the VM-facing ones are not);
        # only now, so loading prometheus-client never delays the VM-facing listeners.
        metrics_start.append(asyncio.ensure_future(start_metrics_server(settings, metrics)))
        if worker_ready is not None:
            worker_ready()
        else:
            write_pid(paths.pid_file)

    try:
        await proxy.run(on_first_converge=ready)
    finally:
        for task in metrics_start:
            if task.done() and not task.cancelled() and task.exception() is None:
                server = task.result()
                if server is not None:
                    server.close()
            else:
                task.cancel()
        proxy.close_all()
        await pool.close()
        await long_poll.close()
        if worker_ready is None:
            remove_pid(paths.pid_file)
    log.info("proxy.stopped")
    return 0


def main(settings: Settings) -> int:
    """Entry point of `openimds proxy`: lock, raise fd limit, serve on uvloop."""
    from openimds.http.server import install_uvloop

    paths = ProxyPaths.from_settings(settings)
    lock_fd = acquire_lock(paths)
    try:
        nofile = raise_nofile_limit()
        log.info("proxy.starting pid=%d socket=%s listeners_dir=%s nofile=%d", os.getpid(),
                 settings.metadata_proxy_socket, paths.listeners_dir, nofile)
        install_uvloop()
        workers = settings.proxy.workers
        if workers <= 1:
            return asyncio.run(run_proxy(settings))
        from openimds.host.workers import run_workers

        return run_workers(
            workers, lambda index, ready: asyncio.run(
                run_proxy(settings, worker_ready=ready, worker=index)),
            name="proxy", on_ready=lambda: write_pid(paths.pid_file),
            finish=lambda: remove_pid(paths.pid_file))
    finally:
        os.close(lock_fd)
