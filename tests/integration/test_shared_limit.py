"""metadata.shared_limit: one rate-limit table for forked agent workers (real processes)."""

from __future__ import annotations

import os
import time

from openimds.core.ratelimit import Window
from openimds.metadata.shared_limit import SharedRateLimiter


def _in_children(lim: SharedRateLimiter, n: int, work: list[str]) -> list[int]:
    """Fork n processes; each hits every key of `work` at one instant; their allowed counts."""
    now = time.monotonic()
    pipes, pids = [], []
    for _ in range(n):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: count, report, leave without running anything else
            os.close(r)
            allowed = sum(lim.hit(key, now).allowed for key in work)
            os.write(w, str(allowed).encode())
            os._exit(0)
        os.close(w)
        pipes.append(r)
        pids.append(pid)
    out = []
    for r, pid in zip(pipes, pids, strict=True):
        out.append(int(os.read(r, 64) or b"-1"))
        os.close(r)
        assert os.waitpid(pid, 0)[1] == 0
    return out


def test_forked_workers_share_one_exact_budget() -> None:
    lim = SharedRateLimiter([Window("burst", 10, 40), Window("base", 60, 100)], max_keys=1024)
    allowed = _in_children(lim, 4, ["inst-1"] * 30)  # 120 requests over 4 workers
    assert sum(allowed) == 40  # per-worker tables would have let 4 x 30 = 120 through
    assert lim.denied("inst-1") == 80
    # Another instance has its own budget, in the same table.
    assert sum(_in_children(lim, 2, ["inst-2"] * 10)) == 20
    assert len(lim) == 2


def test_same_semantics_as_the_dict_table() -> None:
    lim = SharedRateLimiter([Window("w", 10, 2)], max_keys=64)
    assert [lim.hit("i", 0.0).allowed for _ in range(3)] == [True, True, False]
    v = lim.hit("i", 1.0)
    assert not v.allowed and not v.started and v.retry_after >= 1
    assert lim.hit("i", 1.0 + 40).allowed  # long idle: allowed again


def test_a_full_neighbourhood_gives_up_the_idle_slot() -> None:
    lim = SharedRateLimiter([Window("w", 10, 1)], max_keys=8)  # 8 slots: one neighbourhood
    for k in range(8):
        assert lim.hit(f"k{k}", float(k)).allowed
    assert len(lim) == 8
    assert lim.hit("new", 8.0).allowed  # nothing expired: takes the slot of k0, idle longest
    assert len(lim) == 8 and lim.denied("k0") == 0
    assert not lim.hit("k7", 8.0).allowed  # the others kept their counts
    assert lim.hit("later", 40.0).allowed  # all idle past two windows: any slot is free
