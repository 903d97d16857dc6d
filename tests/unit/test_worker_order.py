"""`http.client.worker_order` and `_SpreadIdle.pop`: where a spread pool opens its next
connection, and whose idle connection its next request takes."""

import random
from collections import Counter

import pytest

from openimds.http.client import (
    REFUSED_SKIP_S,
    Worker,
    _Conn,
    _SpreadIdle,
    worker_order,
)


def test_fewest_connections_first_ties_in_listed_order_at_first() -> None:
    counts: dict[Worker, int] = {8781: 2, 8782: 1}
    assert worker_order([8781, 8782, 8783], counts, {}, 100.0) == ([8783, 8782, 8781], False)
    assert worker_order(["/s.w0", "/s.w1"], {}, {}, 0.0) == (["/s.w0", "/s.w1"], False)


def test_ties_go_in_turn_from_the_worker_after_the_one_connected_to_last() -> None:
    assert worker_order([0, 1, 2], {}, {}, 0.0, after=0) == ([1, 2, 0], False)
    assert worker_order([0, 1, 2], {}, {}, 0.0, after=2) == ([0, 1, 2], False)
    # fewest first still; the turn only orders the ties
    assert worker_order([0, 1, 2], {1: 1}, {}, 0.0, after=0) == ([2, 0, 1], False)
    assert worker_order([0, 1, 2], {0: 1}, {}, 0.0, after=1) == ([2, 1, 0], False)
    # the last one gone from the list (its socket file removed): from the first
    assert worker_order(["/s.w0", "/s.w1"], {}, {}, 0.0, after="/s.w2") == (
        ["/s.w0", "/s.w1"], False)


def test_pools_opened_at_equal_counts_again_and_again_alternate_the_odd_one() -> None:
    """A pool that finds nothing idle connects at equal counts over and over (all its
    connections ended): 3 at a time, 10 times, the pool's way (the turn after each pick).
    Ties to the first gave worker 0 two of every three (20/10)."""
    got = {0: 0, 1: 0}
    last: Worker | None = None
    for _ in range(10):
        counts: dict[Worker, int] = {}
        for _ in range(3):
            first = worker_order([0, 1], counts, {}, 0.0, last)[0][0]
            counts[first] = counts.get(first, 0) + 1
            got[int(first)] += 1
            last = first
    assert got == {0: 15, 1: 15}


def test_a_burst_alternates_when_each_pick_is_counted() -> None:
    """The pool counts a connection as it starts it: n connects split within 1."""
    counts: dict[Worker, int] = {}
    for _ in range(7):
        first = worker_order([0, 1], counts, {}, 0.0)[0][0]
        counts[first] = counts.get(first, 0) + 1
    assert counts == {0: 4, 1: 3}


def test_a_refused_worker_is_left_out_for_a_while_and_says_off_place() -> None:
    refused: dict[Worker, float] = {8781: 10.0}
    assert worker_order([8781, 8782], {}, refused, 10.0) == ([8782], True)
    assert worker_order([8781, 8782], {}, refused, 10.0 + REFUSED_SKIP_S - 0.01) == (
        [8782], True)
    assert worker_order([8781, 8782], {8782: 1}, refused, 10.0 + REFUSED_SKIP_S) == (
        [8781, 8782], False)
    # every one refused: none to try (the pool falls back to its shared address)
    assert worker_order([8781], {}, refused, 10.5) == ([], True)
    assert worker_order([], {}, {}, 0.0) == ([], False)


def pool(held: dict[Worker, int], idle: dict[Worker, int] | None = None) -> _SpreadIdle:
    """A pool's idle list for `held` connections per worker, of which `idle` (all when
    None) are idle (real connection objects, never connected: the pick only reads their
    worker); queues in the order of `held`."""
    spread = _SpreadIdle(dict(held))
    for worker, n in (held if idle is None else idle).items():
        for _ in range(n):
            conn = _Conn(1024)
            conn.worker = worker
            spread.append(conn)
    return spread


def picks(idle: _SpreadIdle, n: int) -> list[Worker | None]:
    return [idle.pop().worker for _ in range(n)]


def test_the_pick_takes_the_fewest_in_flight_not_the_most_idle() -> None:
    # A holds 3 (1 idle: 2 in flight), B holds 2 (1 idle: 1 in flight): B
    assert picks(pool({0: 3, 1: 2}, {0: 1, 1: 1}), 1) == [1]
    # A 3 held, 2 idle (1 in flight); B 1 held, idle: B, though A has the most idle ones
    assert picks(pool({0: 3, 1: 1}, {0: 2, 1: 1}), 1) == [1]
    # a worker with no idle connection is not taken, however few it has in flight
    emptied = pool({0: 1, 1: 3}, {0: 1, 1: 1})
    assert picks(emptied, 2) == [0, 1]
    with pytest.raises(IndexError):
        emptied.pop()


def test_the_pick_ties_go_in_turn_the_turn_after_the_one_taken() -> None:
    # all idle: ties from worker 0, then each pick leaves the other fewer in flight
    assert picks(pool({0: 3, 1: 2}), 5) == [0, 1, 0, 1, 0]
    assert picks(pool({0: 1, 1: 1, 2: 1}), 3) == [0, 1, 2]
    # a forced pick moves the turn too: the next tie goes to the other worker
    forced = pool({0: 2, 1: 2}, {0: 1, 1: 2})
    assert picks(forced, 2) == [1, 0]
    # the shared address (not counted in held) is taken as having nothing in flight
    shared = pool({0: 2}, {0: 1})
    conn = _Conn(1024)
    conn.worker = None
    shared.append(conn)
    assert picks(shared, 2) == [None, 0]


@pytest.mark.parametrize("at_once", [1, 2, 3, 4])
def test_a_pool_odd_connection_gets_no_more_requests_steady(at_once: int) -> None:
    """A pool of 5 holds 3 on worker 0, 2 on worker 1 (as the agent's do): requests taken
    `at_once` and given back, 100 times, split evenly while the pool is not full. Main's
    "most idle" rule gave worker 0 every request one at a time, 2 of 3 three at a time."""
    idle = pool({0: 3, 1: 2})
    got: Counter[Worker | None] = Counter()
    for _ in range(100):
        taken = [idle.pop() for _ in range(at_once)]
        got.update(conn.worker for conn in taken)
        for conn in reversed(taken):
            idle.append(conn)
    assert got[0] == got[1] == 50 * at_once, got


def test_a_pool_odd_connection_gets_no_more_requests_at_random() -> None:
    """Requests taken and given back in a seeded random order, at most 4 in flight of 5
    connections (3 on worker 0): worker 0 gets 0.497 (main's rule: 0.684). With all 5 in
    flight its third connection is busy too: the pool has no even split then."""
    rng = random.Random(7)
    idle = pool({0: 3, 1: 2})
    got: Counter[Worker | None] = Counter()
    busy: list[_Conn] = []
    for _ in range(20000):
        if busy and (len(busy) == 4 or rng.random() < 0.5):
            idle.append(busy.pop(rng.randrange(len(busy))))
        else:
            conn = idle.pop()
            got[conn.worker] += 1
            busy.append(conn)
    assert 0.48 <= got[0] / (got[0] + got[1]) <= 0.52, got


def test_a_connection_lost_while_idle_is_discarded_not_counted_idle() -> None:
    """2 held and idle on each worker; worker 0's bottom one is lost (the pool takes it off
    `held` and discards it). Left in, worker 0 looked to have -1 in flight and took every
    pick; discarded, the picks alternate. Discarding one not idle changes nothing."""
    held: dict[Worker, int] = {0: 2, 1: 2}
    idle = _SpreadIdle(held)
    conns = {}
    for worker in (0, 1, 0, 1):
        conn = _Conn(1024)
        conn.worker = worker
        idle.append(conn)
        conns.setdefault(worker, []).append(conn)
    held[0] -= 1
    idle.discard(conns[0][0])
    assert len(idle) == 3
    taken = idle.pop()
    idle.discard(taken)  # in use, not idle: nothing to take off
    assert len(idle) == 2
    idle.append(taken)
    got = []
    for _ in range(6):
        conn = idle.pop()
        got.append(conn.worker)
        idle.append(conn)
    assert got.count(0) == got.count(1) == 3, got
