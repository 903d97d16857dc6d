"""`openimds status` arithmetic over real expositions (rendered by prometheus-client)."""

from __future__ import annotations

import pytest

from openimds.config import Settings
from openimds.metrics import ServiceMetrics, counter, gauge
from openimds.metrics.status import (
    SERVICES,
    Scrape,
    _quantile,
    scrape_all,
    summarize,
    table_rows,
)


def scrape_of(m: ServiceMetrics, at: float) -> Scrape:
    from openimds.metrics.status import parse

    samples = parse(m.render().decode())
    return Scrape(at=at, samples=dict(samples), per_worker=[samples], workers_up=1)


def test_quantile_is_prometheus_linear_interpolation() -> None:
    # 100 observations: 90 <= 1 ms, 10 in (1 ms, 5 ms]
    buckets = {0.001: 90.0, 0.005: 100.0, float("inf"): 100.0}
    assert _quantile(0.5, buckets) == pytest.approx(0.001 * 50 / 90)
    assert _quantile(0.99, buckets) == pytest.approx(0.001 + 0.004 * 0.9)
    assert _quantile(0.99, {float("inf"): 0.0}) is None


def test_rates_errors_p99_cache_and_feed_lag_from_two_scrapes() -> None:
    reg, agent = ServiceMetrics("registry"), ServiceMetrics("agent")
    revision = {"now": 40}
    reg.add(lambda: [gauge("openimds_registry_revision", "r", revision["now"])])
    hop = agent.hop("agent")
    feed = agent.feed("agent")
    feed.revision, feed.up, feed.polling = 40, True, True
    hits = {"n": 0, "miss": 3}
    agent.add(lambda: [counter("openimds_agent_cache_hits", "h", hits["n"]),
                       counter("openimds_agent_cache_misses", "m", hits["miss"])])
    for _ in range(10):  # before the window: slow answers that must not count
        hop.begin()
        hop.done(200, "/latest/meta-data/", 2.0)
    before = {"registry": scrape_of(reg, 100.0), "agent": scrape_of(agent, 100.0)}
    for i in range(100):
        hop.begin()
        hop.done(503 if i < 5 else 200, "/openstack/latest/meta_data.json", 0.0002)
    hits["n"], hits["miss"] = 99, 4  # in the window: 99 hits, 1 miss
    revision["now"] = 43  # the agent is 3 revisions behind
    now = {"registry": scrape_of(reg, 102.0), "agent": scrape_of(agent, 102.0)}
    rows = {r["service"]: r for r in summarize(now, before)}
    a = rows["agent"]
    assert a["state"] == "up"
    assert a["req_per_s"] == 50.0
    assert a["error_ratio"] == 0.05
    assert 0.1 < a["p99_ms"] <= 0.25  # inside the (100 µs, 250 µs] bucket, not 2 s
    assert a["window"] == "2.0s"
    assert a["cache_hit_ratio"] == pytest.approx(0.99)
    assert a["feed_lag_s"] == 0.0 and a["feed_behind"] == 3 and a["feed_live"] is True
    assert rows["registry"]["revision"] == 43
    shown = {r["service"]: r for r in table_rows(rows.values())}
    assert shown["agent"]["error_ratio"] == "5.00%"
    assert shown["agent"]["cache_hit_ratio"] == "99.0%"


def test_unreachable_services_are_down_with_the_reason() -> None:
    def refuse(url: str) -> str:
        raise ConnectionRefusedError(111, "Connection refused")

    rows = summarize(scrape_all(Settings(), refuse))
    assert [r["service"] for r in rows] == list(SERVICES)
    assert all(r["state"] == "down" for r in rows)
    assert "127.0.0.1:9702" in next(r for r in rows if r["service"] == "agent")["error"]


def test_connections_ended_by_a_timeout_by_kind_since_start_and_in_the_window() -> None:
    api, registry = ServiceMetrics("api"), ServiceMetrics("registry")
    hop = api.hop("api")
    registry.hop("registry")  # not served by http.server: no timeout counts
    ended = hop.count_timeouts()
    ended.write, ended.idle = 1, 40  # before the window
    before = {"api": scrape_of(api, 100.0), "registry": scrape_of(registry, 100.0)}
    ended.write += 2  # in the window: two clients that did not read their answers
    ended.request += 1
    ended.idle += 5
    ended.silent += 1  # a connection that never asked
    now = {"api": scrape_of(api, 101.0), "registry": scrape_of(registry, 101.0)}
    rows = {r["service"]: r for r in summarize(now, before)}
    assert rows["api"]["timeouts"] == {"write": 3, "request": 1, "idle": 45, "silent": 1}
    assert rows["api"]["timeouts_in_window"] == {"write": 2, "request": 1, "idle": 5,
                                                 "silent": 1}
    assert "timeouts" not in rows["registry"]
    shown = {r["service"]: r for r in table_rows(rows.values())}
    assert shown["api"]["timeouts"] == "w=3 r=1 i=45 s=1"
    assert shown["registry"]["timeouts"] is None
    first = {r["service"]: r for r in summarize(now)}  # one scrape: since start only
    assert first["api"]["timeouts"]["write"] == 3 and "timeouts_in_window" not in first["api"]
