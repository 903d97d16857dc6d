"""The proxy's request IDs and /metrics, for real: a VM namespace asks through a router and a
DHCP namespace; the proxy's metrics listener is in the host namespace on 127.0.0.1 and no VM
can reach it."""

# ruff: noqa: F811 - the fixtures of test_proxy are imported by name, then requested
from __future__ import annotations

import re
import socket

import pytest

from tests.netns.test_proxy import (  # noqa: F401 - fixtures
    ProxyEnv,
    RecordingAgent,
    agent,
    dhcp,
    env,
    get,
    headers_of,
    lab,
    proxy_sockets_in,
    router,
    start_both,
    wait_for,
)
from tests.support import metric_samples, promtool_check, scrape

pytestmark = pytest.mark.netns

GENERATED = re.compile(r"[0-9a-f]{8}-[0-9a-f]+")
PROXY_METRICS = 9703  # the default [metrics] proxy_port (ProxyEnv's config keeps defaults)


def test_request_ids_guest_kept_if_well_formed_else_generated(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str], dhcp: tuple[str, str],
) -> None:
    start_both(env, router, dhcp)
    vm = router[1]
    for headers in ([("X-Request-Id", "guest-42.a:b")],
                    [("X-Request-Id", "no spaces <allowed>")],
                    [("X-Openimds-Request-Id", "forged")],
                    [], []):
        assert get(vm, "10.0.0.1", 9697, "/latest/meta-data/", headers)[0] == 200
    ids = [headers_of(seen, "X-Openimds-Request-Id") for seen in agent.recorded]
    assert all(len(one) == 1 for one in ids), ids  # exactly one, the proxy's
    kept, bad, forged, first, second = (one[0] for one in ids)
    assert kept == "guest-42.a:b"
    for made in (bad, forged, first, second):
        assert GENERATED.fullmatch(made), made
    assert len({bad, forged, first, second}) == 4  # every request its own, memo or not


def test_proxy_metrics_count_listeners_requests_and_upstream_errors(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str], dhcp: tuple[str, str],
) -> None:
    svc = start_both(env, router, dhcp)
    for _ in range(3):
        assert get(router[1], "10.0.0.1", 9697, "/openstack/latest/meta_data.json")[0] == 200
    assert get(dhcp[1], "169.254.169.254", 80, "/latest/meta-data/")[0] == 200
    agent.stall.set()  # the agent never answers: timeout_server (1 s) -> 504
    assert get(dhcp[1], "169.254.169.254", 80, "/latest/api/token")[0] == 504
    text = scrape(PROXY_METRICS)
    promtool_check(text)
    got = metric_samples(text)

    def value(name: str, **labels: str) -> float:
        return got.get((name, frozenset(labels.items())), 0.0)

    assert value("openimds_requests_total", hop="proxy", code="2xx", family="openstack") == 3
    assert value("openimds_requests_total", hop="proxy", code="2xx", family="ec2") == 1
    assert value("openimds_requests_total", hop="proxy", code="5xx", family="token") == 1
    assert value("openimds_upstream_errors_total", hop="proxy", status="504") == 1
    assert value("openimds_request_duration_seconds_count", hop="proxy") == 5
    assert value("openimds_request_duration_seconds_bucket", hop="proxy", le="0.5") == 4
    assert value("openimds_proxy_listeners") == 2
    assert value("openimds_proxy_namespaces") == 2
    assert value("openimds_requests_in_flight", hop="proxy") == 0
    # ...and not from any VM: nothing of the proxy listens on the metrics port in a VM-facing
    # namespace, and the VM's connection attempts are refused.
    for ns in (router[0], dhcp[0]):
        assert not [x for x in proxy_sockets_in(ns, svc.pid) if f":{PROXY_METRICS} " in x]
    for vm, host in ((router[1], "10.0.0.1"), (dhcp[1], "169.254.169.254"),
                     (dhcp[1], "10.0.0.2"), (router[1], "127.0.0.1")):
        with pytest.raises(OSError):
            get(vm, host, PROXY_METRICS, "/metrics")
    wait_for(lambda: scrape(PROXY_METRICS))  # still served on the host side


def test_metrics_disabled_means_no_listener(env: ProxyEnv, agent: RecordingAgent,
                                            router: tuple[str, str],
                                            dhcp: tuple[str, str]) -> None:
    env.config.write_text(env.config.read_text() + "\n[metrics]\nenabled = false\n")
    start_both(env, router, dhcp)
    assert get(router[1], "10.0.0.1", 9697)[0] == 200
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", PROXY_METRICS), 2):
        pass
