"""Worker processes (`metadata_workers`, `[api] workers`): N processes behind one socket, the
same answers, every worker following the change feed, a dead worker replaced, a clean stop."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

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
