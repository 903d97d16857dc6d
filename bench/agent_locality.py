"""The agent's keep-alive hit path in-process, cycling over the first 100 callers or over N.

    .venv/bin/python bench/agent_locality.py [--instances 10000] [--rounds 5]
                                             [--requests 100000] [--profile]

The real `HttpProtocol` (known heads and identity lines, as `agent_cli` sets them) and
`MetadataAgent` (its cache, memos and access line, written to a file) with a fake registry
and an upstream pool whose connection answers every request from inside `write()`: the
user-space work per request without the event loop's sockets. As scale_bench's steady
rounds: every caller warmed with 4 paths, then 100 keep-alive connections, each cycling
over its own 1/100 of the set, with meta_data.json heads as the bench writes them (no
request ID). `first100` cycles over the first 100 callers, `all` over every one, in the same
process, rounds interleaved; the start-up heap is frozen as `agent_cli` does. Same code
path in both (every request a hit): the difference is what a request touches per caller.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import io
import logging
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import uvloop  # noqa: E402

# bench/hop_python.py's in-process transports: an upstream that answers every request at once
# with its ANSWER, a client that drops the answers (its peer, unused behind the agent's socket)
from hop_python import _Client, _Upstream  # noqa: E402

from openimds.config import MetricsSettings, Settings  # noqa: E402
from openimds.http.client import UpstreamPool, _RawConn  # noqa: E402
from openimds.http.server import HttpProtocol, Limits  # noqa: E402
from openimds.log import access_line  # noqa: E402
from openimds.metadata import agent as agent_mod  # noqa: E402
from openimds.metadata.agent import MetadataAgent  # noqa: E402

PATHS = ("/openstack/latest/meta_data.json", "/openstack/latest/network_data.json",
         "/latest/meta-data/instance-id", "/latest/meta-data/local-ipv4")
CONNS = 100


def request(router_id: str, ip: str, path: str) -> bytes:
    """As bench/scale_bench.py writes it."""
    return (f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/24.1\r\n"
            f"Accept: */*\r\nX-Forwarded-For: {ip}\r\nX-Neutron-Router-ID: {router_id}\r\n"
            "\r\n").encode()


class _Registry:
    def __init__(self) -> None:
        self.ports: dict[tuple[str, str], list[dict[str, str]]] = {}

    async def lookup(self, ip: str, *, router_id: str | None = None,
                     network_id: str | None = None) -> dict[str, Any]:
        return {"revision": 1, "ports": self.ports.get((router_id or network_id or "", ip), [])}


def _vms(n: int) -> list[tuple[str, str]]:
    """(router id, ip) per instance, 10 per router, as scale_bench's shape."""
    out = []
    for i in range(n):
        r = i // 10
        out.append((f"{r:08x}-aaaa-bbbb-cccc-{r:012x}", f"10.{r // 250}.{r % 250}.{10 + i % 10}"))
    return out


async def run(args: argparse.Namespace) -> dict[str, list[float]]:
    loop = asyncio.get_running_loop()
    settings = dataclasses.replace(
        Settings(), metadata_proxy_shared_secret="bench",
        metrics=dataclasses.replace(MetricsSettings(), enabled=False))
    log_file = open(Path(tempfile.mkdtemp(prefix="agent-locality-")) / "access.log", "w")
    access_line.configure(log_file, "agent")
    logging.getLogger("openimds.access").setLevel(logging.INFO)
    registry = _Registry()
    vms = _vms(args.instances)
    for k, (rid, ip) in enumerate(vms):
        registry.ports[(rid, ip)] = [{
            "id": f"port-{k}", "network_id": "net", "device_id": f"inst-{k:08d}",
            "device_owner": "compute:nova", "project_id": "proj"}]
    pool = UpstreamPool(size=64, raw_only=True, host="127.0.0.1", port=1)
    up = _RawConn(1 << 20)
    up.connection_made(_Upstream(up))  # type: ignore[arg-type]
    pool._idle.append(up)
    agent = MetadataAgent(settings, registry=registry, upstream=pool, feed_up=lambda: True)
    agent.apply_batch({"revision": 0, "changes": [], "resync": False})
    limits = Limits(known_heads=True, identity_lines=agent_mod.IDENTITY_LINES)
    conns = []
    for _ in range(CONNS):
        c = HttpProtocol(agent.handle, limits, loop)
        c.connection_made(_Client())  # type: ignore[arg-type]
        conns.append(c)
    # warm, as scale_bench: every caller's 4 paths once (a miss each: a lookup)
    for rnd in range(1):
        for k, (rid, ip) in enumerate(vms):
            c = conns[k % CONNS]
            for p in PATHS:
                c.data_received(request(rid, ip, p))
                while c._busy:
                    await asyncio.sleep(0)
            if rnd and k % 64 == 0:
                await asyncio.sleep(0)
    gc.collect()
    gc.freeze()
    gc.set_threshold(20000, 20, 20)
    sets = {"first100": [request(rid, ip, PATHS[0]) for rid, ip in vms[:100]],
            "all": [request(rid, ip, PATHS[0]) for rid, ip in vms],
            # the first 100's requests as N distinct buffers: the bench's own reads
            "copies": [bytes(bytearray(request(*vms[k % 100], PATHS[0])))
                       for k in range(len(vms))]}
    got: dict[str, list[float]] = {k: [] for k in sets}

    async def cycle(reqs: list[bytes], n: int) -> None:
        step = max(1, len(reqs) // CONNS)
        at = [k * step for k in range(CONNS)]
        total = len(reqs)
        done = 0
        while done < n:
            for k, c in enumerate(conns):
                c.data_received(reqs[at[k] % total])
                at[k] += 1
            done += CONNS
            await asyncio.sleep(0)  # the access line's flush, as the loop runs it

    for reqs in sets.values():  # one pass each before measuring
        await cycle(reqs, len(reqs))
    hits0 = agent.resolver.stats.hits
    for _ in range(args.rounds):
        for name, reqs in sets.items():
            t = time.process_time()
            await cycle(reqs, args.requests)
            got[name].append((time.process_time() - t) / args.requests * 1e6)
    from openimds.http import server
    for table in server._tables.values():
        old = getattr(table, "exact_old", {})
        print(f"known heads: {len(table.known)} shapes, {len(table.exact)} + {len(old)} exact")
    assert agent.resolver.stats.hits - hits0 >= args.rounds * len(sets) * args.requests
    if args.profile:
        for name, reqs in sets.items():
            prof = cProfile.Profile()
            prof.enable()
            await cycle(reqs, args.requests)
            prof.disable()
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
            print(f"== profile {name}\n{out.getvalue()}")
    return got


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--instances", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--known-max", type=int, default=0,
                   help="experiment: the server's known-head tables' bound")
    p.add_argument("--exact-probe", type=int, default=0,
                   help="experiment: probe the exact table 1 read in N at no credit")
    args = p.parse_args()
    if args.known_max:
        from openimds.http import server
        server._KNOWN_MAX = args.known_max
    if args.exact_probe:
        from openimds.http import server
        server._EXACT_PROBE = args.exact_probe
    got = uvloop.run(run(args))
    f = got["first100"]
    print(f"us per request, {args.rounds} interleaved rounds of {args.requests:,}: "
          f"first100 {statistics.median(f):.2f} ({min(f):.2f}-{max(f):.2f})")
    for name in ("all", "copies"):
        a = got[name]
        ratios = [x / y for x, y in zip(a, f, strict=True)]
        print(f"  {name} {statistics.median(a):.2f} ({min(a):.2f}-{max(a):.2f}); "
              f"{name} / first100 {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
