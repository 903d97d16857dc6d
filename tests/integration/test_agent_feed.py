"""The agent's cache against the real registry's change feed: never stale. IP reuse gets
the new instance on the very next request, topology changes are seen, and a boot storm costs
one registry query per VM."""

from __future__ import annotations

import collections
import concurrent.futures
import time
from pathlib import Path
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

# Nothing here tests a timeout (test_agent_failures does): the agent waits as long for the
# API and the registry as a node would (config.py: 60 s and 5 s), not the 2 s that `stack`
# gives the failure tests. The stand-in API shares the test's process, and so its CPU and GIL,
# with the storm's 64 client threads: on a busy machine it once took over 2 s to answer, and
# the storm got 504s that were not the agent's doing.
AGENT = {"cache_size": 10000, "upstream_timeout": 60.0, "registry_timeout": 5.0}
CLIENT_TIMEOUT_S = 90.0  # past the agent's own wait: its answer, never our timeout


def ask_as(st: Stack, router_id: str, job: tuple[str, str]) -> str | None:
    """None for a 200 naming the job's instance, else what came instead (for the message)."""
    ip, want = job
    try:
        ans = unix_request(st.socket, headers=via_router(router_id, ip),
                           timeout=CLIENT_TIMEOUT_S)
    except OSError as exc:
        return f"{ip}: {exc!r}"
    if ans.status == 200:
        got = dict((k.lower(), v) for k, v in ans.json()["headers"]).get("x-instance-id")
        if got == want:
            return None
    return f"{ip}: {ans.status} {ans.body[:200]!r}"


def failures(st: Stack, bad: list[str], total: int) -> str:
    """The storm's failures, counted by kind: a string, which pytest shows whole (it cut a
    tuple's repr short)."""
    if not bad:
        return ""
    kinds = collections.Counter(why.split(": ", 1)[1][:80] for why in bad)
    return (f"{len(bad)} of {total} failed: {dict(kinds)}\n" + "\n".join(bad[:5])
            + f"\nagent stats: {st.stats()}")


def storm(st: Stack, router_id: str, jobs: list[tuple[str, str]]) -> str:
    """Every job's request at once from 64 threads; "" if all got their instance."""
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        bad = [why for why in pool.map(lambda job: ask_as(st, router_id, job), jobs)
               if why is not None]
    return failures(st, bad, len(jobs))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tmp = tmp_path_factory.mktemp("agent-feed")
    # a short reuse hold: every reuse below asks for its fixed IP and so waits it out
    with stack(tmp, metadata_agent=AGENT, registry={"reuse_hold": 3.0}) as st:
        r = st.admin.create_router("r")
        net, sub = make_network(st.admin, "n", "10.20.0.0/22", r["id"])
        st.start_agent()
        st.wait_feed(True)
        yield {"st": st, "r": r, "net": net, "sub": sub}


def instance_seen(st: Stack, headers: list[tuple[str, str]]) -> str | None:
    ans = unix_request(st.socket, headers=headers, timeout=CLIENT_TIMEOUT_S)
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
    assert unix_request(st.socket, headers=hdrs, timeout=CLIENT_TIMEOUT_S).status == 404


def test_router_interface_removal_is_seen(world: Any) -> None:
    st: Stack = world["st"]
    r2 = st.admin.create_router("r2")
    net2, sub2 = make_network(st.admin, "n2", "10.30.0.0/24", r2["id"])
    inst = st.admin.create_instance("vm", net2["id"], fixed_ip="10.30.0.5")
    hdrs = via_router(r2["id"], "10.30.0.5")
    assert instance_seen(st, hdrs) == inst["id"]
    st.admin.remove_interface(r2["id"], sub2["id"])
    st.wait_feed_caught_up()
    assert unix_request(st.socket, headers=hdrs, timeout=CLIENT_TIMEOUT_S).status == 404
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

    bad = storm(st, world["r"]["id"], jobs)
    assert not bad, bad
    queries = st.stats()["registry_queries"] - before
    assert queries == 0, queries
    assert st.stats()["index_hits"] >= vms


def test_storm_outlasts_an_api_that_stops_for_seconds(tmp_path: Path) -> None:
    """The API stops accepting and answering (as a SIGSTOPped or CPU-starved process would)
    while 64 new VMs ask at once, through an agent whose pool is still empty: each VM waits,
    none gets an error. The agent opens 64 connections that queue in the API's listen
    backlog, and their requests wait on them for the answer; the API stays stopped until all
    64 are there. Before, this was how the storm above failed on a busy machine: the
    stand-in API's backlog was socketserver's 5, so connects past it lost their SYN and timed
    out (503); such a loss now shows directly, as a queue that never fills."""
    with stack(tmp_path, metadata_agent=AGENT) as st:
        assert st.api is not None
        r = st.admin.create_router("r")
        net, _ = make_network(st.admin, "n", "10.40.0.0/24", r["id"])
        insts = [st.admin.create_instance(f"vm{i}", net["id"], fixed_ip=f"10.40.0.{i + 10}")
                 for i in range(64)]
        st.start_agent()
        st.wait_feed(True)
        st.wait_feed_caught_up()
        jobs = [(f"10.40.0.{i + 10}", inst["id"]) for i, inst in enumerate(insts)]
        seen = len(st.api.seen)
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            with st.api.frozen():
                pending = [pool.submit(ask_as, st, r["id"], job) for job in jobs]
                # Until every VM's connection has reached the stopped API: one taken by its
                # accept loop (held there until the freeze ends), the others in its listen
                # backlog. A backlog too short for them (socketserver's 5) never holds them
                # all: the deadline fails the test.
                deadline = time.monotonic() + 30
                while (queued := st.api.listen_queue()) < len(jobs) - 1:
                    assert time.monotonic() < deadline, f"{queued} in the API's listen backlog"
                    time.sleep(0.02)
                answered_while_frozen = sum(f.done() for f in pending)
            bad = [why for f in pending if (why := f.result()) is not None]
        assert not bad, failures(st, bad, len(jobs))
        assert answered_while_frozen == 0  # the condition was real: nobody got past it
        assert len(st.api.seen) - seen == len(jobs)  # each sent once: nothing retried
