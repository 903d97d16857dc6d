"""The metadata agent: who is asking, signed, and forwarded to the metadata API.

Between the namespace proxy and the metadata API, on the Unix socket
`metadata_proxy_socket` (docs/architecture.md, "The metadata path"). Per request:

1. `core.caller.parse_caller`: X-Forwarded-For (last value, `::ffff:` normalised) and exactly
   one of X-Neutron-Router-ID / X-Neutron-Network-ID, else 400;
2. the caller's instance: from the cache (`agent_cache`, invalidated by the registry's change
   feed, read only while the feed is live) or one single-flight registry `/v1/lookup`;
   zero ports or several -> 404 "instance not found" (detail in the log), registry
   unreachable -> 503 + Retry-After, never a guess;
3. `core.headers.rewrite_request_headers` + `core.signing.sign_instance_id`, then the request
   goes over pooled keep-alive connections to nova_metadata_protocol://host:port (or the
   API's Unix socket `nova_metadata_socket`, when it runs on this host); the API's
   answer (every status, with its body) is relayed byte for byte. API unreachable -> 503 +
   Retry-After, no answer in time -> 504, garbled -> 502, each with a one-line body.

A cache hit never leaves the event loop's callbacks: `handle` returns an `http.Deferred`
that the pool's `send()` callback resolves (no Task or future per request). Misses, and the
rare re-check after an API 404, run as coroutines.

Where Neutron falls short (neutron.md §0, §6) this does better: the listen backlog and socket
mode are honoured; whole requests are read (keep-alive, pipelining, Content-Length); a cached
answer that the API rejects with 404 is re-checked once against the registry (an IP reused
before the feed delivered the change); more than `max_concurrency` requests in flight get an
explicit 503; every request has one access-log line on `openimds.access`, and debug mode logs
the request detail with the signature and credentials masked.

Registry queries and cache behaviour are counted; `GET /openimds-agent/stats` on the socket
answers them as JSON, but only to a local client that sends neither X-Forwarded-For nor an
X-Neutron-* header (anything the proxy forwards always carries both).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import grp
import json
import logging
import os
import pwd
import socket
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Mapping
from typing import Any, Protocol

from openimds.config import Settings, worker_ports, worker_socket, worker_sockets
from openimds.core.caller import Caller, Resolution, parse_caller
from openimds.core.headers import identity_headers, redact, rewrite_with_identity
from openimds.core.ratelimit import RateLimiter, Window, parse_ip_versions
from openimds.core.signing import sign_instance_id
from openimds.errors import (
    BadRequest,
    ConfigError,
    NotFound,
    OpenImdsError,
    ResolutionError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from openimds.host.unix_listener import listen_unix
from openimds.http.client import CONNECT_RETRIES, UpstreamPool, UpstreamResponse
from openimds.http.server import (
    Abandonable,
    AnyResponse,
    Deferred,
    Request,
    Response,
    error_response,
)
from openimds.log import access_line
from openimds.metadata.agent_cache import (
    CallerCache,
    Generations,
    LookupResult,
    Resolver,
    key_of,
)
from openimds.metadata.feed_lease import FeedLease
from openimds.metadata.longpoll import HeldUpstream, is_long_poll, long_poll_timeout
from openimds.metrics import HopStats, Metric, counter, gauge

log = logging.getLogger(__name__)

STATS_PATH = "/openimds-agent/stats"
REQUEST_ID = b"x-openimds-request-id"
MODE_MAP = {"user": 0o644, "group": 0o664, "all": 0o666}
_RECHECK_INTERVAL_S = 1.0
# The caller's identity as the proxy writes it (`core.proxy_rules`): cut out of the server's
# known heads (`Limits.identity_lines`, see agent_cli) so that one kept head serves every VM
# asking the same shape, each with its own identity (`Request.identity`).
IDENTITY_LINES = (b"X-Forwarded-For", b"X-Neutron-Router-ID", b"X-Neutron-Network-ID")
_IDENTITY_NAMES = frozenset(name.lower() for name in IDENTITY_LINES)
_FEED_RETRY_MIN_S = 0.2
_FEED_RETRY_MAX_S = 5.0
_MAX_RECHECK_KEYS = 4096
# The hot-path memos (`MetadataAgent._sources`, `_paths`, `_hits`), each two generations of
# at most this many entries (`agent_cache.Generations`: the working set stays, at most 2x is
# held). Worst-case bytes per entry, at the size caps below (tracemalloc,
# tests/unit/test_agent_memo.py): a source 1.7 KiB (~41 MiB for 2 x 12,288), a path 4.9
# KiB (~10 MiB for 2 x 1,024), a known head 1.2 KiB (~5 MiB for 2 x 2,048): ~56 MiB in all,
# whatever the instances. A node's own VMs take one source each (~1.15 KiB with IPv4 and
# UUIDs: ~11 MiB at 10,000 instances), the paths they ask a few dozen in all.
_SOURCES_MAX = 12288  # callers: (X-Forwarded-For, router|network) as the proxy sends them
_PATHS_MAX = 1024  # request shapes less the caller: cloud-init's boot is ~28, shared by all
# the server's known heads (`Request.shape`, less the caller since identity_lines: a few
# dozen for every VM); it keeps 4,096 at once
_HITS_MAX = 2048
_SOURCE_BYTES_MAX = 224  # identity values (the proxy sends two) longer in all: not kept
_HIT_TARGET_MAX = 256  # longer request targets are not kept
_PATH_HEADERS_MAX = 16  # nor are shapes with more headers than this or more header bytes
_PATH_BYTES_MAX = 1024
# Stands in for the request ID's value while the API-bound bytes are made (a header value
# never holds NUL: the parser refuses it), so they split around it.
_RID_MARK = b"\x00rid\x00"
_NO_RID = (REQUEST_ID, b"")
_MARKED_RID = (REQUEST_ID, _RID_MARK)
# Where the caller's identity headers go in a path's bytes: encoded in their place, then cut
# out (a NUL value never comes in a parsed header, so the line is found only there).
_SPLICE = ((b"X-Openimds-Splice", b"\x00"),)
_SPLICE_LINE = b"X-Openimds-Splice: \x00\r\n"

# One-line bodies the VM sees; the detail (ports, errno, registry URL) goes to our log only.
_BODY_NOT_FOUND = "instance not found"


class _Identity:
    """What one caller's requests carry for one resolution, made once: the API-bound
    identity header lines (X-Forwarded-For, X-Instance-ID, X-Tenant-ID, the signature) and
    the access line's caller part. Immutable: a request in flight keeps the one it left
    with."""

    __slots__ = ("caller", "lines", "res", "who")

    def __init__(self, caller: Caller, res: Resolution, lines: bytes, who: str) -> None:
        self.caller = caller
        self.res = res
        self.lines = lines
        self.who = who


class _Source:
    """One caller as the proxy names it (`MetadataAgent._sources`): parsed once, with its
    identity for the resolution it last had and the cache's epoch when that resolution was
    last the cache's answer (moved on in place while it still is)."""

    __slots__ = ("caller", "epoch", "identity", "kept")

    def __init__(self, caller: Caller, kept: bool) -> None:
        self.caller = caller
        self.kept = kept  # in the memo (else made for one request: too long to keep)
        self.epoch = -1  # never checked
        self.identity: _Identity | None = None


class _Path:
    """One request shape less its caller (`MetadataAgent._paths`), the same for every VM
    asking it: the API-bound bytes around the request ID's value and the identity lines,
    `head` [ID `mid`] identity `tail` (`mid` None: no ID goes in)."""

    __slots__ = ("head", "kept", "mid", "tail")

    def __init__(self, head: bytes, mid: bytes | None, tail: bytes, kept: bool) -> None:
        self.head = head
        self.mid = mid
        self.tail = tail
        self.kept = kept  # in the memo (else made for one request: a body, too long)


class _HitReply(Deferred):
    """A hit on its way: the server's Deferred and the pool's answer callback (`__call__`)
    in one object, where a closure cost a function and a cell per variable for every
    request."""

    __slots__ = ("agent", "ident", "req", "rid", "t0")

    def __init__(self, agent: MetadataAgent, req: Request, ident: _Identity,
                 rid: bytes | None, t0: float) -> None:
        Deferred.__init__(self)
        self.agent = agent
        self.req = req
        self.ident = ident
        self.rid = rid
        self.t0 = t0

    def __call__(self, result: UpstreamResponse | BaseException) -> None:
        """The API's answer (or why there is none): relayed, counted and logged; only a
        404 that calls for a re-check goes async."""
        agent, ident = self.agent, self.ident
        if isinstance(result, UpstreamResponse):
            status = result.status
            if status == 403 or status >= 500:
                agent._check_api_status(ident.caller, ident.res, status)
            elif status == 404 and agent._may_recheck(ident.caller):
                task = asyncio.ensure_future(
                    agent._recheck(self.req, ident.caller, ident.res, result, self.t0))
                task.add_done_callback(lambda t: _pass_on(t, self))
                return
            agent._active -= 1
            # relayed as it came (`UpstreamResponse`); `who` stands for the caller and its
            # resolution in the access line, so neither is read here
            self.resolve(agent._finish(
                self.req, None, None, self.t0, result, status, self.rid, ident.who))
            return
        agent._active -= 1
        caller, res = ident.caller, ident.res
        if isinstance(result, UpstreamError):
            self.resolve(agent._finish(self.req, caller, res, self.t0,
                                       agent._upstream_failure(result)))
        else:
            log.error("agent.forward_failed %s error=%r", caller.describe(), result)
            self.resolve(agent._finish(self.req, caller, res, self.t0,
                                       error_response(500, "metadata agent error")))


class RegistryLookup(Protocol):
    """The part of `AsyncRegistryClient` the agent uses."""

    async def lookup(
        self, ip: str, *, router_id: str | None = None, network_id: str | None = None,
    ) -> Any: ...


class Upstream(Protocol):
    """The part of `UpstreamPool` the agent uses."""

    async def request(
        self, method: str, target: str, headers: Any = (), body: bytes = b"",
    ) -> UpstreamResponse: ...

    def send(
        self, method: str, target: str, headers: Any, body: bytes,
        on_result: Callable[[UpstreamResponse | BaseException], None],
    ) -> None: ...


class HitUpstream(Upstream, Protocol):
    """The ordinary upstream (`UpstreamPool`): a hit sends bytes the agent keeps."""

    def encode_request(self, method: str, target: str, headers: Any, body: bytes) -> bytes: ...

    def send_encoded(
        self, data: bytes, head_only: bool,
        on_result: Callable[[UpstreamResponse | BaseException], None],
    ) -> None: ...


class RegistryUnreachable(UpstreamUnavailable):
    """The registry could not answer a lookup (down, timeout, 5xx)."""


def socket_mode(
    mode: str, proxy_user: str, proxy_group: str, *, euid: int, egid: int,
) -> int:
    """The socket's permission bits, with Neutron's `deduce` rule (neutron.md §1.2).

    deduce: the proxy user unset, "0", "root" or our effective user -> user (0644); else the
    proxy group unset or our effective group -> group (0664); else all (0666).
    """
    if mode == "deduce":
        if proxy_user in ("", "0", "root") or _is_user(proxy_user, euid):
            mode = "user"
        elif proxy_group == "" or _is_group(proxy_group, egid):
            mode = "group"
        else:
            mode = "all"
    if mode not in MODE_MAP:
        raise ConfigError(f"metadata_proxy_socket_mode {mode!r} is not deduce/user/group/all")
    return MODE_MAP[mode]


def _is_user(name: str, euid: int) -> bool:
    if name == str(euid):
        return True
    try:
        return pwd.getpwuid(euid).pw_name == name
    except KeyError:
        return False


def _is_group(name: str, egid: int) -> bool:
    if name == str(egid):
        return True
    try:
        return grp.getgrgid(egid).gr_name == name
    except KeyError:
        return False


def open_socket(settings: Settings, worker: int | None = None) -> tuple[socket.socket, int]:
    """Bind and listen on metadata_proxy_socket with the configured mode and backlog
    (`host.unix_listener`: a stale socket is replaced, a live one is not), or with `worker`
    on that worker's own socket beside it (`config.worker_socket`). Returns the listening
    socket and the mode applied."""
    mode = socket_mode(
        settings.metadata_proxy_socket_mode, settings.metadata_proxy_user,
        settings.metadata_proxy_group, euid=os.geteuid(), egid=os.getegid(),
    )
    path, option = settings.metadata_proxy_socket, "metadata_proxy_socket"
    if worker is not None:
        path, option = worker_socket(path, worker), option + " (worker socket)"
    sock = listen_unix(path, mode=mode, backlog=settings.metadata_backlog, option=option)
    return sock, mode


def upstream_ssl(settings: Settings) -> ssl.SSLContext | None:
    """TLS to the metadata API with Neutron's options (neutron.md §1.5), or None for http."""
    if settings.nova_metadata_protocol != "https":
        return None
    try:
        if settings.nova_metadata_insecure:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = ssl.create_default_context(cafile=settings.auth_ca_cert or None)
        if settings.nova_client_cert and settings.nova_client_priv_key:
            ctx.load_cert_chain(settings.nova_client_cert, settings.nova_client_priv_key)
        elif settings.nova_client_cert or settings.nova_client_priv_key:
            # Neutron uses a client certificate only when both are set; say so.
            log.warning("agent.tls_client_cert_ignored reason=%s",
                        "nova_client_cert and nova_client_priv_key must both be set")
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"https to the metadata API: {exc}") from exc
    return ctx


def make_pool(settings: Settings, *, long_poll: bool = False) -> UpstreamPool:
    """The pool to the API; `long_poll`: the one for held requests (`metadata.longpoll`)."""
    agent = settings.metadata_agent
    # nova_metadata_socket (openimds only): the API on this host, over its Unix socket
    unix = settings.nova_metadata_socket or None
    return UpstreamPool(
        unix_path=unix, host=None if unix else settings.nova_metadata_host,
        port=settings.nova_metadata_port, ssl=None if unix else upstream_ssl(settings),
        server_hostname=settings.nova_metadata_host,
        size=settings.api.max_waits if long_poll else agent.upstream_pool_size,
        connect_timeout_s=min(5.0, agent.upstream_timeout),
        timeout_s=long_poll_timeout(settings) if long_poll else agent.upstream_timeout,
        raw_only=True,  # answers are relayed verbatim; only status and keep-alive are read
        # an API being restarted (its port refuses) costs a VM latency, not a 503
        connect_retries=CONNECT_RETRIES,
        # held requests are never batched: one would hold the answers behind it
        pipeline_depth=1 if long_poll else agent.upstream_pipeline_depth,
        # the API workers' own sockets or ports: our connections and requests split evenly
        # over them (a shared socket or SO_REUSEPORT port gives a burst to one worker)
        worker_paths=functools.partial(worker_sockets, unix) if unix else None,
        worker_ports=() if unix else worker_ports(settings.nova_metadata_worker_ports),
    )


class WatchedFeedClient:
    """The registry client as the change follower sees it.

    - Any failed feed call tells the agent at once (`on_error`), so no request is answered
      from the cache between an outage and the resync that follows it.
    - After a failure the next `changes` call does not long-poll: otherwise a registry that
      came back with nothing new would hold it for the whole wait and the follower would
      report the registry down (and the agent ask it for every request) all that time.
    - With a `lease` (`metadata.feed_lease`), every answer renews it from when its call was
      sent, and the long-poll wait is capped so that an idle agent renews in time.
    """

    def __init__(self, client: Any, on_error: Callable[[], None],
                 lease: FeedLease | None = None) -> None:
        self._client = client
        self._on_error = on_error
        self._lease = lease
        self._failed = False

    async def health(self) -> Any:
        lease = self._lease
        sent = lease.clock() if lease is not None else 0.0
        try:
            result = await self._client.health()
        except BaseException:
            self._failed = True
            self._on_error()
            raise
        if lease is not None and isinstance(result, Mapping):
            lease.resync_answered(result, sent)
        return result

    async def changes(self, since: int, wait: float = 0, limit: int | None = None) -> Any:
        lease = self._lease
        if lease is not None:
            wait = lease.poll_wait(wait)
            sent = lease.clock()
        try:
            result = await self._client.changes(since, 0 if self._failed else wait, limit)
        except BaseException:
            self._failed = True
            self._on_error()
            raise
        self._failed = False
        if lease is not None and isinstance(result, Mapping):
            lease.answered(result, sent)
        return result


def _field(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


class MetadataAgent:
    """The request handler plus its cache, feed consumer and counters."""

    def __init__(
        self, settings: Settings, *, registry: RegistryLookup, upstream: HitUpstream,
        feed_up: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        limiter: RateLimiter | None = None,
        held: HeldUpstream | None = None,
    ) -> None:
        self.settings = settings
        self._secret = settings.secret_bytes
        self._registry = registry
        self._upstream = upstream
        self._held = held  # held requests (wait_for_change) go here: metadata.longpoll
        self._follower: Any = None
        # the feed is live, and what it delivered is recent enough to trust (registry/reuse.py)
        self.lease = FeedLease()
        self._feed_up = feed_up or (
            lambda: bool(getattr(self._follower, "registry_up", False)) and self.lease.valid())
        self._clock = clock
        cfg = settings.metadata_agent
        self._max_concurrency = cfg.max_concurrency
        self._retry_after = str(cfg.retry_after)
        self._registry_timeout_s = cfg.registry_timeout
        self.cache = CallerCache(cfg.cache_size)
        topology = getattr(registry, "topology", None)
        self.resolver = Resolver(self._lookup, self.cache, self.trusts_cache,
                                 topology=topology if cfg.warm_index else None)
        self.resolver.on_registry_back = self._registry_back
        if feed_up is None:  # an injected feed_up stands in for the follower and its lease
            self.resolver.may_know = self.lease.may_know
        self.resolver.regain = self.regain_trust
        self._lease_probe: asyncio.Future[bool] | None = None
        self.lease_probes = 0
        self._synced = False  # the feed delivered at least one batch since we started
        self._behind = False  # a feed call failed; the changes missed are not applied yet
        self.feed_revision = 0
        self._trusted_last = False
        self._active = 0
        self._recheck_at: dict[tuple[str, str, str], float] = {}
        self.counts: dict[str, int] = {
            "requests": 0, "saturated": 0, "rechecks": 0, "rate_limited": 0}
        # Hook for exporters (metrics): called with (instance_id, ip) for every 429 sent.
        self.on_rate_limited: Callable[[str, str], None] | None = None
        self._access = cfg.access_log
        # Hot-path memos. A request's API-bound bytes are its path's (the same for every VM)
        # with its caller's identity lines put in, so the first request of each (caller,
        # path) is as cheap as a repeat: a boot storm brings each VM's 28 paths once, all
        # of them new pairs (1,000 VMs: 28,000), but only 1,000 callers and 28 paths.
        # - per caller, by its identity header items as the proxy sends them: the parsed
        #   `Caller` and its `_Identity` (parse ~9 µs, sign ~3 µs, once per caller);
        # - per path, by (method, target, the other headers with the request ID's value
        #   masked): its bytes around the ID and the identity (rewrite + encode ~6 µs);
        # - per head the server knew (`Request.shape`: its bytes less the ID's and the
        #   caller's values, the same for every VM): its path, one lookup, no header walk;
        #   the caller is the server's `Request.identity`, looked up in `_sources` apart,
        #   so one VM's identity never answers for another's.
        # Two generations each (`Generations`, the bounds above): keys are VM-chosen.
        self._sources: Generations[tuple[tuple[bytes, bytes], ...], _Source] = Generations(
            _SOURCES_MAX)
        self._paths: Generations[tuple[object, ...], _Path] = Generations(_PATHS_MAX)
        self._hits: Generations[bytes, _Path] = Generations(_HITS_MAX)
        self.status_counts: dict[int, int] = {}
        # `limiter`: a table shared with the other workers (their parent made it, see
        # agent_cli); otherwise this process's own, from the settings.
        own, self._limit_versions = limiter_from_settings(settings)
        self.limiter = limiter if limiter is not None else own
        self._limit_v4 = 4 in self._limit_versions
        self._limit_v6 = 6 in self._limit_versions
        self.hop = HopStats("agent")  # /metrics (openimds.metrics), read at scrape time
        self._count = settings.metrics.enabled  # off: not even the plain ints (benchmarks)

    # -- feed ---------------------------------------------------------------------------
    def trusts_cache(self) -> bool:
        trusted = self._synced and not self._behind and self._feed_up()
        if trusted != self._trusted_last:
            self._trusted_last = trusted
            if trusted:
                log.info("agent.cache_trusted reason=change feed live")
            elif self._synced and not self._behind and not self.lease.valid() and bool(
                    getattr(self._follower, "registry_up", False)):
                self.lease.lapses += 1
                log.info("agent.cache_untrusted reason=feed lease lapsed (no feed answer "
                         "applied for %.1fs); asking the registry until the next one",
                         self.lease.lease_s)
            else:
                log.warning("agent.cache_untrusted reason=change feed down; "
                            "asking the registry for every request")
        return trusted

    def apply_batch(self, batch: Any) -> None:
        """One ChangeBatch(revision, changes, resync) from the registry's feed."""
        revision = int(_field(batch, "revision") or 0)
        self.feed_revision = revision
        self._behind = False  # this batch carries what was missed (or is a resync)
        if _field(batch, "resync") or not self._synced:
            # On a resync, and on the first batch (lookups made before the feed started may
            # predate its starting point), nothing older than this batch is kept.
            self.cache.clear(revision)
            self._synced = True
            self.lease.applied(revision)
            if _field(batch, "resync"):
                log.info("agent.cache_resync revision=%d", revision)
            return
        dropped = 0
        for change in _field(batch, "changes") or ():
            row = change if isinstance(change, Mapping) else {
                k: _field(change, k) for k in ("revision", "kind", "op", "id", "attrs")
            }
            dropped += self.cache.apply_change(row)
        self.lease.applied(revision)
        if dropped:
            log.debug("agent.cache_invalidated revision=%d dropped=%d", revision, dropped)

    async def regain_trust(self) -> bool:
        """The cache is untrusted only because the feed lease lapsed (an agent too busy to
        poll in time, or one that just started): one feed call with no wait, shared by every
        request that meets the lapse, renews it if nothing is newer than what was applied.
        False (ask the registry) while the feed is down or behind, or if something is."""
        if not (self._synced and not self._behind
                and getattr(self._follower, "registry_up", False)):
            return False
        changes = getattr(self._registry, "changes", None)
        if changes is None:
            return False
        probe = self._lease_probe
        if probe is None or probe.done():
            probe = self._lease_probe = asyncio.ensure_future(self._probe_lease(changes))
        try:
            return await asyncio.shield(probe)
        except Exception:
            return False

    async def _probe_lease(self, changes: Callable[..., Awaitable[Any]]) -> bool:
        since, sent = self.feed_revision, self.lease.clock()
        self.lease_probes += 1
        result = await changes(since, 0, 1)
        if not isinstance(result, Mapping) or not self.lease.probed(result, since, sent):
            return False
        return self.trusts_cache()

    def feed_lost(self) -> None:
        """A feed call failed: changes may be missed, so the cache is untrusted until the feed
        delivers its next batch (the changes missed, or a resync). It is kept meanwhile:
        while the registry does not answer, what is known is served (agent_cache)."""
        self._behind = True

    def _registry_back(self) -> None:
        wake = getattr(self._follower, "wake", None)
        if wake is not None:
            wake()

    async def follow(self, make_follower: Callable[[], AsyncIterable[Any]]) -> None:
        """Consume the change feed until cancelled; a follower that dies is replaced."""
        delay = _FEED_RETRY_MIN_S
        while True:
            follower = make_follower()
            self._follower = follower
            try:
                async for batch in follower:
                    self.apply_batch(batch)
                    delay = _FEED_RETRY_MIN_S
            except Exception as exc:  # a bug or an unexpected answer: never trust blindly
                log.error("agent.feed_failed error=%r; cache untrusted until it resyncs", exc)
            finally:
                self._synced = False
                await close_quietly(follower)
            await asyncio.sleep(delay)
            delay = min(delay * 2, _FEED_RETRY_MAX_S)

    # -- registry -----------------------------------------------------------------------
    async def _lookup(self, caller: Caller) -> LookupResult:
        # The client's request is never cancelled: a wait that runs out leaves it to finish
        # on its own (the client's timeout bounds it). Cancelled while queued for one of the
        # pool's connections, httpx/httpcore can lose that connection's slot for good
        # (encode/httpcore#1093): after a storm of uncached lookups (1,000 VMs at once) every
        # later lookup of the agent timed out, the registry idle, until a restart.
        call = asyncio.ensure_future(self._registry.lookup(
            caller.ip, router_id=caller.router_id, network_id=caller.network_id))
        call.add_done_callback(_retrieved)
        try:
            answer = await asyncio.wait_for(asyncio.shield(call), self._registry_timeout_s)
        except NotFound:
            # unknown router or network: nobody there
            return LookupResult(0, ())
        except BadRequest:
            raise
        except TimeoutError:
            raise RegistryUnreachable(
                f"registry lookup timed out after {self._registry_timeout_s}s") from None
        except OpenImdsError as exc:
            raise RegistryUnreachable(f"registry lookup failed: {exc.reason}") from exc
        except Exception as exc:  # any client-library failure means: no answer
            raise RegistryUnreachable(f"registry lookup failed: {exc!r}") from exc
        ports = _field(answer, "ports")
        if not isinstance(ports, list | tuple):
            raise RegistryUnreachable("registry lookup answer has no port list")
        return LookupResult(int(_field(answer, "revision") or 0), ports)

    # -- requests -----------------------------------------------------------------------
    def handle(self, req: Request) -> AnyResponse | Awaitable[AnyResponse] | Deferred:
        t0 = self._clock()
        self.counts["requests"] += 1
        if self._count:
            self.hop.begun += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Request: %s %s HTTP/%s headers=%s body_bytes=%d", req.method,
                      req.target, req.version, redact(req.headers), len(req.body))
        # A head seen before (less its ID and its caller's values) names its path: no parse,
        # no rewrite; its caller is the server's cut-out identity, kept per caller. Only
        # requests that parsed are kept (errors never are); the cache still decides the
        # instance below.
        shape = req.shape  # a known head's key (`Limits.known_heads`)
        # A head found by its exact bytes (less the ID's value) carries the server's slot for
        # it: its caller and path as made the last time, with no lookup by value (at 10,000
        # callers the source's key, its values and the memo's slot are cache misses).
        memo = req.memo
        made: _Source | None = None
        path: _Path | None = None
        if memo is not None and memo.caller is not None:
            src = made = memo.caller
            path = memo.shape  # set with it
        elif shape is not None:
            hits = self._hits
            path = hits.young.get(shape) or hits.promote(shape)
        others: list[tuple[bytes, bytes]] | None = None
        try:
            if made is not None:
                rid = req.request_id
            elif path is not None:
                identity = req.identity  # None: the server cut no identity lines
                src = self._source_of(identity if identity is not None else tuple(
                    item for item in req.headers if item[0] in _IDENTITY_NAMES))
                rid = req.request_id
            else:
                src, others, rid = self._source(req)
        except OpenImdsError as exc:
            if req.path == STATS_PATH and self._is_local(req):
                self.hop.begun -= self._count  # not a metadata request
                return self._stats_response()
            log.warning("agent.rejected status=%d reason=%s", exc.status, exc.reason)
            return self._finish(req, None, None, t0, error_response(exc.status, exc.reason))
        # A hit reads the caller's `_Source` and `_Identity` and no other object of its own
        # (its `Caller` and `Resolution` only where needed): at 10,000 callers each is a
        # cache miss.
        active = self._active - self._held.held if self._held is not None else self._active
        if active >= self._max_concurrency:
            self.counts["saturated"] += 1
            return self._finish(req, src.caller, None, t0, error_response(
                503, f"agent saturated: {active} requests in flight",
                headers=[("Retry-After", self._retry_after)]))
        # While the cache's epoch is the one the source last checked its resolution at,
        # that is still the cache's answer: no lookup (at 10,000 instances its key, entry
        # and LRU links are cache misses that cost more than the lookup's own work).
        # `ident` None from here: the cache has no answer for the caller.
        ident = src.identity
        if ident is not None and src.epoch == self.cache.epoch and self.trusts_cache():
            self.resolver.stats.hits += 1
        else:
            res = self.resolver.cached(src.caller)
            if res is None:
                ident = None
            else:
                if ident is None or (ident.res is not res and ident.res != res):
                    ident = src.identity = self._identity(src.caller, res)
                src.epoch = self.cache.epoch  # checked: the cache's answer as of now
        # a held request runs as a task (cancelled with its client, which closes the
        # upstream connection and so releases the API's hold); others stay on callbacks
        held = bool(req.query) and self._held is not None and is_long_poll(req.query)
        if ident is not None and not held:
            if self.limiter is not None:
                denied = self._over_budget(req, ident.caller, ident.res, t0)
                if denied is not None:
                    return denied
            if path is None:
                assert others is not None
                path = self._path(req, others, rid)
                if shape is not None and path.kept:
                    self._hits.put(shape, path)
            if memo is not None and made is None and src.kept and path.kept:
                memo.shape = path  # the same caller and shape on every use
                memo.caller = src
            return self._forward_hit(req, ident, path, rid, t0)
        if held:
            return Abandonable(self._serve(req, src.caller, t0))
        return self._serve(req, src.caller, t0)

    def _over_budget(
        self, req: Request, caller: Caller, res: Resolution, t0: float,
    ) -> AnyResponse | None:
        """Count the request against its instance's budget; the 429 if it is over."""
        limiter = self.limiter
        assert limiter is not None
        if not (self._limit_v6 if ":" in caller.ip else self._limit_v4):
            return None
        verdict = limiter.hit(res.instance_id, self._clock())
        if verdict.allowed:
            return None
        self.counts["rate_limited"] += 1
        window = verdict.window
        assert window is not None
        if verdict.started:  # one line per episode, not per request (a flood floods logs)
            log.warning(
                "agent.rate_limited %s instance=%s window=%s limit=%d/%gs retry_after=%d "
                "denied_before=%d", caller.describe(), res.instance_id, window.name,
                window.limit, window.seconds, verdict.retry_after,
                limiter.denied(res.instance_id) - 1)
        if self.on_rate_limited is not None:
            self.on_rate_limited(res.instance_id, caller.ip)
        return self._finish(req, caller, res, t0, error_response(
            429, f"rate limit of {window.limit} requests per {window.seconds:g} s exceeded "
            f"for this instance; retry in {verdict.retry_after} s",
            headers=limiter.headers(verdict)))

    def _forward_hit(
        self, req: Request, ident: _Identity, path: _Path, rid: bytes | None, t0: float,
    ) -> Deferred:
        """A cache hit: send upstream and answer from the upstream's read callback (no Task,
        no future per request: `_HitReply`)."""
        self._active += 1
        reply = _HitReply(self, req, ident, rid, t0)
        try:
            mid = path.mid
            self._upstream.send_encoded(
                b"".join((path.head, ident.lines, path.tail)) if mid is None or rid is None
                else b"".join((path.head, rid, mid, ident.lines, path.tail)),
                req.method == "HEAD", reply)
        except Exception as exc:  # never leave the reply (and the in-flight count) hanging
            reply(exc)
        return reply

    def _source(
        self, req: Request,
    ) -> tuple[_Source, list[tuple[bytes, bytes]], bytes | None]:
        """The caller `req`'s identity headers name (parsed once per caller and kept), the
        other headers with the first request ID's value masked (`_NO_RID`), and that
        value. Raises for headers that do not name a caller (never kept)."""
        ident: list[tuple[bytes, bytes]] = []
        others: list[tuple[bytes, bytes]] = []
        rid: bytes | None = None
        for item in req.headers:
            name = item[0]
            if name in _IDENTITY_NAMES:
                ident.append(item)
            elif rid is None and name == REQUEST_ID:
                rid = item[1]
                others.append(_NO_RID)
            else:
                others.append(item)
        # a known head's identity is the same items, and the server's one tuple per caller
        # (which its exact heads share): the caller is kept under that one, not a copy
        return self._source_of(
            req.identity if req.identity is not None else tuple(ident)), others, rid

    def _source_of(self, key: tuple[tuple[bytes, bytes], ...]) -> _Source:
        """The caller named by `key`, every identity header of a request (lower-cased name,
        value) in order: parsed once per caller and kept. Raises for headers that do not
        name a caller (never kept)."""
        sources = self._sources
        src = sources.young.get(key) or sources.promote(key)
        if src is None:
            kept = len(key) == 2 and len(key[0][1]) + len(key[1][1]) <= _SOURCE_BYTES_MAX
            src = _Source(parse_caller(key), kept)  # raises for bad input
            if kept:
                sources.put(key, src)
        return src

    def _identity(self, caller: Caller, res: Resolution) -> _Identity:
        """`caller`'s identity lines and access-line part for `res`."""
        lines = b"".join(name + b": " + value + b"\r\n" for name, value in identity_headers(
            forwarded_for=caller.ip, instance_id=res.instance_id, tenant_id=res.project_id,
            signature=sign_instance_id(self._secret, res.instance_id)))
        kind, ident = caller.scope
        return _Identity(caller, res, lines,
                         f"ip={caller.ip} {kind}={ident} instance={res.instance_id}")

    def _path(
        self, req: Request, others: list[tuple[bytes, bytes]], rid: bytes | None,
    ) -> _Path:
        """`req`'s path bytes (`_Path`), kept per shape: method, target and `others` (its
        headers but the identity ones, as `_source` leaves them). Not kept: a body, a long
        target, many or long headers (made for this request only)."""
        keep = (not req.body and len(req.target) <= _HIT_TARGET_MAX
                and len(others) <= _PATH_HEADERS_MAX)
        key: tuple[object, ...] = ()
        if keep:
            key = (req.method, req.target, *others)
            paths = self._paths
            path = paths.young.get(key) or paths.promote(key)
            if path is not None:
                return path
            keep = sum(len(n) + len(v) for n, v in others) <= _PATH_BYTES_MAX
        # the first ID's value becomes the marker (others pass), the identity the splice
        headers = others if rid is None else [
            _MARKED_RID if item is _NO_RID else item for item in others]
        whole = self._upstream.encode_request(
            req.method, req.target,
            rewrite_with_identity(headers, _SPLICE, method=req.method.encode(),
                                  body_length=len(req.body)),
            req.body)
        # Both marks are in the head only (the parser refuses NUL in a header or target); a
        # body may hold anything, so it is never searched.
        head_end = whole.find(b"\r\n\r\n") + 2
        at = whole.find(_SPLICE_LINE, 0, head_end)
        assert at > 0, "the identity's place is always in the head"
        mark = whole.find(_RID_MARK, 0, at) if rid is not None else -1
        tail = whole[at + len(_SPLICE_LINE):]
        path = (_Path(whole[:mark], whole[mark + len(_RID_MARK):at], tail, keep) if mark >= 0
                else _Path(whole[:at], None, tail, keep))
        if keep:
            self._paths.put(key, path)
        return path

    async def _recheck(
        self, req: Request, caller: Caller, res: Resolution, first: UpstreamResponse,
        t0: float,
    ) -> AnyResponse:
        """The API does not know the cached instance: maybe its IP was reused before the
        feed told us. Ask the registry once (Neutron's LP#1868867 retry) and, if the answer
        changed, forward again. Owns one in-flight slot (released here)."""
        try:
            self.counts["rechecks"] += 1
            self.resolver.forget(caller)
            resp = first
            try:
                fresh, _ = await self.resolver.resolve(caller, use_cache=False)
            except OpenImdsError:
                fresh = res
            if fresh != res:
                res = fresh
                resp = await self._forward(req, caller, res)
            return self._finish(req, caller, res, t0, resp, resp.status)
        except UpstreamError as exc:
            return self._finish(req, caller, res, t0, self._upstream_failure(exc))
        finally:
            self._active -= 1

    def _upstream_for(self, req: Request) -> Upstream:
        """The long-poll pool for a held request, else the ordinary one."""
        if self._held is not None and is_long_poll(req.query):
            return self._held
        return self._upstream

    async def _serve(self, req: Request, caller: Caller, t0: float) -> AnyResponse:
        self._active += 1
        resolution: Resolution | None = None
        try:
            try:
                resolution, source = await self.resolver.resolve(caller)
            except ResolutionError as exc:
                log.warning("agent.instance_not_found %s detail=%s", caller.describe(),
                            exc.reason)
                return self._finish(req, caller, None, t0, error_response(404, _BODY_NOT_FOUND))
            except BadRequest as exc:
                return self._finish(req, caller, None, t0, error_response(400, exc.reason))
            except UpstreamError as exc:
                log.error("agent.registry_unavailable %s error=%s", caller.describe(),
                          exc.reason)
                return self._finish(req, caller, None, t0, error_response(
                    503, "instance lookup unavailable",
                    headers=[("Retry-After", self._retry_after)]))
            if self.limiter is not None:
                denied = self._over_budget(req, caller, resolution, t0)
                if denied is not None:
                    return denied
            resp = await self._forward(req, caller, resolution)
            if resp.status == 404 and source == "hit" and self._may_recheck(caller):
                self._active += 1  # _recheck releases its own slot
                return await self._recheck(req, caller, resolution, resp, t0)
            return self._finish(req, caller, resolution, t0, resp, resp.status)
        except UpstreamError as exc:
            return self._finish(req, caller, resolution, t0, self._upstream_failure(exc))
        finally:
            self._active -= 1

    def _api_headers(
        self, req: Request, caller: Caller, res: Resolution,
    ) -> list[tuple[bytes, bytes]]:
        """The API-bound headers of `req` on the async path (a registry lookup came first:
        signing here is a small part of it)."""
        identity = identity_headers(
            forwarded_for=caller.ip, instance_id=res.instance_id, tenant_id=res.project_id,
            signature=sign_instance_id(self._secret, res.instance_id))
        return rewrite_with_identity(
            req.headers, identity, method=req.method.encode(), body_length=len(req.body))

    async def _forward(
        self, req: Request, caller: Caller, res: Resolution,
    ) -> UpstreamResponse:
        resp = await self._upstream_for(req).request(
            req.method, req.target, self._api_headers(req, caller, res), req.body)
        self._check_api_status(caller, res, resp.status)
        return resp

    @staticmethod
    def _check_api_status(caller: Caller, res: Resolution, status: int) -> None:
        if status == 403:
            log.warning("agent.api_forbidden %s instance=%s reason=%s", caller.describe(),
                        res.instance_id, "the metadata API rejected the request; shared "
                        "secrets may not match")
        elif status >= 500:
            log.warning("agent.api_error %s instance=%s status=%d", caller.describe(),
                        res.instance_id, status)

    def _upstream_failure(self, exc: UpstreamError) -> Response:
        log.error("agent.api_failed status=%d error=%s", exc.status, exc.reason)
        if isinstance(exc, UpstreamTimeout):
            self.hop.upstream_error(504)
            return error_response(504, "the metadata API did not answer in time")
        if isinstance(exc, UpstreamUnavailable):
            self.hop.upstream_error(503)
            return error_response(503, "the metadata API is unavailable",
                                  headers=[("Retry-After", self._retry_after)])
        self.hop.upstream_error(502)
        if isinstance(exc, UpstreamProtocolError):
            return error_response(502, "the metadata API sent a bad answer")
        return error_response(502, "the metadata API failed")

    def _may_recheck(self, caller: Caller) -> bool:
        """At most one registry re-check per caller per second (a VM asking for missing
        paths must not turn every 404 into a registry query)."""
        now = self._clock()
        key = key_of(caller)
        last = self._recheck_at.get(key)
        if last is not None and now - last < _RECHECK_INTERVAL_S:
            return False
        if len(self._recheck_at) >= _MAX_RECHECK_KEYS:
            self._recheck_at.clear()
        self._recheck_at[key] = now
        return True

    def _finish(
        self, req: Request, caller: Caller | None, res: Resolution | None, t0: float,
        resp: AnyResponse, status: int | None = None, rid: bytes | None = None,
        who: str = "",
    ) -> AnyResponse:
        """Count and log the answer (`rid`, `who`: the request ID and the caller part of the
        access line, when the hit path already has them)."""
        code = status if status is not None else (
            resp.status if isinstance(resp, Response) else 0)
        counts = self.status_counts
        counts[code] = counts.get(code, 0) + 1
        seconds = self._clock() - t0
        if self._count:
            self.hop.done(code, req.path, seconds)
        if self._access and access_line.enabled:
            if not who:
                if caller is not None:
                    kind, ident = caller.scope
                    who = f"ip={caller.ip} {kind}={ident}"
                else:
                    who = "ip=- scope=-"
                who += f" instance={res.instance_id if res is not None else '-'}"
            if rid is None:
                rid = req.header(REQUEST_ID)
            access_line.write(
                f"agent request_id={rid.decode('latin-1') if rid else '-'} {who} status={code} "
                f"ms={seconds * 1000.0:.2f} method={req.method} path={req.path}")
        return resp

    # -- stats --------------------------------------------------------------------------
    @staticmethod
    def _is_local(req: Request) -> bool:
        return not any(
            name == b"x-forwarded-for" or name.startswith(b"x-neutron-")
            for name, _ in req.headers
        )

    def stats(self) -> dict[str, Any]:
        s = self.resolver.stats
        return {
            "pid": os.getpid(),  # which worker answered (metadata_workers > 1)
            "requests": self.counts["requests"],
            "in_flight": self._active,
            "saturated_503": self.counts["saturated"],
            "cache_hits": s.hits,
            "cache_misses": s.misses,
            "single_flight_shared": s.shared,
            "registry_queries": s.registry_queries,
            "lease_probes": self.lease_probes,
            "registry_errors": s.registry_errors,
            "uncached_lookups": s.uncached,
            "served_known_registry_down": s.known,
            "index_hits": s.index_hits,
            "index_ports": len(self.cache.index),
            "index_loads": s.index_loads,
            "index_load_errors": s.index_load_errors,
            "rechecks_after_api_404": self.counts["rechecks"],
            "rate_limited_429": self.counts["rate_limited"],
            "cache_entries": len(self.cache),
            "cache_evictions": self.cache.evictions,
            "cache_invalidations": self.cache.invalidations,
            "feed_live": self._synced and self._feed_up(),  # no flip logging from here
            "feed_revision": self.feed_revision,
            "feed_lease_s": self.lease.lease_s,  # registry/reuse.py
            "feed_lease_lapses": self.lease.lapses,  # trust lost for want of a feed answer
            "statuses": {str(k): v for k, v in sorted(self.status_counts.items())},
        }

    def metric_families(self) -> list[Metric]:
        """The cache and registry counters for /metrics (a `ServiceMetrics` source)."""
        s = self.resolver.stats
        return [
            counter("openimds_agent_cache_hits", "Callers answered from the cache", s.hits),
            counter("openimds_agent_cache_misses", "Callers not in the cache", s.misses),
            gauge("openimds_agent_cache_entries", "Entries in the caller cache",
                  len(self.cache)),
            counter("openimds_agent_cache_evictions", "Entries evicted for room",
                    self.cache.evictions),
            counter("openimds_agent_cache_invalidations", "Entries dropped by the change feed",
                    self.cache.invalidations),
            gauge("openimds_agent_cache_trusted",
                  "1 while the change feed is live and the cache is used",
                  1 if self._synced and self._feed_up() else 0),
            counter("openimds_agent_registry_lookups", "Registry /v1/lookup queries",
                    s.registry_queries),
            counter("openimds_agent_registry_errors", "Registry lookups that failed",
                    s.registry_errors),
            counter("openimds_agent_single_flight_shared",
                    "Misses that joined a lookup already in flight", s.shared),
            counter("openimds_agent_saturated", "Requests refused (503) at max_concurrency",
                    self.counts["saturated"]),
            counter("openimds_agent_rechecks", "Registry re-checks after an API 404",
                    self.counts["rechecks"]),
            counter("openimds_rate_limited", "Requests refused (429) by [metadata_rate_limiting]",
                    self.counts["rate_limited"], hop="agent"),
        ]

    def _stats_response(self) -> Response:
        body = json.dumps(self.stats(), sort_keys=True).encode() + b"\n"
        return Response(200, body, content_type="application/json")

    def log_stats(self) -> None:
        log.info("agent.stats %s", " ".join(
            f"{k}={v}" for k, v in self.stats().items() if not isinstance(v, dict)))


def limiter_from_settings(
    settings: Settings, kind: type[RateLimiter] = RateLimiter,
) -> tuple[RateLimiter | None, frozenset[int]]:
    """`[metadata_rate_limiting]` as a limiter of `kind` (None when disabled) and the address
    families it counts. Raises ConfigError for a bad ip_versions."""
    cfg = settings.metadata_rate_limiting
    try:
        versions = parse_ip_versions(cfg.ip_versions)
    except ValueError as exc:
        raise ConfigError(f"[metadata_rate_limiting] ip_versions: {exc}") from None
    if not cfg.rate_limit_enabled:
        return None, versions
    return kind([
        Window("burst", cfg.burst_window_duration, cfg.burst_query_rate_limit),
        Window("base", cfg.base_window_duration, cfg.base_query_rate_limit),
    ], max_keys=max(1024, settings.metadata_agent.cache_size)), versions


def _retrieved(fut: asyncio.Future[Any]) -> None:
    """Mark a call nobody may await any more as retrieved (its outcome is not logged)."""
    if not fut.cancelled():
        fut.exception()


def _pass_on(task: asyncio.Future[AnyResponse], reply: Deferred) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("agent.forward_failed error=%r", exc)
        reply.resolve(error_response(500, "metadata agent error"))
    else:
        reply.resolve(task.result())


async def close_quietly(obj: Any) -> None:
    """Close a client/pool if it has an (async) close method."""
    for name in ("aclose", "close"):
        method = getattr(obj, name, None)
        if method is None:
            continue
        with contextlib.suppress(Exception):
            result = method()
            if asyncio.iscoroutine(result):
                await result
        return
