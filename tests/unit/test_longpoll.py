"""Held requests (wait_for_change) at the agent: their own upstream, outside max_concurrency."""

from __future__ import annotations

import asyncio
import dataclasses

from openimds.config import MetadataAgentSettings, Settings
from openimds.http.server import Response
from openimds.metadata.agent import MetadataAgent
from openimds.metadata.longpoll import HeldUpstream, is_long_poll
from tests.unit.test_agent_handler import SECRET, FakeApi, FakeRegistry, R, call, req, settle

WAIT = "/latest/meta-data/?wait_for_change=true&last_etag=x&timeout_sec=60"


def make(**agent_opts: object) -> tuple[MetadataAgent, FakeApi, HeldUpstream]:
    """An agent whose held requests go to their own fake upstream; inst-1 at 10.0.0.5."""
    settings = dataclasses.replace(
        Settings(), metadata_proxy_shared_secret=SECRET,
        metadata_agent=dataclasses.replace(MetadataAgentSettings(), **agent_opts))
    reg, api, slow = FakeRegistry(), FakeApi(), FakeApi()
    held = HeldUpstream(slow)
    agent = MetadataAgent(settings, registry=reg, upstream=api, feed_up=lambda: True,
                          held=held)
    agent.apply_batch({"revision": 0, "changes": [], "resync": False})
    reg.add(R, "10.0.0.5", "inst-1")
    return agent, api, held


def test_is_long_poll() -> None:
    assert is_long_poll("wait_for_change=true&last_etag=x")
    assert not is_long_poll("") and not is_long_poll("recursive=true&alt=json")


async def test_held_requests_use_their_pool_and_never_saturate_the_agent() -> None:
    agent, api, held = make(max_concurrency=2)
    slow = held.pool
    assert (await call(agent, req()))[0] == 200
    slow.delay = 0.3
    waits = [asyncio.ensure_future(settle(agent.handle(req(path=WAIT)))) for _ in range(5)]
    await asyncio.sleep(0.05)
    assert held.held == 5 and len(slow.seen) == 5
    assert all(target == WAIT for _, target, _, _ in slow.seen)
    # five held requests, max_concurrency 2: ordinary requests still go through
    now = agent.handle(req())
    assert not (isinstance(now, Response) and now.status == 503)
    assert (await settle(now)).data.startswith(b"HTTP/1.1 200")  # type: ignore[union-attr]
    assert not any("wait_for_change" in target for _, target, _, _ in api.seen)
    await asyncio.gather(*waits)
    assert held.held == 0


async def test_a_cancelled_held_request_releases_its_upstream() -> None:
    """The server cancels the task when the client goes: the upstream call is cancelled."""
    agent, _, held = make()
    held.pool.delay = 30
    task = asyncio.ensure_future(settle(agent.handle(req(path=WAIT))))
    await asyncio.sleep(0.05)
    assert held.held == 1
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert held.held == 0 and agent.stats()["in_flight"] == 0
