"""The registry REST API on aiohttp.web: parse -> `Registry` (in a worker thread) -> JSON.

Auth, error mapping and JSON parsing happen once, in `_middleware`. Every write wakes the
long-polls of `/v1/changes` in this process at once. On PostgreSQL a LISTEN session
(`registry/notify.py`) wakes them when any registry process sharing the database commits, and
they re-check the store only every `RECHECK_SLOW_S` as a backstop; without a live LISTEN
session (SQLite, or PostgreSQL reconnecting) they re-check every `RECHECK_S`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import hmac
import json
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from openimds.config import Settings
from openimds.errors import BadRequest, ConfigError, Forbidden, OpenImdsError, Unauthorized
from openimds.metrics import (
    HopStats,
    Metric,
    ServiceMetrics,
    counter,
    gauge,
    labelled,
    registry_family,
    start_metrics_server,
)
from openimds.registry.client import ResyncRequired
from openimds.registry.notify import Listener
from openimds.registry.openapi import openapi_document
from openimds.registry.scheduler import Policy
from openimds.registry.service import MAX_WAIT_S, Registry
from openimds.registry.store import ACK_HOLD, THREADS, AckHold, Store

log = logging.getLogger(__name__)

RECHECK_S = 0.5
RECHECK_SLOW_S = 5.0
LISTEN_WAIT_S = 2.0  # at start-up, for the LISTEN session before serving
MAX_BODY_BYTES = 1024 * 1024
OPEN_PATHS = frozenset({"/v1/health", "/v1/openapi.json"})
# Writes the reader token (the agents' token) may make: heartbeats.
READER_WRITES = frozenset({("POST", "/v1/agents")})
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")
_KIND = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
         405: "method_not_allowed", 409: "conflict", 410: "resync", 413: "too_large"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Notifier:
    """Wakes the long-polls once per commit, and spares them the store where it can.

    A wake is owed once per committed revision: revisions commit in order (the revision
    bump row-locks, SQLite's write lock), so a wake issued after revision r committed covers
    every r' <= r, and a later wake for one of them (a write's own after its LISTEN echo, or
    the other way round) is dropped. A wake without a revision (the LISTEN session's
    (re)connect or loss, the reaper, a failed write) always wakes.

    A long-poll takes the current `epoch()` before it reads and waits on that one, so a
    commit woken while its read ran makes it read again at once. What it reads (`read`):

    - woken by this process's write: that write's own change rows (`AckHold.fed`), which
      are what the store would answer for `since = revision - 1`;
    - else one read of the store per (since, limit) since the last wake, shared by every
      waiter asking the same (a commit of another process: its LISTEN wake);
    - nothing yet (`current`) when it asks from the revision last woken while the LISTEN
      session that would carry the next one is up: it waits first, reads once woken or at
      its re-check."""

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.closed = False
        self.listener: Listener | None = None  # PostgreSQL: wakes us on others' commits
        self.woken = 0  # the highest revision a wake was issued for
        # the LISTEN session (its connect count) that was up since before `woken` committed,
        # so it carries every later commit's notification; None: not known
        self._woken_session: int | None = None
        # this process's write requests in flight: their LISTEN echo wakes no one, the
        # write wakes the long-polls after its answer
        self.writing: set[AckHold] = set()
        self._reads: dict[tuple[int, int | None], asyncio.Future[Any]] = {}
        self._fed: tuple[int, Any] | None = None  # (revision, the page after revision - 1)
        self.wakes = 0
        self.reads = 0

    @property
    def recheck_s(self) -> float:
        live = self.listener is not None and self.listener.live
        return RECHECK_SLOW_S if live else RECHECK_S

    def session(self) -> int | None:
        """The LISTEN session up now (its connect count), None when there is none."""
        listener = self.listener
        return listener.connects if listener is not None and listener.live else None

    def close(self) -> None:
        """Shutting down: every waiter answers now with what it has."""
        self.closed = True
        self.notify()

    def notify(self, revision: int | None = None, *, page: Any = None,
               session: int | None = None) -> None:
        """Wake every waiter: `revision` committed (None: something may have). `page`: the
        feed after `revision - 1`, from the write's rows; `session`: the LISTEN session that
        was up before that write began (or that carried this notification)."""
        if revision is not None:
            if revision <= self.woken:
                return
            self.woken = revision
        self._woken_session = session if session is not None and session == self.session() \
            else None
        self.wakes += 1
        self._event.set()
        self._event = asyncio.Event()
        self._reads = {}  # begun before this commit was woken: they may not have seen it
        self._fed = (revision, page) if revision is not None and page is not None else None

    def notified(self, revision: int | None) -> None:
        """The LISTEN session's wake: a commit of this process's own write in flight wakes
        the long-polls after that write is answered, not now, beside its answer."""
        if revision is None:
            self.notify()
        elif not any(h.revision == revision for h in self.writing):
            self.notify(revision, session=self.session())

    def epoch(self) -> asyncio.Event:
        """What a waiter waits on after a read begun now (set at the next wake)."""
        return self._event

    def current(self, since: int) -> bool:
        """Nothing after `since` can have committed unwoken: it is the revision last woken,
        and the LISTEN session up since before that commit is still up."""
        return (since == self.woken and self._woken_session is not None
                and self._woken_session == self.session())

    async def read(self, fn: Callable[[int, int | None], Any], since: int,
                   limit: int | None) -> Any:
        """The feed after `since`: the waking write's rows, or `fn(since, limit)` in a worker
        thread, shared with the waiters that ask the same before the next wake."""
        fed = self._fed
        if fed is not None and fed[0] == since + 1:
            return fed[1]
        key = (since, limit)
        reads = self._reads
        fut = reads.get(key)
        if fut is None:
            self.reads += 1
            fut = reads[key] = asyncio.ensure_future(asyncio.to_thread(fn, since, limit))
            # done: the next asks again (a commit of another process, not yet woken, or
            # without a LISTEN session never woken, may be past it)
            fut.add_done_callback(lambda f: _read_done(reads, key, f))
        # one waiter gone (its client left) must not cancel the others' read
        return await asyncio.shield(fut)

    async def wait(self, epoch: asyncio.Event, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(epoch.wait(), timeout_s)


def _read_done(reads: dict[tuple[int, int | None], asyncio.Future[Any]],
               key: tuple[int, int | None], fut: asyncio.Future[Any]) -> None:
    if reads.get(key) is fut:
        del reads[key]
    if not fut.cancelled():
        fut.exception()  # retrieved here too: its waiters may all have gone


class RegistryMetrics:
    """What the registry counts for /metrics: its REST requests (a hop, minus the feed's
    long-polls, whose latency is the wait), feed polls, and writes by resource."""

    def __init__(self) -> None:
        self.hop = HopStats("registry", registry_family)
        self.feed_polls: dict[int, int] = {}
        self.writes: dict[str, int] = {}

    def record(self, method: str, path: str, status: int, seconds: float) -> None:
        if path.startswith("/v1/changes"):
            self.feed_polls[status] = self.feed_polls.get(status, 0) + 1
            return
        self.hop.begun += 1
        self.hop.done(status, path, seconds)
        if method in _WRITES and status < 400:
            parts = path.split("/")
            resource = parts[2] if len(parts) > 2 and parts[2] in _RESOURCES else "other"
            self.writes[resource] = self.writes.get(resource, 0) + 1

    def families(self, registry: Registry, notifier: Notifier) -> list[Metric]:
        fams: list[Metric] = [
            labelled("openimds_registry_writes", "Writes committed, by resource", "counter",
                     "resource", sorted(self.writes.items())),
            labelled("openimds_registry_feed_polls", "Change-feed calls answered, by status",
                     "counter", "code", sorted((str(k), v) for k, v in self.feed_polls.items())),
            # the Notifier's: reads per wake is what the long-polls cost the store
            counter("openimds_registry_feed_wakes",
                    "Wakes of the change-feed long-polls waiting in this process (one per "
                    "committed revision; also a LISTEN session's connect or loss, a failed "
                    "write, the reaper)", notifier.wakes),
            counter("openimds_registry_feed_reads",
                    "Reads of the store for change-feed calls (one per since and limit "
                    "until the next wake, shared by the calls asking it; none for a call "
                    "answered from the waking write's own rows)", notifier.reads),
        ]
        fams.append(gauge("openimds_registry_revision", "The registry's current revision",
                          int(registry.health()["revision"])))
        return fams


_WRITES = frozenset({"POST", "PATCH", "PUT", "DELETE"})
_RESOURCES = frozenset({"projects", "networks", "subnets", "routers", "ports", "keypairs",
                        "instances"})

REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", RegistryMetrics)
NOTIFIER = web.AppKey("notifier", Notifier)
TOKENS = web.AppKey("tokens", tuple)


def _error(status: int, reason: str, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"error": _KIND.get(status, "error"), "reason": reason}
    if status == 400:
        m = _FIELD.match(reason)
        if m:
            body["field"] = m.group(1)
    body.update(extra)
    return web.json_response(body, status=status)


def _authorize(request: web.Request) -> None:
    if request.path in OPEN_PATHS:
        return
    admin, reader = request.app[TOKENS]
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("missing bearer token")
    tok = token.strip().encode()
    if hmac.compare_digest(tok, admin.encode()):
        return
    if reader and hmac.compare_digest(tok, reader.encode()):
        if request.method not in ("GET", "HEAD") and (
                (request.method, request.path) not in READER_WRITES):
            raise Forbidden(f"the reader token may not {request.method} {request.path}")
        return
    raise Unauthorized("invalid bearer token")


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.monotonic()
    try:
        _authorize(request)
        resp = await handler(request)
    except ResyncRequired as exc:
        resp = _error(410, exc.reason, revision=exc.revision)
    except OpenImdsError as exc:
        resp = _error(exc.status, exc.reason)
    except web.HTTPRequestEntityTooLarge:
        resp = _error(413, f"body: larger than {MAX_BODY_BYTES} bytes")
    except web.HTTPException as exc:
        resp = _error(exc.status, f"{request.method} {request.path}: {exc.reason}")
    seconds = time.monotonic() - started
    log.debug("request method=%s path=%s status=%s ms=%.1f", request.method, request.path,
              resp.status, seconds * 1000)
    request.app[METRICS].record(request.method, request.path, resp.status, seconds)
    return resp


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"body: malformed JSON: {exc}") from None


def _query(request: web.Request) -> dict[str, str]:
    return dict(request.query)


async def _call(request: web.Request, fn: Callable[..., Any], *args: Any,
                write: bool = False, status: int = 200) -> web.Response:
    hold = AckHold()
    token = ACK_HOLD.set(hold)  # the worker thread gets a copy of this context
    if not write:
        try:
            result = await asyncio.to_thread(fn, *args)
        finally:
            ACK_HOLD.reset(token)
        return web.json_response(result, status=status)
    notifier = request.app[NOTIFIER]
    notifier.writing.add(hold)
    session = notifier.session()
    try:
        try:
            result = await asyncio.to_thread(fn, *args)
        finally:
            ACK_HOLD.reset(token)
        resp = web.json_response(result, status=status)
        if hold.seconds > 0:  # an IP reused moments after its release: see registry/reuse.py
            # the feed tells the agents during the hold
            _wake(notifier, request.app[REGISTRY], hold, session)
            await asyncio.sleep(hold.seconds)
        else:
            # The answer first: the long-polls' reads this wakes would run beside it.
            await resp.prepare(request)
            await resp.write_eof()
    finally:
        _wake(notifier, request.app[REGISTRY], hold, session)
    return resp


def _wake(notifier: Notifier, registry: Registry, hold: AckHold, session: int | None) -> None:
    """A write request is over (answered, or failed): wake the long-polls for what it
    committed, with its rows; nothing committed wakes no one, unless its LISTEN echo may
    have been dropped (a revision still marked in flight) or the write failed midway."""
    notifier.writing.discard(hold)
    if hold.revision not in (0, hold.committed):
        notifier.notify()  # bumped, never committed: a LISTEN echo of its revision dropped
    elif hold.committed:
        fed = hold.fed
        page = None
        if fed is not None and fed[0] == hold.committed:
            page = registry.fed(*fed)
        notifier.notify(hold.committed, page=page, session=session)


def _routes(reg: Registry) -> list[web.RouteDef]:
    def lister(fn: Callable[[dict[str, str]], Any]) -> Handler:
        async def h(request: web.Request) -> web.StreamResponse:
            return await _call(request, fn, _query(request))
        return h

    def getter(fn: Callable[[str], Any]) -> Handler:
        async def h(request: web.Request) -> web.StreamResponse:
            return await _call(request, fn, request.match_info["id"])
        return h

    def creator(fn: Callable[[Any], Any]) -> Handler:
        async def h(request: web.Request) -> web.StreamResponse:
            body = await _json_body(request)
            return await _call(request, fn, body, write=True, status=201)
        return h

    def deleter(fn: Callable[[str], Any]) -> Handler:
        async def h(request: web.Request) -> web.StreamResponse:
            return await _call(request, fn, request.match_info["id"], write=True)
        return h

    def acting(fn: Callable[[str, Any], Any]) -> Handler:
        async def h(request: web.Request) -> web.StreamResponse:
            body = await _json_body(request)
            return await _call(request, fn, request.match_info["id"], body, write=True)
        return h

    async def health(request: web.Request) -> web.StreamResponse:
        return await _call(request, reg.health)

    async def openapi(request: web.Request) -> web.StreamResponse:
        return web.json_response(openapi_document())

    async def lookup(request: web.Request) -> web.StreamResponse:
        return await _call(request, reg.lookup, _query(request))

    async def heartbeat(request: web.Request) -> web.StreamResponse:
        body = await _json_body(request)
        return await _call(request, reg.heartbeat, body, write=True)

    async def topology(request: web.Request) -> web.StreamResponse:
        return await _call(request, reg.topology)

    async def changes(request: web.Request) -> web.StreamResponse:
        q = request.query
        try:
            since = int(q.get("since", "0"))
        except ValueError:
            raise BadRequest(f"since: {q.get('since')!r} is not an integer") from None
        try:
            wait = float(q.get("wait", "0"))
        except ValueError:
            raise BadRequest(f"wait: {q.get('wait')!r} is not a number") from None
        if not 0 <= wait <= MAX_WAIT_S:
            raise BadRequest(f"wait: {wait} is not between 0 and {MAX_WAIT_S:g}")
        limit = None
        if q.get("limit"):
            try:
                limit = int(q["limit"])
            except ValueError:
                raise BadRequest(f"limit: {q['limit']!r} is not an integer") from None
            if limit < 1:
                raise BadRequest(f"limit: {limit} must be at least 1")
        notifier = request.app[NOTIFIER]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        # from the revision last woken: nothing to read until the next wake (or re-check)
        waiting = wait > 0 and not notifier.closed and notifier.current(since)
        while True:
            epoch = notifier.epoch()
            if not waiting:
                page = await notifier.read(reg.changes_page, since, limit)
                left = deadline - loop.time()
                if page.count or left <= 0 or notifier.closed:
                    # encoded once, in the worker thread: every long-poll it wakes sends it
                    return web.Response(body=page.body, content_type="application/json",
                                        charset="utf-8")
            waiting = False
            await notifier.wait(epoch, min(notifier.recheck_s, deadline - loop.time()))

    return [
        web.get("/v1/health", health),
        web.get("/v1/openapi.json", openapi),
        web.get("/v1/projects", lister(reg.list_projects)),
        web.post("/v1/projects", creator(reg.create_project)),
        web.get("/v1/projects/{id}", getter(reg.get_project)),
        web.get("/v1/networks", lister(reg.list_networks)),
        web.post("/v1/networks", creator(reg.create_network)),
        web.get("/v1/networks/{id}", getter(reg.get_network)),
        web.delete("/v1/networks/{id}", deleter(reg.delete_network)),
        web.get("/v1/subnets", lister(reg.list_subnets)),
        web.post("/v1/subnets", creator(reg.create_subnet)),
        web.get("/v1/subnets/{id}", getter(reg.get_subnet)),
        web.delete("/v1/subnets/{id}", deleter(reg.delete_subnet)),
        web.get("/v1/routers", lister(reg.list_routers)),
        web.post("/v1/routers", creator(reg.create_router)),
        web.get("/v1/routers/{id}", getter(reg.get_router)),
        web.delete("/v1/routers/{id}", deleter(reg.delete_router)),
        web.post("/v1/routers/{id}/add_interface", acting(reg.add_interface)),
        web.post("/v1/routers/{id}/remove_interface", acting(reg.remove_interface)),
        web.get("/v1/ports", lister(reg.list_ports)),
        web.post("/v1/ports", creator(reg.create_port)),
        web.get("/v1/ports/{id}", getter(reg.get_port)),
        web.delete("/v1/ports/{id}", deleter(reg.delete_port)),
        web.get("/v1/keypairs", lister(reg.list_keypairs)),
        web.post("/v1/keypairs", creator(reg.create_keypair)),
        web.get("/v1/keypairs/{id}", getter(reg.get_keypair)),
        web.delete("/v1/keypairs/{id}", deleter(reg.delete_keypair)),
        web.get("/v1/instances", lister(reg.list_instances)),
        web.post("/v1/instances", creator(reg.create_instance)),
        web.get("/v1/instances/{id}", getter(reg.get_instance)),
        web.patch("/v1/instances/{id}", acting(reg.update_instance)),
        web.delete("/v1/instances/{id}", deleter(reg.delete_instance)),
        web.get("/v1/instances/{id}/password", getter(reg.get_password)),
        web.post("/v1/instances/{id}/password", acting(reg.set_password)),
        web.delete("/v1/instances/{id}/password", deleter(reg.clear_password)),
        web.get("/v1/instances/{id}/view", getter(reg.view)),
        web.get("/v1/lookup", lookup),
        web.post("/v1/agents", heartbeat),
        web.get("/v1/hosts", lister(reg.list_hosts)),
        web.get("/v1/hosts/{id}", getter(reg.get_host)),
        web.delete("/v1/hosts/{id}", deleter(reg.delete_host)),
        web.get("/v1/topology", topology),
        web.get("/v1/changes", changes),
    ]


async def _reap(registry: Registry, notifier: Notifier, settings: Settings,
                ticked: asyncio.Event) -> None:
    """The registry's own heartbeat (its node shows as a controller), then, a few times per
    agent_down_time: declare silent agents dead and move their work (`Registry.reconcile`).
    Every registry process sharing a database runs this; the store serializes them. Sets
    `ticked` after the first round."""
    tick_s = min(1.0, settings.agent_down_time / 5)
    report_s = settings.AGENT.report_interval
    last_report = 0.0
    loop = asyncio.get_running_loop()
    while True:
        try:
            if loop.time() - last_report >= report_s:
                await asyncio.to_thread(registry.heartbeat,
                                        {"host": settings.host, "type": "registry"})
                last_report = loop.time()
            if await asyncio.to_thread(registry.reconcile):
                notifier.notify()
        except Exception:  # the database may be briefly away; keep trying
            log.exception("registry.reconcile_failed")
        ticked.set()
        await asyncio.sleep(tick_s)


def settle_heap() -> None:
    """Everything made by start-up lives as long as the process: keep it out of the cyclic
    collector's way. Unfrozen, a full collection while a 10,000-port topology answer was
    built walked ~110,000 objects and held every request 27 ms; frozen, ~58,000 and 7 ms
    (docs/benchmarks.md, "Create p99: the first create")."""
    gc.collect()
    gc.freeze()


def make_app(registry: Registry, *, admin_token: str, reader_token: str = "") -> web.Application:
    """The aiohttp application; refuses to exist without an admin token."""
    if not admin_token:
        raise ConfigError("[registry] admin_token is empty: the registry refuses to start "
                          "without one")
    app = web.Application(middlewares=[_middleware], client_max_size=MAX_BODY_BYTES)
    app[REGISTRY] = registry
    app[NOTIFIER] = Notifier()
    app[TOKENS] = (admin_token, reader_token)
    app[METRICS] = RegistryMetrics()
    app.add_routes(_routes(registry))
    return app


async def serve(settings: Settings, *, ready: Callable[[], None] | None = None) -> None:
    """Open the store, serve the API until SIGTERM/SIGINT."""
    reg_settings = settings.registry
    if not reg_settings.admin_token:
        raise ConfigError("[registry] admin_token is empty: the registry refuses to start "
                          "without one")
    # Every store call runs on this executor; the PostgreSQL pool keeps (and warms) one
    # connection per thread of it, so no request ever checks out a cold one.
    asyncio.get_running_loop().set_default_executor(
        concurrent.futures.ThreadPoolExecutor(THREADS, thread_name_prefix="registry"))
    store = Store(settings.registry_connection, change_retention=reg_settings.change_retention,
                  sqlite_synchronous=reg_settings.sqlite_synchronous)
    await asyncio.to_thread(store.create_schema)
    registry = Registry(store, max_page_size=reg_settings.max_page_size,
                        reuse_hold=reg_settings.reuse_hold,
                        policy=Policy(down_time_s=settings.agent_down_time,
                                      dhcp_per_network=settings.dhcp_agents_per_network))
    try:
        await asyncio.to_thread(registry.warm_up)
    except Exception:  # a cold first request is slower, not wrong: serve anyway
        log.exception("registry.warm_up_failed")
    app = make_app(registry, admin_token=reg_settings.admin_token,
                   reader_token=reg_settings.reader_token)
    metrics = ServiceMetrics("registry")
    metrics.hops.append(app[METRICS].hop)
    metrics.add(lambda: app[METRICS].families(registry, app[NOTIFIER]))
    metrics_server: asyncio.AbstractServer | None = None
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, reg_settings.bind_host, reg_settings.bind_port,
                       reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = app[NOTIFIER]
    ticked = asyncio.Event()
    background = [asyncio.create_task(_reap(registry, notifier, settings, ticked))]
    listener: Listener | None = None
    if store.backend == "postgresql":
        notifier.listener = listener = Listener(store.url, notifier.notified)
        background.append(asyncio.create_task(listener.run()))
    try:
        # The reaper's first round (a write: this node's heartbeat) before the first request,
        # which would otherwise wait for it and its first-use statement compiles.
        await ticked.wait()
        # Likewise the LISTEN session's connect (a new server backend, ~4 ms of the
        # database's CPU), which overlapped the first creates; bounded: a registry whose
        # LISTEN cannot connect still serves (its long-polls re-check every RECHECK_S).
        if listener is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listener.listened.wait(), LISTEN_WAIT_S)
        metrics_server = await start_metrics_server(settings, metrics)
        settle_heap()
        await site.start()
        backend = store.backend
        log.info("registry.start url=%s backend=%s", reg_settings.effective_url, backend)
        if ready is not None:
            ready()
        await stop.wait()
        log.info("registry.stop")
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        notifier.close()
        if metrics_server is not None:
            metrics_server.close()
        await runner.cleanup()
        store.dispose()
