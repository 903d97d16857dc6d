"""The registry's write and feed paths in-process, at a small and a large size, same run.

    .venv/bin/python bench/registry_bench.py [--sizes 100,10000] [--ops 200]
        [--synchronous full|normal] [--backend sqlite|postgresql] [--shape routers|shared]
        [--code DIR] [--spin N] [--profile] [--json FILE]

The profiling method behind bench/scale_bench.py's registry figures, without HTTP: one store
per size (SQLite in a temp dir, or the scripts/setup PostgreSQL, a database of its own),
seeded through the `Registry` service as scale_bench seeds it (`--per-router` instances on
each router's own /24), then, at each size:

- `create_instance` (auto-allocated IP on the last network) and `delete_instance`, `--ops`
  times: p50/p99 ms of the create (wall), its CPU (this thread's, `time.thread_time`: what a
  loaded machine cannot inflate, bar cache effects), and the SQL statements one create runs
  (counted with a `before_cursor_execute` listener);
- `changes(head - 100, 100)` as the REST API sends it (its JSON body): p50/p99 ms, CPU
  and statements;
- `reconcile()` (the reaper's tick, every second in `registry serve`): p50/max ms;
- `--profile`: cProfile of the creates, the 20 functions with the most own time.

`--shape shared` puts every instance on one network with one /16 subnet instead (10,000
ports in one subnet: what a create's free-IP search reads). The reference, measured in the
same run on the same file system: `fdatasync` of a 4 KiB write, p50/p99 ms — the floor of
a durable commit (SQLite `synchronous=full` fsyncs the WAL once per commit), so a create's
p99 can be read against the disk's own p99 at that minute.

`--spin N` runs N busy-loop processes while the creates, reads and reconciles are timed
(not during the seed): a saturated run queue, where each round trip to PostgreSQL waits
for a core twice (its backend, then this thread), without a load generator's own traffic.

The store is warmed up first (`Registry.warm_up`, as `registry serve` does). `--code DIR`
runs another checkout's registry (e.g. `git worktree add --detach DIR COMMIT`) with this
script, for a before/after in one session.

Printed: each size's figures, and large / small ratios (a flat registry stays near 1).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# --code DIR: that checkout's registry, measured by this script (read before the imports)
CODE = Path(sys.argv[sys.argv.index("--code") + 1]) if "--code" in sys.argv[:-1] else REPO
sys.path.insert(0, str(CODE / "src"))

from sqlalchemy import event  # noqa: E402
from tests.support import postgres_database  # noqa: E402

from openimds.registry.service import Registry  # noqa: E402
from openimds.registry.store import Store  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def fsync_reference(directory: str, n: int = 200) -> dict[str, float]:
    """p50/p99 ms of fdatasync after a 4 KiB write, in `directory` (the store's disk)."""
    path = Path(directory) / "fsync-reference"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    ms = []
    try:
        for i in range(n):
            os.pwrite(fd, os.urandom(4096), (i % 16) * 4096)
            t = time.perf_counter()
            os.fdatasync(fd)
            ms.append((time.perf_counter() - t) * 1000)
    finally:
        os.close(fd)
        path.unlink()
    return {"fsync_p50_ms": pct(ms, 0.5), "fsync_p99_ms": pct(ms, 0.99)}


def spin(n: int) -> list[int]:
    """`--spin`: n child processes that burn CPU until killed, so the run queue is as busy
    as on a loaded node (each wait on the database then also waits for a core)."""
    pids = []
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            while True:
                pass
        pids.append(pid)
    return pids


def seed_shared(reg: Registry, total: int) -> str:
    """One router, one network with one /16 subnet and `total` instances on it."""
    r = reg.create_router({"name": "r0"})
    nid = str(reg.create_network({"name": "shared"})["id"])
    s = reg.create_subnet({"name": "s0", "network_id": nid, "cidr": "10.8.0.0/16"})
    reg.add_interface(r["id"], {"subnet_id": s["id"]})
    for k in range(total):
        n = 10 + k
        reg.create_instance({"name": f"vm{k}", "network_id": nid,
                             "fixed_ip": f"10.8.{n // 256}.{n % 256}",
                             "metadata": {"role": "scale", "n": str(k)}})
    return nid


def seed(reg: Registry, total: int, per: int) -> str:
    """Routers, networks, /24 subnets and `total` instances; returns the last network id."""
    nid = ""
    for k in range(total):
        if k % per == 0:
            i = k // per
            r = reg.create_router({"name": f"r{i}"})
            nid = reg.create_network({"name": f"n{i}"})["id"]
            s = reg.create_subnet({"name": f"s{i}", "network_id": nid,
                                   "cidr": f"10.{i // 256}.{i % 256}.0/24"})
            reg.add_interface(r["id"], {"subnet_id": s["id"]})
        i = k // per
        reg.create_instance({"name": f"vm{k}", "network_id": nid,
                             "fixed_ip": f"10.{i // 256}.{i % 256}.{10 + k % per}",
                             "metadata": {"role": "scale", "n": str(k)}})
    return nid


def measure(url: str, size: int, a: argparse.Namespace) -> dict[str, Any]:
    # The seed is setup, not measured: SQLite without an fsync per commit.
    store = Store(url, sqlite_synchronous="normal")
    store.create_schema()
    t0 = time.monotonic()
    nid = (seed_shared(Registry(store), size) if a.shape == "shared"
           else seed(Registry(store), size, a.per_router))
    out: dict[str, Any] = {"instances": size, "seed_s": round(time.monotonic() - t0, 1)}
    store.dispose()
    store = Store(url, sqlite_synchronous=a.synchronous)
    reg = Registry(store)
    reg.warm_up()  # as `registry serve` does before it listens (PostgreSQL: every connection)
    stmts: list[str] = []

    @event.listens_for(store.engine, "before_cursor_execute")
    def _count(*args: Any) -> None:
        stmts.append(str(args[2]).split()[0])

    spinners = spin(a.spin)
    try:
        prof = cProfile.Profile()
        ms, cpu = [], []
        for j in range(a.ops):
            stmts.clear()
            t, c = time.perf_counter(), time.thread_time()
            if a.profile:
                prof.enable()
            iid = reg.create_instance({"name": f"probe{j}", "network_id": nid})["id"]
            if a.profile:
                prof.disable()
            ms.append((time.perf_counter() - t) * 1000)
            cpu.append((time.thread_time() - c) * 1000)
            out["create_statements"] = len(stmts)
            reg.delete_instance(iid)
        out["create_p50_ms"], out["create_p99_ms"] = pct(ms, 0.5), pct(ms, 0.99)
        out["create_cpu_p50_ms"], out["create_cpu_p99_ms"] = pct(cpu, 0.5), pct(cpu, 0.99)
        head = int(reg.health()["revision"])
        # what the REST API sends: the page's JSON body (an older checkout, --code: its dict
        # encoded as its REST API did)
        page = getattr(reg, "changes_page", None)

        def read_page(since: int, limit: int) -> bytes:
            if page is not None:
                return bytes(page(since, limit).body)
            return json.dumps(reg.changes(since, limit)).encode()

        ms, cpu = [], []
        for _ in range(a.ops):
            stmts.clear()
            t, c = time.perf_counter(), time.thread_time()
            read_page(head - 100, 100)
            ms.append((time.perf_counter() - t) * 1000)
            cpu.append((time.thread_time() - c) * 1000)
        out["changes_statements"] = len(stmts)
        out["changes_p50_ms"], out["changes_p99_ms"] = pct(ms, 0.5), pct(ms, 0.99)
        out["changes_cpu_p50_ms"] = pct(cpu, 0.5)
        ms = []
        for _ in range(20):
            t = time.perf_counter()
            reg.reconcile()
            ms.append((time.perf_counter() - t) * 1000)
        out["reconcile_p50_ms"], out["reconcile_max_ms"] = pct(ms, 0.5), max(ms)
    finally:
        for pid in spinners:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    checkpointer = getattr(store, "checkpointer", None)  # None: an older checkout (--baseline)
    if checkpointer is not None:
        out["checkpoints"] = checkpointer.done
    store.dispose()
    if a.backend == "sqlite" and store.url.database:
        out.update(fsync_reference(str(Path(store.url.database).parent)))
    if a.profile:
        print(f"-- cProfile of {a.ops} creates at {size:,} instances (own time)")
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100,10000")
    p.add_argument("--per-router", type=int, default=10)
    p.add_argument("--ops", type=int, default=200)
    p.add_argument("--synchronous", default="full", choices=("full", "normal"))
    p.add_argument("--backend", default="sqlite", choices=("sqlite", "postgresql"))
    p.add_argument("--shape", default="routers", choices=("routers", "shared"),
                   help="routers: --per-router instances per router's /24 (scale_bench's); "
                        "shared: every instance on one /16")
    p.add_argument("--code", type=Path, default=REPO,
                   help="a checkout whose src/ is measured (default: this one)")
    p.add_argument("--spin", type=int, default=0,
                   help="busy-loop processes running while the creates and reads are timed")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    print(f"load average {os.getloadavg()}; code {CODE}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="registry-bench-") as tmp:
        for size in [int(s) for s in a.sizes.split(",")]:
            with contextlib.ExitStack() as stack:
                url = (f"sqlite:///{tmp}/r{size}.sqlite" if a.backend == "sqlite"
                       else stack.enter_context(postgres_database()))
                rows.append(measure(url, size, a))
            print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    print(f"\n{a.backend} (synchronous={a.synchronous} on sqlite), shape {a.shape}")
    print("| instances | statements per create | create p50 / p99 ms | create CPU p50 / p99 ms "
          "| changes p50 / p99 ms | changes CPU p50 ms | reconcile p50 / max ms |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['instances']:,} | {r['create_statements']} | {r['create_p50_ms']:.2f} / "
              f"{r['create_p99_ms']:.2f} | {r['create_cpu_p50_ms']:.2f} / "
              f"{r['create_cpu_p99_ms']:.2f} | "
              f"{r['changes_p50_ms']:.2f} / {r['changes_p99_ms']:.2f} | "
              f"{r['changes_cpu_p50_ms']:.2f} | {r['reconcile_p50_ms']:.2f} / "
              f"{r['reconcile_max_ms']:.2f} |")
    for r in rows:
        if "fsync_p50_ms" in r:
            print(f"at {r['instances']:,}: fdatasync reference p50 / p99 "
                  f"{r['fsync_p50_ms']:.2f} / {r['fsync_p99_ms']:.2f} ms; create p99 / "
                  f"fdatasync p99 = {r['create_p99_ms'] / r['fsync_p99_ms']:.2f}; "
                  f"background checkpoints {r.get('checkpoints', 0)}")
    for k in ("create_p50_ms", "create_p99_ms", "create_cpu_p50_ms", "create_cpu_p99_ms",
              "changes_p50_ms", "changes_cpu_p50_ms", "reconcile_p50_ms"):
        print(f"{k} at {last['instances']:,} / at {first['instances']:,} = "
              f"{last[k] / first[k]:.2f}")
    print(f"load average {os.getloadavg()}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
