"""What the IP reuse lease costs (registry/reuse.py, metadata/feed_lease.py), in process.

    .venv/bin/python bench/lease_bench.py [--rounds 5] [--calls 200000] [--polls 2000]

1. The agent's hit path: `Resolver.cached(caller)` for a cached caller, with the trust check
   as before the lease (the feed is live: `follower.registry_up`) and as now (live and within
   the lease: one more clock read). Both agents are built the same way and timed in
   interleaved rounds; prints ns per call, the difference and the ratio.
2. The registry's side of the shorter long-poll: an idle agent now asks `/v1/changes` every
   0.3 × lease (0.6 s) instead of holding one call for 30 s. Times `Registry.changes(head)`
   on a SQLite registry with 500 instances (the store read an idle poll costs; the HTTP layer
   comes on top) and prints the registry CPU share per agent worker at both poll rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from openimds.config import Settings  # noqa: E402
from openimds.core.caller import Caller, Resolution  # noqa: E402
from openimds.metadata.agent import MetadataAgent  # noqa: E402
from openimds.metadata.feed_lease import POLL_SHARE  # noqa: E402
from openimds.registry.reuse import LEASE_S  # noqa: E402
from openimds.registry.service import Registry  # noqa: E402
from openimds.registry.store import Store  # noqa: E402

CALLER = Caller("10.0.0.5", router_id="router-1")
OLD_WAIT_S = 30.0


def agent(*, lease: bool) -> MetadataAgent:
    settings = dataclasses.replace(Settings(), metadata_proxy_shared_secret="s")
    follower = types.SimpleNamespace(registry_up=True)
    feed_up = None if lease else (lambda: bool(getattr(follower, "registry_up", False)))
    a = MetadataAgent(settings, registry=types.SimpleNamespace(), upstream=Any,  # type: ignore[arg-type]
                      feed_up=feed_up)
    a._follower = follower
    a.apply_batch({"revision": 1, "changes": [], "resync": True})
    a.lease.until = float("inf")  # renewed: the feed answers in time
    a.cache.put(CALLER, Resolution("inst-1", "proj", "port-1", "net-1"), 1)
    assert a.resolver.cached(CALLER) is not None and a.trusts_cache()
    return a


def time_hits(a: MetadataAgent, calls: int) -> float:
    cached = a.resolver.cached
    t0 = time.perf_counter()
    for _ in range(calls):
        cached(CALLER)
    return (time.perf_counter() - t0) / calls * 1e9


def time_polls(polls: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{tmp}/registry.sqlite")
        store.create_schema()
        reg = Registry(store)
        net = reg.create_network({"name": "n"})
        reg.create_subnet({"network_id": net["id"], "cidr": "10.0.0.0/16"})
        for i in range(500):
            reg.create_instance({"name": f"vm{i}", "network_id": net["id"]})
        head = int(reg.health()["revision"])
        for _ in range(50):
            reg.changes(head, None)
        t0 = time.process_time()
        for _ in range(polls):
            reg.changes(head, None)
        took = (time.process_time() - t0) / polls * 1e6
        store.dispose()
        return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200_000)
    ap.add_argument("--polls", type=int, default=2000)
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()} cores={os.cpu_count()} "
          f"python={platform.python_version()} load={os.getloadavg()}")
    before, after = agent(lease=False), agent(lease=True)
    old: list[float] = []
    new: list[float] = []
    for r in range(args.rounds):
        for a, out in ((before, old), (after, new)) if r % 2 == 0 else (
                (after, new), (before, old)):
            out.append(time_hits(a, args.calls))
    ratios = [n / o for n, o in zip(new, old, strict=True)]
    print("hit path: Resolver.cached(caller), ns per call, medians of "
          f"{args.rounds} interleaved rounds of {args.calls:,}")
    print(f"  before the lease (feed live)      {statistics.median(old):7.1f}  "
          f"(min {min(old):.1f}, max {max(old):.1f})")
    print(f"  with the lease (live, in lease)   {statistics.median(new):7.1f}  "
          f"(min {min(new):.1f}, max {max(new):.1f})")
    # on a shared machine the fastest round is the least disturbed: compare those too
    print(f"  fastest rounds: before {min(old):.1f}, with {min(new):.1f}, difference "
          f"{min(new) - min(old):+.1f} ns")
    print(f"  difference {statistics.median(new) - statistics.median(old):+.1f} ns, "
          f"ratio with/before {statistics.median(ratios):.3f} "
          f"({min(ratios):.3f}-{max(ratios):.3f})")
    poll_us = time_polls(args.polls)
    every_s = LEASE_S * POLL_SHARE
    print(f"registry: an idle /v1/changes read costs {poll_us:.0f} us of CPU (store only)")
    print(f"  per agent worker: one poll every {every_s:.1f} s = "
          f"{poll_us / every_s / 1e4:.4f} % of a core "
          f"(was every {OLD_WAIT_S:.0f} s = {poll_us / OLD_WAIT_S / 1e4:.5f} %; "
          f"x{OLD_WAIT_S / every_s:.0f})")
    print(f"# load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
