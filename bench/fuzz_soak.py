#!/usr/bin/env python3
"""Soak the hostile-bytes fuzz properties (tests/integration/test_fuzz_http.py) for a while.

    .venv/bin/python bench/fuzz_soak.py --minutes 10          # rounds of 2000 streams
    .venv/bin/python bench/fuzz_soak.py --minutes 60 --examples 5000

Each round runs the same property as CI (lean HTTP server and proxy path on loopback, strict
recording upstream) with a fresh hypothesis seed and many more examples than CI's 150; rounds
repeat until the time is up or one fails. A failure prints hypothesis's shrunk byte stream and
the seed to replay it:

    HOSTILE_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/integration/test_fuzz_http.py \\
        --hypothesis-seed=SEED

Prints per round: seed, examples, seconds, streams/s; at the end the totals. Exit status 1 if
a round failed.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TEST = "tests/integration/test_fuzz_http.py"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="total time (default 10)")
    ap.add_argument("--examples", type=int, default=2000, help="streams per round")
    args = ap.parse_args()
    env = dict(os.environ, HOSTILE_FUZZ_EXAMPLES=str(args.examples))
    end = time.monotonic() + args.minutes * 60
    total, t_total, rounds = 0, 0.0, 0
    print(f"{'round':>5} {'seed':>12} {'streams':>8} {'seconds':>8} {'streams/s':>10}")
    while time.monotonic() < end:
        seed = random.randrange(1 << 40)
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", TEST,
             f"--hypothesis-seed={seed}"], cwd=REPO, env=env, capture_output=True, text=True)
        secs = time.monotonic() - t0
        rounds += 1
        if proc.returncode != 0:
            print(proc.stdout[-6000:], proc.stderr[-2000:], sep="\n")
            print(f"round {rounds} FAILED, seed {seed}")
            return 1
        total += args.examples
        t_total += secs
        print(f"{rounds:>5} {seed:>12} {args.examples:>8} {secs:>8.1f} "
              f"{args.examples / secs:>10.1f}", flush=True)
    print(f"total: {rounds} rounds, {total} streams in {t_total:.0f} s "
          f"({total / max(t_total, 1e-9):.1f} streams/s), no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
