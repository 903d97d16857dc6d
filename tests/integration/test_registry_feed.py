"""The change feed: long-poll wake-ups, the resync answer, and `ChangeFollower`."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openimds.errors import BadRequest
from openimds.registry.client import AsyncRegistryClient, ResyncRequired
from openimds.registry.feed import ChangeBatch, ChangeFollower
from openimds.registry.reuse import DEFAULT_HOLD_S, LEASE_S
from tests.integration.registry_support import BACKENDS, Registry, registry_process
from tests.support import http_ready, metric_samples, promtool_check, scrape


@pytest.fixture(scope="module", params=BACKENDS)
def reg(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Registry]:
    state = tmp_path_factory.mktemp(f"registry-feed-{request.param}")
    with registry_process(state, request.param, change_retention=10) as r:
        yield r


def _net(reg: Registry) -> dict[str, Any]:
    with reg.client() as c:
        return c.create("network", {"name": f"n-{uuid.uuid4().hex[:6]}"})


def test_long_poll_wakes_within_milliseconds_of_a_write(reg: Registry) -> None:
    with reg.client() as c:
        since = c.health()["revision"]
        result: dict[str, Any] = {}

        def poll() -> None:
            # the registry's own heartbeat (its host's agent row) may land first: poll on
            # until the network's change arrives
            with reg.client() as pc:
                rev, deadline = since, time.monotonic() + 10
                while time.monotonic() < deadline:
                    answer = pc.changes(rev, wait=10)
                    rev = answer["revision"]
                    if any(ch["kind"] == "network" for ch in answer["changes"]):
                        result["answer"], result["at"] = answer, time.monotonic()
                        return

        t = threading.Thread(target=poll)
        t.start()
        time.sleep(0.3)
        net = _net(reg)
        written = time.monotonic()
        t.join(10)
    latency = result["at"] - written
    assert latency < 0.25, f"long-poll answered {latency:.3f}s after the write"
    changes = result["answer"]["changes"]
    # The first network of a fresh registry also auto-creates the default project.
    assert [(ch["kind"], ch["op"]) for ch in changes][-1] == ("network", "create")
    assert changes[-1]["id"] == net["id"]
    assert result["answer"]["revision"] == changes[-1]["revision"] == net["revision"]


def test_long_poll_times_out_with_current_revision(reg: Registry) -> None:
    with reg.client() as c:
        rev = c.health()["revision"]
        started = time.monotonic()
        answer = c.changes(rev, wait=0.6)
        elapsed = time.monotonic() - started
        assert answer == {"revision": rev, "changes": [], "head": rev, "lease_s": LEASE_S,
                          "hold_s": DEFAULT_HOLD_S}
        assert 0.55 <= elapsed < 2.0
        with pytest.raises(BadRequest):
            c.changes(rev, wait=61)
        with pytest.raises(ResyncRequired) as exc:
            c.changes(rev + 100)
        assert exc.value.revision == rev


def test_resync_after_falling_behind_the_window(reg: Registry) -> None:
    with reg.client() as c:
        start = c.health()["revision"]
        for _ in range(12):
            _net(reg)
        now = c.health()["revision"]
        with pytest.raises(ResyncRequired) as exc:
            c.changes(start)
        assert exc.value.revision == now
        recent = c.changes(now - 5)
        assert [ch["revision"] for ch in recent["changes"]] == list(range(now - 4, now + 1))


def test_change_contents_and_whole_revisions(reg: Registry) -> None:
    with reg.client() as c:
        net = c.create("network", {"name": "feed-net"})
        c.create("subnet", {"network_id": net["id"], "cidr": "10.0.0.0/24"})
        since = c.health()["revision"]
        inst = c.create("instance", {"name": "f", "network_id": net["id"]})
        one = c.changes(since, limit=1)  # one revision holds the port and the instance
        assert {ch["revision"] for ch in one["changes"]} == {inst["revision"]}
        port, instance = one["changes"]
        assert port["kind"] == "port" and port["op"] == "create"
        assert port["attrs"]["ips"] == ["10.0.0.3"]
        assert port["attrs"]["device_id"] == inst["id"]
        assert port["attrs"]["device_owner"] == "compute:nova"
        assert instance == {"revision": inst["revision"], "kind": "instance", "op": "create",
                            "id": inst["id"], "attrs": {
                                "project_id": inst["project_id"], "key_name": None,
                                "keypair_id": None, "hostname": "f", "name": "f"}}
        c.set_password(inst["id"], "pw")
        upd = c.changes(one["revision"])["changes"]
        assert [(ch["kind"], ch["op"]) for ch in upd] == [("instance", "update")]
        c.delete("instance", inst["id"])
        gone = c.changes(upd[-1]["revision"])["changes"]
        assert [(ch["kind"], ch["op"]) for ch in gone] == [("port", "delete"),
                                                           ("instance", "delete")]
        assert gone[0]["attrs"]["ips"] == ["10.0.0.3"]


async def _next(follower: ChangeFollower, timeout: float = 15) -> ChangeBatch:
    return await asyncio.wait_for(follower.__anext__(), timeout)


async def test_follower_resyncs_follows_and_survives_an_outage(tmp_path: Path) -> None:
    with registry_process(tmp_path, "sqlite", change_retention=10) as reg:
        client = AsyncRegistryClient(reg.url, reg.reader_token)
        follower = ChangeFollower(client, wait_s=5)
        try:
            first = await _next(follower)
            assert first.resync and first.changes == []
            net = await asyncio.to_thread(_net, reg)
            batch = await _next(follower)
            assert not batch.resync and batch.revision == net["revision"]
            assert batch.changes[-1]["id"] == net["id"]
            assert follower.registry_up

            pending = asyncio.ensure_future(_next(follower, 30))
            await asyncio.sleep(0.2)
            reg.service.stop()
            deadline = time.monotonic() + 30  # for a loaded machine; it ends at once
            while follower.registry_up and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not follower.registry_up
            reg.service.start().wait_until(http_ready(reg.url + "/v1/health"))
            back = await asyncio.wait_for(pending, 15)
            assert back.resync and follower.registry_up
            net2 = await asyncio.to_thread(_net, reg)
            after = await _next(follower)
            assert after.changes[0]["id"] == net2["id"]

            # Fell out of the window: a follower starting from revision 0 must resync.
            for _ in range(12):
                await asyncio.to_thread(_net, reg)
            stale = ChangeFollower(client, since=0, wait_s=1)
            got = await _next(stale)
            assert got.resync and got.revision == (await client.health())["revision"]
        finally:
            await client.aclose()


@pytest.mark.postgres
def test_long_poll_sees_writes_of_another_registry_process(tmp_path: Path) -> None:
    with registry_process(tmp_path / "a", "postgres", name="feed-a") as a:
        conn = next(line.split("=", 1)[1].strip() for line in a.config.read_text().splitlines()
                    if line.startswith("connection"))
        with registry_process(tmp_path / "b", "sqlite", name="feed-b", connection=conn) as b:
            with b.client() as cb:
                since = cb.health()["revision"]
                result: dict[str, Any] = {}

                def poll() -> None:
                    with b.client() as pc:
                        result["answer"] = pc.changes(since, wait=10)
                        result["at"] = time.monotonic()

                t = threading.Thread(target=poll)
                t.start()
                time.sleep(0.3)
                net = _net(a)
                written = time.monotonic()
                t.join(10)
            assert result["answer"]["changes"][-1]["id"] == net["id"]
            assert result["at"] - written < 3.0  # NOTIFY, not the 5 s recheck (loaded: 1 s)


async def test_resuming_follower_catches_up_after_an_outage_without_a_resync(
    tmp_path: Path,
) -> None:
    with registry_process(tmp_path, "sqlite", change_retention=100) as reg:
        client = AsyncRegistryClient(reg.url, reg.reader_token)
        follower = ChangeFollower(client, wait_s=5, resume=True, backoff_max_s=0.5)
        try:
            assert (await _next(follower)).resync  # the start
            net = await asyncio.to_thread(_net, reg)
            assert (await _next(follower)).changes[-1]["id"] == net["id"]
            pending = asyncio.ensure_future(_next(follower, 30))
            await asyncio.sleep(0.2)
            reg.service.stop()
            deadline = time.monotonic() + 30  # for a loaded machine; it ends at once
            while follower.registry_up and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert not follower.registry_up
            reg.service.start().wait_until(http_ready(reg.url + "/v1/health"))
            net2 = await asyncio.to_thread(_net, reg)
            seen: list[ChangeBatch] = [await asyncio.wait_for(pending, 15)]
            while net2["id"] not in {c["id"] for b in seen for c in b.changes}:
                seen.append(await _next(follower))
            # the change made while the follower was away arrives as a change, never as a
            # resync that would make its consumers drop what they hold
            assert not any(b.resync for b in seen)
            assert follower.registry_up
        finally:
            await client.aclose()


class _FlakyFeed:
    """health/changes of a registry that goes away and comes back with a given revision."""

    def __init__(self) -> None:
        self.revision = 5
        self.down = False

    async def health(self) -> dict[str, Any]:
        if self.down:
            from openimds.errors import UpstreamUnavailable
            raise UpstreamUnavailable("down")
        return {"revision": self.revision}

    async def changes(self, since: int, wait: float = 0, limit: int | None = None) -> Any:
        from openimds.errors import UpstreamUnavailable
        if self.down:
            raise UpstreamUnavailable("down")
        if since > self.revision:
            raise ResyncRequired("behind", self.revision)
        await asyncio.sleep(min(wait, 0.05))
        return {"revision": self.revision, "changes": []}


async def test_resuming_follower_resyncs_when_the_registry_went_backwards() -> None:
    feed = _FlakyFeed()
    follower = ChangeFollower(feed, wait_s=0.05, resume=True,  # type: ignore[arg-type]
                              backoff_max_s=0.2)
    assert (await _next(follower)).resync
    feed.down = True
    pending = asyncio.ensure_future(_next(follower, 10))
    await asyncio.sleep(0.3)
    # back, empty: the first batch says "caught up" (empty, no resync)
    feed.down = False
    caught_up = await asyncio.wait_for(pending, 30)
    assert not caught_up.resync and caught_up.changes == []
    # down again, back with an older revision (a restore): resync
    feed.down = True
    pending = asyncio.ensure_future(_next(follower, 10))
    await asyncio.sleep(0.3)
    feed.revision, feed.down = 2, False
    again = await asyncio.wait_for(pending, 30)
    assert again.resync and again.revision == 2


def test_followers_woken_by_writes_get_what_a_read_gets(reg: Registry) -> None:
    """Several long-polls at one revision, woken write after write (answered from each
    write's own change rows, or one shared read): every change once, in order, each answer
    the page a plain read of the feed gives from the same revision."""
    nets = 6  # inside the fixture's retention (10), so the pages can be read again after
    with reg.client() as c:
        since = int(c.health()["revision"])
    got: list[list[dict[str, Any]]] = [[] for _ in range(3)]
    answers: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in got]

    def follow(out: list[dict[str, Any]], seen: list[tuple[int, dict[str, Any]]]) -> None:
        with reg.client() as pc:
            rev, deadline = since, time.monotonic() + 20
            while (sum(ch["kind"] == "network" for ch in out) < nets
                   and time.monotonic() < deadline):
                answer = pc.changes(rev, wait=10)
                seen.append((rev, answer))
                out.extend(answer["changes"])
                rev = int(answer["revision"])

    threads = [threading.Thread(target=follow, args=(g, a))
               for g, a in zip(got, answers, strict=True)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    for _ in range(nets):
        _net(reg)
    for t in threads:
        t.join(30)
    with reg.client() as c:
        head = int(c.health()["revision"])
        expected: list[dict[str, Any]] = []
        rev = since
        while rev < head:
            page = c.changes(rev)
            expected.extend(page["changes"])
            rev = int(page["revision"])
        for g, seen in zip(got, answers, strict=True):
            assert sum(ch["kind"] == "network" for ch in g) == nets
            assert g == expected[:len(g)]
            for at, answer in seen:  # each page is what a read from there starts with
                page = c.changes(at)
                assert answer["changes"] == page["changes"][:len(answer["changes"])]
                assert answer["lease_s"] == page["lease_s"] and answer["hold_s"] == page["hold_s"]


def _feed_counters(reg: Registry) -> tuple[float, float]:
    """The registry's /metrics: (feed wakes, feed reads) of its Notifier."""
    text = scrape(reg.metrics_port)
    promtool_check(text)
    got = metric_samples(text)
    return (got[("openimds_registry_feed_wakes_total", frozenset())],
            got[("openimds_registry_feed_reads_total", frozenset())])


def test_metrics_count_the_wake_of_a_long_poll_and_the_feed_reads(reg: Registry) -> None:
    """/metrics: a write that wakes a parked long-poll moves the wakes; a call the write's
    own rows cannot answer (from further back) is one more read of the store."""
    with reg.client() as c:
        since = int(c.health()["revision"])
    answer: dict[str, Any] = {}

    def poll() -> None:
        with reg.client() as pc:
            answer.update(pc.changes(since, wait=20))

    t = threading.Thread(target=poll)
    t.start()
    time.sleep(0.3)  # parked at `since`
    wakes, reads = _feed_counters(reg)
    assert not answer
    net = _net(reg)
    t.join(25)
    assert [ch["id"] for ch in answer["changes"] if ch["kind"] == "network"] == [net["id"]]
    woken, _ = _feed_counters(reg)
    assert woken >= wakes + 1
    with reg.client() as c:
        back = c.changes(since - 1)
    assert any(ch["id"] == net["id"] for ch in back["changes"])
    _, read = _feed_counters(reg)
    assert read >= reads + 1
