"""The metadata API's and the agent's write timeouts, for real: `[api] client_write_timeout`
and `[metadata_agent] client_write_timeout` (1 s here) reset a client that pipelines and
never reads its answers, and each reset is one more
`openimds_connection_timeouts_total{kind="write"}` on that hop's /metrics; a connection to
the API that never sends a byte is closed at `[api] client_timeout` (1 s here) and counted
`kind="silent"`, not `idle` (the routine keep-alive expiry).

The registry, the API and the agent are real processes started through the CLI; the client
is `tests/flood.py`'s, over TCP to the API and over the agent's Unix socket (as the proxy
and the agent reach them). A bad value of either option stops the service at start with
one line naming the option and the value.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import flood
from tests.integration.agent_support import Stack, make_network, stack, unix_request, via_router
from tests.support import (
    http_ready,
    metric_samples,
    openimds_service,
    run_cli,
    scrape,
    write_config,
)

WRITE_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 1.0  # the API's: a connection that sends nothing is closed then
# Well under the 30 s default: a reset by then is the configured timeout's, not the
# default's (loose on purpose: a loaded machine may add seconds, not 20).
RESET_WITHIN_S = 20.0
FLOOD_BYTES = 4_000_000
VM_IP = "10.43.0.10"
TCP_CLOSE = 7  # tcp_info.tcpi_state after a reset


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("write-timeout")
    short = {"client_write_timeout": WRITE_TIMEOUT_S}
    api_cfg = {**short, "client_timeout": REQUEST_TIMEOUT_S}
    with stack(tmp, recording_api=False, api=api_cfg, metadata_agent=short) as st:
        api = openimds_service("api", st.config, "api", log_dir=tmp)
        port = int(st.cfg["DEFAULT"]["nova_metadata_port"])
        api.start().wait_until(http_ready(f"http://127.0.0.1:{port}/"))
        st.services.append(api)
        router = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.43.0.0/24", router["id"])
        st.admin.create_instance("vm1", net["id"], fixed_ip=VM_IP)
        st.start_agent()
        st.wait_feed(True)
        yield {"st": st, "api": api, "api_port": port, "router": router["id"]}


def ended(st: Stack, service: str, kind: str) -> float:
    """`openimds_connection_timeouts_total{kind=...}` on the hop's /metrics."""
    port = int(st.cfg["metrics"][f"{service}_port"])
    got = metric_samples(scrape(port))
    key = ("openimds_connection_timeouts_total", frozenset({("hop", service),
                                                           ("kind", kind)}))
    assert key in got, sorted(k for k in got if "timeout" in k[0])
    return got[key]


def write_resets(st: Stack, service: str) -> float:
    return ended(st, service, "write")


def wait_value(read: Callable[[], float], want: float, timeout: float = 30.0) -> float:
    """Poll until read() reaches want (returns what it read then, maybe more)."""
    deadline = time.monotonic() + timeout
    got = read()
    while got < want and time.monotonic() < deadline:
        time.sleep(0.1)
        got = read()
    return got


def never_reads(sock: socket.socket, request: Callable[[int], bytes]) -> None:
    """Pipeline without reading until the hop stops reading, then wait for its reset."""
    sent = flood.flood(sock, FLOOD_BYTES, stall_s=WRITE_TIMEOUT_S, request=request)
    assert sent.stalled, sent  # it stopped reading: back-pressure, not the timeout yet
    assert flood.wait_hung_up(sock, RESET_WITHIN_S), "not reset within the write timeout"


def test_the_api_resets_a_client_that_never_reads_and_counts_it_once(chain: Any) -> None:
    st: Stack = chain["st"]
    before = write_resets(st, "api")
    with flood.flood_socket(socket.socket()) as sock:
        sock.settimeout(10)
        sock.connect(("127.0.0.1", chain["api_port"]))
        # the version listing: no identity needed, a few hundred bytes each
        never_reads(sock, lambda i: b"GET / HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n")
        # a reset (CLOSE), not a FIN behind the answers (that would leave CLOSE_WAIT)
        assert flood.tcp_state(sock) == TCP_CLOSE
    assert wait_value(lambda: write_resets(st, "api"), before + 1) == before + 1
    assert "http.write_timeout peer=127.0.0.1" in chain["api"].log()
    # the API goes on serving
    with socket.create_connection(("127.0.0.1", chain["api_port"]), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert sock.recv(12) == b"HTTP/1.1 200"
    assert write_resets(st, "api") == before + 1


def test_the_agent_resets_a_client_that_never_reads_and_counts_it_once(chain: Any) -> None:
    st: Stack = chain["st"]
    assert st.agent is not None
    before = write_resets(st, "agent")
    head = "".join(f"{k}: {v}\r\n" for k, v in via_router(chain["router"], VM_IP))
    request = f"GET /latest/meta-data/instance-id HTTP/1.1\r\n{head}\r\n".encode()
    with flood.flood_socket(socket.socket(socket.AF_UNIX)) as sock:
        sock.settimeout(10)
        sock.connect(st.socket)
        # what the proxy relays for a VM, answered by the API behind the agent
        never_reads(sock, lambda i: request)
    assert wait_value(lambda: write_resets(st, "agent"), before + 1) == before + 1
    assert "http.write_timeout peer=-" in st.agent.log()
    # the agent goes on serving
    assert unix_request(st.socket, "/latest/meta-data/instance-id",
                        headers=via_router(chain["router"], VM_IP)).status == 200
    assert write_resets(st, "agent") == before + 1


def test_the_api_closes_a_connection_that_never_sends_and_counts_it_silent(chain: Any) -> None:
    st: Stack = chain["st"]
    kinds = ("silent", "idle", "request", "write")
    before = {kind: ended(st, "api", kind) for kind in kinds}
    with socket.create_connection(("127.0.0.1", chain["api_port"]),
                                  timeout=RESET_WITHIN_S) as sock:
        t0 = time.monotonic()
        assert sock.recv(65536) == b""  # closed, no unprompted 408
        assert time.monotonic() - t0 < RESET_WITHIN_S
    assert wait_value(lambda: ended(st, "api", "silent"), before["silent"] + 1) \
        == before["silent"] + 1
    # and nothing else: not idle (the agent's pooled connections to the API, its only
    # other clients, expire 30 s after their last use, in the tests just before this one)
    after = {kind: ended(st, "api", kind) for kind in kinds}
    assert after == {**before, "silent": before["silent"] + 1}


@pytest.mark.parametrize(("service", "section", "raw", "reason"), [
    ("api", "api", "0.5", "is below the minimum 1.0"),
    ("api", "api", "soon", "is not a number"),
    ("agent", "metadata_agent", "7200", "is above the maximum 3600.0"),
    ("agent", "metadata_agent", "-1", "is below the minimum 1.0"),
])
def test_a_bad_write_timeout_stops_the_service_naming_the_value(
    chain: Any, service: str, section: str, raw: str, reason: str,
) -> None:
    st: Stack = chain["st"]
    variable = f"OPENIMDS_{section.upper()}_CLIENT_WRITE_TIMEOUT"
    proc = run_cli(st.config, service, env={variable: raw}, timeout=60)
    assert proc.returncode != 0
    line = proc.stderr.strip()
    assert "\n" not in line, line
    assert f"environment {variable}: value {raw!r} {reason}" in line, line
    # and from the config file, named by file, section and key
    cfg = {name: dict(values) for name, values in st.cfg.items()}
    cfg[section]["client_write_timeout"] = raw
    bad = write_config(st.tmp / f"bad-{service}.ini", cfg)
    proc = run_cli(bad, service, timeout=60)
    assert proc.returncode != 0
    assert f"{bad} [{section}] client_write_timeout: value {raw!r} {reason}" in proc.stderr
