"""`[api] unix_socket` and the agent's `nova_metadata_socket`: the real agent reaches the real
API over a Unix socket (its TCP port leads nowhere, so the socket is the only way), the
signature is checked there as on TCP, the TCP listener stays; a stale socket file is replaced
on restart, a live one is not; a bad path fails naming the value; workers share one socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openimds.core.signing import sign_instance_id
from tests.integration.agent_support import (
    Stack,
    children,
    make_network,
    stack,
    unix_request,
    via_network,
    wait_children,
)
from tests.support import (
    base_config,
    free_port,
    http_ready,
    openimds_service,
    run_cli,
    unix_ready,
    write_config,
)

META = "/openstack/latest/meta_data.json"


def socket_inode(path: Path) -> int:
    """The kernel's inode of the socket listening at `path` (/proc/net/unix), not the
    file's. Accepted and queued connections show the listener's path too: only the entry
    with __SO_ACCEPTCON (0x10000) in its flags is the listener."""
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == str(path) and int(fields[3], 16) & 0x10000:
            return int(fields[6])
    raise AssertionError(f"nothing bound at {path}")


def holds(pid: int, inode: int) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    return any(os.readlink(fd) == f"socket:[{inode}]" for fd in fds.iterdir())


def signed(st: Stack, inst: dict[str, Any], ip: str) -> list[tuple[str, str]]:
    """What the agent sends the API for this instance."""
    return [("X-Forwarded-For", ip), ("X-Instance-ID", inst["id"]),
            ("X-Tenant-ID", inst["project_id"]),
            ("X-Instance-ID-Signature", sign_instance_id(st.secret.encode(), inst["id"]))]


def api_stack(tmp: Path, **api: Any) -> Any:
    """Registry + the real API on TCP and on run/api.sock; the agent's TCP port is one
    nothing listens on, so only the socket reaches the API."""
    sock = tmp / "run" / "api.sock"
    return stack(tmp, recording_api=False,
                 DEFAULT={"nova_metadata_socket": str(sock), "nova_metadata_port": free_port()},
                 api={"unix_socket": str(sock), **api}), sock


def start_api(st: Stack, name: str = "api") -> Any:
    api = openimds_service(name, st.config, "api", log_dir=st.tmp)
    st.services.append(api)
    port = st.cfg["api"]["metadata_listen_port"]
    api.start().wait_until(http_ready(f"http://127.0.0.1:{port}/"))
    api.wait_until(unix_ready(st.cfg["api"]["unix_socket"]))
    return api


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[dict[str, Any]]:
    ctx, sock = api_stack(tmp_path)
    with ctx as st:
        api = start_api(st)
        st.start_agent()
        net, _ = make_network(st.admin, "u", "10.41.0.0/24")
        insts = [st.admin.create_instance(f"u-{i}", net["id"], metadata={"n": str(i)})
                 for i in range(2)]
        yield {"st": st, "api": api, "sock": sock, "net": net, "insts": insts}


def test_the_agent_reaches_the_api_over_its_socket(chain: dict[str, Any]) -> None:
    st: Stack = chain["st"]
    for inst in chain["insts"]:
        ip = inst["ports"][0]["fixed_ips"][0]["ip_address"]
        ans = unix_request(st.socket, META, headers=via_network(chain["net"]["id"], ip))
        assert ans.status == 200, ans.body
        md = json.loads(ans.body)
        assert md["uuid"] == inst["id"] and md["meta"]["n"] == inst["name"][-1]
    assert os.stat(chain["sock"]).st_mode & 0o777 == 0o644  # unix_socket_mode = user
    # the TCP listener stays
    port = st.cfg["api"]["metadata_listen_port"]
    assert http_ready(f"http://127.0.0.1:{port}/")()


def test_the_socket_is_no_trust_shortcut(chain: dict[str, Any]) -> None:
    st: Stack = chain["st"]
    inst, other = chain["insts"]
    ip = inst["ports"][0]["fixed_ips"][0]["ip_address"]
    good = signed(st, inst, ip)
    ans = unix_request(chain["sock"], META, headers=good)
    assert ans.status == 200 and ans.json()["uuid"] == inst["id"]
    # another instance's id under this one's signature
    forged = [(k, other["id"] if k == "X-Instance-ID" else v) for k, v in good]
    ans = unix_request(chain["sock"], META, headers=forged)
    assert ans.status == 403 and b"Invalid proxy request signature" in ans.body
    ans = unix_request(chain["sock"], META, headers=[("X-Forwarded-For", ip)])
    assert ans.status == 400 and b"X-Instance-ID header is missing" in ans.body


def test_stop_removes_the_socket_file_and_doctor_checks_the_socket(
    chain: dict[str, Any],
) -> None:
    st: Stack = chain["st"]

    def api_check() -> dict[str, Any]:
        out = run_cli(st.config, "doctor", "-f", "json", timeout=120).stdout
        return next(c for c in json.loads(out)["checks"] if c["name"] == "api")

    # the agent's way to the API: the socket (its TCP port leads nowhere in this stack)
    check = api_check()
    assert check["status"] == "ok" and f"unix:{chain['sock']}/ answers" in check["detail"], check
    assert chain["api"].stop() == 0
    assert not chain["sock"].exists()
    check = api_check()
    assert check["status"] != "ok" and f"unix:{chain['sock']}" in check["detail"], check


def test_a_stale_socket_is_replaced_a_live_one_is_not(tmp_path: Path) -> None:
    ctx, sock = api_stack(tmp_path)
    with ctx as st:
        sock.parent.mkdir(parents=True)
        with socket.socket(socket.AF_UNIX) as dead:  # a server killed before it cleaned up
            dead.bind(str(sock))
        api = start_api(st)
        bound = socket_inode(sock)  # the kernel's (a file's inode number can be reused)
        assert holds(api.pid, bound)
        # a second API (its own port) must not take the socket from the live one
        second = base_config(tmp_path / "state", api={"unix_socket": str(sock)})
        second["DEFAULT"]["metadata_proxy_shared_secret"] = st.secret
        second["registry"] = st.cfg["registry"]
        proc = run_cli(write_config(tmp_path / "second.ini", second), "api", timeout=60)
        assert proc.returncode != 0
        assert f"[api] unix_socket {sock}: another process is serving on it" in proc.stderr
        assert socket_inode(sock) == bound and unix_ready(sock)()
        st.start_agent()
        net, _ = make_network(st.admin, "s", "10.42.0.0/24")
        inst = st.admin.create_instance("s-1", net["id"])
        headers = via_network(net["id"], inst["ports"][0]["fixed_ips"][0]["ip_address"])
        ans = unix_request(st.socket, META, headers=headers)  # the agent's pool is open
        assert ans.status == 200 and ans.json()["uuid"] == inst["id"]
        # killed: the file stays behind, and the next start replaces it
        api.kill()
        assert sock.exists()
        again = start_api(st, "api2")
        assert socket_inode(sock) != bound and holds(again.pid, socket_inode(sock))
        # the running agent reconnects through the new socket (its old connection died)
        ans = unix_request(st.socket, META, headers=headers)
        assert ans.status == 200 and ans.json()["uuid"] == inst["id"]


@pytest.mark.parametrize("what", ["a regular file", "under a regular file"])
def test_a_bad_path_names_the_value(tmp_path: Path, what: str) -> None:
    (tmp_path / "state").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = blocker if what == "a regular file" else blocker / "api.sock"
    cfg = base_config(tmp_path / "state", api={"unix_socket": str(path)})
    proc = run_cli(write_config(tmp_path / "o.ini", cfg), "api", timeout=60)
    assert proc.returncode != 0
    line = proc.stderr.strip().splitlines()[-1]
    assert f"[api] unix_socket {path}" in line, proc.stderr
    assert ("exists and is not a socket" if what == "a regular file"
            else "cannot create its directory") in line


def test_workers_share_one_socket(tmp_path: Path) -> None:
    ctx, sock = api_stack(tmp_path, workers=2, unix_socket_mode="group")
    with ctx as st:
        api = start_api(st)
        workers = wait_children(api.pid, 2)
        assert os.stat(sock).st_mode & 0o777 == 0o664
        net, _ = make_network(st.admin, "w", "10.43.0.0/24")
        inst = st.admin.create_instance("w-1", net["id"])
        ip = inst["ports"][0]["fixed_ips"][0]["ip_address"]
        inode = socket_inode(sock)

        def answered_by(worker: int) -> None:
            """Only `worker` runs, so it is the one that accepts on the shared socket."""
            others = [pid for pid in children(api.pid) if pid != worker]
            for pid in others:
                os.kill(pid, signal.SIGSTOP)
            try:
                ans = unix_request(sock, META, headers=signed(st, inst, ip))
            finally:
                for pid in others:
                    os.kill(pid, signal.SIGCONT)
            assert ans.status == 200 and ans.json()["uuid"] == inst["id"], ans.body

        for worker in workers:
            assert holds(worker, inode)
            answered_by(worker)
        os.kill(workers[0], signal.SIGKILL)  # replaced, on the same socket
        deadline = time.monotonic() + 30
        while len(kids := children(api.pid)) != 2 or workers[0] in kids:
            assert time.monotonic() < deadline, kids
            time.sleep(0.05)
        new = next(pid for pid in kids if pid not in workers)
        deadline = time.monotonic() + 30
        while not holds(new, inode):  # forked, maybe not yet serving: it holds it from fork
            assert time.monotonic() < deadline
            time.sleep(0.05)
        answered_by(new)
        assert api.stop() == 0
        assert not sock.exists()
