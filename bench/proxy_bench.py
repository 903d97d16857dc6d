"""Benchmark `openimds proxy`: memory per router listener, and requests/s against haproxy.

Run as root on an otherwise quiet machine:

    .venv/bin/python bench/proxy_bench.py all            # memory, then throughput
    .venv/bin/python bench/proxy_bench.py memory --namespaces 1000
    .venv/bin/python bench/proxy_bench.py throughput --rounds 3 --duration 5

memory: one proxy process, N router namespaces made with `ip -batch`, one listener spec per
namespace; RSS (VmRSS) of the proxy at 0, 100 and N listeners after each convergence
(SIGHUP), then a sample of listeners is queried from inside their namespaces.

throughput: one router namespace and one VM namespace joined by a veth (10.0.0.5 -> 10.0.0.1,
as through a router leg). In the router namespace: our proxy on :9697, haproxy with Neutron's
rendered config (neutron.md §2.1; `nbthread 2` as rendered, and a `nbthread 1` variant) on
:9698 and :9699, all in front of the same minimal Unix-socket backend returning a fixed
505-byte meta_data.json. wrk runs inside the VM namespace. Rounds are interleaved (every
config once per round, per scenario) and ratios are taken within a round, because the 2-core
machine is shared with wrk and everything else.

Everything is made under unique names (`pxb-<pid>-*`), and removed on exit, also on Ctrl-C:
processes by PID, then namespaces.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from openimds.host.netns import socket_in_netns  # noqa: E402

PY = sys.executable
TAG = f"pxb-{os.getpid()}"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROUTER_ID = "0b1c2d3e-4f50-4617-8293-a4b5c6d7e8f9"
BODY = json.dumps({
    "uuid": "d8e02d56-2648-49a3-bf97-6be8f1204f38", "name": "vm-bench-0001",
    "hostname": "vm-bench-0001.novalocal", "availability_zone": "nova", "launch_index": 0,
    "project_id": "0bbb8bdc1b0b4f0aa34e1f4a0e2c1f77",
    "keys": [{"name": "mykey", "type": "ssh",
              "data": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJk3q0Q3U1xq2Zp7r0Jm6fV2k mykey"}],
    "public_keys": {"mykey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJk3q0Q3U1xq2Zp7r0Jm6fV2k"},
    "meta": {"role": "bench"}, "devices": [], "dedicated_cpus": [],
    "random_seed": "cXVpdGUgcmFuZG9tIGJ5dGVzIGZvciB0aGUgYmVuY2htYXJr",
}, separators=(",", ":")).encode()
PATH = "/openstack/latest/meta_data.json"

# haproxy with Neutron 29.0.0's rendered router config (neutron.md §2.1). Differences, the
# same for both sides: no `log` lines (no access logging anywhere in this bench), no
# `daemon` (run in the foreground with -db so we own its PID).
HAPROXY_CFG = """\
global
    user        nobody
    group       nogroup
    maxconn     1024
    nbthread    {nbthread}
    pidfile     {pidfile}

defaults
    mode http
    option httplog
    option dontlognull
    option http-server-close
    option forwardfor
    retries                 3
    timeout http-request    30s
    timeout connect         30s
    timeout client          32s
    timeout server          32s
    timeout http-keep-alive 30s

listen listener
    bind 0.0.0.0:{port}
    server metadata {socket}

    http-request del-header X-Neutron-Network-ID
    http-request set-header X-Neutron-Router-ID {router_id}
"""


# -- the backend: the lean server returning one fixed answer ---------------------------------

def run_backend(path: str) -> None:
    from openimds.http.server import RawResponse, bind_unix, install_uvloop, serve

    answer = RawResponse(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
        + str(len(BODY)).encode() + b"\r\n\r\n" + BODY
    )

    async def main() -> None:
        sock = bind_unix(path, mode=0o666, backlog=4096)
        await serve(lambda req: answer, sock)
        await asyncio.Event().wait()

    install_uvloop()
    asyncio.run(main())


# -- plumbing ---------------------------------------------------------------------------------

@dataclass
class Resources:
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    tmp: Path | None = None

    def spawn(self, argv: list[str], log: Path, **kw: object) -> subprocess.Popen[bytes]:
        with log.open("ab") as fh:
            proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
                argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def add_namespaces(self, names: list[str]) -> None:
        for i in range(0, len(names), 250):
            chunk = names[i:i + 250]
            self.namespaces += chunk
            ip_batch([f"netns add {n}" for n in chunk])

    def cleanup(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)
        for i in range(0, len(self.namespaces), 500):
            ip_batch([f"netns del {n}" for n in self.namespaces[i:i + 500]], check=False)
        self.namespaces.clear()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def ip_batch(lines: list[str], check: bool = True) -> None:
    subprocess.run(["ip", "-force", "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                   check=check, capture_output=True)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def resources() -> Iterator[Resources]:
    tmp = Path(tempfile.mkdtemp(prefix=f"{TAG}-"))
    res = Resources(tmp=tmp)
    # haproxy runs as nobody and must reach the backend socket in here.
    os.chmod(tmp, 0o755)  # noqa: S103

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        yield res
    finally:
        res.cleanup()
        signal.signal(signal.SIGTERM, old)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError("no Pss")


def socket_fds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                count += 1
    return count


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        with contextlib.suppress(OSError):
            if check():
                return time.monotonic() - began
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def write_config(tmp: Path, backend: Path, rescan: float = 1.0, workers: int = 1) -> Path:
    cfg = tmp / "openimds.ini"
    cfg.write_text(
        f"[DEFAULT]\nstate_path = {tmp / 'state'}\nmetadata_proxy_socket = {backend}\n"
        f"[proxy]\nrescan_interval = {rescan}\nworkers = {workers}\n"
        # wrk opens up to 1,000 connections from one VM address: above the default cap (32),
        # which would answer the rest 429 and measure refusals, not relaying
        "max_connections_per_source = 4096\n"
    )
    return cfg


def write_spec(specs: Path, name: str, netns: str, host: str, port: int, router_id: str) -> None:
    data = {"netns": netns, "host": host, "port": port, "router_id": router_id,
            "network_id": None}
    tmp = specs / f".{name}.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, specs / f"{name}.json")


def get_in(ns: str, host: str, port: int) -> tuple[int, bytes]:
    with socket_in_netns(ns) as sock:
        sock.settimeout(5)
        sock.connect((host, port))
        sock.sendall(f"GET {PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def start_backend(res: Resources) -> Path:
    assert res.tmp is not None
    path = res.tmp / "agent.sock"
    res.spawn([PY, __file__, "backend", str(path)], res.tmp / "backend.log")
    wait_until(lambda: path.exists(), 10, "backend socket")
    return path


def start_proxy(res: Resources, cfg: Path) -> subprocess.Popen[bytes]:
    assert res.tmp is not None
    proc = res.spawn([PY, "-m", "openimds", "--config", str(cfg), "proxy"],
                     cfg.parent / "proxy.log", cwd=str(REPO))
    pid_file = cfg.parent / "state" / "proxy" / "proxy.pid"
    wait_until(lambda: pid_file.read_text().strip() == str(proc.pid), 10, "proxy pid file")
    return proc


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().split()[1]
    hap = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.split()[2]
    return (f"{os.cpu_count()} vCPU {cpu}, {int(mem) // 1024 // 1024} GiB, kernel "
            f"{platform.release()}, Python {platform.python_version()}, haproxy {hap}")


# -- memory -----------------------------------------------------------------------------------

def bench_memory(n: int) -> dict[str, object]:
    with resources() as res:
        assert res.tmp is not None
        backend = start_backend(res)
        cfg = write_config(res.tmp, backend, rescan=5.0)
        specs = res.tmp / "state" / "proxy" / "listeners"
        specs.mkdir(parents=True)
        names = [f"{TAG}-r{i:05d}" for i in range(n)]
        began = time.monotonic()
        res.add_namespaces(names)
        made_s = time.monotonic() - began

        proxy = start_proxy(res, cfg)
        time.sleep(0.5)
        base_fds = socket_fds(proxy.pid)
        results: dict[int, int] = {0: rss_kib(proxy.pid)}
        converge_s: dict[int, float] = {}
        for target in sorted({min(100, n), n}):
            for i in range(len(list(specs.glob("*.json"))), target):
                write_spec(specs, f"router-{i:05d}", names[i], "0.0.0.0", 9697, f"r{i:05d}")
            os.kill(proxy.pid, signal.SIGHUP)
            converge_s[target] = wait_until(
                lambda t=target: socket_fds(proxy.pid) >= base_fds + t, 60,  # type: ignore[misc]
                f"{target} listeners")
            time.sleep(0.5)
            results[target] = rss_kib(proxy.pid)

        # Each listener serves, in its own namespace.
        sample = names[:: max(1, n // 20)]
        for ns in sample:
            ip("-n", ns, "link", "set", "lo", "up")
            status, body = get_in(ns, "127.0.0.1", 9697)
            assert status == 200 and body == BODY, (ns, status)
        after_traffic = rss_kib(proxy.pid)

        # And close again when the specs go (namespaces must not stay pinned).
        for f in specs.glob("*.json"):
            f.unlink()
        log = res.tmp / "proxy.log"
        began = time.monotonic()
        os.kill(proxy.pid, signal.SIGHUP)
        close_s = wait_until(
            lambda: log.read_text().count("proxy.listener_closed") >= n, 60, "listeners closed")
        for ns in sample:
            left = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tanpH"], text=True,
                                  capture_output=True, check=True).stdout
            assert f"pid={proxy.pid}," not in left, (ns, left)

    m = min(100, n)
    per_extra = (results[n] - results[m]) / max(1, n - m)
    per_all = (results[n] - results[0]) / n
    # up to 100 namespaces there are no extra listeners: judge the cost of all of them
    verdict = per_extra if n > m else per_all
    out = {
        "namespaces": n, "namespaces_created_s": round(made_s, 2),
        "rss_kib": results, "converge_s": {k: round(v, 2) for k, v in converge_s.items()},
        "kib_per_extra_listener_100_to_n": round(per_extra, 2),
        "kib_per_listener_0_to_n": round(per_all, 2),
        "rss_kib_after_sample_traffic": after_traffic, "sampled": len(sample),
        "close_all_s": round(close_s, 2),
    }
    step, extra = ((f" 100={results[m]} KiB,", f" {per_extra:.2f} KiB per extra listener"
                    f" (100->{n}),") if n > m else ("", ""))
    print(f"memory: RSS 0={results[0]} KiB,{step} {n}={results[n]} KiB;{extra}"
          f" {per_all:.2f} KiB per listener (0->{n}); target <= 5 KiB:"
          f" {'PASS' if verdict <= 5 else 'FAIL'}")
    print(f"memory: convergence {out['converge_s']} s; {len(sample)} sampled namespaces "
          f"answered; closing all took {close_s:.2f} s")
    return out


def bench_haproxy_memory(count: int) -> dict[str, object]:
    """PSS of `count` idle haproxy processes with Neutron's config, one per namespace."""
    with resources() as res:
        assert res.tmp is not None
        backend = start_backend(res)
        names = [f"{TAG}-h{i:03d}" for i in range(count)]
        res.add_namespaces(names)
        procs = []
        for i, ns in enumerate(names):
            cfg = res.tmp / f"haproxy-{i}.cfg"
            cfg.write_text(HAPROXY_CFG.format(nbthread=2, pidfile=res.tmp / f"h{i}.pid",
                                              port=9697, socket=backend, router_id=f"r{i}"))
            procs.append(res.spawn(["ip", "netns", "exec", ns, "haproxy", "-db", "-f",
                                    str(cfg)], res.tmp / f"haproxy-{i}.log"))
        time.sleep(1.5)
        pss = [pss_kib(p.pid) for p in procs if p.poll() is None]
        rss = [rss_kib(p.pid) for p in procs if p.poll() is None]
    med_pss = statistics.median(pss)
    print(f"memory: haproxy (Neutron config) x{len(pss)}: median PSS {med_pss:.0f} KiB, "
          f"RSS {statistics.median(rss):.0f} KiB per process (per router)")
    return {"processes": len(pss), "median_pss_kib": med_pss,
            "median_rss_kib": statistics.median(rss)}


# -- throughput -------------------------------------------------------------------------------

@dataclass
class Config:
    name: str
    port: int
    pids: list[int]


def parse_wrk(out: str, close: bool) -> dict[str, float]:
    """rps, requests, errors (non-2xx/3xx and socket errors; with `close`, read errors
    are the server closing as asked, not errors) and p50/p99 in ms from `wrk --latency`."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                     out)
    errors = int(non2xx.group(1)) if non2xx else 0
    if errs:
        errors += int(errs.group(1)) + int(errs.group(3)) + int(errs.group(4))
        if not close:
            errors += int(errs.group(2))

    def pct(p: str) -> float:
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    return {"rps": rps, "requests": total, "errors": errors, "p50_ms": pct("50"),
            "p99_ms": pct("99")}


def run_wrk(vm: str, port: int, conns: int, duration: int, close: bool) -> dict[str, float]:
    argv = ["ip", "netns", "exec", vm, "wrk", "-t", str(min(2, conns)), "-c", str(conns),
            "-d", f"{duration}s", "--timeout", "5s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    out = subprocess.run(argv + [f"http://10.0.0.1:{port}{PATH}"], capture_output=True,
                         text=True, check=True).stdout
    return parse_wrk(out, close)


def tree(pid: int) -> list[int]:
    """pid and its descendants (the proxy's worker processes)."""
    out = [pid]
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += tree(int(child))
    return out


def bench_throughput(rounds: int, duration: int, scenarios: list[tuple[int, bool]],
                     proxy_workers: tuple[int, ...] = ()) -> dict[
        str, object]:
    with resources() as res:
        assert res.tmp is not None
        backend = start_backend(res)
        rns, vm = f"{TAG}-router", f"{TAG}-vm"
        res.add_namespaces([rns, vm])
        for ns in (rns, vm):
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "eth0", "netns", vm, "type", "veth", "peer", "name", "qr0", "netns",
           rns)
        for ns, dev, addr in ((vm, "eth0", "10.0.0.5/24"), (rns, "qr0", "10.0.0.1/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")

        cfg = write_config(res.tmp, backend)
        specs = res.tmp / "state" / "proxy" / "listeners"
        specs.mkdir(parents=True)
        write_spec(specs, f"router-{ROUTER_ID}", rns, "0.0.0.0", 9697, ROUTER_ID)
        proxy = start_proxy(res, cfg)
        configs = [Config("openimds-proxy", 9697, [proxy.pid])]
        for w in proxy_workers:  # [proxy] workers = w: SO_REUSEPORT listeners, same backend
            wdir = res.tmp / f"w{w}"
            wspecs = wdir / "state" / "proxy" / "listeners"
            wspecs.mkdir(parents=True)
            write_spec(wspecs, f"router-{ROUTER_ID}", rns, "0.0.0.0", 9690 + w, ROUTER_ID)
            wproxy = start_proxy(res, write_config(wdir, backend, workers=w))
            wait_until(lambda wproxy=wproxy, w=w: len(tree(wproxy.pid)) > w, 10,  # type: ignore[misc]
                       f"{w} proxy workers")
            configs.append(Config(f"openimds-proxy-w{w}", 9690 + w, [wproxy.pid]))
        for nbthread, port in ((2, 9698), (1, 9699)):
            hcfg = res.tmp / f"haproxy-t{nbthread}.cfg"
            hcfg.write_text(HAPROXY_CFG.format(
                nbthread=nbthread, pidfile=res.tmp / f"haproxy-t{nbthread}.pid", port=port,
                socket=backend, router_id=ROUTER_ID))
            subprocess.run(["haproxy", "-c", "-q", "-f", str(hcfg)], check=True)
            hap = res.spawn(["ip", "netns", "exec", rns, "haproxy", "-db", "-f", str(hcfg)],
                            res.tmp / f"haproxy-t{nbthread}.log")
            configs.append(Config(f"haproxy-neutron-t{nbthread}", port, [hap.pid]))
        for c in configs:
            wait_until(lambda c=c: get_in(vm, "10.0.0.1", c.port)[0] == 200, 10,  # type: ignore[misc]
                       c.name)
            status, body = get_in(vm, "10.0.0.1", c.port)
            assert status == 200 and body == BODY, (c.name, status, body[:200])
        backend_pid = res.procs[0].pid

        rows: list[dict[str, object]] = []
        for rnd in range(1, rounds + 1):
            for conns, close in scenarios:
                for c in configs:
                    run_wrk(vm, c.port, conns, 1, close)  # warm-up
                    pids = [q for p in c.pids for q in tree(p)]
                    before = [cpu_s(p) for p in pids] + [cpu_s(backend_pid)]
                    r = run_wrk(vm, c.port, conns, duration, close)
                    after = [cpu_s(p) for p in pids] + [cpu_s(backend_pid)]
                    n = max(1, int(r["requests"]))
                    row = {"round": rnd, "config": c.name, "conns": conns, "close": close, **r,
                           "proxy_cpu_us": (sum(after[:-1]) - sum(before[:-1])) / n * 1e6,
                           "backend_cpu_us": (after[-1] - before[-1]) / n * 1e6}
                    rows.append(row)
                    print(f"round {rnd} c={conns}{' close' if close else ''} {c.name:22s} "
                          f"{r['rps']:9.0f} rps p50 {r['p50_ms']:.2f} ms p99 "
                          f"{r['p99_ms']:.2f} ms errs {r['errors']} proxy "
                          f"{row['proxy_cpu_us']:.1f} us/req backend "
                          f"{row['backend_cpu_us']:.1f} us/req", flush=True)
        proxy_rss = rss_kib(proxy.pid)
    summary = summarize(rows, scenarios)
    return {"rows": rows, "summary": summary, "proxy_rss_kib_after": proxy_rss}


def summarize(rows: list[dict[str, object]], scenarios: list[tuple[int, bool]]) -> list[
        dict[str, object]]:
    out = []
    print("\nsummary (medians over rounds; ratio = median of per-round ratios)")
    for conns, close in scenarios:
        label = f"c={conns}{' close' if close else ''}"
        sel = [r for r in rows if r["conns"] == conns and r["close"] == close]
        by_cfg: dict[str, list[dict[str, object]]] = {}
        for r in sel:
            by_cfg.setdefault(str(r["config"]), []).append(r)
        for name, rs in by_cfg.items():
            med = statistics.median(float(r["rps"]) for r in rs)  # type: ignore[arg-type]
            cpu = statistics.median(float(r["proxy_cpu_us"]) for r in rs)  # type: ignore[arg-type]
            bcpu = statistics.median(float(r["backend_cpu_us"]) for r in rs)  # type: ignore[arg-type]
            p99 = statistics.median(float(r["p99_ms"]) for r in rs)  # type: ignore[arg-type]
            errs = sum(int(r["errors"]) for r in rs)  # type: ignore[call-overload]
            lo = min(float(r["rps"]) for r in rs)  # type: ignore[arg-type]
            hi = max(float(r["rps"]) for r in rs)  # type: ignore[arg-type]
            print(f"  {label:10s} {name:22s} {med:9.0f} rps ({lo:.0f}-{hi:.0f}) p99 {p99:.2f} "
                  f"ms, proxy {cpu:.1f} us/req, backend {bcpu:.1f} us/req, errors {errs}")
            out.append({"scenario": label, "config": name, "rps_median": med, "rps_min": lo,
                        "rps_max": hi, "p99_ms": p99, "proxy_cpu_us": cpu,
                        "backend_cpu_us": bcpu, "errors": errs})
        for mine in [n for n in by_cfg if n.startswith("openimds-proxy")]:
            ours = {int(r["round"]): float(r["rps"]) for r in by_cfg[mine]}  # type: ignore[call-overload,arg-type]
            for name in by_cfg:
                if name.startswith("openimds-proxy") and (
                        mine == "openimds-proxy" or name != "openimds-proxy"):
                    continue  # workers are compared with haproxy and with one process
                theirs = {int(r["round"]): float(r["rps"]) for r in by_cfg[name]}  # type: ignore[call-overload,arg-type]
                ratios = [ours[k] / theirs[k] for k in ours if theirs.get(k)]
                ratio = statistics.median(ratios)
                verdict = "PASS" if ratio >= 1.0 else "below 1.0"
                print(f"  {label:10s} {mine} / {name:22s} = {ratio:.2f}x "
                      f"(rounds {min(ratios):.2f}-{max(ratios):.2f}) {verdict}")
                out.append({"scenario": label, "config": mine, "ratio_vs": name,
                            "ratio_median": ratio, "ratio_min": min(ratios),
                            "ratio_max": max(ratios)})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["all", "memory", "throughput", "backend"])
    parser.add_argument("socket", nargs="?", help="(backend) Unix socket path")
    parser.add_argument("--namespaces", type=int, default=1000)
    parser.add_argument("--haproxies", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--scenarios", default="10,100,100close",
                        help="comma list of CONNS or CONNSclose")
    parser.add_argument("--proxy-workers", default="",
                        help="also a proxy with [proxy] workers = N (comma list, e.g. 2)")
    parser.add_argument("--json", type=Path, help="write all results here")
    args = parser.parse_args()
    if args.what == "backend":
        run_backend(args.socket)
        return 0
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    scenarios = [(int(s.removesuffix("close")), s.endswith("close"))
                 for s in args.scenarios.split(",")]
    results: dict[str, object] = {"machine": machine()}
    print(results["machine"])
    try:
        if args.what in ("all", "memory"):
            results["memory"] = bench_memory(args.namespaces)
            if args.haproxies:
                results["haproxy_memory"] = bench_haproxy_memory(args.haproxies)
        if args.what in ("all", "throughput"):
            results["throughput"] = bench_throughput(
                args.rounds, args.duration, scenarios,
                tuple(int(w) for w in args.proxy_workers.split(",") if w))
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
