#!/usr/bin/env python3
"""Boot storm on the real datapath: N VMs boot at once and each makes cloud-init's requests.

    .venv/bin/python bench/boot_storm.py          # N=1000 VMs, R=100 routers, I=10 isolated
    .venv/bin/python bench/boot_storm.py --small  # N=50, R=5, I=2 (the CI smoke test)
    .venv/bin/python bench/boot_storm.py --json out.json  # also write the figures as JSON
    .venv/bin/python bench/boot_storm.py --rounds 6 --alternate --keep-api \
        --arms ours,ours-warm,floor     # the cold storm against the floor on a noisy machine

What it does, as root, inside a private network namespace of its own (ports and bridges vanish
with it; the named namespaces it makes are deleted at the end, even on failure):

1. Starts the node the way `openimds up` does (node.up.build_supervisor: registry on SQLite,
   API, agent, proxy, L3 agent, DHCP agent with enable_isolated_metadata) in a temp state_path.
2. Creates R tenants, each with network 10.0.0.0/24 behind its own router, and I tenants with
   an isolated 10.0.0.0/24 (no gateway): every CIDR overlaps. N servers spread round-robin,
   each with a key pair, user data and a property; each plugged as a lab VM (namespace, veth
   into the network's bridge, static address; isolated ones also get the 169.254.169.254/32
   route via the DHCP port, as option 121 would give them).
3. The storm: every VM performs cloud-init's boot sequence (`BOOT_SEQUENCE`, 28 requests,
   metadata-api.md §3.1), one TCP connection per request as cloud-init's readurl does, all VMs
   at once. The load generator creates each socket inside the VM's namespace (setns, socket,
   setns back; datapath.md §4) and connects to 169.254.169.254:80, so every request crosses
   the REDIRECT (routed) or the DHCP namespace (isolated) and the proxy.
4. Three arms on the same VMs and request mix, agent and API restarted before each (cold
   caches, as a real storm):
   - ours:    our proxy -> agent -> API;
   - haproxy: Neutron's rendered haproxy config (neutron.md §2.1, one haproxy per router or
              network, `option http-server-close`) as hop 1 in place of our proxy;
   - floor:   one process with a listener in every namespace serving the bytes the "ours" arm
              received, directly (no agent, no API): the single-process floor.
   While another hop 1 runs, the bench holds the proxy's flock so the L3 agent does not
   start a proxy of its own.

Reported per arm: wall time, requests/s, p50/p99/max latency, errors (must be 0), registry
queries made by the agent, RSS and CPU seconds of proxy/haproxy, agent and API; the proxy's RSS
per extra router; and the ratios ours/floor, ours/haproxy, ours-warm/floor and ours/ours-warm,
each a median of per-round ratios. A round where either arm of a ratio had an error gives no
ratio (the bench says which round and how many errors instead).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import fcntl
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

import httpx  # noqa: E402

from openimds.config import Settings, load_settings  # noqa: E402
from openimds.core import names  # noqa: E402
from openimds.host import netns  # noqa: E402
from openimds.host.supervise import (  # noqa: E402
    ChildFailed,
    Supervisor,
    signal_pid,
    stop_pid,
)
from openimds.node.up import build_supervisor, ensure_secrets, stop_stray_proxy  # noqa: E402

METADATA_IP = "169.254.169.254"
OS_VERSION = "2018-08-27"
# cloud-init 22.4/26.x OpenStack datasource at boot (metadata-api.md §3.1): the version list
# twice, the five OpenStack documents, then the EC2 crawl.
BOOT_SEQUENCE: tuple[str, ...] = (
    "/openstack",
    "/openstack",
    f"/openstack/{OS_VERSION}/meta_data.json",
    f"/openstack/{OS_VERSION}/user_data",
    f"/openstack/{OS_VERSION}/vendor_data.json",
    f"/openstack/{OS_VERSION}/vendor_data2.json",
    f"/openstack/{OS_VERSION}/network_data.json",
    "/latest/meta-data/",
    "/latest/meta-data/block-device-mapping/",
    "/latest/meta-data/block-device-mapping/ami",
    "/latest/meta-data/block-device-mapping/root",
    "/latest/meta-data/placement/",
    "/latest/meta-data/placement/availability-zone",
    "/latest/meta-data/public-keys/",
    "/latest/meta-data/public-keys/0/openssh-key",
    "/latest/meta-data/ami-id",
    "/latest/meta-data/ami-launch-index",
    "/latest/meta-data/ami-manifest-path",
    "/latest/meta-data/hostname",
    "/latest/meta-data/instance-action",
    "/latest/meta-data/instance-id",
    "/latest/meta-data/instance-type",
    "/latest/meta-data/local-hostname",
    "/latest/meta-data/local-ipv4",
    "/latest/meta-data/public-hostname",
    "/latest/meta-data/public-ipv4",
    "/latest/meta-data/reservation-id",
    "/latest/meta-data/security-groups",
)
CLONE_NEWNET = 0x40000000
STOP = threading.Event()  # set when the bench is interrupted: worker threads give up


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --- process figures from /proc ---------------------------------------------------------------

def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid`; system includes the softirq work (a veth's
    receive path, NAT) the kernel ran in its context."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0, 0.0
    fields = stat[stat.rfind(b")") + 2:].split()
    tck = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tck, int(fields[12]) / tck


def cpu_seconds(pid: int) -> float:
    return sum(cpu_split(pid))


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# --- the topology -----------------------------------------------------------------------------

@dataclass
class Vm:
    instance_id: str
    name: str
    ip: str
    network_id: str
    router_id: str | None
    dhcp_ip: str | None = None

    @property
    def namespace(self) -> str:
        return names.vm_namespace(self.instance_id)


@dataclass
class Topology:
    routers: list[str] = field(default_factory=list)
    routed_networks: list[str] = field(default_factory=list)
    isolated_networks: list[str] = field(default_factory=list)
    vms: list[Vm] = field(default_factory=list)

    def hop_namespaces(self) -> list[tuple[str, str, str | None, str | None]]:
        """(namespace, listener name, router id, network id) of every hop-1 namespace."""
        out: list[tuple[str, str, str | None, str | None]] = [
            (names.router_namespace(r), names.router_listener_name(r), r, None)
            for r in self.routers]
        out += [(names.dhcp_namespace(n), names.network_listener_name(n), None, n)
                for n in self.isolated_networks]
        return out


class Registry:
    def __init__(self, settings: Settings) -> None:
        self.http = httpx.Client(
            base_url=settings.registry.effective_url, timeout=60, trust_env=False,
            headers={"Authorization": f"Bearer {settings.registry.admin_token}"},
        )

    def call(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.http.request(method, path, json=body)
        if resp.status_code >= 400:
            raise RuntimeError(f"registry {method} {path}: {resp.status_code} {resp.text[:300]}")
        return resp.json() if resp.content else {}


def build_topology(settings: Settings, topo: Topology, n: int, r: int, i: int) -> None:
    """Create the servers and networks, recording each in topo as soon as it exists."""
    reg = Registry(settings)
    networks: list[tuple[str, str, str | None]] = []  # (network id, project, router id)
    user_data = base64.b64encode(b"#cloud-config\nruncmd:\n  - echo booted\n").decode()
    total = r + i
    per_net = -(-n // total)
    if per_net > 200:
        raise SystemExit(f"{per_net} VMs per /24 network is too many: raise R or I")
    for k in range(total):
        project = f"bench-t{k}"
        isolated = k >= r
        net = reg.call("POST", "/v1/networks", {"name": f"bench-net{k}", "project_id": project})
        body: dict[str, Any] = {"name": f"bench-sub{k}", "network_id": net["id"],
                                "cidr": "10.0.0.0/24", "project_id": project}
        if isolated:
            body["gateway_ip"] = None
        (topo.isolated_networks if isolated else topo.routed_networks).append(net["id"])
        sub = reg.call("POST", "/v1/subnets", body)
        router_id = None
        if not isolated:
            router = reg.call("POST", "/v1/routers", {"name": f"bench-r{k}",
                                                      "project_id": project})
            topo.routers.append(router["id"])
            reg.call("POST", f"/v1/routers/{router['id']}/add_interface",
                     {"subnet_id": sub["id"]})
            router_id = router["id"]
        seed = os.urandom(32)
        blob = (len(b"ssh-ed25519").to_bytes(4, "big") + b"ssh-ed25519"
                + (32).to_bytes(4, "big") + seed)
        reg.call("POST", "/v1/keypairs", {
            "name": f"key{k}", "project_id": project,
            "public_key": f"ssh-ed25519 {base64.b64encode(blob).decode()} bench@{k}"})
        networks.append((net["id"], project, router_id))
    for v in range(n):
        if STOP.is_set():
            raise SystemExit("interrupted")
        net_id, project, router_id = networks[v % total]
        inst = reg.call("POST", "/v1/instances", {
            "name": f"vm{v}", "network_id": net_id, "project_id": project,
            "key_name": f"key{v % total}", "user_data": user_data,
            "metadata": {"bench": "boot-storm"},
        })
        ip = inst["ports"][0]["fixed_ips"][0]["ip_address"]
        topo.vms.append(Vm(inst["id"], inst["name"], ip, net_id, router_id))
    reg.http.close()


async def wait_converged(settings: Settings, topo: Topology, timeout_s: float) -> float:
    """Until every hop namespace exists and has its listener spec; returns seconds waited."""
    t0 = time.monotonic()
    spec_dir = Path(settings.proxy.listeners_dir)
    wanted = topo.hop_namespaces()
    while True:
        missing = [ns for ns, spec, _, _ in wanted
                   if not netns.netns_exists(ns) or not (spec_dir / f"{spec}.json").exists()]
        if not missing:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"not converged after {timeout_s:.0f}s: {len(missing)} missing, "
                             f"e.g. {missing[:3]}")
        await asyncio.sleep(0.25)


def dhcp_ips(settings: Settings) -> dict[str, str]:
    reg = Registry(settings)
    topo = reg.call("GET", "/v1/topology")
    reg.http.close()
    out = {}
    for port in topo.get("ports", []):
        if port.get("device_owner") == "network:dhcp" and port.get("fixed_ips"):
            out[port["network_id"]] = port["fixed_ips"][0]["ip_address"]
    return out


def plug_vms(settings: Settings, topo: Topology, timeout_s: float,
             isolated_dhcp: bool = False) -> None:
    """Plug every VM (static address). An isolated VM reaches 169.254.169.254 via its
    network's DHCP port: a static /32 route, as option 121 would give it, or with
    isolated_dhcp a real lease from the network's dnsmasq (udhcpc, option 121)."""
    from openimds.lab.vm import apply_plug, plan_vm

    reg = Registry(settings)
    registry_topology = reg.call("GET", "/v1/topology")
    reg.http.close()
    subnets = {s["network_id"]: s for s in registry_topology["subnets"]}
    networks = {n["id"]: n for n in registry_topology["networks"]}
    ports = {p["device_id"]: p for p in registry_topology["ports"]
             if not str(p.get("device_owner", "")).startswith("network:")}
    deadline = time.monotonic() + timeout_s
    dhcp: dict[str, str] = {}
    while topo.isolated_networks and len(dhcp) < len(topo.isolated_networks):
        dhcp = {k: v for k, v in dhcp_ips(settings).items() if k in topo.isolated_networks}
        if time.monotonic() > deadline:
            raise SystemExit("the DHCP agent made no DHCP port for every isolated network")
        time.sleep(0.25)
    for vm in topo.vms:
        if STOP.is_set():
            raise SystemExit("interrupted")
        port = ports[vm.instance_id]
        instance = {"id": vm.instance_id, "name": vm.name, "ports": [port]}
        plan = plan_vm(instance, subnets[vm.network_id], networks[vm.network_id])
        by_dhcp = isolated_dhcp and vm.router_id is None
        apply_plug(plan, address_mode="dhcp" if by_dhcp else "static")
        if vm.router_id is None:
            vm.dhcp_ip = dhcp[vm.network_id]
        if vm.router_id is None and not by_dhcp:
            subprocess.run(["ip", "-n", vm.namespace, "route", "replace", f"{METADATA_IP}/32",
                            "via", dhcp[vm.network_id], "dev", "eth0"], check=True)


# --- the storm --------------------------------------------------------------------------------

@dataclass
class ArmResult:
    name: str
    requests: int = 0
    errors: int = 0
    wrong_instance: int = 0
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    processes: dict[str, dict[str, float]] = field(default_factory=dict)
    registry_queries: int | None = None
    listen_drops: int = 0  # in the host namespace (registry, API): SYNs dropped, 1 s retries
    bodies: dict[tuple[str, str], bytes] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s if self.wall_s else 0.0

    def pct(self, p: float) -> float:
        if not self.latencies_ms:
            return 0.0
        data = sorted(self.latencies_ms)
        return data[min(len(data) - 1, int(round(p / 100 * (len(data) - 1))))]

    def summary(self) -> dict[str, Any]:
        return {
            "arm": self.name, "requests": self.requests, "errors": self.errors,
            "wrong_instance": self.wrong_instance, "wall_s": round(self.wall_s, 3),
            "rps": round(self.rps, 1), "p50_ms": round(self.pct(50), 2),
            "p99_ms": round(self.pct(99), 2),
            "max_ms": round(max(self.latencies_ms, default=0.0), 2),
            "over_900ms": sum(1 for x in self.latencies_ms if x > 900),
            "host_listen_drops": self.listen_drops,
            "registry_queries": self.registry_queries, "processes": self.processes,
            "error_samples": self.error_samples[:5],
        }


async def one_request(vm: Vm, path: str, timeout_s: float) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    sock = netns.socket_in_netns(vm.namespace, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (METADATA_IP, 80)), timeout_s)
        await loop.sock_sendall(sock, (
            f"GET {path} HTTP/1.1\r\nHost: {METADATA_IP}\r\nUser-Agent: Cloud-Init/22.4.2\r\n"
            "Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        ).encode())
        chunks = []
        while True:
            data = await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout_s)
            if not data:
                break
            chunks.append(data)
    finally:
        sock.close()
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
    return status, body


async def boot(vm: Vm, result: ArmResult, record: bool, timeout_s: float) -> None:
    for path in BOOT_SEQUENCE:
        t0 = time.perf_counter()
        try:
            status, body = await one_request(vm, path, timeout_s)
        except (OSError, TimeoutError) as exc:
            result.errors += 1
            result.error_samples.append(f"{vm.name} {path}: {exc!r}")
            continue
        result.latencies_ms.append((time.perf_counter() - t0) * 1000)
        result.requests += 1
        if status != 200:
            result.errors += 1
            result.error_samples.append(f"{vm.name} {path}: HTTP {status} {body[:80]!r}")
            continue
        if path.endswith("meta_data.json"):
            with contextlib.suppress(ValueError):
                if json.loads(body).get("uuid") != vm.instance_id:
                    result.wrong_instance += 1
                    result.errors += 1
        if record:
            result.bodies[(vm.instance_id, path)] = body


async def storm(vms: Sequence[Vm], name: str, record: bool, timeout_s: float,
                concurrent: int = 0) -> ArmResult:
    """Every VM boots; with `concurrent`, at most that many at once (the next VM starts as
    one finishes), so an overloaded machine can still give an error-free storm."""
    result = ArmResult(name)
    gate = asyncio.Semaphore(concurrent) if concurrent > 0 else None

    async def one(vm: Vm) -> None:
        if gate is None:
            return await boot(vm, result, record, timeout_s)
        async with gate:
            return await boot(vm, result, record, timeout_s)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(vm) for vm in vms))
    result.wall_s = time.perf_counter() - t0
    return result


async def probe(vms: Sequence[Vm], timeout_s: float) -> list[str]:
    """One request per VM (one VM per network is enough); the failures."""
    bad = []
    for vm in vms:
        try:
            status, _ = await one_request(vm, "/openstack", timeout_s)
            if status != 200:
                bad.append(f"{vm.name}: HTTP {status}")
        except (OSError, TimeoutError) as exc:
            bad.append(f"{vm.name}: {exc!r}")
    return bad


def one_vm_per_network(topo: Topology) -> list[Vm]:
    seen: dict[str, Vm] = {}
    for vm in topo.vms:
        seen.setdefault(vm.network_id, vm)
    return list(seen.values())


async def wait_serving(topo: Topology, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    sample = one_vm_per_network(topo)
    while True:
        bad = await probe(sample, 5)
        if not bad:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"hop 1 not serving every network: {bad[:3]}")
        await asyncio.sleep(0.3)


# --- hop 1 alternatives -----------------------------------------------------------------------

def haproxy_config(listener: str, router_id: str | None, network_id: str | None,
                   socket_path: str, pidfile: Path, s: Settings) -> str:
    """Neutron 29's rendered config (neutron.md §2.1); logging off as in perf-limits.md."""
    h = s.metadata_haproxy
    if router_id is not None:
        bind, drop, header, value = (f"bind 0.0.0.0:{s.metadata_port}", "X-Neutron-Network-ID",
                                     "X-Neutron-Router-ID", router_id)
    else:
        assert network_id is not None
        bind, drop, header, value = (f"bind {METADATA_IP}:80", "X-Neutron-Router-ID",
                                     "X-Neutron-Network-ID", network_id)
    return f"""global
    maxconn     1024
    nbthread    2
    pidfile     {pidfile}

defaults
    mode http
    option http-server-close
    option forwardfor
    retries                 3
    timeout http-request    {h.timeout_http_request:g}s
    timeout connect         {h.timeout_connect:g}s
    timeout client          {h.timeout_client:g}s
    timeout server          {h.timeout_server:g}s
    timeout http-keep-alive {h.timeout_http_keep_alive:g}s

listen listener
    {bind}
    server metadata {socket_path}

    http-request del-header {drop}
    http-request set-header {header} {value}
"""


class ProxyLock:
    """Hold the proxy's flock so no agent starts an openimds proxy while another hop 1 runs."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.path("proxy", "proxy.lock")
        self.fd: int | None = None

    def __enter__(self) -> ProxyLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + 15
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SystemExit("the proxy lock is still held") from None
                time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def start_haproxies(
    settings: Settings, topo: Topology, workdir: Path,
) -> list[subprocess.Popen[bytes]]:
    procs = []
    workdir.mkdir(parents=True, exist_ok=True)
    for ns, listener, router_id, network_id in topo.hop_namespaces():
        cfg = workdir / f"{listener}.conf"
        cfg.write_text(haproxy_config(listener, router_id, network_id,
                                      settings.metadata_proxy_socket,
                                      workdir / f"{listener}.pid", settings))
        procs.append(subprocess.Popen(
            ["ip", "netns", "exec", ns, "haproxy", "-db", "-f", str(cfg)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=(workdir / f"{listener}.log").open("ab"), start_new_session=True))
    return procs


def stop_processes(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            signal_pid(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_pid(p.pid, signal.SIGKILL)
            p.wait(5)


def floor_main(spec_path: str) -> int:
    """`--floor-serve SPEC`: one process, a listener per hop namespace, the recorded bytes."""
    from openimds.http.server import Request, Response, install_uvloop, serve

    spec = json.loads(Path(spec_path).read_text())
    # docs[listener][(peer ip, path)] = body
    docs: dict[str, dict[tuple[str, str], bytes]] = {}
    for listener, entries in spec["docs"].items():
        docs[listener] = {(ip, path): base64.b64decode(b) for ip, path, b in entries}
    not_found = Response(404, b"404 Not Found")

    def handler_for(table: dict[tuple[str, str], bytes]) -> Any:
        def handle(req: Request) -> Response:
            peer = req.peer[0] if req.peer else ""
            body = table.get((peer, req.path))
            if body is None:
                return not_found
            return Response(200, body)
        return handle

    async def main() -> None:
        servers = []
        for ns, listener, host, port in spec["listeners"]:
            sock = netns.socket_in_netns(ns, socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND
            sock.bind((host, port))
            sock.listen(4096)
            sock.setblocking(False)
            servers.append(await serve(handler_for(docs.get(listener, {})), sock))
        Path(spec["ready_file"]).write_text(str(os.getpid()))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for server in servers:
            server.close()

    install_uvloop()
    asyncio.run(main())
    return 0


def start_floor(settings: Settings, topo: Topology, recorded: ArmResult,
                workdir: Path) -> subprocess.Popen[bytes]:
    listeners = []
    by_listener: dict[str, list[tuple[str, str, str]]] = {}
    vm_listener = {}
    for ns, listener, router_id, _network_id in topo.hop_namespaces():
        if router_id is not None:
            listeners.append((ns, listener, "0.0.0.0", settings.metadata_port))
        else:
            listeners.append((ns, listener, METADATA_IP, 80))
    for vm in topo.vms:
        vm_listener[vm.instance_id] = (
            names.router_listener_name(vm.router_id) if vm.router_id
            else names.network_listener_name(vm.network_id), vm.ip)
    for (instance_id, path), body in recorded.bodies.items():
        listener, ip = vm_listener[instance_id]
        by_listener.setdefault(listener, []).append(
            (ip, path, base64.b64encode(body).decode()))
    workdir.mkdir(parents=True, exist_ok=True)
    ready = workdir / "floor.ready"
    spec = workdir / "floor.json"
    spec.write_text(json.dumps({"listeners": listeners, "docs": by_listener,
                                "ready_file": str(ready)}))
    proc = subprocess.Popen([sys.executable, __file__, "--floor-serve", str(spec)],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the floor server did not start")
        time.sleep(0.05)
    return proc


# --- driver -----------------------------------------------------------------------------------

def agent_stats(settings: Settings) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(settings.metadata_proxy_socket)
        s.sendall(b"GET /openimds-agent/stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    body = data.partition(b"\r\n\r\n")[2]
    try:
        stats: dict[str, Any] = json.loads(body)
    except ValueError:
        return {}
    return stats


def listen_drops() -> int:
    """TcpExt ListenDrops of our own network namespace (accept queues that overflowed)."""
    lines = Path("/proc/self/net/netstat").read_text().splitlines()
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        if head.startswith("TcpExt:"):
            table = dict(zip(head.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenDrops", 0))
    return 0


def measure(pids: dict[str, list[int]]) -> dict[str, tuple[float, float, int]]:
    """{name: (user CPU s, system CPU s, RSS KiB)}, summed over each name's processes."""
    out = {}
    for name, ps in pids.items():
        splits = [cpu_split(p) for p in ps]
        out[name] = (sum(u for u, _ in splits), sum(s for _, s in splits),
                     sum(rss_kib(p) for p in ps))
    return out


def start_profile(pids: dict[str, list[int]], hops: Sequence[str], out: Path,
                  arm: str) -> list[tuple[subprocess.Popen[bytes], Path]]:
    """py-spy on each hop named in `hops` (its first process), until `stop_profile`."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    started = []
    out.mkdir(parents=True, exist_ok=True)
    for hop in hops:
        if not pids.get(hop):
            continue
        path = out / f"{arm}-{hop}.raw"
        started.append((subprocess.Popen(
            [spy, "record", "--pid", str(pids[hop][0]), "--rate", "1000", "--format", "raw",
             "--output", str(path), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), path))
    return started


def stop_profile(started: list[tuple[subprocess.Popen[bytes], Path]], top: int = 20) -> None:
    """Stop the samplers (SIGINT: py-spy writes its file) and log each one's top frames."""
    for proc, _ in started:
        signal_pid(proc.pid, signal.SIGINT)
    for proc, path in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            signal_pid(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if not path.exists():
            log(f"profile {path.name}: py-spy wrote nothing")
            continue
        own: dict[str, int] = {}
        incl: dict[str, int] = {}
        total = 0
        for line in path.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + n
        log(f"profile {path.name}: {total} samples; own, then inclusive openimds frames")
        for fr, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
            log(f"  own  {100 * n / max(1, total):5.1f}%  {fr}")
        hot = [(fr, n) for fr, n in incl.items() if "openimds" in fr]
        for fr, n in sorted(hot, key=lambda kv: -kv[1])[:top]:
            log(f"  incl {100 * n / max(1, total):5.1f}%  {fr}")


async def run_arm(name: str, vms: Sequence[Vm], pids: dict[str, list[int]],
                  settings: Settings, record: bool = False, concurrent: int = 0,
                  profile: Sequence[str] = (), profile_dir: Path | None = None) -> ArmResult:
    spies = start_profile(pids, profile, profile_dir, name) if profile_dir else []
    before = measure(pids)
    drops0 = listen_drops()
    stats0 = agent_stats(settings)
    log(f"arm {name}: {len(vms)} VMs x {len(BOOT_SEQUENCE)} requests, "
        + (f"{concurrent} VMs at a time" if concurrent > 0 else "all at once"))
    result = await storm(vms, name, record, 60.0, concurrent)
    after = measure(pids)
    if spies:
        stop_profile(spies)
    result.listen_drops = listen_drops() - drops0
    stats1 = agent_stats(settings)
    if "registry_queries" in stats1:
        result.registry_queries = int(stats1["registry_queries"]) - int(
            stats0.get("registry_queries", 0))
    for proc_name in pids:
        user = after[proc_name][0] - before[proc_name][0]
        system = after[proc_name][1] - before[proc_name][1]
        result.processes[proc_name] = {
            "cpu_s": round(user + system, 3), "user_s": round(user, 3),
            "sys_s": round(system, 3),
            "us_per_req": round(1e6 * (user + system) / max(1, result.requests), 1),
            "rss_mib": round(after[proc_name][2] / 1024, 1),
        }
    s = result.summary()
    log(f"arm {name}: {s['requests']} requests in {s['wall_s']} s = {s['rps']} req/s, "
        f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms, "
        f"errors {s['errors']}, registry queries {s['registry_queries']}, "
        f"{s['over_900ms']} over 900 ms, {s['host_listen_drops']} listen drops")
    log(f"arm {name} CPU: " + ", ".join(
        f"{k} usr {v['user_s']:.2f} s + sys {v['sys_s']:.2f} s = {v['us_per_req']:.0f} us/req"
        for k, v in result.processes.items()))
    for sample in result.error_samples[:5]:
        log(f"  error: {sample}")
    return result


def enter_private_netns() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


NEIGH_SYSCTL = "/proc/sys/net/ipv4/neigh/default/gc_thresh{}"


def raise_neigh_limits(entries: int) -> list[tuple[int, int, int]]:
    """Raise the ARP table's gc_thresh2/3 so `entries` neighbours fit; [(fd, old, new)].

    The neighbour table is shared by every network namespace on the host and its limits live
    only in the initial one (default gc_thresh3 = 1024): a thousand VMs each resolving their
    gateway, and routers resolving their VMs, overflow it ("neighbor table overflow",
    connects fail with EHOSTUNREACH). Must run before leaving the initial namespace; the fds
    stay bound to it so `restore_neigh_limits` can undo the change at the end.
    """
    changed = []
    for index, want in ((2, entries // 2), (3, entries)):
        try:
            fd = os.open(NEIGH_SYSCTL.format(index), os.O_RDWR)
        except OSError:
            continue
        old = int(os.pread(fd, 32, 0).split()[0])
        if old >= want:
            os.close(fd)
            continue
        os.pwrite(fd, f"{want}\n".encode(), 0)
        changed.append((fd, old, want))
    return changed


def restore_neigh_limits(changed: list[tuple[int, int, int]]) -> None:
    for fd, old, new in reversed(changed):
        with contextlib.suppress(OSError):
            if int(os.pread(fd, 32, 0).split()[0]) == new:  # nobody changed it meanwhile
                os.pwrite(fd, f"{old}\n".encode(), 0)
        os.close(fd)


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cleanup_namespaces(topo: Topology, state: Path) -> list[str]:
    wanted = {vm.namespace for vm in topo.vms}
    # whatever the agents recorded, even if the bench stopped half-way
    with contextlib.suppress(OSError):
        wanted |= {names.router_namespace(p.name) for p in (state / "l3" / "routers").iterdir()
                   if not p.name.startswith(".")}
    with contextlib.suppress(OSError):
        wanted |= {names.dhcp_namespace(p.name) for p in (state / "dhcp").iterdir()
                   if p.is_dir()}
    wanted |= {ns for ns, _, _, _ in topo.hop_namespaces()}
    # the DHCP agent serves every DHCP-enabled network, routed ones too
    wanted |= {names.dhcp_namespace(n) for n in topo.routed_networks + topo.isolated_networks}
    present = set(os.listdir("/run/netns")) if os.path.isdir("/run/netns") else set()
    mine = sorted(wanted & present)
    # stop any process still inside them (dnsmasq, haproxy), by PID
    inodes = {}
    for ns in mine:
        with contextlib.suppress(OSError):
            inodes[os.stat(f"/run/netns/{ns}").st_ino] = ns
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino in inodes:
                    signal_pid(int(entry), signal.SIGKILL)
    if mine:
        subprocess.run(["ip", "-force", "-batch", "-"], input="".join(
            f"netns del {ns}\n" for ns in mine), text=True, check=False,
            capture_output=True)
    for ns in mine:
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)
    return sorted(wanted)


async def bench(args: argparse.Namespace, arms: list[str], settings: Settings, config: Path,
                state: Path, topo: Topology, results: dict[str, list[ArmResult]],
                report: dict[str, Any]) -> None:
    """Everything that needs the event loop: the supervised services live in this one."""
    sup: Supervisor = build_supervisor(settings, str(config), {})
    extra: list[subprocess.Popen[bytes]] = []
    main_task = asyncio.current_task()
    if main_task is not None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    try:
        t0 = time.monotonic()
        await sup.start_all()
        log(f"services ready in {time.monotonic() - t0:.1f} s (state {state})")
        proxy = sup.get("proxy")
        assert proxy.pid is not None
        proxy_rss0 = rss_kib(proxy.pid)

        t0 = time.monotonic()
        await asyncio.to_thread(build_topology, settings, topo, args.vms, args.routers,
                                args.isolated)
        log(f"registry: {args.routers} routers, {args.isolated} isolated networks, "
            f"{args.vms} servers in {time.monotonic() - t0:.1f} s")
        waited = await wait_converged(settings, topo, 120 + args.vms / 5)
        log(f"agents converged {waited:.1f} s later")
        t0 = time.monotonic()
        await asyncio.to_thread(plug_vms, settings, topo, 120)
        log(f"plugged {len(topo.vms)} VMs in {time.monotonic() - t0:.1f} s")
        await wait_serving(topo, timeout_s=60)
        proxy_rss1 = rss_kib(proxy.pid)
        hops = len(topo.hop_namespaces())
        report["proxy_rss_kib_idle"] = proxy_rss0
        report["proxy_rss_kib_with_listeners"] = proxy_rss1
        report["proxy_rss_kib_per_extra_router"] = round((proxy_rss1 - proxy_rss0) / hops, 2)
        log(f"proxy RSS {proxy_rss0} KiB idle -> {proxy_rss1} KiB with {hops} listeners "
            f"({report['proxy_rss_kib_per_extra_router']} KiB per extra router)")

        # Restarted before each cold arm so every arm meets the same cold caches. With
        # --keep-api the metadata API stays up: it followed the change feed while the servers
        # were created and prewarmed their documents, as it would in a running cloud; the
        # agent is still restarted, so its lookups stay cold.
        restarted = ("agent",) if args.keep_api else ("agent", "api")

        async def restart_backends() -> dict[str, list[int]]:
            for name in restarted:
                await sup.get(name).stop()
            for name in reversed(restarted):
                await sup.get(name).start()
            # A running agent holds every port in its warm index (from the change feed); a
            # restarted one loads it from /v1/topology first: wait for that, as for readiness.
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                stats = agent_stats(settings)
                if "index_loads" not in stats or stats["index_loads"] >= 1:
                    break
                await asyncio.sleep(0.05)
            return {"agent": [sup.get("agent").pid or 0], "api": [sup.get("api").pid or 0],
                    "registry": [sup.get("registry").pid or 0]}

        async def ensure_proxy() -> int:
            """Our proxy child again; or the one an agent started in the gap, if it won."""
            try:
                await proxy.start()
            except ChildFailed:
                pass
            await wait_serving(topo, timeout_s=60)
            pid = int(settings.path("proxy", "proxy.pid").read_text())
            return pid

        spied = [h.strip() for h in (args.profile or "").split(",") if h.strip()]

        def profiling(rnd: int) -> dict[str, Any]:
            """py-spy on `--profile`'s hops during the first round's ours arms."""
            if not spied or rnd:
                return {}
            return {"profile": spied, "profile_dir": Path(args.profile_dir)}

        async def stop_proxy() -> None:
            await proxy.stop()
            stray = settings.path("proxy", "proxy.pid")
            with contextlib.suppress(OSError, ValueError):
                await stop_pid(int(stray.read_text()))

        async def floor_arm() -> None:
            nonlocal extra
            with ProxyLock(settings):
                floor = start_floor(settings, topo, results["ours"][0], state / "floor")
                extra = [floor]
                await wait_serving(topo, timeout_s=60)
                results.setdefault("floor", []).append(await run_arm(
                    "floor", topo.vms, {"floor": [floor.pid]}, settings,
                    concurrent=args.concurrent))
                stop_processes(extra)
                extra = []

        for rnd in range(args.rounds):
            log(f"round {rnd + 1}/{args.rounds}")
            # --alternate: every second round runs the floor first (it replays what round
            # 1's ours arm received), so a load that drifts over a round favours neither
            floor_first = args.alternate and rnd % 2 == 1 and "floor" in arms
            if floor_first:
                await stop_proxy()
                await floor_arm()
            proxy_pid = await ensure_proxy()
            backends = await restart_backends()
            results.setdefault("ours", []).append(await run_arm(
                "ours", topo.vms, {"proxy": [proxy_pid], **backends}, settings,
                record=(rnd == 0), concurrent=args.concurrent, **profiling(rnd)))
            if "ours-warm" in arms:
                # the same storm again with the caches the first one filled: the chain's
                # steady-state cost, without the registry misses of new instances
                results.setdefault("ours-warm", []).append(await run_arm(
                    "ours-warm", topo.vms, {"proxy": [proxy_pid], **backends}, settings,
                    concurrent=args.concurrent, **profiling(rnd)))
            if "haproxy" in arms or ("floor" in arms and not floor_first):
                await stop_proxy()
            if "haproxy" in arms:
                with ProxyLock(settings):
                    backends = await restart_backends()
                    extra = start_haproxies(settings, topo, state / "haproxy")
                    await wait_serving(topo, timeout_s=60)
                    results.setdefault("haproxy", []).append(await run_arm(
                        "haproxy", topo.vms, {"haproxy": [p.pid for p in extra], **backends},
                        settings, concurrent=args.concurrent))
                    stop_processes(extra)
                    extra = []
            if "floor" in arms and not floor_first:
                await floor_arm()
    finally:
        STOP.set()
        stop_processes(extra)
        await sup.stop_all()
        await stop_stray_proxy(settings)  # a proxy an agent may have started meanwhile


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else "")
    parser.add_argument("--vms", "-n", type=int, default=1000)
    parser.add_argument("--routers", "-r", type=int, default=100)
    parser.add_argument("--isolated", "-i", type=int, default=10)
    parser.add_argument("--small", action="store_true", help="N=50, R=5, I=2 (CI smoke test)")
    parser.add_argument("--arms", default="ours,ours-warm,haproxy,floor",
                        help="comma list of ours, ours-warm, haproxy, floor (ours always runs "
                             "first; ours-warm repeats it with warm caches)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds of all arms; medians are reported")
    parser.add_argument("--alternate", action="store_true",
                        help="run the floor arm first in every second round (a drifting "
                             "background load then favours neither side of the ratio)")
    parser.add_argument("--keep-api", action="store_true",
                        help="do not restart the metadata API before the cold arms: it keeps "
                             "the views it prewarmed from the change feed (and, from round 2 "
                             "on, the answers the earlier rounds' requests left it)")
    parser.add_argument("--concurrent", type=int, default=0,
                        help="at most this many VMs booting at once (0: all at once); for a "
                             "machine so loaded that N at once overloads it into errors")
    parser.add_argument("--profile", help="comma list of proxy, agent, api, registry: "
                        "py-spy samples each during round 1's ours and ours-warm arms (the "
                        "sampler takes CPU: take ratios from a run without it)")
    parser.add_argument("--profile-dir", default="storm-profile",
                        help="where the raw py-spy stacks go (ARM-HOP.raw)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the temp state dir")
    parser.add_argument("--no-unshare", action="store_true",
                        help="do not enter a private network namespace (already in one)")
    parser.add_argument("--floor-serve", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.floor_serve:
        return floor_main(args.floor_serve)
    if args.small:
        args.vms, args.routers, args.isolated = 50, 5, 2
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if "haproxy" in arms and shutil.which("haproxy") is None:
        log("haproxy not installed: skipping that arm")
        arms.remove("haproxy")
    if os.geteuid() != 0:
        raise SystemExit("the boot storm needs root (namespaces, bridges, nftables)")
    # neighbours: each VM its gateway or DHCP port, each router/DHCP namespace its VMs
    neigh = raise_neigh_limits(max(1024, 4 * (2 * args.vms + 2 * (args.routers + args.isolated))))
    for _fd, old, new in neigh:
        log(f"raised an ARP table limit (gc_thresh) from {old} to {new}; restored at the end")
    if not args.no_unshare:
        enter_private_netns()
    raise_nofile()

    state = Path(tempfile.mkdtemp(prefix="openimds-bench-"))
    os.chmod(state, 0o755)  # noqa: S103  (the proxy may run as another user)
    config = state / "openimds.ini"
    config.write_text(
        f"[DEFAULT]\nstate_path = {state}\nnova_metadata_host = 127.0.0.1\n"
        "enable_isolated_metadata = true\n\n[api]\nmetadata_listen = 127.0.0.1\n\n"
        "[registry]\nbind_host = 127.0.0.1\n"
    )
    ensure_secrets(state)
    env_clean = {k: v for k, v in os.environ.items() if not k.startswith("OPENIMDS_")}
    os.environ.clear()
    os.environ.update(env_clean)
    os.environ["NO_PROXY"] = "*"
    settings = load_settings(str(config))
    report: dict[str, Any] = {"n_vms": args.vms, "routers": args.routers,
                              "isolated": args.isolated,
                              "requests_per_vm": len(BOOT_SEQUENCE)}
    topo = Topology()
    results: dict[str, list[ArmResult]] = {}
    import uvloop

    # uvloop for our own loop only: pyroute2 makes asyncio loops of its own in worker threads,
    # and uvloop cannot open netlink sockets.
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(bench(args, arms, settings, config, state, topo, results, report))
    finally:
        report["namespaces"] = cleanup_namespaces(topo, state)
        restore_neigh_limits(neigh)
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)

    report["rounds"] = args.rounds
    report["arms"] = {name: median_round(rs).summary() | {
        "rps_rounds": [round(r.rps, 1) for r in rs]} for name, rs in results.items()}
    report["ratios"], report["ratios_refused"] = ratios_of(results)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    errors = sum(r.errors for rs in results.values() for r in rs)
    return 1 if errors else 0


RATIOS = (("ours", "floor"), ("ours", "haproxy"), ("ours-warm", "floor"),
          ("ours", "ours-warm"))


def ratios_of(results: dict[str, list[ArmResult]]) -> tuple[dict[str, Any], dict[str, str]]:
    """Per-round requests/s ratios and their median; ({key: value}, {key: why refused}).

    A round where either arm had an error gives no ratio: an overloaded reference (connect
    errors, timeouts) runs faster or slower for reasons that are not the chain's, so the
    ratio would mean nothing. Such a round is named, with its error counts, instead."""
    ratios: dict[str, Any] = {}
    refused: dict[str, str] = {}
    for mine, other in RATIOS:
        key = f"{mine.replace('-', '_')}_over_{other.replace('-', '_')}_rps"
        per_round, why = [], []
        for rnd, (o, x) in enumerate(zip(results.get(mine, []), results.get(other, []),
                                         strict=False), start=1):
            if o.errors or x.errors:
                why.append(f"round {rnd}: {mine} {o.errors} errors, {other} {x.errors}")
            elif x.rps:
                per_round.append(o.rps / x.rps)
        if per_round:
            ratios[key] = round(statistics.median(per_round), 3)
            ratios[f"{key}_rounds"] = [round(v, 3) for v in per_round]
        if why:
            refused[key] = "; ".join(why)
    return ratios, refused


def median_round(rounds: Sequence[ArmResult]) -> ArmResult:
    """The round with the median requests/s (the lower middle one for an even count)."""
    ordered = sorted(rounds, key=lambda r: r.rps)
    return ordered[(len(ordered) - 1) // 2]


def print_report(report: dict[str, Any]) -> None:
    print(f"\nboot storm: {report['n_vms']} VMs, {report['routers']} routers, "
          f"{report['isolated']} isolated networks, {report['requests_per_vm']} requests each")
    print(f"{'arm':<9} {'requests':>8} {'wall s':>7} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'max ms':>7} {'errors':>6} {'reg q':>6}  processes (CPU s, RSS MiB)")
    for s in report["arms"].values():
        procs = ", ".join(
            f"{k} {v['cpu_s']:.2f}s (usr {v['user_s']:.2f} sys {v['sys_s']:.2f}, "
            f"{v['us_per_req']:.0f} us/req) {v['rss_mib']:.1f}M"
            for k, v in s["processes"].items())
        print(f"{s['arm']:<9} {s['requests']:>8} {s['wall_s']:>7.2f} {s['rps']:>8.0f} "
              f"{s['p50_ms']:>7.1f} {s['p99_ms']:>7.1f} {s['max_ms']:>7.1f} {s['errors']:>6} "
              f"{s['registry_queries'] if s['registry_queries'] is not None else '-':>6}  "
              f"{procs}")
    for k, v in report.get("ratios", {}).items():
        print(f"{k}: {v}")
    for k, why in report.get("ratios_refused", {}).items():
        print(f"{k}: no ratio for rounds with errors ({why})")
    if "proxy_rss_kib_per_extra_router" in report:
        print(f"proxy RSS per extra router: {report['proxy_rss_kib_per_extra_router']} KiB")


if __name__ == "__main__":
    sys.exit(main())
