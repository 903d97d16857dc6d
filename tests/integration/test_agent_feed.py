"""The agent's cache against the real registry's change feed: never stale. IP reuse gets
the new instance on the very next request, topology changes are seen, and a boot storm costs
one registry query per VM."""

from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Any

import pytest

from tests.integration.agent_support import (
    Stack,
    make_network,
    stack,
    unix_request,
    via_network,
    via_router,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("agent-feed")
    # a short reuse hold: every reuse below asks for its fixed IP and so waits it out
    with stack(tmp, metadata_agent={"cache_size": 10000}, registry={"reuse_hold": 3.0}) as st:
        r = st.admin.create_router("r")
        net, sub = make_network(st.admin, "n", "10.20.0.0/22", r["id"])
        st.start_agent()
        st.wait_feed(True)
        yield {"st": st, "r": r, "net": net, "sub": sub}


def instance_seen(st: Stack, headers: list[tuple[str, str]]) -> str | None:
    ans = unix_request(st.socket, headers=headers)
    if ans.status != 200:
        return None
    assert st.api is not None
    return st.api.last_headers()["x-instance-id"][0]


@pytest.mark.parametrize("scope", ["router", "network"])
def test_ip_reuse_gets_the_new_instance_at_once(world: Any, scope: str) -> None:
    st: Stack = world["st"]
    ip = "10.20.0.50" if scope == "router" else "10.20.0.51"
    hdrs = (via_router(world["r"]["id"], ip) if scope == "router"
            else via_network(world["net"]["id"], ip))
    old = st.admin.create_instance("old", world["net"]["id"], fixed_ip=ip, project_id="p-old")
    for _ in range(3):  # cached, and the cache is trusted
        assert instance_seen(st, hdrs) == old["id"]
    for round_ in range(5):
        st.admin.delete("instance", old["id"])
        new = st.admin.create_instance(f"new{round_}", world["net"]["id"], fixed_ip=ip,
                                       project_id=f"p-new{round_}")
        # the very next request: the new instance, never the old one
        assert instance_seen(st, hdrs) == new["id"]
        assert st.api is not None
        assert st.api.last_headers()["x-tenant-id"] == [new["project_id"]]
        old = new
    st.admin.delete("instance", old["id"])


def test_deleted_instance_is_404_at_once(world: Any) -> None:
    st: Stack = world["st"]
    ip = "10.20.0.60"
    hdrs = via_router(world["r"]["id"], ip)
    inst = st.admin.create_instance("gone", world["net"]["id"], fixed_ip=ip)
    assert instance_seen(st, hdrs) == inst["id"]
    st.admin.delete("instance", inst["id"])
    st.wait_feed_caught_up()
    assert unix_request(st.socket, headers=hdrs).status == 404


def test_router_interface_removal_is_seen(world: Any) -> None:
    st: Stack = world["st"]
    r2 = st.admin.create_router("r2")
    net2, sub2 = make_network(st.admin, "n2", "10.30.0.0/24", r2["id"])
    inst = st.admin.create_instance("vm", net2["id"], fixed_ip="10.30.0.5")
    hdrs = via_router(r2["id"], "10.30.0.5")
    assert instance_seen(st, hdrs) == inst["id"]
    st.admin.remove_interface(r2["id"], sub2["id"])
    st.wait_feed_caught_up()
    assert unix_request(st.socket, headers=hdrs).status == 404
    st.admin.add_interface(r2["id"], sub2["id"])
    st.wait_feed_caught_up()
    assert instance_seen(st, hdrs) == inst["id"]


def test_boot_storm_costs_no_registry_query(world: Any) -> None:
    # the warm index knows every port the feed delivered: a new VM's first request is a hit
    st: Stack = world["st"]
    vms = 60
    insts = [st.admin.create_instance(f"storm{i}", world["net"]["id"],
                                      fixed_ip=f"10.20.1.{i + 10}") for i in range(vms)]
    st.wait_feed_caught_up()
    deadline = time.monotonic() + 10  # the index loads once, after the first batch
    while st.stats()["index_loads"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    before = st.stats()["registry_queries"]
    jobs = [(f"10.20.1.{i % vms + 10}", insts[i % vms]["id"]) for i in range(vms * 10)]

    def one(job: tuple[str, str]) -> str | None:
        """None for a 200 naming `want`, else what came instead (kept for the message)."""
        ip, want = job
        try:
            ans = unix_request(st.socket, headers=via_router(world["r"]["id"], ip))
        except OSError as exc:
            return f"{ip}: {exc!r}"
        if ans.status == 200:
            got = dict((k.lower(), v) for k, v in ans.json()["headers"]).get("x-instance-id")
            if got == want:
                return None
        return f"{ip}: {ans.status} {ans.body[:200]!r}"

    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        bad = [why for why in pool.map(one, jobs) if why is not None]
    # a string, not a tuple: pytest shows it whole, where it cut a tuple's repr short
    kinds = collections.Counter(why.split(": ", 1)[1][:80] for why in bad)
    assert not bad, f"{len(bad)} of {len(jobs)} failed: {dict(kinds)}\n" + "\n".join(
        bad[:5]) + f"\nagent stats: {st.stats()}"
    queries = st.stats()["registry_queries"] - before
    assert queries == 0, queries
    assert st.stats()["index_hits"] >= vms
