"""A lab cloud on one machine: nodes built as containers would be, one shared PostgreSQL.

Each node is its own PID, mount and network namespace (`unshare --pid --fork --mount-proc
--mount --net`, PID 1 = `lab/node_init.py`): its own /run/netns and /etc/netns, its own
processes, its own state_path (`<cluster>/nodes/<node>/state`) and config
(`<cluster>/nodes/<node>/openimds.ini`). Nodes meet on an underlay bridge `lab<name>` in the
namespace the command runs in (each node's `eth0`, MTU 1600 so 1500-byte networks fit in
VXLAN); the host side of the bridge holds `.254`, so the host's CLI reaches the registry.
Each node runs `openimds up --role <its role>`: the controller the registry (on PostgreSQL
over its Unix socket, which every node sees: a socket is a file, not a network address) and
the metadata API; network nodes the agent, proxy, L3 and DHCP agents; compute nodes the L2
agent (bridges and VXLAN for the VMs `vm plug` puts there). `[fabric] local_ip` is each
node's underlay address; `flood_peers` lists every non-controller node.

Everything the cluster makes is recorded in `<root>/<name>/cluster.json` before it is made,
so `destroy` removes exactly that (a half-built cluster included) and nothing else: node
processes (SIGKILL to each node's PID 1 kills its whole PID namespace; its network namespace,
and every namespace the node made, go with the last process), the bridge and veths, the
database (and PostgreSQL if this command started it), /etc/netns if it made it, its directory.

No orphans: a node dies with the command that boots it until that command hands it over
(`release`, once the node is ready; `lab cluster up` releases its nodes only when all are):
its PID 1 watches the command through a pidfd (lab/node_init.py). Each node's `unshare` is
recorded (pid and start time, as `up` records its children) the moment it is started, and
runs with --kill-child, so a node whose PID 1 was never recorded still dies with it. The
building command records itself too, and the cluster is marked complete only when every node
is ready: a `lab cluster up` killed half-way (even -9) leaves no process, and a record whose
builder is gone; the next `lab cluster up` of that name removes everything else it left
(links, database, directory; and any process still there: `clear_leftovers`) before it builds
anew, and `lab cluster down` removes it as any other. Inside a node, PID 1 supervises the
node's `openimds up`: killed -9 it starts again, and stops what its predecessor's children
left (up.children.json).
A node counts as ready only when the listener that answers belongs to a process of that node
(its PID 1's tree), never to another process on the address.

A node is "killed" as a crash would: SIGKILL to its PID 1. `start_node` boots it again on
the same state (like a reboot: the kernel state is gone, the disk is not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from openimds.config import Settings, load_settings
from openimds.errors import BadRequest, CommandFailed, Conflict, NotFound, OpenImdsError
from openimds.host import links
from openimds.host.run import run
from openimds.host.supervise import (
    Recorded,
    owns_tcp_listener,
    owns_unix_listener,
    pid_alive,
    proc_start_time,
)

log = logging.getLogger(__name__)

LAB_ROOT = Path("/run/openimds-lab")
CLUSTER_FILE = "cluster.json"
PG_SOCKET_DIR = "/var/run/postgresql"
UNDERLAY_MTU = 1600
REGISTRY_PORT = 9696
API_PORT = 8775
_NAME = re.compile(r"^[a-z][a-z0-9]{0,5}$")

class LabError(OpenImdsError):
    pass


@dataclass(slots=True)
class Node:
    name: str
    role: str
    ip: str
    veth: str  # the underlay veth's end in the cluster's namespace
    pid: int | None = None  # host PID of the node's PID 1
    start_time: int | None = None  # its start time, so a reused PID is never taken for it
    launcher: int | None = None  # host PID of its `unshare` (--kill-child: PID 1 dies with it)
    launcher_start: int | None = None

    def alive(self) -> bool:
        # a killed PID 1 stays a zombie until the host's init reaps it (its unshare parent
        # died with it): dead all the same, so `node start` right after `node kill` works
        return (self.pid is not None and proc_start_time(self.pid) == self.start_time
                and pid_alive(self.pid))

    def processes(self) -> list[Recorded]:
        """Its recorded processes that still run: PID 1 and the `unshare` above it."""
        out = [Recorded(f"{self.name} init", self.pid, self.start_time or 0)
               if self.pid else None,
               Recorded(f"{self.name} unshare", self.launcher, self.launcher_start or 0)
               if self.launcher else None]
        return [r for r in out if r is not None and r.alive()]


@dataclass(slots=True)
class Cluster:
    name: str
    root: str
    subnet: str
    bridge: str
    connection: str
    database: str = ""  # made by us (dropped at destroy); empty = given by the caller
    started_postgres: str = ""  # "VERSION" if we started PostgreSQL
    made_etc_netns: bool = False
    made_bridge: bool = False
    secrets: dict[str, str] = field(default_factory=dict)
    sets: list[str] = field(default_factory=list)  # section.key=value for every node
    nodes: list[Node] = field(default_factory=list)
    builder: int | None = None  # pid + start time of the `lab cluster up` building it
    builder_start: int | None = None
    complete: bool = False  # every node was ready once: the builder is done with it

    # --- paths and addresses
    @property
    def dir(self) -> Path:
        return Path(self.root)

    @property
    def prefixlen(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    @property
    def host_ip(self) -> str:
        return str(list(ipaddress.ip_network(self.subnet).hosts())[-1])

    @property
    def controller(self) -> Node:
        return next(n for n in self.nodes if n.role == "controller")

    @property
    def host_config(self) -> Path:
        return self.dir / "host.ini"

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise NotFound(f"lab cluster {self.name} has no node {name!r} "
                       f"(nodes: {', '.join(n.name for n in self.nodes)})")

    def node_dir(self, node: Node) -> Path:
        return self.dir / "nodes" / node.name

    def node_config(self, node: Node) -> Path:
        return self.node_dir(node) / "openimds.ini"

    # --- persistence
    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{CLUSTER_FILE}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(dataclasses.asdict(self), fh, indent=1)
        os.replace(tmp, self.dir / CLUSTER_FILE)

    @classmethod
    def load(cls, directory: Path) -> Cluster:
        try:
            raw = json.loads((directory / CLUSTER_FILE).read_text())
        except FileNotFoundError:
            raise NotFound(f"no lab cluster in {directory}") from None
        nodes = [Node(**n) for n in raw.pop("nodes")]
        return cls(**raw, nodes=nodes)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dir": self.root, "subnet": self.subnet,
                "bridge": self.bridge, "host_config": str(self.host_config),
                "registry": self.registry_url,
                "nodes": [{"name": n.name, "role": n.role, "ip": n.ip, "pid": n.pid,
                           "alive": n.alive()} for n in self.nodes]}

    @property
    def registry_url(self) -> str:
        return f"http://{self.controller.ip}:{REGISTRY_PORT}"


def cluster_dir(name: str, root: Path = LAB_ROOT) -> Path:
    if not _NAME.match(name):
        raise BadRequest(f"cluster name {name!r}: 1-6 lowercase letters/digits, a letter first")
    return root / name


def load(name: str, root: Path = LAB_ROOT) -> Cluster:
    return Cluster.load(cluster_dir(name, root))


# --- configs -----------------------------------------------------------------------------


def _write_ini(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> None:
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (list, tuple)):
                value = ",".join(str(v) for v in value)
            lines.append(f"{key} = {value}")
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds secrets
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines))


def _apply_sets(sections: dict[str, dict[str, Any]], sets: Iterable[str]) -> None:
    for pair in sets:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BadRequest(f"--set {pair!r}: expected [section.]key=value")
        section, dot, option = key.rpartition(".")
        sections.setdefault(section if dot else "DEFAULT", {})[option] = value


def common_sections(cluster: Cluster, state_path: Path) -> dict[str, dict[str, Any]]:
    """What every node's config and the host's share: where the registry and API are."""
    ctrl = cluster.controller.ip
    return {
        "DEFAULT": {"state_path": str(state_path),
                    "metadata_proxy_shared_secret": cluster.secrets["shared_secret"],
                    "nova_metadata_host": ctrl, "nova_metadata_port": API_PORT},
        "registry": {"url": cluster.registry_url,
                     "admin_token": cluster.secrets["admin_token"],
                     "reader_token": cluster.secrets["reader_token"]},
    }


def node_sections(cluster: Cluster, node: Node) -> dict[str, dict[str, Any]]:
    sections = common_sections(cluster, cluster.node_dir(node) / "state")
    sections["DEFAULT"]["host"] = node.name
    sections["DEFAULT"]["enable_isolated_metadata"] = True
    sections["registry"].update({"connection": cluster.connection, "bind_host": "0.0.0.0",
                                 "bind_port": REGISTRY_PORT})
    sections["api"] = {"metadata_listen": "0.0.0.0", "metadata_listen_port": API_PORT}
    sections["proxy"] = {"spawn_from_agents": False}  # the node runs its proxy itself
    if node.role != "controller":
        peers = [n.ip for n in cluster.nodes if n.role != "controller"]
        sections["fabric"] = {"local_ip": node.ip, "flood_peers": peers}
    _apply_sets(sections, cluster.sets)
    return sections


def write_configs(cluster: Cluster) -> None:
    """Every node's config and the host's (host.ini: state_path = the cluster's dir, so the
    host's `vm plug|exec` find the cluster), each checked by load_settings."""
    for node in cluster.nodes:
        path = cluster.node_config(node)
        _write_ini(path, node_sections(cluster, node))
        load_settings(str(path), environ={})
    host = common_sections(cluster, cluster.dir)
    _write_ini(cluster.host_config, host)
    load_settings(str(cluster.host_config), environ={})


# --- PostgreSQL ----------------------------------------------------------------------------


def _psql(sql: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["psql", "-h", PG_SOCKET_DIR, "-d", "postgres", "-qAtc", sql], check=check)


def _postgres_up() -> bool:
    try:
        return _psql("select 1", check=False).returncode == 0
    except CommandFailed:
        return False


def ensure_postgres() -> str:
    """PostgreSQL answering on its Unix socket; returns the version started ("" if it ran)."""
    if _postgres_up():
        return ""
    versions = sorted(Path("/usr/lib/postgresql").glob("*"), key=lambda p: p.name)
    if not versions:
        raise LabError("PostgreSQL is not installed (scripts/setup installs it)")
    version = versions[-1].name
    run(["pg_ctlcluster", version, "main", "start"], timeout_s=60)
    deadline = time.monotonic() + 30
    while not _postgres_up():
        if time.monotonic() > deadline:
            raise LabError(f"PostgreSQL {version} started but does not answer on "
                           f"{PG_SOCKET_DIR}")
        time.sleep(0.2)
    return version


# --- nodes -------------------------------------------------------------------------------


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _child_pid(parent: int) -> int | None:
    try:
        text = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    except OSError:
        return None
    return int(text[0]) if text else None


def enter_argv(node: Node, argv: Sequence[str]) -> list[str]:
    """argv run inside the node: its mount, network and PID namespaces (nsenter forks)."""
    if not node.alive():
        raise LabError(f"node {node.name} is not running (openimds lab node start "
                       f"{node.name})")
    return ["nsenter", "-t", str(node.pid), "-m", "-n", "-p", "--", *argv]


def netns_file(node: Node, namespace: str) -> str:
    """A namespace the node made (a VM's, a router's), as a file the host can setns into:
    /proc/<its PID 1>/root/run/netns/<name> (host/netns.socket_in_netns_file)."""
    if not node.alive():
        raise LabError(f"node {node.name} is not running")
    return f"/proc/{node.pid}/root/run/netns/{namespace}"


def _service_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENIMDS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _popen_logged(argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
                  pass_fds: Sequence[int] = ()) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                pass_fds=tuple(pass_fds))


def _release_file(cluster: Cluster, node: Node) -> Path:
    return cluster.node_dir(node) / "init.released"


def release(cluster: Cluster, node: Node) -> None:
    """Hand a booted node over: from now on it outlives the command that booted it."""
    _release_file(cluster, node).write_text(f"{os.getpid()}\n")


def _boot(cluster: Cluster, node: Node, command: Sequence[str]) -> None:
    """PID 1 of the node in fresh namespaces (supervising command), then its underlay leg."""
    nd = cluster.node_dir(node)
    (nd / "etc-netns").mkdir(parents=True, exist_ok=True)
    ready = nd / "init.ready"
    ready.unlink(missing_ok=True)
    _release_file(cluster, node).unlink(missing_ok=True)
    # the node watches this command (a pidfd) until `release`: killed before, it takes the
    # node down with it
    me = os.pidfd_open(os.getpid())
    try:
        unshare = _popen_logged(
            ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--mount", "--net",
             "--propagation", "private", "--", sys.executable, "-m", "openimds.lab.node_init",
             "--watch", str(me), str(_release_file(cluster, node)),
             str(nd / "etc-netns"), str(ready), str(nd / "log" / "up.log"), "--", *command],
            nd / "log" / "init.log", _service_env(), pass_fds=(me,))
    finally:
        os.close(me)
    # recorded before anything waits: a builder killed from here on leaves a findable node
    node.pid = node.start_time = None
    node.launcher, node.launcher_start = unshare.pid, proc_start_time(unshare.pid)
    cluster.save()
    _wait(ready.exists, 20, f"node {node.name} to boot (log {nd / 'log' / 'init.log'})")
    pid = _child_pid(unshare.pid)
    if pid is None:
        raise LabError(f"node {node.name}: its init is gone (log {nd / 'log' / 'init.log'})")
    node.pid, node.start_time = pid, proc_start_time(pid)
    cluster.save()
    with links.netlink() as nl:
        nl.delete_link(node.veth)  # a leftover of a crash would block the name
    run(["ip", "link", "add", node.veth, "mtu", str(UNDERLAY_MTU), "type", "veth",
         "peer", "name", "eth0", "netns", str(pid)])
    with links.netlink() as nl:
        nl.set_link(node.veth, master=cluster.bridge, mtu=UNDERLAY_MTU)
    inside = ["nsenter", "-t", str(pid), "-n", "--"]
    run([*inside, "ip", "addr", "add", f"{node.ip}/{cluster.prefixlen}", "dev", "eth0"])
    run([*inside, "ip", "link", "set", "eth0", "up"])


def _ready(cluster: Cluster, node: Node) -> None:
    """Wait until the node's services answer."""
    nd = cluster.node_dir(node)
    if node.role == "controller":
        url = f"{cluster.registry_url}/v1/health"

        def registry_up() -> bool:
            with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - our URL
                return bool(resp.status == 200)

        _wait(registry_up, 60, f"the registry on {node.name} ({nd / 'log' / 'registry.log'})")
        _wait(lambda: _owns_tcp(node, REGISTRY_PORT), 10,
              f"the registry on {node.ip}:{REGISTRY_PORT} to be node {node.name}'s")

        def api_up() -> bool:
            socket.create_connection((node.ip, API_PORT), timeout=1).close()
            return _owns_tcp(node, API_PORT)

        _wait(api_up, 60, f"the metadata API on {node.name} ({nd / 'log' / 'api.log'})")
    elif node.role == "network":
        sock_path = str(nd / "state" / "metadata_proxy")

        def agent_up() -> bool:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock_path)
            return node.pid is not None and owns_unix_listener(node.pid, sock_path)

        _wait(agent_up, 60, f"the metadata agent on {node.name} ({nd / 'log' / 'agent.log'})")


def _owns_tcp(node: Node, port: int) -> bool:
    """The listener on port in the node's network namespace is held by one of its processes
    (its PID 1's tree): the answer came from this node, not a leftover elsewhere."""
    return node.alive() and node.pid is not None and owns_tcp_listener(node.pid, port)


def start_node(cluster: Cluster, node: Node, *, wait: bool = True,
               hand_over: bool = True) -> None:
    """Boot a node and start its role's services (a reboot on the same state). The node dies
    with this process until it is handed over (`release`): at the end unless hand_over is
    False (the caller releases it later)."""
    if node.alive():
        raise Conflict(f"node {node.name} is already running (pid {node.pid})")
    # One supervised tree per node, as on a real machine: its PID 1 runs `up` (and starts it
    # again if it dies), `up` its role's services (respawns, heartbeats; each logs to
    # <state>/log/<service>.log).
    _boot(cluster, node, [sys.executable, "-m", "openimds", "--config",
                          str(cluster.node_config(node)), "up", "--role", node.role])
    if wait:
        _ready(cluster, node)
    if hand_over:
        release(cluster, node)
    log.info("lab.node_started cluster=%s node=%s pid=%s", cluster.name, node.name, node.pid)


def kill_node(cluster: Cluster, node: Node, timeout: float = 15.0) -> float | None:
    """SIGKILL the node's PID 1 (the kernel kills every process of its PID namespace), then
    wait until its network namespace is gone. Returns the wall-clock time of the SIGKILL
    (what failover is measured from), None if the node was not running."""
    running = node.processes()
    if not running:
        return None
    killed_at = time.time()
    for proc in running:  # PID 1 first: its unshare (and the namespace) go with it
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)

    def gone() -> bool:
        if any(p.alive() for p in running):
            return False
        with links.netlink() as nl:
            return nl.link(node.veth) is None  # its peer went with the node's netns

    _wait(gone, timeout, f"node {node.name} to die")
    log.info("lab.node_killed cluster=%s node=%s pid=%s", cluster.name, node.name, node.pid)
    return killed_at


# --- the cluster ---------------------------------------------------------------------------


def plan_nodes(name: str, subnet: str, network_nodes: int, compute_nodes: int) -> list[Node]:
    """controller, network-1..N, compute-1..M on the subnet's first addresses."""
    if network_nodes < 0 or compute_nodes < 0:
        raise BadRequest("--network-nodes and --compute-nodes must be 0 or more")
    net = ipaddress.ip_network(subnet, strict=True)
    hosts = list(net.hosts())
    wanted = [("controller", "controller")]
    wanted += [(f"network-{i}", "network") for i in range(1, network_nodes + 1)]
    wanted += [(f"compute-{i}", "compute") for i in range(1, compute_nodes + 1)]
    if len(wanted) + 1 > len(hosts):
        raise BadRequest(f"--subnet {subnet}: too small for {len(wanted)} nodes and the host")
    return [Node(node, role, str(hosts[i]), f"{name}n{i}") for i, (node, role) in
            enumerate(wanted)]


def create(
    name: str, *, network_nodes: int, compute_nodes: int, subnet: str = "10.250.0.0/24",
    connection: str = "", sets: Sequence[str] = (), root: Path = LAB_ROOT,
) -> Cluster:
    """Build and start a cluster. On any failure everything made so far is removed; what a
    killed earlier build of the same name left is removed first (`clear_leftovers`)."""
    directory = cluster_dir(name, root)
    removed = clear_leftovers(name, root)
    if removed:
        log.warning("lab.leftovers_removed cluster=%s removed=%s", name, "; ".join(removed))
    if (directory / CLUSTER_FILE).exists():
        other = load(name, root)
        building = "" if other.complete or other.builder is None else \
            f", being built by pid {other.builder}"
        raise Conflict(f"lab cluster {name} exists ({directory}{building}); "
                       f"`openimds lab cluster down --name {name}` first")
    try:
        ipaddress.ip_network(subnet, strict=True)
    except ValueError as exc:
        raise BadRequest(f"--subnet {subnet!r}: {exc}") from None
    cluster = Cluster(
        name=name, root=str(directory), subnet=subnet, bridge=f"lab{name}",
        connection=connection, sets=list(sets),
        secrets={"shared_secret": secrets.token_urlsafe(24),
                 "admin_token": "admin-" + secrets.token_urlsafe(16),
                 "reader_token": "reader-" + secrets.token_urlsafe(16)},
        nodes=plan_nodes(name, subnet, network_nodes, compute_nodes),
        builder=os.getpid(), builder_start=proc_start_time(os.getpid()),
    )
    cluster.save()
    try:
        write_configs(cluster)  # bad --set values stop us before anything runs
        if not Path("/etc/netns").exists():
            Path("/etc/netns").mkdir(parents=True)
            cluster.made_etc_netns = True
        if not connection:
            cluster.started_postgres = ensure_postgres()
            cluster.save()
            cluster.database = f"openimds_lab_{name}"
            cluster.connection = (f"postgresql+psycopg://root@/{cluster.database}"
                                  f"?host={PG_SOCKET_DIR}")
            cluster.save()
            _psql(f'DROP DATABASE IF EXISTS "{cluster.database}" WITH (FORCE)')
            _psql(f'CREATE DATABASE "{cluster.database}"')
            write_configs(cluster)
        with links.netlink() as nl:
            cluster.made_bridge = nl.link(cluster.bridge) is None
            cluster.save()
            nl.ensure_bridge(cluster.bridge, mtu=UNDERLAY_MTU)
            nl.set_addresses(cluster.bridge, [f"{cluster.host_ip}/{cluster.prefixlen}"])
        start_node(cluster, cluster.controller, hand_over=False)
        for node in cluster.nodes:
            if node.role != "controller":
                start_node(cluster, node, wait=False, hand_over=False)
        for node in cluster.nodes:
            _ready(cluster, node)
        cluster.complete = True
        cluster.save()
        for node in cluster.nodes:  # from now on the nodes outlive this command
            release(cluster, node)
    except BaseException:
        with contextlib.suppress(Exception):
            destroy(cluster)
        raise
    return cluster


def clear_leftovers(name: str, root: Path = LAB_ROOT) -> list[str]:
    """Remove what a `lab cluster up` of this name left when it was killed before the cluster
    was complete (its builder is gone); [] when there is no such cluster, or it is complete,
    or its builder still runs. Returns what was removed."""
    try:
        cluster = load(name, root)
    except (NotFound, ValueError, TypeError, KeyError):
        return []
    if cluster.complete or cluster.builder is None:  # None: recorded before builders were
        return []
    if Recorded("builder", cluster.builder, cluster.builder_start or 0).alive():
        return []
    return destroy(cluster)


def destroy(cluster: Cluster) -> list[str]:
    """Remove everything the cluster made; returns what was removed, for the operator."""
    removed: list[str] = []
    for node in cluster.nodes:
        with contextlib.suppress(LabError):
            if kill_node(cluster, node) is not None:
                removed.append(f"node {node.name}")
    with links.netlink() as nl:
        for node in cluster.nodes:
            if nl.delete_link(node.veth):
                removed.append(f"link {node.veth}")
        if cluster.made_bridge and nl.delete_link(cluster.bridge):
            removed.append(f"bridge {cluster.bridge}")
    if cluster.database:
        _psql(f'DROP DATABASE IF EXISTS "{cluster.database}" WITH (FORCE)', check=False)
        removed.append(f"database {cluster.database}")
    if cluster.started_postgres:
        run(["pg_ctlcluster", cluster.started_postgres, "main", "stop"], check=False,
            timeout_s=60)
        removed.append(f"PostgreSQL {cluster.started_postgres} (this cluster started it)")
    if cluster.made_etc_netns:
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty: someone else may use it by now
    shutil.rmtree(cluster.dir, ignore_errors=True)
    removed.append(f"directory {cluster.dir}")
    return removed


# --- from the host: where a server's VM lives ------------------------------------------------


def cluster_of(settings: Settings) -> Cluster | None:
    """The lab cluster whose host.ini these settings come from (state_path = its dir)."""
    path = Path(settings.state_path)
    if not (path / CLUSTER_FILE).exists():
        return None
    return Cluster.load(path)


def node_of(settings: Settings, host: str | None) -> tuple[Cluster, Node] | None:
    """(cluster, node) if the settings are a cluster's host.ini and host names one of its
    nodes; None otherwise (then a VM is plugged on this host, as without a cluster)."""
    cluster = cluster_of(settings)
    if cluster is None or not host:
        return None
    return cluster, cluster.node(host)
