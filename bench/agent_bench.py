"""Benchmark of the metadata agent hop: requests/s, latency, agent CPU per request, and
registry queries per 1,000 requests under a boot storm.

    .venv/bin/python bench/agent_bench.py [--rounds 3] [--duration 5] [--conns 10,100]
                                          [--vms 200] [--storm-vms 400] [--storm-requests 20]

Everything runs as real processes started through the CLI, on loopback and Unix sockets (as
root, inside a private network namespace, like the tests):
- the registry (`openimds registry serve`, sqlite), with one router, one network and
  `--vms` instances (plus `--storm-vms` more for the storm);
- a stub metadata API: the lean HTTP server answering every request with the same 505-byte
  JSON document (pre-encoded), so the agent's own cost is what changes between scenarios;
  it listens on TCP for the agent and on a Unix socket for the direct baseline;
- `openimds agent` instances (access log on, as shipped): one with the cache, one with
  `cache_size = 0` and `warm_index = false` (single-flight only, a registry query per
  request otherwise).

Load: this process, uvloop + httptools, keep-alive connections sending one request at a
time, each connection cycling over the VMs' IPs (as the proxy would send them: one
X-Forwarded-For and an X-Neutron-Router-ID). Scenarios are interleaved round by round and
each starts with a warm-up; the tables give medians over rounds and per-round ratios.

Scenarios:
- direct:   load -> stub over its Unix socket (no agent; the floor of this load generator)
- hit:      load -> agent (cache warm) -> stub
- hit-nolog: the same with `[metadata_agent] access_log = false` (the access line's cost)
- nocache:  load -> agent with cache_size=0, warm_index=false -> registry lookup
            (single-flight) -> stub
- storm:    a fresh agent; `--storm-vms` VMs whose first `--storm-requests` requests all
            start at once, one connection per VM (cloud-init's pattern at boot); with the
            cache every round, without it (as nocache) in the first round only.
            Reports registry queries per 1,000 requests.
- storm-boot: a fresh agent (its index loaded, so no VM is a registry query); the
            `--storm-vms` VMs each send cloud-init's 28 boot paths once (BOOT_PATHS, one
            connection per VM, all at once), so every request is the first of its (VM,
            path): the agent's cost for a new request shape. storm-boot-again: the same
            requests again on the same agent, every one seen before (a hit memo that cannot
            hold VMs x 28 shapes is cold again here).

CPU µs/request comes from /proc/PID/stat (utime + stime of the agent process) over the
measured window. The load generator shares the machine's cores, so rps is bounded by it:
compare ratios and CPU per request, not absolute rps.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httptools

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import (  # noqa: E402
    PYTHON,
    Service,
    base_config,
    http_ready,
    openimds_service,
    unix_ready,
    write_config,
)

from openimds.registry.client import RegistryClient  # noqa: E402

BODY = json.dumps({
    "uuid": "d8e02d56-2648-49a3-bf97-6be8f1204f38", "name": "vm-0001",
    "hostname": "vm-0001.novalocal", "launch_index": 0, "availability_zone": "nova",
    "project_id": "1b0f2b7b9c5c4c1a8b7f0b9e0b7a1c2d", "meta": {"role": "bench"},
    "public_keys": {"k": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAbenchbenchbenchbenchbenchbench"},
    "keys": [{"name": "k", "type": "ssh", "data": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA"}],
    "devices": [], "dedicated_cpus": [], "random_seed": "x" * 96,
}).encode()
BODY = BODY + b" " * max(0, 505 - len(BODY))
STUB_ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
               + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
CLK_TCK = os.sysconf("SC_CLK_TCK")
# The nocache agents: no cache and no warm port index (which resolves every known port from
# the feed without a lookup), so each request is a registry /v1/lookup, as documented above.
NOCACHE = {"cache_size": 0, "warm_index": "false"}


# -- the stub API (runs in its own process) ---------------------------------------------
def run_stub(tcp_port: int, unix_path: str) -> None:
    from openimds.http.server import RawResponse, bind_tcp, bind_unix, install_uvloop, serve

    install_uvloop()

    def handler(req: Any) -> RawResponse:
        return RawResponse(STUB_ANSWER)

    async def main() -> None:
        # Held until the end: a Server nothing refers to is collected with its listener
        # (the Unix one went after the first scenarios, and a second `direct` run was
        # refused: ConnectionRefusedError).
        servers = [await serve(handler, bind_tcp("127.0.0.1", tcp_port)),
                   await serve(handler, bind_unix(unix_path))]
        await asyncio.Event().wait()
        del servers

    asyncio.run(main())


# -- load generator ---------------------------------------------------------------------
class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[int] | None = None
        self.status = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_message_complete(self) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_result(self.status)

    def connection_lost(self, exc: Exception | None) -> None:
        w, self.waiter = self.waiter, None
        if w is not None and not w.done():
            w.set_exception(ConnectionError("closed"))


# cloud-init's boot requests (metadata-api.md §3.1; bench/boot_storm.py's BOOT_SEQUENCE)
BOOT_PATHS = ("/openstack", "/openstack", *(f"/openstack/2018-08-27/{p}" for p in (
    "meta_data.json", "user_data", "vendor_data.json", "vendor_data2.json",
    "network_data.json")), *(f"/latest/meta-data/{p}" for p in (
    "", "block-device-mapping/", "block-device-mapping/ami", "block-device-mapping/root",
    "placement/", "placement/availability-zone", "public-keys/", "public-keys/0/openssh-key",
    "ami-id", "ami-launch-index", "ami-manifest-path", "hostname", "instance-action",
    "instance-id", "instance-type", "local-hostname", "local-ipv4", "public-hostname",
    "public-ipv4", "reservation-id", "security-groups")))


def request_bytes(router_id: str, ip: str, path: str = "/openstack/latest/meta_data.json",
                  rid: str | None = None) -> bytes:
    """What the proxy sends the agent (with `rid`: its request ID line too)."""
    return (f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\n"
            f"User-Agent: Cloud-Init/24.1\r\nAccept: */*\r\nX-Forwarded-For: {ip}\r\n"
            f"X-Neutron-Router-ID: {router_id}\r\n"
            + (f"X-Openimds-Request-Id: {rid}\r\n" if rid else "") + "\r\n").encode()


async def _connect(path: str) -> _Conn:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_unix_connection(_Conn, path)
    return proto


async def _one(conn: _Conn, data: bytes) -> int:
    conn.waiter = asyncio.get_running_loop().create_future()
    conn.transport.write(data)
    return await conn.waiter


async def steady_load(path: str, reqs: list[bytes], conns: int, warmup_s: float,
                      duration_s: float, pids: list[int],
                      stats_sock: str | None = None,
                      total: int | None = None, spread: bool = False,
                      rate: float = 0.0) -> dict[str, Any]:
    """`conns` keep-alive connections for warmup + duration; stats over the duration.
    With `total`, every request in `reqs[:total]` is sent exactly once, then it stops.
    Connection k starts at request 7k, or with `spread` at k * len(reqs) / conns (so that
    a long list is cycled through whole, not only its first 7 * conns + a few hundred).
    `rate` > 0: requests per second in all, each connection paced at rate / conns (an open
    loop below capacity: two request sets compare at the same rate, not at whatever rate
    each saturates at, which changes how many requests a hop handles per wake-up)."""
    perf = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    start = perf()
    measure_from = start + warmup_s
    stop_at = measure_from + duration_s
    lat: list[float] = []
    errors = 0
    cpu0: dict[int, int] = {}

    taken = [0]

    async def worker(offset: int, k: int) -> None:
        nonlocal errors
        conn = await _connect(path)
        i = offset
        n = len(reqs)
        gap = conns / rate if rate > 0 else 0.0
        due = start + gap * k / conns  # staggered: the connections do not send in step
        while True:
            if gap:
                wait = due - perf()
                if wait > 0:
                    await asyncio.sleep(wait)
                due += gap
            t0 = perf()
            if t0 >= stop_at:
                break
            if total is not None:
                if taken[0] >= total:
                    break
                i, taken[0] = taken[0], taken[0] + 1
            status = await _one(conn, reqs[i % n])
            i += 1
            if t0 >= measure_from:
                lat.append(perf() - t0)
                if status != 200:
                    errors += 1
        conn.transport.close()

    queries: dict[str, int] = {}

    async def cpu_mark() -> None:
        await asyncio.sleep(max(0.0, measure_from - perf()))
        cpu0.update({pid: cpu_ticks(pid) for pid in pids})
        if stats_sock is not None:
            st = await asyncio.get_running_loop().run_in_executor(None, agent_stats, stats_sock)
            queries["start"] = int(st["registry_queries"])

    marker = asyncio.ensure_future(cpu_mark())
    step = max(1, len(reqs) // conns) if spread else 7
    await asyncio.gather(*(worker(k * step, k) for k in range(conns)))
    await marker
    cpu1 = {pid: cpu_ticks(pid) for pid in pids}
    seconds = duration_s if total is None else perf() - measure_from
    out = summarise(lat, errors, seconds, {p: cpu1[p] - cpu0[p] for p in pids})
    if stats_sock is not None:
        q = int(agent_stats(stats_sock)["registry_queries"]) - queries["start"]
        out["registry_queries"] = q
        out["per_1000"] = 1000 * q / max(1, out["requests"])
    return out


async def storm_load(path: str, per_vm: list[list[bytes]]) -> dict[str, Any]:
    """Every VM opens its connection and sends its requests in turn, all VMs at once."""
    lat: list[float] = []
    errors = 0
    gate = asyncio.Event()

    async def vm(requests: list[bytes]) -> None:
        nonlocal errors
        conn = await _connect(path)
        await gate.wait()
        for data in requests:
            t0 = time.perf_counter()
            status = await _one(conn, data)
            lat.append(time.perf_counter() - t0)
            if status != 200:
                errors += 1
        conn.transport.close()

    tasks = [asyncio.ensure_future(vm(d)) for d in per_vm]
    await asyncio.sleep(0.5)  # all connected
    t0 = time.perf_counter()
    gate.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    return summarise(lat, errors, elapsed, {})


def summarise(lat: list[float], errors: int, seconds: float,
              cpu: dict[int, int]) -> dict[str, Any]:
    lat.sort()
    n = len(lat)

    def pct(p: float) -> float:
        return lat[min(n - 1, int(p * n))] * 1000 if n else float("nan")

    return {"requests": n, "errors": errors, "rps": n / seconds if seconds else 0.0,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "seconds": seconds,
            "cpu_us_per_req": {pid: (t / CLK_TCK) * 1e6 / n if n else 0.0
                               for pid, t in cpu.items()}}


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)


# -- orchestration ----------------------------------------------------------------------
def enter_private_netns() -> None:
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        return
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


def agent_stats(sock: str) -> dict[str, Any]:
    import http.client
    import socket as _s

    class C(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = _s.socket(_s.AF_UNIX)
            self.sock.connect(sock)

    c = C("localhost", timeout=10)
    c.request("GET", "/openimds-agent/stats")
    out: dict[str, Any] = json.loads(c.getresponse().read())
    c.close()
    return out


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="agent-bench-"))
        self.services: list[Service] = []
        self.cfg = base_config(self.tmp / "state", DEFAULT={
            "metadata_proxy_socket": str(self.tmp / "agent.sock")})
        (self.tmp / "state").mkdir()
        self.config = write_config(self.tmp / "openimds.ini", self.cfg)
        self.stub_unix = str(self.tmp / "stub.sock")
        reg = self.cfg["registry"]
        self.registry_url = f"http://{reg['bind_host']}:{reg['bind_port']}"

    def start(self, svc: Service, ready: Any) -> Service:
        self.services.append(svc)
        return svc.start().wait_until(ready, timeout=60)

    def agent(self, name: str, **agent_opts: Any) -> tuple[Service, str]:
        sock = str(self.tmp / f"{name}.sock")
        env = {"OPENIMDS_METADATA_PROXY_SOCKET": sock}
        env.update({f"OPENIMDS_METADATA_AGENT_{k.upper()}": str(v)
                    for k, v in agent_opts.items()})
        svc = Service(name, [PYTHON, "-m", "openimds", "--config", str(self.config), "agent"],
                      self.tmp, env=env)
        self.start(svc, unix_ready(sock))
        deadline = time.monotonic() + 20
        while not agent_stats(sock)["feed_live"]:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: feed never live")
            time.sleep(0.05)
        return svc, sock

    def stop_all(self) -> None:
        for svc in reversed(self.services):
            if svc.name == "registry":
                svc.kill()
            else:
                svc.stop()

    def populate(self, admin: RegistryClient) -> tuple[str, list[str], list[str]]:
        r = admin.create_router("bench")
        net = admin.create_network("bench")
        sub = admin.create_subnet("bench", net["id"], "10.100.0.0/16")
        admin.add_interface(r["id"], sub["id"])
        ips = []
        total = self.args.vms + self.args.storm_vms
        for i in range(total):
            ip = f"10.100.{10 + i // 250}.{1 + i % 250}"
            admin.create_instance(f"vm{i}", net["id"], fixed_ip=ip)
            ips.append(ip)
        return r["id"], ips[: self.args.vms], ips[self.args.vms:]

    def run(self) -> dict[str, Any]:
        a = self.args
        self.start(openimds_service("registry", self.config, "registry", "serve",
                                    log_dir=self.tmp),
                   http_ready(self.registry_url + "/v1/health"))
        port = int(self.cfg["DEFAULT"]["nova_metadata_port"])
        stub = Service("stub", [PYTHON, str(Path(__file__).resolve()), "--stub", str(port),
                                self.stub_unix], self.tmp)
        self.start(stub, unix_ready(self.stub_unix))
        with RegistryClient(self.registry_url, self.cfg["registry"]["admin_token"]) as admin:
            t0 = time.monotonic()
            router, steady_ips, storm_ips = self.populate(admin)
            print(f"registry populated with {len(steady_ips) + len(storm_ips)} instances in "
                  f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
        hit, hit_sock = self.agent("agent-hit")
        quiet, quiet_sock = self.agent("agent-quiet", access_log="false")
        nocache, nocache_sock = self.agent("agent-nocache", **NOCACHE)
        reqs = [request_bytes(router, ip) for ip in steady_ips]
        conns = [int(c) for c in a.conns.split(",")]
        targets = {
            "direct": (self.stub_unix, [stub.pid]),
            "hit": (hit_sock, [hit.pid]),
            "hit-nolog": (quiet_sock, [quiet.pid]),
            "nocache": (nocache_sock, [nocache.pid]),
        }
        results: dict[str, list[dict[str, Any]]] = {}
        for rnd in range(a.rounds):
            for c in conns if not a.only_storms else ():
                for name, (path, pids) in targets.items():
                    res = asyncio.run(steady_load(path, reqs, c, a.warmup, a.duration, pids,
                                                  None if name == "direct" else path))
                    res["round"] = rnd
                    results.setdefault(f"{name} c={c}", []).append(res)
                    print(f"round {rnd} {name} c={c}: {res['rps']:.0f} rps "
                          f"p99 {res['p99_ms']:.2f} ms errors {res['errors']}", file=sys.stderr)
            # without the cache a storm takes ~30x longer: measure that reference once
            first = (True, False) if rnd == 0 and a.nocache_storm else (True,)
            for cache in first if a.storm_vms else ():
                batch = storm_ips  # a fresh agent: every VM's first request is a miss
                name = "storm-cache" if cache else "storm-nocache"
                svc, sock = self.agent(f"agent-{name}-{rnd}",
                                       **({} if cache else NOCACHE))
                per_vm = [[request_bytes(router, ip)] * a.storm_requests for ip in batch]
                self.storm(name, rnd, svc, sock, per_vm, results)
                svc.stop()
                self.services.remove(svc)
            if a.storm_vms and a.boot_storm:
                svc, sock = self.agent(f"agent-storm-boot-{rnd}")
                deadline = time.monotonic() + 20
                while not agent_stats(sock)["index_loads"]:  # a storm of new VMs meets it
                    if time.monotonic() > deadline:
                        raise RuntimeError("storm-boot: the agent's index never loaded")
                    time.sleep(0.05)
                per_vm = [[request_bytes(router, ip, p, f"{rnd:x}-{v:x}-{i:x}")
                           for i, p in enumerate(BOOT_PATHS)] for v, ip in enumerate(storm_ips)]
                self.storm("storm-boot", rnd, svc, sock, per_vm, results)
                self.storm("storm-boot-again", rnd, svc, sock, per_vm, results)
                svc.stop()
                self.services.remove(svc)
        return results

    def storm(self, name: str, rnd: int, svc: Service, sock: str, per_vm: list[list[bytes]],
              results: dict[str, list[dict[str, Any]]]) -> None:
        """One storm arm against `svc`: agent CPU per request and registry queries."""
        q0 = agent_stats(sock)["registry_queries"]
        cpu0 = cpu_ticks(svc.pid)
        res = asyncio.run(storm_load(sock, per_vm))
        cpu = cpu_ticks(svc.pid) - cpu0
        st = agent_stats(sock)
        res["registry_queries"] = st["registry_queries"] - q0
        res["per_1000"] = 1000 * res["registry_queries"] / max(1, res["requests"])
        res["cpu_us_per_req"] = {svc.pid: (cpu / CLK_TCK) * 1e6 / res["requests"]}
        res["round"] = rnd
        results.setdefault(name, []).append(res)
        cpu_us = next(iter(res["cpu_us_per_req"].values()))
        print(f"round {rnd} {name}: {res['requests']} req in {res['seconds']:.2f}s "
              f"p99 {res['p99_ms']:.1f} ms, agent CPU {cpu_us:.1f} us/req, "
              f"registry queries {res['registry_queries']} "
              f"({res['per_1000']:.1f}/1000), errors {res['errors']}", file=sys.stderr)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}",
        f"rounds {args.rounds}, {args.duration}s measured after {args.warmup}s warm-up, "
        f"{args.vms} VMs cycled in steady runs",
        "",
        "| scenario | rps (median) | rps min-max | p50 ms | p99 ms | agent CPU µs/req | "
        "registry queries/1000 | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        if name.startswith("storm"):
            continue
        rps = [r["rps"] for r in runs]
        cpu = [next(iter(r["cpu_us_per_req"].values())) for r in runs]
        q = ("" if name.startswith("direct") else
             f"{median([r['per_1000'] for r in runs]):.1f}")
        lines.append(
            f"| {name} | {median(rps):,.0f} | {min(rps):,.0f}-{max(rps):,.0f} | "
            f"{median([r['p50_ms'] for r in runs]):.2f} | "
            f"{median([r['p99_ms'] for r in runs]):.2f} | {median(cpu):.1f} | {q} | "
            f"{sum(r['errors'] for r in runs)} |")
    lines += ["", "Per-round ratios (median, min-max):", ""]
    conns = sorted({n.split("c=")[1] for n in results if "c=" in n}, key=int)
    for c in conns:
        for a, b in (("hit", "direct"), ("hit-nolog", "direct"), ("hit-nolog", "hit"),
                     ("nocache", "hit")):
            ra = results.get(f"{a} c={c}", [])
            rb = results.get(f"{b} c={c}", [])
            ratios = [x["rps"] / y["rps"] for x, y in zip(ra, rb, strict=False) if y["rps"]]
            if ratios:
                lines.append(f"- c={c}: {a} / {b} rps = {median(ratios):.2f} "
                             f"({min(ratios):.2f}-{max(ratios):.2f})")
    lines += ["", "| boot storm | VMs x requests | seconds | rps | p99 ms | registry queries | "
              "per 1000 requests | agent CPU µs/req | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name in ("storm-cache", "storm-nocache", "storm-boot", "storm-boot-again"):
        runs = results.get(name, [])
        if not runs:
            continue
        per_vm = len(BOOT_PATHS) if name.startswith("storm-boot") else args.storm_requests
        lines.append(
            f"| {name} | {args.storm_vms} x {per_vm} | "
            f"{median([r['seconds'] for r in runs]):.2f} | "
            f"{median([r['rps'] for r in runs]):,.0f} | "
            f"{median([r['p99_ms'] for r in runs]):.1f} | "
            f"{median([r['registry_queries'] for r in runs]):.0f} | "
            f"{median([r['per_1000'] for r in runs]):.1f} | "
            f"{median([next(iter(r['cpu_us_per_req'].values())) for r in runs]):.1f} | "
            f"{sum(r['errors'] for r in runs)} |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--stub":
        run_stub(int(sys.argv[2]), sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--conns", default="10,100")
    p.add_argument("--vms", type=int, default=200)
    p.add_argument("--storm-vms", type=int, default=400)
    p.add_argument("--storm-requests", type=int, default=20)
    p.add_argument("--no-boot-storm", dest="boot_storm", action="store_false",
                   help="skip the storm-boot arms (each VM's 28 boot paths, once and again)")
    p.add_argument("--no-nocache-storm", dest="nocache_storm", action="store_false",
                   help="skip storm-nocache (a registry query per request: minutes at 1,000 "
                   "VMs)")
    p.add_argument("--only-storms", action="store_true",
                   help="skip the steady scenarios (direct, hit, nocache)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    args = p.parse_args()
    enter_private_netns()
    try:
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    bench = Bench(args)
    try:
        results = bench.run()
    finally:
        bench.stop_all()
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    print(report(results, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
