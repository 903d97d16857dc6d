"""Helpers for the agent's integration tests: a recording API, a Unix-socket HTTP client, and
the registry + agent processes started through the operator's CLI."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from openimds.registry.client import RegistryClient
from tests.support import (
    Service,
    base_config,
    http_ready,
    openimds_service,
    unix_ready,
    write_config,
)


class RecordingApi:
    """A real HTTP server standing in for the metadata API: records every request's headers.

    mode: "echo" (200 + JSON of what it got), "status" (answers `status` with a body),
    "hang" (answers after `hang_s`), "garbled" (writes junk and closes).
    """

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.host, self.port = host, port
        self.ssl_context = ssl_context
        self.mode = "echo"
        self.status = 200
        self.hang_s = 10.0
        self.seen: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._running = threading.Event()  # cleared: frozen, see `frozen()`
        self._running.set()

    def start(self) -> RecordingApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _any(self) -> None:
                api._running.wait()
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                record = {"method": self.command, "path": self.path,
                          "headers": [[k, v] for k, v in self.headers.items()],
                          "body": body.decode("latin-1")}
                if isinstance(self.connection, ssl.SSLSocket):
                    record["peer_cert"] = self.connection.getpeercert()
                with api._lock:
                    api.seen.append(record)
                if api.mode == "garbled":
                    self.wfile.write(b"this is not HTTP at all\r\n\r\n")
                    self.close_connection = True
                    return
                if api.mode == "hang":
                    time.sleep(api.hang_s)
                status = api.status if api.mode == "status" else 200
                out = json.dumps(record).encode() if api.mode != "status" else (
                    f"api says {status}\n".encode())
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                if status == 429:
                    self.send_header("Retry-After", "7")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(out)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _any

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            # the real API listens with a backlog of 4096 (http.server.bind_tcp); socketserver's
            # 5 overflowed when the agent opened its pool in a storm on a busy machine: a
            # dropped SYN is sent again only after 1 s, then 3 s, past a 2 s connect timeout
            request_queue_size = 4096

            def process_request(self, request: Any, client_address: Any) -> None:
                api._running.wait()  # frozen: accept no more; the kernel queues them
                with api._lock:
                    api._conns.add(request)
                super().process_request(request, client_address)

        self._server = Server((self.host, self.port), Handler)
        if self.ssl_context is not None:
            self._server.socket = self.ssl_context.wrap_socket(
                self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            # like a dead process: every kept-alive connection goes too
            with self._lock:
                conns, self._conns = list(self._conns), set()
            for conn in conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def listen_queue(self) -> int:
        """Connections waiting in the listen backlog, not yet accepted: for a listening
        socket Linux reports its accept queue's length as tcp_info's tcpi_unacked."""
        assert self._server is not None
        info = self._server.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        return int(struct.unpack_from("I", info, 24)[0])  # after 8 u8 fields and 4 u32s

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Accept nothing and answer nothing until the block ends, as an API process stopped
        by SIGSTOP (or starved of CPU) would; connections wait in the listen backlog."""
        self._running.clear()
        try:
            yield
        finally:
            self._running.set()

    def last_record(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.seen[-1])

    def last_headers(self) -> dict[str, list[str]]:
        with self._lock:
            record = self.seen[-1]
        out: dict[str, list[str]] = {}
        for k, v in record["headers"]:
            out.setdefault(k.lower(), []).append(v)
        return out


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def unix_request(
    path: str | Path, target: str = "/openstack/latest/meta_data.json", *,
    method: str = "GET", headers: list[tuple[str, str]] | Mapping[str, str] | None = None,
    body: bytes | None = None, timeout: float = 10.0,
) -> Answer:
    """One request over the agent's Unix socket, headers exactly as given (like the proxy)."""
    conn = _UnixConnection(str(path), timeout)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        items = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
        for name, value in items:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
    finally:
        conn.close()


def via_router(router_id: str, ip: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Host", "169.254.169.254"), ("X-Forwarded-For", ip),
            ("X-Neutron-Router-ID", router_id), *extra]


def via_network(network_id: str, ip: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [("Host", "169.254.169.254"), ("X-Forwarded-For", ip),
            ("X-Neutron-Network-ID", network_id), *extra]


@dataclass
class Stack:
    """Registry + agent (+ a recording API or the real one) from one config."""

    tmp: Path
    config: Path
    cfg: dict[str, dict[str, Any]]
    registry: Service
    agent: Service | None = None
    api: RecordingApi | None = None
    services: list[Service] = field(default_factory=list)
    _admin: RegistryClient | None = None

    @property
    def socket(self) -> str:
        return str(self.cfg["DEFAULT"]["metadata_proxy_socket"])

    @property
    def secret(self) -> str:
        return str(self.cfg["DEFAULT"]["metadata_proxy_shared_secret"])

    @property
    def registry_url(self) -> str:
        reg = self.cfg["registry"]
        return f"http://{reg['bind_host']}:{reg['bind_port']}"

    @property
    def admin(self) -> RegistryClient:
        if self._admin is None:
            self._admin = RegistryClient(self.registry_url, self.cfg["registry"]["admin_token"])
        return self._admin

    def start_agent(self) -> Service:
        self.agent = openimds_service("agent", self.config, "agent", log_dir=self.tmp)
        self.agent.start().wait_until(unix_ready(self.socket))
        self.services.append(self.agent)
        return self.agent

    def stats(self) -> dict[str, Any]:
        return unix_request(self.socket, "/openimds-agent/stats").json()  # type: ignore[no-any-return]

    def wait_feed_caught_up(self, timeout: float = 30.0) -> None:
        """Until the agent's feed applied everything the registry has written so far."""
        want = int(self.admin.health()["revision"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.stats()
            if s["feed_live"] and s["feed_revision"] >= want:
                return
            time.sleep(0.02)
        raise AssertionError(f"agent feed never reached revision {want}")

    def wait_feed(self, live: bool, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stats()["feed_live"] is live:
                return
            time.sleep(0.02)
        raise AssertionError(f"agent feed_live never became {live}")

    def restart_registry(self) -> None:
        self.registry = openimds_service("registry2", self.config, "registry", "serve",
                                         log_dir=self.tmp)
        self.registry.start().wait_until(http_ready(self.registry_url + "/v1/health"))
        self.services.append(self.registry)


def children(pid: int) -> list[int]:
    """pid's child processes (an agent's or an API's workers)."""
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def wait_children(pid: int, count: int, timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = children(pid)
        if len(kids) == count:
            return kids
        time.sleep(0.05)
    raise AssertionError(f"{pid} has children {children(pid)}, wanted {count}")


@contextlib.contextmanager
def only(st: Stack, worker: int) -> Iterator[None]:
    """Freeze every other worker, so the shared socket's next accept is `worker`'s. (Which
    worker wins an accept on a quiet socket is the kernel's choice: on a loaded CI machine
    one worker took 100 sequential connections in a row.)"""
    assert st.agent is not None
    others = [pid for pid in children(st.agent.pid) if pid != worker]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


@contextlib.contextmanager
def stack(tmp: Path, *, recording_api: bool = True,
          **overrides: Mapping[str, Any]) -> Iterator[Stack]:
    """Start the registry (and a recording API); the test starts the agent when ready."""
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    defaults: dict[str, dict[str, Any]] = {
        "DEFAULT": {"metadata_proxy_socket": str(tmp / "run" / "agent.sock")},
        "metadata_agent": {"upstream_timeout": 2.0, "registry_timeout": 2.0},
    }
    for section, values in overrides.items():
        defaults.setdefault(section, {}).update(values)
    cfg = base_config(state, **defaults)
    config = write_config(tmp / "openimds.ini", cfg)
    registry = openimds_service("registry", config, "registry", "serve", log_dir=tmp)
    st = Stack(tmp=tmp, config=config, cfg=cfg, registry=registry, services=[registry])
    try:
        registry.start().wait_until(http_ready(st.registry_url + "/v1/health"))
        if recording_api:
            st.api = RecordingApi("127.0.0.1", int(cfg["DEFAULT"]["nova_metadata_port"])).start()
        yield st
    finally:
        if st.api is not None:
            st.api.stop()
        for svc in reversed(st.services):
            if svc.name.startswith("registry"):
                # not under test here; its SIGTERM waits ~10 s on an open long-poll
                svc.kill()
            else:
                svc.stop()
        if st._admin is not None:
            st._admin.close()


def make_network(admin: RegistryClient, name: str, cidr: str,
                 router_id: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    net = admin.create_network(name)
    sub = admin.create_subnet(name + "-sub", net["id"], cidr)
    if router_id is not None:
        admin.add_interface(router_id, sub["id"])
    return net, sub
