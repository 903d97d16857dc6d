"""The agent process over its real Unix socket, against the real registry and a recording API:
the lookup matrix, header stripping, status pass-through, framing, socket mode and backlog."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from openimds.core.signing import sign_instance_id
from tests.integration.agent_support import (
    Stack,
    make_network,
    stack,
    unix_request,
    via_network,
    via_router,
)
from tests.support import openimds_service


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Two routers, each with its own network on the SAME cidr (overlapping IPs), one
    instance at 10.0.0.10 on each; a third router whose two networks both hold 10.5.0.20."""
    tmp = tmp_path_factory.mktemp("agent-lookup")
    with stack(tmp, metadata_agent={"cache_size": 1000}) as st:
        a = st.admin
        ra, rb, rc = (a.create_router(n) for n in ("ra", "rb", "rc"))
        na, _ = make_network(a, "na", "10.0.0.0/24", ra["id"])
        nb, _ = make_network(a, "nb", "10.0.0.0/24", rb["id"])
        ia = a.create_instance("vm-a", na["id"], fixed_ip="10.0.0.10", project_id="proj-a")
        ib = a.create_instance("vm-b", nb["id"], fixed_ip="10.0.0.10", project_id="proj-b")
        # two ports for one (router, ip): the router's networks each hold 10.5.0.20
        nc1, _ = make_network(a, "nc1", "10.5.0.0/24", rc["id"])
        nc2, _ = make_network(a, "nc2", "10.6.0.0/24", rc["id"])
        a.create_subnet("nc2-b", nc2["id"], "10.5.0.0/24")
        ic1 = a.create_instance("vm-c1", nc1["id"], fixed_ip="10.5.0.20")
        ic2 = a.create_instance("vm-c2", nc2["id"], fixed_ip="10.5.0.20")
        st.start_agent()
        yield {"st": st, "ra": ra, "rb": rb, "rc": rc, "na": na, "nb": nb,
               "ia": ia, "ib": ib, "ic1": ic1, "ic2": ic2}


def _seen(st: Stack) -> dict[str, list[str]]:
    assert st.api is not None
    return st.api.last_headers()


@pytest.mark.parametrize("scope,which", [("router", "a"), ("router", "b"),
                                         ("network", "a"), ("network", "b")])
def test_overlapping_ips_resolve_by_router_or_network(world: Any, scope: str, which: str) -> None:
    st: Stack = world["st"]
    inst = world["i" + which]
    hdrs = (via_router(world["r" + which]["id"], "10.0.0.10") if scope == "router"
            else via_network(world["n" + which]["id"], "10.0.0.10"))
    ans = unix_request(st.socket, headers=hdrs)
    assert ans.status == 200, ans.body
    seen = _seen(st)
    assert seen["x-instance-id"] == [inst["id"]]
    assert seen["x-tenant-id"] == [inst["project_id"]]
    assert seen["x-forwarded-for"] == ["10.0.0.10"]
    assert seen["x-instance-id-signature"] == [sign_instance_id(st.secret.encode(), inst["id"])]


def test_ipv4_mapped_form_is_normalised(world: Any) -> None:
    st: Stack = world["st"]
    ans = unix_request(st.socket, headers=via_router(world["ra"]["id"], "::ffff:10.0.0.10"))
    assert ans.status == 200
    seen = _seen(st)
    assert seen["x-forwarded-for"] == ["10.0.0.10"]
    assert seen["x-instance-id"] == [world["ia"]["id"]]


def test_zero_ports_is_404_and_logged(world: Any) -> None:
    st: Stack = world["st"]
    rid = world["ra"]["id"]
    ans = unix_request(st.socket, headers=via_router(rid, "10.0.0.99"))
    assert ans.status == 404 and b"instance not found" in ans.body
    assert st.agent is not None
    log = st.agent.log()
    assert "WARNING" in log and "10.0.0.99" in log and rid in log


def test_two_ports_is_404_and_names_them(world: Any) -> None:
    st: Stack = world["st"]
    ans = unix_request(st.socket, headers=via_router(world["rc"]["id"], "10.5.0.20"))
    assert ans.status == 404 and b"instance not found" in ans.body
    assert st.agent is not None
    log = st.agent.log()
    for inst in (world["ic1"], world["ic2"]):
        assert inst["ports"][0]["id"] in log


@pytest.mark.parametrize("headers", [
    [("X-Forwarded-For", "10.0.0.10"), ("X-Neutron-Router-ID", "r"),
     ("X-Neutron-Network-ID", "n")],
    [("X-Forwarded-For", "10.0.0.10")],
    [("X-Forwarded-For", "not-an-ip"), ("X-Neutron-Router-ID", "r")],
    [("X-Neutron-Router-ID", "r")],
])
def test_bad_proxy_headers_are_400_with_a_body(world: Any, headers: list[tuple[str, str]]) -> None:
    st: Stack = world["st"]
    ans = unix_request(st.socket, headers=headers)
    assert ans.status == 400
    assert ans.body.startswith(b"400 ") and ans.body.count(b"\n") == 1


def test_spoofed_headers_never_reach_the_api(world: Any) -> None:
    st: Stack = world["st"]
    victim = world["ib"]
    hdrs = [("Host", "169.254.169.254"),
            ("X-Forwarded-For", "10.0.0.77"),  # what a VM sent before our proxy's value
            ("X-Instance-ID", victim["id"]), ("X-Tenant-ID", victim["project_id"]),
            ("X-Instance-ID-Signature", "0" * 64), ("X-Forwarded-Host", "evil"),
            ("Connection", "keep-alive, X-Private-Hop"), ("X-Private-Hop", "1"),
            ("User-Agent", "cloud-init/24"),
            ("X-Forwarded-For", "10.0.0.10"), ("X-Neutron-Router-ID", world["ra"]["id"])]
    ans = unix_request(st.socket, headers=hdrs)
    assert ans.status == 200
    seen = _seen(st)
    assert seen["x-instance-id"] == [world["ia"]["id"]]
    assert seen["x-tenant-id"] == [world["ia"]["project_id"]]
    assert seen["x-forwarded-for"] == ["10.0.0.10"]
    assert len(seen["x-instance-id-signature"]) == 1
    assert seen["x-instance-id-signature"] != ["0" * 64]
    assert seen["user-agent"] == ["cloud-init/24"]
    for gone in ("x-forwarded-host", "x-private-hop", "x-neutron-router-id"):
        assert gone not in seen


@pytest.mark.parametrize("code", [401, 403, 404, 405, 409, 429, 500, 503])
def test_every_api_status_is_passed_through(world: Any, code: int) -> None:
    st: Stack = world["st"]
    assert st.api is not None
    st.api.mode, st.api.status = "status", code
    try:
        ans = unix_request(st.socket, headers=via_router(world["ra"]["id"], "10.0.0.10"))
    finally:
        st.api.mode = "echo"
    assert ans.status == code
    assert ans.body == f"api says {code}\n".encode()
    if code == 429:
        assert ans.headers["retry-after"] == "7"


def test_large_post_body_is_read_whole(world: Any) -> None:
    st: Stack = world["st"]
    body = b"x" * 20000  # Neutron reads one recv(4096)
    ans = unix_request(st.socket, "/openstack/2013-04-04/password", method="POST",
                       headers=via_router(world["ra"]["id"], "10.0.0.10"), body=body)
    assert ans.status == 200
    record = ans.json()
    assert record["method"] == "POST" and len(record["body"]) == 20000


def test_keep_alive_and_pipelining(world: Any) -> None:
    st: Stack = world["st"]
    rid = world["ra"]["id"]
    one = (f"GET /p{{}} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: 10.0.0.10\r\n"
           f"X-Neutron-Router-ID: {rid}\r\n\r\n")
    data = "".join(one.format(i) for i in range(3)).encode()
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(st.socket)
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + 30
        while got.count(b'"path": "/p') < 3 and time.monotonic() < deadline:
            got += s.recv(65536)
        # same connection still usable afterwards
        s.sendall(one.format(9).encode())
        more = s.recv(65536)
    assert got.count(b"HTTP/1.1 200") == 3
    assert got.index(b"/p0") < got.index(b"/p1") < got.index(b"/p2")
    assert b"/p9" in more


def test_one_access_line_per_request(world: Any) -> None:
    st: Stack = world["st"]
    assert st.agent is not None
    marker = "/access-marker-x1"
    unix_request(st.socket, marker, headers=via_router(world["ra"]["id"], "10.0.0.10"))
    time.sleep(0.2)
    lines = [ln for ln in st.agent.log().splitlines() if marker in ln]
    assert len(lines) == 1
    line = lines[0]
    assert "openimds.access" in line and "ip=10.0.0.10" in line
    assert f"router={world['ra']['id']}" in line and f"instance={world['ia']['id']}" in line
    assert "status=200" in line and "ms=" in line


def test_cache_spares_the_registry(world: Any) -> None:
    st: Stack = world["st"]
    st.wait_feed(True)
    hdrs = via_network(world["na"]["id"], "10.0.0.10")
    unix_request(st.socket, headers=hdrs)
    before = st.stats()["registry_queries"]
    for _ in range(20):
        assert unix_request(st.socket, headers=hdrs).status == 200
    assert st.stats()["registry_queries"] == before


def _backlog(path: str) -> int:
    out = subprocess.run(["ss", "-xlnH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if path in line:
            return int(line.split()[3])  # Netid State Recv-Q Send-Q ...: Send-Q = backlog
    raise AssertionError(f"{path} not listening:\n{out}")


def test_socket_mode_backlog_directory_and_stale_socket(tmp_path: Path) -> None:
    sock_path = tmp_path / "deep" / "run" / "agent.sock"
    with stack(tmp_path, DEFAULT={"metadata_proxy_socket": str(sock_path),
                                  "metadata_backlog": 123,
                                  "metadata_proxy_socket_mode": "all"}) as st:
        # a stale socket left by a dead agent, in a directory that exists
        sock_path.parent.mkdir(parents=True)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(sock_path))
        stale.close()
        st.start_agent()
        mode = stat.S_IMODE(os.stat(sock_path).st_mode)
        assert mode == 0o666
        assert _backlog(str(sock_path)) == 123
        # a second agent refuses to steal a live socket
        second = openimds_service("agent2", st.config, "agent", log_dir=tmp_path).start()
        assert second.proc is not None
        assert second.proc.wait(20) == 1
        assert "another process is serving" in second.log()
        assert unix_request(st.socket, "/openimds-agent/stats").status == 200


def test_socket_mode_deduce_is_user_for_root(tmp_path: Path) -> None:
    sock_path = tmp_path / "new-dir" / "agent.sock"
    with stack(tmp_path, DEFAULT={"metadata_proxy_socket": str(sock_path)}) as st:
        st.start_agent()
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o644
        assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o755
        assert st.agent is not None
        st.agent.stop()
        assert not sock_path.exists()  # removed on a clean stop
