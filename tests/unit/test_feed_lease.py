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
