"""`http.client.worker_order`: where a spread pool opens its next connection."""

from openimds.http.client import REFUSED_SKIP_S, Worker, worker_order


def test_fewest_connections_first_ties_in_listed_order() -> None:
    counts: dict[Worker, int] = {8781: 2, 8782: 1}
    assert worker_order([8781, 8782, 8783], counts, {}, 100.0) == ([8783, 8782, 8781], False)
    assert worker_order(["/s.w0", "/s.w1"], {}, {}, 0.0) == (["/s.w0", "/s.w1"], False)


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
