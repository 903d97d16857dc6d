"""[metadata_rate_limiting] in the real agent process: 429 on a kept-alive connection, the
instance's two addresses sharing one budget, the operator's log line and counter."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.integration.agent_support import make_network, only, stack, wait_children


def ask(sock: socket.socket, router: str, ip: str, target: str = "/latest/meta-data/",
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request on an open connection; reads exactly one answer (Content-Length)."""
    sock.sendall(
        f"{method} {target} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: {ip}\r\n"
        f"X-Neutron-Router-ID: {router}\r\nContent-Length: 0\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before an answer"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-body"
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def test_rate_limited_instance_gets_429_and_keeps_its_connection(tmp_path: Path) -> None:
    # the burst window must hold the 5 requests that reach the limit on a loaded machine (2 s
    # did not always); the test sleeps Retry-After, at most the window
    rl = {"rate_limit_enabled": "true", "ip_versions": "4,6", "burst_query_rate_limit": 4,
          "burst_window_duration": 6, "base_query_rate_limit": 100,
          "base_window_duration": 60}
    with stack(tmp_path, metadata_rate_limiting=rl) as st:
        r = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.41.0.0/24", r["id"])
        sub6 = st.admin.create_subnet("n6", net["id"], "fd41::/64", gateway_ip=None)
        inst = st.admin.create_instance("vm1", net["id"], fixed_ip="10.41.0.10")
        other = st.admin.create_instance("vm2", net["id"], fixed_ip="10.41.0.11")
        # A second port of the same instance, on the IPv6 subnet.
        v6 = "fd41::10"
        st.admin.create("port", {"network_id": net["id"], "device_id": inst["id"],
                                 "device_owner": "compute:nova", "project_id":
                                 inst["project_id"], "fixed_ips": [
                                     {"subnet_id": sub6["id"], "ip_address": v6}]})
        st.start_agent()
        st.wait_feed(True)
        assert st.api is not None
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(st.socket)
            statuses = [ask(sock, r["id"], "10.41.0.10")[0] for _ in range(2)]
            statuses += [ask(sock, r["id"], v6)[0] for _ in range(2)]
            assert statuses == [200] * 4
            seen = len(st.api.seen)
            status, headers, body = ask(sock, r["id"], v6, "/latest/api/token", "PUT")
            assert status == 429
            assert int(headers["retry-after"]) >= 1
            assert headers["ratelimit-policy"] == '"burst";q=4;w=6, "base";q=100;w=60'
            assert headers["ratelimit"].startswith('"burst";r=0;t=')
            assert "connection" not in headers  # kept alive: never a dropped connection
            assert body.count(b"\n") == 1 and body.startswith(b"429 Too Many Requests: ")
            assert len(st.api.seen) == seen  # never reached the API
            # Someone else is not limited, on the same connection.
            assert ask(sock, r["id"], "10.41.0.11")[0] == 200
            # After Retry-After the instance passes again.
            time.sleep(int(headers["retry-after"]))
            assert ask(sock, r["id"], "10.41.0.10")[0] == 200
        assert st.stats()["rate_limited_429"] == 1
        assert st.agent is not None
        log = st.agent.log()
        assert f"agent.rate_limited ip={v6} router={r['id']} instance={inst['id']}" in log
        assert other["id"] not in log.split("agent.rate_limited", 1)[1].splitlines()[0]


def test_agent_workers_share_one_budget(tmp_path: Path) -> None:
    rl = {"rate_limit_enabled": "true", "burst_query_rate_limit": 4,
          "burst_window_duration": 30, "base_query_rate_limit": 100,
          "base_window_duration": 60}
    with stack(tmp_path, metadata_rate_limiting=rl, DEFAULT={"metadata_workers": 3}) as st:
        r = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.42.0.0/24", r["id"])
        st.admin.create_instance("vm1", net["id"], fixed_ip="10.42.0.10")
        agent = st.start_agent()
        st.wait_feed(True)
        workers = wait_children(agent.pid, 3)

        def via(worker: int) -> int:
            """One request on a new connection, accepted by `worker` (the others frozen:
            which worker accepts is the kernel's choice, and on a loaded machine one took
            every connection in a row)."""
            with only(st, worker), socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(30)
                sock.connect(st.socket)
                assert int(st.stats()["pid"]) == worker
                return ask(sock, r["id"], "10.42.0.10")[0]

        a, b, c = workers
        statuses = [via(w) for w in (a, a, b, b, c, a, b, c)]
        # Exactly the burst passes over all the workers: c, which let nothing through, is
        # refused at once, and a and b after the other's passes (one table for all)
        assert statuses == [200] * 4 + [429] * 4, statuses
