"""The metrics room: path families, plain hop counters, and their exposition through
prometheus-client (parsed back with its own parser, so names and types are real)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from openimds.config import MetricsSettings
from openimds.metrics import FAMILIES, FeedStats, ServiceMetrics, counter, path_family


@pytest.mark.parametrize(("path", "family"), [
    ("/latest/meta-data/instance-id", "ec2"),
    ("/2009-04-04/meta-data/", "ec2"),
    ("/openstack/latest/meta_data.json", "openstack"),
    ("/openstack", "openstack"),
    ("/latest/api/token", "token"),
    ("/latest/dynamic/instance-identity/document", "identity"),
    ("/openstack/latest/identity", "identity"),
    ("/", "other"),
    ("/favicon.ico", "other"),
])
def test_path_family(path: str, family: str) -> None:
    assert FAMILIES[path_family(path)] == family


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_hop_counters_are_exposed_by_class_family_and_bucket() -> None:
    m = ServiceMetrics("agent")
    hop = m.hop("agent")
    for status, path, secs in [(200, "/latest/meta-data/", 0.00004),
                               (200, "/latest/meta-data/", 0.0003),
                               (404, "/openstack/latest/x", 0.002),
                               (503, "/latest/api/token", 1.5)]:
        hop.begin()
        hop.done(status, path, secs)
    hop.begin()  # one still in flight
    hop.upstream_error(503)
    got = samples(m.render())
    assert got[("openimds_requests_total",
                (("code", "2xx"), ("family", "ec2"), ("hop", "agent")))] == 2
    assert got[("openimds_requests_total",
                (("code", "4xx"), ("family", "openstack"), ("hop", "agent")))] == 1
    assert got[("openimds_requests_total",
                (("code", "5xx"), ("family", "token"), ("hop", "agent")))] == 1
    bucket = "openimds_request_duration_seconds_bucket"
    assert got[(bucket, (("hop", "agent"), ("le", "5e-05")))] == 1
    assert got[(bucket, (("hop", "agent"), ("le", "0.0005")))] == 2
    assert got[(bucket, (("hop", "agent"), ("le", "0.0025")))] == 3
    assert got[(bucket, (("hop", "agent"), ("le", "+Inf")))] == 4
    assert got[("openimds_request_duration_seconds_count", (("hop", "agent"),))] == 4
    assert got[("openimds_request_duration_seconds_sum", (("hop", "agent"),))] == \
        pytest.approx(1.50234)
    assert got[("openimds_requests_in_flight", (("hop", "agent"),))] == 1
    assert got[("openimds_upstream_errors_total", (("hop", "agent"), ("status", "503")))] == 1
    assert got[("openimds_upstream_errors_total", (("hop", "agent"), ("status", "504")))] == 0
    assert ("process_cpu_seconds_total", ()) in got  # prometheus-client's own collectors
    assert got[("openimds_build_info", (("service", "agent"), ("version", "0.1.0"),
                                        ("worker", "0")))] == 1


def test_answers_given_at_once_count_as_done_and_never_in_flight() -> None:
    m = ServiceMetrics("api")
    hop = m.hop("api")
    hop.answered(200, "/openstack/latest/meta_data.json", 0.00001)  # the kept-answer path
    hop.answered(404, "/latest/meta-data/nope", 0.03)
    hop.begin()  # a miss: in flight until its fetch answers
    assert hop.in_flight() == 1 and hop.count == 2
    hop.done(200, "/openstack/latest/meta_data.json", 0.004)
    assert hop.in_flight() == 0 and hop.count == 3
    assert hop.by_class() == {("2xx", "openstack"): 2, ("4xx", "ec2"): 1}
    assert hop.buckets[0] == 1 and hop.buckets[6] == 1 and hop.buckets[9] == 1
    got = samples(m.render())
    bucket = "openimds_request_duration_seconds_bucket"
    assert got[(bucket, (("hop", "api"), ("le", "5e-05")))] == 1
    assert got[(bucket, (("hop", "api"), ("le", "0.005")))] == 2
    assert got[(bucket, (("hop", "api"), ("le", "+Inf")))] == 3
    assert got[("openimds_requests_in_flight", (("hop", "api"),))] == 0
    assert got[("openimds_request_duration_seconds_sum", (("hop", "api"),))] == \
        pytest.approx(0.03401)


def test_timed_out_connections_are_exposed_per_hop_and_kind() -> None:
    m = ServiceMetrics("proxy")
    served = m.hop("proxy")
    m.hop("registry")  # not served by http.server: no timeout counts, none exported
    counts = served.count_timeouts()
    assert served.count_timeouts() is counts
    counts.write += 1
    counts.idle += 3
    counts.silent += 2
    text = m.render()
    got = samples(text)
    name = "openimds_connection_timeouts_total"
    assert got[(name, (("hop", "proxy"), ("kind", "write")))] == 1
    assert got[(name, (("hop", "proxy"), ("kind", "request")))] == 0
    assert got[(name, (("hop", "proxy"), ("kind", "idle")))] == 3
    assert got[(name, (("hop", "proxy"), ("kind", "silent")))] == 2
    assert not [k for k in got if k[0] == name and ("hop", "registry") in k[1]]
    assert b"# HELP openimds_connection_timeouts_total Client connections" in text
    assert b"openimds_connection_timeouts" not in ServiceMetrics("registry").render()


def test_feed_lag_is_zero_while_polling_and_grows_otherwise() -> None:
    feed = FeedStats()
    feed.up, feed.polling, feed.caught_up_at = True, True, 100.0
    assert feed.lag_seconds(now=130.0) == 0.0
    feed.polling = False  # applying a batch, or the registry is down
    assert feed.lag_seconds(now=130.0) == 30.0
    m = ServiceMetrics("api")
    st = m.feed("api")
    st.revision, st.up, st.polling = 42, True, True
    got = samples(m.render())
    assert got[("openimds_feed_revision", (("consumer", "api"),))] == 42
    assert got[("openimds_feed_lag_seconds", (("consumer", "api"),))] == 0
    assert got[("openimds_feed_up", (("consumer", "api"),))] == 1


def test_a_failing_source_does_not_hide_the_others() -> None:
    m = ServiceMetrics("registry")

    def broken() -> list[object]:
        raise RuntimeError("bug")

    m.add(broken)  # type: ignore[arg-type]
    m.add(lambda: [counter("openimds_registry_writes", "w", 3)])
    got = samples(m.render())
    assert got[("openimds_registry_writes_total", ())] == 3


def test_ports_per_service() -> None:
    cfg = MetricsSettings()
    assert [cfg.port(s) for s in ("registry", "api", "agent", "proxy", "l3-agent",
                                  "dhcp-agent")] == [9700, 9701, 9702, 9703, 9704, 9705]


def test_exposition_passes_promtool() -> None:
    assert shutil.which("promtool"), "promtool (Debian package prometheus) is installed by setup"
    m = ServiceMetrics("proxy")
    hop = m.hop("proxy")
    hop.begin()
    hop.done(200, "/", 0.001)
    hop.count_timeouts().write += 1
    m.feed("proxy")
    proc = subprocess.run(["promtool", "check", "metrics"], input=m.render(),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_json_log_lines_have_fixed_keys(tmp_path: Path) -> None:
    """`log_format = json`: records and the fast access line give the same keys."""
    import json
    import logging

    from openimds.log import JSON_KEYS, access_line, setup_logging

    log_file = tmp_path / "svc.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(debug=False, log_file=str(log_file), component="agent", fmt="json")
        logging.getLogger("openimds.test").warning("thing happened id=%s", "x\"y")
        access_line.write("agent request_id=abc status=200")
        access_line.flush()
    finally:
        access_line.configure(None, "openimds")
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(x) for x in log_file.read_text().splitlines()]
    assert [tuple(obj) for obj in lines] == [JSON_KEYS, JSON_KEYS]
    assert lines[0]["message"] == 'thing happened id=x"y' and lines[0]["level"] == "WARNING"
    assert lines[1]["message"] == "agent request_id=abc status=200"
    assert lines[1]["service"] == "agent" and lines[1]["logger"] == "openimds.access"
    assert lines[1]["time"].endswith("Z") and "T" in lines[1]["time"]
