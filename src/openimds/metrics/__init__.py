"""Prometheus metrics: plain counters on the hot paths, exposition by prometheus-client.

Every service (registry, api, agent, proxy, l3-agent, dhcp-agent) serves `/metrics` on its
own operator-only listener, `[metrics] bind_host:<service>_port`, opened in the host network
namespace at start (the proxy's VM-facing listeners live in router/DHCP namespaces; this one
never does). Names and units follow Prometheus conventions (docs/operations.md lists them).

Why plain ints: prometheus-client's Counter/Histogram take a lock per `inc()`/`observe()`;
on the proxy's ~30 µs request that is measurable. Here the hops bump ints in `HopStats` and
`FeedStats` (one event loop per process: no lock needed) and `ServiceMetrics`, a custom
prometheus-client Collector, turns them into metric families only when Prometheus scrapes.

    metrics = ServiceMetrics("agent")
    hop = metrics.hop("agent")                 # requests, latency, in-flight, upstream errors
    limits = Limits(timeouts=hop.count_timeouts())  # connections its server timed out
    metrics.add(lambda: [...metric families...])  # anything else, read at scrape time
    server = await start_metrics_server(settings, metrics)   # None when disabled

Worker processes (`[api] workers`, `metadata_workers`, `[proxy] workers`): worker k > 0
serves on its service's port + 100·k, worker 0 (or the only process) on the port itself;
each is a target of its own (`worker` label), summed by PromQL (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from openimds import __version__
from openimds.config import Settings
from openimds.http.server import (
    Request,
    Response,
    TimeoutCounts,
    bind_tcp,
    error_response,
    serve,
)

if TYPE_CHECKING:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        Metric,
    )
    from prometheus_client.registry import CollectorRegistry
else:  # only annotations name it here; the class is prometheus-client's, loaded on first use
    Metric = object

log = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "LATENCY_BUCKETS",
    "FeedStats",
    "HopStats",
    "Metric",
    "ServiceMetrics",
    "counter",
    "gauge",
    "labelled",
    "path_family",
    "registry_family",
    "start_metrics_server",
    "worker_port",
]

# Upper bounds (seconds) of the latency histograms: a cached answer takes tens of
# microseconds per hop, a registry miss milliseconds, an upstream timeout seconds.
LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
# Metadata path families, then the registry's (lookup, feed, the rest of its REST API).
FAMILIES = ("ec2", "openstack", "token", "identity", "other", "lookup", "feed", "rest")
_EC2, _OPENSTACK, _TOKEN, _IDENTITY, _OTHER, _LOOKUP, _FEED, _REST = range(8)
# Where one request's count goes in `HopStats.codes`, a single int key per request: bits 0-9
# its status (HTTP's have three digits; the parsers refuse more), bits 10-12 its path
# family, bit 13 set for an answer given in the call the request arrived in (`answered`: it
# was never in flight), bits 14 and up its latency bucket (an index into LATENCY_BUCKETS,
# len() = +Inf). One dict bump per request instead of a status table and a bucket list, and
# the key is one addition (memo + status) for an answer inside the first bound; the
# family, class and bucket sums are made when scraped.
_STATUS_MASK = (1 << 10) - 1
_FAMILY_SHIFT = 10
_FAMILY_MASK = 7
_AT_ONCE = 1 << 13
_BUCKET_SHIFT = 14
_MEMO_MAX = 4096
WORKER_PORT_STEP = 100


def path_family(path: str) -> int:
    """The path family of a metadata request path, as an index into FAMILIES."""
    if "identity" in path:  # /latest/dynamic/instance-identity/..., /openstack/.../identity
        return _IDENTITY
    if path.endswith("/api/token"):
        return _TOKEN
    if path.startswith("/openstack"):
        return _OPENSTACK
    if path.startswith("/latest") or path[1:2].isdigit():
        return _EC2
    return _OTHER


def registry_family(path: str) -> int:
    """The family of a registry REST path, as an index into FAMILIES."""
    if path.startswith("/v1/lookup"):
        return _LOOKUP
    if path.startswith("/v1/changes"):
        return _FEED
    return _REST


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class HopStats:
    """One hop's request counters: bumped on the hot path, read when scraped.

    `begun += 1` when a request arrives, `done(status, path, seconds)` once when it is
    answered; in flight = begun - done. `answered(status, path, seconds)` instead of both,
    for an answer given in the very call the request arrived in (never in flight while a
    scrape could look). Only the status class is exported: a caller may pass any status of
    the class. `upstream_error(status)` counts 502/503/504 answers caused by the next hop.
    `done` and `answered` are closures over their tables (no attribute lookups, no method
    binding) that bump one int per request, keyed by status, path family and latency
    bucket together (`codes`); the per-family, per-class and per-bucket sums are made only
    when scraped (`by_class`, `buckets`). ~0.13 µs a request on this machine
    (bench/metrics_bench.py --micro). `count_timeouts()` is what the hop's server counts its
    timed-out connections in (only a hop served by `http.server` has them).
    """

    __slots__ = ("_sum", "answered", "begun", "codes", "done", "family_of", "hop", "timeouts",
                 "upstream_errors")

    def __init__(self, hop: str, family_of: Callable[[str], int] = path_family) -> None:
        self.hop = hop
        self.family_of = family_of
        self.begun = 0
        # bucket << 14 | at once << 13 | family << 10 | status -> requests
        self.codes: dict[int, int] = {}
        self._sum = [0.0]
        self.upstream_errors: dict[int, int] = {}
        self.timeouts: TimeoutCounts | None = None
        self.done: Callable[[int, str, float], None] = self._counter(0)
        self.answered: Callable[[int, str, float], None] = self._counter(_AT_ONCE)

    def _counter(self, flag: int) -> Callable[[int, str, float], None]:
        codes, sums, family_of = self.codes, self._sum, self.family_of
        families: dict[str, int] = {}  # path -> its family << _FAMILY_SHIFT | flag
        bounds = LATENCY_BUCKETS
        first = bounds[0]

        def learn(path: str) -> int:
            if len(families) >= _MEMO_MAX:  # paths come from VMs: bounded memo
                families.clear()
            fam = families[path] = family_of(path) << _FAMILY_SHIFT | flag
            return fam

        def count(status: int, path: str, seconds: float) -> None:
            sums[0] += seconds
            try:
                key = families[path] + status
            except KeyError:
                key = learn(path) + status
            if seconds > first:  # most answers take less than the first bound: no search
                key += bisect_left(bounds, seconds) << _BUCKET_SHIFT  # le inclusive, as ours
            try:
                codes[key] += 1
            except KeyError:
                codes[key] = 1

        return count

    def begin(self) -> None:
        self.begun += 1

    def count_timeouts(self) -> TimeoutCounts:
        """The counts to give the hop's server (`Limits.timeouts`); exported from then on."""
        if self.timeouts is None:
            self.timeouts = TimeoutCounts()
        return self.timeouts

    @property
    def sum(self) -> float:
        return self._sum[0]

    def upstream_error(self, status: int) -> None:
        self.upstream_errors[status] = self.upstream_errors.get(status, 0) + 1

    @property
    def buckets(self) -> list[int]:
        """Requests per latency bucket (not cumulative; the last one is +Inf)."""
        out = [0] * (len(LATENCY_BUCKETS) + 1)
        for key, n in list(self.codes.items()):
            out[min(key >> _BUCKET_SHIFT, len(LATENCY_BUCKETS))] += n
        return out

    @property
    def count(self) -> int:
        return sum(list(self.codes.values()))

    def in_flight(self) -> int:
        """Requests begun and not answered yet (`answered` ones never were)."""
        later = sum([n for key, n in list(self.codes.items()) if not key & _AT_ONCE])
        return max(0, self.begun - later)

    def by_class(self) -> dict[tuple[str, str], int]:
        """{(status class, family): count}."""
        out: dict[tuple[str, str], int] = {}
        for key, n in list(self.codes.items()):
            label = (status_class(key & _STATUS_MASK),
                     FAMILIES[key >> _FAMILY_SHIFT & _FAMILY_MASK])
            out[label] = out.get(label, 0) + n
        return out


class FeedStats:
    """A change-feed consumer's position, kept by `registry.feed.ChangeFollower`.

    lag: 0 while the follower waits in a long-poll with nothing left to apply (the registry
    answers at once when something changes); otherwise the seconds since it was last caught
    up — growing while a batch is applied or while the registry cannot be reached.
    """

    __slots__ = ("batches", "caught_up_at", "polling", "resyncs", "revision", "up")

    def __init__(self) -> None:
        self.revision = 0
        self.up = False
        self.polling = False
        self.caught_up_at = time.monotonic()
        self.batches = 0
        self.resyncs = 0

    def lag_seconds(self, now: float | None = None) -> float:
        if self.polling and self.up:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self.caught_up_at)


Source = Callable[[], Iterable["Metric"]]


def _families() -> Any:
    """prometheus_client.core, imported on first use: importing prometheus_client takes
    0.2-0.4 s here (it pulls in http.server, ssl, wsgiref), which a hop must not pay
    before it serves (a restarted proxy reopens its listeners within 2 s)."""
    from prometheus_client import core

    return core


def counter(name: str, doc: str, value: float, **labels: str) -> CounterMetricFamily:
    """One counter sample (name without `_total`; prometheus-client adds it)."""
    fam: CounterMetricFamily = _families().CounterMetricFamily(name, doc, labels=list(labels))
    fam.add_metric(list(labels.values()), value)
    return fam


def gauge(name: str, doc: str, value: float, **labels: str) -> GaugeMetricFamily:
    fam: GaugeMetricFamily = _families().GaugeMetricFamily(name, doc, labels=list(labels))
    fam.add_metric(list(labels.values()), value)
    return fam


class ServiceMetrics:
    """The metrics of one process: a prometheus-client registry with one custom collector
    that reads the hops' plain counters and any extra sources at scrape time."""

    def __init__(self, service: str, *, worker: int = 0) -> None:
        self.service = service
        self.worker = worker
        self.hops: list[HopStats] = []
        self.feeds: dict[str, FeedStats] = {}
        self._sources: list[Source] = []
        self.started = time.time()
        self._registry: CollectorRegistry | None = None

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus-client registry: this collector plus its process, platform and GC
        collectors (made on first use, see `_families`)."""
        if self._registry is None:
            from prometheus_client.gc_collector import GCCollector
            from prometheus_client.platform_collector import PlatformCollector
            from prometheus_client.process_collector import ProcessCollector
            from prometheus_client.registry import CollectorRegistry

            reg = CollectorRegistry(auto_describe=False)
            reg.register(self)
            ProcessCollector(registry=reg)
            PlatformCollector(registry=reg)
            GCCollector(registry=reg)
            self._registry = reg
        return self._registry

    def hop(self, name: str) -> HopStats:
        stats = HopStats(name)
        self.hops.append(stats)
        return stats

    def feed(self, consumer: str) -> FeedStats:
        stats = self.feeds.setdefault(consumer, FeedStats())
        return stats

    def add(self, source: Source) -> None:
        self._sources.append(source)

    def render(self) -> bytes:
        from prometheus_client.exposition import generate_latest

        return generate_latest(self.registry)

    # -- prometheus-client's Collector protocol ------------------------------------------
    def collect(self) -> Iterator[Metric]:
        info = _families().GaugeMetricFamily("openimds_build_info", "openimds version and service",
                                 labels=["service", "version", "worker"])
        info.add_metric([self.service, __version__, str(self.worker)], 1)
        yield info
        yield gauge("openimds_start_time_seconds", "When this process started (Unix time)",
                    self.started)
        if self.hops:
            yield from self._hop_families()
        if self.feeds:
            yield from self._feed_families()
        for source in self._sources:
            try:
                yield from source()
            except Exception:  # a broken source must not hide every other metric
                log.exception("metrics.source_failed service=%s", self.service)

    def _hop_families(self) -> Iterator[Metric]:
        core = _families()
        requests = core.CounterMetricFamily(
            "openimds_requests", "Requests answered, by hop, status class and path family",
            labels=["hop", "code", "family"])
        latency = core.HistogramMetricFamily(
            "openimds_request_duration_seconds",
            "Time from request to answer at this hop", labels=["hop"])
        in_flight = core.GaugeMetricFamily(
            "openimds_requests_in_flight", "Requests received and not answered yet",
            labels=["hop"])
        upstream = core.CounterMetricFamily(
            "openimds_upstream_errors",
            "Answers 502 (bad answer), 503 (unavailable), 504 (timeout) caused by the next hop",
            labels=["hop", "status"])
        timeouts = core.CounterMetricFamily(
            "openimds_connection_timeouts",
            "Client connections this hop ended because a timeout passed: write (reset: its "
            "answers not taken within the write timeout), request (408: a request begun and "
            "not received in time), idle (closed: answered, then no next request within the "
            "keep-alive timeout; routine), silent (closed: not one byte of a first request "
            "within the request timeout)",
            labels=["hop", "kind"])
        for hop in self.hops:
            ended = hop.timeouts
            if ended is not None:
                timeouts.add_metric([hop.hop, "write"], ended.write)
                timeouts.add_metric([hop.hop, "request"], ended.request)
                timeouts.add_metric([hop.hop, "idle"], ended.idle)
                timeouts.add_metric([hop.hop, "silent"], ended.silent)
            for (code, family), n in sorted(hop.by_class().items()):
                requests.add_metric([hop.hop, code, family], n)
            cumulative, running = [], 0
            counts = list(hop.buckets)
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                running += n
                cumulative.append((_le(bound), float(running)))
            latency.add_metric([hop.hop], cumulative, hop.sum)
            in_flight.add_metric([hop.hop], hop.in_flight())
            for status in (502, 503, 504):
                upstream.add_metric([hop.hop, str(status)], hop.upstream_errors.get(status, 0))
        yield from (requests, latency, in_flight, upstream)
        if timeouts.samples:
            yield timeouts

    def _feed_families(self) -> Iterator[Metric]:
        core = _families()
        revision = core.GaugeMetricFamily(
            "openimds_feed_revision", "Registry revision this change-feed consumer has applied",
            labels=["consumer"])
        lag = core.GaugeMetricFamily(
            "openimds_feed_lag_seconds",
            "Seconds since this consumer was last caught up with the registry (0 = live)",
            labels=["consumer"])
        up = core.GaugeMetricFamily(
            "openimds_feed_up", "1 while the registry answers this consumer's feed calls",
            labels=["consumer"])
        batches = core.CounterMetricFamily(
            "openimds_feed_batches", "Change batches applied", labels=["consumer"])
        resyncs = core.CounterMetricFamily(
            "openimds_feed_resyncs", "Full reloads (first batch, 410, after an outage)",
            labels=["consumer"])
        now = time.monotonic()
        for name, feed in sorted(self.feeds.items()):
            revision.add_metric([name], feed.revision)
            lag.add_metric([name], feed.lag_seconds(now))
            up.add_metric([name], 1 if feed.up else 0)
            batches.add_metric([name], feed.batches)
            resyncs.add_metric([name], feed.resyncs)
        yield from (revision, lag, up, batches, resyncs)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def worker_port(settings: Settings, service: str, worker: int = 0) -> int:
    """The metrics port of one worker of a service (see the module docstring)."""
    return settings.metrics.port(service) + WORKER_PORT_STEP * worker


def _handler(metrics: ServiceMetrics, content_type: str) -> Callable[[Request], Response]:
    def handle(req: Request) -> Response:
        if req.method not in ("GET", "HEAD"):
            return error_response(405, "only GET /metrics", headers=[("Allow", "GET, HEAD")])
        if req.path == "/metrics":
            return Response(200, metrics.render(), content_type=content_type)
        if req.path == "/":
            return Response(200, f"openimds {metrics.service}: see /metrics\n".encode())
        return error_response(404, "only /metrics is served here")

    return handle


async def start_metrics_server(
    settings: Settings, metrics: ServiceMetrics,
) -> asyncio.AbstractServer | None:
    """Listen on [metrics] bind_host:<service>_port (+ the worker offset); None if disabled.

    Bound in the calling thread's namespace (the host's: no caller is inside setns here).
    A port that cannot be bound is logged as an error and the service runs on without
    metrics: the metadata path matters more than its counters (and a second instance started
    with the same config, e.g. by a test or an operator's experiment, must not die of it).
    """
    cfg = settings.metrics
    if not cfg.enabled:
        return None
    # The import runs in a thread: the hop keeps serving meanwhile (GIL switches).
    await asyncio.to_thread(lambda: metrics.registry)
    port = worker_port(settings, metrics.service, metrics.worker)
    try:
        sock = bind_tcp(cfg.bind_host, port, backlog=64)
    except OSError as exc:
        key = metrics.service.replace("-", "_") + "_port"
        log.error("metrics.unavailable service=%s addr=%s:%d reason=%s (set [metrics] %s)",
                  metrics.service, cfg.bind_host, port, exc.strerror, key)
        return None
    from prometheus_client.exposition import CONTENT_TYPE_LATEST

    server = await serve(_handler(metrics, CONTENT_TYPE_LATEST), sock)
    log.info("metrics.listening service=%s addr=%s:%d pid=%d", metrics.service,
             cfg.bind_host, port, os.getpid())
    return server


def labelled(
    name: str, doc: str, kind: str, label: str, values: Iterable[tuple[str, float]],
) -> Metric:
    """A counter or gauge family with one label and several samples."""
    core = _families()
    fam: Any = (core.CounterMetricFamily if kind == "counter" else core.GaugeMetricFamily)(
        name, doc, labels=[label])
    for value, n in values:
        fam.add_metric([value], n)
    result: Metric = fam
    return result
