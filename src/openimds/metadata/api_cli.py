"""`openimds api [serve]`: run the metadata API on [api] metadata_listen:metadata_listen_port
(and on the Unix socket `[api] unix_socket` when set) until SIGTERM/SIGINT.

With `[api] workers` > 1 every worker shares those, and each also listens on addresses of its
own, which the agent's pool spreads over (`http.client`): `<unix_socket>.w<N>` when
unix_socket is set, and `metadata_listen:worker_port_base+N` when worker_port_base is (that
one with a single process too). The kernel's choice on a shared address is uneven for a
pool: SO_REUSEPORT hashes each connection, and a Unix socket's waiting connections go to
whichever worker wakes first, while the pool opens its few connections in one burst."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import socket
from collections.abc import Callable

from openimds.cli import add_command
from openimds.config import Settings, worker_socket
from openimds.errors import ConfigError
from openimds.host.limits import raise_nofile_limit
from openimds.host.unix_listener import (
    SOCKET_MODES,
    file_id,
    listen_unix,
    remove_if_ours,
    remove_if_stale,
)
from openimds.host.workers import run_workers
from openimds.http.server import Limits, bind_tcp, install_uvloop, serve
from openimds.log import setup_logging
from openimds.metadata.api import MetadataApi
from openimds.metadata.identity import architecture, load_or_create
from openimds.metadata.vendordata import VendorData
from openimds.metrics import ServiceMetrics, start_metrics_server

log = logging.getLogger(__name__)

__all__ = ["register", "run_api"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        sub, "api", _api,
        "serve the metadata API (Nova's side): EC2 and OpenStack documents from the registry",
        formatted=False,
    )
    parser.add_argument("action", nargs="?", choices=("serve",), default="serve",
                        help="serve (the default)")


def _api(args: argparse.Namespace, settings: Settings) -> int:
    setup_logging(debug=settings.debug, log_file=settings.log_file, component="api",
                  fmt=settings.log_format)
    raise_nofile_limit()  # a held request keeps its connection ([api] max_waits)
    install_uvloop()
    workers = settings.api.workers
    if workers <= 1:
        return asyncio.run(run_api(settings))
    # One SO_REUSEPORT socket per worker, all bound here before forking: a port in use fails
    # at once, and the kernel spreads connections over the workers. The Unix socket is one,
    # bound here too: every worker accepts on it (as the agent's workers do on theirs).
    socks: list[socket.socket] = []
    unix: list[tuple[socket.socket, int]] = []

    def bind() -> None:
        socks.extend(_bind(settings, reuse_port=True) for _ in range(workers))
        unix.extend(_bind_unix(settings))

    def work(index: int, ready: Callable[[], None]) -> int:
        for i, other in enumerate(socks):
            if i != index:
                other.close()
        return asyncio.run(run_api(settings, worker=index, sock=socks[index], ready=ready,
                                   unix=unix[0] if unix else None))

    def close() -> None:
        for sock in socks:
            sock.close()
        for usock, inode in unix:
            usock.close()
            remove_if_ours(settings.api.unix_socket, inode)
            for index in range(workers):  # a worker killed while stopping left its own
                remove_if_stale(worker_socket(settings.api.unix_socket, index))

    return run_workers(workers, work, name="api", prepare=bind, finish=close)


def _bind(settings: Settings, *, reuse_port: bool = False, port: int = 0) -> socket.socket:
    """metadata_listen:metadata_listen_port, or with `port` that port on metadata_listen."""
    api_cfg = settings.api
    port = port or api_cfg.metadata_listen_port
    try:
        return bind_tcp(api_cfg.metadata_listen, port, reuse_port=reuse_port)
    except OSError as exc:
        raise ConfigError(
            f"[api] cannot listen on {api_cfg.metadata_listen}:{port}: "
            f"{exc.strerror}") from None


def _bind_own(settings: Settings, worker: int) -> list[tuple[socket.socket, str, int]]:
    """This worker's own listeners (the module docstring), each with the socket file to
    remove as it stops and that file's `file_id` ("", 0 for a port). Made by the worker, not
    bound before forking: a dead worker's own address refuses (the agent's pool then skips
    it) where a listener its parent held would queue connections until it is replaced."""
    api_cfg = settings.api
    own: list[tuple[socket.socket, str, int]] = []
    if api_cfg.worker_port_base:
        own.append((_bind(settings, port=api_cfg.worker_port_base + worker), "", 0))
    if api_cfg.unix_socket and api_cfg.workers > 1:
        path = worker_socket(api_cfg.unix_socket, worker)
        sock = listen_unix(path, mode=SOCKET_MODES[api_cfg.unix_socket_mode], backlog=4096,
                           option="[api] unix_socket (worker socket)")
        own.append((sock, path, file_id(path)))
    return own


def _bind_unix(settings: Settings) -> list[tuple[socket.socket, int]]:
    """The listening `[api] unix_socket` and its `file_id` (to remove only our file), if set."""
    path = settings.api.unix_socket
    if not path:
        return []
    sock = listen_unix(path, mode=SOCKET_MODES[settings.api.unix_socket_mode], backlog=4096,
                       option="[api] unix_socket")
    return [(sock, file_id(path))]


def _registry_token(settings: Settings) -> str:
    # Reads need the reader token; a guest's password POST needs the admin token.
    token = settings.registry.admin_token or settings.registry.reader_token
    if not token:
        raise ConfigError("[registry] admin_token (or reader_token) is needed by the API")
    if not settings.registry.admin_token:
        log.warning("api.reader_token_only password POSTs will fail (registry answers 403)")
    return token


async def run_api(
    settings: Settings, *, worker: int = 0, sock: socket.socket | None = None,
    ready: Callable[[], None] | None = None, unix: tuple[socket.socket, int] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; a worker (`sock` given) serves the sockets its parent
    bound, and leaves removing the Unix socket's file to the parent, and its own
    (`_bind_own`), whose socket file it removes."""
    from openimds.registry.client import AsyncRegistryClient
    from openimds.registry.feed import ChangeFollower
    from openimds.registry.heartbeat import Heartbeat

    api_cfg = settings.api
    vendordata = VendorData(api_cfg)
    registry = AsyncRegistryClient(
        settings.registry.effective_url, _registry_token(settings),
        timeout_s=api_cfg.registry_timeout,
    )
    api = MetadataApi(settings, registry, vendordata, identity=load_or_create(settings),
                      architecture=architecture(settings))
    # resume: after a registry outage the documents are kept and only what changed meanwhile
    # is dropped (a resync would drop them all).
    follower = ChangeFollower(registry, resume=True, backoff_max_s=1.0)
    owned: list[tuple[socket.socket, int]] = []
    if sock is None:
        sock = _bind(settings)  # the ports first: a second API fails before the socket file
        own = _bind_own(settings, worker)
        owned = _bind_unix(settings)
        unix = owned[0] if owned else None
    else:
        own = _bind_own(settings, worker)
    limits = Limits(max_body_bytes=api_cfg.max_request_bytes,
                    request_timeout_s=api_cfg.client_timeout,
                    keepalive_timeout_s=api_cfg.client_keepalive_timeout,
                    write_timeout_s=api_cfg.client_write_timeout,
                    timeouts=api.hop.count_timeouts())
    metrics = ServiceMetrics("api", worker=worker)
    metrics.hops.append(api.hop)
    metrics.add(api.metric_families)
    follower.stats = metrics.feed("api")
    # Counting costs ~0.4 µs a request (docs/benchmarks.md); with metrics and access lines both
    # off the handler is the bare one.
    observed = settings.metrics.enabled or api.access_log
    handler = api.handle_observed if observed else api.handle
    servers = [await serve(handler, sock, limits)]
    if unix is not None:
        servers.append(await serve(handler, unix[0], limits))
    for own_sock, _, _ in own:
        servers.append(await serve(handler, own_sock, limits))
    metrics_server = await start_metrics_server(settings, metrics)
    feed_task = asyncio.create_task(api.follow(follower))
    # the node shows as a controller in `openimds host list` (one heartbeat per process set)
    beat_task = (asyncio.create_task(Heartbeat(registry, settings, "api").run())
                 if worker == 0 else None)
    # Everything made so far (modules, settings, the server, the registry client) lives as
    # long as the process, as in the agent and the proxy: frozen, the cyclic collector no
    # longer walks it on each full collection, and no longer writes to its pages (less
    # copy-on-write of the parent's pages in a forked worker). The documents come later:
    # they are evicted, so they stay collectable.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("api.started listen=%s:%d unix=%s registry=%s dhcp_domain=%s vendordata=%s "
             "imds_tokens=%s", api_cfg.metadata_listen, api_cfg.metadata_listen_port,
             api_cfg.unix_socket or "-",
             settings.registry.effective_url, api_cfg.dhcp_domain,
             ",".join(api_cfg.vendordata_providers), api_cfg.imds_tokens)
    if ready is not None:
        ready()
    try:
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        for _, inode in owned:
            remove_if_ours(api_cfg.unix_socket, inode)
        for _, own_path, own_inode in own:
            if own_path:
                remove_if_ours(own_path, own_inode)
        if metrics_server is not None:
            metrics_server.close()
        feed_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feed_task
        if beat_task is not None:
            beat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await beat_task
        with contextlib.suppress(Exception):
            await follower.aclose()
        await vendordata.aclose()
        await registry.aclose()
    log.info("api.stopped stats=%s", api.stats)
    return 0
