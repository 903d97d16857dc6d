#!/usr/bin/env python3
"""Fault injection on the real datapath: a looping boot storm while one component at a time is
killed -9 (or restarted, or locked) and comes back.

    .venv/bin/python bench/faults.py                    # N=60 VMs, R=4 routers, I=2 isolated
    .venv/bin/python bench/faults.py -n 30 --faults proxy,dnsmasq --json out.json

Run as root. Inside a private network namespace of its own (ports and bridges vanish with it;
the named namespaces it makes are deleted at the end, even on failure) it starts the node the
way `openimds up` does (node.up's supervisor: registry, API, agent, proxy, L3 agent, DHCP agent
with enable_isolated_metadata; a child killed -9 is restarted with its backoff) and builds
bench/boot_storm.py's topology: R tenants behind routers, I isolated ones, every CIDR
overlapping, N VMs in namespaces of their own. Routed VMs reach 169.254.169.254 through the
REDIRECT in their qrouter namespace; isolated VMs get their address and the 169.254.169.254/32
route from a real DHCP lease (udhcpc, option 121, from the network's dnsmasq) and reach the
proxy's listener in the qdhcp namespace. Per fault, every VM runs cloud-init's boot sequence
(boot_storm.BOOT_SEQUENCE, 28 requests, one TCP connection each, from a socket made in its
namespace) again and again for `--duration` s, retrying a failed request after 1 s as
cloud-init does (giving up 120 s late). 2 s in, the fault hits:

- agent, api, registry, proxy, l3-agent, dhcp-agent: `kill -9` of that child (the supervisor
  restarts it);
- dnsmasq: `kill -9` of every network's dnsmasq (the DHCP agent's process monitor respawns
  them); one VM per isolated network (kept out of the storm in every fault: a DHCP client
  deconfigures its interface first) renews its lease meanwhile, until one comes (also
  when the DHCP agent is killed);
- sqlite-lock: another process holds the registry database's write lock for 10 s;
- postgresql: the registry's PostgreSQL (a private instance the bench starts) stops as a crash
  would (`pg_ctl stop -m immediate`) and starts again 2 s later. This fault runs in a second
  pass with the registry on that PostgreSQL (same topology, built anew).

Meanwhile a writer creates servers one after another (on a network of its own); each
acknowledged create is checked to still be in the registry at the end. Reported per fault:
errors the VMs saw (by status and reason), time from the fault to the last error any VM saw
(the time to recover), VMs whose last pass completed, wrong answers (another VM's uuid or
address, or a document that differs from what the VM got before the fault: must be 0),
writes acknowledged / lost (lost must be 0) / refused (and the last refusal's time after
the fault: the registry's own recovery), and for DHCP the failed renewals and the seconds
until a lease came again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import shutil
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

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "src"))
sys.path.insert(0, str(BENCH))

import boot_storm as bs  # noqa: E402

from openimds.config import Settings, load_settings  # noqa: E402
from openimds.host.supervise import Supervisor, pid_alive  # noqa: E402
from openimds.node.up import (  # noqa: E402
    build_supervisor,
    ensure_secrets,
    stop_stray_proxy,
    supervised_overrides,
)
from openimds.registry.client import RegistryClient  # noqa: E402

KILLED = ("agent", "api", "registry", "proxy", "l3-agent", "dhcp-agent")
FAULTS = (*KILLED, "dnsmasq", "sqlite-lock", "postgresql")
RETRY_S = 1.0
GIVE_UP_S = 120.0
FAULT_AT_S = 2.0
PG_DB = "openimds_faults"
log = bs.log


@dataclass
class FaultResult:
    fault: str
    backend: str
    vms: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    wrong: int = 0
    wrong_samples: list[str] = field(default_factory=list)
    finished: int = 0
    requests: int = 0
    recover_s: float = 0.0
    last_error: float = 0.0
    acked: int = 0
    lost: int = 0
    dhcp_failures: int = 0
    dhcp_recover_s: float | None = None
    writes_refused: int = 0
    write_recover_s: float = 0.0
    restarted: str = ""

    def summary(self) -> dict[str, Any]:
        return {"fault": self.fault, "registry": self.backend, "vms": self.vms,
                "finished": self.finished, "requests": self.requests,
                "errors": dict(self.errors.most_common()),
                "error_total": sum(self.errors.values()), "wrong_answers": self.wrong,
                "wrong_samples": self.wrong_samples[:5],
                "recover_s": round(self.recover_s, 2), "writes_acked": self.acked,
                "writes_lost": self.lost, "writes_refused": self.writes_refused,
                "write_recover_s": round(self.write_recover_s, 2),
                "dhcp_failures": self.dhcp_failures,
                "dhcp_recover_s": None if self.dhcp_recover_s is None
                else round(self.dhcp_recover_s, 2), "restarted": self.restarted}


def normalised(path: str, body: bytes) -> bytes:
    """What must not change between two answers to one VM (meta_data.json carries a fresh
    random_seed each time, as Nova's does)."""
    if path.endswith("meta_data.json"):
        doc = json.loads(body)
        doc.pop("random_seed", None)
        return json.dumps(doc, sort_keys=True).encode()
    return body


def check(vm: bs.Vm, path: str, body: bytes, seen: dict[tuple[str, str], bytes]) -> str:
    """"" if the answer is this VM's, else why not."""
    try:
        if path.endswith("meta_data.json") and json.loads(body).get("uuid") != vm.instance_id:
            return f"{vm.name} {path}: uuid {json.loads(body).get('uuid')}"
        if path.endswith("local-ipv4") and body.decode() != vm.ip:
            return f"{vm.name} {path}: {body[:40]!r}"
        mine = normalised(path, body)
    except ValueError:
        return f"{vm.name} {path}: not JSON {body[:40]!r}"
    first = seen.setdefault((vm.instance_id, path), mine)
    return "" if first == mine else f"{vm.name} {path}: changed to {body[:60]!r}"


async def boot(vm: bs.Vm, result: FaultResult, until: float,
               seen: dict[tuple[str, str], bytes]) -> bool:
    """cloud-init's sequence with its retry, again and again until `until` (a VM that loops
    on its metadata); True if its last pass completed."""
    give_up = until + GIVE_UP_S
    while True:
        for path in bs.BOOT_SEQUENCE:
            while True:
                try:
                    status, body = await bs.one_request(vm, path, 10.0)
                except (OSError, TimeoutError) as exc:
                    status, body = 0, (type(exc).__name__ if not isinstance(exc, OSError)
                                       else os.strerror(exc.errno or 0) or repr(exc)).encode()
                result.requests += 1
                if status == 200:
                    wrong = check(vm, path, body, seen)
                    if wrong:
                        result.wrong += 1
                        result.wrong_samples.append(wrong)
                    break
                reason = body.decode(errors="replace").strip().split(":", 1)[-1].strip()[:40]
                reason = reason or "closed without an answer"
                result.errors[f"{status} {reason}" if status else reason] += 1
                result.last_error = max(result.last_error, time.monotonic())
                if time.monotonic() > give_up:
                    return False
                await asyncio.sleep(RETRY_S)
        if time.monotonic() >= until:
            return True
        await asyncio.sleep(0.05)


def renew_until_leased(vms: list[bs.Vm], result: FaultResult, t_fault: float,
                       deadline: float) -> None:
    """One DHCP exchange per VM, again until each got a lease (the address it should)."""
    from openimds.errors import OpenImdsError
    from openimds.lab.dhcp_client import acquire

    todo = list(vms)
    while todo and time.monotonic() < deadline and not bs.STOP.is_set():
        for vm in list(todo):
            try:
                lease = acquire(vm.namespace, timeout_s=10)
            except OpenImdsError:
                result.dhcp_failures += 1
                continue
            if lease.cidr.split("/")[0] != vm.ip:
                result.wrong += 1
                result.wrong_samples.append(f"{vm.name} DHCP: leased {lease.cidr}")
            todo.remove(vm)
    if not todo:
        result.dhcp_recover_s = time.monotonic() - t_fault


def hold_sqlite_lock(db: str, seconds: float, held: threading.Event) -> None:
    conn = sqlite3.connect(db, timeout=30, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    held.set()
    time.sleep(seconds)
    conn.execute("ROLLBACK")
    conn.close()


def writer(settings: Settings, network_id: str, stop: threading.Event,
           acked: list[str], refused: list[float], tag: str) -> None:
    """Create servers one after another (10 a second at most); remember each acknowledged
    (and when a create was refused)."""
    client = RegistryClient.from_settings(settings, admin=True)
    i = 0
    try:
        while not stop.is_set():
            try:
                inst = client.create_instance(f"w-{tag}-{i}", network_id)
                acked.append(str(inst["id"]))
                time.sleep(0.1)
            except Exception:  # refused or unreachable: not acknowledged, may be retried
                refused.append(time.monotonic())
                time.sleep(0.2)
            i += 1
    finally:
        client.close()


# --- a private PostgreSQL ---------------------------------------------------------------------

class Postgres:
    """A PostgreSQL of the bench's own (initdb in a temp dir, Unix socket only), so restarting
    it disturbs nobody else's database."""

    def __init__(self) -> None:
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not versions:
            raise SystemExit("PostgreSQL is not installed (scripts/setup installs it)")
        self.bin = versions[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="openimds-faults-pg-"))
        user = pwd.getpwnam("postgres")
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.data = self.dir / "data"
        self.port = 5499

    def _as_postgres(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                       capture_output=True, timeout=120)

    def init(self) -> str:
        self._as_postgres(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust",
                          "-U", "postgres")
        self.start()
        for sql in ("CREATE ROLE root SUPERUSER LOGIN", f"CREATE DATABASE {PG_DB} OWNER root"):
            self._as_postgres(str(self.bin / "psql"), "-h", str(self.dir), "-p",
                              str(self.port), "-d", "postgres", "-qc", sql)
        return f"postgresql+psycopg://root@/{PG_DB}?host={self.dir}&port={self.port}"

    def start(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                          str(self.dir / "log"), "-o",
                          f"-k {self.dir} -p {self.port} -c listen_addresses=''", "start")

    def crash_stop(self) -> None:
        self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                          "stop")

    def remove(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._as_postgres(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                              "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


# --- one fault --------------------------------------------------------------------------------

def dnsmasq_pids(settings: Settings) -> list[int]:
    pids = []
    for pid_file in Path(settings.dhcp.dhcp_confs).glob("*/pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text().strip())
            if pid_alive(pid):
                pids.append(pid)
    return pids


async def run_fault(fault: str, backend: str, sup: Supervisor, settings: Settings,
                    topo: bs.Topology, writer_net: str, duration_s: float,
                    pg: Postgres | None, pg_down_s: float = 2.0) -> FaultResult:
    # one VM per isolated network renews its lease (dnsmasq fault) and stays out of the
    # storm: udhcpc deconfigures the interface first, which is the probe's doing, not the
    # fault's
    probes = list({vm.network_id: vm for vm in topo.vms if vm.router_id is None}.values())
    storm = [vm for vm in topo.vms if vm not in probes]
    result = FaultResult(fault, backend, vms=len(storm))
    seen: dict[tuple[str, str], bytes] = {}
    stop = threading.Event()
    acked: list[str] = []
    refused: list[float] = []
    wthread = threading.Thread(target=writer, args=(settings, writer_net, stop, acked, refused,
                                                    fault))
    wthread.start()
    until = time.monotonic() + duration_s
    boots = [asyncio.ensure_future(boot(vm, result, until, seen)) for vm in storm]
    await asyncio.sleep(FAULT_AT_S)
    t_fault = time.monotonic()
    side: threading.Thread | None = None
    if fault == "sqlite-lock":
        db = settings.registry_connection.removeprefix("sqlite:///")
        held = threading.Event()
        side = threading.Thread(target=hold_sqlite_lock, args=(db, 10.0, held))
        side.start()
        held.wait(10)
    elif fault == "postgresql":
        assert pg is not None
        await asyncio.to_thread(pg.crash_stop)
        log("postgresql: stopped (immediate)")
        await asyncio.sleep(pg_down_s)
        await asyncio.to_thread(pg.start)
        log(f"postgresql: started again {time.monotonic() - t_fault:.1f} s after the stop")
    elif fault == "dnsmasq":
        pids = dnsmasq_pids(settings)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        log(f"dnsmasq: killed pids {pids}")
        result.restarted = f"{len(pids)} killed"
    else:
        old = sup.get(fault).pid
        assert old is not None
        os.kill(old, signal.SIGKILL)
        log(f"{fault}: killed pid {old}")
    renewer: threading.Thread | None = None
    if fault in ("dnsmasq", "dhcp-agent"):
        renewer = threading.Thread(target=renew_until_leased, args=(
            probes, result, t_fault, t_fault + 60))
        renewer.start()
    done = await asyncio.gather(*boots)
    for thread in (side, renewer):
        if thread is not None:
            await asyncio.to_thread(thread.join)
    stop.set()
    await asyncio.to_thread(wthread.join)
    if fault in KILLED:
        new = sup.get(fault).pid
        result.restarted = f"pid {new}" if new and new != old else "NOT restarted"
    elif fault == "dnsmasq":
        result.restarted += f", {len(dnsmasq_pids(settings))} running after"
    result.finished = sum(done)
    # from the fault to the last error any VM saw (0: none saw one)
    result.recover_s = max(0.0, result.last_error - t_fault) if result.last_error else 0.0
    result.acked = len(acked)
    result.writes_refused = len(refused)
    result.write_recover_s = max(0.0, refused[-1] - t_fault) if refused else 0.0
    client = RegistryClient.from_settings(settings, admin=True)
    have: set[str] = set()
    for _ in range(150):  # the registry may still be restarting
        try:
            have = {str(i["id"]) for i in client.list("instance")}
            break
        except Exception:
            await asyncio.sleep(0.2)
    client.close()
    result.lost = len([a for a in acked if a not in have])
    return result


async def settle(sup: Supervisor, topo: bs.Topology, settings: Settings) -> None:
    """Every child running and every network served before the next fault."""
    deadline = time.monotonic() + 60
    while not all(c.running for c in sup.children) or (
            len(dnsmasq_pids(settings)) < len(topo.routed_networks + topo.isolated_networks)):
        if time.monotonic() > deadline:
            raise SystemExit("not every child (or dnsmasq) came back within 60 s")
        await asyncio.sleep(0.2)
    await bs.wait_serving(topo, timeout_s=60)
    await asyncio.sleep(2)


async def run_pass(args: argparse.Namespace, backend: str, faults: list[str], state: Path,
                   topo: bs.Topology, pg: Postgres | None) -> list[dict[str, Any]]:
    config = state / "openimds.ini"
    connection = pg.init() if pg is not None else ""
    config.write_text(
        f"[DEFAULT]\nstate_path = {state}\nnova_metadata_host = 127.0.0.1\n"
        "enable_isolated_metadata = true\n\n[api]\nmetadata_listen = 127.0.0.1\n\n"
        "[registry]\nbind_host = 127.0.0.1\n"
        + (f"connection = {connection}\n" if connection else "")
        + (f"reuse_hold = {args.reuse_hold}\n" if args.reuse_hold is not None else ""))
    ensure_secrets(state)
    settings = load_settings(str(config))
    # the children see what `up` gives them (it supervises the proxy: agents spawn none)
    sup = build_supervisor(settings, str(config), supervised_overrides({}))
    out = []
    try:
        t0 = time.monotonic()
        await sup.start_all()
        log(f"[{backend}] services ready in {time.monotonic() - t0:.1f} s (state {state})")
        await asyncio.to_thread(bs.build_topology, settings, topo, args.vms, args.routers,
                                args.isolated)
        reg = bs.Registry(settings)
        wnet = reg.call("POST", "/v1/networks", {"name": "writer", "project_id": "writer"})
        reg.call("POST", "/v1/subnets", {"name": "writer", "network_id": wnet["id"],
                                         "cidr": "10.9.0.0/16", "enable_dhcp": False,
                                         "project_id": "writer"})
        reg.http.close()
        waited = await bs.wait_converged(settings, topo, 120 + args.vms / 5)
        log(f"[{backend}] {args.vms} servers, {args.routers} routers, {args.isolated} "
            f"isolated networks; agents converged {waited:.1f} s later")
        t0 = time.monotonic()
        await asyncio.to_thread(bs.plug_vms, settings, topo, 120, True)
        log(f"[{backend}] plugged {len(topo.vms)} VMs in {time.monotonic() - t0:.1f} s "
            "(isolated ones by DHCP)")
        await settle(sup, topo, settings)
        for fault in faults:
            log(f"[{backend}] fault {fault}: {len(topo.vms)} VMs loop for {args.duration} s")
            res = await run_fault(fault, backend, sup, settings, topo, str(wnet["id"]),
                                  args.duration, pg, args.pg_down)
            s = res.summary()
            out.append(s)
            log(f"[{backend}] fault {fault}: finished {s['finished']}/{s['vms']}, "
                f"{s['requests']} requests, errors {s['error_total']} {s['errors']}, wrong "
                f"{s['wrong_answers']} {s['wrong_samples'][:2]}, last error "
                f"{s['recover_s']} s after the fault, writes acked {s['writes_acked']} lost "
                f"{s['writes_lost']} refused {s['writes_refused']} (the last "
                f"{s['write_recover_s']} s after the fault), DHCP failures "
                f"{s['dhcp_failures']} lease again after "
                f"{s['dhcp_recover_s']} s, {s['restarted']}")
            await settle(sup, topo, settings)
    finally:
        bs.STOP.set()
        await sup.stop_all()
        await stop_stray_proxy(settings)  # as `up` does at its end
        bs.STOP.clear()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--vms", "-n", type=int, default=60)
    parser.add_argument("--routers", "-r", type=int, default=4)
    parser.add_argument("--isolated", "-i", type=int, default=2)
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--duration", type=float, default=12.0,
                        help="seconds each VM loops on its boot documents (the fault at 2 s)")
    parser.add_argument("--pg-down", type=float, default=2.0,
                        help="seconds PostgreSQL stays stopped in its fault")
    parser.add_argument("--reuse-hold", type=float, default=None,
                        help="[registry] reuse_hold (how long agents serve known VMs through "
                        "an outage); default: the setting's default")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    faults = [f for f in args.faults.split(",") if f]
    unknown = set(faults) - set(FAULTS)
    if unknown:
        parser.error(f"--faults: unknown {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    if os.geteuid() != 0:
        raise SystemExit("needs root (namespaces, bridges, nftables)")
    neigh = bs.raise_neigh_limits(4096)
    bs.enter_private_netns()
    bs.raise_nofile()
    for key in [k for k in os.environ if k.startswith("OPENIMDS_")]:
        del os.environ[key]
    os.environ["NO_PROXY"] = "*"
    passes = [("sqlite", [f for f in faults if f != "postgresql"])]
    if "postgresql" in faults:
        passes.append(("postgresql", ["postgresql"]))
    results: list[dict[str, Any]] = []
    left: list[str] = []  # namespaces of ours still there after the cleanup (must be none)
    try:
        for backend, pass_faults in passes:
            if not pass_faults:
                continue
            state = Path(tempfile.mkdtemp(prefix="openimds-faults-"))
            os.chmod(state, 0o755)  # noqa: S103  (dnsmasq drops to nobody)
            topo = bs.Topology()
            pg = Postgres() if backend == "postgresql" else None
            try:
                results += asyncio.run(run_pass(args, backend, pass_faults, state, topo, pg))
            finally:
                left += [ns for ns in bs.cleanup_namespaces(topo, state)
                         if os.path.exists(f"/run/netns/{ns}")]
                if pg is not None:
                    pg.remove()
                shutil.rmtree(state, ignore_errors=True)
    finally:
        bs.restore_neigh_limits(neigh)
    load = Path("/proc/loadavg").read_text().split()[:3]
    if args.json:
        Path(args.json).write_text(json.dumps({"vms": args.vms, "routers": args.routers,
                                               "isolated": args.isolated,
                                               "duration_s": args.duration,
                                               "loadavg_end": load, "faults": results,
                                               "namespaces_left": left},
                                              indent=2) + "\n")
    print(f"\n{'fault':<12} {'registry':<10} {'finished':>9} {'errors':>7} {'wrong':>6} "
          f"{'recover s':>10} {'acked':>6} {'lost':>5} {'dhcp fail':>9} {'lease s':>8}")
    for s in results:
        print(f"{s['fault']:<12} {s['registry']:<10} {s['finished']:>4}/{s['vms']:<4} "
              f"{s['error_total']:>7} {s['wrong_answers']:>6} {s['recover_s']:>10} "
              f"{s['writes_acked']:>6} {s['writes_lost']:>5} {s['dhcp_failures']:>9} "
              f"{s['dhcp_recover_s'] if s['dhcp_recover_s'] is not None else '-':>8}")
    print(f"load average at the end: {' '.join(load)}")
    if left:
        print(f"namespaces left behind: {left}")
    ok = not left and all(s["finished"] == s["vms"] and s["wrong_answers"] == 0
                          and s["writes_lost"] == 0 for s in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
