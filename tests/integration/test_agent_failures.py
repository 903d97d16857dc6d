"""The agent process when what it depends on fails: the metadata API (down, hanging,
garbled), the registry (down, back), and its own concurrency bound. Every failure gets an
explicit status with a one-line body, never a silently closed socket or a guess."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.agent_support import Stack, make_network, stack, unix_request, via_router


@pytest.fixture()
def world(tmp_path: Path) -> Any:
    with stack(tmp_path, metadata_agent={"upstream_timeout": 1.5, "registry_timeout": 1.0,
                                         "retry_after": 3, "max_concurrency": 4}) as st:
        r = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.0.0.0/24", r["id"])
        inst = st.admin.create_instance("vm", net["id"], fixed_ip="10.0.0.10")
        other = st.admin.create_instance("vm2", net["id"], fixed_ip="10.0.0.11")
        st.start_agent()
        st.wait_feed(True)
        yield {"st": st, "r": r, "net": net, "inst": inst, "other": other}


def ask(w: Any, ip: str = "10.0.0.10", timeout: float = 10.0) -> Any:
    st: Stack = w["st"]
    return unix_request(st.socket, headers=via_router(w["r"]["id"], ip), timeout=timeout)


def one_line(body: bytes) -> bool:
    return body.endswith(b"\n") and body.count(b"\n") == 1 and len(body) > 10


def test_api_down_is_503_with_retry_after(world: Any) -> None:
    st: Stack = world["st"]
    assert ask(world).status == 200  # a pooled keep-alive connection now exists
    assert st.api is not None
    st.api.stop()
    ans = ask(world)
    assert ans.status == 503 and ans.headers["retry-after"] == "3" and one_line(ans.body)
    st.api.start()
    assert ask(world).status == 200


def test_api_restarted_within_the_connect_retries_costs_the_vm_no_error(world: Any) -> None:
    """The API's port refuses (API killed, being respawned) when the request comes and
    listens again 1.5 s later: the agent's connect retries (haproxy's `retries 3`, 1 s apart)
    carry the request over and the VM gets 200, with the request sent to the API once."""
    st: Stack = world["st"]
    assert st.api is not None
    st.api.stop()
    seen = len(st.api.seen)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(ask, world)
        time.sleep(1.5)
        assert not pending.done()  # held by the retries, not answered 503
        st.api.start()
        ans = pending.result(timeout=10)
    assert ans.status == 200, ans.body
    assert len(st.api.seen) == seen + 1


def test_api_hang_is_504(world: Any) -> None:
    st: Stack = world["st"]
    assert st.api is not None
    st.api.mode, st.api.hang_s = "hang", 5.0
    t0 = time.monotonic()
    ans = ask(world)
    elapsed = time.monotonic() - t0
    st.api.mode = "echo"
    assert ans.status == 504 and one_line(ans.body)
    assert 1.4 <= elapsed < 3.5


def test_api_garbled_is_502(world: Any) -> None:
    st: Stack = world["st"]
    assert st.api is not None
    st.api.mode = "garbled"
    ans = ask(world)
    st.api.mode = "echo"
    assert ans.status == 502 and one_line(ans.body)
    assert ask(world).status == 200


def test_registry_down_costs_nothing_known_is_503_for_the_unknown_then_recovers(
    world: Any,
) -> None:
    st: Stack = world["st"]
    assert ask(world).status == 200  # cached now
    deadline = time.monotonic() + 10
    while st.stats()["index_loads"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)  # the warm index is loaded in the background after the first batch
    assert st.stats()["index_ports"] >= 3  # the router interface and both VMs
    st.registry.kill()
    st.wait_feed(False)
    # known callers (the one asked before, and one the warm index holds) keep being served:
    # while no registry answers nothing can change
    for ip, inst in (("10.0.0.10", world["inst"]), ("10.0.0.11", world["other"])):
        for _ in range(20):
            ans = ask(world, ip)
            assert ans.status == 200, (ip, ans.body)
            assert dict((k.lower(), v) for k, v in ans.json()["headers"])[
                "x-instance-id"] == inst["id"]
    # a caller nobody knows: 503, never a guess
    ans = ask(world, "10.0.0.99")
    assert ans.status == 503, ans.body
    assert ans.headers["retry-after"] == "3" and one_line(ans.body)
    assert st.stats()["served_known_registry_down"] >= 40
    st.restart_registry()
    st.wait_feed(True)
    # and the moment it is back, changes made then are seen
    st.admin.delete("instance", world["other"]["id"])
    st.wait_feed_caught_up()
    assert ask(world, "10.0.0.11").status == 404
    assert ask(world).status == 200
    assert st.agent is not None
    assert "agent.registry_unavailable" in st.agent.log()


def test_saturation_is_an_explicit_503(world: Any) -> None:
    st: Stack = world["st"]
    assert st.api is not None
    st.api.mode, st.api.hang_s = "hang", 1.0
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: ask(world), range(12)))
    st.api.mode = "echo"
    codes = sorted(a.status for a in answers)
    assert codes.count(200) >= 4, codes
    busy = [a for a in answers if a.status == 503]
    assert busy, codes
    assert all(a.headers["retry-after"] == "3" and b"saturated" in a.body for a in busy)
    assert st.stats()["saturated_503"] == len(busy)
