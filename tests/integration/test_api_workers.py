"""The API's workers each on an address of their own (`<[api] unix_socket>.w<N>`, `[api]
worker_port_base` + N) and the agent's pool spread over them (`nova_metadata_socket`'s worker
sockets, `nova_metadata_worker_ports`): the real agent process against stand-in API workers
that hold or answer, and the real API's workers on their own addresses."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from openimds.config import worker_socket, worker_sockets
from tests.integration.agent_support import (
    children,
    make_network,
    stack,
    unix_request,
    via_network,
    wait_children,
)
from tests.integration.test_api_unix_socket import holds, signed, socket_inode
from tests.support import free_port, http_ready, openimds_service, tcp_ready, unix_ready

META = "/openstack/latest/meta_data.json"


class _Handler(BaseHTTPRequestHandler):
    """Records the path, sets `arrived`, answers once `gate` is open."""

    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.paths.append(self.path)
        srv.arrived.set()
        assert srv.gate.wait(30)
        body = json.dumps({"path": self.path, "at": srv.name}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Stub:
    """Stand-in for one API worker's listener (or the address they all share)."""

    daemon_threads = True
    request_queue_size = 1024

    def setup_stub(self, name: str) -> None:
        self.name = name
        self.paths: list[str] = []
        self.lock = threading.Lock()
        self.arrived = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        threading.Thread(target=self.serve_forever, daemon=True).start()  # type: ignore[attr-defined]

    def stop(self) -> None:
        self.gate.set()
        self.shutdown()  # type: ignore[attr-defined]
        self.server_close()  # type: ignore[attr-defined]


class UnixStub(_Stub, socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    def __init__(self, path: str, name: str) -> None:
        socketserver.UnixStreamServer.__init__(self, path, _Handler)
        self.setup_stub(name)


class TcpStub(_Stub, ThreadingHTTPServer):
    def __init__(self, port: int, name: str) -> None:
        ThreadingHTTPServer.__init__(self, ("127.0.0.1", port), _Handler)
        self.setup_stub(name)


def two_free_ports() -> int:
    """A port whose next one is free too (API workers' ports are consecutive)."""
    for _ in range(100):
        port = free_port()
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no two consecutive free ports")


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_request_held_on_worker_0_sends_the_next_to_worker_1(tmp_path: Path,
                                                                 kind: str) -> None:
    """The real agent's pool: its first connection goes to worker 0's own address; while a
    request is held there, the next opens the second connection on worker 1's, not on the
    shared address (where the kernel could give it to worker 0 again); kept connections
    stay off it too. Fails with the spread off: nothing ever reaches worker 0's address."""
    shared_port, base = free_port(), two_free_ports()
    sock = str(tmp_path / "run" / "api.sock")
    agent_opts: dict[str, Any] = (
        {"nova_metadata_socket": sock} if kind == "unix" else
        {"nova_metadata_worker_ports": f"{base}-{base + 1}"})
    stubs: list[_Stub] = []
    with stack(tmp_path, recording_api=False,
               DEFAULT={"nova_metadata_port": shared_port, **agent_opts},
               metadata_agent={"upstream_timeout": 30.0}) as st:
        try:
            if kind == "unix":
                os.makedirs(os.path.dirname(sock), exist_ok=True)
                shared, w0, w1 = (UnixStub(sock, "shared"),
                                  UnixStub(worker_socket(sock, 0), "w0"),
                                  UnixStub(worker_socket(sock, 1), "w1"))
            else:
                shared, w0, w1 = (TcpStub(shared_port, "shared"), TcpStub(base, "w0"),
                                  TcpStub(base + 1, "w1"))
            stubs += [shared, w0, w1]
            net, _ = make_network(st.admin, "h", "10.45.0.0/24")
            inst = st.admin.create_instance("h-1", net["id"])
            headers = via_network(net["id"], inst["ports"][0]["fixed_ips"][0]["ip_address"])
            st.start_agent()
            w0.gate.clear()
            held: list[Any] = []
            first = threading.Thread(target=lambda: held.append(
                unix_request(st.socket, META, headers=headers, timeout=40)))
            first.start()
            try:
                assert w0.arrived.wait(15), (shared.paths, w1.paths)
                ans = unix_request(st.socket, "/second", headers=headers)
                assert ans.status == 200 and ans.json() == {"path": "/second", "at": "w1"}
            finally:
                w0.gate.set()
                first.join(40)
            assert held[0].status == 200 and held[0].json()["at"] == "w0"
            for _ in range(10):  # kept connections, one per worker
                assert unix_request(st.socket, META, headers=headers).status == 200
            assert shared.paths == [], shared.paths
            assert len(w0.paths) + len(w1.paths) == 12 and w1.paths[0] == "/second"
        finally:
            for stub in stubs:
                stub.stop()


def tcp_listener_inode(port: int) -> int:
    """The inode of the socket listening on 127.0.0.1:`port` (/proc/net/tcp, state 0A)."""
    want = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == want and fields[3] == "0A":
            return int(fields[9])
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


@pytest.fixture
def api_workers(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The real API, 2 workers, on TCP, its Unix socket and worker ports; the agent on
    TCP with nova_metadata_worker_ports."""
    base = two_free_ports()
    sock = tmp_path / "run" / "api.sock"
    with stack(tmp_path, recording_api=False,
               DEFAULT={"nova_metadata_worker_ports": f"{base}-{base + 1}"},
               api={"workers": 2, "unix_socket": str(sock), "worker_port_base": base}) as st:
        api = openimds_service("api", st.config, "api", log_dir=tmp_path)
        st.services.append(api)
        port = st.cfg["api"]["metadata_listen_port"]
        api.start().wait_until(http_ready(f"http://127.0.0.1:{port}/"))
        wait_children(api.pid, 2)
        yield {"st": st, "api": api, "sock": str(sock), "base": base}


def own_addresses_ready(sock: str, base: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            for index in (0, 1):
                assert unix_ready(worker_socket(sock, index))()
                assert tcp_ready("127.0.0.1", base + index)()
            return
        except OSError:
            assert time.monotonic() < deadline, "a worker's own address never answered"
            time.sleep(0.05)


def test_each_api_worker_listens_on_its_own_socket_and_port(api_workers: dict[str, Any],
                                                            ) -> None:
    """Worker N holds `<unix_socket>.w<N>` and worker_port_base + N (one worker each, the
    two different), answers signed requests there, is replaced on them after a SIGKILL,
    and a clean stop leaves no worker socket; the agent reaches the API over the ports."""
    st, api, sock, base = (api_workers[k] for k in ("st", "api", "sock", "base"))
    own_addresses_ready(sock, base)
    assert worker_sockets(sock) == [worker_socket(sock, 0), worker_socket(sock, 1)]
    assert oct(os.stat(worker_socket(sock, 0)).st_mode & 0o777) == "0o644"

    def holders() -> list[int]:
        kids = children(api.pid)
        out = []
        for index in (0, 1):
            unix_inode = socket_inode(Path(worker_socket(sock, index)))
            tcp_inode = tcp_listener_inode(base + index)
            pid = [p for p in kids if holds(p, unix_inode)]
            assert len(pid) == 1 and holds(pid[0], tcp_inode), (index, kids, pid)
            out.append(pid[0])
        return out

    first = holders()
    assert sorted(first) == sorted(children(api.pid))
    net, _ = make_network(st.admin, "o", "10.46.0.0/24")
    inst = st.admin.create_instance("o-1", net["id"])
    ip = inst["ports"][0]["fixed_ips"][0]["ip_address"]
    for address in (worker_socket(sock, 0), worker_socket(sock, 1)):
        ans = unix_request(address, META, headers=signed(st, inst, ip))
        assert ans.status == 200 and ans.json()["uuid"] == inst["id"], ans.body
    st.start_agent()
    for _ in range(20):  # through the agent's pool, spread over the worker ports
        ans = unix_request(st.socket, META, headers=via_network(net["id"], ip))
        assert ans.status == 200 and ans.json()["uuid"] == inst["id"], ans.body
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while len(kids := children(api.pid)) != 2 or first[0] in kids:
        assert time.monotonic() < deadline, kids
        time.sleep(0.05)
    own_addresses_ready(sock, base)
    again = holders()
    assert again[1] == first[1] and again[0] not in first, (first, again)
    for _ in range(10):  # the agent's connections to the dead worker were made again
        assert unix_request(st.socket, META, headers=via_network(net["id"], ip)).status == 200
    assert api.stop() == 0
    assert not Path(sock).exists() and worker_sockets(sock) == []
