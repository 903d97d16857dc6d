"""`openimds agent`: run the metadata agent on metadata_proxy_socket until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import cast

from openimds.cli import add_command
from openimds.config import Settings, worker_socket
from openimds.core.ratelimit import RateLimiter
from openimds.errors import ConfigError
from openimds.host.limits import raise_nofile_limit
from openimds.host.unix_listener import file_id, remove_if_ours, remove_if_stale
from openimds.host.workers import run_workers
from openimds.http.server import Limits, install_uvloop, serve
from openimds.log import setup_logging
from openimds.metadata.agent import (
    IDENTITY_LINES,
    MetadataAgent,
    WatchedFeedClient,
    close_quietly,
    limiter_from_settings,
    make_pool,
    open_socket,
)
from openimds.metadata.longpoll import HeldUpstream
from openimds.metadata.shared_limit import SharedRateLimiter
from openimds.metrics import ServiceMetrics, start_metrics_server
from openimds.registry.client import AsyncRegistryClient
from openimds.registry.feed import ChangeFollower
from openimds.registry.heartbeat import Heartbeat

log = logging.getLogger(__name__)

_GC_THRESHOLD_0 = 20000


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_command(
        sub, "agent", _agent,
        "run the metadata agent: identify the VM, sign, forward to the metadata API",
        formatted=False,
    )


def _agent(args: argparse.Namespace, settings: Settings) -> int:
    setup_logging(debug=settings.debug, log_file=settings.log_file, component="agent",
                  fmt=settings.log_format)
    # The access line is on the hot path; our format uses none of these record fields
    # (the logging HOWTO's "Optimization" section), so do not compute them per record.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    raise_nofile_limit()  # held requests keep two fds each ([api] max_waits)
    install_uvloop()
    workers = settings.metadata_workers
    if workers <= 1:
        return asyncio.run(run_agent(settings))
    # Several workers accept on one socket, bound here once before forking (haproxy's and
    # any other client's); each also listens on its own, which openimds' proxy spreads its
    # pooled connections over (the kernel wakes the workers on the shared one, and the
    # first takes every connection pending, a whole burst of the proxy's pool). With rate
    # limiting on, they also count into one table made here (an exact budget per instance).
    shared: dict[str, tuple[socket.socket, int]] = {}
    limiter, _ = limiter_from_settings(settings, SharedRateLimiter)

    def bind() -> None:
        sock, _ = open_socket(settings)
        shared["sock"] = (sock, file_id(settings.metadata_proxy_socket))

    def unlink() -> None:
        if "sock" in shared:
            shared["sock"][0].close()
            remove_if_ours(settings.metadata_proxy_socket, shared["sock"][1])
        for index in range(workers):  # a worker killed while stopping left its own
            remove_if_stale(worker_socket(settings.metadata_proxy_socket, index))

    def work(index: int, ready: Callable[[], None]) -> int:
        sock, inode = shared["sock"]
        return asyncio.run(run_agent(settings, worker=index, shared=(sock, inode), ready=ready,
                                     limiter=limiter))

    return run_workers(workers, work, name="agent", prepare=bind, finish=unlink)


def _registry_token(settings: Settings) -> str:
    token = settings.registry.reader_token or settings.registry.admin_token
    if not token:
        raise ConfigError("[registry] reader_token (or admin_token) is needed to look up callers")
    return token


async def run_agent(
    settings: Settings, *, worker: int = 0,
    shared: tuple[socket.socket, int] | None = None,
    ready: Callable[[], None] | None = None, limiter: RateLimiter | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT. A worker (`shared` given) serves the socket its parent
    bound, and leaves removing that file to the parent, and its own (`config.worker_socket`),
    which it removes."""
    # Handlers first: the socket accepts connections (and so looks ready) before the server
    # is fully set up, and a SIGTERM in that window must still remove the socket file.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registry = AsyncRegistryClient(
        settings.registry.effective_url, _registry_token(settings),
        timeout_s=settings.metadata_agent.registry_timeout,
        # one is the feed's long-poll; lookups share the rest (measured on the sqlite
        # registry: 8 connections answer ~1.7x the lookups per second of 32)
        max_connections=settings.metadata_agent.registry_connections,
    )
    pool = make_pool(settings)
    held = HeldUpstream(make_pool(settings, long_poll=True))
    agent = MetadataAgent(settings, registry=registry, upstream=pool, limiter=limiter,
                          held=held)
    metrics = ServiceMetrics("agent", worker=worker)
    metrics.hops.append(agent.hop)
    metrics.add(agent.metric_families)
    feed_stats = metrics.feed("agent")
    feed_client = cast(AsyncRegistryClient, WatchedFeedClient(registry, agent.feed_lost,
                                                           agent.lease))
    path = settings.metadata_proxy_socket
    if shared is None:
        sock, mode = open_socket(settings)
        inode = file_id(path)
    else:
        sock, inode = shared
        mode = os.stat(path).st_mode & 0o777
    # known_heads: the proxy's requests differ only in their ID and the caller's identity
    # lines, which are cut out: parsed once per shape, whatever the VMs
    limits = Limits(max_body_bytes=settings.api.max_request_bytes + 4096,
                    keepalive_timeout_s=settings.metadata_agent.client_keepalive_timeout,
                    write_timeout_s=settings.metadata_agent.client_write_timeout,
                    timeouts=agent.hop.count_timeouts(), known_heads=True,
                    identity_lines=IDENTITY_LINES)
    server = await serve(agent.handle, sock, limits, backlog=settings.metadata_backlog)
    own: tuple[asyncio.Server, str, int] | None = None
    if shared is not None:
        own_sock, _ = open_socket(settings, worker)
        own_path = worker_socket(path, worker)
        own = (await serve(agent.handle, own_sock, limits, backlog=settings.metadata_backlog),
               own_path, file_id(own_path))
    metrics_server = await start_metrics_server(settings, metrics)
    feed_task = asyncio.create_task(
        agent.follow(lambda: ChangeFollower(feed_client, stats=feed_stats, resume=True,
                                            backoff_max_s=1.0)))
    # shows this node in `openimds host list`; the agent serves a local socket, no fence
    beat_task = asyncio.create_task(Heartbeat(registry, settings, "metadata").run())
    # Everything made so far lives as long as the process: keep it out of the cyclic
    # collector's way, and collect young objects less often (each request leaves a few
    # short-lived cycles; the default threshold runs the collector every few requests).
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD_0, 20, 20)
    log.info(
        "agent.started socket=%s mode=%o backlog=%d api=%s registry=%s cache_size=%d "
        "max_concurrency=%d", path, mode, settings.metadata_backlog,
        pool.where if settings.nova_metadata_socket else
        f"{settings.nova_metadata_protocol}://{pool.where}", settings.registry.effective_url,
        settings.metadata_agent.cache_size, settings.metadata_agent.max_concurrency,
    )
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        server.close()
        if own is not None:
            own[0].close()
            remove_if_ours(own[1], own[2])
        if metrics_server is not None:
            metrics_server.close()
        feed_task.cancel()
        beat_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feed_task
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await beat_task
        await close_quietly(pool)
        await close_quietly(held)
        await close_quietly(registry)
        agent.log_stats()
        if shared is None:
            remove_if_ours(path, inode)
    log.info("agent.stopped")
    return 0
