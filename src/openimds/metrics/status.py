"""`openimds status`: every service of this node on one screen, read from its /metrics.

Two scrapes `interval` apart give rates (requests/s, registry writes/s) and, from the
histogram's bucket deltas, the p99 of the requests answered in between; with no traffic in
between the figures since start are shown (`window: "start"`). Each hop's client
connections ended by a timeout (`openimds_connection_timeouts_total`) are shown since
start by kind, `w=` write, `r=` request, `i=` idle (keep-alive expiry), `s=` silent (no
first request byte) (JSON: `timeouts`, and `timeouts_in_window`). Worker processes
(`[api] workers`, `metadata_workers`, `[proxy] workers`) are scraped on their own ports and
summed. `summarize` is pure: scraped text in, plain rows out.
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from openimds.config import Settings
from openimds.metrics import WORKER_PORT_STEP

SERVICES = ("registry", "api", "agent", "proxy", "l3-agent", "dhcp-agent")
HOPS = {"registry": "registry", "api": "api", "agent": "agent", "proxy": "proxy"}
SCRAPE_TIMEOUT_S = 2.0

Labels = frozenset[tuple[str, str]]


@dataclass
class Scrape:
    """One service's samples at one moment (all its workers summed), or why it failed."""

    at: float
    samples: dict[tuple[str, Labels], float] = field(default_factory=dict)
    per_worker: list[dict[tuple[str, Labels], float]] = field(default_factory=list)
    workers_up: int = 0
    workers: int = 1
    error: str = ""

    def total(self, name: str, **match: str) -> float:
        """The sum of every sample of `name` whose labels include `match`."""
        want = set(match.items())
        return sum(v for (n, labels), v in self.samples.items()
                   if n == name and want <= labels)

    def has(self, name: str) -> bool:
        return any(n == name for n, _ in self.samples)


def parse(text: str, into: dict[tuple[str, Labels], float] | None = None,
          ) -> dict[tuple[str, Labels], float]:
    """Samples of a text exposition (values of equal series are added: workers sum)."""
    out = into if into is not None else {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, frozenset(s.labels.items()))
            out[key] = out.get(key, 0.0) + s.value
    return out


def metrics_host(settings: Settings) -> str:
    host = settings.metrics.bind_host
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def worker_count(settings: Settings, service: str) -> int:
    if service == "api":
        return int(getattr(settings.api, "workers", 1))
    if service == "agent":
        return int(getattr(settings, "metadata_workers", 1))
    if service == "proxy":
        return int(getattr(settings.proxy, "workers", 1))
    return 1


Fetch = Callable[[str], str]


def http_fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:  # noqa: S310
        return str(resp.read().decode())


def scrape_service(settings: Settings, service: str, fetch: Fetch = http_fetch) -> Scrape:
    host = metrics_host(settings)
    shown = f"[{host}]" if ":" in host else host
    base = settings.metrics.port(service)
    workers = worker_count(settings, service)
    result = Scrape(at=time.time(), workers=workers)
    errors = []
    for index in range(workers):
        port = base + WORKER_PORT_STEP * index
        try:
            one = parse(fetch(f"http://{shown}:{port}/metrics"))
            result.per_worker.append(one)
            for key, value in one.items():
                result.samples[key] = result.samples.get(key, 0.0) + value
            result.workers_up += 1
        except (OSError, urllib.error.URLError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            errors.append(f"{shown}:{port}: {reason}")
    result.error = "; ".join(errors)
    return result


def scrape_all(settings: Settings, fetch: Fetch = http_fetch) -> dict[str, Scrape]:
    return {svc: scrape_service(settings, svc, fetch) for svc in SERVICES}


def _quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative {le: count} (linear in a bucket)."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return prev_bound
            span = count - prev_count
            frac = (rank - prev_count) / span if span > 0 else 1.0
            return prev_bound + (bound - prev_bound) * frac
        prev_bound, prev_count = bound, count
    return prev_bound


def _buckets(s: Scrape, hop: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for (name, labels), value in s.samples.items():
        if name != "openimds_request_duration_seconds_bucket":
            continue
        lab = dict(labels)
        if lab.get("hop") == hop:
            le = float(lab["le"])
            out[le] = out.get(le, 0.0) + value
    return out


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole > 0 else None


def _delta(new: float, old: float | None) -> float:
    return new - old if old is not None and new >= old else new


def summarize(
    now: Mapping[str, Scrape], before: Mapping[str, Scrape] | None = None,
) -> list[dict[str, Any]]:
    """One row per service: state, rates, error ratio, p99, cache hit ratio, feed lag."""
    registry_revision = now["registry"].total("openimds_registry_revision") \
        if "registry" in now and now["registry"].workers_up else None
    rows = []
    for service, cur in now.items():
        old = before.get(service) if before else None
        if old is not None and not old.workers_up:
            old = None
        row: dict[str, Any] = {"service": service}
        if not cur.workers_up:
            row.update(state="down", error=cur.error)
            rows.append(row)
            continue
        row["state"] = "up" if cur.workers_up == cur.workers else "degraded"
        if cur.workers > 1:
            row["workers"] = f"{cur.workers_up}/{cur.workers}"
        start = cur.total("openimds_start_time_seconds") / max(cur.workers_up, 1)
        row["uptime_s"] = round(cur.at - start, 1) if start else None
        dt = cur.at - old.at if old is not None else 0.0
        hop = HOPS.get(service)
        if hop is not None:
            row.update(_hop_row(cur, old, hop, dt))
        if service == "agent":
            hits = _delta(cur.total("openimds_agent_cache_hits_total"),
                          old.total("openimds_agent_cache_hits_total") if old else None)
            misses = _delta(cur.total("openimds_agent_cache_misses_total"),
                            old.total("openimds_agent_cache_misses_total") if old else None)
            if hits + misses <= 0:  # no lookups in the window: since start
                hits = cur.total("openimds_agent_cache_hits_total")
                misses = cur.total("openimds_agent_cache_misses_total")
            ratio = _ratio(hits, hits + misses)
            row["cache_hit_ratio"] = round(ratio, 4) if ratio is not None else None
            row["cache_entries"] = int(cur.total("openimds_agent_cache_entries"))
        if service == "api":
            row["cache_entries"] = int(cur.total("openimds_api_cache_entries"))
        if service == "registry":
            writes = cur.total("openimds_registry_writes_total")
            prev = old.total("openimds_registry_writes_total") if old else None
            row["writes_per_s"] = round((writes - prev) / dt, 2) if prev is not None and dt \
                else None
            row["revision"] = int(registry_revision or 0)
        if service == "proxy":
            # every worker listens in every namespace: one worker's figure
            first = Scrape(cur.at, cur.per_worker[0])
            row["listeners"] = int(first.total("openimds_proxy_listeners"))
            row["namespaces"] = int(first.total("openimds_proxy_namespaces"))
        if service == "l3-agent":
            row["routers"] = int(cur.total("openimds_l3_routers"))
        if service == "dhcp-agent":
            row["networks"] = int(cur.total("openimds_dhcp_networks"))
            row["dnsmasq_restarts"] = int(cur.total("openimds_dhcp_dnsmasq_restarts_total"))
        if cur.has("openimds_feed_lag_seconds"):
            # gauges: the worst worker, not the sum
            each = _per_worker(cur)
            row["feed_lag_s"] = round(max(each("openimds_feed_lag_seconds")), 3)
            revs = each("openimds_feed_revision")
            if registry_revision is not None and revs:
                row["feed_behind"] = int(max(0.0, registry_revision - min(revs)))
            row["feed_live"] = all(v >= 1 for v in each("openimds_feed_up"))
        rows.append(row)
    return rows


def _per_worker(cur: Scrape) -> Callable[[str], list[float]]:
    def each(name: str) -> list[float]:
        return [v for one in cur.per_worker for (n, _), v in one.items() if n == name]

    return each


def _hop_row(cur: Scrape, old: Scrape | None, hop: str, dt: float) -> dict[str, Any]:
    total = cur.total("openimds_requests_total", hop=hop)
    errors = cur.total("openimds_requests_total", hop=hop, code="5xx")
    buckets = _buckets(cur, hop)
    window = "start"
    if old is not None and dt > 0:
        d_total = total - old.total("openimds_requests_total", hop=hop)
        if d_total > 0:
            window = f"{dt:.1f}s"
            old_buckets = _buckets(old, hop)
            buckets = {le: n - old_buckets.get(le, 0.0) for le, n in buckets.items()}
            errors -= old.total("openimds_requests_total", hop=hop, code="5xx")
        out: dict[str, Any] = {"req_per_s": round(max(d_total, 0.0) / dt, 2)}
        if d_total <= 0:
            out["req_per_s"] = 0.0
    else:
        out = {"req_per_s": None}
    timeouts = _timeouts(cur, hop)
    if timeouts is not None:
        # since start; and what the window added, when there is one (a rising write or
        # request count is a client not reading or not sending, a rising silent one a
        # connection that never asked; idle is routine keep-alive expiry)
        out["timeouts"] = timeouts
        if old is not None and dt > 0:
            before = _timeouts(old, hop) or {}
            out["timeouts_in_window"] = {k: max(0, n - before.get(k, 0))
                                         for k, n in timeouts.items()}
    count = buckets.get(float("inf"), 0.0)
    ratio = _ratio(errors, count)
    p99 = _quantile(0.99, buckets)
    out.update(
        requests=int(total),
        error_ratio=round(ratio, 4) if ratio is not None else None,
        p99_ms=round(p99 * 1000.0, 3) if p99 is not None else None,
        in_flight=int(cur.total("openimds_requests_in_flight", hop=hop)),
        window=window,
    )
    return out


TIMEOUT_KINDS = ("write", "request", "idle", "silent")


def _timeouts(s: Scrape, hop: str) -> dict[str, int] | None:
    """`openimds_connection_timeouts_total` of `hop` by kind (None: the hop has none)."""
    name = "openimds_connection_timeouts_total"
    if not any(n == name and ("hop", hop) in labels for n, labels in s.samples):
        return None
    return {kind: int(s.total(name, hop=hop, kind=kind)) for kind in TIMEOUT_KINDS}


COLUMNS = ("service", "state", "req_per_s", "error_ratio", "p99_ms", "in_flight",
           "timeouts", "cache_hit_ratio", "feed_lag_s", "feed_behind", "detail")


def table_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows for the table: percentages and a short detail column."""
    out = []
    for row in rows:
        shown = {k: row.get(k) for k in COLUMNS}
        if row.get("error_ratio") is not None:
            shown["error_ratio"] = f"{row['error_ratio'] * 100:.2f}%"
        if row.get("cache_hit_ratio") is not None:
            shown["cache_hit_ratio"] = f"{row['cache_hit_ratio'] * 100:.1f}%"
        timeouts = row.get("timeouts")
        if timeouts is not None:  # w(rite)= r(equest)= i(dle)= s(ilent)=, since start
            shown["timeouts"] = " ".join(f"{k[0]}={timeouts[k]}" for k in TIMEOUT_KINDS)
        detail = []
        for key in ("workers", "requests", "cache_entries", "revision", "writes_per_s",
                    "listeners", "namespaces", "routers", "networks", "dnsmasq_restarts",
                    "error"):
            if row.get(key) is not None:
                detail.append(f"{key}={row[key]}")
        shown["detail"] = " ".join(detail)
        out.append(shown)
    return out
