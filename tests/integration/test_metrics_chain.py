"""/metrics of the real processes behind the proxy (registry, API, agent, started through the
CLI): counters move with real requests, feed revisions follow the registry, every scrape
passes `promtool check metrics`, and a request ID crosses the agent into the API's line."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.integration.agent_support import Stack, make_network, stack, unix_request, via_router
from tests.support import (
    http_ready,
    metric_samples,
    openimds_service,
    promtool_check,
    scrape,
)

META = "/openstack/latest/meta_data.json"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("metrics-chain")
    with stack(tmp, recording_api=False, api={"access_log": True}) as st:
        api = openimds_service("api", st.config, "api", log_dir=tmp)
        port = st.cfg["DEFAULT"]["nova_metadata_port"]
        api.start().wait_until(http_ready(f"http://127.0.0.1:{port}/"))
        st.services.append(api)
        r = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.41.0.0/24", r["id"])
        inst = st.admin.create_instance("vm1", net["id"], fixed_ip="10.41.0.10")
        st.start_agent()
        st.wait_feed(True)
        yield {"st": st, "api": api, "r": r, "inst": inst}


def port_of(st: Stack, service: str) -> int:
    return int(st.cfg["metrics"][f"{service.replace('-', '_')}_port"])


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_agent_counts_requests_cache_and_lookups(chain: Any) -> None:
    st: Stack = chain["st"]
    before = metric_samples(scrape(port_of(st, "agent")))
    for _ in range(5):
        assert unix_request(st.socket, META, headers=via_router(
            chain["r"]["id"], "10.41.0.10")).status == 200
    assert unix_request(st.socket, "/latest/meta-data/nope", headers=via_router(
        chain["r"]["id"], "10.41.0.10")).status == 404
    assert unix_request(st.socket, META, headers=via_router(
        chain["r"]["id"], "10.41.0.99")).status == 404  # nobody there
    text = scrape(port_of(st, "agent"))
    promtool_check(text)
    after = metric_samples(text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("openimds_requests_total", hop="agent", code="2xx", family="openstack") == 5
    assert moved("openimds_requests_total", hop="agent", code="4xx", family="ec2") == 1
    assert moved("openimds_requests_total", hop="agent", code="4xx", family="openstack") == 1
    assert moved("openimds_request_duration_seconds_count", hop="agent") == 7
    assert value(after, "openimds_requests_in_flight", hop="agent") == 0
    assert moved("openimds_agent_cache_hits_total") >= 5
    assert moved("openimds_agent_registry_lookups_total") >= 1
    assert value(after, "openimds_agent_cache_entries") >= 1
    assert value(after, "openimds_agent_cache_trusted") == 1
    assert value(after, "openimds_feed_up", consumer="agent") == 1


def test_feed_revision_follows_the_registry(chain: Any) -> None:
    st: Stack = chain["st"]
    st.admin.request("PATCH", f"/v1/instances/{chain['inst']['id']}",
                     json={"metadata": {"k": "v"}})
    want = int(st.admin.health()["revision"])
    deadline = time.monotonic() + 10
    while True:
        got = metric_samples(scrape(port_of(st, "agent")))
        if value(got, "openimds_feed_revision", consumer="agent") >= want:
            break
        assert time.monotonic() < deadline, got
        time.sleep(0.05)
    assert value(got, "openimds_feed_lag_seconds", consumer="agent") < 2.0


def test_request_id_reaches_the_api_access_line(chain: Any) -> None:
    st: Stack = chain["st"]
    rid = f"test-{time.monotonic_ns():x}"
    assert unix_request(st.socket, META, headers=[
        *via_router(chain["r"]["id"], "10.41.0.10"), ("X-Openimds-Request-Id", rid),
    ]).status == 200
    deadline = time.monotonic() + 30  # for a loaded machine; ends once logged
    while rid not in chain["api"].log() or rid not in st.services[-1].log():
        assert time.monotonic() < deadline, chain["api"].log()[-2000:]
        time.sleep(0.05)
    line = next(x for x in chain["api"].log().splitlines() if rid in x)
    assert "status=200" in line and f"instance={chain['inst']['id']}" in line


def test_registry_and_api_metrics(chain: Any) -> None:
    st: Stack = chain["st"]
    for _ in range(2):
        assert unix_request(st.socket, "/latest/meta-data/instance-id", headers=via_router(
            chain["r"]["id"], "10.41.0.10")).status == 200
    st.admin.create_router("r-metrics")
    reg_text, api_text = scrape(port_of(st, "registry")), scrape(port_of(st, "api"))
    promtool_check(reg_text)
    promtool_check(api_text)
    reg, api = metric_samples(reg_text), metric_samples(api_text)
    assert value(reg, "openimds_registry_revision") == st.admin.health()["revision"]
    assert value(reg, "openimds_registry_writes_total", resource="routers") == 3  # 2 made, 1 leg
    assert value(reg, "openimds_registry_writes_total", resource="instances") >= 1
    assert value(reg, "openimds_requests_total", hop="registry", code="2xx",
                 family="lookup") >= 1
    assert value(reg, "openimds_registry_feed_polls_total", code="200") >= 1
    assert value(api, "openimds_requests_total", hop="api", code="2xx", family="ec2") >= 2
    assert value(api, "openimds_request_duration_seconds_count", hop="api") >= 2
    assert value(api, "openimds_api_cache_entries") >= 1
    assert value(api, "openimds_feed_up", consumer="api") == 1
    assert value(api, "openimds_build_info", service="api", version="0.1.0", worker="0") == 1
