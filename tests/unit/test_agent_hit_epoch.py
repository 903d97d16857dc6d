"""The agent's hit memo skips the cache lookup only while the cache's epoch is the one it
checked its resolution at: any change, eviction, forget or lost trust sends it back."""

from __future__ import annotations

from typing import Any

from tests.unit.test_agent_handler import R, call, make, req


def count_lookups(agent: Any) -> list[int]:
    """Counts calls of the cache's own lookup (`CallerCache.get`)."""
    n = [0]
    get = agent.cache.get

    def counted(caller: Any) -> Any:
        n[0] += 1
        return get(caller)

    agent.cache.get = counted
    return n


async def test_a_checked_hit_skips_the_lookup_until_the_epoch_moves() -> None:
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1")
    lookups = count_lookups(agent)
    for _ in range(2):  # the miss, then the hit that keeps the memo entry
        assert (await call(agent, req()))[0] == 200
    seen = lookups[0]
    for _ in range(3):
        assert (await call(agent, req())) == (200, b"hello inst-1")
    assert lookups[0] == seen  # answered from the memo, no cache lookup
    assert agent.stats()["cache_hits"] == 4
    # a feed row that drops nothing still moves the epoch: checked once again, then not
    agent.apply_batch({"revision": 2, "resync": False, "changes": [
        {"revision": 2, "kind": "instance", "op": "update", "id": "other", "attrs": {}}]})
    for _ in range(3):
        assert (await call(agent, req())) == (200, b"hello inst-1")
    assert lookups[0] == seen + 1
    assert len(reg.calls) == 1


async def test_an_evicted_caller_is_not_answered_from_the_memo() -> None:
    """Eviction only drops; the caller's next request asks again (a change it would have
    missed while out of the cache cannot be served from a kept resolution)."""
    agent, reg, api = make(cache_size=1)
    reg.add(R, "10.0.0.5", "inst-1")
    reg.add(R, "10.0.0.6", "inst-2")
    for _ in range(3):
        assert (await call(agent, req())) == (200, b"hello inst-1")
    assert len(reg.calls) == 1
    assert (await call(agent, req(xff="10.0.0.6"))) == (200, b"hello inst-2")  # evicts .5
    reg.ports.clear()
    reg.add(R, "10.0.0.5", "inst-3", pid="port-new")
    reg.revision = 5
    assert (await call(agent, req())) == (200, b"hello inst-3")
    assert len(reg.calls) == 3


async def test_no_memo_answer_while_the_cache_is_untrusted() -> None:
    agent, reg, api = make()
    reg.add(R, "10.0.0.5", "inst-1")
    for _ in range(3):
        assert (await call(agent, req()))[0] == 200
    assert len(reg.calls) == 1
    agent._feed_up = lambda: False  # the feed went down: every request asks the registry
    for _ in range(2):
        assert (await call(agent, req()))[0] == 200
    assert len(reg.calls) == 3
