"""Back-pressure through a real `openimds proxy`: a VM that pipelines and does not read.

A VM namespace floods the router namespace's listener (served off accepted sockets,
`http.sockets`) with up to 4 MB of small pipelined requests through small kernel buffers
and reads nothing; the agent is the lean server of `tests/flood.py` on the agent socket, a
process of its own. Without back-pressure the proxy relays every request and keeps every
answer (~95 MB); with it, it stops reading that VM once its answers pile up.
"""

# ruff: noqa: F811 - the fixtures of test_proxy are imported by name, then requested
from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from openimds.host.netns import socket_in_netns
from tests import flood
from tests.netns.test_proxy import (  # noqa: F401 - fixtures
    ROUTER_ID,
    ProxyEnv,
    env,
    lab,
    router,
    wait_for,
)
from tests.support import (
    PYTHON,
    Service,
    metric_samples,
    scrape,
    unix_ready,
    write_config,
)

pytestmark = pytest.mark.netns

FLOOD_BYTES = 4_000_000
RSS_GROWTH_MAX = 32 << 20  # bounded: ~64 KiB + one read's requests; unbounded: ~95 MB
PROXY_METRICS = 9703  # the default [metrics] proxy_port (the config here keeps defaults)


@pytest.fixture
def upstream(env: ProxyEnv) -> Iterator[Service]:
    svc = Service("flood-agent", [PYTHON, flood.__file__, "--unix", str(env.socket)], env.tmp)
    try:
        yield svc.start().wait_until(unix_ready(env.socket))
    finally:
        svc.stop()


def start_proxy(env: ProxyEnv, router: tuple[str, str], **haproxy: Any) -> Service:
    env.config = write_config(env.config, {
        "DEFAULT": {"state_path": env.state, "metadata_proxy_socket": env.socket},
        "proxy": {"rescan_interval": 0.2},
        "metadata_haproxy": {"timeout_server": 30.0, "timeout_connect": 5.0, **haproxy},
    })
    env.write_spec(f"router-{ROUTER_ID}", router[0], "0.0.0.0", 9697, router_id=ROUTER_ID)
    svc = env.start()
    wait_for(lambda: vm_connect(router[1]).close() is None)
    return svc


def vm_connect(vm: str) -> socket.socket:
    sock = flood.flood_socket(socket_in_netns(vm))
    sock.settimeout(10)
    try:
        sock.connect(("10.0.0.1", 9697))
    except OSError:
        sock.close()
        raise
    return sock


def handled(env: ProxyEnv) -> int:
    """The /n/ requests the agent answered (asked on the agent socket itself)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(env.socket))
        sock.sendall(b"GET /stats HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(json.loads(data.partition(b"\r\n\r\n")[2])["handled"])


def test_a_vm_that_does_not_read_stops_being_read_and_gets_every_answer_later(
    env: ProxyEnv, upstream: Service, router: tuple[str, str],
) -> None:
    proxy = start_proxy(env, router)
    rss_before = flood.rss_bytes(proxy.pid)
    with vm_connect(router[1]) as sock:
        sent = flood.flood(sock, FLOOD_BYTES)
        assert sent.stalled and not sent.reset, sent  # the proxy stopped reading
        answered = handled(env)
        time.sleep(1.0)
        # nothing more reached the agent: the proxy relays no request whose answer it
        # would have to keep
        assert handled(env) == answered < sent.whole, (answered, sent)
        growth = flood.rss_bytes(proxy.pid) - rss_before
        assert growth < RSS_GROWTH_MAX, f"RSS grew {growth >> 20} MiB"
        flood.check_answers(flood.drain(sock, sent), sent.expected)
    assert handled(env) == sent.expected
    assert proxy.alive()


def write_resets() -> float:
    """The proxy's `openimds_connection_timeouts_total{kind="write"}` (its /metrics)."""
    got = metric_samples(scrape(PROXY_METRICS))
    return got[("openimds_connection_timeouts_total",
                frozenset({("hop", "proxy"), ("kind", "write")}))]


def test_a_vm_that_never_reads_is_reset_after_timeout_client(
    env: ProxyEnv, upstream: Service, router: tuple[str, str],
) -> None:
    # A keep-alive timeout far beyond the wait: only the write timeout can end it.
    proxy = start_proxy(env, router, timeout_client=2.0, timeout_http_keep_alive=600.0)
    wait_for(lambda: write_resets() == 0)  # metrics start once the listeners serve
    with vm_connect(router[1]) as sock:
        sent = flood.flood(sock, FLOOD_BYTES, stall_s=1.0)
        assert sent.stalled, sent
        assert flood.wait_closed(sock) != flood.TCP_ESTABLISHED
    wait_for(lambda: "http.write_timeout peer=10.0.0.5" in proxy.log())
    assert write_resets() == 1  # counted once, on the reset
    assert proxy.alive()
    # the VM's next connection is served as usual
    with vm_connect(router[1]) as sock:
        sock.sendall(flood.request_for(0))
        sent = flood.Flood(1, 0, 0, b"", False)
        flood.check_answers(flood.drain(sock, sent), 1)
    assert write_resets() == 1
