"""Worker processes (`metadata_workers`, `[api] workers`): N processes behind one socket, the
same answers, every worker following the change feed, a dead worker replaced, a clean stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from openimds.config import worker_socket, worker_sockets
from openimds.http.client import RETIRE_S, UpstreamPool
from tests.integration.agent_support import (
    Stack,
    children,
    make_network,
    only,
    stack,
    unix_request,
    via_router,
    wait_children,
)
from tests.support import http_ready, openimds_service

META = "/openstack/latest/meta_data.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("workers")
    with stack(tmp, recording_api=False, DEFAULT={"metadata_workers": 2},
               api={"workers": 2}) as st:
        api = openimds_service("api", st.config, "api", log_dir=tmp)
        port = st.cfg["DEFAULT"]["nova_metadata_port"]
        api.start().wait_until(http_ready(f"http://127.0.0.1:{port}/"))
        st.services.append(api)
        r = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.50.0.0/24", r["id"])
        inst = st.admin.create_instance("vm1", net["id"], fixed_ip="10.50.0.10",
                                        metadata={"role": "v1"})
        st.start_agent()
        assert st.agent is not None
        wait_children(st.agent.pid, 2)
        wait_children(api.pid, 2)
        yield {"st": st, "api": api, "r": r, "inst": inst}


def get(w: Any, path: str = META) -> Any:
    st: Stack = w["st"]
    return unix_request(st.socket, path, headers=via_router(w["r"]["id"], "10.50.0.10"))


def test_every_worker_answers_the_same(world: Any) -> None:
    st: Stack = world["st"]
    assert st.agent is not None
    workers = children(st.agent.pid)
    assert len(workers) == 2
    for worker in workers:
        with only(st, worker):
            assert int(st.stats()["pid"]) == worker
            ans = get(world)
            assert ans.status == 200, ans.body
            assert ans.json()["uuid"] == world["inst"]["id"]


def test_each_worker_follows_the_feed(world: Any) -> None:
    st: Stack = world["st"]
    assert st.agent is not None
    workers = children(st.agent.pid)
    for worker in workers:  # warm every worker's cache with v1
        with only(st, worker):
            assert get(world).json()["meta"]["role"] == "v1"
    st.admin.update("instance", world["inst"]["id"], {"metadata": {"role": "v2"}})
    for worker in workers:  # each is its own follower: each must see the change
        with only(st, worker):
            # the feed wakes within milliseconds; 30 s is for a loaded machine
            deadline = time.monotonic() + 30.0
            while get(world).json()["meta"]["role"] != "v2":
                assert time.monotonic() < deadline, f"worker {worker}: change not seen in 30 s"
                time.sleep(0.02)


def test_a_dead_worker_is_replaced(world: Any) -> None:
    st: Stack = world["st"]
    assert st.agent is not None
    first = children(st.agent.pid)
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:
        kids = children(st.agent.pid)
        if len(kids) == 2 and first[0] not in kids:
            break
        assert time.monotonic() < deadline, kids
        time.sleep(0.05)
    for _ in range(10):
        assert get(world).status == 200


def wait_worker_sockets(st: Stack, timeout: float = 30.0) -> None:
    """Until every worker answers on its own socket (a replaced one opens it as it starts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for index in (0, 1):
                unix_request(worker_socket(st.socket, index), "/openimds-agent/stats")
            return
        except OSError:
            assert time.monotonic() < deadline, "a worker socket never answered"
            time.sleep(0.05)


def test_each_worker_listens_on_its_own_socket(world: Any) -> None:
    st: Stack = world["st"]
    assert st.agent is not None
    wait_worker_sockets(st)
    assert worker_sockets(st.socket) == [worker_socket(st.socket, 0),
                                         worker_socket(st.socket, 1)]
    pids = {int(unix_request(path, "/openimds-agent/stats").json()["pid"])
            for path in worker_sockets(st.socket)}
    assert pids == set(children(st.agent.pid))
    assert oct(os.stat(worker_socket(st.socket, 0)).st_mode & 0o777) == oct(
        os.stat(st.socket).st_mode & 0o777)


def gone(pid: int) -> bool:
    """pid exited (a zombie not reaped yet, or reaped)."""
    try:
        return "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return True


def test_a_pool_burst_splits_evenly_and_follows_a_dead_worker(world: Any) -> None:
    """The proxy's pool (`worker_paths`): a burst of n connects splits n/2 each, so do
    requests sent at once on the kept connections; a killed worker's share goes to the
    survivor, and comes back once it is replaced."""
    st: Stack = world["st"]
    assert st.agent is not None
    wait_worker_sockets(st)
    n = 64

    async def scenario() -> dict[str, Any]:
        pool = UpstreamPool(unix_path=st.socket, size=n, connect_retries=3,
                            worker_paths=lambda: worker_sockets(st.socket))

        async def many(count: int) -> Counter[int]:
            async def one() -> int:
                ans = await pool.request("GET", "/openimds-agent/stats")
                assert ans.status == 200, ans.body
                return int(json.loads(ans.body)["pid"])
            return Counter(await asyncio.gather(*(one() for _ in range(count))))

        seen: dict[str, Any] = {"first": await many(n), "kept": await many(16)}
        kids = children(st.agent.pid)
        os.kill(kids[0], signal.SIGKILL)
        while not gone(kids[0]):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # its connections' EOFs reach the pool
        seen["during"] = await many(n)  # its socket file is still there: refused
        deadline = time.monotonic() + 30
        while True:
            now = children(st.agent.pid)
            if len(now) == 2 and kids[0] not in now:
                with contextlib.suppress(OSError):
                    unix_request(worker_socket(st.socket, 0), "/openimds-agent/stats")
                    unix_request(worker_socket(st.socket, 1), "/openimds-agent/stats")
                    break
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.05)
        await asyncio.sleep(RETIRE_S + 0.2)  # the survivor's extra connections retire
        seen["after"] = await many(n)
        seen["after_kept"] = await many(16)
        seen["by_socket"] = pool.connections_by_socket()
        await pool.close()
        seen.update(before=kids, now=now)
        return seen

    seen = asyncio.run(scenario())

    def even(split: Counter[int], pids: list[int]) -> bool:
        return set(split) == set(pids) and max(split.values()) - min(split.values()) <= 1

    assert even(seen["first"], seen["before"]), seen
    assert even(seen["kept"], seen["before"]), seen
    survivor = [p for p in seen["before"] if p in seen["now"]]
    assert len(survivor) == 1 and set(seen["during"]) == set(survivor), seen
    assert sum(seen["during"].values()) == n
    assert even(seen["after"], seen["now"]), seen
    assert even(seen["after_kept"], seen["now"]), seen
    assert sorted(seen["by_socket"].values()) == [n // 2, n // 2], seen


def test_stop_ends_every_worker_and_removes_the_socket(world: Any) -> None:
    st: Stack = world["st"]
    api = world["api"]
    assert st.agent is not None
    kids = children(st.agent.pid) + children(api.pid)
    assert st.agent.stop() == 0
    assert api.stop() == 0
    for pid in kids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(
            f"/proc/{pid}/stat").read_text().split()[2]
    assert not Path(st.socket).exists()
    assert worker_sockets(st.socket) == []


def test_a_port_in_use_fails_at_once(tmp_path: Path) -> None:
    import socket

    from tests.support import base_config, run_cli, write_config

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = base_config(tmp_path / "state", api={"workers": 2, "metadata_listen_port": port})
        (tmp_path / "state").mkdir()
        proc = run_cli(write_config(tmp_path / "o.ini", cfg), "api", timeout=30)
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
