"""core.ratelimit: sliding-window budgets per key, with the clock passed in."""

from __future__ import annotations

import pytest

from openimds.core.ratelimit import RateLimiter, Window, parse_ip_versions


def hits(lim: RateLimiter, key: str, n: int, now: float) -> list[bool]:
    return [lim.hit(key, now).allowed for _ in range(n)]


def test_n_pass_then_429_as_neutrons_functional_test() -> None:
    # Neutron: base limit 2 -> 2 x 200 then 429.
    lim = RateLimiter([Window("base", 10, 2)])
    assert hits(lim, "i", 3, 0.0) == [True, True, False]


def test_keys_are_independent() -> None:
    lim = RateLimiter([Window("base", 10, 1)])
    assert lim.hit("a", 0.0).allowed
    assert not lim.hit("a", 0.1).allowed
    assert lim.hit("b", 0.1).allowed


def test_burst_within_base() -> None:
    # Neutron: burst 2 per 5 s within base 10 per 60 s.
    lim = RateLimiter([Window("burst", 5, 2), Window("base", 60, 10)])
    assert hits(lim, "i", 3, 0.0) == [True, True, False]
    v = lim.hit("i", 0.0)
    assert not v.allowed and v.window is not None and v.window.name == "burst"


def test_sliding_window_weights_the_previous_period() -> None:
    lim = RateLimiter([Window("w", 10, 10)])
    assert all(hits(lim, "i", 10, 0.0))
    # Half-way into the next period the previous 10 still count as 5: 5 more pass.
    assert hits(lim, "i", 6, 15.0) == [True] * 5 + [False]


def test_denied_requests_are_counted_too() -> None:
    lim = RateLimiter([Window("w", 10, 2)])
    hits(lim, "i", 2, 0.0)
    for _ in range(20):  # a client hammering stays blocked ...
        assert not lim.hit("i", 5.0).allowed
    # ... well past the first window: 22 requests still weigh 22 * 0.5 = 11 > 2 at t=15
    assert not lim.hit("i", 15.0).allowed


def test_retry_after_is_when_the_next_request_passes() -> None:
    lim = RateLimiter([Window("w", 10, 2)])
    hits(lim, "i", 2, 0.0)
    v = lim.hit("i", 1.0)  # three in this period: the next period must weigh them <= 1
    assert not v.allowed
    # prev'=3: 3 * (1 - f) <= 1 -> f >= 2/3: at t = 10 + 6.67 -> ceil(15.67) = 16 from t=1
    assert v.retry_after == 16
    # Probe the promise with a fresh limiter in the same state (probing counts too).
    lim2 = RateLimiter([Window("w", 10, 2)])
    hits(lim2, "i", 3, 0.0)
    assert lim2.hit("i", 1.0 + 16).allowed


def test_retry_after_promise_holds_for_many_states() -> None:
    for limit in (1, 2, 5, 10):
        for flood in (1, 3, 10, 40):
            for t in (0.0, 3.0, 9.9):
                lim = RateLimiter([Window("burst", 10, limit), Window("base", 30, limit * 3)])
                probe = RateLimiter([Window("burst", 10, limit), Window("base", 30, limit * 3)])
                v = None
                for _ in range(limit * 3 + flood):
                    v = lim.hit("i", t)
                    probe.hit("i", t)
                assert v is not None and not v.allowed
                assert v.retry_after >= 1
                # Coming back exactly when told: it passes.
                assert probe.hit("i", t + v.retry_after).allowed, (limit, flood, t, v)


def test_one_second_early_is_still_denied_for_a_single_window() -> None:
    lim = RateLimiter([Window("w", 10, 5)])
    probe = RateLimiter([Window("w", 10, 5)])
    for _ in range(6):
        v = lim.hit("i", 0.0)
        probe.hit("i", 0.0)
    assert not v.allowed
    assert not probe.hit("i", v.retry_after - 1.0).allowed


def test_headers_follow_the_ietf_draft_syntax() -> None:
    lim = RateLimiter([Window("burst", 10, 2), Window("base", 60, 100)])
    hits(lim, "i", 2, 0.0)
    v = lim.hit("i", 0.0)
    headers = dict(lim.headers(v))
    assert headers["RateLimit-Policy"] == '"burst";q=2;w=10, "base";q=100;w=60'
    assert headers["Retry-After"] == str(v.retry_after)
    burst, base = headers["RateLimit"].split(", ")
    assert burst.startswith('"burst";r=0;t=')
    assert base.startswith('"base";r=97;t=0')
    assert int(burst.rsplit("t=", 1)[1]) == v.retry_after


def test_started_marks_the_first_denial_of_an_episode() -> None:
    lim = RateLimiter([Window("w", 1, 1)])
    assert lim.hit("i", 0.0).allowed
    assert lim.hit("i", 0.0).started
    assert not lim.hit("i", 0.0).started
    assert lim.hit("i", 10.0).allowed
    assert lim.hit("i", 10.0).started
    assert lim.denied("i") == 3
    assert lim.denied_total == 3


def test_table_size_is_bounded_idle_keys_first() -> None:
    lim = RateLimiter([Window("w", 1, 1)], max_keys=3)
    lim.hit("old", 0.0)
    lim.hit("b", 10.0)
    lim.hit("c", 10.0)
    lim.hit("d", 10.0)  # full: "old" is idle past 2 windows and goes
    assert len(lim) == 3 and lim.denied("old") == 0
    assert not lim.hit("b", 10.0).allowed  # b kept its count
    lim.hit("e", 10.0)  # nothing idle: the oldest-inserted goes
    assert len(lim) == 3


def test_bad_windows_and_ip_versions() -> None:
    with pytest.raises(ValueError):
        Window("w", 0, 1)
    with pytest.raises(ValueError):
        Window("w", 1, 0)
    with pytest.raises(ValueError):
        RateLimiter([])
    assert parse_ip_versions(["4"]) == {4}
    assert parse_ip_versions(["4", " 6"]) == {4, 6}
    with pytest.raises(ValueError, match="'5'"):
        parse_ip_versions(["5"])
    with pytest.raises(ValueError):
        parse_ip_versions([])
