"""`openimds proxy` for real: one process, listeners inside several namespaces.

Topology per test (all names unique, all deleted in finalizers):

    vm-r  eth0 10.0.0.5/24  <-veth->  qr0 10.0.0.1/24   router ns   (listener 0.0.0.0:9697)
    vm-d  eth0 10.0.0.5/24  <-veth->  tap0 10.0.0.2/24  dhcp ns     (listener 169.254.169.254:80)
          route 169.254.169.254 via 10.0.0.2

The agent is a recording Unix-socket HTTP server in this process: it answers every request
with the headers it saw, as JSON.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from openimds.config import worker_socket
from openimds.host.netns import socket_in_netns
from tests.support import (
    Service,
    metric_samples,
    openimds_service,
    run_cli,
    scrape,
    unique_name,
    write_config,
)

pytestmark = pytest.mark.netns

ROUTER_ID = "11111111-2222-4333-8444-555555555555"
NETWORK_ID = "66666666-7777-4888-9999-aaaaaaaaaaaa"
PROXY_METRICS = 9703  # the default [metrics] proxy_port
SPOOFS = [
    ("X-Forwarded-For", "6.6.6.6"),
    ("X-Forwarded-For", "7.7.7.7, 8.8.8.8"),
    ("X_Forwarded_For", "9.9.9.9"),
    ("Forwarded", "for=6.6.6.6"),
    ("X-Neutron-Router-ID", "evil-router"),
    ("x-neutron-network-id", "evil-network"),
    ("X-Instance-ID", "victim"),
    ("X-Instance-ID-Signature", "forged"),
    ("X-Tenant-ID", "victim-project"),
]


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class Lab:
    """Namespaces and veths made for one test; `cleanup` removes them all."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []

    def netns(self, prefix: str) -> str:
        name = unique_name(prefix)
        ip("netns", "add", name)
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")
        return name

    def link(self, ns_a: str, if_a: str, addr_a: str, ns_b: str, if_b: str,
             addr_b: str) -> None:
        ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b,
           "netns", ns_b)
        for ns, ifname, addr in ((ns_a, if_a, addr_a), (ns_b, if_b, addr_b)):
            ip("-n", ns, "addr", "add", addr, "dev", ifname)
            ip("-n", ns, "link", "set", ifname, "up")

    def delete(self, name: str) -> None:
        ip("netns", "del", name, check=False)
        if name in self.namespaces:
            self.namespaces.remove(name)

    def cleanup(self) -> None:
        for name in reversed(list(self.namespaces)):
            self.delete(name)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        seen = {"method": self.command, "path": self.path,
                "headers": [[k, v] for k, v in self.headers.items()], "body": body.decode()}
        self.server.recorded.append(seen)
        if self.server.stall.is_set():
            time.sleep(5)
            return
        retry = self.server.limited.get(self.headers.get("X-Forwarded-For", ""))
        if retry is not None:  # the agent's rate-limit answer (agent._over_budget)
            out = (f"429 Too Many Requests: rate limit of 4 requests per 10 s exceeded for "
                   f"this instance; retry in {retry} s\n").encode()
            self.send_response(429)
            self.send_header("Retry-After", str(retry))
            self.send_header("RateLimit-Policy", '"burst";q=4;w=10, "base";q=100;w=60')
            self.send_header("RateLimit", f'"burst";r=0;t={retry}, "base";r=90;t=0')
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)
            return
        out = json.dumps(seen).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


class RecordingAgent(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Stands in for the metadata agent: records each request, echoes what it saw."""

    daemon_threads = True
    request_queue_size = 256

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recorded: list[dict[str, Any]] = []
        self.stall = threading.Event()
        self.limited: dict[str, int] = {}  # X-Forwarded-For -> Retry-After: answered 429
        super().__init__(str(path), _Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class ProxyEnv:
    """A config, a spec directory and the proxy process(es) started from it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "state"
        self.socket = tmp / "agent.sock"
        self.specs = self.state / "proxy" / "listeners"
        self.specs.mkdir(parents=True)
        self.pid_file = self.state / "proxy" / "proxy.pid"
        self.config = write_config(tmp / "openimds.ini", {
            "DEFAULT": {"state_path": self.state, "metadata_proxy_socket": self.socket},
            "proxy": {"rescan_interval": 0.2},
            "metadata_haproxy": {"timeout_server": 1.0, "timeout_connect": 1.0},
        })
        self.services: list[Service] = []

    def write_spec(self, name: str, netns: str, host: str, port: int, *,
                   router_id: str | None = None, network_id: str | None = None) -> None:
        data = {"netns": netns, "host": host, "port": port, "router_id": router_id,
                "network_id": network_id}
        tmp = self.specs / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.specs / f"{name}.json")

    def remove_spec(self, name: str) -> None:
        (self.specs / f"{name}.json").unlink()

    def start(self) -> Service:
        svc = openimds_service(f"proxy{len(self.services)}", self.config, "proxy",
                               log_dir=self.tmp)
        self.services.append(svc)
        svc.start()
        svc.wait_until(lambda: self.pid_file.read_text().strip() == str(svc.pid))
        return svc

    def cleanup(self) -> None:
        for svc in self.services:
            svc.stop()


@pytest.fixture
def lab() -> Iterator[Lab]:
    made = Lab()
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def env(tmp_path: Path) -> Iterator[ProxyEnv]:
    made = ProxyEnv(tmp_path)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture
def agent(env: ProxyEnv) -> Iterator[RecordingAgent]:
    server = RecordingAgent(env.socket)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def router(lab: Lab) -> tuple[str, str]:
    """(router ns, vm ns): the VM reaches the router's 10.0.0.1."""
    rns, vm = lab.netns("pxr"), lab.netns("pxvr")
    lab.link(vm, "eth0", "10.0.0.5/24", rns, "qr0", "10.0.0.1/24")
    return rns, vm


@pytest.fixture
def dhcp(lab: Lab) -> tuple[str, str]:
    """(dhcp ns, vm ns): same VM address, reaching 169.254.169.254 via 10.0.0.2."""
    dns, vm = lab.netns("pxd"), lab.netns("pxvd")
    lab.link(vm, "eth0", "10.0.0.5/24", dns, "tap0", "10.0.0.2/24")
    ip("-n", vm, "route", "add", "169.254.169.254/32", "via", "10.0.0.2")
    return dns, vm


# -- client side --------------------------------------------------------------------------

def connect(ns: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    sock = socket_in_netns(ns)
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def request_bytes(
    path: str, headers: Sequence[tuple[str, str]] = (), *, close: bool = False,
    method: str = "GET", body: bytes = b"",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 169.254.169.254"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, bytes, bytes]]:
    """Read `count` responses framed by Content-Length: [(status, head, body)]."""
    buf = b""
    out: list[tuple[int, bytes, bytes]] = []
    while len(out) < count:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end]
            m = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            length = int(m.group(1)) if m else 0
            if len(buf) >= end + 4 + length:
                status = int(head.split(b" ", 2)[1])
                out.append((status, head, buf[end + 4:end + 4 + length]))
                buf = buf[end + 4 + length:]
                continue
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {len(out)} of {count} responses")
        buf += chunk
    return out


def get(ns: str, host: str, port: int, path: str = "/latest/meta-data/",
        headers: Sequence[tuple[str, str]] = ()) -> tuple[int, bytes]:
    with connect(ns, host, port) as sock:
        sock.sendall(request_bytes(path, headers, close=True))
        status, _, body = read_responses(sock, 1)[0]
        return status, body


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    """Poll check until true; the deadline is for a loaded machine (it returns at once)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, AssertionError) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"not true within {timeout}s (last error: {last!r})")


def headers_of(seen: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


def proxy_sockets_in(ns: str, pid: int) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tanpH"], check=True,
                         capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"pid={pid}," in line]


def start_both(env: ProxyEnv, router: tuple[str, str], dhcp: tuple[str, str]) -> Service:
    env.write_spec(f"router-{ROUTER_ID}", router[0], "0.0.0.0", 9697, router_id=ROUTER_ID)
    env.write_spec(f"network-{NETWORK_ID}", dhcp[0], "169.254.169.254", 80,
                   network_id=NETWORK_ID)
    svc = env.start()
    # The metadata address appears only now: IP_FREEBIND let the proxy bind it already.
    ip("-n", dhcp[0], "addr", "add", "169.254.169.254/32", "dev", "tap0")
    return svc


# -- tests --------------------------------------------------------------------------------

def test_each_namespace_reaches_the_agent_as_itself(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str], dhcp: tuple[str, str],
) -> None:
    start_both(env, router, dhcp)
    status, _ = get(router[1], "10.0.0.1", 9697, "/openstack/latest/meta_data.json", SPOOFS)
    assert status == 200
    status, _ = get(dhcp[1], "169.254.169.254", 80, "/latest/meta-data/", SPOOFS)
    assert status == 200

    via_router, via_dhcp = agent.recorded
    assert via_router["path"] == "/openstack/latest/meta_data.json"
    assert headers_of(via_router, "X-Forwarded-For") == ["10.0.0.5"]
    assert headers_of(via_router, "X-Neutron-Router-ID") == [ROUTER_ID]
    assert headers_of(via_router, "X-Neutron-Network-ID") == []
    assert via_dhcp["path"] == "/latest/meta-data/"
    assert headers_of(via_dhcp, "X-Forwarded-For") == ["10.0.0.5"]
    assert headers_of(via_dhcp, "X-Neutron-Network-ID") == [NETWORK_ID]
    assert headers_of(via_dhcp, "X-Neutron-Router-ID") == []
    for seen in agent.recorded:
        for name in ("X_Forwarded_For", "Forwarded", "X-Instance-ID",
                     "X-Instance-ID-Signature", "X-Tenant-ID"):
            assert headers_of(seen, name) == [], name
        assert headers_of(seen, "Host") == ["169.254.169.254"]


def test_keep_alive_pipelining_and_bodies(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str], dhcp: tuple[str, str],
) -> None:
    start_both(env, router, dhcp)
    with connect(router[1], "10.0.0.1", 9697) as sock:
        # Sequential keep-alive requests on one connection.
        for i in range(3):
            sock.sendall(request_bytes(f"/seq/{i}", [("X-Forwarded-For", "6.6.6.6")]))
            status, _, body = read_responses(sock, 1)[0]
            assert status == 200 and json.loads(body)["path"] == f"/seq/{i}"
        # Pipelined: five requests in one write, answered in order; one carries a body.
        batch = b"".join(request_bytes(f"/pipe/{i}") for i in range(4))
        batch += request_bytes("/latest/api/token", method="PUT", body=b"x" * 10, close=True)
        sock.sendall(batch)
        answers = read_responses(sock, 5)
        assert [json.loads(b)["path"] for _, _, b in answers] == [
            "/pipe/0", "/pipe/1", "/pipe/2", "/pipe/3", "/latest/api/token"]
        assert json.loads(answers[-1][2])["body"] == "x" * 10
        assert sock.recv(1) == b""  # closed after the Connection: close request
    assert all(headers_of(s, "X-Forwarded-For") == ["10.0.0.5"] for s in agent.recorded)


def test_removing_a_spec_frees_the_namespace(
    env: ProxyEnv, agent: RecordingAgent, lab: Lab, router: tuple[str, str],
    dhcp: tuple[str, str],
) -> None:
    svc = start_both(env, router, dhcp)
    held = connect(router[1], "10.0.0.1", 9697)
    try:
        held.sendall(request_bytes("/held"))
        assert read_responses(held, 1)[0][0] == 200
        assert proxy_sockets_in(router[0], svc.pid)  # listener + the held connection

        env.remove_spec(f"router-{ROUTER_ID}")
        os.kill(svc.pid, signal.SIGHUP)
        wait_for(lambda: not proxy_sockets_in(router[0], svc.pid))
        assert held.recv(1) == b""  # the kept-alive client connection was closed too
    finally:
        held.close()
    with pytest.raises(OSError):
        get(router[1], "10.0.0.1", 9697)
    # The other listener is untouched, and the freed namespace can go.
    assert get(dhcp[1], "169.254.169.254", 80)[0] == 200
    lab.delete(router[0])
    assert svc.alive()


def test_namespace_deleted_under_a_listener_is_released(
    env: ProxyEnv, agent: RecordingAgent, lab: Lab, router: tuple[str, str],
) -> None:
    rns, vm = router
    env.write_spec(f"router-{ROUTER_ID}", rns, "0.0.0.0", 9697, router_id=ROUTER_ID)
    svc = env.start()
    assert get(vm, "10.0.0.1", 9697)[0] == 200
    lab.delete(rns)  # spec left behind: the proxy must notice by itself
    wait_for(lambda: "reason=namespace gone" in svc.log())
    # The same name made again is picked up (new namespace, new listener).
    ip("netns", "add", rns)
    lab.namespaces.append(rns)
    ip("-n", rns, "link", "set", "lo", "up")
    wait_for(lambda: get(rns, "127.0.0.1", 9697)[0] == 200)


def test_spec_before_namespace_is_retried(
    env: ProxyEnv, agent: RecordingAgent, lab: Lab,
) -> None:
    later = unique_name("pxl")
    env.write_spec("router-later", later, "0.0.0.0", 9697, router_id="later")
    svc = env.start()
    ip("netns", "add", later)
    lab.namespaces.append(later)
    ip("-n", later, "link", "set", "lo", "up")
    wait_for(lambda: get(later, "127.0.0.1", 9697)[0] == 200)
    assert headers_of(agent.recorded[-1], "X-Neutron-Router-ID") == ["later"]
    assert headers_of(agent.recorded[-1], "X-Forwarded-For") == ["127.0.0.1"]
    assert svc.alive()


def test_sigkill_and_restart_reopens_every_listener(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str], dhcp: tuple[str, str],
) -> None:
    """What a SIGKILL leaves (its pid file, its lock, the namespaces' listeners gone with it)
    does not keep the next proxy from serving every listener. How fast is bench/
    restart_bench.py's (a bound here failed on a loaded machine, where a Python start alone
    can take seconds)."""
    svc = start_both(env, router, dhcp)
    assert get(router[1], "10.0.0.1", 9697)[0] == 200
    svc.kill()
    with pytest.raises(OSError):
        get(router[1], "10.0.0.1", 9697)

    again = openimds_service("proxy-again", env.config, "proxy", log_dir=env.tmp)
    env.services.append(again)
    again.start()
    wait_for(lambda: get(router[1], "10.0.0.1", 9697)[0] == 200
             and get(dhcp[1], "169.254.169.254", 80)[0] == 200, timeout=60)
    assert again.alive(), again.log()
    assert env.pid_file.read_text().strip() == str(again.pid)


def test_second_proxy_refuses_to_start(env: ProxyEnv, agent: RecordingAgent) -> None:
    svc = env.start()
    proc = run_cli(env.config, "proxy")
    assert proc.returncode == 1
    assert "another openimds proxy" in proc.stderr and str(svc.pid) in proc.stderr
    assert svc.alive()


def test_agent_down_is_503_and_silent_agent_is_504(
    env: ProxyEnv, router: tuple[str, str],
) -> None:
    rns, vm = router
    env.write_spec(f"router-{ROUTER_ID}", rns, "0.0.0.0", 9697, router_id=ROUTER_ID)
    env.start()
    status, body = get(vm, "10.0.0.1", 9697, headers=[("X-Forwarded-For", "6.6.6.6")])
    assert status == 503
    assert body.count(b"\n") == 1 and b"unavailable" in body
    assert str(env.socket).encode() not in body  # details stay in the proxy's log

    stalled = RecordingAgent(env.socket)
    try:
        stalled.stall.set()
        status, body = get(vm, "10.0.0.1", 9697)
        assert status == 504 and body.count(b"\n") == 1
        stalled.stall.clear()
        assert get(vm, "10.0.0.1", 9697)[0] == 200
    finally:
        stalled.stop()


def test_agent_restarted_within_the_retries_costs_the_vm_no_error(
    env: ProxyEnv, router: tuple[str, str],
) -> None:
    """The agent socket refuses (agent killed, being respawned) when the request comes and
    listens again 1.5 s later: the proxy's connect retries (haproxy's `retries 3`, 1 s apart)
    carry the request over, the VM gets 200 instead of a 503."""
    rns, vm = router
    env.write_spec(f"router-{ROUTER_ID}", rns, "0.0.0.0", 9697, router_id=ROUTER_ID)
    env.start()
    got: list[tuple[int, bytes]] = []

    def ask() -> None:
        with connect(vm, "10.0.0.1", 9697, timeout=15) as sock:
            sock.sendall(request_bytes("/latest/meta-data/", close=True))
            status, _, body = read_responses(sock, 1)[0]
            got.append((status, body))

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(1.5)
    back = RecordingAgent(env.socket)
    try:
        asker.join(20)
        assert got and got[0][0] == 200, got
        assert len(back.recorded) == 1  # the one request, sent once
    finally:
        back.stop()


def test_dual_stack_listener_reports_plain_ipv4(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str],
) -> None:
    # Neutron binds :::9697 when IPv6 is on; IPv4 clients then appear as ::ffff:a.b.c.d.
    rns, vm = router
    env.write_spec(f"router-{ROUTER_ID}", rns, "::", 9697, router_id=ROUTER_ID)
    env.start()
    assert get(vm, "10.0.0.1", 9697)[0] == 200
    assert headers_of(agent.recorded[-1], "X-Forwarded-For") == ["10.0.0.5"]
    with socket_in_netns(rns, socket.AF_INET6) as sock:
        sock.settimeout(5)
        sock.connect(("::1", 9697))
        sock.sendall(request_bytes("/v6", close=True))
        assert read_responses(sock, 1)[0][0] == 200
    assert headers_of(agent.recorded[-1], "X-Forwarded-For") == ["::1"]


def test_bad_and_temporary_spec_files_are_ignored(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str],
) -> None:
    rns, vm = router
    (env.specs / "router-broken.json").write_text("{not json")
    (env.specs / "router-both.json").write_text(json.dumps(
        {"netns": rns, "host": "0.0.0.0", "port": 9698, "router_id": "a", "network_id": "b"}))
    (env.specs / ".router-x.json.tmp").write_text("{}")
    env.write_spec(f"router-{ROUTER_ID}", rns, "0.0.0.0", 9697, router_id=ROUTER_ID)
    svc = env.start()
    assert get(vm, "10.0.0.1", 9697)[0] == 200
    log = svc.log()
    assert "proxy.bad_spec" in log and "router-broken.json" in log
    assert "exactly one of router_id and network_id" in log
    with pytest.raises(OSError):
        get(vm, "10.0.0.1", 9698)
    # Fixing the file is picked up by the next scan.
    env.write_spec("router-both", rns, "0.0.0.0", 9698, router_id="a")
    wait_for(lambda: get(vm, "10.0.0.1", 9698)[0] == 200)


def test_workers_each_listen_in_every_namespace(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str], dhcp: tuple[str, str],
) -> None:
    """`[proxy] workers = 2`: an SO_REUSEPORT listener per worker in each namespace, the
    same answers, SIGHUP reaching every worker, the pid file the parent's."""
    env.write_spec(f"router-{ROUTER_ID}", router[0], "0.0.0.0", 9697, router_id=ROUTER_ID)
    env.write_spec(f"network-{NETWORK_ID}", dhcp[0], "169.254.169.254", 80,
                   network_id=NETWORK_ID)
    svc = Service("proxy-workers", [sys.executable, "-m", "openimds", "--config",
                                    str(env.config), "proxy"], env.tmp,
                  env={"OPENIMDS_PROXY_WORKERS": "2"})
    env.services.append(svc)
    svc.start().wait_until(lambda: env.pid_file.read_text().strip() == str(svc.pid))
    ip("-n", dhcp[0], "addr", "add", "169.254.169.254/32", "dev", "tap0")
    kids = [int(p) for p in Path(f"/proc/{svc.pid}/task/{svc.pid}/children").read_text().split()]
    assert len(kids) == 2
    for ns in (router[0], dhcp[0]):
        for pid in kids:
            assert any("LISTEN" in line for line in proxy_sockets_in(ns, pid)), (ns, pid)
    for _ in range(10):
        assert get(router[1], "10.0.0.1", 9697)[0] == 200
        assert get(dhcp[1], "169.254.169.254", 80)[0] == 200
    env.remove_spec(f"router-{ROUTER_ID}")
    os.kill(svc.pid, signal.SIGHUP)
    for pid in kids:
        wait_for(lambda pid=pid: not proxy_sockets_in(router[0], pid))
    assert get(dhcp[1], "169.254.169.254", 80)[0] == 200
    assert svc.stop() == 0
    assert not env.pid_file.exists()
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists()


class _GatedHandler(_Handler):
    """Answers once the server's `gate` is open (the request is recorded at once)."""

    def _gated(self) -> None:
        self.server.arrived.set()
        assert self.server.gate.wait(30)
        self._answer()

    do_GET = _gated


class GatedAgent(RecordingAgent):
    """A RecordingAgent whose answers wait for `gate`; `arrived` is set by a request."""

    def __init__(self, path: Path) -> None:
        self.gate = threading.Event()
        self.arrived = threading.Event()
        super().__init__(path)
        self.RequestHandlerClass = _GatedHandler


def test_the_pool_spreads_over_the_agent_worker_sockets(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str],
) -> None:
    """Agent worker sockets beside metadata_proxy_socket (`.w0`, `.w1`, as
    `metadata_workers = 2` makes them): while a request is held on worker 0's, the next
    one opens the pool's second connection on worker 1's, not on the shared socket nor
    (as the shared socket's accept could) on the same worker again."""
    rns, vm = router
    w0 = GatedAgent(Path(worker_socket(str(env.socket), 0)))
    w1 = RecordingAgent(Path(worker_socket(str(env.socket), 1)))
    try:
        env.write_spec(f"router-{ROUTER_ID}", rns, "0.0.0.0", 9697, router_id=ROUTER_ID)
        env.start()
        held: list[int] = []
        first = threading.Thread(target=lambda: held.append(get(vm, "10.0.0.1", 9697)[0]))
        first.start()
        try:
            assert w0.arrived.wait(30)  # the first connection: worker 0 (no connection yet)
            status, body = get(vm, "10.0.0.1", 9697, "/second")
            assert status == 200 and json.loads(body)["path"] == "/second"
        finally:
            w0.gate.set()
            first.join(30)
        assert held == [200]
        assert [r["path"] for r in w0.recorded] == ["/latest/meta-data/"]
        assert [r["path"] for r in w1.recorded] == ["/second"]
        assert agent.recorded == []
        for _ in range(10):  # kept connections: still none on the shared socket
            assert get(vm, "10.0.0.1", 9697)[0] == 200
        assert agent.recorded == [] and len(w0.recorded) + len(w1.recorded) == 12
    finally:
        w0.gate.set()
        w0.stop()
        w1.stop()


def two_vms_behind_router(env: ProxyEnv, router: tuple[str, str], **proxy: Any) -> Service:
    """The router's proxy with these `[proxy]` options, its VM holding a second address
    (10.0.0.6: another source behind the same listener)."""
    rns, vm = router
    ip("-n", vm, "addr", "add", "10.0.0.6/24", "dev", "eth0")
    env.config = write_config(env.tmp / "openimds.ini", {
        "DEFAULT": {"state_path": env.state, "metadata_proxy_socket": env.socket},
        "proxy": {"rescan_interval": 0.2, **proxy},
    })
    env.write_spec(f"router-{ROUTER_ID}", rns, "0.0.0.0", 9697, router_id=ROUTER_ID)
    return env.start()


def test_connections_per_source_are_capped_for_that_source_only(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str],
) -> None:
    vm = router[1]
    svc = two_vms_behind_router(env, router, max_connections_per_source=2)
    held = [connect(vm, "10.0.0.1", 9697) for _ in range(2)]
    try:
        with connect(vm, "10.0.0.1", 9697) as third:
            third.sendall(request_bytes("/over"))
            status, head, body = read_responses(third, 1)[0]
            assert status == 429 and b"Retry-After: 1" in head and b"at most 2" in body
            assert third.recv(1) == b""  # and closed
        other = socket_in_netns(vm)  # another VM address is not affected
        other.settimeout(5)
        other.bind(("10.0.0.6", 0))
        other.connect(("10.0.0.1", 9697))
        with other:
            other.sendall(request_bytes("/other"))
            assert read_responses(other, 1)[0][0] == 200
        held[0].sendall(request_bytes("/held"))
        assert read_responses(held[0], 1)[0][0] == 200
    finally:
        for sock in held:
            sock.close()
    assert [seen["path"] for seen in agent.recorded] == ["/other", "/held"]
    assert "proxy.connection_cap" in svc.log() and "ip=10.0.0.5" in svc.log()


# -- sources over their limits: the proxy's own 429 and the tarpit ------------------------

def _fields(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}


def _proxy_metric(name: str) -> float:
    return metric_samples(scrape(PROXY_METRICS)).get((name, frozenset()), 0.0)


def _from(vm: str, addr: str) -> socket.socket:
    sock = socket_in_netns(vm)
    sock.settimeout(10)
    sock.bind((addr, 0))
    sock.connect(("10.0.0.1", 9697))
    return sock


def test_a_source_the_agent_limited_is_answered_by_the_proxy_until_retry_after(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str],
) -> None:
    vm = router[1]
    svc = two_vms_behind_router(env, router, tarpit_delay=0.5)
    agent.limited["10.0.0.5"] = 3
    with _from(vm, "10.0.0.5") as sock:
        sock.sendall(request_bytes("/latest/meta-data/"))
        status, _, _ = read_responses(sock, 1)[0]
        learned = time.monotonic()
        assert status == 429 and len(agent.recorded) == 1  # the agent's own answer
        # From now on the proxy answers, for metadata and token PUTs alike, held 0.5 s.
        for method, path in (("GET", "/latest/meta-data/instance-id"),
                             ("PUT", "/latest/api/token")):
            t0 = time.monotonic()
            sock.sendall(request_bytes(path, method=method))
            status, head, body = read_responses(sock, 1)[0]
            took = time.monotonic() - t0
            fields = _fields(head)
            assert status == 429, (method, head)
            assert took >= 0.45, took  # the tarpit held it
            assert 1 <= int(fields["retry-after"]) <= 3
            assert fields["ratelimit-policy"] == '"burst";q=4;w=10, "base";q=100;w=60'
            assert fields["ratelimit"].startswith('"burst";r=0;t=')
            assert "connection" not in fields  # kept alive, as the agent's 429
            assert body.count(b"\n") == 1 and body.startswith(b"429 Too Many Requests: ")
            assert b"rate limit of 4 requests per 10 s" in body and b"; retry in " in body
        assert len(agent.recorded) == 1  # neither reached the agent
        # Another VM on the same listener is not affected.
        with _from(vm, "10.0.0.6") as other:
            other.sendall(request_bytes("/other"))
            assert read_responses(other, 1)[0][0] == 200
        assert headers_of(agent.recorded[-1], "X-Forwarded-For") == ["10.0.0.6"]
        # Once Retry-After has passed, the agent decides again (and now lets it pass).
        agent.limited.clear()
        time.sleep(max(0.0, learned + 3.05 - time.monotonic()))
        sock.sendall(request_bytes("/after"))
        assert read_responses(sock, 1)[0][0] == 200
    assert [seen["path"] for seen in agent.recorded] == [
        "/latest/meta-data/", "/other", "/after"]
    assert f"proxy.rate_limited ip=10.0.0.5 router={ROUTER_ID} retry_after=3" in svc.log()
    got = metric_samples(scrape(PROXY_METRICS))
    assert got[("openimds_rate_limited_total", frozenset({("hop", "proxy")}))] == 2
    assert _proxy_metric("openimds_proxy_rate_limited_episodes_total") == 1
    assert _proxy_metric("openimds_proxy_tarpit_delayed_total") == 2


def test_tarpit_bounds_held_answers_and_frees_them_with_their_connection(
    env: ProxyEnv, agent: RecordingAgent, router: tuple[str, str],
) -> None:
    vm = router[1]
    svc = two_vms_behind_router(env, router, max_connections_per_source=1, tarpit_delay=10,
                                tarpit_max_per_source=2, tarpit_max=3)
    socks: list[socket.socket] = []

    def over(addr: str) -> socket.socket:
        sock = _from(vm, addr)
        socks.append(sock)
        sock.sendall(request_bytes("/over"))
        return sock

    def answered_at_once(sock: socket.socket) -> None:
        status, _, body = read_responses(sock, 1)[0]
        assert status == 429 and b"at most 1" in body
        assert sock.recv(1) == b""  # and closed

    try:
        for addr in ("10.0.0.5", "10.0.0.6"):  # each address's one connection, in use
            sock = _from(vm, addr)
            socks.append(sock)
            sock.sendall(request_bytes("/in"))
            assert read_responses(sock, 1)[0][0] == 200
        held = [over("10.0.0.5"), over("10.0.0.5")]
        wait_for(lambda: _proxy_metric("openimds_proxy_tarpit_held") == 2)
        # Per source: 2 held, the next ones answered (429, close) at once.
        for _ in range(2):
            answered_at_once(over("10.0.0.5"))
        assert _proxy_metric("openimds_proxy_tarpit_overflow_total") == 2
        assert _proxy_metric("openimds_proxy_tarpit_held") == 2
        # In all: 3 held; 10.0.0.6 gets the last slot, its next one is answered at once.
        over("10.0.0.6")
        wait_for(lambda: _proxy_metric("openimds_proxy_tarpit_held") == 3)
        answered_at_once(over("10.0.0.6"))
        assert _proxy_metric("openimds_proxy_tarpit_overflow_total") == 3
        for sock in held:  # still held (10 s), nothing sent yet
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
        # A held answer goes with its connection: the slot is free at once.
        held[0].close()
        wait_for(lambda: _proxy_metric("openimds_proxy_tarpit_held") == 2)
        over("10.0.0.5")
        wait_for(lambda: _proxy_metric("openimds_proxy_tarpit_held") == 3)
        assert _proxy_metric("openimds_proxy_tarpit_delayed_total") == 4
        # Shutdown with answers held: the proxy stops cleanly, without waiting for them.
        assert svc.stop() == 0
    finally:
        for sock in socks:
            sock.close()
    assert [seen["path"] for seen in agent.recorded] == ["/in", "/in"]  # over cap: never
