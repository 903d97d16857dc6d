"""What counting costs: the whole chain with [metrics] enabled = true vs false, same run.

    .venv/bin/python bench/metrics_bench.py [--rounds 3] [--duration 5]
                                            [--scenarios 100,100close] [--baseline DIR]

bench/chain_bench.py's topology and processes (a VM namespace, a router namespace, the real
registry, API, agent and proxy started through the CLI, wrk in the VM), twice: one chain
with metrics on (as shipped: every hop counts into plain ints, the listeners on their
ports) and one with `[metrics] enabled = false` (no counting at all: the API's bare
handler, the agent and proxy skip their counters). `--baseline DIR` (a checkout of other
code, e.g. `git worktree add --detach DIR main`) adds a third chain, metrics on, whose
processes run DIR's code: before and after a change, in the same rounds. Every chain runs
in every round, in an order rotated per round, after a 1 s warm-up each. Printed: per-hop
CPU µs per request (utime+stime of the process over the requests wrk completed) and the
medians of the per-round ratios against "off" (the target is at most a few per cent). A
scrape of each counting service's /metrics around the measured run shows the counts are
real.

    .venv/bin/python bench/metrics_bench.py --profile api [--profile-native]

Where one hop's CPU goes in each chain (py-spy's own samples per line, or perf's per
shared object and symbol), one keep-alive c=100 run each: the on-path, side by side.

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
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chain_bench as cb
from proxy_bench import wait_until
from tests.support import base_config, write_config

from openimds.config import load_settings

HOPS = ("proxy", "agent", "api")


class MetricsBench(cb.Bench):
    """chain_bench's Bench whose next stack is metrics on, off, or on with --baseline's code
    (`variant`)."""

    variant = "off"
    baseline: Path | None = None

    def config(self, workers: int, tag: str = "") -> tuple[Path, dict[str, Any]]:
        tag = f"m{self.variant}"
        state = self.tmp / f"state-{tag}"
        state.mkdir()
        cfg = base_config(state, DEFAULT={
            "metadata_proxy_socket": str(self.tmp / f"agent-{tag}.sock"),
            "metadata_proxy_socket_mode": "all",
        }, proxy={"spawn_from_agents": "false",
                  "max_connections_per_source": 4096},  # as chain_bench: wrk, one VM
            metrics={"enabled": "false" if self.variant == "off" else "true"})
        return write_config(self.tmp / f"openimds-{tag}.ini", cfg), cfg

    def cli(self, name: str, config: Path, *args: str,
            env: dict[str, str] | None = None) -> cb.Proc:
        if self.variant == "base" and self.baseline is not None:
            env = {**(env or {}), "PYTHONPATH": str(self.baseline / "src")}
        return super().cli(name, config, *args, env=env)


def scrape_count(port: int, hop: str) -> float:
    from tests.support import metric_samples

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        samples = metric_samples(resp.read().decode())
    return samples.get(("openimds_request_duration_seconds_count",
                        frozenset({("hop", hop)})), 0.0)


def in_situ() -> dict[bool, Callable[[], None]]:
    """The API's keep-alive hit path as served: the real `HttpProtocol` in front of one
    `MetadataApi` (tests' fake registry), fed one `meta_data.json` request per call through
    `data_received`, with `handle_observed` (True) or `handle` (False): what counting costs
    among the server's own work (parse, answer, write), not in a tight loop of its own."""
    import uvloop
    from tests.unit.test_metadata_api import make_api, signed

    from openimds.http.server import HttpProtocol, Limits

    class Sink:  # a transport that drops what is written
        def write(self, data: bytes) -> None: ...

        def writelines(self, data: Any) -> None: ...

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

        def is_closing(self) -> bool:
            return False

        def set_write_buffer_limits(self, high: int, low: int) -> None: ...

        def get_write_buffer_size(self) -> int:
            return 0

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    api, _ = make_api()
    raw = (b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\n"
           b"User-Agent: Cloud-Init/24.1\r\nAccept: */*\r\n"
           + b"".join(k + b": " + v + b"\r\n" for k, v in signed()) + b"\r\n")
    feeds: dict[bool, Callable[[], None]] = {}
    for flag in (True, False):
        proto = HttpProtocol(api.handle_observed if flag else api.handle, Limits(), loop)
        proto.connection_made(Sink())  # type: ignore[arg-type]
        proto.data_received(raw)  # the first one a miss (fetch, cache); the rest are kept
        loop.run_until_complete(asyncio.sleep(0.05))
        feeds[flag] = partial(proto.data_received, raw)
    return feeds


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
    observed = api.handle_observed  # as the server holds it: read once
    hop = HopStats("agent")
    served = in_situ()

    def bookkeeping() -> None:
        hop.begun += 1
        t0 = time.perf_counter()
        hop.done(200, "/openstack/latest/meta_data.json", time.perf_counter() - t0)

    cases = {
        "proxy handler": (lambda: proxies[True](req), lambda: proxies[False](req)),
        "api handler (warm keep-alive GET)": (lambda: observed(areq), lambda: api.handle(areq)),
        "api via HttpProtocol (meta_data.json)": (served[True], served[False]),
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
    print("\nmedians over rounds; added: the median of the per-round differences (on and "
          "off run back to back in each round), with its quartiles")
    print("| case | off ns/call | on ns/call | added ns (quartiles) | on/off |")
    print("|---|---|---|---|---|")
    for name, pairs in results.items():
        med_on = statistics.median(x for x, _ in pairs)
        med_off = statistics.median(y for _, y in pairs)
        added = [x - y for x, y in pairs]
        q1, q2, q3 = statistics.quantiles(added, n=4) if len(added) > 1 else (added * 3)
        ratio = statistics.median(x / y for x, y in pairs) if med_off > 60 else float("nan")
        print(f"| {name} | {med_off:.0f} | {med_on:.0f} | {statistics.median(added):.0f} "
              f"({q1:.0f}-{q3:.0f}) | {ratio:.3f} |")
    return 0


def profile(b: MetricsBench, vm: str, stacks: dict[str, tuple[cb.Stack, dict[str, int]]],
            hop: str, duration: float, native: bool) -> None:
    """One keep-alive c=100 run per stack with `hop` sampled: where its CPU goes, on vs off
    (py-spy's own samples per line; perf: per shared object and symbol)."""
    for variant, (st, _) in stacks.items():
        pid = st.services[hop].popen.pid
        out = b.tmp / f"{hop}-{variant}.raw"
        spies: list[subprocess.Popen[bytes]] = []
        start = partial(lambda spies, *args: spies.append(cb.py_spy(*args)),
                        spies, pid, duration, out, native)
        r = cb.measure(b, vm, st.ports["chain"], {hop: pid}, 100, False, duration,
                       started=start)
        spies[0].wait(60)
        print(f"\n== {hop}, metrics {variant}: {r['rps']:.0f} rps, "
              f"{r['cpu_us'][hop]:.1f} us/req", flush=True)
        if native:
            subprocess.run(["perf", "report", "-q", "-i", str(out.with_suffix(".perf")),
                            "--sort", "dso,sym", "--stdio"], check=False,
                           stdout=sys.stdout, stderr=subprocess.DEVNULL)
        else:
            cb.profile_report(out, top=30)


def summary_rows(rows: list[dict[str, Any]], scenarios: list[tuple[int, bool]],
                 variants: tuple[str, ...]) -> None:
    """Medians over rounds of each hop's CPU per request, and the per-round ratios of every
    variant against "off" (and this code's "on" against --baseline's, when it ran)."""
    def ratios(by: dict[str, dict[int, dict[str, Any]]], x: str, y: str,
               of: Callable[[dict[str, Any]], float]) -> str:
        xs = [of(by[x][k]) / of(by[y][k]) for k in by[x] if k in by[y] and of(by[y][k])]
        if not xs:
            return "-"
        return f"{statistics.median(xs):.3f} ({min(xs):.3f}-{max(xs):.3f})"

    print("\nsummary: medians over rounds; ratios are medians of per-round ratios "
          "(min-max)")
    pairs = [(v, "off") for v in variants if v != "off"]
    if "base" in variants:
        pairs.append(("on", "base"))
    print("| scenario | hop | " + " | ".join(f"{v} us/req" for v in variants) + " | "
          + " | ".join(f"{x}/{y}" for x, y in pairs) + " |")
    print("|---" * (2 + len(variants) + len(pairs)) + "|")
    for conns, close in scenarios:
        label = f"c={conns}{' close' if close else ''}"
        by: dict[str, dict[int, dict[str, Any]]] = {
            v: {r["round"]: r for r in rows
                if r["variant"] == v and r["conns"] == conns and r["close"] == close}
            for v in variants}

        for hop in (*HOPS, "all"):
            def of(r: dict[str, Any], hop: str = hop) -> float:
                cpu: dict[str, float] = r["cpu_us"]
                return sum(cpu[h] for h in HOPS) if hop == "all" else cpu[hop]

            meds = [f"{statistics.median(of(r) for r in by[v].values()):.1f}"
                    if by[v] else "-" for v in variants]
            print(f"| {label} | {hop} | " + " | ".join(meds) + " | "
                  + " | ".join(ratios(by, x, y, of) for x, y in pairs) + " |")
        rps = " ".join(f"{x}/{y} {ratios(by, x, y, lambda r: r['rps'])}" for x, y in pairs)
        print(f"| {label} | rps | {rps} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="(--micro: use 15 or more)")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--scenarios", default="100,100close")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="a checkout of other code (git worktree add --detach DIR COMMIT): a "
                   "third stack, metrics on, runs its processes, in the same rounds")
    p.add_argument("--profile", choices=HOPS,
                   help="instead: sample that hop with py-spy (or perf, --profile-native) in "
                   "one keep-alive c=100 run of each stack; own samples per frame, side by "
                   "side")
    p.add_argument("--profile-native", action="store_true")
    p.add_argument("--micro", action="store_true", help="in-process handlers, on vs off")
    p.add_argument("--calls", type=int, default=30000, help="--micro: calls per case and round")
    a = p.parse_args()
    a.option = []  # chain_bench's start_stack reads it: no extra options here
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
    variants: tuple[str, ...] = ("off", "on", "base") if a.baseline else ("off", "on")
    b = MetricsBench(a)
    b.baseline = a.baseline
    os.chmod(b.tmp, 0o755)  # noqa: S103 - as chain_bench: haproxy (nobody) reaches the socket
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    rows: list[dict[str, Any]] = []
    print(cb.machine(), "| load", cb.loadavg(), flush=True)
    try:
        rns, vm = b.topology()
        stacks: dict[str, tuple[cb.Stack, dict[str, int]]] = {}
        for i, variant in enumerate(variants):
            b.variant = variant
            st = cb.start_stack(b, rns, 1, 9600 + 10 * i)
            settings = load_settings(str(b.tmp / f"openimds-m{variant}.ini"), environ={})
            ports = {h: settings.metrics.port(h) for h in HOPS}
            stacks[variant] = (st, ports)
            cb.check_answers(vm, {"chain": st.ports["chain"]})
            if variant != "off":  # the proxy opens its metrics listener after its first converge
                for h in HOPS:
                    wait_until(partial(cb.tcp_open, "127.0.0.1", ports[h]), 30,
                               f"{variant} {h} metrics")
        if a.profile:
            profile(b, vm, stacks, a.profile, a.duration, a.profile_native)
            return 0
        for rnd in range(1, a.rounds + 1):
            for conns, close in scenarios:
                # rotated per round: no variant always runs right after another
                order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                for variant in order:
                    st, ports = stacks[variant]
                    pids = {k: v.popen.pid for k, v in st.services.items() if k in HOPS}
                    counting = variant != "off"
                    before = {h: scrape_count(ports[h], h) for h in HOPS} if counting else {}
                    r = cb.measure(b, vm, st.ports["chain"], pids, conns, close, a.duration)
                    if counting:
                        r["counted"] = {h: scrape_count(ports[h], h) - before[h] for h in HOPS}
                    r.update(round=rnd, variant=variant, conns=conns, close=close)
                    rows.append(r)
                    cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_us"].items())
                    extra = (" | counted " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                       r["counted"].items())
                             if "counted" in r else "")
                    print(f"round {rnd} c={conns}{' close' if close else '':6s} metrics "
                          f"{variant:4s} {r['rps']:8.0f} rps | CPU us/req: {cpu}{extra}",
                          flush=True)
    except KeyboardInterrupt:
        return 130
    finally:
        load_after = cb.loadavg()
        b.cleanup()
    summary_rows(rows, scenarios, variants)
    print(f"load average after {load_after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
