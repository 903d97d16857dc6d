#!/usr/bin/env python3
"""Fault injection: a boot storm while one component at a time is killed -9 and restarted.

    .venv/bin/python bench/faults.py              # N=200 VMs, every fault below
    .venv/bin/python bench/faults.py -n 50 --faults agent,registry --json out.json

Run as root. Inside a private network namespace of its own (ports vanish with it) it starts
the registry (SQLite), metadata API and agent the way `openimds up` does (node.up's
supervisor: a child killed -9 is restarted with its backoff), creates N servers, and then, per
fault, runs a storm: every VM asks the agent's socket for its boot documents with the headers
the namespace proxy would send (one connection per request, as cloud-init's readurl), retries
a failed request after 1 s as cloud-init does (giving up 120 s late), and loops on its
documents for `--duration` s (15) like a VM polling its metadata. 2 s in, the fault hits:

- agent, api, registry: `kill -9` of that child (the supervisor restarts it);
- sqlite-lock: another process holds the registry database's write lock for 10 s.

Meanwhile a writer creates servers one after another; each acknowledged create is checked to
still be in the registry at the end (no acknowledged write lost). Reported per fault: errors
the VMs saw (by status and reason), wrong answers (a document with another VM's uuid: must be
0), VMs whose last pass completed, time from the fault to the last error any VM saw (the time
to recover), writes acknowledged / lost. The
datapath hops (proxy, L3 and DHCP agents, dnsmasq) and a PostgreSQL restart are not covered
here (they need the namespaces of bench/boot_storm.py).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from openimds.config import Settings, load_settings  # noqa: E402
from openimds.node.up import SERVICES, build_supervisor, ensure_secrets  # noqa: E402
from openimds.registry.client import RegistryClient  # noqa: E402

PATHS = ("/openstack/latest/meta_data.json", "/openstack/latest/user_data",
         "/openstack/latest/network_data.json", "/latest/meta-data/instance-id",
         "/latest/meta-data/local-ipv4", "/latest/user-data")
FAULTS = ("agent", "api", "registry", "sqlite-lock")
RETRY_S = 1.0
GIVE_UP_S = 120.0
FAULT_AT_S = 2.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def private_netns() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        raise SystemExit(f"unshare(CLONE_NEWNET): {os.strerror(ctypes.get_errno())}")
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)


@dataclass
class Vm:
    name: str
    instance_id: str
    ip: str


@dataclass
class FaultResult:
    fault: str
    errors: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    finished: int = 0
    vms: int = 0
    recover_s: float = 0.0
    acked: int = 0
    lost: int = 0
    last_error: float = 0.0

    def summary(self) -> dict[str, Any]:
        return {"fault": self.fault, "vms": self.vms, "finished": self.finished,
                "errors": dict(self.errors), "error_total": sum(self.errors.values()),
                "wrong_answers": self.wrong, "recover_s": round(self.recover_s, 2),
                "writes_acked": self.acked, "writes_lost": self.lost}


async def ask(sock: str, network_id: str, vm: Vm, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(sock), 5)
    try:
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 169.254.169.254\r\nX-Forwarded-For: {vm.ip}\r\n"
            f"X-Neutron-Network-ID: {network_id}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


async def boot(sock: str, network_id: str, vm: Vm, result: FaultResult,
               until: float) -> bool:
    """cloud-init's sequence with its retry, again and again until `until` (a VM that loops
    on its metadata); True if its last pass completed."""
    give_up = until + GIVE_UP_S
    while True:
        for path in PATHS:
            while True:
                try:
                    status, body = await ask(sock, network_id, vm, path)
                except (OSError, TimeoutError) as exc:
                    status, body = 0, type(exc).__name__.encode()
                if status == 200:
                    if path.endswith("meta_data.json") and \
                            json.loads(body).get("uuid") != vm.instance_id:
                        result.wrong += 1
                    elif path.endswith("instance-id") and body.strip() == b"":
                        result.wrong += 1
                    break
                reason = body.decode(errors="replace").strip().split(":", 1)[-1].strip()[:40]
                result.errors[f"{status} {reason}" if status else reason] += 1
                result.last_error = max(result.last_error, time.monotonic())
                if time.monotonic() > give_up:
                    return False
                await asyncio.sleep(RETRY_S)
        if time.monotonic() >= until:
            return True
        await asyncio.sleep(0.05)


def hold_sqlite_lock(db: str, seconds: float, started: threading.Event) -> None:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    started.set()
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()


def writer(client: RegistryClient, network_id: str, stop: threading.Event,
           acked: list[str], tag: str) -> None:
    """Create servers one after another; remember each acknowledged one."""
    i = 0
    while not stop.is_set():
        try:
            inst = client.create_instance(f"w-{tag}-{i}", network_id)
            acked.append(str(inst["id"]))
        except Exception:  # refused or unreachable: not acknowledged, may be retried
            time.sleep(0.2)
        i += 1


async def run_fault(fault: str, sup: Any, settings: Settings, client: RegistryClient,
                    network_id: str, vms: list[Vm], duration_s: float) -> FaultResult:
    result = FaultResult(fault, vms=len(vms))
    sock = settings.metadata_proxy_socket
    stop = threading.Event()
    acked: list[str] = []
    wthread = threading.Thread(target=writer, args=(client, network_id, stop, acked, fault))
    wthread.start()
    until = time.monotonic() + duration_s
    boots = [asyncio.ensure_future(boot(sock, network_id, vm, result, until)) for vm in vms]
    await asyncio.sleep(FAULT_AT_S)
    t_fault = time.monotonic()
    if fault == "sqlite-lock":
        db = settings.registry_connection.removeprefix("sqlite:///")
        held = threading.Event()
        locker = threading.Thread(target=hold_sqlite_lock, args=(db, 10.0, held))
        locker.start()
        held.wait(10)
    else:
        pid = sup.get(fault).pid
        os.kill(pid, signal.SIGKILL)
        log(f"{fault}: killed pid {pid}")
    done = await asyncio.gather(*boots)
    if fault == "sqlite-lock":
        await asyncio.to_thread(locker.join)
    stop.set()
    await asyncio.to_thread(wthread.join)
    result.finished = sum(done)
    # from the fault to the last error any VM saw (0: none saw one)
    result.recover_s = max(0.0, result.last_error - t_fault) if result.last_error else 0.0
    result.acked = len(acked)
    for _ in range(100):  # the registry may still be restarting
        try:
            have = {str(i["id"]) for i in client.list("instance")}
            break
        except Exception:
            await asyncio.sleep(0.2)
    else:
        have = set()
    result.lost = len([a for a in acked if a not in have])
    return result


async def bench(args: argparse.Namespace, settings: Settings, config: Path) -> list[Any]:
    services = [s for s in SERVICES if s.name in ("registry", "api", "agent")]
    sup = build_supervisor(settings, str(config), {}, services)
    await sup.start_all()
    out = []
    try:
        client = RegistryClient.from_settings(settings, admin=True)
        net = client.create_network("faults", project_id="faults")
        client.create_subnet("faults-v4", net["id"], "10.8.0.0/16")
        vms = []
        for i in range(args.vms):
            ip = f"10.8.{i // 200 + 1}.{i % 200 + 10}"
            inst = client.create_instance(f"vm{i}", net["id"], fixed_ip=ip,
                                          user_data="I2Nsb3VkLWNvbmZpZwo=")
            vms.append(Vm(f"vm{i}", str(inst["id"]), ip))
        log(f"{len(vms)} servers created")
        await asyncio.sleep(2)  # the agent's index and the API's prewarm follow the feed
        for fault in args.faults.split(","):
            log(f"fault {fault}: {len(vms)} VMs boot")
            res = await run_fault(fault, sup, settings, client, str(net["id"]), vms,
                                  args.duration)
            s = res.summary()
            out.append(s)
            log(f"fault {fault}: finished {s['finished']}/{s['vms']}, errors "
                f"{s['error_total']} {s['errors']}, wrong {s['wrong_answers']}, last error "
                f"{s['recover_s']} s after the fault, writes acked {s['writes_acked']} "
                f"lost {s['writes_lost']}")
            await asyncio.sleep(3)  # every child back and settled before the next fault
        client.close()
    finally:
        await sup.stop_all()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vms", "-n", type=int, default=200)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--duration", type=float, default=15.0,
                        help="seconds each VM loops on its boot documents (the fault at 2 s)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    unknown = set(args.faults.split(",")) - set(FAULTS)
    if unknown:
        parser.error(f"--faults: unknown {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    private_netns()
    state = Path(tempfile.mkdtemp(prefix="openimds-faults-"))
    config = state / "openimds.ini"
    config.write_text(
        f"[DEFAULT]\nstate_path = {state}\nnova_metadata_host = 127.0.0.1\n\n"
        "[api]\nmetadata_listen = 127.0.0.1\n\n[registry]\nbind_host = 127.0.0.1\n")
    ensure_secrets(state)
    for key in [k for k in os.environ if k.startswith("OPENIMDS_")]:
        del os.environ[key]
    os.environ["NO_PROXY"] = "*"
    settings = load_settings(str(config))
    results = asyncio.run(bench(args, settings, config))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'fault':<12} {'finished':>9} {'errors':>7} {'wrong':>6} {'recover s':>10} "
          f"{'acked':>6} {'lost':>5}")
    for s in results:
        print(f"{s['fault']:<12} {s['finished']:>4}/{s['vms']:<4} {s['error_total']:>7} "
              f"{s['wrong_answers']:>6} {s['recover_s']:>10} {s['writes_acked']:>6} "
              f"{s['writes_lost']:>5}")
    ok = all(s["finished"] == s["vms"] and s["wrong_answers"] == 0 and s["writes_lost"] == 0
             for s in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
