"""What counting costs: the whole chain with [metrics] enabled = true vs false, same run.

    sudo .venv/bin/python bench/metrics_bench.py [--rounds 3] [--duration 5]
                                                 [--scenarios 100,100close]

bench/chain_bench.py's topology and processes (a VM namespace, a router namespace, the real
registry, API, agent and proxy started through the CLI, wrk in the VM), twice: one chain
with metrics on (as shipped: every hop counts into plain ints, the listeners on their
ports) and one with `[metrics] enabled = false` (no counting at all: the API's bare
handler, the agent and proxy skip their counters). Both chains run in every round,
interleaved per scenario, after a 1 s warm-up each. Printed: per-hop CPU µs per request
(utime+stime of the process over the requests wrk completed) on and off, and the medians of
the per-round on/off ratios (the target is at most a few per cent). A scrape of each
service's /metrics during the measured run shows the counts are real.

    .venv/bin/python bench/metrics_bench.py --micro

The same question without wrk and the shared machine's noise: in one process, the hops' real
handlers called back to back with counting on and off (CPU time, interleaved rounds): the
proxy's `Forwarder` handler with an upstream that answers at once, the API's warm
keep-alive GET (`handle_observed` vs `handle`), and the bare `HopStats` bookkeeping.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chain_bench as cb
from tests.support import base_config, write_config

from openimds.config import load_settings

HOPS = ("proxy", "agent", "api")


class MetricsBench(cb.Bench):
    """chain_bench's Bench whose next config is metrics on or off (`variant`)."""

    variant = "off"

    def config(self, workers: int, tag: str = "") -> tuple[Path, dict[str, Any]]:
        tag = f"m{self.variant}"
        state = self.tmp / f"state-{tag}"
        state.mkdir()
        cfg = base_config(state, DEFAULT={
            "metadata_proxy_socket": str(self.tmp / f"agent-{tag}.sock"),
            "metadata_proxy_socket_mode": "all",
        }, proxy={"spawn_from_agents": "false"},
            metrics={"enabled": "true" if self.variant == "on" else "false"})
        return write_config(self.tmp / f"openimds-{tag}.ini", cfg), cfg


def scrape_count(port: int, hop: str) -> float:
    from tests.support import metric_samples

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        samples = metric_samples(resp.read().decode())
    return samples.get(("openimds_request_duration_seconds_count",
                        frozenset({("hop", hop)})), 0.0)


def cpu_ns_per_call(fn: Any, n: int) -> float:
    t0 = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - t0) / n


def micro(rounds: int, n: int) -> int:
    """In-process: each hop's handler with counting on and off, interleaved."""
    from openimds.core.proxy_rules import ListenerSpec
    from openimds.http.client import UpstreamResponse
    from openimds.http.server import Request
    from openimds.metadata.proxy import Forwarder
    from openimds.metrics import HopStats

    sys.path.insert(0, str(cb.REPO))
    from tests.unit.test_metadata_api import call, make_api, signed

    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    resp = UpstreamResponse(200, [], b"{}", answer, True)

    class Pool:  # the agent answers at once, from the send call
        def encode_request(self, method: str, target: str, headers: Any, body: bytes) -> bytes:
            return cb_encode(method, target, headers)

        def send_encoded(self, data: bytes, head_only: bool, cb_: Any) -> None:
            cb_(resp)

    def cb_encode(method: str, target: str, headers: Any) -> bytes:
        return (f"{method} {target} HTTP/1.1\r\n".encode()
                + b"".join(k + b": " + v + b"\r\n" for k, v in headers) + b"\r\n")

    spec = ListenerSpec("router-x", "qrouter-x", "0.0.0.0", 9697, "r" * 36, None)
    headers = [(b"host", b"169.254.169.254"), (b"user-agent", b"curl/7.88.1"),
               (b"accept", b"*/*")]
    req = Request("GET", "/openstack/latest/meta_data.json", headers, b"", "1.1", True,
                  ("10.0.0.5", 40000))
    proxies = {flag: Forwarder(Pool(), count=flag).handler_for(spec)  # type: ignore[arg-type]
               for flag in (True, False)}

    api, _ = make_api()
    areq = Request("GET", "/latest/meta-data/instance-id", signed(), b"", "1.1", True,
                   ("127.0.0.1", 1))
    asyncio.run(call(api, "GET", "/latest/meta-data/instance-id", keep_alive=True))
    api.handle(areq)  # warm: the pre-encoded answer exists now
    hop = HopStats("agent")

    def bookkeeping() -> None:
        hop.begun += 1
        t0 = time.perf_counter()
        hop.done(200, "/openstack/latest/meta_data.json", time.perf_counter() - t0)

    cases = {
        "proxy handler": (lambda: proxies[True](req), lambda: proxies[False](req)),
        "api handler (warm keep-alive GET)": (lambda: api.handle_observed(areq),
                                              lambda: api.handle(areq)),
        "HopStats begin+done+2 clock reads": (bookkeeping, lambda: None),
    }
    print(cb.machine(), "| load", cb.loadavg(), f"| {n} calls x {rounds} rounds", flush=True)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
    for rnd in range(1, rounds + 1):
        for name, (on, off) in cases.items():
            cpu_ns_per_call(on, n // 10)
            cpu_ns_per_call(off, n // 10)
            a_on, a_off = cpu_ns_per_call(on, n), cpu_ns_per_call(off, n)
            results[name].append((a_on, a_off))
            print(f"round {rnd} {name:36s} on {a_on:7.0f} ns  off {a_off:7.0f} ns", flush=True)
    print("\n| case | off ns/call | on ns/call | added ns | on/off |")
    print("|---|---|---|---|---|")
    for name, pairs in results.items():
        on = statistics.median(x for x, _ in pairs)
        off = statistics.median(y for _, y in pairs)
        ratio = statistics.median(x / y for x, y in pairs) if off > 60 else float("nan")
        print(f"| {name} | {off:.0f} | {on:.0f} | {on - off:.0f} | {ratio:.3f} |")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--scenarios", default="100,100close")
    p.add_argument("--micro", action="store_true", help="in-process handlers, on vs off")
    p.add_argument("--calls", type=int, default=200000)
    a = p.parse_args()
    if a.micro:
        return micro(a.rounds, a.calls)
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET: a private loopback for everything
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    scenarios = [(int(s.removesuffix("close")), s.endswith("close"))
                 for s in a.scenarios.split(",")]
    b = MetricsBench(a)
    os.chmod(b.tmp, 0o755)  # noqa: S103 - as chain_bench: haproxy (nobody) reaches the socket
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rows: list[dict[str, Any]] = []
    print(cb.machine(), "| load", cb.loadavg(), flush=True)
    try:
        rns, vm = b.topology()
        stacks: dict[str, tuple[cb.Stack, dict[str, Any]]] = {}
        for i, variant in enumerate(("on", "off")):
            b.variant = variant
            st = cb.start_stack(b, rns, 1, 9600 + 10 * i)
            settings = load_settings(str(b.tmp / f"openimds-m{variant}.ini"), environ={})
            ports = {h: settings.metrics.port(h) for h in HOPS}
            stacks[variant] = (st, ports)
            cb.check_answers(vm, {"chain": st.ports["chain"]})
        for rnd in range(1, a.rounds + 1):
            for conns, close in scenarios:
                for variant, (st, ports) in stacks.items():
                    pids = {k: v.popen.pid for k, v in st.services.items() if k in HOPS}
                    before = ({h: scrape_count(ports[h], h) for h in HOPS}
                              if variant == "on" else {})
                    r = cb.measure(b, vm, st.ports["chain"], pids, conns, close, a.duration)
                    if variant == "on":
                        counted = {h: scrape_count(ports[h], h) - before[h] for h in HOPS}
                        r["counted"] = counted
                    r.update(round=rnd, variant=variant, conns=conns, close=close)
                    rows.append(r)
                    cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_us"].items())
                    extra = (" | counted " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                       r["counted"].items())
                             if "counted" in r else "")
                    print(f"round {rnd} c={conns}{' close' if close else '':6s} metrics "
                          f"{variant:3s} {r['rps']:8.0f} rps | CPU us/req: {cpu}{extra}",
                          flush=True)
    except KeyboardInterrupt:
        return 130
    finally:
        load_after = cb.loadavg()
        b.cleanup()
    print("\nsummary: medians over rounds; ratios are medians of per-round on/off ratios")
    for conns, close in scenarios:
        label = f"c={conns}{' close' if close else ''}"

        def sel(variant: str, conns: int = conns, close: bool = close) -> dict[int, Any]:
            return {r["round"]: r for r in rows if r["variant"] == variant
                    and r["conns"] == conns and r["close"] == close}

        on, off = sel("on"), sel("off")
        for hop in HOPS:
            xs = [on[k]["cpu_us"][hop] / off[k]["cpu_us"][hop] for k in on
                  if k in off and off[k]["cpu_us"][hop]]
            med_on = statistics.median(r["cpu_us"][hop] for r in on.values())
            med_off = statistics.median(r["cpu_us"][hop] for r in off.values())
            print(f"| {label} | {hop} | {med_off:.1f} | {med_on:.1f} | "
                  f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f}) |")
        total = [sum(on[k]["cpu_us"].values()) / sum(off[k]["cpu_us"].values())
                 for k in on if k in off]
        rps = [on[k]["rps"] / off[k]["rps"] for k in on if k in off]
        print(f"| {label} | all three hops | | | {statistics.median(total):.3f} "
              f"({min(total):.3f}-{max(total):.3f}) |  rps on/off {statistics.median(rps):.3f}")
    print(f"load average after {load_after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
