#!/usr/bin/env python3
"""Fairness on the real datapath: one VM floods while 50 others boot.

    .venv/bin/python bench/fairness.py                 # 2 rounds, flood 100 conns x 30 s
    .venv/bin/python bench/fairness.py --rounds 3 --json out.json
    .venv/bin/python bench/fairness.py --warm       # caches warm: the chain's own queues

Builds the node and the VMs with bench/boot_storm.py's machinery (registry, API, agent, proxy,
L3 and DHCP agents as `openimds up` runs them; 51 servers on 5 routed tenant networks, every
CIDR 10.0.0.0/24, each VM a namespace behind its router). VM 0 is the flooder; it shares its
router (and so the proxy's listener) with 10 of the booting VMs.

Arms, interleaved in each round, agent and API restarted before each (cold caches; with
--warm one request per VM then fills them, so the storm measures the steady state):
- alone:   the 50 VMs boot at once (cloud-init's 28 requests each, one connection per
           request), nobody floods: the reference;
- flood:   the flooder opens 100 keep-alive connections and asks as fast as it can for 30 s
           (ignoring 429 and Retry-After, reconnecting whenever closed); 2 s in, the same 50
           VMs boot. Node as configured below;
- flood-nolimit: the same with `[metadata_rate_limiting]` off (only the proxy's per-source
           connection cap protects the others): what the rate limit buys.
The flood runs in its own process (entered into the flooder's namespace with nsenter), so its
CPU is not the storm client's, at nice 19 (`--nice`): on this 2-core machine a Python flood
generator would otherwise take a whole core from the hops under test, which a VM flooding
with its own vCPUs never does; its CPU seconds are reported.

Node config: defaults, plus `[metadata_rate_limiting] rate_limit_enabled = true` with a burst
of 40 per 10 s and a base of 120 per 60 s (a cloud-init boot makes 28 requests at once;
Neutron's default 10 per 10 s would refuse a booting VM).

Reported per arm: the 50 VMs' requests, errors (must be 0), p50/p99/max; the flood's requests,
answers by status and rate; CPU seconds of proxy, agent, API; who answered the 429s (the
agent's limit, the proxy for a source the agent limited, the proxy's connection cap) and the
proxy's tarpit (answers held, sent at once); and per round the ratio p99(flood) / p99(alone)
(target <= 2). `--tarpit-delay 0` runs without the tarpit. Exit status 1 if a booting VM saw
an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import boot_storm as bs  # noqa: E402

from openimds.config import Settings, load_settings  # noqa: E402
from openimds.node.up import build_supervisor, ensure_secrets  # noqa: E402

FLOOD_PATH = "/latest/meta-data/instance-id"
# The proxy's counters (its /metrics) read around each arm: its own 429s and the tarpit.
PROXY_COUNTERS = {
    'openimds_rate_limited_total{hop="proxy"}': "proxy_429",
    "openimds_proxy_tarpit_delayed_total": "tarpit_held",
    "openimds_proxy_tarpit_overflow_total": "tarpit_overflow",
    "openimds_proxy_connections_refused_total": "cap_refused",
}


def proxy_counters(settings: Settings) -> dict[str, float]:
    """The PROXY_COUNTERS of the proxy's metrics listener (0 for any it does not have)."""
    url = f"http://127.0.0.1:{settings.metrics.port('proxy')}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out = dict.fromkeys(PROXY_COUNTERS.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name in PROXY_COUNTERS:
            out[PROXY_COUNTERS[name]] = float(value)
    return out


# --- the flooder (a child process inside the flooding VM's namespace) -----------------------

async def flood_main(seconds: float, conns: int, out: str) -> None:
    statuses: dict[str, int] = {}
    counts = {"requests": 0, "connects": 0, "connect_errors": 0, "closed_by_server": 0}
    end = time.monotonic() + seconds
    request = (f"GET {FLOOD_PATH} HTTP/1.1\r\nHost: {bs.METADATA_IP}\r\n"
               "User-Agent: flood\r\n\r\n").encode()

    async def one() -> None:
        while time.monotonic() < end:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(bs.METADATA_IP, 80), 5)
            except (OSError, TimeoutError):
                counts["connect_errors"] += 1
                await asyncio.sleep(0.01)
                continue
            counts["connects"] += 1
            try:
                while time.monotonic() < end:
                    writer.write(request)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                    lines = head.split(b"\r\n")
                    status = lines[0].split()[1].decode()
                    length, close = 0, False
                    for line in lines[1:]:
                        name, _, value = line.partition(b":")
                        name = name.strip().lower()
                        if name == b"content-length":
                            length = int(value)
                        elif name == b"connection" and value.strip().lower() == b"close":
                            close = True
                    if length:
                        await reader.readexactly(length)
                    counts["requests"] += 1
                    statuses[status] = statuses.get(status, 0) + 1
                    if close:
                        counts["closed_by_server"] += 1
                        break
            except (OSError, TimeoutError, asyncio.IncompleteReadError, IndexError,
                    ValueError):
                counts["closed_by_server"] += 1
            finally:
                writer.close()

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(conns)))
    wall = time.monotonic() - t0
    cpu = time.process_time()
    Path(out).write_text(json.dumps({**counts, "statuses": statuses, "wall_s": round(wall, 2),
                                     "rps": round(counts["requests"] / wall, 1),
                                     "cpu_s": round(cpu, 2)}))


def start_flood(vm: bs.Vm, seconds: float, conns: int, out: Path,
                nice: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([
        "nice", "-n", str(nice), "nsenter", f"--net=/run/netns/{vm.namespace}", sys.executable,
        __file__, "--flood-serve", "--seconds", str(seconds), "--conns", str(conns), "--out",
        str(out)])


# --- arms ------------------------------------------------------------------------------------

def write_config(path: Path, state: Path, limits: bool, tarpit: float | None = None) -> None:
    proxy = "" if tarpit is None else f"[proxy]\ntarpit_delay = {tarpit}\n\n"
    path.write_text(
        f"[DEFAULT]\nstate_path = {state}\nnova_metadata_host = 127.0.0.1\n"
        "enable_isolated_metadata = true\n\n[api]\nmetadata_listen = 127.0.0.1\n\n"
        f"[registry]\nbind_host = 127.0.0.1\n\n{proxy}"
        f"[metadata_rate_limiting]\nrate_limit_enabled = {str(limits).lower()}\n"
        "burst_window_duration = 10\nburst_query_rate_limit = 40\n"
        "base_window_duration = 60\nbase_query_rate_limit = 120\n")


async def bench(args: argparse.Namespace, settings: Settings, config: Path, state: Path,
                topo: bs.Topology, report: dict[str, Any]) -> None:
    sup = build_supervisor(settings, str(config), {})
    try:
        await sup.start_all()
        await asyncio.to_thread(bs.build_topology, settings, topo, 51, 5, 0)
        await bs.wait_converged(settings, topo, 120)
        await asyncio.to_thread(bs.plug_vms, settings, topo, 120)
        await bs.wait_serving(topo, timeout_s=60)
        flooder, booters = topo.vms[0], topo.vms[1:]
        neighbours = sum(1 for vm in booters if vm.router_id == flooder.router_id)
        bs.log(f"flooder {flooder.name} {flooder.ip} shares its router with {neighbours} "
               f"booting VMs")
        report["flooder_router_neighbours"] = neighbours

        async def restart(limits: bool) -> dict[str, list[int]]:
            write_config(config, state, limits, args.tarpit_delay)
            for name in ("agent", "api"):
                await sup.get(name).stop()
            for name in ("api", "agent"):
                await sup.get(name).start()
            await bs.wait_serving(topo, timeout_s=60)
            proxy_pid = int(settings.path("proxy", "proxy.pid").read_text())
            return {"proxy": [proxy_pid], "agent": [sup.get("agent").pid or 0],
                    "api": [sup.get("api").pid or 0]}

        async def arm(name: str, limits: bool, flood: bool) -> dict[str, Any]:
            pids = await restart(limits)
            if args.warm:
                # One request per VM fills the agent's lookup cache and the API's views:
                # the storm then measures the chain's steady-state cost (and its queues).
                bad = await bs.probe(booters, 10)
                assert not bad, bad
            before = bs.measure(pids)
            counters0 = proxy_counters(settings)
            proc = None
            out = state / f"flood-{name}.json"
            if flood:
                proc = start_flood(flooder, args.flood_seconds, args.conns, out, args.nice)
                await asyncio.sleep(2.0)
            result = await bs.storm(booters, name, False, 60.0)
            flood_stats: dict[str, Any] = {}
            if proc is not None:
                await asyncio.to_thread(proc.wait, args.flood_seconds + 30)
                flood_stats = json.loads(out.read_text())
            after = bs.measure(pids)
            summary = result.summary()
            summary["processes"] = {k: {"cpu_s": round(after[k][0] - before[k][0], 2)}
                                    for k in pids}
            summary["flood"] = flood_stats
            stats = bs.agent_stats(settings)
            summary["agent_rate_limited_429"] = stats.get("rate_limited_429")
            counters1 = proxy_counters(settings)
            summary["proxy"] = {k: int(v - counters0.get(k, 0.0)) for k, v in counters1.items()}
            bs.log(f"arm {name}: {summary['requests']} requests, errors {summary['errors']}, "
                   f"p50 {summary['p50_ms']} ms, p99 {summary['p99_ms']} ms, max "
                   f"{summary['max_ms']} ms; flood {flood_stats.get('requests', 0)} requests "
                   f"{flood_stats.get('statuses', {})} ({flood_stats.get('rps', 0)}/s, "
                   f"{flood_stats.get('cpu_s', 0)} s CPU); "
                   f"cpu {summary['processes']}; agent 429 "
                   f"{summary['agent_rate_limited_429']}; proxy {summary['proxy']}")
            for sample in result.error_samples[:5]:
                bs.log(f"  error: {sample}")
            return summary

        rounds: list[dict[str, Any]] = []
        for rnd in range(args.rounds):
            bs.log(f"round {rnd + 1}/{args.rounds}")
            r = {"alone": await arm("alone", True, False),
                 "flood": await arm("flood", True, True)}
            if not args.skip_nolimit:
                r["flood-nolimit"] = await arm("flood-nolimit", False, True)
            for key in ("flood", "flood-nolimit"):
                if key in r and r["alone"]["p99_ms"]:
                    r[f"{key}_p99_ratio"] = round(r[key]["p99_ms"] / r["alone"]["p99_ms"], 2)
            rounds.append(r)
        report["rounds"] = rounds
    finally:
        bs.STOP.set()
        await sup.stop_all()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--conns", type=int, default=100, help="flood connections (100)")
    ap.add_argument("--flood-seconds", type=float, default=30.0)
    ap.add_argument("--skip-nolimit", action="store_true", help="no flood-nolimit arm")
    ap.add_argument("--nice", type=int, default=19,
                    help="niceness of the flood generator (19): a VM floods with its own "
                         "vCPUs, not the host cores the hops run on")
    ap.add_argument("--warm", action="store_true",
                    help="warm caches before each storm (one request per VM): steady state")
    ap.add_argument("--tarpit-delay", type=float, default=None,
                    help="[proxy] tarpit_delay for the whole run (default: the node's, "
                         "0.25 s; 0 = off)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--flood-serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=30.0, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    import uvloop

    if args.flood_serve:
        uvloop.run(flood_main(args.seconds, args.conns, args.out))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, bridges, nftables)")
    neigh = bs.raise_neigh_limits(1024)
    bs.enter_private_netns()
    bs.raise_nofile()
    state = Path(tempfile.mkdtemp(prefix="openimds-fair-"))
    os.chmod(state, 0o755)  # noqa: S103  (the proxy may run as another user)
    config = state / "openimds.ini"
    write_config(config, state, True, args.tarpit_delay)
    ensure_secrets(state)
    for key in [k for k in os.environ if k.startswith("OPENIMDS_")]:
        del os.environ[key]
    os.environ["NO_PROXY"] = "*"
    settings = load_settings(str(config))
    topo = bs.Topology()
    report: dict[str, Any] = {"booting_vms": 50, "requests_per_vm": len(bs.BOOT_SEQUENCE),
                              "flood_nice": args.nice,
                              "caches": "warm" if args.warm else "cold",
                              "flood_conns": args.conns, "flood_seconds": args.flood_seconds,
                              "tarpit_delay": settings.proxy.tarpit_delay}
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(bench(args, settings, config, state, topo, report))
    finally:
        bs.cleanup_namespaces(topo, state)
        bs.restore_neigh_limits(neigh)
        shutil.rmtree(state, ignore_errors=True)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    errors = sum(r[a]["errors"] for r in report.get("rounds", []) for a in ("alone", "flood"))
    return 1 if errors else 0


def print_report(report: dict[str, Any]) -> None:
    print(f"\nfairness: {report['booting_vms']} VMs boot ({report['requests_per_vm']} requests "
          f"each, {report['caches']} caches) while one VM floods with "
          f"{report['flood_conns']} connections for {report['flood_seconds']:.0f} s "
          f"(proxy tarpit_delay {report['tarpit_delay']:g} s)")
    print(f"{'round':>5} {'arm':<14} {'errors':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} "
          f"{'flood req/s':>11} {'flood statuses':<28} {'cpu s proxy/agent/api':<22} "
          f"429 by agent / proxy (limit) / proxy (cap); tarpit held / at once")
    for i, r in enumerate(report.get("rounds", []), 1):
        for name in ("alone", "flood", "flood-nolimit"):
            if name not in r:
                continue
            s = r[name]
            f = s.get("flood") or {}
            cpu = "/".join(f"{v['cpu_s']:.1f}" for v in s["processes"].values())
            px = s.get("proxy") or {}
            who = (f"{s.get('agent_rate_limited_429') or 0} / {px.get('proxy_429', 0)} / "
                   f"{px.get('cap_refused', 0)}; {px.get('tarpit_held', 0)} / "
                   f"{px.get('tarpit_overflow', 0)}")
            print(f"{i:>5} {name:<14} {s['errors']:>6} {s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} "
                  f"{s['max_ms']:>7.1f} {f.get('rps', 0):>11.0f} "
                  f"{json.dumps(f.get('statuses', {})):<28} {cpu:<22} {who}")
    for key in ("flood_p99_ratio", "flood-nolimit_p99_ratio"):
        vals = [r[key] for r in report.get("rounds", []) if key in r]
        if vals:
            print(f"{key}: median {round(statistics.median(vals), 2)} (rounds {vals}; "
                  "target <= 2)")


if __name__ == "__main__":
    sys.exit(main())
