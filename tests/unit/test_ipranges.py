"""core.ipranges: availability ranges, the pick among them, and a model of the registry's use
of them (registry/ipalloc.py) against a brute-force set of free addresses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openimds.core import ipranges


def test_keys_sort_as_the_addresses_do() -> None:
    v4 = [int(ipaddress.ip_address(a)) for a in ("10.0.0.9", "10.0.0.10", "10.0.1.0", "9.255.0.1")]
    assert sorted(ipranges.key_of(n, 4) for n in v4) == [ipranges.key_of(n, 4)
                                                         for n in sorted(v4)]
    v6 = [int(ipaddress.ip_address(a)) for a in ("fd00::a", "fd00::1:0", "fd00::9", "2001::")]
    assert sorted(ipranges.key_of(n, 6) for n in v6) == [ipranges.key_of(n, 6)
                                                         for n in sorted(v6)]
    assert len(ipranges.key_of(v4[0], 4)) == 4 and len(ipranges.key_of(v6[0], 6)) == 16
    for n in v6:
        assert ipranges.int_of(ipranges.key_of(n, 6)) == n


def test_free_spans() -> None:
    assert ipranges.free_spans([(2, 254)], []) == [(2, 254)]
    assert ipranges.free_spans([(2, 254)], [2, 3, 4, 10, 254, 999]) == [(5, 9), (11, 253)]
    assert ipranges.free_spans([(2, 5), (10, 12)], [5, 10, 11, 12]) == [(2, 4)]
    assert ipranges.free_spans([(2, 3)], [3, 2, 2]) == []
    # a /64 with three ports is four spans, not 2**64 addresses
    big = (1 << 64) - 2
    assert ipranges.free_spans([(1, big)], [1, 5, big]) == [(2, 4), (6, big - 1)]


@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 8)), max_size=4),
       st.sets(st.integers(0, 80), max_size=40))
def test_free_spans_are_the_free_addresses(raw: list[tuple[int, int]], used: set[int]) -> None:
    spans: list[tuple[int, int]] = []
    for start, length in sorted(raw):  # disjoint pools, as parse_pools makes them
        if spans and start <= spans[-1][1]:
            continue
        spans.append((start, start + length))
    free = ipranges.free_spans(spans, used)
    got = [n for a, b in free for n in range(a, b + 1)]
    want = sorted(n for a, b in spans for n in range(a, b + 1) if n not in used)
    assert got == want
    assert all(a <= b for a, b in free) and free == sorted(free)
    for n in range(90):
        assert ipranges.in_spans(spans, n) == any(a <= n <= b for a, b in spans)


def test_carve() -> None:
    assert ipranges.carve((2, 10), 2) == [(3, 10)]
    assert ipranges.carve((2, 10), 10) == [(2, 9)]
    assert ipranges.carve((2, 10), 5) == [(2, 4), (6, 10)]
    assert ipranges.carve((7, 7), 7) == []
    with pytest.raises(ValueError, match="not in span"):
        ipranges.carve((2, 10), 11)


def test_choose() -> None:
    assert ipranges.choose(None, None, None) is None
    assert ipranges.choose(5, None, None) == ("range", 5)
    assert ipranges.choose(5, 3, 3) == ("released", 3)  # a lower released one out of quarantine
    assert ipranges.choose(5, 9, 2) == ("range", 5)  # 2 is quarantined: the range goes first
    assert ipranges.choose(None, None, 2) == ("released", 2)  # nothing else free: held reuse
    assert ipranges.choose(None, 7, 2) == ("released", 7)


class Model:
    """The registry's state (registry/ipalloc.py) on plain Python containers: ranges, the
    released list, the quarantine; each step uses core.ipranges as the SQL side does."""

    def __init__(self, pools: list[tuple[int, int]], used: set[int]) -> None:
        self.pools = ipranges.spans_of(pools)
        self.ranges = ipranges.free_spans(self.pools, used)
        self.released: set[int] = set()
        self.quarantined: set[int] = set()

    def pick(self) -> int | None:
        free = sorted(self.released - self.quarantined)
        choice = ipranges.choose(self.ranges[0][0] if self.ranges else None,
                                 free[0] if free else None,
                                 min(self.released) if self.released else None)
        if choice is None:
            return None
        source, n = choice
        if source == "range":
            self.ranges = ipranges.carve(self.ranges[0], n) + self.ranges[1:]
        else:
            self.released.discard(n)
        return n

    def take(self, n: int) -> None:
        if not ipranges.in_spans(self.pools, n):
            return
        if n in self.released:
            self.released.discard(n)
            return
        at = [s for s in self.ranges if s[0] <= n][-1]
        i = self.ranges.index(at)
        self.ranges[i:i + 1] = ipranges.carve(at, n)

    def release(self, n: int) -> None:
        if ipranges.in_spans(self.pools, n):
            self.released.add(n)
        self.quarantined.add(n)  # the releases table records it either way


ops = st.lists(st.one_of(
    st.just(("pick", 0)), st.just(("pick", 0)), st.just(("pick", 0)),
    st.tuples(st.just("take"), st.integers(0, 40)),
    st.tuples(st.just("release"), st.integers(0, 40)),
    st.just(("expire", 0)),
), max_size=80)


@settings(max_examples=300)
@given(ops, st.sets(st.integers(0, 40), max_size=12))
def test_the_model_picks_the_lowest_free_address_not_quarantined(
        steps: list[tuple[str, int]], initially: set[int]) -> None:
    pools = [(3, 12), (20, 30)]  # 0-2, 13-19 and 31-40 lie outside: asked-for addresses only
    model = Model(pools, initially)
    used = set(initially)
    quarantined: set[int] = set()
    in_pool = {n for a, b in pools for n in range(a, b + 1)}
    for op, n in steps:
        free = sorted(in_pool - used)
        if op == "pick":
            want = next((a for a in free if a not in quarantined), free[0] if free else None)
            assert model.pick() == want
            if want is not None:
                used.add(want)
        elif op == "take" and n not in used:
            model.take(n)
            used.add(n)
        elif op == "release" and n in used:
            model.release(n)
            used.discard(n)
            quarantined.add(n)
        elif op == "expire":
            quarantined.clear()
            model.quarantined.clear()
        # the state holds exactly the free pool addresses, each once
        held = [a for s, e in model.ranges for a in range(s, e + 1)] + sorted(model.released)
        assert sorted(held) == sorted(in_pool - used)
        assert len(held) == len(set(held))
