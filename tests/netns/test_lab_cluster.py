"""The lab cluster with real processes, namespaces, VXLAN and PostgreSQL (`openimds lab ...`).

Nodes are PID + mount + network namespaces on an underlay bridge; the controller's registry
runs on a fresh PostgreSQL database. Every command goes through the operator's CLI; the
fixture runs `lab cluster down` whatever happened, then checks that nothing is left (and
kills by PID whatever would be).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openimds.config import load_settings
from openimds.host import links
from openimds.host.netns import socket_in_netns_file
from openimds.host.supervise import (
    owns_tcp_listener,
    pid_alive,
    proc_start_time,
    process_tree,
)
from openimds.registry.client import RegistryClient
from tests import reaper
from tests.support import PG_SOCKET_DIR, PYTHON, clean_env

pytestmark = [pytest.mark.netns, pytest.mark.postgres]

LAB_ROOT = Path("/run/openimds-lab")
# where build_tenants places each server (`server create --host`)
HOSTS = {"a1": "compute-1", "a2": "compute-2", "b1": "compute-1", "b2": "compute-2",
         "i2": "compute-2"}


def lab(*args: str, check: bool = True, timeout: float = 120,
        config: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [PYTHON, "-m", "openimds"] + (["--config", str(config)] if config else []) + [*args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env=clean_env(), stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"openimds {' '.join(args)} exited {proc.returncode}\n"
                             f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


class Lab:
    def __init__(self, name: str) -> None:
        self.name = name
        self.dir = LAB_ROOT / name
        self.host = self.dir / "host.ini"
        self.old_nodes: list[dict[str, Any]] = []  # of an earlier build: the safety net's too

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return lab(*args, check=check, config=self.host)

    def client(self) -> RegistryClient:
        return RegistryClient.from_settings(load_settings(str(self.host), environ={}),
                                            admin=True)

    def spawn(self, *args: str) -> subprocess.Popen[str]:
        return reaper.spawn([PYTHON, "-m", "openimds", "--config", str(self.host), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=clean_env(), stdin=subprocess.DEVNULL)

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-f", "json").stdout)

    def node(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return lab("lab", "node", *args[:1], "--name", self.name, *args[1:], check=check)

    def nodes(self) -> dict[str, dict[str, Any]]:
        out = json.loads(lab("lab", "node", "list", "--name", self.name, "-f", "json").stdout)
        return {n["name"]: n for n in out}

    def metadata(self, server: str, timeout: float = 5) -> dict[str, Any] | None:
        out = self.cli("vm", "exec", server, "--", "curl", "-s", "-m", str(timeout),
                       "http://169.254.169.254/openstack/latest/meta_data.json", check=False)
        if out.returncode != 0:
            return None
        try:
            doc = json.loads(out.stdout)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def recorded(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "cluster.json").read_text())
        except OSError:
            return {}


def probe(ns_file: str, server_id: str, timeout: float = 1.0) -> bool:
    """Whether the VM whose namespace file this is gets its own meta_data.json now: one
    HTTP request from a socket made inside its namespace (no process, so it measures the
    datapath, not a loaded machine's process start-up)."""
    try:
        sock = socket_in_netns_file(ns_file, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return False
    try:
        sock.settimeout(timeout)
        sock.connect(("169.254.169.254", 80))
        sock.sendall(b"GET /openstack/latest/meta_data.json HTTP/1.1\r\n"
                     b"Host: 169.254.169.254\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    except OSError:
        return False
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return False
    try:
        return bool(json.loads(body)["uuid"] == server_id)
    except (ValueError, KeyError, TypeError):
        return False


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def databases() -> set[str]:
    out = subprocess.run(["psql", "-h", PG_SOCKET_DIR, "-d", "postgres", "-qAtc",
                          "select datname from pg_database"], capture_output=True, text=True,
                         check=True)
    return set(out.stdout.split())


@pytest.fixture
def make_lab(request: pytest.FixtureRequest) -> Iterator[Callable[..., Lab]]:
    made: list[tuple[Lab, dict[str, Any]]] = []

    def make(*extra: str, start: bool = True) -> Lab:
        """A cluster `lab cluster up` built (start=False: only named, the test builds it);
        removed by `lab cluster down` at the end, whatever happened."""
        name = "t" + uuid.uuid4().hex[:5]
        cluster = Lab(name)
        made.append((cluster, {}))
        if start:
            lab("lab", "cluster", "up", "--name", name, *extra, timeout=180)
            made[-1] = (cluster, cluster.recorded())
        return cluster

    yield make
    for cluster, recorded in made:
        recorded = cluster.recorded() or recorded
        if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
            for log in sorted(cluster.dir.glob("nodes/*/log/*.log")) + sorted(
                    cluster.dir.glob("nodes/*/state/log/*.log")):
                print(f"----- {log.relative_to(cluster.dir)} (tail) -----")
                print(log.read_text(errors="replace")[-2500:])
        down = lab("lab", "cluster", "down", "--name", cluster.name, check=False)
        # the safety net: whatever down missed is killed/deleted here, and the test fails
        leftovers = []
        for node in recorded.get("nodes", []) + cluster.old_nodes:
            for pid, start in ((node.get("pid"), node.get("start_time")),
                               (node.get("launcher"), node.get("launcher_start"))):
                # a zombie is no leftover: our PID 1 may reap an orphan's late
                if pid and proc_start_time(pid) == start and pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)
                    leftovers.append(f"node {node['name']} pid {pid}")
        with links.netlink() as nl:
            for name in [n["veth"] for n in recorded.get("nodes", [])] + [f"lab{cluster.name}"]:
                if nl.delete_link(name):
                    leftovers.append(f"link {name}")
        if recorded.get("database") and recorded["database"] in databases():
            leftovers.append(f"database {recorded['database']}")
        if cluster.dir.exists():
            leftovers.append(str(cluster.dir))
        assert down.returncode == 0, down.stderr
        assert not leftovers, f"lab cluster down left {leftovers}"


def build_tenants(c: Lab) -> dict[str, str]:
    """Two tenants with the same 10.0.0.0/24 behind their own routers, one isolated network,
    and VMs on compute-1 and compute-2 (plugged by `vm plug` from the host, in parallel).
    Returns server name -> id."""
    api = c.client()
    try:
        nets = {}
        for t in ("a", "b"):
            net = api.create("network", {"name": f"net-{t}", "project_id": f"tenant-{t}"})
            sub = api.create("subnet", {"name": f"sub-{t}", "network_id": net["id"],
                                        "cidr": "10.0.0.0/24"})
            router = api.create("router", {"name": f"r-{t}", "project_id": f"tenant-{t}"})
            api.add_interface(router["id"], sub["id"])
            nets[f"net-{t}"] = net["id"]
        iso = api.create("network", {"name": "net-iso", "project_id": "tenant-a"})
        api.create("subnet", {"name": "sub-iso", "network_id": iso["id"],
                              "cidr": "10.1.0.0/24"})
        nets["net-iso"] = iso["id"]
        servers = {}
        for name, net in (("a1", "net-a"), ("a2", "net-a"), ("b1", "net-b"),
                          ("b2", "net-b"), ("i2", "net-iso")):
            host = HOSTS[name]
            server = api.create("instance", {"name": name, "network_id": nets[net],
                                             "host": host})
            servers[name] = server["id"]
    finally:
        api.close()
    plugs = [c.spawn("vm", "plug", sid, *(["--dhcp"] if name == "i2" else []))
             for name, sid in servers.items()]
    for proc in plugs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
    return servers


def test_lab_cluster_bad_input_is_named_and_leaves_nothing():
    bad = lab("lab", "cluster", "up", "--name", "Bad_Name", check=False)
    assert bad.returncode != 0 and "Bad_Name" in bad.stderr
    name = "t" + uuid.uuid4().hex[:5]
    bad = lab("lab", "cluster", "up", "--name", name, "--set", "fabric.vxlan_port=0",
              check=False)
    assert bad.returncode != 0 and "vxlan_port" in bad.stderr
    assert not (LAB_ROOT / name).exists()
    missing = lab("lab", "node", "kill", "--name", name, "network-1", check=False)
    assert missing.returncode != 0 and name in missing.stderr


def up_of(init_pid: int) -> int | None:
    """The node's `openimds up` (a child of its PID 1), host PID."""
    for pid in process_tree(init_pid)[1:]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"up" in argv and b"--role" in argv:
            return pid
    return None


def test_lab_killed_minus_9_leaves_nothing_the_next_up_removes_and_a_node_up_respawns(
        make_lab):
    """kill -9 of `lab cluster up` while it builds: the node it was building dies with it
    (not handed over yet), and the next `lab cluster up` of that name removes the rest (its
    database, links, directory) and builds anew, ready meaning its own node's listener; the
    new cluster outlives its `up`; kill -9 of a node's `openimds up`: its children die with
    it, the node's PID 1 starts it again, the registry comes back as the new `up`'s child."""
    c = make_lab(start=False)
    args = ("lab", "cluster", "up", "--name", c.name, "--network-nodes", "0",
            "--compute-nodes", "0")
    first = reaper.spawn([PYTHON, "-m", "openimds", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=clean_env(),
                         stdin=subprocess.DEVNULL)
    try:
        # half-way: the controller is booted and its `up` runs, the build is not complete
        node = wait_for(lambda: next((n for n in c.recorded().get("nodes", [])
                                      if n.get("pid") and up_of(n["pid"])), None), 60,
                        "the controller's `up` to run")
        assert not c.recorded()["complete"]
    finally:
        first.kill()
        first.communicate(timeout=10)
    old = [(node["pid"], node["start_time"]), (node["launcher"], node["launcher_start"])]
    c.old_nodes.append(node)
    # not handed over yet: the node's PID 1 sees its booter die and takes the node down
    wait_for(lambda: not any(proc_start_time(pid) == start and pid_alive(pid)
                             for pid, start in old), 15, "the half-built node to die")
    assert c.recorded()["nodes"][0]["pid"] == node["pid"]  # the record stays for the next up

    again = lab(*args, timeout=180)
    assert "removed what a killed" in again.stderr and "database" in again.stderr
    rec = c.recorded()
    assert rec["complete"] and rec["builder"] != first.pid
    ctrl = rec["nodes"][0]
    assert ctrl["pid"] != node["pid"] and owns_tcp_listener(ctrl["pid"], 9696)

    # the node's supervisor killed -9: its children die with it, PID 1 starts it again
    up_pid = up_of(ctrl["pid"])
    assert up_pid is not None
    children = process_tree(up_pid)[1:]
    assert children
    starts = {p: proc_start_time(p) for p in children}
    os.kill(up_pid, signal.SIGKILL)
    wait_for(lambda: not any(proc_start_time(p) == t and pid_alive(p)
                             for p, t in starts.items()), 30,
             "the killed `up`'s children to die with it")
    wait_for(lambda: (up_of(ctrl["pid"]) or up_pid) != up_pid, 30,
             "the node's PID 1 to start `up` again")
    new_up = up_of(ctrl["pid"])
    assert new_up is not None
    wait_for(lambda: owns_tcp_listener(new_up, 9696), 60,
             "the registry again, as the new `up`'s child")
    api = c.client()
    assert api.list("network") == []
    api.close()


DOWN_TIME = 6.0  # [DEFAULT] agent_down_time for the failover test (default 10 s)


def metadata_of_all(c: Lab, servers: dict[str, str], timeout: float = 1) -> dict[str, bool]:
    """name -> whether that VM got its own meta_data.json now."""
    pids = {n: v["pid"] for n, v in c.nodes().items()}
    return {name: probe(f"/proc/{pids[HOSTS[name]]}/root/run/netns/vm-{sid[:8]}", sid,
                        timeout) for name, sid in servers.items()}


class Probers:
    """One thread per VM probing its metadata every 0.1 s (0.5 s timeout), recording
    (wall time, ok): failover is read from these, not from a round of slow commands."""

    def __init__(self, c: Lab, servers: dict[str, str]) -> None:
        pids = {n: v["pid"] for n, v in c.nodes().items()}
        self.files = {name: (f"/proc/{pids[HOSTS[name]]}/root/run/netns/vm-{sid[:8]}", sid)
                      for name, sid in servers.items()}
        self.events: dict[str, list[tuple[float, bool]]] = {n: [] for n in servers}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True)
                        for n in servers]

    def _run(self, name: str) -> None:
        ns_file, sid = self.files[name]
        while not self.stop.is_set():
            self.events[name].append((time.time(), probe(ns_file, sid, 0.5)))
            time.sleep(0.1)

    def __enter__(self) -> Probers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)

    def recovered_after(self, t0: float) -> dict[str, float]:
        """name -> seconds from t0 until its first success after its last failure (0 if it
        never failed after t0); VMs still failing at the end are missing."""
        out = {}
        for name, events in self.events.items():
            after = [(t, ok) for t, ok in events if t >= t0]
            failures = [t for t, ok in after if not ok]
            if not failures:
                out[name] = 0.0
                continue
            ok_later = [t for t, ok in after if ok and t > failures[-1]]
            if ok_later:
                out[name] = ok_later[0] - t0
        return out

    def flaps_after(self, t0: float) -> dict[str, int]:
        """name -> failed probes after t0."""
        return {n: sum(1 for t, ok in ev if t >= t0 and not ok) for n, ev in self.events.items()}


def hosts_alive(c: Lab) -> dict[str, bool]:
    return {h["name"]: h["alive"] for h in c.json("host", "list")}


def placement(c: Lab) -> dict[str, list[str]]:
    api = c.client()
    try:
        return {r["name"]: r["hosts"] for r in api.list("router")} | {
            n["name"]: n["hosts"] for n in api.list("network")}
    finally:
        api.close()


def test_cluster_of_2_network_and_2_compute_nodes_routes_isolates_and_fails_over(make_lab):
    """The issue's "done means": two tenants with the same subnet, routers on different
    network nodes, VMs on both compute nodes (routed and isolated) over VXLAN; kill -9 of a
    network node -> every VM's own metadata again within agent_down_time + 5 s and the node
    shown dead; its restart -> nothing flaps; a compute node's crash and restart."""
    c = make_lab("--network-nodes", "2", "--compute-nodes", "2",
                 "--set", f"agent_down_time={DOWN_TIME}", "--set", "AGENT.report_interval=0.5")
    nodes = c.nodes()
    assert {n: v["role"] for n, v in nodes.items()} == {
        "controller": "controller", "network-1": "network", "network-2": "network",
        "compute-1": "compute", "compute-2": "compute"}
    assert all(v["alive"] for v in nodes.values())
    wait_for(lambda: {"network-1", "network-2"} <= {
        h["name"] for h in c.json("host", "list")
        if {"l3", "dhcp"} <= {a["type"] for a in h["agents"] if a["alive"]}}, 60,
        "both network nodes' L3 and DHCP agents to heartbeat")
    servers = build_tenants(c)
    doc = wait_for(lambda: c.metadata("b2"), 60, "b2's metadata through `vm exec`")
    assert doc["uuid"] == servers["b2"] and doc["name"] == "b2"
    # the namespaces are the nodes' own: VMs on their compute node, none on the host
    compute1_ns = c.node("exec", "compute-1", "--", "ip", "netns", "list").stdout
    assert f"vm-{servers['a1'][:8]}" in compute1_ns and "qrouter-" not in compute1_ns
    assert f"vm-{servers['a2'][:8]}" not in compute1_ns
    routers = [r["id"] for r in c.json("router", "list")]
    assert len(routers) == 2
    assert not any(links.namespace_exists(f"qrouter-{r}") for r in routers)
    # the tunnel: the VM's network has a vxlan device on its compute node
    vxlans = c.node("exec", "compute-1", "--", "ip", "-o", "-d", "link", "show",
                    "type", "vxlan").stdout
    assert "vxlan id" in vxlans and "local 10.250.0.4" in vxlans
    # each node has its own processes: the registry runs only on the controller
    ps_net = c.node("exec", "network-1", "--", "ps", "-eo", "args").stdout
    assert "l3-agent" in ps_net and "registry serve" not in ps_net
    where = placement(c)
    # routers on exactly one node each, and not the same one (least loaded first)
    assert len(where["r-a"]) == 1 and len(where["r-b"]) == 1
    assert where["r-a"] != where["r-b"], where
    assert {where["r-a"][0], where["r-b"][0]} == {"network-1", "network-2"}
    wait_for(lambda: all(metadata_of_all(c, servers).values()), 60, "every VM's metadata")
    # each router's namespace exists on its own node only
    for router, node in (("r-a", where["r-a"][0]), ("r-b", where["r-b"][0])):
        other = "network-2" if node == "network-1" else "network-1"
        rid = next(r["id"] for r in c.json("router", "list") if r["name"] == router)
        assert f"qrouter-{rid}" in c.node("exec", node, "--", "ip", "netns", "list").stdout
        assert f"qrouter-{rid}" not in c.node("exec", other, "--", "ip", "netns",
                                              "list").stdout

    victim = where["r-a"][0]
    with Probers(c, servers) as probers:
        time.sleep(1)
        t0 = json.loads(c.node("kill", victim, "-f", "json").stdout)["killed_at"]  # SIGKILL
        wait_for(lambda: len(probers.recovered_after(t0)) == len(servers)
                 and time.time() - t0 > DOWN_TIME, DOWN_TIME + 30,
                 "every VM's own metadata after the kill")
        back = probers.recovered_after(t0)
        worst = max(back.values())
        print(f"failover: every VM has its own metadata {worst:.1f} s after kill -9 of "
              f"{victim} (agent_down_time {DOWN_TIME} s): {back}")
        assert worst <= DOWN_TIME + 5, back
        assert back["b1"] == back["b2"] == 0.0, back  # the other router never stopped
        assert hosts_alive(c)[victim] is False
        moved = placement(c)
        assert moved["r-a"] != [victim] and len(moved["r-a"]) == 1

        # the node comes back: it heartbeats again, takes nothing back, nothing flaps
        c.node("start", victim)
        wait_for(lambda: hosts_alive(c).get(victim), 30, f"{victim} alive again")
        t_back = time.time()
        time.sleep(3)
        assert placement(c) == moved
        assert probers.flaps_after(t_back) == {n: 0 for n in servers}

    # a compute node crash takes its VMs; plugged again after its restart they answer
    c.node("kill", "compute-2")
    c.node("start", "compute-2")
    c.cli("vm", "plug", "a2")
    wait_for(lambda: metadata_of_all(c, {"a2": servers["a2"]})["a2"], 30,
             "metadata in a2 after its node's restart")
    assert metadata_of_all(c, {"a1": servers["a1"]})["a1"]  # untouched meanwhile
