"""`openimds api [serve]`: run the metadata API on [api] metadata_listen:metadata_listen_port
until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from openimds.cli import add_command
from openimds.config import Settings
from openimds.errors import ConfigError
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
    install_uvloop()
    return asyncio.run(run_api(settings))


def _registry_token(settings: Settings) -> str:
    # Reads need the reader token; a guest's password POST needs the admin token.
    token = settings.registry.admin_token or settings.registry.reader_token
    if not token:
        raise ConfigError("[registry] admin_token (or reader_token) is needed by the API")
    if not settings.registry.admin_token:
        log.warning("api.reader_token_only password POSTs will fail (registry answers 403)")
    return token


async def run_api(settings: Settings) -> int:
    from openimds.registry.client import AsyncRegistryClient
    from openimds.registry.feed import ChangeFollower

    api_cfg = settings.api
    vendordata = VendorData(api_cfg)
    registry = AsyncRegistryClient(
        settings.registry.effective_url, _registry_token(settings),
        timeout_s=api_cfg.registry_timeout,
    )
    api = MetadataApi(settings, registry, vendordata, identity=load_or_create(settings),
                      architecture=architecture(settings))
    follower = ChangeFollower(registry)
    try:
        sock = bind_tcp(api_cfg.metadata_listen, api_cfg.metadata_listen_port)
    except OSError as exc:
        raise ConfigError(
            f"[api] cannot listen on {api_cfg.metadata_listen}:{api_cfg.metadata_listen_port}: "
            f"{exc.strerror}") from None
    limits = Limits(max_body_bytes=api_cfg.max_request_bytes,
                    request_timeout_s=api_cfg.client_timeout)
    metrics = ServiceMetrics("api")
    metrics.hops.append(api.hop)
    metrics.add(api.metric_families)
    follower.stats = metrics.feed("api")
    # Counting costs ~1 µs a request (docs/benchmarks.md); with metrics and access lines both
    # off the handler is the bare one.
    observed = settings.metrics.enabled or api.access_log
    server = await serve(api.handle_observed if observed else api.handle, sock, limits)
    metrics_server = await start_metrics_server(settings, metrics)
    feed_task = asyncio.create_task(api.follow(follower))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("api.started listen=%s:%d registry=%s dhcp_domain=%s vendordata=%s imds_tokens=%s",
             api_cfg.metadata_listen, api_cfg.metadata_listen_port,
             settings.registry.effective_url, api_cfg.dhcp_domain,
             ",".join(api_cfg.vendordata_providers), api_cfg.imds_tokens)
    try:
        await stop.wait()
    finally:
        server.close()
        if metrics_server is not None:
            metrics_server.close()
        feed_task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await feed_task
        with contextlib.suppress(Exception):
            await follower.aclose()
        await vendordata.aclose()
        await registry.aclose()
    log.info("api.stopped stats=%s", api.stats)
    return 0
