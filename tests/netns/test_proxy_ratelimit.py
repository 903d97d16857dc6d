"""A VM over its [metadata_rate_limiting] budget, through the whole chain: after the agent's
first 429 the proxy answers the VM itself (the agent's counters stand still), tokens and
metadata alike, while another VM behind the same router is served as usual."""

from __future__ import annotations

import json
import socket
from typing import Any

import pytest

from tests.netns.test_routed_e2e import make_tenant, wait_metadata, wait_router_ready
from tests.support import PYTHON, metric_samples, scrape

pytestmark = pytest.mark.netns

# Inside the VM: one keep-alive connection, the requests of argv[1] ("GET path" / "PUT
# path"), one answer each; prints [[status, Retry-After or null], ...].
ASK = r"""
import json, socket, sys
sock = socket.create_connection(("169.254.169.254", 80), timeout=20)
buf, out = b"", []
for item in json.loads(sys.argv[1]):
    method, path = item.split(" ", 1)
    extra = "X-aws-ec2-metadata-token-ttl-seconds: 60\r\n" if method == "PUT" else ""
    sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n{extra}"
                 "Content-Length: 0\r\n\r\n".encode())
    while b"\r\n\r\n" not in buf:
        buf += sock.recv(65536)
    head, _, buf = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
    length = int(fields.get("content-length", "0"))
    while len(buf) < length:
        buf += sock.recv(65536)
    buf = buf[length:]
    out.append([int(lines[0].split()[1]), fields.get("retry-after")])
print(json.dumps(out))
"""


def agent_stats(socket_path: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(b"GET /openimds-agent/stats HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    stats: dict[str, Any] = json.loads(data.partition(b"\r\n\r\n")[2])
    return stats


def test_limited_vm_is_answered_by_the_proxy_and_its_neighbour_is_not(make_stack: Any) -> None:
    stack = make_stack(overrides={
        "metadata_rate_limiting": {
            "rate_limit_enabled": "true", "burst_query_rate_limit": 4,
            "burst_window_duration": 30, "base_query_rate_limit": 100,
            "base_window_duration": 60},
        "proxy": {"rescan_interval": 1.0, "tarpit_delay": 0.2},
    })
    t = make_tenant(stack, "rl")
    vm, c = t["server"], stack.client
    other = c.create_instance("neighbour", t["network"]["id"], project_id=t["project"]["id"],
                              fixed_ip="10.0.0.6")
    wait_router_ready(stack, t["router"]["id"])
    for server in (vm, other):
        stack.plug(server["id"])
    wait_metadata(stack, other["id"])  # one request of its budget
    asks = ["GET /latest/meta-data/instance-id"] * 5 + [
        "PUT /latest/api/token", "GET /openstack/latest/meta_data.json",
        "GET /latest/meta-data/"]
    before = agent_stats(str(stack.settings.metadata_proxy_socket))
    proc = stack.vm_exec(vm["id"], PYTHON, "-c", ASK, json.dumps(asks))
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    statuses = [status for status, _ in got]
    # The budget (4), then the agent's 429, then the proxy's: every later request refused.
    assert statuses == [200] * 4 + [429] * 4, got
    assert all(1 <= int(retry) <= 60 for _, retry in got[4:]), got
    after = agent_stats(str(stack.settings.metadata_proxy_socket))
    # The agent saw the budget and one 429; the three after it never reached it.
    assert after["rate_limited_429"] - before["rate_limited_429"] == 1
    assert after["requests"] - before["requests"] == 5 + 1  # + this stats request
    text = scrape(stack.settings.metrics.port("proxy"))
    samples = metric_samples(text)
    assert samples[("openimds_rate_limited_total", frozenset({("hop", "proxy")}))] == 3
    assert samples[("openimds_proxy_tarpit_delayed_total", frozenset())] == 3
    # The neighbour behind the same router is served, by the agent.
    md = wait_metadata(stack, other["id"])
    assert md["uuid"] == other["id"]
    assert agent_stats(str(stack.settings.metadata_proxy_socket))["requests"] > after["requests"]
    log = stack.log("proxy")
    assert f"proxy.rate_limited ip=10.0.0.5 router={t['router']['id']}" in log
    assert "ip=10.0.0.6" not in log.split("proxy.rate_limited", 1)[1].splitlines()[0]
