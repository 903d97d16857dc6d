"""Flat at scale: the agent + API hops and the registry at 100 and at 10,000 instances.

    sudo .venv/bin/python bench/scale_bench.py [--sizes 100,10000] [--per-router 10]
                                               [--shape routers|shared]
                                               [--backend sqlite|postgresql]
                                               [--duration 5] [--rate R] [--load-rate R]
                                               [--trace-registry] [--json FILE]

One real registry (`openimds registry serve`, SQLite or PostgreSQL) grows from the first
size to the last: `--per-router` instances on each router's own /24 network (10,000
instances = 1,000 routers, networks and subnets). The registry is seeded in-process
through the same `Registry` service code its REST API runs (far faster than 10,000 HTTP
round trips; the REST path is what the create figures below measure). At each size, in this order:

1. `server create` through the REST API (`RegistryClient.create_instance`, one at a time,
   `--creates` of them): p50/p99 ms, and the registry process's CPU per create
   (utime+stime over the creates: what the machine's load does not inflate); the
   instances are deleted again afterwards. Reference in the same minute: fdatasync p50/p99
   on the store's disk (a durable SQLite commit fsyncs once).
2. The change feed: `GET /v1/changes?since=<head - 100>` p50/p99 ms, and the wake-up of a
   long-poll (`wait=10`) after a create: ms from the create's answer to the poll's.
3. Fresh `openimds agent` and `openimds api` (cold caches) are started; a load generator (this
   process, uvloop + httptools, keep-alive, as the proxy speaks) sends every instance's
   cloud-init core requests (4; `--boot-paths`: the 26 a boot reads) once over the agent's
   Unix socket, with the proxy's headers (X-Forwarded-For = the instance's IP,
   X-Neutron-Router-ID = its router), so every cache holds every instance; RSS of
   registry, agent and API is read then.
4. Steady load for `--duration` s, `--rounds` interleaved rounds: 100 connections cycling
   over all instances (each connection from its own 1/100 of them, so every instance is
   asked within a round), and over the first 100 only (same processes, same minute): CPU µs
   per request of the agent and the API (utime+stime, /proc).
5. Steps 1-2 again under VM traffic (`--load-rate` requests/s, default 5,000, 0 skips it):
   a child process sends it to the agent over 100 keep-alive connections, cycling over every
   instance, while the agent and the API follow the change feed as they always do (each
   create wakes both long-polls). Printed side by side with the quiet figures, with the
   hops' CPU share during it.

`--registry-only` stops after step 2 (the create and feed figures alone, in a minute).
`--shape shared` puts every instance on one network with one /16 subnet behind one router
instead (a provider network: what a create's free-IP pick faces with 10,000 ports).
`--creates` above one /24's free addresses spreads them over the last networks (200 each).
`--trace-registry` loads bench/registry_trace/ into the registry process and reports, for
the creates' window, its cyclic-GC collections (generation 2: count, longest pause) and the
statements SQLAlchemy compiled (cache misses), and which of the slowest 1 % of creates
overlapped one; and splits each create into its write transaction, that write's statement
round trips and its COMMIT (the WAL flush on PostgreSQL, the fsync on SQLite), the rest
being the HTTP hop, the executor thread and the write lock. `--pg-synchronous-commit off`
(PostgreSQL, the bench's own database only; not durable, a diagnostic) shows what a create
costs without the commit's flush.

Printed: CPU per request at the last size / at the first (target within 10 %), memory per
instance (RSS difference between the sizes / instance difference; targets agent <= 4 KiB,
API <= 16 KiB), create and feed p99 at the last size (target < 10 ms). VM traffic comes in by
source address (the header the proxy sets), not from namespaces: the proxy's own cost per
router is measured by bench/proxy_bench.py (1,000 namespaces). The 2-core machine is shared:
compare within the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "src"))

from agent_bench import agent_stats, enter_private_netns, steady_load  # noqa: E402
from tests.support import (  # noqa: E402
    Service,
    base_config,
    http_ready,
    openimds_service,
    postgres_database,
    unix_ready,
    write_config,
)

from openimds.metadata.api import BOOT_PATHS  # noqa: E402

PATHS = ("/openstack/latest/meta_data.json", "/openstack/latest/network_data.json",
         "/latest/meta-data/instance-id", "/latest/meta-data/local-ipv4")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _idle_s() -> float:
    """Idle seconds of all cores (/proc/stat: idle + iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _perf_record(pid: int, out_dir: Path | None, name: str) -> subprocess.Popen[bytes] | None:
    """`--perf-dir`: `perf record` (software clock, kernel and user symbols) on `pid` until
    `_perf_stop`, into DIR/NAME.data; None without the option."""
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", "999", "-p",
                             str(pid), "-o", str(out_dir / f"{name}.data")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _perf_stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None:
        proc.send_signal(2)  # SIGINT to that pid: perf writes its file and exits
        proc.wait(30)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def request(router_id: str, ip: str, path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nUser-Agent: Cloud-Init/24.1\r\n"
            f"Accept: */*\r\nX-Forwarded-For: {ip}\r\nX-Neutron-Router-ID: {router_id}\r\n"
            "\r\n").encode()


def registry_trace(path: Path, spans: list[tuple[float, float]],
                   slow: list[int]) -> dict[str, Any]:
    """What bench/registry_trace/ recorded between the first create's start and the last
    one's end, and which of the `slow` creates overlapped a collection or a compile; and each
    create split by its write transaction(s) inside its span: the write's ms, its statements'
    round trips (count, ms) and its COMMIT's ms. The rest of a create's wall time is the HTTP
    hop, aiohttp, JSON and the wait for the executor thread and the write lock."""
    t0, t1 = spans[0][0], spans[-1][1]
    events: list[tuple[float, float, str, float, str]] = []
    for line in path.read_text().splitlines() if path.exists() else []:
        at, kind, ms, *head = line.split()
        if t0 <= float(at) <= t1 + 0.01:
            events.append((float(at) - float(ms) / 1000, float(at), kind, float(ms),
                           " ".join(head)))
    gc2 = [e[3] for e in events if e[2] == "gc2"]
    compiles = [e[3] for e in events if e[2] == "compile"]
    # which statements, and when (ms after the first create's start): a compile on the
    # reaper's thread is not a request's, though it may overlap one
    compiled = [f"{(e[0] - t0) * 1000:.0f} ms: {e[4]}" for e in events if e[2] == "compile"]

    def during(i: int) -> list[str]:
        a, b = spans[i]
        return sorted({e[2] for e in events if e[0] <= b and e[1] >= a})

    # per create: (write ms, statements, statement ms, commit ms), its writes summed
    parts: list[tuple[float, int, float, float]] = []
    for a, b in spans:
        # a write event's text is "<statements> <statement ms> <commit ms>"
        w = [(e[3], e[4].split()) for e in events
             if e[2] == "write" and a <= e[0] and e[1] <= b]
        parts.append((sum(ms for ms, _ in w), sum(int(f[0]) for _, f in w),
                      sum(float(f[1]) for _, f in w), sum(float(f[2]) for _, f in w)))
    split: dict[str, Any] = {}
    if any(p[0] for p in parts):
        wall = [(b - a) * 1000 for a, b in spans]
        cols = {"write_ms": [p[0] for p in parts], "stmt_ms": [p[2] for p in parts],
                "commit_ms": [p[3] for p in parts],
                "outside_write_ms": [w - p[0] for w, p in zip(wall, parts, strict=True)]}
        split = {k: {"p50": round(pct(v, 0.5), 2), "p99": round(pct(v, 0.99), 2)}
                 for k, v in cols.items()}
        split["statements_per_create"] = round(pct([p[1] for p in parts], 0.5))
        split["slowest"] = {str(i): {"wall": round(wall[i], 2), "write": round(parts[i][0], 2),
                                     "stmts": round(parts[i][2], 2),
                                     "commit": round(parts[i][3], 2)} for i in sorted(slow)}
    return {"gc2": len(gc2), "gc2_max_ms": max(gc2, default=0.0),
            "gc1": sum(e[2] == "gc1" for e in events),
            "compiles": len(compiles), "compile_ms": round(sum(compiles), 2),
            "compiled": compiled,
            "slowest_overlapped": {str(i): during(i) for i in sorted(slow)},
            "split": split}


class Scale:
    def __init__(self, args: argparse.Namespace, db_url: str = "") -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
        (self.tmp / "state").mkdir()
        self.db_url = db_url or f"sqlite:///{self.tmp / 'state' / 'registry.sqlite'}"
        self.cfg = base_config(self.tmp / "state", DEFAULT={
            "metadata_proxy_socket": str(self.tmp / "agent.sock")},
            metrics={"enabled": "false"}, api={"prewarm_concurrency": 0},
            registry={"sqlite_synchronous": args.sqlite_synchronous, "connection": db_url})
        self.config = write_config(self.tmp / "openimds.ini", self.cfg)
        reg = self.cfg["registry"]
        self.url = f"http://{reg['bind_host']}:{reg['bind_port']}"
        self.token = reg["admin_token"]
        self.services: list[Service] = []
        self.vms: list[tuple[str, str]] = []  # (router id, ip)
        self.routers: list[tuple[str, str]] = []  # (router id, network id)
        self.trace = self.tmp / "registry-trace.log"

    # -- registry ------------------------------------------------------------------------
    def seed(self, total: int) -> float:
        """Grow the registry to `total` instances, in-process (registry stopped). With
        `--seed-cache NAME` (PostgreSQL): copied from the template database a run with the
        same NAME, size and shape left instead, if there is one, else seeded and left as
        one (seeding 10,000 took minutes on a loaded machine; a copy seconds)."""
        cache = self._seed_cache(total)
        if cache is not None and cache[1].exists():
            t0 = time.monotonic()
            self._psql(f"DROP DATABASE {self._db_name()} WITH (FORCE)",
                       f"CREATE DATABASE {self._db_name()} TEMPLATE {cache[0]}")
            kept = json.loads(cache[1].read_text())
            self.routers = [(r, n) for r, n in kept["routers"]]
            self.vms = [(r, ip) for r, ip in kept["vms"]]
            return time.monotonic() - t0
        seeded = self._seed(total)
        if cache is not None:
            self._psql(f"DROP DATABASE IF EXISTS {cache[0]}",
                       f"CREATE DATABASE {cache[0]} TEMPLATE {self._db_name()}")
            cache[1].write_text(json.dumps({"routers": self.routers, "vms": self.vms}))
        return seeded

    def _seed_cache(self, total: int) -> tuple[str, Path] | None:
        """(template database, its routers' and instances' file), or None without
        --seed-cache or on SQLite."""
        name = self.args.seed_cache
        if not name or not self.db_url.startswith("postgresql"):
            return None
        tmpl = f"{name}_{total}_{self.args.per_router}_{self.args.shape}".lower()
        return tmpl, Path(tempfile.gettempdir()) / f"scale-bench-{tmpl}.json"

    def _db_name(self) -> str:
        import sqlalchemy as sa

        return str(sa.engine.make_url(self.db_url).database)

    @staticmethod
    def _psql(*sql: str) -> None:
        from tests.support import PG_SOCKET_DIR, clean_env

        for statement in sql:
            subprocess.run(["psql", "-h", PG_SOCKET_DIR, "-d", "postgres", "-qAtc", statement],
                           check=True, capture_output=True, env=clean_env({"PGUSER": "root"}))

    def _seed(self, total: int) -> float:
        from openimds.registry.service import Registry
        from openimds.registry.store import Store

        # normal: the seed is setup, not measured (the registry then opens it as configured)
        store = Store(self.db_url, sqlite_synchronous="normal")
        store.create_schema()
        reg = Registry(store)
        t0 = time.monotonic()
        per = self.args.per_router
        shared = self.args.shape == "shared"
        while len(self.vms) < total:
            k = len(self.vms)
            if (k == 0 and not self.routers) if shared else k % per == 0:
                i = len(self.routers)
                r = reg.create_router({"name": f"r{i}"})
                n = reg.create_network({"name": f"n{i}"})
                s = reg.create_subnet({"name": f"s{i}", "network_id": n["id"], "cidr":
                                       "10.8.0.0/16" if shared else
                                       f"10.{i // 256}.{i % 256}.0/24"})
                reg.add_interface(r["id"], {"subnet_id": s["id"]})
                self.routers.append((r["id"], n["id"]))
            rid, nid = self.routers[-1]
            i = len(self.routers) - 1
            ip = (f"10.8.{(10 + k) // 256}.{(10 + k) % 256}" if shared
                  else f"10.{i // 256}.{i % 256}.{10 + k % per}")
            reg.create_instance({"name": f"vm{k}", "network_id": nid,
                                 "fixed_ip": ip,
                                 "metadata": {"role": "scale", "n": str(k)}})
            self.vms.append((rid, ip))
        store.dispose()
        return time.monotonic() - t0

    def start(self, name: str, *args: str, ready: Any) -> Service:
        svc = openimds_service(name, self.config, *args, log_dir=self.tmp)
        if name == "registry" and self.args.trace_registry:
            path = [str(REPO / "bench" / "registry_trace"), svc.env.get("PYTHONPATH", "")]
            svc.env.update(PYTHONPATH=os.pathsep.join(p for p in path if p),
                           BENCH_REGISTRY_TRACE=str(self.trace))
        self.services.append(svc)
        return svc.start().wait_until(ready, timeout=60)

    def stop(self, svc: Service) -> None:
        svc.stop()
        self.services.remove(svc)

    def registry_timings(self, pid: int, skip: int = 0) -> dict[str, Any]:
        """skip: networks (from the last) not to create on. The creates' addresses are
        released again at the end, and a create that can only have an address released
        within `[registry] reuse_hold` is answered that long after its commit (up to 30 s:
        registry/reuse.py), so a second pass at the same size must use other networks."""
        from registry_bench import fsync_reference

        from openimds.registry.client import RegistryClient

        out: dict[str, Any] = {}
        with RegistryClient(self.url, self.token) as admin:
            made, ms, spans = [], [], []
            cpu0 = cpu_s(pid)
            for i in range(self.args.creates):
                # 200 per network: a /24 has ~240 free addresses
                nid = self.routers[-1 - (skip + i // 200) % len(self.routers)][1]
                w0, t0 = time.time(), time.perf_counter()
                made.append(admin.create_instance(f"probe{i}", nid)["id"])
                ms.append((time.perf_counter() - t0) * 1000)
                spans.append((w0, time.time()))
            out["create_cpu_ms"] = (cpu_s(pid) - cpu0) / self.args.creates * 1000
            out["create_p50_ms"], out["create_p99_ms"] = pct(ms, 0.5), pct(ms, 0.99)
            out["create_n"] = len(ms)  # p99 of 20 is the max: say how many it is of
            slow = sorted(range(len(ms)), key=ms.__getitem__)[-max(1, len(ms) // 100):]
            out["create_first_ms"], out["create_max_ms"] = ms[0], max(ms)
            out["create_slowest"] = [(i, round(ms[i], 2)) for i in sorted(slow)]
            if self.args.trace_registry:
                out["trace"] = registry_trace(self.trace, spans, slow)
            out.update(fsync_reference(str(self.tmp / "state")))
            head = int(admin.health()["revision"])
            ms = []
            for _ in range(self.args.feed_reads):
                t0 = time.perf_counter()
                admin.changes(max(0, head - 100), limit=100)
                ms.append((time.perf_counter() - t0) * 1000)
            out["changes_p50_ms"], out["changes_p99_ms"] = pct(ms, 0.5), pct(ms, 0.99)
            out["changes_n"] = len(ms)
            wake = []
            for iid in made[:30]:
                head = int(admin.health()["revision"])
                got: dict[str, float] = {}

                def poll(since: int = head, got: dict[str, float] = got) -> None:
                    with RegistryClient(self.url, self.token) as c:
                        c.changes(since, wait=10)
                    got["t"] = time.perf_counter()

                th = threading.Thread(target=poll)
                th.start()
                time.sleep(0.05)  # the poll is waiting
                admin.update("instance", iid, {"metadata": {"probe": "1"}})
                t_write = time.perf_counter()
                th.join(15)
                wake.append((got.get("t", float("inf")) - t_write) * 1000)
            out["feed_wake_p50_ms"] = pct(wake, 0.5)
            out["feed_wake_p99_ms"] = pct(wake, 0.99)
            for iid in made:
                admin.delete("instance", iid)
        return out

    def under_load(self, sock: str, reqs: list[bytes], registry_pid: int,
                   hops: dict[str, int]) -> dict[str, Any]:
        """The registry figures again (`registry_timings`) while VM traffic runs: a child
        process (so the load generator takes no GIL from the creates' client) sends
        `--load-rate` requests/s over 100 keep-alive connections to the agent, cycling over
        every instance, and the agent and API follow the change feed as always (each create
        wakes both long-polls, which read the feed). Also: the CPU share of a core during
        it of the hops (the load's evidence), the load generator, the registry and its
        PostgreSQL backends, and the machine's idle (all cores), and the requests the
        agent answered."""
        import multiprocessing

        ctx = multiprocessing.get_context("fork")
        child = ctx.Process(target=_load_child, args=(sock, reqs, self.args.load_rate),
                            daemon=True)
        child.start()
        try:
            time.sleep(1.0)  # its connections open and reach the rate
            before = agent_stats(sock).get("requests", 0)
            # the load generator and the registry too: on 2 cores, what the generator
            # takes is CPU the registry's wake-ups wait for; idle: the machine's spare cores
            assert child.pid is not None
            procs = {**hops, "load": child.pid, "registry": registry_pid}
            backends = self._pg_backends()  # PostgreSQL: the registry's server backends
            cpu0 = {h: cpu_s(pid) for h, pid in procs.items()}
            pg0 = sum(cpu_s(pid) for pid in backends)
            idle0 = _idle_s()
            t0 = time.monotonic()
            # not the networks the quiet pass created on and released (its reuse hold)
            out = self.registry_timings(registry_pid, skip=self.networks_per_pass)
            wall = time.monotonic() - t0
            share = {h: round((cpu_s(pid) - cpu0[h]) / wall, 3) for h, pid in procs.items()}
            if backends:
                share["postgres"] = round((sum(cpu_s(p) for p in backends) - pg0) / wall, 3)
            share["idle"] = round((_idle_s() - idle0) / wall, 3)
            out["load_cpu_share"] = share
            out["load_agent_rps"] = round((agent_stats(sock).get("requests", 0) - before)
                                          / wall)
            out["load_alive"] = child.is_alive()
        finally:
            if child.pid is not None:
                child.terminate()  # SIGTERM to that pid
            child.join(10)
        return out

    def _pg_backends(self) -> list[int]:
        """PostgreSQL: the pids of the server backends on the bench's database (the
        registry's pool; nothing else connects to it), else none."""
        if not self.db_url.startswith("postgresql"):
            return []
        import sqlalchemy as sa

        eng = sa.create_engine(self.db_url, poolclass=sa.pool.NullPool)
        try:
            with eng.connect() as conn:
                return [int(p) for p in conn.exec_driver_sql(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND pid <> pg_backend_pid()").scalars()]
        finally:
            eng.dispose()

    @property
    def networks_per_pass(self) -> int:
        """Networks one `registry_timings` pass creates on (200 creates each)."""
        return int(-(-self.args.creates // 200))

    # -- one size ------------------------------------------------------------------------
    def measure(self, size: int) -> dict[str, Any]:
        a = self.args
        seed_s = self.seed(size)
        registry = self.start("registry", "registry", "serve",
                              ready=http_ready(self.url + "/v1/health"))
        res: dict[str, Any] = {"instances": size, "routers": len(self.routers),
                               "seed_s": round(seed_s, 1)}
        res.update(self.registry_timings(registry.pid))
        if a.registry_only:
            self.stop(registry)
            return res
        port = self.cfg["DEFAULT"]["nova_metadata_port"]
        api = self.start("api", "api", ready=http_ready(f"http://127.0.0.1:{port}/"))
        sock = self.cfg["DEFAULT"]["metadata_proxy_socket"]
        agent = self.start("agent", "agent", ready=unix_ready(sock))
        deadline = time.monotonic() + 30
        while not agent_stats(sock)["feed_live"]:
            assert time.monotonic() < deadline, "agent feed never live"
            time.sleep(0.1)
        rss0 = {"registry": rss_kib(registry.pid), "agent": rss_kib(agent.pid),
                "api": rss_kib(api.pid)}
        # the warm port index loads from /v1/topology once the feed is live: its share
        while agent_stats(sock)["index_ports"] < size:
            assert time.monotonic() < deadline + 60, "agent index never loaded"
            time.sleep(0.1)
        res["rss_kib_indexed"] = {"agent": rss_kib(agent.pid)}
        # Warm: every instance's core requests, once each (cold: a lookup and a view each).
        paths = BOOT_PATHS if a.boot_paths else PATHS
        warm = [request(rid, ip, p) for rid, ip in self.vms for p in paths]
        t0 = time.monotonic()
        w = asyncio.run(steady_load(sock, warm, 50, 0.0, 3600.0, [], None,
                                    total=len(warm)))
        res["warm_s"] = round(time.monotonic() - t0, 1)
        res["warm_errors"] = w["errors"]
        st = agent_stats(sock)
        res["agent_cache_entries"] = st["cache_entries"]
        res["rss_kib"] = {"registry": rss_kib(registry.pid), "agent": rss_kib(agent.pid),
                          "api": rss_kib(api.pid)}
        res["rss_kib_fresh"] = rss0
        # Steady load, interleaved rounds: cycling over every instance, and over the first
        # 100 only (the same processes, the same minute: the in-run reference).
        # `--steady-paths` N: each instance asks its first N core paths in turn (one head
        # each, so N exact heads per instance in the agent's server layer).
        asked = PATHS[:a.steady_paths]
        sets = {"all": [request(rid, ip, p) for rid, ip in self.vms for p in asked],
                "first100": [request(rid, ip, p) for rid, ip in self.vms[:100] for p in asked]}
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in sets}
        for rnd in range(a.rounds):
            for name, reqs in sets.items():
                # the agent's user and system CPU over the round (its warm-up second too):
                # whether what the larger set costs more is the kernel's or the process's
                user0, sys0 = cpu_split(agent.pid)
                perf = _perf_record(agent.pid, a.perf_dir, f"{size}-{name}-{rnd}")
                # spread: the 100 connections start len(reqs) / 100 apart, so "all" goes
                # through every instance (from offsets 7k it covered only the first ~1,000)
                try:
                    r = asyncio.run(steady_load(sock, reqs, 100, 1.0, a.duration,
                                                [agent.pid, api.pid], None, spread=True,
                                                rate=a.rate))
                finally:
                    _perf_stop(perf)
                user1, sys1 = cpu_split(agent.pid)
                runs[name].append({"rps": r["rps"], "p99_ms": r["p99_ms"],
                                   "errors": r["errors"],
                                   "cpu_us": {"agent": r["cpu_us_per_req"][agent.pid],
                                              "api": r["cpu_us_per_req"][api.pid]},
                                   "agent_sys_share": round(
                                       (sys1 - sys0) / max(1e-9, user1 - user0 + sys1 - sys0),
                                       3)})
        res["steady"] = runs
        # again after the steady rounds: what repeated heads keep (the server layer's exact
        # heads are made the second time a head comes, never in the warm-up's single pass)
        res["rss_kib_steady"] = {"registry": rss_kib(registry.pid), "agent": rss_kib(agent.pid),
                                 "api": rss_kib(api.pid)}
        res["rps"] = statistics.median(r["rps"] for r in runs["all"])
        res["errors"] = sum(r["errors"] for rs in runs.values() for r in rs)
        res["cpu_us"] = {h: statistics.median(r["cpu_us"][h] for r in runs["all"])
                         for h in ("agent", "api")}
        res["cpu_ratio_all_vs_first100"] = {
            h: statistics.median(x["cpu_us"][h] / y["cpu_us"][h]
                                 for x, y in zip(runs["all"], runs["first100"], strict=True))
            for h in ("agent", "api")}
        if a.load_rate > 0:
            res["loaded"] = self.under_load(sock, sets["all"], registry.pid,
                                            {"agent": agent.pid, "api": api.pid})
        for svc in (agent, api, registry):
            self.stop(svc)
        return res


def print_phases(rows: list[dict[str, Any]]) -> None:
    """Quiet and loaded registry figures side by side, and the creates' split (with
    --trace-registry): write transaction, its statements' round trips, its COMMIT."""
    print("\n| instances | VM traffic | create p50 / p99 ms | registry CPU ms per create | "
          "changes p50 / p99 ms | wake p50 / p99 ms | fdatasync p99 ms | write / statements "
          "/ COMMIT / outside the write, p50 · p99 ms | statements per create |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for name, x in (("none", r), ("loaded", r.get("loaded"))):
            if x is None:
                continue
            if name == "loaded":
                share = x["load_cpu_share"]
                more = "".join(f", {k} {share[k]:.0%}" for k in
                               ("load", "registry", "postgres", "idle") if k in share)
                name = (f"{x['load_agent_rps']:,} req/s (agent {share['agent']:.0%}, API "
                        f"{share['api']:.0%}{more} of a core)")
            sp = x.get("trace", {}).get("split", {})
            split = " / ".join(f"{sp[k]['p50']:.1f} · {sp[k]['p99']:.1f}" for k in
                               ("write_ms", "stmt_ms", "commit_ms", "outside_write_ms")
                               ) if sp else ""
            print(f"| {r['instances']:,} | {name} | {x['create_p50_ms']:.1f} / "
                  f"{x['create_p99_ms']:.1f} | {x['create_cpu_ms']:.2f} | "
                  f"{x['changes_p50_ms']:.1f} / {x['changes_p99_ms']:.1f} | "
                  f"{x['feed_wake_p50_ms']:.1f} / {x['feed_wake_p99_ms']:.1f} | "
                  f"{x['fsync_p99_ms']:.2f} | {split} | "
                  f"{sp.get('statements_per_create', '')} |")


def _load_child(sock: str, reqs: list[bytes], rate: float) -> None:
    """`Scale.under_load`'s load generator, until its parent terminates it."""
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(steady_load(sock, reqs, 100, 0.0, 3600.0, [], None, spread=True, rate=rate))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,10000")
    p.add_argument("--per-router", type=int, default=10)
    p.add_argument("--shape", default="routers", choices=("routers", "shared"),
                   help="routers: --per-router instances per router's /24; shared: every "
                        "instance on one /16")
    p.add_argument("--creates", type=int, default=100)
    p.add_argument("--feed-reads", type=int, default=100,
                   help="registry_timings: GET /v1/changes?since=head-100&limit=100 this often")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=0.0,
                   help="steady load's requests/s in all (0: as fast as 100 connections go); "
                        "below capacity both sets run at the same rate")
    p.add_argument("--backend", default="sqlite", choices=("sqlite", "postgresql"),
                   help="the registry's database")
    p.add_argument("--sqlite-synchronous", default="full", choices=("full", "normal"),
                   help="[registry] sqlite_synchronous of the registry under test")
    p.add_argument("--registry-only", action="store_true",
                   help="only the create and feed figures (steps 1-2)")
    p.add_argument("--trace-registry", action="store_true",
                   help="report the registry's GC pauses and statement compiles during "
                        "the creates")
    p.add_argument("--load-rate", type=float, default=5000.0,
                   help="requests/s of the VM traffic the registry figures are measured "
                        "again under, after the steady rounds (0: not measured under load)")
    p.add_argument("--pg-synchronous-commit", default="",
                   choices=("", "on", "off", "local", "remote_write", "remote_apply"),
                   help="set synchronous_commit on the bench's own database (default: the "
                        "server's). off is NOT durable: a crash loses the last commits; a "
                        "diagnostic of what the commit's WAL flush costs, not a setting")
    p.add_argument("--boot-paths", action="store_true",
                   help="warm every instance with all of cloud-init's boot paths (the "
                        "API's BOOT_PATHS, what an instance holds once booted) instead of "
                        "the 4 core requests")
    p.add_argument("--seed-cache", default="",
                   help="PostgreSQL: keep each size's seeded database as a template named "
                        "after this (and the size and shape) and copy it in later runs "
                        "instead of seeding again (the same seed for runs of several trees)")
    p.add_argument("--steady-paths", type=int, default=1, choices=(1, 2, 3, 4),
                   help="core paths each instance asks in turn in the steady rounds (each "
                        "a head of its own: what the agent's exact heads keep per instance)")
    p.add_argument("--perf-dir", type=Path,
                   help="diagnostic: `perf record` the agent during each steady round into "
                        "DIR/<size>-<set>-<round>.data")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    enter_private_netns()
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    stack = contextlib.ExitStack()
    # postgresql: the scripts/setup server over its Unix socket, a database of its own
    db_url = stack.enter_context(postgres_database()) if a.backend == "postgresql" else ""
    if db_url and a.pg_synchronous_commit:
        import sqlalchemy as sa

        eng = sa.create_engine(db_url, isolation_level="AUTOCOMMIT")
        with eng.connect() as conn:
            conn.exec_driver_sql(f"ALTER DATABASE {sa.engine.make_url(db_url).database} SET "
                                 f"synchronous_commit = {a.pg_synchronous_commit}")
        eng.dispose()
    sc = Scale(a, db_url)
    rows: list[dict[str, Any]] = []
    from tests.support import PYTHON, clean_env

    # the services' code (PYTHONPATH may name another tree's src: one bench, two trees)
    src = subprocess.run([PYTHON, "-c", "import openimds; print(openimds.__file__)"],
                         capture_output=True, text=True, env=clean_env(), check=True).stdout
    print(f"services run openimds from {Path(src.strip()).parent}; steady paths per "
          f"instance {a.steady_paths}")
    print(f"load average {os.getloadavg()}; registry {a.backend}, sqlite_synchronous="
          f"{a.sqlite_synchronous}, synchronous_commit="
          f"{a.pg_synchronous_commit or 'server default'}", flush=True)
    try:
        for size in [int(s) for s in a.sizes.split(",")]:
            row = sc.measure(size)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        for svc in reversed(sc.services):
            svc.stop()
        shutil.rmtree(sc.tmp, ignore_errors=True)  # the 10,000-instance store and the logs
        stack.close()
    first, last = rows[0], rows[-1]
    print("\n| instances | create p50 / p99 ms | registry CPU ms per create | fdatasync p50 "
          "/ p99 ms | changes p50 / p99 ms | long-poll wake p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['instances']:,} | {r['create_p50_ms']:.1f} / {r['create_p99_ms']:.1f} | "
              f"{r['create_cpu_ms']:.2f} | {r['fsync_p50_ms']:.2f} / {r['fsync_p99_ms']:.2f} | "
              f"{r['changes_p50_ms']:.1f} / {r['changes_p99_ms']:.1f} | "
              f"{r['feed_wake_p50_ms']:.1f} / {r['feed_wake_p99_ms']:.1f} |")
    print(f"registry CPU per create at {last['instances']:,} / at {first['instances']:,} = "
          f"{last['create_cpu_ms'] / first['create_cpu_ms']:.2f}")
    for r in rows:
        print(f"at {r['instances']:,}: {a.creates} creates, the first {r['create_first_ms']:.1f}"
              f" ms, the slowest {r['create_max_ms']:.1f} ms; slowest 1 % (index, ms): "
              f"{r['create_slowest']}" + (f"; trace {r['trace']}" if "trace" in r else ""))
        if "loaded" in r:
            x = r["loaded"]
            print(f"at {r['instances']:,} under load: the slowest 1 % {x['create_slowest']}"
                  + (f"; trace {x['trace']}" if "trace" in x else ""))
    print_phases(rows)
    if a.registry_only:
        print(f"load average {os.getloadavg()}")
        if a.json:
            a.json.write_text(json.dumps(rows, indent=1))
        return 0
    dn = last["instances"] - first["instances"]
    print("\n| instances | routers | create p50/p99 ms | changes p50/p99 ms | feed wake "
          "p50/p99 ms | agent CPU us/req | API CPU us/req | RSS KiB registry/agent/API |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['instances']:,} | {r['routers']:,} | {r['create_p50_ms']:.1f} / "
              f"{r['create_p99_ms']:.1f} | {r['changes_p50_ms']:.1f} / "
              f"{r['changes_p99_ms']:.1f} | {r['feed_wake_p50_ms']:.1f} / "
              f"{r['feed_wake_p99_ms']:.1f} | {r['cpu_us']['agent']:.1f} | "
              f"{r['cpu_us']['api']:.1f} | {r['rss_kib']['registry']:,} / "
              f"{r['rss_kib']['agent']:,} / {r['rss_kib']['api']:,} |")
    for hop in ("agent", "api"):
        ratio = last["cpu_us"][hop] / first["cpu_us"][hop]
        print(f"{hop} CPU/req at {last['instances']:,} / at {first['instances']:,} = "
              f"{ratio:.2f} (target <= 1.10; sizes run minutes apart)")
        inrun = last["cpu_ratio_all_vs_first100"][hop]
        print(f"{hop} CPU/req cycling over all {last['instances']:,} / over the first 100, "
              f"same processes, interleaved rounds = {inrun:.2f} (target <= 1.10)")
    steady = last["steady"]
    print(f"agent CPU/req by round at {last['instances']:,}, all · first100 (us): "
          + ", ".join(f"{x['cpu_us']['agent']:.1f} · {y['cpu_us']['agent']:.1f}"
                      for x, y in zip(steady["all"], steady["first100"], strict=True))
          + "; its system share, all · first100: "
          + ", ".join(f"{x['agent_sys_share']:.2f} · {y['agent_sys_share']:.2f}"
                      for x, y in zip(steady["all"], steady["first100"], strict=True)))
    for name, target in (("agent", 4.0), ("api", 16.0), ("registry", None)):
        per = (last["rss_kib"][name] - first["rss_kib"][name]) / dn if dn else float("nan")
        goal = f" (target <= {target:g} KiB)" if target else ""
        print(f"{name} RSS per instance: {per:.2f} KiB{goal}")
        if dn and "rss_kib_steady" in last and "rss_kib_steady" in first:
            per = (last["rss_kib_steady"][name] - first["rss_kib_steady"][name]) / dn
            print(f"{name} RSS per instance after the steady rounds: {per:.2f} KiB{goal}")
    print(f"at {last['instances']:,}: create p99 {last['create_p99_ms']:.1f} ms, changes p99 "
          f"{last['changes_p99_ms']:.1f} ms, feed wake p99 {last['feed_wake_p99_ms']:.1f} ms "
          "(target < 10 ms)")
    print(f"load average {os.getloadavg()}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
