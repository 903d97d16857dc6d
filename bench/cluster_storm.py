#!/usr/bin/env python3
"""Boot storm across a lab cluster, and failover when a network node is killed mid-storm.

    .venv/bin/python bench/cluster_storm.py                  # 40 VMs, 4 routers + 1 isolated
    .venv/bin/python bench/cluster_storm.py --vms 80 --routers 8 --json out.json

As root, inside a private network namespace of its own. Two arms on the same topology shape,
VM count and request mix, measured in the same run:

- box:   `lab cluster up --network-nodes 1 --compute-nodes 1` (every router, DHCP and VM on
         one network node and one compute node: the reference);
- cloud: `lab cluster up --network-nodes 2 --compute-nodes 2` (routers scheduled over two
         network nodes, VMs spread over two compute nodes, VXLAN between them).

Per arm: R tenants with 10.0.0.0/24 behind their own router and one isolated network; VMs
round-robin over the networks and the compute nodes (`server create --host`), plugged by a
worker inside each compute node (lab.vm.plug with the node's config, as `vm plug` does).
The storm: every VM performs cloud-init's boot sequence (bench/boot_storm.BOOT_SEQUENCE, 28
requests, a new TCP connection each) at once, from sockets the bench creates inside each
VM's namespace through the node (/proc/<node pid 1>/root/run/netns/vm-*): it crosses the
compute node's bridge, VXLAN, the network node's router or DHCP namespace, proxy, agent,
then the controller's API.

Then, cloud arm only: a reboot storm (every VM repeats the boot sequence, 1 s timeout per
request) for --failover-seconds; after a quarter of it the network node holding the first
router is killed (`lab node kill`, SIGKILL of its PID 1). Reported: errors in that window,
and per VM the time from the SIGKILL to its first 200 after its last failure (0 for VMs whose
router and DHCP stayed up); the box has no second network node, so its VMs would stay down
until the node returns (no figure).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from boot_storm import (  # noqa: E402
    BOOT_SEQUENCE,
    ArmResult,
    enter_private_netns,
    raise_nofile,
)

from openimds.config import load_settings  # noqa: E402
from openimds.host.netns import socket_in_netns_file  # noqa: E402
from openimds.lab import cluster as lab  # noqa: E402
from openimds.registry.client import RegistryClient  # noqa: E402

METADATA_IP = "169.254.169.254"
DOWN_TIME = 6.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Vm:
    name: str
    instance_id: str
    host: str
    dhcp: bool = False  # on the isolated network: DHCP (option 121 gives the metadata route)
    ns_file: str = ""


async def one_request(vm: Vm, path: str, timeout_s: float) -> tuple[int, bytes]:
    loop = asyncio.get_running_loop()
    sock = socket_in_netns_file(vm.ns_file, socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, (METADATA_IP, 80)), timeout_s)
        await loop.sock_sendall(sock, (
            f"GET {path} HTTP/1.1\r\nHost: {METADATA_IP}\r\nUser-Agent: Cloud-Init/22.4.2\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n").encode())
        chunks = []
        while data := await asyncio.wait_for(loop.sock_recv(sock, 65536), timeout_s):
            chunks.append(data)
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


async def boot(vm: Vm, result: ArmResult, timeout_s: float,
               events: list[tuple[float, bool]] | None = None) -> None:
    for path in BOOT_SEQUENCE:
        t0 = time.perf_counter()
        try:
            status, body = await one_request(vm, path, timeout_s)
        except (OSError, TimeoutError) as exc:
            status, body = 0, repr(exc).encode()
        ok = status == 200
        if ok and path.endswith("meta_data.json"):
            try:
                if json.loads(body).get("uuid") != vm.instance_id:
                    result.wrong_instance += 1
                    ok = False
            except ValueError:
                ok = False
        result.requests += 1
        if ok:
            result.latencies_ms.append((time.perf_counter() - t0) * 1000)
        else:
            result.errors += 1
            result.error_samples.append(f"{vm.name} {path}: {status} {body[:60]!r}")
        if events is not None:  # failover: reached its own instance's metadata or not
            events.append((time.time(), ok or 200 < status < 500))


async def storm(vms: list[Vm], name: str, timeout_s: float = 10.0) -> ArmResult:
    result = ArmResult(name)
    t0 = time.perf_counter()
    await asyncio.gather(*(boot(vm, result, timeout_s) for vm in vms))
    result.wall_s = time.perf_counter() - t0
    return result


async def reboot_storm(vms: list[Vm], seconds: float, kill_at: float, cluster: lab.Cluster,
                       victim: str) -> tuple[ArmResult, dict[str, float], float]:
    result = ArmResult("cloud failover")
    events: dict[str, list[tuple[float, bool]]] = {vm.name: [] for vm in vms}
    stop = time.monotonic() + seconds

    async def loop_vm(vm: Vm) -> None:
        while time.monotonic() < stop:
            await boot(vm, result, 1.0, events[vm.name])

    async def killer() -> float:
        await asyncio.sleep(kill_at)
        log(f"kill -9 {victim} (mid-storm)")
        killed_at = await asyncio.to_thread(lab.kill_node, cluster, cluster.node(victim))
        assert killed_at is not None
        return killed_at

    t0 = time.perf_counter()
    *_, killed_at = await asyncio.gather(*(loop_vm(vm) for vm in vms), killer())
    assert killed_at is not None  # killer's float: gather's star-args lose its type
    result.wall_s = time.perf_counter() - t0
    recovered = {}
    for name, ev in events.items():
        after = [(t, ok) for t, ok in ev if t >= killed_at]
        fails = [t for t, ok in after if not ok]
        if not fails:
            recovered[name] = 0.0
            continue
        later = [t for t, ok in after if ok and t > fails[-1]]
        recovered[name] = later[0] - killed_at if later else float("inf")
    return result, recovered, killed_at


def wait_alive(api: RegistryClient, names: list[str], timeout_s: float = 60) -> None:
    """Every network node's L3 and DHCP agents heartbeating, so the scheduler spreads
    routers and networks over all of them (a node shows alive once any agent reported)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ready = {h["name"] for h in api.list("host")
                 if {"l3", "dhcp"} <= {a["type"] for a in h["agents"] if a["alive"]}}
        if set(names) <= ready:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"network nodes not ready: {sorted(set(names) - ready)}")
        time.sleep(0.5)


def placement(cluster: lab.Cluster) -> dict[str, list[str]]:
    api = RegistryClient.from_settings(load_settings(str(cluster.host_config), environ={}),
                                       admin=True)
    try:
        return {r["name"]: r["hosts"] for r in api.list("router")} | {
            n["name"]: n["hosts"] for n in api.list("network")}
    finally:
        api.close()


def build(cluster: lab.Cluster, vms_n: int, routers: int) -> list[Vm]:
    settings = load_settings(str(cluster.host_config), environ={})
    computes = [n.name for n in cluster.nodes if n.role == "compute"]
    api = RegistryClient.from_settings(settings, admin=True)
    wait_alive(api, [n.name for n in cluster.nodes if n.role == "network"])
    user_data = base64.b64encode(b"#cloud-config\nruncmd:\n  - echo booted\n").decode()
    try:
        nets: list[tuple[str, str, bool]] = []  # (network id, project, isolated)
        for i in range(routers + 1):
            project, isolated = f"tenant-{i}", i == routers
            net = api.create("network", {"name": f"net-{i}", "project_id": project})
            sub = api.create("subnet", {"name": f"sub-{i}", "network_id": net["id"],
                                        "cidr": "10.0.0.0/24"})
            if not isolated:
                router = api.create("router", {"name": f"r-{i}", "project_id": project})
                api.add_interface(router["id"], sub["id"])
            blob = (len(b"ssh-ed25519").to_bytes(4, "big") + b"ssh-ed25519"
                    + (32).to_bytes(4, "big") + os.urandom(32))
            api.create("keypair", {"name": f"key{i}", "project_id": project, "public_key":
                                   f"ssh-ed25519 {base64.b64encode(blob).decode()} bench"})
            nets.append((net["id"], project, isolated))
        vms = []
        for i in range(vms_n):
            host = computes[i % len(computes)]
            net_id, project, isolated = nets[(i // len(computes)) % len(nets)]
            inst = api.create("instance", {
                "name": f"vm-{i}", "network_id": net_id, "project_id": project,
                "host": host, "key_name": f"key{nets.index((net_id, project, isolated))}",
                "user_data": user_data, "metadata": {"bench": "cluster-storm"}})
            vms.append(Vm(inst["name"], inst["id"], host, dhcp=isolated))
    finally:
        api.close()
    # one plug worker per compute node, inside it, with its config (tunnel and all)
    procs = []
    for host in computes:
        node = cluster.node(host)
        ids = [vm.instance_id + (":dhcp" if vm.dhcp else "") for vm in vms if vm.host == host]
        argv = lab.enter_argv(node, [sys.executable, str(Path(__file__).resolve()),
                                     "--plug-worker", str(cluster.node_config(node)), *ids])
        procs.append(subprocess.Popen(argv))
    for proc in procs:
        if proc.wait(timeout=600) != 0:
            raise SystemExit("a plug worker failed")
    for vm in vms:
        vm.ns_file = lab.netns_file(cluster.node(vm.host), f"vm-{vm.instance_id[:8]}")
    return vms


def plug_worker(config: str, ids: list[str]) -> int:
    from openimds.lab.vm import plug

    settings = load_settings(config)
    for spec in ids:
        sid, _, mode = spec.partition(":")
        plug(settings, sid, address_mode=mode or "static")
    return 0


async def wait_serving(vms: list[Vm], timeout_s: float) -> float:
    t0 = time.monotonic()
    pending = list(vms)
    while pending:
        if time.monotonic() - t0 > timeout_s:
            raise SystemExit(f"{len(pending)} VMs never got metadata, e.g. {pending[0].name}")
        still = []
        for vm in pending:
            try:
                status, _ = await one_request(vm, "/openstack", 1.0)
            except (OSError, TimeoutError):
                status = 0
            if status != 200:
                still.append(vm)
        pending = still
        if pending:
            await asyncio.sleep(0.5)
    return time.monotonic() - t0


def run_arm(name: str, network_nodes: int, compute_nodes: int, args: argparse.Namespace,
            report: dict[str, Any]) -> None:
    cname = name[:2] + uuid.uuid4().hex[:4]
    log(f"{name}: lab cluster up --network-nodes {network_nodes} "
        f"--compute-nodes {compute_nodes}")
    t0 = time.monotonic()
    cluster = lab.create(cname, network_nodes=network_nodes, compute_nodes=compute_nodes,
                         sets=[f"agent_down_time={DOWN_TIME}", "AGENT.report_interval=0.5"])
    try:
        report[f"{name}_cluster_up_s"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        vms = build(cluster, args.vms, args.routers)
        log(f"{name}: {len(vms)} VMs plugged in {time.monotonic() - t0:.1f} s")
        ready = asyncio.run(wait_serving(vms, 120))
        log(f"{name}: every VM answered {ready:.1f} s after plugging")
        rounds = [asyncio.run(storm(vms, name)) for _ in range(args.rounds)]
        rounds.sort(key=lambda r: r.pct(99))
        median = rounds[len(rounds) // 2]
        report["arms"].append(median.summary())
        log(f"{name}: {json.dumps(median.summary())}")
        where = placement(cluster)
        report[f"{name}_placement"] = where
        if network_nodes > 1 and args.failover_seconds > 0:
            victim = next(hosts[0] for hosts in where.values() if hosts)
            result, recovered, _ = asyncio.run(reboot_storm(
                vms, args.failover_seconds, args.failover_seconds / 4, cluster, victim))
            affected = sorted(v for v in recovered.values() if v > 0)
            report["failover"] = {
                "victim": victim, "agent_down_time_s": DOWN_TIME,
                "vms_affected": len(affected), "vms": len(vms),
                "max_s": round(max(recovered.values()), 2),
                "median_affected_s": round(affected[len(affected) // 2], 2) if affected else 0,
                "storm": result.summary(),
                "placement_after": placement(cluster),
            }
            log(f"failover: {json.dumps(report['failover'])}")
    finally:
        removed = lab.destroy(cluster)
        log(f"{name}: cluster down ({len(removed)} things removed)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", type=int, default=40)
    parser.add_argument("--routers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3, help="storms per arm (median kept)")
    parser.add_argument("--failover-seconds", type=float, default=40.0)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--plug-worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plug_worker:
        return plug_worker(args.plug_worker[0], args.plug_worker[1:])
    if os.geteuid() != 0:
        raise SystemExit("run as root (namespaces, bridges, VXLAN)")
    enter_private_netns()
    raise_nofile()
    report: dict[str, Any] = {"vms": args.vms, "routers": args.routers, "arms": [],
                              "cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}
    run_arm("box", 1, 1, args, report)
    run_arm("cloud", 2, 2, args, report)
    box, cloud = report["arms"]
    report["ratios_cloud_over_box"] = {
        k: round(cloud[k] / box[k], 2) if box[k] else None
        for k in ("rps", "p50_ms", "p99_ms", "wall_s")}
    report["load_avg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
