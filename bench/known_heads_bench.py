"""In-process cost of the agent's known heads (`HttpProtocol._take_known`) per request,
this tree against the code of other trees in the same run (each in its own process, rounds
interleaved), on heads as the proxy writes them:

- keepalive: one caller asking 4 paths again and again (a keep-alive connection);
- first100: 100 callers x 4 paths, cycled (all kept, as scale_bench's first 100);
- all10k: 10,000 callers x 4 paths, cycled (each head back every 40,000 requests).

    .venv/bin/python bench/known_heads_bench.py --baseline /tmp/base-e038794 \\
        --baseline /tmp/base-8f3faee

Each DIR holds a `src` (git archive COMMIT src | tar -x -C DIR). Prints us per request
(median over rounds; process CPU time, so that other processes on the machine count less)
and the ratio this tree / each baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = {"keepalive": 1, "first100": 100, "all10k": 10_000}
PATHS = ("/openstack/latest/meta_data.json", "/latest/meta-data/", "/openstack",
         "/latest/meta-data/instance-id")


def _heads(callers: int) -> list[bytes]:
    out = []
    for c in range(callers):
        ip = f"10.{c // 65536}.{(c // 256) % 256}.{c % 256}"
        router = f"{c:08x}-1111-2222-3333-444455556666"
        for path in PATHS:
            out.append(b"\r\n".join((
                b"GET " + path.encode() + b" HTTP/1.1", b"Host: 169.254.169.254",
                b"User-Agent: Cloud-Init/23.4", b"Accept: */*",
                b"Accept-Encoding: gzip, deflate", b"Connection: keep-alive",
                b"X-Forwarded-For: " + ip.encode(),
                b"X-Neutron-Router-ID: " + router.encode(),
                b"X-Openimds-Request-Id: req-",  # the ID's value follows per request
            )))
    return out


def child(scenario: str, n: int) -> None:
    """Run in the measured tree: print us per request."""
    import asyncio
    import dataclasses
    import time

    from openimds.http import server

    callers = SCENARIOS[scenario]
    kw: dict[str, object] = {"known_heads": True}
    if "identity_lines" in {f.name for f in dataclasses.fields(server.Limits)}:
        kw["identity_lines"] = (b"X-Forwarded-For", b"X-Neutron-Router-ID",
                                b"X-Neutron-Network-ID")
    limits = server.Limits(**kw)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()

    async def handler(req: object) -> object:  # never called: requests are only queued
        raise AssertionError

    proto = server.HttpProtocol(handler, limits, loop)  # type: ignore[arg-type]
    heads = _heads(callers)
    reqs = [h + b"%08d\r\n\r\n" % i for i, h in enumerate(heads)]
    take = proto._take_known
    queue = proto._queue
    for _ in range(3):  # seen, then kept, then (this tree) kept exactly
        for data in reqs:
            take(data)
            queue.clear()
    total = len(reqs)
    i = 0
    t0 = time.process_time()
    for _ in range(n):
        take(reqs[i])
        queue.clear()
        i += 1
        if i == total:
            i = 0
    dt = time.process_time() - t0
    print(json.dumps({"us": dt / n * 1e6}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", action="append", default=[], type=Path, metavar="DIR")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--requests", type=int, default=200_000)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args.requests)
        return
    trees = [("this", REPO / "src")] + [(str(b), b.resolve() / "src") for b in args.baseline]
    got: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for scenario in SCENARIOS:
            for name, src in trees:
                env = {**os.environ, "PYTHONPATH": str(src)}
                out = subprocess.run(
                    [sys.executable, __file__, "--child", scenario,
                     "--requests", str(args.requests)],
                    env=env, check=True, capture_output=True, text=True).stdout
                got.setdefault((scenario, name), []).append(json.loads(out)["us"])
    print(f"us per request, median of {args.rounds} interleaved rounds")
    for scenario in SCENARIOS:
        this = statistics.median(got[(scenario, "this")])
        line = f"{scenario:10} this {this:6.2f}"
        for name, _ in trees[1:]:
            base = statistics.median(got[(scenario, name)])
            line += f" | {Path(name).name} {base:6.2f} (this/it {this / base:.2f})"
        print(line)


if __name__ == "__main__":
    main()
