"""The proxy's own 429 for a source the agent limited (core.proxy_limits, LimitedSources)
and the tarpit's bounds, on the agent's real 429 bytes."""

from __future__ import annotations

import asyncio
import logging

import pytest

from openimds.core.proxy_limits import parse_limited_429
from openimds.core.ratelimit import RateLimiter, Window
from openimds.http.server import Deferred, RawResponse, Response, error_response
from openimds.metadata.proxy import LimitedSources, Tarpit, _Limited


def agent_429(burst_s: float = 10.0) -> bytes:
    """The agent's 429 as it leaves the agent (agent._over_budget's answer): 3 requests at
    once against a burst of 2 per `burst_s` (Retry-After 17 s for 10 s, 2 s for 1 s)."""
    lim = RateLimiter([Window("burst", burst_s, 2), Window("base", 60.0, 100)])
    for _ in range(3):
        verdict = lim.hit("i", 0.0)
    assert not verdict.allowed
    return error_response(
        429, f"rate limit of 2 requests per {burst_s:g} s exceeded for this instance; retry in "
        f"{verdict.retry_after} s", headers=lim.headers(verdict)).encode(keep_alive=True)


def test_parse_and_count_down_the_agents_answer() -> None:
    raw = agent_429()
    got = parse_limited_429(raw)
    assert got is not None
    assert got.retry_after == 17
    assert got.policy == '"burst";q=2;w=10, "base";q=100;w=60'
    assert got.windows == (("burst", 0, 17), ("base", 97, 0))
    assert got.reason == "rate limit of 2 requests per 10 s exceeded for this instance"
    assert got.headers(0.0) == [("Retry-After", "17"), ("RateLimit-Policy", got.policy),
                                ("RateLimit", '"burst";r=0;t=17, "base";r=97;t=0')]
    later = dict(got.headers(3.5))
    assert later["Retry-After"] == "14" and later["RateLimit"].startswith('"burst";r=0;t=14,')
    assert dict(got.headers(60.0))["Retry-After"] == "1"  # never 0
    assert got.body_reason(3.5).endswith("exceeded for this instance; retry in 14 s")


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nRetry-After: 1\r\nRateLimit-Policy: x\r\n"
    b"RateLimit: \"a\";r=0;t=1\r\n\r\n",
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: soon\r\nRateLimit-Policy: x\r\n"
    b"RateLimit: \"a\";r=0;t=1\r\n\r\n",
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nRateLimit-Policy: x\r\n"
    b"RateLimit: \"a\";r=0;t=1;evil\r\n\r\n",
    b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\n",  # no end of head
])
def test_anything_but_a_rate_limit_answer_is_not_remembered(raw: bytes) -> None:
    assert parse_limited_429(raw) is None


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_limited_source_answered_until_retry_after_then_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    lim = LimitedSources(clock=clock, recheck_s=5.0)
    table: dict[str, _Limited] = {}
    other: dict[str, _Limited] = {}  # another listener, the same address
    with caplog.at_level(logging.WARNING, "openimds.metadata.proxy"):
        lim.learn(table, "10.0.0.5", agent_429(1.0), "router=r1")
    assert list(table) == ["10.0.0.5"] and not other and lim.live == 1
    assert lim.episodes == 1
    assert "proxy.rate_limited ip=10.0.0.5 router=r1 retry_after=2" in caplog.text
    clock.now += 0.5
    resp = lim.refusal(table, "10.0.0.5", table["10.0.0.5"])
    assert isinstance(resp, Response) and resp.status == 429
    assert dict(resp.headers)["Retry-After"] == "2"
    assert resp.body.count(b"\n") == 1 and b"retry in 2 s" in resp.body
    assert lim.answered == 1
    clock.now += 1.6  # Retry-After (2 s) over: the agent decides again
    assert lim.refusal(table, "10.0.0.5", table["10.0.0.5"]) is None
    # Limited again right away: the same episode, no second log line.
    caplog.clear()
    lim.learn(table, "10.0.0.5", agent_429(1.0), "router=r1")
    assert lim.episodes == 1 and "proxy.rate_limited" not in caplog.text
    assert lim.live == 1
    # Quiet sources are swept from the table (expired + the episode gap).
    clock.now += 5.0
    lim.sweep(clock.now)
    assert not table and lim.live == 0


def test_long_retry_after_is_rechecked_and_the_table_is_bounded() -> None:
    clock = Clock()
    lim = LimitedSources(clock=clock, recheck_s=5.0, max_entries=2)
    table: dict[str, _Limited] = {}
    lim.learn(table, "a", agent_429(), "router=r")  # Retry-After 17 s
    entry = table["a"]
    clock.now += 4.9
    resp = lim.refusal(table, "a", entry)
    assert resp is not None and dict(resp.headers)["Retry-After"] == "13"  # the agent's
    clock.now += 0.2  # but after recheck_s the agent is asked again
    assert lim.refusal(table, "a", entry) is None
    lim.learn(table, "b", agent_429(), "router=r")
    lim.learn(table, "c", agent_429(), "router=r")  # full: not remembered
    assert sorted(table) == ["a", "b"] and lim.live == 2


def test_tarpit_holds_within_bounds_and_releases() -> None:
    async def run() -> None:
        tarpit = Tarpit(0.05, per_source=2, max_held=3)
        counts: dict[str, int] = {}
        answer = RawResponse(b"x")
        held = [tarpit.hold(counts, "a", answer) for _ in range(3)]
        assert [type(h).__name__ for h in held] == ["_Held", "_Held", "RawResponse"]
        assert counts == {"a": 2} and tarpit.held == 2 and tarpit.overflow == 1
        assert isinstance(tarpit.hold(counts, "b", answer), Deferred)
        assert tarpit.hold(counts, "c", answer) is answer  # global bound
        got: list[object] = []
        first = held[0]
        assert isinstance(first, Deferred)
        first._deliver = got.append
        await asyncio.sleep(0.2)
        assert got == [answer] and tarpit.held == 0 and counts == {}
        again = tarpit.hold(counts, "a", answer)
        assert isinstance(again, Deferred) and tarpit.held == 1
        tarpit.release_all()  # shutdown: timers cancelled, slots free
        assert tarpit.held == 0 and counts == {} and not tarpit.live
        assert Tarpit(0.0).hold({}, "a", answer) is answer  # off

    asyncio.run(run())
