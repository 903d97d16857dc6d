"""The agent's per-instance budget ([metadata_rate_limiting]): fake registry and API."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from openimds.config import RateLimitSettings, Settings
from openimds.errors import ConfigError
from openimds.http.server import Response
from openimds.metadata.agent import MetadataAgent, limiter_from_settings
from tests.unit.test_agent_handler import SECRET, FakeApi, FakeRegistry, R, call, req, settle


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(**rl: object) -> tuple[MetadataAgent, FakeRegistry, FakeApi, Clock]:
    opts: dict[str, object] = {"rate_limit_enabled": True, "burst_query_rate_limit": 3,
                               "base_query_rate_limit": 5, "base_window_duration": 60.0}
    opts.update(rl)
    settings = dataclasses.replace(
        Settings(), metadata_proxy_shared_secret=SECRET,
        metadata_rate_limiting=dataclasses.replace(RateLimitSettings(), **opts))
    reg, api, clock = FakeRegistry(), FakeApi(), Clock()
    agent = MetadataAgent(settings, registry=reg, upstream=api, feed_up=lambda: True,
                          clock=clock)
    agent.apply_batch({"revision": 0, "changes": [], "resync": False})
    return agent, reg, api, clock


async def test_over_the_burst_is_429_with_headers_and_one_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agent, reg, api, _ = make()
    caplog.set_level(logging.WARNING)
    reg.add(R, "10.0.0.5", "inst-1")
    assert [(await call(agent, req()))[0] for _ in range(3)] == [200, 200, 200]
    resp = await settle(agent.handle(req()))
    assert isinstance(resp, Response) and resp.status == 429
    headers = dict(resp.headers)
    assert int(headers["Retry-After"]) >= 1
    assert headers["RateLimit-Policy"] == '"burst";q=3;w=10, "base";q=5;w=60'
    assert headers["RateLimit"].startswith('"burst";r=0;t=')
    assert resp.body.count(b"\n") == 1 and b"3 requests per 10 s" in resp.body
    assert len(api.seen) == 3  # the denied one never reached the API
    # The operator sees who: one line per episode, naming instance and IP; and a counter.
    await call(agent, req())
    lines = [r.getMessage() for r in caplog.records if "agent.rate_limited" in r.getMessage()]
    assert len(lines) == 1 and "instance=inst-1" in lines[0] and "ip=10.0.0.5" in lines[0]
    assert agent.stats()["rate_limited_429"] == 2
    assert agent.stats()["statuses"]["429"] == 2


async def test_budget_is_per_instance_across_v4_and_v6_addresses() -> None:
    agent, reg, _, _ = make(ip_versions=("4", "6"))
    reg.add(R, "10.0.0.5", "inst-1")
    reg.add(R, "fd00::5", "inst-1")
    reg.add(R, "10.0.0.6", "inst-2")
    assert (await call(agent, req(xff="10.0.0.5")))[0] == 200
    assert (await call(agent, req(xff="fd00::5")))[0] == 200
    assert (await call(agent, req(xff="10.0.0.5")))[0] == 200
    assert (await call(agent, req(xff="fd00::5")))[0] == 429  # 4th of one instance
    assert (await call(agent, req(xff="10.0.0.6")))[0] == 200  # someone else is not


async def test_token_puts_share_the_budget() -> None:
    agent, reg, _, _ = make()
    reg.add(R, "10.0.0.5", "inst-1")
    put = req(method="PUT", path="/latest/api/token",
              extra=[(b"x-aws-ec2-metadata-token-ttl-seconds", b"60")])
    for _ in range(3):
        assert (await call(agent, put))[0] == 200
    assert (await call(agent, req(path="/latest/meta-data/")))[0] == 429


async def test_only_the_configured_family_counts() -> None:
    agent, reg, _, _ = make()  # ip_versions default: 4
    reg.add(R, "fd00::5", "inst-1")
    assert [(await call(agent, req(xff="fd00::5")))[0] for _ in range(10)] == [200] * 10


async def test_budget_comes_back_after_retry_after() -> None:
    agent, reg, _, clock = make()
    reg.add(R, "10.0.0.5", "inst-1")
    for _ in range(3):
        await call(agent, req())
    resp = await settle(agent.handle(req()))
    assert isinstance(resp, Response) and resp.status == 429
    clock.now += int(dict(resp.headers)["Retry-After"])
    assert (await call(agent, req()))[0] == 200


async def test_disabled_by_default_and_bad_versions_rejected() -> None:
    assert limiter_from_settings(Settings())[0] is None
    bad = dataclasses.replace(Settings(), metadata_rate_limiting=dataclasses.replace(
        RateLimitSettings(), ip_versions=("4", "5")))
    with pytest.raises(ConfigError, match="ip_versions"):
        limiter_from_settings(bad)
