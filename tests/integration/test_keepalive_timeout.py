"""The API's and the agent's keep-alive timeouts, for real: `[api] client_keepalive_timeout`
and `[metadata_agent] client_keepalive_timeout` (0.5 s here) close an answered connection
that sends nothing more, not before that time (measured from before its request was sent,
which the server's timer cannot precede) and long before the 30 s default; the agent's close
is one more `openimds_connection_timeouts_total{kind="idle"}` on its /metrics. The agent's
own pooled connections to the API expire the same way, and it reconnects for the next
request. The proxy's is `[metadata_haproxy] timeout_http_keep_alive` (Neutron's name).

The registry, the API and the agent are real processes started through the CLI, reached
over TCP (the API) and the agent's Unix socket, as the agent and the proxy reach them. A bad
value stops the service at start with one line naming the option and the value.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from openimds.config import load_settings
from openimds.metadata.proxy import limits_from_settings
from tests.integration.agent_support import Stack, make_network, stack, unix_request, via_router
from tests.support import (
    http_ready,
    metric_samples,
    openimds_service,
    run_cli,
    scrape,
    write_config,
)

KEEPALIVE_S = 0.5
# The server's timer wheel fires up to 0.25 s late (http.server.WHEEL_TICK_S); the rest is
# a loaded machine's slack, still far under the 30 s default.
CLOSED_WITHIN_S = KEEPALIVE_S + 0.25 + 4.0
VM_IP = "10.44.0.10"


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("keepalive-timeout")
    short = {"client_keepalive_timeout": KEEPALIVE_S}
    with stack(tmp, recording_api=False, api=short, metadata_agent=short) as st:
        api = openimds_service("api", st.config, "api", log_dir=tmp)
        port = int(st.cfg["DEFAULT"]["nova_metadata_port"])
        api.start().wait_until(http_ready(f"http://127.0.0.1:{port}/"))
        st.services.append(api)
        router = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.44.0.0/24", router["id"])
        st.admin.create_instance("vm1", net["id"], fixed_ip=VM_IP)
        st.start_agent()
        st.wait_feed(True)
        yield {"st": st, "api_port": port, "router": router["id"]}


def idle_closes(st: Stack, service: str) -> float:
    """`openimds_connection_timeouts_total{kind="idle"}` on the hop's /metrics."""
    got = metric_samples(scrape(int(st.cfg["metrics"][f"{service}_port"])))
    return got.get(("openimds_connection_timeouts_total",
                    frozenset({("hop", service), ("kind", "idle")})), 0.0)


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer (Content-Length framed), leaving the connection open."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, data
        body += chunk
    assert len(body) == length
    return head


def seconds_until_closed(sock: socket.socket, request: bytes) -> tuple[float, float]:
    """Send one keep-alive request, read its answer, then wait for the server's close:
    (seconds from before the send, seconds from the answer read) until the EOF."""
    sock.settimeout(CLOSED_WITHIN_S + 5)
    sent = time.monotonic()
    sock.sendall(request)
    head = read_answer(sock)
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"connection: close" not in head.lower(), head  # kept alive
    answered = time.monotonic()
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    assert poller.poll((CLOSED_WITHIN_S + 5) * 1000), "still open"
    closed = time.monotonic()
    assert sock.recv(65536) == b""  # a plain close, no unprompted 408
    return closed - sent, closed - answered


def test_the_api_closes_an_idle_keep_alive_connection_at_its_timeout(chain: Any) -> None:
    with socket.create_connection(("127.0.0.1", chain["api_port"]), timeout=10) as sock:
        since_sent, since_answer = seconds_until_closed(
            sock, b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
    assert since_sent >= KEEPALIVE_S, since_sent  # not before
    assert since_answer < CLOSED_WITHIN_S, since_answer  # the configured one, not 30 s


def test_the_agent_closes_an_idle_keep_alive_connection_at_its_timeout(chain: Any) -> None:
    st: Stack = chain["st"]
    before = idle_closes(st, "agent")
    head = "".join(f"{k}: {v}\r\n" for k, v in via_router(chain["router"], VM_IP))
    request = f"GET /latest/meta-data/instance-id HTTP/1.1\r\n{head}\r\n".encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(st.socket)
        since_sent, since_answer = seconds_until_closed(sock, request)
    assert since_sent >= KEEPALIVE_S, since_sent
    assert since_answer < CLOSED_WITHIN_S, since_answer
    # counted once, as the routine expiry (the test is the agent's only client)
    deadline = time.monotonic() + 10
    while (after := idle_closes(st, "agent")) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert after == before + 1
    # By now the API closed the agent's pooled connection too (idle past 0.5 s): the next
    # request reconnects and is answered.
    assert unix_request(st.socket, "/latest/meta-data/instance-id",
                        headers=via_router(chain["router"], VM_IP)).status == 200


def test_the_proxy_takes_its_keep_alive_timeout_from_metadata_haproxy(tmp_path: Any) -> None:
    # the proxy's server honours Limits.keepalive_timeout_s (tests/integration/
    # test_proxy_fast_path.py, at 0.5 s); this is the option's way there
    path = write_config(tmp_path / "p.ini", {"metadata_haproxy": {
        "timeout_http_keep_alive": KEEPALIVE_S}})
    limits = limits_from_settings(load_settings(str(path), environ={}))
    assert limits.keepalive_timeout_s == KEEPALIVE_S


@pytest.mark.parametrize(("service", "section", "raw", "reason"), [
    ("api", "api", "0", "is below the minimum 0.1"),
    ("api", "api", "never", "is not a number"),
    ("agent", "metadata_agent", "7200", "is above the maximum 3600.0"),
])
def test_a_bad_keepalive_timeout_stops_the_service_naming_the_value(
    chain: Any, service: str, section: str, raw: str, reason: str,
) -> None:
    st: Stack = chain["st"]
    variable = f"OPENIMDS_{section.upper()}_CLIENT_KEEPALIVE_TIMEOUT"
    proc = run_cli(st.config, service, env={variable: raw}, timeout=60)
    assert proc.returncode != 0
    line = proc.stderr.strip()
    assert "\n" not in line, line
    assert f"environment {variable}: value {raw!r} {reason}" in line, line
    cfg = {name: dict(values) for name, values in st.cfg.items()}
    cfg[section]["client_keepalive_timeout"] = raw
    bad = write_config(st.tmp / f"bad-ka-{service}.ini", cfg)
    proc = run_cli(bad, service, timeout=60)
    assert proc.returncode != 0
    assert f"{bad} [{section}] client_keepalive_timeout: value {raw!r} {reason}" in proc.stderr
