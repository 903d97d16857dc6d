"""Benchmark: what held `wait_for_change` requests cost the agent and the API while they wait.

    .venv/bin/python bench/longpoll_bench.py [--held 1000] [--vms 100] [--window 10] [--rounds 3]

Real processes started through the CLI, on loopback and the agent's Unix socket (as root,
inside a private network namespace, like the tests): the registry (sqlite) with one network
and `--vms` instances, `openimds api`, `openimds agent`. This process opens `--held`
keep-alive connections to the agent, `--held / --vms` per VM (as the proxy would send them:
X-Forwarded-For + X-Neutron-Network-ID), each asking
`/openstack/latest/meta_data.json?wait_for_change=true&last_etag=<current>&timeout_sec=600`.

Per round, CPU of the agent and the API (utime + stime from /proc/PID/stat, 10 ms ticks)
over `--window` seconds:
- idle: nothing held (the reference, measured in the same run, right before);
- held: every request held (all accepted, none answered: checked).
Then one VM's property changes (`PATCH /v1/instances`) and its held requests must all answer
with the new document while the others stay held: they were really waiting, not failed.
Reports CPU ms per second idle vs held, and the one-time CPU to accept the held requests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.support import (  # noqa: E402
    base_config,
    http_ready,
    openimds_service,
    tcp_ready,
    unix_ready,
    write_config,
)

from openimds.registry.client import RegistryClient  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
# the namespace and /proc helpers, shared with the agent and proxy benches
from agent_bench import enter_private_netns  # noqa: E402
from proxy_bench import cpu_s  # noqa: E402

DOC = "/openstack/latest/meta_data.json"  # changes with the instance properties
TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


class Held(asyncio.Protocol):
    """One connection holding one request; records when (and what) it was answered."""

    def __init__(self) -> None:
        self.data = b""
        self.answered: float | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.answered is None and b"\r\n\r\n" in self.data:
            self.answered = time.monotonic()


def request(path: str, ip: str, network_id: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: {ip}\r\n"
            f"X-Neutron-Network-ID: {network_id}\r\n\r\n").encode()


async def fetch_etag(sock: str, ip: str, network_id: str) -> str:
    reader, writer = await asyncio.open_unix_connection(sock)
    writer.write(request(DOC, ip, network_id))
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    writer.close()
    for line in head.split("\r\n"):
        if line.lower().startswith("etag:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"no ETag in {head!r}")


async def round_(args: argparse.Namespace, sock: str, vms: list[dict[str, Any]],
                 network_id: str, pids: dict[str, int], client: RegistryClient,
                 rnd: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    per_vm = args.held // len(vms)
    etags = [await fetch_etag(sock, vm["ip"], network_id) for vm in vms]
    out: dict[str, float] = {}

    # idle reference
    before = {k: cpu_s(p) for k, p in pids.items()}
    await asyncio.sleep(args.window)
    for k, p in pids.items():
        out[f"{k}_idle_ms_s"] = (cpu_s(p) - before[k]) * 1000 / args.window

    # open and hold
    before = {k: cpu_s(p) for k, p in pids.items()}
    conns: list[tuple[int, Held]] = []
    for i, vm in enumerate(vms):
        path = (f"{DOC}?wait_for_change=true&last_etag={etags[i]}"
                "&timeout_sec=600")
        data = request(path, vm["ip"], network_id)
        for _ in range(per_vm):
            _, proto = await loop.create_unix_connection(Held, sock)
            assert proto.transport is not None
            proto.transport.write(data)
            conns.append((i, proto))
    await asyncio.sleep(args.settle)  # every request reached the API and parked
    early = sum(1 for _, p in conns if p.answered is not None)
    if early:
        raise RuntimeError(f"{early} held requests were answered early: "
                           f"{next(p.data for _, p in conns if p.answered)[:200]!r}")
    for k, p in pids.items():
        out[f"{k}_setup_ms"] = (cpu_s(p) - before[k]) * 1000
    before = {k: cpu_s(p) for k, p in pids.items()}
    await asyncio.sleep(args.window)
    for k, p in pids.items():
        out[f"{k}_held_ms_s"] = (cpu_s(p) - before[k]) * 1000 / args.window
    if any(p.answered is not None for _, p in conns):
        raise RuntimeError("held requests answered while nothing changed")

    # one VM changes: exactly its requests answer, promptly
    victim = rnd % len(vms)
    t0 = time.monotonic()
    client.update("instance", vms[victim]["id"], {"metadata": {"round": str(rnd)}})
    await asyncio.sleep(2.0)
    answered = [(i, p) for i, p in conns if p.answered is not None]
    if {i for i, _ in answered} != {victim} or len(answered) != per_vm:
        raise RuntimeError(f"after the change: {len(answered)} answered, VMs "
                           f"{sorted({i for i, _ in answered})}, expected {per_vm} of {victim}")
    if not all(b" 200 " in p.data.split(b"\r\n", 1)[0] for _, p in answered):
        raise RuntimeError("a woken request did not answer 200")
    out["wake_ms"] = (max(p.answered or 0 for _, p in answered) - t0) * 1000
    out["held"] = float(len(conns))
    for _, held in conns:
        assert held.transport is not None
        held.transport.close()
    await asyncio.sleep(1.0)  # the hops see the clients go; nothing stays held
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--held", type=int, default=1000)
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds after opening before the held window starts")
    args = parser.parse_args()
    enter_private_netns()
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = Path(tempfile.mkdtemp(prefix="longpoll-bench-"))
    sock = str(tmp / "agent.sock")
    cfg = base_config(tmp / "state", DEFAULT={"metadata_proxy_socket": sock},
                      api={"max_waits_per_instance": args.held // args.vms})
    (tmp / "state").mkdir()
    config = write_config(tmp / "openimds.ini", cfg)
    reg = cfg["registry"]
    url = f"http://{reg['bind_host']}:{reg['bind_port']}"
    services = []
    try:
        registry = openimds_service("registry", config, "registry", "serve", log_dir=tmp)
        services.append(registry)
        registry.start().wait_until(http_ready(url + "/v1/health"), 60)
        client = RegistryClient(url, reg["admin_token"])
        net = client.create_network("bench", project_id="bench")
        client.create_subnet("bench", net["id"], "10.96.0.0/20")
        vms = []
        for i in range(args.vms):
            inst = client.create_instance(f"vm-{i}", net["id"], project_id=net["project_id"])
            vms.append({"id": inst["id"], "ip": inst["ports"][0]["fixed_ips"][0]["ip_address"]})
        api = openimds_service("api", config, "api", log_dir=tmp)
        services.append(api)
        api.start().wait_until(tcp_ready(cfg["api"]["metadata_listen"],
                                         int(cfg["api"]["metadata_listen_port"])), 60)
        agent = openimds_service("agent", config, "agent", log_dir=tmp)
        services.append(agent)
        agent.start().wait_until(unix_ready(sock), 60)
        time.sleep(2.0)  # feeds live
        pids = {"api": api.pid, "agent": agent.pid}
        results = [asyncio.run(round_(args, sock, vms, net["id"], pids, client, r))
                   for r in range(args.rounds)]
    finally:
        for svc in reversed(services):
            svc.stop()
    med = {k: statistics.median(r[k] for r in results) for k in results[0]}
    print(f"# longpoll_bench: {platform.node()} {platform.machine()} "
          f"{os.cpu_count()} cpus, python {platform.python_version()}, "
          f"{args.held} held over {args.vms} VMs, window {args.window:g} s, "
          f"{args.rounds} rounds (medians)")
    print("| process | idle CPU ms/s | holding CPU ms/s | one-time accept CPU ms |")
    print("|---|---:|---:|---:|")
    for k in ("agent", "api"):
        print(f"| {k} | {med[f'{k}_idle_ms_s']:.2f} | {med[f'{k}_held_ms_s']:.2f} | "
              f"{med[f'{k}_setup_ms']:.0f} |")
    print(f"held per round: {med['held']:.0f}; a change answered its VM's "
          f"{args.held // args.vms} held requests within {med['wake_ms']:.0f} ms "
          f"(median), the other VMs' stayed held")
    for i, r in enumerate(results):
        print(f"round {i}: " + " ".join(f"{k}={v:.1f}" for k, v in sorted(r.items())))
    print(f"tick resolution {TICK_S * 1000:.0f} ms: a window of {args.window:g} s resolves "
          f"{TICK_S * 1000 / args.window:.1f} ms/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
