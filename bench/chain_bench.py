"""The whole metadata chain, hop by hop, against a bare uvloop + httptools server.

    sudo .venv/bin/python bench/chain_bench.py [--rounds 3] [--duration 5]
                                               [--scenarios 100,100close] [--workers 1]

Topology (as a VM reaches its router): a `vm` namespace (eth0 10.0.0.5/24) joined by a veth
to a `router` namespace (qr0 10.0.0.1/24). wrk runs in `vm` against 10.0.0.1, always
`GET /openstack/latest/meta_data.json`. In the router namespace, three listeners:

- **chain** (:9697): `openimds proxy` -> Unix socket -> `openimds agent` -> `openimds api`,
  all real processes started through the CLI, with a real registry (sqlite) holding the VM's
  router, network, subnet and instance (fixed IP 10.0.0.5). Caches warm; the agent's access
  line on, as shipped.
- **haproxy** (:9698): Neutron 29's rendered haproxy config (`option http-server-close`,
  `option forwardfor`, del/set-header, `nbthread 2`) as hop 1, in front of the same agent
  and API: "proxy vs haproxy, same backend".
- **bare** (:9690): one process, a bare asyncio.Protocol + httptools on uvloop (no limits,
  no timers, no pipelining order) writing the bytes the chain answered, pre-encoded. It is
  both the per-hop CPU reference and the one-process floor.

Every configuration runs in every round, interleaved per scenario, each after a 1 s warm-up.
CPU µs per request is utime+stime of each process (/proc/PID/stat, all threads, all worker
processes of a service) over the requests wrk completed. Each chain run also prints its
pools' connections per worker of the hop behind (`pooled`: agent -> each API worker, proxy
-> each agent worker) before its warm-up and after it: a stack left unused for 30 s or
more starts at 0, its servers' keep-alive timeout having ended them (the warm-up opens
them again), and a shared address shows there how evenly the kernel placed them.
Printed: per-hop CPU and its ratio to bare (target <= 3x, keep-alive), chain / bare rps
(one-process floor; target >= 0.6 with a new connection per request), chain /
haproxy-chain rps (target >= 1.0). Ratios are medians of per-round ratios: the 2-core
machine is shared with wrk (and with everyone else).

With `--proxy-alone` the same rounds also measure **hop 1 alone** against haproxy, as
bench/proxy_bench.py does, but side by side with the chain: `openimds proxy` (1 and 2
workers) and haproxy with Neutron's config (`nbthread 1` and `nbthread 2`), all in front of
one minimal backend (the lean server on a Unix socket answering a fixed meta_data.json).
Printed: proxy w1 / haproxy t1 and proxy w2 / haproxy t2 (like with like: as many threads
of execution each), and proxy w1 / haproxy t2 (one process against haproxy as Neutron
renders it).

With `--workers N` every service runs N worker processes (`metadata_workers`, `[api]
workers`, `[proxy] workers`); `--workers 1,2` runs both in the same rounds and prints the
2-worker / 1-worker throughput ratio, each worker's share of its service's CPU (`split`),
and the ceiling the machine allows: with a = our CPU per request and w = wrk's (both from
the run), one worker is bound by one core and N workers share the cores with wrk, so
T_N = min(N / a, cores / (a + w)) (the busiest hop's a for the first term); on 2 cores
T_2 / T_1 = 2a / (a + w). `--pipeline D` adds the same runs with wrk writing D requests at
once (labelled `-pD`): a generator with a fraction of wrk's w, so the ratio shows more of
the server's own scaling; the server answers one read's requests in one write.

`--burst TRIES` (with `--workers` > 1): before the rounds, TRIES times a fresh pool of
`[proxy] upstream_pool_size` (64) connections opened in one burst at the agent, as the
proxy's pool opens at the start of a load, each connection asking `/openimds-agent/stats`
which worker it reached: once through the shared socket alone (as before the worker
sockets, and as haproxy connects) and once spread over the worker sockets (the proxy's
way). Printed: each try's split, largest share first.

Profiling a hop (the method behind docs/benchmarks.md's per-hop notes; not a flame graph):
`--profile agent` (or proxy, api) runs one keep-alive c=100 measurement while
`py-spy record --format raw` samples that process (100 Hz... 1 kHz, on-CPU samples only; the
`py-spy` wheel from PyPI, `pip install py-spy`), then prints the 25 lines with most own
samples and the hot path's functions by inclusive samples. A C call (a socket write, the
parser) is charged to the Python line that made it. `--profile-native` adds native frames.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.support import base_config, clean_env, free_port, write_config  # noqa: E402

from openimds.host.netns import socket_in_netns  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
# Neutron's rendered haproxy config and the /proc helpers, shared with the proxy bench.
from proxy_bench import (  # noqa: E402
    BODY,
    HAPROXY_CFG,
    ROUTER_ID,
    cpu_s,
    ip,
    parse_wrk,
    rss_kib,
    wait_until,
)

PY = sys.executable
TAG = f"chb-{os.getpid()}"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATH = "/openstack/latest/meta_data.json"
VM_IP = "10.0.0.5"
ROUTER_IP = "10.0.0.1"
PORTS = {"bare": 9690, "chain": 9697, "haproxy": 9698}
# --proxy-alone: hop 1 alone in front of a minimal backend
ALONE_PORTS = {"alone-proxy-w1": 9681, "alone-proxy-w2": 9682, "alone-haproxy-t1": 9683,
               "alone-haproxy-t2": 9684, "alone-base-w1": 9685}



# -- the bare reference server (its own process, in the router namespace) -------------------

def run_bare(port: int, answer_file: str) -> None:
    """asyncio.Protocol + httptools on uvloop: parse, write the pre-encoded answer."""
    import socket

    import httptools
    import uvloop

    answer = Path(answer_file).read_bytes()

    class Bare(asyncio.Protocol):
        __slots__ = ("parser", "transport")

        def connection_made(self, transport: Any) -> None:
            self.transport = transport
            self.parser = httptools.HttpRequestParser(self)

        def data_received(self, data: bytes) -> None:
            self.parser.feed_data(data)

        def on_message_complete(self) -> None:
            if not self.parser.should_keep_alive():
                # as the lean server does (http.server._cork): the answer and the FIN in
                # one segment, so the floor is the best one process does
                sock = self.transport.get_extra_info("socket")
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                self.transport.write(answer)
                self.transport.close()
                return
            self.transport.write(answer)

        def connection_lost(self, exc: Exception | None) -> None:
            self.parser = None  # type: ignore[assignment]

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(Bare, "0.0.0.0", port, backlog=4096, reuse_address=True)
        await asyncio.Event().wait()

    uvloop.run(main())


# -- plumbing --------------------------------------------------------------------------------

def tree_pids(pid: int) -> list[int]:
    """pid and every descendant (worker processes)."""
    out = [pid]
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            out += tree_pids(int(child))
    return out


def worker_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each worker process (the children; the pid itself with none)."""
    kids = tree_pids(pid)[1:] or [pid]
    out = {}
    for q in kids:
        with contextlib.suppress(OSError):
            out[q] = cpu_s(q)
    return out


def worker_wchar(pid: int) -> dict[int, int]:
    """Bytes each worker process wrote (/proc/PID/io wchar): with the access line off, almost
    all of it is answers, so its shares are the workers' shares of the requests."""
    out = {}
    for q in tree_pids(pid)[1:] or [pid]:
        with contextlib.suppress(OSError, StopIteration):
            text = Path(f"/proc/{q}/io").read_text()
            out[q] = int(next(ln for ln in text.splitlines()
                              if ln.startswith("wchar:")).split()[1])
    return out


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += cpu_s(p)
    return total


def get_in(ns: str, port: int) -> tuple[int, bytes]:
    with socket_in_netns(ns) as sock:
        sock.settimeout(5)
        sock.connect((ROUTER_IP, port))
        sock.sendall(f"GET {PATH} HTTP/1.1\r\nHost: 169.254.169.254\r\n"
                     "Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1]), data


def run_wrk(vm: str, port: int, conns: int, duration: float, close: bool,
            headers: list[str] | None = None, delay_ms: float | None = None,
            script_dir: Path | None = None, pipeline: int = 1) -> dict[str, float]:
    """wrk from the VM's namespace to the router's listener; with `headers`, from here
    straight to the API on 127.0.0.1, as the agent (headers = what the agent sends).
    `delay_ms`: each connection waits that long after each answer (wrk's Lua `delay()`),
    to hold a chosen request rate. `pipeline`: each connection writes that many requests at
    once and waits for all their answers (wrk's Lua `request()` returning a batch), so wrk
    spends a fraction of its CPU per request. Also returns wrk's CPU seconds (`wrk_cpu_s`)."""
    argv = ["wrk", "-t", str(min(2, conns)), "-c", str(conns),
            "-d", f"{int(duration)}s", "--timeout", "5s", "--latency"]
    if headers is None:
        argv = ["ip", "netns", "exec", vm, *argv]
    for h in headers or ():
        argv += ["-H", h]
    if close:
        argv += ["-H", "Connection: close"]
    if delay_ms is not None:
        script = (script_dir or Path(tempfile.gettempdir())) / f"{TAG}-delay.lua"
        script.write_text(f"function delay()\n  return {max(0, int(round(delay_ms)))}\nend\n")
        argv += ["-s", str(script)]
    elif pipeline > 1:
        script = (script_dir or Path(tempfile.gettempdir())) / f"{TAG}-pipeline{pipeline}.lua"
        script.write_text(
            "init = function(args)\n  local r = {}\n"
            f"  for i = 1, {pipeline} do r[i] = wrk.format() end\n"
            "  batch = table.concat(r)\nend\n"
            "request = function() return batch end\n")
        argv += ["-s", str(script)]
    host = ROUTER_IP if headers is None else "127.0.0.1"
    with tempfile.TemporaryFile() as out:
        popen = subprocess.Popen(argv + [f"http://{host}:{port}{PATH}"], stdout=out,
                                 stderr=subprocess.DEVNULL)
        # wait4: the exit status and wrk's rusage (all its threads), read as it is reaped
        _, status, usage = os.wait4(popen.pid, 0)
        popen.returncode = os.waitstatus_to_exitcode(status)
        if popen.returncode != 0:
            raise subprocess.CalledProcessError(popen.returncode, argv)
        out.seek(0)
        r = parse_wrk(out.read().decode(), close)
    r["wrk_cpu_s"] = usage.ru_utime + usage.ru_stime
    return r


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) core-seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system irq softirq steal
    return busy / CLK_TCK, idle / CLK_TCK


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix=f"{TAG}-")))
    procs: list[Proc] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        with (self.tmp / f"{name}.log").open("ab") as fh:
            popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=clean_env(env), cwd=str(REPO))
        proc = Proc(name, popen)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.popen.pid, signal.SIGTERM)
            try:
                proc.popen.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(proc.popen.pid, signal.SIGKILL)
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def cleanup(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- set-up ------------------------------------------------------------------------
    def topology(self) -> tuple[str, str]:
        rns, vm = f"{TAG}-router", f"{TAG}-vm"
        for ns in (rns, vm):
            ip("netns", "add", ns)
            self.namespaces.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "eth0", "netns", vm, "type", "veth", "peer", "name", "qr0",
           "netns", rns)
        for ns, dev, addr in ((vm, "eth0", f"{VM_IP}/24"), (rns, "qr0", f"{ROUTER_IP}/24")):
            ip("-n", ns, "addr", "add", addr, "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
        return rns, vm

    def config(self, workers: int, tag: str = "") -> tuple[Path, dict[str, Any]]:
        state = self.tmp / f"state-w{workers}{tag}"
        state.mkdir()
        cfg = base_config(state, DEFAULT={
            "metadata_proxy_socket": str(self.tmp / f"agent-w{workers}{tag}.sock"),
            "metadata_proxy_socket_mode": "all",  # haproxy runs as nobody
        }, proxy={"spawn_from_agents": "false",
                  "max_connections_per_source": 4096},  # wrk: 100 connections, one VM
            metrics={"enabled": "false"})  # two stacks in one run: no metrics ports
        return write_config(self.tmp / f"openimds-w{workers}{tag}.ini", cfg), cfg

    def cli(self, name: str, config: Path, *args: str,
            env: dict[str, str] | None = None) -> Proc:
        return self.spawn(name, [PY, "-m", "openimds", "--config", str(config), *args], env)


def populate(url: str, token: str) -> tuple[str, dict[str, Any]]:
    from openimds.registry.client import RegistryClient

    with RegistryClient(url, token) as admin:
        router = admin.create_router("bench")
        net = admin.create_network("bench")
        sub = admin.create_subnet("bench", net["id"], "10.0.0.0/24")
        admin.add_interface(router["id"], sub["id"])
        inst = admin.create_instance("vm-bench", net["id"], fixed_ip=VM_IP)
    return str(router["id"]), inst


@dataclass
class Stack:
    """One chain (registry, API, agent, proxy, haproxy) with `workers` per service."""

    workers: int
    services: dict[str, Proc]
    ports: dict[str, int]
    api_headers: list[str]  # what the agent sends: wrk straight at the API (--api-only)
    api_port: int
    tag: str = ""
    api_worker_ports: list[int] = field(default_factory=list)  # "ports": the API workers' own
    api_socket: str = ""  # "sock", "sockbase": the API's Unix socket


def start_stack(b: Bench, rns: str, workers: int, port_base: int, tag: str = "") -> Stack:
    """`tag` "sock": the agent reaches its API over a Unix socket (`--api-socket`); "base":
    every service runs the code of `--baseline DIR` (its `src` first on PYTHONPATH);
    "sockbase" both; "ports": the API's workers each also listen on a port of their own,
    which the agent spreads its pool over (`--api-ports`: [api] worker_port_base,
    nova_metadata_worker_ports)."""
    config, cfg = b.config(workers, tag)
    reg = cfg["registry"]
    url = f"http://{reg['bind_host']}:{reg['bind_port']}"
    wenv = {"OPENIMDS_METADATA_WORKERS": str(workers), "OPENIMDS_API_WORKERS": str(workers),
            "OPENIMDS_PROXY_WORKERS": str(workers)} if workers > 1 else {}
    for item in b.args.option:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option {item!r}: expected SECTION_KEY=VALUE")
        wenv["OPENIMDS_" + name.upper()] = value
    api_sock, worker_ports = "", []
    if tag in ("sock", "sockbase"):
        api_sock = str(b.tmp / f"api-w{workers}{tag}.sock")
        wenv.update(OPENIMDS_API_UNIX_SOCKET=api_sock, OPENIMDS_NOVA_METADATA_SOCKET=api_sock)
    if tag in ("base", "sockbase"):
        wenv["PYTHONPATH"] = str(b.args.baseline.resolve() / "src")
    if tag == "ports":
        first = free_ports(workers)
        worker_ports = list(range(first, first + workers))
        wenv.update(OPENIMDS_API_WORKER_PORT_BASE=str(first),
                    OPENIMDS_NOVA_METADATA_WORKER_PORTS=f"{first}-{worker_ports[-1]}")
    sfx = f"-w{workers}{tag}"
    registry = b.cli("registry" + sfx, config, "registry", "serve")
    wait_until(lambda: urlopen_ok(url + "/v1/health"), 30, "registry")
    router_id, inst = populate(url, reg["admin_token"])
    api = b.cli("api" + sfx, config, "api", env=wenv)
    api_port = int(cfg["DEFAULT"]["nova_metadata_port"])
    wait_until(lambda: tcp_open("127.0.0.1", api_port), 30, "api")
    agent = b.cli("agent" + sfx, config, "agent", env=wenv)
    sock = cfg["DEFAULT"]["metadata_proxy_socket"]
    wait_until(lambda: Path(sock).exists(), 30, "agent socket")
    specs = Path(cfg["DEFAULT"]["state_path"]) / "proxy" / "listeners"
    specs.mkdir(parents=True, exist_ok=True)
    chain_port = port_base + 7
    (specs / f"router-{router_id}.json").write_text(json.dumps({
        "netns": rns, "host": "0.0.0.0", "port": chain_port, "router_id": router_id,
        "network_id": None}))
    proxy = b.cli("proxy" + sfx, config, "proxy", env=wenv)
    hap_port = port_base + 8
    hcfg = b.tmp / f"haproxy{sfx}.cfg"
    hcfg.write_text(HAPROXY_CFG.format(nbthread=2, pidfile=b.tmp / f"haproxy{sfx}.pid",
                                       port=hap_port, socket=sock, router_id=router_id))
    haproxy = b.spawn("haproxy" + sfx, ["ip", "netns", "exec", rns, "haproxy", "-db", "-f",
                                        str(hcfg)])
    from openimds.core.signing import sign_instance_id

    secret = cfg["DEFAULT"]["metadata_proxy_shared_secret"].encode()
    headers = [f"X-Forwarded-For: {VM_IP}", f"X-Instance-ID: {inst['id']}",
               f"X-Tenant-ID: {inst['project_id']}",
               f"X-Instance-ID-Signature: {sign_instance_id(secret, inst['id'])}"]
    return Stack(workers, {"registry": registry, "api": api, "agent": agent, "proxy": proxy,
                           "haproxy": haproxy},
                 {"chain": chain_port, "haproxy": hap_port}, headers, api_port, tag,
                 worker_ports, api_sock)


def free_ports(n: int) -> int:
    """The first of n consecutive ports free on this namespace's loopback."""
    import socket

    for _ in range(100):
        first = free_port()
        with contextlib.ExitStack() as held:
            try:
                for port in range(first + 1, first + n):
                    s = held.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return first
    raise SystemExit(f"no {n} consecutive free ports")


def start_alone(b: Bench, rns: str, vm: str, baseline: Path | None = None,
                ) -> dict[str, tuple[int, dict[str, int]]]:
    """Hop 1 alone: our proxy (1 and 2 workers) and haproxy (nbthread 1 and 2) in front of
    the same minimal backend; returns name -> (port, pids to account, backend included).
    `baseline`: a checkout of other code (e.g. `git worktree add --detach DIR COMMIT`), whose
    proxy runs as `alone-base-w1`: before and after a change in the same rounds."""
    sock = b.tmp / "alone-backend.sock"
    backend = b.spawn("alone-backend", [PY, str(REPO / "bench" / "proxy_bench.py"), "backend",
                                        str(sock)])
    wait_until(lambda: sock.exists(), 30, "alone backend socket")
    os.chmod(sock, 0o666)  # noqa: S103 - haproxy runs as nobody
    out: dict[str, tuple[int, dict[str, int]]] = {}
    runs: list[tuple[str, int, dict[str, str] | None]] = [
        ("alone-proxy-w1", 1, None), ("alone-proxy-w2", 2, None)]
    if baseline is not None:
        runs.append(("alone-base-w1", 1, {"PYTHONPATH": str(baseline / "src")}))
    for name, w, env in runs:
        state = b.tmp / name
        specs = state / "proxy" / "listeners"
        specs.mkdir(parents=True)
        (specs / f"router-{ROUTER_ID}.json").write_text(json.dumps({
            "netns": rns, "host": "0.0.0.0", "port": ALONE_PORTS[name],
            "router_id": ROUTER_ID, "network_id": None}))
        cfg = b.tmp / f"{name}.ini"
        cfg.write_text(f"[DEFAULT]\nstate_path = {state}\nmetadata_proxy_socket = {sock}\n"
                       f"[proxy]\nworkers = {w}\nspawn_from_agents = false\n"
                       "max_connections_per_source = 4096\n"  # wrk: 100 conns, one VM
                       "[metrics]\nenabled = false\n")
        proc = b.spawn(name, [PY, "-m", "openimds", "--config", str(cfg), "proxy"], env)
        out[name] = (ALONE_PORTS[name], {"proxy": proc.popen.pid,
                                         "backend": backend.popen.pid})
    for t in (1, 2):
        name = f"alone-haproxy-t{t}"
        hcfg = b.tmp / f"{name}.cfg"
        hcfg.write_text(HAPROXY_CFG.format(nbthread=t, pidfile=b.tmp / f"{name}.pid",
                                           port=ALONE_PORTS[name], socket=sock,
                                           router_id=ROUTER_ID))
        proc = b.spawn(name, ["ip", "netns", "exec", rns, "haproxy", "-db", "-f", str(hcfg)])
        out[name] = (ALONE_PORTS[name], {"proxy": proc.popen.pid,
                                         "backend": backend.popen.pid})
    for name, (port, _) in out.items():
        wait_until(partial(answers_ok, vm, port), 30, f"{name} answering")
        status, data = get_in(vm, port)
        assert status == 200 and data.partition(b"\r\n\r\n")[2] == BODY, (name, data[:300])
    return out


def answers_ok(vm: str, port: int) -> bool:
    return bool(get_in(vm, port)[0] == 200)


def urlopen_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=1) as resp:
        return bool(resp.status == 200)


def tcp_open(host: str, port: int) -> bool:
    import socket

    with socket.create_connection((host, port), timeout=1):
        return True


def check_answers(vm: str, ports: dict[str, int]) -> bytes:
    """Every listener answers 200 with this VM's meta_data.json; returns the chain's bytes."""
    answer = b""
    for name, port in ports.items():
        wait_until(partial(answers_ok, vm, port), 30, f"{name} answering")
        status, data = get_in(vm, port)
        body = json.loads(data.partition(b"\r\n\r\n")[2])
        assert status == 200 and body["name"] == "vm-bench", (name, data[:300])
        answer = answer or data
    return answer


def keep_alive_bytes(answer: bytes) -> bytes:
    """The chain's answer as a keep-alive response (drop `Connection: close`)."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def measure(b: Bench, vm: str, port: int, pids: dict[str, int], conns: int, close: bool,
            duration: float, headers: list[str] | None = None,
            rate: float | None = None, pipeline: int = 1,
            started: Callable[[], object] | None = None) -> dict[str, Any]:
    """One wrk run with CPU accounting: µs per request of each of our processes, and the
    machine's share (cores busy, idle fraction, wrk's cores, everyone else's cores), so a
    reader can tell what limited the run. `rate`: hold about that many requests/s (the
    1 s warm-up calibrates wrk's per-connection delay). Also each worker's share of its
    service's CPU (`split`: does the kernel spread the load?) and wrk's µs per request.
    `started`: called as the measured run begins (a profiler's start)."""
    delay = None
    if rate:
        delay = max(0.0, conns / rate * 1000.0)
        warm = run_wrk(vm, port, conns, 1, close, headers, delay, b.tmp)
        if warm["rps"] > 0:  # latency adds to the delay: correct once
            delay = max(0.0, delay - (conns / warm["rps"] * 1000.0 - delay))
    else:
        run_wrk(vm, port, conns, 1, close, headers, pipeline=pipeline)  # warm-up
    if started is not None:
        started()
    before = {k: tree_cpu_s(p) for k, p in pids.items()}
    workers0 = {k: worker_cpu_s(p) for k, p in pids.items()}
    wrote0 = {k: worker_wchar(p) for k, p in pids.items()}
    busy0, idle0 = machine_cpu()
    r: dict[str, Any] = dict(run_wrk(vm, port, conns, duration, close, headers, delay, b.tmp,
                                     pipeline))
    busy1, idle1 = machine_cpu()
    after = {k: tree_cpu_s(p) for k, p in pids.items()}
    workers1 = {k: worker_cpu_s(p) for k, p in pids.items()}
    wrote1 = {k: worker_wchar(p) for k, p in pids.items()}
    n = max(1, int(r["requests"]))
    r["cpu_us"] = {k: (after[k] - before[k]) / n * 1e6 for k in pids}
    r["wrk_us"] = r["wrk_cpu_s"] / n * 1e6
    r["split"], r["out_split"] = {}, {}
    for k in pids:
        used = {q: workers1[k][q] - workers0[k].get(q, 0.0) for q in workers1[k]}
        total = sum(used.values())
        if len(used) > 1 and total > 0:
            r["split"][k] = sorted((u / total for u in used.values()), reverse=True)
            # the same workers' shares of the bytes written, in the CPU split's order
            wrote = {q: wrote1[k].get(q, 0) - wrote0[k].get(q, 0) for q in used}
            out = sum(wrote.values())
            if out > 0:
                r["out_split"][k] = [wrote[q] / out
                                     for q in sorted(used, key=used.__getitem__, reverse=True)]
    wall = (busy1 - busy0) + (idle1 - idle0)
    ours = sum(after[k] - before[k] for k in pids)
    r["machine"] = {
        "cores_busy": (busy1 - busy0) / duration, "idle": (idle1 - idle0) / wall if wall else 0,
        "cores_ours": ours / duration, "cores_wrk": r["wrk_cpu_s"] / duration,
        "cores_other": max(0.0, (busy1 - busy0) - ours - r["wrk_cpu_s"]) / duration,
    }
    if delay is not None:
        r["delay_ms"] = delay
    return r


def machine_note(r: dict[str, Any]) -> str:
    m = r["machine"]
    return (f"cores busy {m['cores_busy']:.2f} (ours {m['cores_ours']:.2f}, wrk "
            f"{m['cores_wrk']:.2f}, other {m['cores_other']:.2f}), idle {100 * m['idle']:.0f}%")


SYSCALLS = ("epoll_wait", "epoll_pwait", "epoll_pwait2", "read", "recvfrom", "write", "writev",
            "sendto", "sendmsg", "accept4", "close", "getsockname", "getpeername",
            "setsockopt", "ioctl", "fcntl", "epoll_ctl", "getpid", "shutdown")


def py_spy(pid: int, seconds: float, out: Path, native: bool,
           syscalls: bool = False) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    argv = [spy, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "1000",
            "--format", "raw", "--output", str(out), "--nonblocking"]
    if native:  # perf(1) instead: where the C and kernel time goes, by shared object
        argv = ["perf", "record", "-q", "-o", str(out.with_suffix(".perf")), "-p", str(pid),
                "--", "sleep", str(int(seconds))]
    if syscalls:  # perf stat: how many wake-ups, reads and writes the hop makes
        events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
        argv = ["perf", "stat", "-x,", "-o", str(out.with_suffix(".stat")), "-e", events,
                "-p", str(pid), "--", "sleep", str(int(seconds))]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def syscall_report(path: Path, requests: float) -> None:
    """perf stat's counts per request wrk completed (the counting window is the same
    `--duration`, started just before wrk: a ratio, not an exact split)."""
    for line in path.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith("syscalls:sys_enter_"):
            count = float(fields[0]) if fields[0].replace(".", "").isdigit() else 0.0
            name = fields[2].removeprefix("syscalls:sys_enter_")
            print(f"  {name:12s} {count:12,.0f}  {count / max(1.0, requests):6.3f} per request")


def profile_report(path: Path, top: int = 25) -> None:
    """Own and inclusive samples per frame from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():  # py-spy sometimes reads a frame name mid-update
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for fr in set(frames):
            incl[fr] = incl.get(fr, 0) + n
    print(f"{total} samples; own samples per line:")
    for fr, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * n / total:5.1f}%  {fr}")
    print("inclusive, openimds frames:")
    hot = [(fr, n) for fr, n in incl.items() if "openimds" in fr]
    for fr, n in sorted(hot, key=lambda kv: -kv[1])[:top]:
        print(f"  {100 * n / total:5.1f}%  {fr}")


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--bare":
        run_bare(int(sys.argv[2]), sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--scenarios", default="100,100close",
                   help="comma list of CONNS or CONNSclose")
    p.add_argument("--workers", default="1", help="comma list of worker counts, e.g. 1,2")
    p.add_argument("--profile", choices=("proxy", "agent", "api"),
                   help="sample that service with py-spy during one keep-alive run")
    p.add_argument("--profile-native", action="store_true")
    p.add_argument("--profile-syscalls", action="store_true",
                   help="count the hop's epoll waits, reads and writes per request (perf stat)")
    p.add_argument("--profile-close", action="store_true",
                   help="profile with a new connection per request (cloud-init's pattern)")
    p.add_argument("--api-only", action="store_true",
                   help="wrk straight at the API (signed headers, as the agent sends them) "
                        "instead of through the chain: the API's own worker scaling")
    p.add_argument("--pipeline", type=int, default=1, metavar="D",
                   help="with --workers: also run every worker count with wrk pipelining D "
                        "requests per write (the low-cost generator; labelled -pD)")
    p.add_argument("--proxy-alone", action="store_true",
                   help="also hop 1 alone: openimds proxy (1, 2 workers) vs haproxy "
                        "(nbthread 1, 2) in front of one minimal backend, same rounds")
    p.add_argument("--baseline", type=Path, metavar="DIR",
                   help="also a chain (or with --api-only an API) running the code in DIR "
                        "(DIR/src, e.g. git archive COMMIT src | tar -x -C DIR): chainbase-wN,"
                        " and with --proxy-alone its proxy alone (alone-base-w1): before and "
                        "after a change in the same rounds")
    p.add_argument("--option", action="append", default=[], metavar="SECTION_KEY=VALUE",
                   help="an option for every chain service, as its OPENIMDS_ variable "
                        "without the prefix (e.g. PROXY_UPSTREAM_PIPELINE_DEPTH=1); repeatable")
    p.add_argument("--api-socket", action="store_true",
                   help="also a chain whose agent reaches its API over a Unix socket "
                        "([api] unix_socket, nova_metadata_socket), same rounds: chainsock-wN")
    p.add_argument("--no-matched", dest="matched", action="store_false",
                   help="skip the second reference: bare held at the chain's request rate")
    p.add_argument("--api-ports", action="store_true",
                   help="also a chain whose API workers each listen on a port of their own "
                        "([api] worker_port_base) that the agent spreads its pool over "
                        "(nova_metadata_worker_ports), same rounds: chainports-wN")
    p.add_argument("--burst", type=int, default=0, metavar="TRIES",
                   help="with --workers N > 1: also split TRIES bursts of 64 pooled "
                        "connections over the agent's workers, shared socket vs worker "
                        "sockets, and over the API's (shared port or socket vs the "
                        "workers' own, counted in /proc)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) == 0:  # CLONE_NEWNET: registry and API on a private loopback
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    scenarios = [(int(s.removesuffix("close")), s.endswith("close"))
                 for s in a.scenarios.split(",")]
    worker_counts = [int(w) for w in a.workers.split(",")]
    b = Bench(a)
    os.chmod(b.tmp, 0o755)  # noqa: S103 - haproxy (nobody) reaches the agent socket in here
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: dict[str, Any] = {"machine": machine(), "load_before": loadavg(), "rows": []}
    print(results["machine"], "| load", results["load_before"], flush=True)
    try:
        rns, vm = b.topology()
        stacks = [start_stack(b, rns, w, 9700 + 10 * i)
                  for i, w in enumerate(worker_counts)]
        extra = ((["sock"] if a.api_socket else []) + (["ports"] if a.api_ports else [])
                 + (["base"] if a.baseline else [])
                 + (["sockbase"] if a.baseline and a.api_socket else []))
        for n, tag in enumerate(extra, 1):
            stacks += [start_stack(b, rns, w, 9700 + 10 * (n * len(worker_counts) + i), tag)
                       for i, w in enumerate(worker_counts)]
        answer = b""
        for st in stacks:
            answer = check_answers(vm, st.ports) or answer
        bare_file = b.tmp / "answer.bin"
        bare_file.write_bytes(keep_alive_bytes(answer))
        bare = b.spawn("bare", ["ip", "netns", "exec", rns, PY, __file__, "--bare",
                                str(PORTS["bare"]), str(bare_file)])
        check_answers(vm, {"bare": PORTS["bare"]})
        for st in stacks:
            if a.burst and st.workers > 1:
                for spread in (False, True) if st.tag in ("sock", "ports") else (False,):
                    splits = [api_burst_split(st, 64, spread) for _ in range(a.burst)]
                    how = "workers' own" if spread else "shared"
                    results[f"api_burst_w{st.workers}{st.tag}_{'spread' if spread else 'shared'}"
                            ] = splits
                    print(f"burst 64 api-w{st.workers}{st.tag} {how} "
                          f"{'socket' if 'sock' in st.tag else 'port'}: "
                          + ", ".join("/".join(map(str, x)) for x in splits), flush=True)
            if a.burst and st.workers > 1 and st.tag in ("", "base"):
                sock = str(b.tmp / f"agent-w{st.workers}{st.tag}.sock")  # as Bench.config
                for spread in (False, True) if not st.tag else (False,):
                    splits = [burst_split(sock, 64, spread) for _ in range(a.burst)]
                    results[f"burst_w{st.workers}{st.tag}_{'spread' if spread else 'shared'}"] \
                        = splits
                    print(f"burst 64 agent-w{st.workers}{st.tag} "
                          f"{'worker sockets' if spread else 'shared socket'}: "
                          + ", ".join("/".join(map(str, x)) for x in splits), flush=True)
        if a.profile:
            st = stacks[0]
            pid = st.services[a.profile].popen.pid
            out = b.tmp / f"{a.profile}.raw"
            close = a.profile_close
            run_wrk(vm, st.ports["chain"], 100, 1, close)
            spies = []
            r = measure(b, vm, st.ports["chain"], {a.profile: pid}, 100, close, a.duration,
                        started=lambda: spies.append(py_spy(
                            pid, a.duration, out, a.profile_native, a.profile_syscalls)))
            spies[0].wait(60)
            print(f"profiled {a.profile}: {r['rps']:.0f} rps, {r['cpu_us'][a.profile]:.1f} "
                  "us/req")
            if a.profile_syscalls:
                syscall_report(out.with_suffix(".stat"), r["requests"])
            elif a.profile_native:
                subprocess.run(["perf", "report", "-q", "-i", str(out.with_suffix(".perf")),
                                "--sort", "dso,sym", "--stdio"], check=False,
                               stdout=sys.stdout, stderr=subprocess.DEVNULL)
            else:
                profile_report(out)
            return 0
        configs: list[tuple[str, int, dict[str, int], list[str] | None]] = [
            ("bare", PORTS["bare"], {"bare": bare.popen.pid}, None)]
        stack_of: dict[str, Stack] = {}  # a configuration's stack: its pools counted per run
        last_used: dict[int, float] = {}  # id(stack) -> when its last run ended (monotonic)
        kinds: tuple[str, ...] = ("api",) if a.api_only else ("chain",)
        piped = f"{kinds[0]}-p{a.pipeline}"  # the same, wrk pipelining (low-cost generator)
        for st in stacks:
            pids = {k: v.popen.pid for k, v in st.services.items() if k != "haproxy"}
            if a.api_only:
                if st.tag == "sock":
                    continue
                configs.append((f"api{st.tag}-w{st.workers}", st.api_port, {"api": pids["api"]},
                                st.api_headers))
                if a.pipeline > 1 and not st.tag:
                    configs.append((f"{piped}-w{st.workers}", st.api_port, {"api": pids["api"]},
                                    st.api_headers))
                continue
            if st.tag:  # the same chain but its agent -> API hop or its code: no haproxy
                configs.append((f"chain{st.tag}-w{st.workers}", st.ports["chain"], pids, None))
                stack_of[configs[-1][0]] = st
                continue
            configs.append((f"chain-w{st.workers}", st.ports["chain"], pids, None))
            stack_of[configs[-1][0]] = st
            if a.pipeline > 1:
                configs.append((f"{piped}-w{st.workers}", st.ports["chain"], pids, None))
                stack_of[configs[-1][0]] = st
            hp = {k: v for k, v in pids.items() if k != "proxy"}
            hp["haproxy"] = st.services["haproxy"].popen.pid
            configs.append((f"haproxy-w{st.workers}", st.ports["haproxy"], hp, None))
            stack_of[configs[-1][0]] = st
        if a.proxy_alone:
            for name, (port, pids) in start_alone(b, rns, vm, a.baseline).items():
                configs.append((name, port, pids, None))
        # The pipelined runs after the plain ones: the runs a ratio compares stay adjacent.
        configs.sort(key=lambda c: c[0].startswith(piped + "-"))
        for rnd in range(1, a.rounds + 1):
            for conns, close in scenarios:
                runs = list(configs)
                if rnd % 2 == 0:  # the other chains first every other round (order bias)
                    others = [c for c in runs if c[0].startswith(
                        ("chainsock-", "chainbase-", "apibase-", "chainports-",
                         "chainsockbase-"))]
                    runs = runs[:1] + others + [c for c in runs[1:] if c not in others]
                while runs:
                    name, port, pids, headers = runs.pop(0)
                    rate = None
                    if name == "bare@rate":  # at the rate the 1-worker chain just ran
                        rate = results["rows"][-1]["rps"]
                    depth = a.pipeline if name.startswith(piped + "-") else 1
                    st_run = stack_of.get(name)
                    held0 = pooled(b, st_run) if st_run else None
                    gap = (time.monotonic() - last_used[id(st_run)]
                           if st_run and id(st_run) in last_used else None)
                    r = measure(b, vm, port, pids, conns, close, a.duration, headers, rate,
                                depth)
                    r.update(round=rnd, config=name, conns=conns, close=close)
                    note = ""
                    if st_run and held0 is not None:
                        last_used[id(st_run)] = time.monotonic()
                        r["pooled"] = {"before": held0, "after": pooled(b, st_run),
                                       "unused_s": gap}
                        note = pooled_note(held0, r["pooled"]["after"], gap)
                    results["rows"].append(r)
                    cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_us"].items())
                    split = "".join(
                        f" | {k} split " + "/".join(f"{x:.2f}" for x in v) + (
                            " (out " + "/".join(f"{x:.2f}" for x in r["out_split"][k]) + ")"
                            if k in r["out_split"] else "")
                        for k, v in r["split"].items())
                    print(f"round {rnd} c={conns}{' close' if close else '':6s} {name:12s} "
                          f"{r['rps']:8.0f} rps p99 {r['p99_ms']:7.2f} ms errs "
                          f"{r['errors']} | CPU us/req: {cpu}, wrk {r['wrk_us']:.1f} | "
                          f"{machine_note(r)}{split}{note}", flush=True)
                    if a.matched and name == f"{kinds[0]}-w{worker_counts[0]}":
                        runs.insert(0, ("bare@rate", PORTS["bare"], {"bare": bare.popen.pid},
                                        None))
        for st in stacks:
            if st.workers > 1 and not st.tag:  # requests each agent worker answered, all runs
                sock = str(b.tmp / f"agent-w{st.workers}.sock")
                counts = agent_requests(sock)
                results[f"agent_requests_w{st.workers}"] = counts
                print(f"agent-w{st.workers} requests per worker over the run: "
                      + "/".join(f"{c / max(1, sum(counts)):.3f}" for c in counts)
                      + f" of {sum(counts)}", flush=True)
            results[f"rss_kib_w{st.workers}{st.tag}"] = {
                k: sum(rss_kib(q) for q in tree_pids(v.popen.pid))
                for k, v in st.services.items() if k not in ("haproxy",)}
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        return 130
    finally:
        results["load_after"] = loadavg()
        b.cleanup()
    summary = summarize(results["rows"], scenarios, worker_counts,
                        "api" if a.api_only else "chain", a.pipeline)
    results["summary"] = summary
    print(f"load average before {results['load_before']}, after {results['load_after']}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


QUIET_CORES = 0.15  # a round counts as quiet when other processes took at most this


def agent_requests(sock: str) -> list[int]:
    """Each agent worker's `requests` count, asked on its own socket."""
    from openimds.config import worker_sockets
    from openimds.http.client import UpstreamPool

    async def run() -> list[int]:
        counts = []
        for path in worker_sockets(sock):
            pool = UpstreamPool(unix_path=path, size=1)
            try:
                ans = await pool.request("GET", "/openimds-agent/stats")
                counts.append(int(json.loads(ans.body)["requests"]))
            finally:
                await pool.close()
        return sorted(counts, reverse=True)

    return asyncio.run(run())


def burst_split(sock: str, n: int, spread: bool) -> list[int]:
    """n connections opened at once by a fresh pool at the agent's socket (`spread`: over
    its worker sockets, as the proxy does): how many each worker took, most first."""
    from openimds.config import worker_sockets
    from openimds.http.client import UpstreamPool

    async def run() -> list[int]:
        pool = UpstreamPool(unix_path=sock, size=n,
                            worker_paths=(lambda: worker_sockets(sock)) if spread else None)

        async def one() -> int:
            ans = await pool.request("GET", "/openimds-agent/stats")
            return int(json.loads(ans.body)["pid"])
        try:
            pids = await asyncio.gather(*(one() for _ in range(n)))
        finally:
            await pool.close()
        return sorted(Counter(pids).values(), reverse=True)

    return asyncio.run(run())


def api_connections(pids: list[int], ports: set[int], paths: set[str]) -> list[int]:
    """How many accepted connections on these TCP ports or Unix socket paths each process
    holds (/proc/net/tcp ESTABLISHED by local port; /proc/net/unix entries that carry the
    listener's path but are not listening)."""
    inodes: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if f[3] == "01" and int(f[1].rsplit(":", 1)[1], 16) in ports:
            inodes.add(f[9])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) >= 8 and f[7] in paths and not int(f[3], 16) & 0x10000:
            inodes.add(f[6])
    counts = []
    for pid in pids:
        n = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                n += link.startswith("socket:[") and link[8:-1] in inodes
        counts.append(n)
    return counts


def pooled(b: Bench, st: Stack) -> dict[str, list[int]]:
    """The connections the hops' pools hold now, per worker of the hop behind, in worker
    order: the agent's on each API worker (`api`), the proxy's (and haproxy's) on each
    agent worker (`agent`), counted in /proc as `api_connections` does."""
    from openimds.config import worker_sockets

    api = tree_pids(st.services["api"].popen.pid)
    agent = tree_pids(st.services["agent"].popen.pid)
    sock = str(b.tmp / f"agent-w{st.workers}{st.tag}.sock")  # as Bench.config
    api_paths = {st.api_socket, *worker_sockets(st.api_socket)} if st.api_socket else set()
    return {
        "api": api_connections(api[1:] or api, {st.api_port, *st.api_worker_ports},
                               api_paths),
        "agent": api_connections(agent[1:] or agent, set(), {sock, *worker_sockets(sock)}),
    }


def pooled_note(before: dict[str, list[int]], after: dict[str, list[int]],
                gap_s: float | None) -> str:
    """`pooled` before the warm-up and after the run, and how long the stack had been
    left alone before (its servers close a pooled connection idle for 30 s)."""
    def fmt(counts: list[int]) -> str:
        return "/".join(map(str, counts))
    idle = "" if gap_s is None else f" after {gap_s:.0f} s unused"
    return (f" | pooled{idle}: agent->api {fmt(before['api'])} -> {fmt(after['api'])}, "
            f"->agent {fmt(before['agent'])} -> {fmt(after['agent'])}")


def api_burst_split(st: Stack, n: int, spread: bool) -> list[int]:
    """n connections opened at once by a fresh pool at the stack's API, as the agent's pool
    opens them (`spread`: over the API workers' own ports or sockets; else the shared port,
    or the shared socket for a "sock" stack): how many each API worker accepted, most first
    (its connections counted in /proc while the pool holds them, less those it held
    before: the chain's agent keeps its own)."""
    from openimds.config import worker_sockets
    from openimds.http.client import UpstreamPool

    workers = tree_pids(st.services["api"].popen.pid)[1:]
    sock = st.api_socket
    ports = {st.api_port, *st.api_worker_ports}
    paths = {sock, *worker_sockets(sock)} if sock else set()
    headers = [(k.encode(), v.strip().encode())
               for k, _, v in (h.partition(":") for h in st.api_headers)]

    async def run() -> list[int]:
        if sock:
            pool = UpstreamPool(unix_path=sock, size=n, worker_paths=(
                lambda: worker_sockets(sock)) if spread else None)
        else:
            pool = UpstreamPool(host="127.0.0.1", port=st.api_port, size=n,
                                worker_ports=st.api_worker_ports if spread else ())
        before = api_connections(workers, ports, paths)
        try:
            answers = await asyncio.gather(*(pool.request("GET", PATH, headers)
                                             for _ in range(n)))
            assert all(ans.status == 200 for ans in answers), answers[0].raw[:200]
            after = api_connections(workers, ports, paths)
        finally:
            await pool.close()
        return sorted((x - y for x, y in zip(after, before, strict=True)), reverse=True)

    return asyncio.run(run())


def ceiling(r: dict[str, Any], workers: int, cores: float) -> float:
    """Requests/s the model allows one run's configuration: each worker process is one
    core at most (the busiest hop bounds), and our processes plus the generator share the
    machine's cores: min(workers / max a_hop, cores / (sum a_hop + w)), a and w in CPU
    seconds per request from the run itself (w: the load generator's)."""
    a = [us / 1e6 for us in r["cpu_us"].values()]
    w = r["wrk_us"] / 1e6
    return min(workers / max(a), cores / (sum(a) + w)) if sum(a) + w > 0 else 0.0


def summarize(rows: list[dict[str, Any]], scenarios: list[tuple[int, bool]],
              workers: list[int], kind: str = "chain", pipeline: int = 1) -> list[str]:
    """Print and return the summary lines; `kind` is chain (the full chain, with haproxy as
    the other hop 1) or api (wrk straight at the API); `pipeline` > 1: the same runs with
    wrk pipelining (`<kind>-p<D>`) are summarized next to the plain ones."""
    lines: list[str] = []

    def sel(name: str, conns: int, close: bool) -> dict[int, dict[str, Any]]:
        return {r["round"]: r for r in rows
                if r["config"] == name and r["conns"] == conns and r["close"] == close}

    def ratio(xs: list[float]) -> str:
        return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"

    def say(line: str) -> None:
        lines.append(line)
        print(line)

    print("\nsummary: medians over rounds; ratios are medians of per-round ratios")
    kinds: tuple[str, ...] = ("chain", "haproxy") if kind == "chain" else ("api",)
    scaled = [kind] + ([f"{kind}-p{pipeline}"] if pipeline > 1 else [])
    kinds += tuple(scaled[1:])
    cores = os.cpu_count() or 1
    hops = ("proxy", "agent", "api") if kind == "chain" else ("api",)
    for conns, close in scenarios:
        label = f"c={conns}{' close' if close else ''}"
        bare = sel("bare", conns, close)
        matched = sel("bare@rate", conns, close)
        for name in (["bare", "bare@rate"] + [f"{k}-w{w}" for w in workers for k in kinds]
                     + [f"{k}{t}-w{w}" for t in ("sock", "ports", "base", "sockbase")
                        for w in workers
                        for k in ("chain", "api")] + list(ALONE_PORTS)):
            rs = list(sel(name, conns, close).values())
            if not rs:
                continue
            cpu = ", ".join(f"{k} {statistics.median(r['cpu_us'][k] for r in rs):.1f}"
                            for k in rs[0]["cpu_us"])
            m = {k: statistics.median(r["machine"][k] for r in rs) for k in rs[0]["machine"]}
            say(f"| {label} | {name} | {statistics.median(r['rps'] for r in rs):,.0f} | "
                f"{statistics.median(r['p99_ms'] for r in rs):.2f} | {cpu} | "
                f"{sum(r['errors'] for r in rs)} | {m['cores_busy']:.2f} busy: ours "
                f"{m['cores_ours']:.2f}, wrk {m['cores_wrk']:.2f}, other "
                f"{m['cores_other']:.2f}; idle {100 * m['idle']:.0f}% |")
        for name in [f"{kind}{t}-w{w}" for t in ("", "ports", "sock", "base", "sockbase")
                     for w in workers if w > 1]:
            rounds = sel(name, conns, close)  # each API worker's share of the API's CPU
            if rounds and all("api" in r["split"] for r in rounds.values()):
                say(f"{label} {name}: api CPU split per round " + ", ".join(
                    "/".join(f"{x:.2f}" for x in rounds[k]["split"]["api"])
                    + " (out " + "/".join(f"{x:.2f}" for x in rounds[k].get(
                        "out_split", {}).get("api", [])) + ")"
                    for k in sorted(rounds)))
        for w in workers:
            ours = sel(f"{kind}-w{w}", conns, close)
            for hop in hops:
                for ref, refname in ((bare, "bare"), (matched, "bare at the same rate")):
                    xs = [ours[k]["cpu_us"][hop] / ref[k]["cpu_us"]["bare"]
                          for k in ours if k in ref and ref[k]["cpu_us"]["bare"]]
                    if xs:
                        say(f"{label} w{w}: {hop} CPU/req / {refname} CPU/req = {ratio(xs)}"
                            + ("" if close else "  (target <= 3)"))
            base = sel(f"{kind}base-w{w}", conns, close)  # --baseline
            if base:
                xs = [ours[k]["rps"] / base[k]["rps"] for k in ours if k in base]
                say(f"{label} w{w}: this code / --baseline's, {kind} rps = {ratio(xs)}")
                for hop in hops:
                    xs = [ours[k]["cpu_us"][hop] / base[k]["cpu_us"][hop] for k in ours
                          if k in base and base[k]["cpu_us"][hop]]
                    say(f"{label} w{w}: this code / --baseline's, {hop} CPU/req = {ratio(xs)}")
                if kind == "chain":
                    xs = [base[k]["rps"] / bare[k]["rps"] for k in base if k in bare]
                    say(f"{label} w{w}: --baseline's chain / one-process floor (bare) rps = "
                        f"{ratio(xs)}")
            if kind != "chain":
                continue
            xs = [ours[k]["rps"] / bare[k]["rps"] for k in ours if k in bare]
            say(f"{label} w{w}: chain / one-process floor (bare) rps = {ratio(xs)}"
                + ("  (target >= 0.6)" if close else ""))
            hap = sel(f"haproxy-w{w}", conns, close)
            xs = [ours[k]["rps"] / hap[k]["rps"] for k in ours if k in hap]
            say(f"{label} w{w}: chain with openimds proxy / with haproxy (Neutron config) "
                f"rps = {ratio(xs)}" + ("  (target >= 1.0)" if close else ""))
            sock = sel(f"chainsock-w{w}", conns, close)  # --api-socket
            if sock:
                xs = [sock[k]["rps"] / bare[k]["rps"] for k in sock if k in bare]
                say(f"{label} w{w}: chain, agent -> API over a Unix socket / one-process "
                    f"floor (bare) rps = {ratio(xs)}" + ("  (target >= 0.6)" if close else ""))
                xs = [sock[k]["rps"] / ours[k]["rps"] for k in sock if k in ours]
                say(f"{label} w{w}: chainsock / chain (TCP) rps = {ratio(xs)}")
                for hop in hops:
                    xs = [sock[k]["cpu_us"][hop] / ours[k]["cpu_us"][hop] for k in sock
                          if k in ours and ours[k]["cpu_us"][hop]]
                    say(f"{label} w{w}: chainsock / chain (TCP) {hop} CPU/req = {ratio(xs)}")
        for mine, theirs, why in (
                ("alone-proxy-w1", "alone-haproxy-t1", "one thread each"),
                ("alone-proxy-w2", "alone-haproxy-t2", "two each"),
                ("alone-proxy-w1", "alone-haproxy-t2", "one process vs Neutron's nbthread 2"),
                ("alone-proxy-w1", "alone-base-w1", "this code / --baseline's"),
                ("alone-base-w1", "alone-haproxy-t1", "--baseline's, one thread each")):
            ours, hap = sel(mine, conns, close), sel(theirs, conns, close)
            xs = [ours[k]["rps"] / hap[k]["rps"] for k in ours if k in hap]
            if xs:
                say(f"{label}: hop 1 alone, {mine} / {theirs} rps = {ratio(xs)}  ({why}"
                    + ("; target >= 1.0)" if close and "haproxy" in theirs else ")"))
                xs = [ours[k]["cpu_us"]["proxy"] / hap[k]["cpu_us"]["proxy"] for k in ours
                      if k in hap and hap[k]["cpu_us"]["proxy"]]
                say(f"{label}: hop 1 alone, {mine} / {theirs} hop-1 CPU/req = {ratio(xs)}")
        for kd in scaled if len(workers) > 1 else ():
            gen = f"wrk pipelining {pipeline}" if kd != kind else "plain wrk"
            one = sel(f"{kd}-w{workers[0]}", conns, close)
            for w in workers[1:]:
                many = sel(f"{kd}-w{w}", conns, close)
                xs = [many[k]["rps"] / one[k]["rps"] for k in many if k in one]
                say(f"{label}: {kd} {w} workers / {workers[0]} worker rps = {ratio(xs)}"
                    + ("  (target >= 1.6)" if w == 2 else "") + f"  [{gen}]")
                # On a shared machine: only the rounds where others left both runs alone.
                quiet = [k for k in many if k in one and max(
                    many[k]["machine"]["cores_other"], one[k]["machine"]["cores_other"])
                    <= QUIET_CORES]
                xs = [many[k]["rps"] / one[k]["rps"] for k in quiet]
                cs = [ceiling(many[k], w, cores) / ceiling(one[k], workers[0], cores)
                      for k in quiet if ceiling(one[k], workers[0], cores)]
                say(f"{label}: {kd} quiet rounds (others <= {QUIET_CORES} core in both runs, "
                    f"{len(quiet)} of {len(many)}): rps ratio {ratio(xs)}, predicted "
                    f"ceiling {ratio(cs)}")
                # What this machine allows at best: the model with each run's own a and w.
                xs = [ceiling(many[k], w, cores) / ceiling(one[k], workers[0], cores)
                      for k in many if k in one and ceiling(one[k], workers[0], cores)]
                say(f"{label}: {kd} predicted ceiling on {cores} cores = {ratio(xs)}  "
                    "(min(N/max a, cores/(sum a + w)), a: our CPU/req, w: wrk's)")
                # The same on what the run really had: other processes' cores taken out.
                xs = [ceiling(many[k], w, cores - many[k]["machine"]["cores_other"])
                      / ceiling(one[k], workers[0], cores - one[k]["machine"]["cores_other"])
                      for k in many if k in one
                      and ceiling(one[k], workers[0], cores - one[k]["machine"]["cores_other"])]
                say(f"{label}: {kd} predicted on the cores others left = {ratio(xs)}")
                for n, sel_rows in ((workers[0], one), (w, many)):
                    rs = list(sel_rows.values())
                    if rs:
                        a_us = statistics.median(sum(r["cpu_us"].values()) for r in rs)
                        w_us = statistics.median(r["wrk_us"] for r in rs)
                        split = "; ".join(
                            f"{h} split " + "/".join(
                                f"{statistics.median(r['split'][h][i] for r in rs):.2f}"
                                for i in range(len(rs[0]["split"][h])))
                            for h in rs[0]["split"] if all(h in r["split"] for r in rs))
                        say(f"{label}: {kd} {n} worker(s): a = {a_us:.1f} us/req, w = "
                            f"{w_us:.1f} us/req" + (f"; {split}" if split else ""))
                # What a bigger node would give: requests per core-second our processes
                # used. Equal for 1 and N workers = no loss from splitting the work, so N
                # workers with N free cores serve N times as much.
                xs = [(many[k]["rps"] / many[k]["machine"]["cores_ours"])
                      / (one[k]["rps"] / one[k]["machine"]["cores_ours"])
                      for k in many if k in one and many[k]["machine"]["cores_ours"]
                      and one[k]["machine"]["cores_ours"]]
                say(f"{label}: {kd} requests per core used, {w} workers / {workers[0]} "
                    f"worker = {ratio(xs)}  (1.0: the work splits without loss)")
                for n, sel_rows in ((workers[0], one), (w, many)):
                    rs = list(sel_rows.values())
                    if not rs:
                        continue
                    m = {k: statistics.median(r["machine"][k] for r in rs)
                         for k in rs[0]["machine"]}
                    say(f"{label}: {kd} {n} worker(s): cores used by it {m['cores_ours']:.2f}"
                        f", by wrk {m['cores_wrk']:.2f}, by others {m['cores_other']:.2f}, "
                        f"machine idle {100 * m['idle']:.0f}%")
    return lines


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return (f"{os.cpu_count()} vCPU {cpu}, kernel {platform.release()}, "
            f"Python {platform.python_version()}")


if __name__ == "__main__":
    sys.exit(main())
