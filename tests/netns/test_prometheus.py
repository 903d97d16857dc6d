"""A real Prometheus (Debian's package) scrapes a running node: every service's /metrics is a
target and every target is up; the shipped Grafana dashboard's expressions are valid PromQL
over metric names that a live scrape really has; a killed dnsmasq shows up as a restart.

Prometheus runs like the PostgreSQL of the store tests: a process of this test, inside the
test's private network namespace, with a temporary config and data directory, stopped by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openimds.core.names import dhcp_namespace
from tests import reaper
from tests.support import (
    PYTHON,
    REPO,
    Service,
    clean_env,
    free_port,
    http_ready,
    metric_samples,
    promtool_check,
    scrape,
)

pytestmark = pytest.mark.netns

SERVICES = ("registry", "api", "agent", "proxy", "l3-agent", "dhcp-agent")
DASHBOARD = REPO / "docs" / "grafana-dashboard.json"
MD_URL = "http://169.254.169.254/openstack/latest/meta_data.json"


def metrics_port(stack: Any, service: str) -> int:
    return int(stack.settings.metrics.port(service))


class Prometheus:
    """`prometheus` with a temp config and TSDB, scraping every service each second."""

    def __init__(self, tmp: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        self.dir = tmp / "prometheus"
        (self.dir / "data").mkdir(parents=True)
        lines = ["global:", "  scrape_interval: 1s", "  scrape_timeout: 1s",
                 "scrape_configs:", "  - job_name: openimds", "    static_configs:"]
        for service, port in targets.items():
            lines += [f"      - targets: ['127.0.0.1:{port}']",
                      f"        labels: {{openimds_service: {service}}}"]
        config = self.dir / "prometheus.yml"
        config.write_text("\n".join(lines) + "\n")
        binary = shutil.which("prometheus")
        assert binary, "prometheus (Debian package prometheus) is installed by scripts/setup"
        self.service = Service("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn",
        ], tmp)

    def start(self) -> Prometheus:
        self.service.start().wait_until(http_ready(f"{self.url}/-/ready"), 60)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as resp:
            body = json.loads(resp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else [
            {"value": data["result"]}]
        return result


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], Prometheus]]:
    started: list[Prometheus] = []

    def make(targets: dict[str, int]) -> Prometheus:
        prom = Prometheus(tmp_path, targets)
        started.append(prom)
        return prom.start()

    yield make
    for prom in started:
        prom.service.stop()


def wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except (OSError, AssertionError, KeyError) as exc:
            last = exc
        time.sleep(0.25)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for panel in doc["panels"] for t in panel.get("targets", [])]


def test_prometheus_scrapes_every_service_and_the_dashboard_fits(
    make_stack: Callable[..., Any], prometheus_factory: Callable[[dict[str, int]], Prometheus],
) -> None:
    stack = make_stack(dhcp=True, overrides={"dhcp": {"dnsmasq_user": "root"}})
    c = stack.client
    net = c.create_network("prom-net")
    sub = c.create_subnet("prom-sub", net["id"], "10.0.0.0/24")
    router = c.create_router("prom-r")
    c.add_interface(router["id"], sub["id"])
    server = c.create_instance("prom-vm", net["id"], fixed_ip="10.0.0.5")
    stack.plug(server["id"])
    for _ in range(3):
        out = stack.vm_exec(server["id"], "curl", "-s", "-m", "10", MD_URL, check=True).stdout
        assert json.loads(out)["uuid"] == server["id"]
    assert stack.vm_exec(server["id"], "curl", "-s", "-m", "10", "-X", "PUT", "-H",
                         "X-aws-ec2-metadata-token-ttl-seconds: 60",
                         "http://169.254.169.254/latest/api/token", check=True).stdout

    # A VM cannot reach any metrics listener: not on its gateway, not on the metadata IP.
    urls = [f"http://{host}:{metrics_port(stack, svc)}/metrics"
            for svc in SERVICES for host in ("10.0.0.1", "169.254.169.254")]
    script = "for u in " + " ".join(urls) + "; do " \
        "curl -s -m 1 -o /dev/null -w '%{http_code}\\n' $u; done"
    codes = stack.vm_exec(server["id"], "sh", "-c", script).stdout.split()
    assert codes == ["000"] * len(urls), codes

    # dnsmasq dies: the DHCP agent respawns it and counts the restart.
    confs = Path(stack.settings.dhcp.dhcp_confs) / net["id"]
    pid = wait(lambda: int((confs / "pid").read_text()), 30, "dnsmasq pid file")
    os.kill(pid, signal.SIGKILL)
    dhcp_port = metrics_port(stack, "dhcp-agent")

    def respawned() -> bool:
        got = metric_samples(scrape(dhcp_port))
        return got.get(("openimds_dhcp_dnsmasq_restarts_total",
                        frozenset({("reason", "died")}))) == 1 \
            and got.get(("openimds_dhcp_dnsmasq_running", frozenset())) == 1

    wait(respawned, 30, "dnsmasq respawned and the restart counted")
    assert os.path.exists(f"/run/netns/{dhcp_namespace(net['id'])}")

    texts = {svc: scrape(metrics_port(stack, svc)) for svc in SERVICES}
    for text in texts.values():
        promtool_check(text)
    live: dict[Any, float] = {}
    for text in texts.values():
        live.update(metric_samples(text))
    names = {name for name, _ in live}
    l3 = metric_samples(texts["l3-agent"])
    assert l3[("openimds_l3_routers", frozenset())] == 1
    assert l3[("openimds_feed_up", frozenset({("consumer", "l3-agent")}))] == 1
    dhcp = metric_samples(texts["dhcp-agent"])
    assert dhcp[("openimds_dhcp_networks", frozenset())] == 1
    assert dhcp[("openimds_dhcp_dnsmasq_running", frozenset())] == 1

    # `openimds status`: one screen, every service up, read from the same endpoints.
    for _ in range(2):
        stack.vm_exec(server["id"], "curl", "-s", "-m", "10", MD_URL, check=True)
    status = json.loads(stack.cli("status", "-f", "json", "--interval", "0.5").stdout)
    rows = {r["service"]: r for r in status["services"]}
    assert sorted(rows) == sorted(SERVICES)
    assert all(r["state"] == "up" for r in rows.values()), rows
    for hop in ("proxy", "agent", "api"):
        assert rows[hop]["requests"] >= 5 and rows[hop]["p99_ms"] > 0, rows[hop]
        assert rows[hop]["error_ratio"] == 0.0, rows[hop]
        # every hop served by http.server shows its timed-out connections, none here
        assert rows[hop]["timeouts"]["write"] == rows[hop]["timeouts"]["request"] == 0, \
            rows[hop]
    assert rows["agent"]["cache_hit_ratio"] > 0.5
    assert rows["agent"]["feed_live"] is True and rows["agent"]["feed_behind"] == 0
    assert rows["l3-agent"]["routers"] == 1 and rows["dhcp-agent"]["dnsmasq_restarts"] == 1
    assert rows["proxy"]["listeners"] == 1
    table = stack.cli("status").stdout
    assert "p99_ms" in table and "cache_hit_ratio" in table and "w=0 r=0 i=" in table
    watch_out = stack.root / "status-watch.out"
    with watch_out.open("wb") as sink:
        watch = reaper.spawn(
            [PYTHON, "-m", "openimds", "--config", str(stack.config), "status", "--watch",
             "--interval", "0.3"], stdout=sink, stderr=subprocess.STDOUT, env=clean_env())
    try:
        wait(lambda: watch_out.read_text().count("openimds status") >= 2, 60, "two frames")
    finally:
        watch.send_signal(signal.SIGINT)
        watch.wait(timeout=20)
    out = watch_out.read_text()
    assert watch.returncode == 0, out
    assert out.count("openimds status") >= 2, out  # refreshed

    prom = prometheus_factory({svc: metrics_port(stack, svc) for svc in SERVICES})

    def all_up() -> bool:
        active = prom.api("targets")["activeTargets"]
        return len(active) == len(SERVICES) and all(t["health"] == "up" for t in active)

    wait(all_up, 60, "every target up")
    up = prom.query('up{job="openimds"}')
    assert sorted(r["metric"]["openimds_service"] for r in up) == sorted(SERVICES)
    assert all(r["value"][1] == "1" for r in up)
    got = prom.query('sum by (hop) (openimds_requests_total{family="openstack"})')
    by_hop = {r["metric"]["hop"]: float(r["value"][1]) for r in got}
    assert by_hop["proxy"] >= 3 and by_hop["agent"] >= 3 and by_hop["api"] >= 3, by_hop

    # The dashboard: every metric it names exists in a live scrape, every expression is
    # valid PromQL that this Prometheus evaluates.
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    used = set()
    for expr in exprs:
        used |= set(re.findall(r"\b(?:openimds|process)_[a-z0-9_]+\b", expr))
        prom.query(expr)
    assert used <= names, sorted(used - names)
    assert "openimds_feed_lag_seconds" in used and "openimds_dhcp_dnsmasq_restarts_total" in used
    # a query over the shipped metrics has data once a few scrapes have happened
    wait(lambda: prom.query(
        'histogram_quantile(0.99, sum by (hop, le) '
        '(rate(openimds_request_duration_seconds_bucket[1m])))'), 20, "p99 series")
