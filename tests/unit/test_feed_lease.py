"""The agent's feed lease (metadata/feed_lease.py): trusted only for lease_s after the newest
applied feed call was sent; a page or an old registry's answer renews nothing."""

from __future__ import annotations

import asyncio
from typing import Any

from openimds.metadata.agent import WatchedFeedClient
from openimds.metadata.feed_lease import POLL_SHARE, FeedLease


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def answer(revision: int, changes: int = 0, head: int | None = None,
           lease_s: Any = 2.0) -> dict[str, Any]:
    out: dict[str, Any] = {"revision": revision, "changes": [{}] * changes,
                           "head": revision if head is None else head}
    if lease_s is not None:
        out["lease_s"] = lease_s
    return out


def test_an_empty_answer_renews_from_when_it_was_asked() -> None:
    clock = Clock()
    lease = FeedLease(clock)
    assert not lease.valid()  # nothing heard yet
    sent = clock.t
    clock.t += 1.5  # a long-poll that waited 1.5 s
    lease.answered(answer(7), sent)
    assert lease.valid()
    clock.t = sent + 1.99
    assert lease.valid()
    clock.t = sent + 2.0
    assert not lease.valid()  # counted from the send, not the answer


def test_changes_renew_only_once_applied() -> None:
    clock = Clock()
    lease = FeedLease(clock)
    lease.answered(answer(9, changes=2), clock.t)
    assert not lease.valid()
    lease.applied(8)  # not that batch
    assert not lease.valid()
    lease.applied(9)
    assert lease.valid()


def test_a_page_or_an_old_registry_renews_nothing() -> None:
    clock = Clock()
    lease = FeedLease(clock)
    lease.answered(answer(9, changes=100, head=12), clock.t)  # more follows
    lease.applied(9)
    assert not lease.valid()
    lease.answered(answer(12, lease_s=None), clock.t)  # a registry that holds no reuse
    assert not lease.valid()
    lease.answered({"revision": 12, "changes": []}, clock.t)
    assert not lease.valid()


def test_the_registry_sets_the_lease_and_the_poll_wait_follows() -> None:
    clock = Clock()
    lease = FeedLease(clock)
    lease.answered(answer(3, lease_s=5.0), clock.t)
    assert lease.lease_s == 5.0
    clock.t += 4.9
    assert lease.valid()
    assert lease.poll_wait(30.0) == 5.0 * POLL_SHARE
    assert lease.poll_wait(0.0) == 0.0


def test_the_watched_client_caps_the_wait_and_renews() -> None:
    clock = Clock()
    lease = FeedLease(clock)
    asked: list[float] = []

    class Registry:
        async def changes(self, since: int, wait: float = 0, limit: int | None = None) -> Any:
            asked.append(wait)
            clock.t += 0.5
            return answer(since)

    client = WatchedFeedClient(Registry(), lambda: None, lease)
    asyncio.run(client.changes(4, 30.0))
    assert asked == [2.0 * POLL_SHARE]
    assert lease.valid() and lease.until == 100.0 + 2.0


def test_a_resync_renews_once_applied() -> None:
    clock = Clock()
    lease = FeedLease(clock)
    sent = clock.t
    lease.resync_answered({"status": "ok", "revision": 40, "lease_s": 2.0}, sent)
    assert not lease.valid()  # the cache is not dropped yet
    lease.applied(40)
    assert lease.valid() and lease.until == sent + 2.0
    lease.resync_answered({"status": "ok", "revision": 41}, clock.t)  # an old registry
    lease.applied(41)
    assert lease.until == sent + 2.0  # not renewed


def test_a_probe_renews_only_if_nothing_is_newer_than_what_was_applied() -> None:
    clock = Clock()
    lease = FeedLease(clock)
    sent = clock.t
    assert lease.probed(answer(7), 7, sent) and lease.valid()
    clock.t = sent + 2.0
    assert not lease.valid()
    assert not lease.probed(answer(8), 7, clock.t)  # a write the agent has not applied
    assert not lease.probed(answer(7, changes=1), 7, clock.t)
    assert not lease.probed(answer(7, lease_s=None), 7, clock.t)  # an old registry
    assert not lease.valid()


class ProbedRegistry:
    """A registry whose feed is at `head`; counts lookups and feed calls."""

    def __init__(self) -> None:
        self.head = 5
        self.lookups = 0
        self.feed_calls: list[tuple[int, float]] = []

    async def lookup(self, ip: str, *, router_id: str | None = None,
                     network_id: str | None = None) -> dict[str, Any]:
        self.lookups += 1
        await asyncio.sleep(0.01)
        return {"revision": self.head, "ports": [
            {"id": f"port-{ip}", "network_id": "net-1", "device_id": f"inst-{ip}",
             "device_owner": "compute:nova", "project_id": "proj"}]}

    async def changes(self, since: int, wait: float = 0, limit: int | None = None
                      ) -> dict[str, Any]:
        self.feed_calls.append((since, wait))
        await asyncio.sleep(0.01)
        return answer(self.head, changes=0 if self.head == since else 1)


def test_a_lapsed_lease_costs_one_shared_feed_call_not_a_lookup_per_request() -> None:
    from types import SimpleNamespace

    from openimds.config import Settings
    from openimds.core.caller import Caller
    from openimds.metadata.agent import MetadataAgent

    async def main() -> None:
        reg = ProbedRegistry()
        agent = MetadataAgent(Settings(), registry=reg, upstream=None)  # type: ignore[arg-type]
        clock = Clock()
        agent.lease = FeedLease(clock)
        agent._follower = SimpleNamespace(registry_up=True)
        agent.apply_batch({"revision": 5, "changes": [], "resync": False})
        agent.lease.answered(answer(5), clock.t)
        callers = [Caller(f"10.0.0.{i}", router_id="r-1") for i in range(1, 21)]
        for c in callers:  # trusted: one lookup each, then cached
            await agent.resolver.resolve(c)
        assert reg.lookups == 20
        clock.t += 5  # the feed went quiet for longer than the lease (a busy agent)
        assert not agent.trusts_cache()
        got = await asyncio.gather(*(agent.resolver.resolve(c) for c in callers))
        assert [src for _, src in got] == ["hit"] * 20
        assert reg.lookups == 20 and reg.feed_calls == [(5, 0)]  # one probe, shared
        assert agent.trusts_cache()
        # a write the agent has not applied: no renewal, so the registry is asked
        clock.t += 5
        reg.head = 6
        _, src = await agent.resolver.resolve(callers[0])
        assert src == "miss" and reg.lookups == 21 and len(reg.feed_calls) == 2
        assert not agent.trusts_cache()

    asyncio.run(main())


def test_known_callers_are_served_only_within_the_registry_hold() -> None:
    clock = Clock()
    lease = FeedLease(clock)
    assert not lease.may_know()
    sent = clock.t
    lease.answered({**answer(5), "hold_s": 5.0}, sent)
    clock.t = sent + 2.5
    assert not lease.valid() and lease.may_know()  # lease over: asks, but may serve known
    clock.t = sent + 5.0
    assert not lease.may_know()  # a reused address may be answered to its new VM now
    lease.answered({**answer(6), "hold_s": 1.0}, clock.t)  # never less than the lease
    assert lease.hold_s == lease.lease_s == 2.0
