"""Two network nodes on one machine against one registry: placement, failover, no steal-back.

Each node is a private mount namespace (its own /run/netns, so its qrouter-/qdhcp-
namespaces are its own, as on separate machines) running its own metadata agent, proxy, L3
and DHCP agent with its own `[DEFAULT] host` and state_path. The nodes share this test's
network namespace, so the networks' bridges are one L2 segment that both nodes' router legs
and the lab VMs plug into (what VXLAN gives separate machines). Killing a node kills every
process in its mount namespace, which takes its namespaces and legs with it, as a crash does.
"""

from __future__ import annotations

import contextlib
import copy
import ipaddress
import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openimds.agents import fabric
from openimds.agents.l3 import RouterDriver
from openimds.core.names import bridge_name, dhcp_namespace, router_namespace
from openimds.core.nodes import gratuitous_arp
from openimds.host import links
from tests import reaper
from tests.netns.conftest import Stack
from tests.netns.test_fabric_l3 import Topo, cleanup, leg_state, make_settings, track
from tests.support import PYTHON, Service, cli_json, unix_ready, write_config

pytestmark = pytest.mark.netns
__all__ = ["cleanup"]  # the fixture, imported from test_fabric_l3

DOWN_S = 4.0
MD_URL = "http://169.254.169.254/openstack/latest/meta_data.json"


def _mnt_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


class Node:
    """One network node: a mount-namespace holder and the node's services inside it."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.name = name
        self.root = stack.root / name
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = copy.deepcopy(stack.cfg)
        cfg["DEFAULT"].update(state_path=str(self.root / "state"), host=name)
        cfg.setdefault("proxy", {})["spawn_from_agents"] = "false"
        cfg.setdefault("dhcp", {})["dnsmasq_user"] = "root"  # pytest's tmp dirs are 0700
        cfg["metrics"] = {"enabled": "false"}  # one port per service, but two nodes
        self.config = write_config(self.root / "openimds.ini", cfg)
        self.socket = self.root / "state" / "metadata_proxy"
        self.holder: subprocess.Popen[bytes] | None = None
        self.services: list[Service] = []

    def start(self) -> Node:
        self.holder = reaper.spawn(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             "mount -t tmpfs -o mode=0755 node-netns /run/netns && exec sleep 100000"])
        deadline = time.monotonic() + 10
        while b"sleep" not in Path(f"/proc/{self.holder.pid}/cmdline").read_bytes():
            assert time.monotonic() < deadline, "mount namespace holder did not start"
            time.sleep(0.02)
        for command, ready in (("agent", unix_ready(self.socket)), ("proxy", self._proxy_up),
                               ("l3-agent", None), ("dhcp-agent", None)):
            svc = Service(f"{self.name}-{command}", [
                "nsenter", "-t", str(self.holder.pid), "-m", "--",
                PYTHON, "-m", "openimds", "--config", str(self.config), command],
                self.root)
            self.services.append(svc)
            svc.start()
            if ready is not None:
                svc.wait_until(ready, 30)
        return self

    def _proxy_up(self) -> bool:
        return (self.root / "state" / "proxy" / "proxy.pid").exists()

    def pids(self) -> list[int]:
        """Every process of this node: the ones in its mount namespace, and the ones in its
        qdhcp-/qrouter- namespaces (dnsmasq runs under `ip netns exec`, which gives it a
        mount namespace of its own)."""
        if self.holder is None:
            return []
        ours = _mnt_inode(self.holder.pid)
        if ours is None:
            return []
        found = {int(p) for p in os.listdir("/proc")
                 if p.isdigit() and int(p) != os.getpid() and _mnt_inode(int(p)) == ours}
        for ns in self.namespaces():
            out = subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "--", "ip",
                                  "netns", "pids", ns], capture_output=True, text=True)
            found |= {int(p) for p in out.stdout.split() if p.isdigit()}
        return sorted(found - {os.getpid()})

    def kill(self) -> None:
        """kill -9 every process of the node, as a crash would."""
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for svc in self.services:
            if svc.proc is not None:
                svc.proc.wait(10)
        if self.holder is not None:
            self.holder.wait(10)
        self.services, self.holder = [], None

    def stop(self) -> None:
        try:
            for svc in reversed(self.services):
                svc.stop(timeout=20)
        finally:
            self.kill()  # whatever is left, dnsmasq in its namespaces included

    def namespaces(self) -> set[str]:
        if self.holder is None:
            return set()
        out = subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "--", "ip",
                              "netns", "list"], capture_output=True, text=True, check=True)
        return {line.split()[0] for line in out.stdout.splitlines() if line.strip()}

    def log(self, command: str) -> str:
        path = self.root / f"{self.name}-{command}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def two_network_nodes(make_stack: Callable[..., Stack], **defaults: Any
                      ) -> Iterator[tuple[Stack, dict[str, Node]]]:
    """A controller (registry + API) and network nodes net-a and net-b, stopped after."""
    stack = make_stack(services=["registry", "api"], overrides={
        "DEFAULT": {"agent_down_time": DOWN_S, **defaults},
        "AGENT": {"report_interval": 0.5},
    })
    nodes = {name: Node(stack, name) for name in ("net-a", "net-b")}
    try:
        for node in nodes.values():
            node.start()
        yield stack, nodes
    finally:
        for node in nodes.values():
            with contextlib.suppress(Exception):
                node.stop()


@pytest.fixture
def cloud(make_stack: Callable[..., Stack]) -> Iterator[tuple[Stack, dict[str, Node]]]:
    yield from two_network_nodes(make_stack)


def tenant(stack: Stack, tag: str) -> dict[str, Any]:
    c = stack.client
    net = c.create_network(f"net-{tag}-{uuid.uuid4().hex[:4]}")
    sub = c.create_subnet(f"sub-{tag}", net["id"], "10.0.0.0/24")
    router = c.create_router(f"router-{tag}")
    c.add_interface(router["id"], sub["id"])
    server = c.create_instance(f"vm-{tag}", net["id"], fixed_ip="10.0.0.5")
    return {"net": net["id"], "router": router["id"], "server": server["id"]}


def hosts_by_name(stack: Stack) -> dict[str, dict[str, Any]]:
    return {h["name"]: h for h in cli_json(stack.config, "host", "list")}


def serving(nodes: dict[str, Node], namespace: str) -> list[str]:
    return sorted(n.name for n in nodes.values() if namespace in n.namespaces())


def test_each_router_on_one_node_moves_on_death_and_stays_moved(
        cloud: tuple[Stack, dict[str, Node]]) -> None:
    stack, nodes = cloud
    stack.wait(lambda: {"net-a", "net-b"} <= {
        n for n, h in hosts_by_name(stack).items() if h["alive"] and "network" in h["roles"]},
        15, "both network nodes alive")
    stack.wait(lambda: any(h["roles"] == ["controller"] and {"registry", "api"} <= {
        a["type"] for a in h["agents"]} for h in hosts_by_name(stack).values()),
        15, "the controller (registry + API) in host list")
    t1, t2 = tenant(stack, "one"), tenant(stack, "two")
    routers = {t["router"]: cli_json(stack.config, "router", "show", t["router"])["hosts"]
               for t in (t1, t2)}
    assert sorted(h for hs in routers.values() for h in hs) == ["net-a", "net-b"], routers
    for t in (t1, t2):  # built on exactly the scheduled node, DHCP on exactly one node
        where = routers[t["router"]]
        stack.wait(lambda t=t, where=where: serving(nodes, router_namespace(t["router"])) == where,
                   30, f"router {t['router']} only on {where}")
        net_hosts = cli_json(stack.config, "network", "show", t["net"])["hosts"]
        assert len(net_hosts) == 1
        stack.wait(lambda t=t, nh=net_hosts: serving(nodes, dhcp_namespace(t["net"])) == nh,
                   30, f"DHCP of {t['net']} only on {net_hosts}")
    for t in (t1, t2):
        stack.plug(t["server"])
        out = stack.vm_exec(t["server"], "curl", "-sf", "-m", "5", MD_URL)
        assert t["server"] in out.stdout, out

    # kill -9 the node serving tenant one's router: it moves, the VM gets metadata again
    victim = nodes[routers[t1["router"]][0]]
    survivor = next(n for n in nodes.values() if n is not victim)
    t0 = time.monotonic()
    victim.kill()
    loop = (f"until curl -sf -m 1 -o /dev/null {MD_URL}; do sleep 0.1; done; "
            f"curl -sf -m 5 {MD_URL}")
    out = stack.vm_exec(t1["server"], "sh", "-c", loop, timeout=60)
    failover_s = time.monotonic() - t0
    print(f"failover: kill -9 -> first 200 in the VM after {failover_s:.2f} s "
          f"(agent_down_time {DOWN_S} s)")
    assert t1["server"] in out.stdout, out
    assert failover_s < DOWN_S + 5, failover_s
    assert cli_json(stack.config, "router", "show", t1["router"])["hosts"] == [survivor.name]
    assert serving(nodes, router_namespace(t1["router"])) == [survivor.name]
    hosts = hosts_by_name(stack)
    assert hosts[victim.name]["alive"] is False and hosts[victim.name]["routers"] == []
    assert sorted(hosts[survivor.name]["routers"]) == sorted([t1["router"], t2["router"]])
    for t in (t1, t2):
        stack.wait(lambda t=t: serving(nodes, dhcp_namespace(t["net"])) == [survivor.name],
                   15, "DHCP on the survivor")
        assert cli_json(stack.config, "network", "show", t["net"])["hosts"] == [survivor.name]

    # the victim comes back: alive, takes nothing back, builds nothing
    victim.start()
    stack.wait(lambda: hosts_by_name(stack)[victim.name]["alive"], 15, "victim alive again")
    time.sleep(DOWN_S)
    assert not any(ns.startswith(("qrouter-", "qdhcp-")) for ns in victim.namespaces())
    for t in (t1, t2):
        assert cli_json(stack.config, "router", "show", t["router"])["hosts"] == [survivor.name]
        out = stack.vm_exec(t["server"], "curl", "-sf", "-m", "5", MD_URL)
        assert t["server"] in out.stdout, out
    shown = cli_json(stack.config, "host", "show", victim.name)
    assert shown["routers"] == [] and {a["type"] for a in shown["agents"]} == {
        "l3", "dhcp", "metadata"}
    # new work goes to the least-loaded node: the one that came back
    t3 = tenant(stack, "three")
    assert cli_json(stack.config, "router", "show", t3["router"])["hosts"] == [victim.name]
    stack.wait(lambda: serving(nodes, router_namespace(t3["router"])) == [victim.name], 30,
               "new router on the returned node")


def _sniff_arp(sock: socket.socket, timeout: float) -> list[bytes]:
    frames, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            frames.append(sock.recv(2048))
        except TimeoutError:
            break
    return frames


def test_router_fence_takes_legs_down_and_a_rebuilt_router_announces_itself(
        tmp_path: Path, cleanup: Any) -> None:
    topo = Topo()
    net = topo.network()
    sub = topo.subnet(net)
    rid = topo.router()
    port = topo.attach(rid, net, sub, "10.0.0.1")
    track(cleanup, topo)
    driver = RouterDriver(make_settings(tmp_path))
    with links.netlink() as nl:
        fabric.converge(nl, topo.doc["networks"])
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806)) as sniff:
        sniff.bind((bridge_name(net), 0))
        report = driver.converge(topo.doc)
        assert report.created == [rid]
        garp = gratuitous_arp(port["mac_address"], "10.0.0.1")
        assert garp[6:] in [f[6:] for f in _sniff_arp(sniff, 1.0)]  # as sent, from the leg

        assert leg_state(rid, port)[1] is True
        assert driver.fence() == [rid]
        assert leg_state(rid, port)[1] is False  # no ARP, no routing, no metadata
        _sniff_arp(sniff, 0.2)
        assert driver.converge(topo.doc, full=True).created == []  # same namespace...
        assert leg_state(rid, port)[1] is True  # ...legs back up, and announced again
        assert garp[6:] in [f[6:] for f in _sniff_arp(sniff, 1.0)]
        assert driver.converge(topo.doc, host="elsewhere").removed == [rid]


# --- dhcp_agents_per_network = 2 ----------------------------------------------------------

ARP_PROBE = r"""
import socket, struct, sys, time
ifname, mac, sip, tip = sys.argv[1:5]
hw = bytes.fromhex(mac.replace(":", ""))
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind((ifname, 0))
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, hw, socket.inet_aton(sip),
                  b"\0" * 6, socket.inet_aton(tip))
s.send(b"\xff" * 6 + hw + b"\x08\x06" + arp)
seen, deadline = set(), time.monotonic() + 1.0
while time.monotonic() < deadline:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        f = s.recv(2048)
    except TimeoutError:
        break
    op, sha, spa = struct.unpack("!H6s4s", f[20:32])
    if op == 2 and socket.inet_ntoa(spa) == tip:
        seen.add(sha.hex(":"))
print(" ".join(sorted(seen)))
"""


def arp_answers(vm_ns: str, mac: str, source: str, target: str) -> list[str]:
    """The MACs that answer one ARP request for target from the VM's eth0."""
    out = subprocess.run(["ip", "netns", "exec", vm_ns, PYTHON, "-c", ARP_PROBE, "eth0", mac,
                          source, target], capture_output=True, text=True, check=True, timeout=20)
    return out.stdout.split()


def vm_metadata_route(vm_ns: str) -> str | None:
    """The gateway of the VM's 169.254.169.254 route (from option 121), if any."""
    out = subprocess.run(["ip", "netns", "exec", vm_ns, "ip", "-4", "route", "show",
                          "169.254.169.254"], capture_output=True, text=True, check=True).stdout
    words = out.split()
    return words[words.index("via") + 1] if "via" in words else None


@pytest.fixture
def dhcp_cloud(make_stack: Callable[..., Stack]) -> Iterator[tuple[Stack, dict[str, Node]]]:
    yield from two_network_nodes(make_stack, dhcp_agents_per_network=2,
                                 enable_isolated_metadata=True, dhcp_lease_duration=120)


def dhcp_of(stack: Stack, net_id: str) -> dict[str, str]:
    """host -> its (first) DHCP port IP on the network, from `network show`."""
    return {h: ips[0] for h, ips in dhcp_all(stack, net_id).items()}


def dhcp_all(stack: Stack, net_id: str) -> dict[str, list[str]]:
    """host -> every DHCP port IP it serves on the network (its own and adopted ones)."""
    out: dict[str, list[str]] = {}
    for d in cli_json(stack.config, "network", "show", net_id)["dhcp"]:
        out.setdefault(d["host"], []).append(d["ip_addresses"][0])
    return {h: sorted(ips, key=lambda i: int(ipaddress.ip_address(i))) for h, ips in out.items()}


def test_two_dhcp_nodes_serve_one_isolated_network_and_ports_keep_their_ips(
        dhcp_cloud: tuple[Stack, dict[str, Node]]) -> None:
    stack, nodes = dhcp_cloud
    stack.wait(lambda: {"net-a", "net-b"} <= {
        n for n, h in hosts_by_name(stack).items() if h["alive"] and "network" in h["roles"]},
        15, "both network nodes alive")
    c = stack.client
    net = c.create_network(f"iso-{uuid.uuid4().hex[:4]}")["id"]
    c.create_subnet("iso", net, "10.0.0.0/24", gateway_ip=None)
    server = c.create_instance("vm-iso", net, fixed_ip="10.0.0.5")["id"]
    ips = dhcp_of(stack, net)
    assert sorted(ips) == ["net-a", "net-b"] and len(set(ips.values())) == 2, ips
    listed = hosts_by_name(stack)
    for name, ip in ips.items():
        assert {d["network_id"]: d["ip_addresses"] for d in listed[name]["dhcp"]} == {net: [ip]}
    ns = dhcp_namespace(net)
    stack.wait(lambda: serving(nodes, ns) == ["net-a", "net-b"], 30, "DHCP on both nodes")

    # a real DHCP client: both dnsmasq offer the same static lease, each with its own IP as
    # the 169.254.169.254 next hop; the VM reads its own metadata via the one it took
    vm_ns = stack.cli("vm", "plug", server, "--dhcp").stdout.strip()
    stack.plugged.add(vm_ns)
    via = vm_metadata_route(vm_ns)
    assert via in ips.values(), (via, ips)
    vm_mac = c.get("instance", server)["ports"][0]["mac_address"]

    def offered(node: Node) -> bool:
        log = node.root / "state" / "dhcp" / net / "dnsmasq.log"
        return log.exists() and any("DHCPOFFER(" in line and vm_mac in line
                                    for line in log.read_text().splitlines())

    stack.wait(lambda: all(offered(n) for n in nodes.values()), 10, "an offer from each node")
    out = stack.vm_exec(server, "curl", "-sf", "-m", "5", MD_URL)
    assert server in out.stdout, out
    # ARP: each node answers for its own port IP; for 169.254.169.254 only the node of the
    # lowest port IP does (the others' taps run arp_ignore=2)
    ports = {p["fixed_ips"][0]["ip_address"]: p["mac_address"] for p in c.list(
        "port", network_id=net, device_owner="network:dhcp")}
    for ip, mac in ports.items():
        assert arp_answers(vm_ns, vm_mac, "10.0.0.5", ip) == [mac]
    lowest = min(ports, key=lambda i: int(ipaddress.ip_address(i)))
    assert arp_answers(vm_ns, vm_mac, "10.0.0.5", "169.254.169.254") == [ports[lowest]]

    # a second guest, configured statically as network_data.json says: 169.254.169.254 via
    # the lowest DHCP address
    server2 = c.create_instance("vm-static", net, fixed_ip="10.0.0.6")["id"]
    vm2_ns = stack.plug(server2)
    subprocess.run(["ip", "netns", "exec", vm2_ns, "ip", "route", "add", "169.254.169.254/32",
                    "via", lowest], check=True)
    out = stack.vm_exec(server2, "curl", "-sf", "-m", "5", MD_URL)
    assert server2 in out.stdout, out

    # kill -9 the node the VM got its lease from (a one-shot DHCP client: it never renews):
    # no third node to take its port, so the survivor adopts it (same IP, its own MAC,
    # announced): the VM reads its metadata again via the same next hop, the static guest too
    victim = next(nodes[h] for h, ip in ips.items() if ip == via)
    survivor = next(n for n in nodes.values() if n is not victim)
    t0 = time.monotonic()
    victim.kill()
    loop = (f"until curl -sf -m 1 -o /dev/null {MD_URL}; do sleep 0.1; done; "
            f"curl -sf -m 5 {MD_URL}")
    out = stack.vm_exec(server, "sh", "-c", loop, timeout=60)
    adopt_s = time.monotonic() - t0
    print(f"DHCP port adoption: kill -9 -> first 200 via the dead node's IP after "
          f"{adopt_s:.2f} s (agent_down_time {DOWN_S} s; the dead node held the lowest "
          f"address: {via == lowest})")
    assert server in out.stdout, out
    assert adopt_s < DOWN_S + 5, adopt_s
    assert vm_metadata_route(vm_ns) == via  # the lease was never renewed
    assert dhcp_all(stack, net) == {survivor.name: sorted(
        ips.values(), key=lambda i: int(ipaddress.ip_address(i)))}
    assert not hosts_by_name(stack)[victim.name]["alive"]
    out = stack.vm_exec(server2, "sh", "-c", loop, timeout=30)
    assert server2 in out.stdout, out
    survivor_mac = ports[ips[survivor.name]]
    for ip in (via, "169.254.169.254"):  # one answer each, from the survivor
        assert arp_answers(vm_ns, vm_mac, "10.0.0.5", ip) == [survivor_mac]

    # the victim comes back: it takes nothing back; k=2 wants it, so it gets a new port
    victim.start()
    stack.wait(lambda: victim.name in dhcp_all(stack, net), DOWN_S + 10, "victim bound again")
    stack.wait(lambda: serving(nodes, ns) == ["net-a", "net-b"], 30, "DHCP on both again")
    now = dhcp_all(stack, net)
    assert now[survivor.name] == sorted(ips.values(), key=lambda i: int(ipaddress.ip_address(i)))
    assert len(now[victim.name]) == 1 and now[victim.name][0] not in ips.values(), now
    for srv in (server, server2):
        out = stack.vm_exec(srv, "curl", "-sf", "-m", "5", MD_URL)
        assert srv in out.stdout, out
    assert arp_answers(vm_ns, vm_mac, "10.0.0.5", via) == [survivor_mac]

    # k lowered to 1: one binding and its ports go, the other node keeps its addresses
    stack.config.write_text(stack.config.read_text().replace(
        "dhcp_agents_per_network = 2", "dhcp_agents_per_network = 1"))
    stack.restart("registry")
    stack.wait(lambda: len(dhcp_all(stack, net)) == 1, DOWN_S + 10, "one DHCP node left")
    ((kept, kept_ips),) = dhcp_all(stack, net).items()
    assert kept_ips == now[kept]
    kept_ip = ips[kept] if kept == survivor.name else kept_ips[0]  # its own: option 121's
    stack.wait(lambda: serving(nodes, ns) == [kept], 30, f"DHCP only on {kept}")
    stack.cli("vm", "plug", server, "--dhcp")
    assert vm_metadata_route(vm_ns) == kept_ip

    # k=1 failover: the serving node dies; its port (and IP) moves to the other node, so the
    # VM's route via that IP works again without a new DHCP exchange
    holder, other = nodes[kept], next(n for n in nodes.values() if n.name != kept)
    t0 = time.monotonic()
    holder.kill()
    loop = (f"until curl -sf -m 1 -o /dev/null {MD_URL}; do sleep 0.1; done; "
            f"curl -sf -m 5 {MD_URL}")
    out = stack.vm_exec(server, "sh", "-c", loop, timeout=60)
    print(f"DHCP port failover: kill -9 -> first 200 via the same IP after "
          f"{time.monotonic() - t0:.2f} s (agent_down_time {DOWN_S} s)")
    assert server in out.stdout, out
    assert dhcp_all(stack, net) == {other.name: kept_ips}  # adopted ones moved along
    assert serving(nodes, ns) == [other.name]
    stack.cli("vm", "plug", server, "--dhcp")  # and DHCP still leases, via the same IP
    assert vm_metadata_route(vm_ns) == kept_ip
