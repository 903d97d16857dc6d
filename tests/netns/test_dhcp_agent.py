"""The DHCP agent on real namespaces, bridges and dnsmasq, driven from topology documents.

No registry here: `DhcpAgent.converge()` gets the `/v1/topology` shape the agent follows, so
these tests check the kernel side (qdhcp- namespace, tap, addresses), the dnsmasq files and
process (reload by SIGHUP, respawn), the proxy listener spec, and real DHCP clients in a VM
namespace (udhcpc with our hook, dhclient with Debian's RFC 3442 hook). The full chain with
the registry and the proxy is in test_dhcp_e2e.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from openimds.agents.dhcp import DhcpAgent
from openimds.config import Settings, load_settings
from openimds.core import names
from openimds.host import links
from openimds.host.supervise import pid_alive
from openimds.lab import dhcp_client
from tests.support import write_config

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="needs dnsmasq (dnsmasq-base)"),
]


def mac() -> str:
    return "fa:16:3e:" + ":".join(uuid.uuid4().hex[i:i + 2] for i in (0, 2, 4))


class Topo:
    """A hand-built /v1/topology document."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {"revision": 1, "networks": [], "subnets": [],
                                    "routers": [], "ports": []}

    def network(self, mtu: int = 1500) -> str:
        nid = str(uuid.uuid4())
        self.doc["networks"].append({"id": nid, "name": nid[:6], "mtu": mtu})
        return nid

    def subnet(self, network_id: str, cidr: str = "10.0.0.0/24",
               gw: str | None = "10.0.0.1") -> str:
        sid = str(uuid.uuid4())
        self.doc["subnets"].append({"id": sid, "network_id": network_id, "cidr": cidr,
                                    "gateway_ip": gw, "ip_version": 4, "enable_dhcp": True,
                                    "dns_nameservers": [], "host_routes": []})
        return sid

    def port(self, network_id: str, subnet_id: str, ip: str, *, owner: str = "compute:nova",
             device_id: str = "", hostname: str | None = None) -> dict[str, Any]:
        port = {"id": str(uuid.uuid4()), "network_id": network_id, "mac_address": mac(),
                "fixed_ips": [{"subnet_id": subnet_id, "ip_address": ip}],
                "device_owner": owner, "device_id": device_id or str(uuid.uuid4()),
                "hostname": hostname}
        self.doc["ports"].append(port)
        return port

    def dhcp_port(self, network_id: str, subnet_id: str, ip: str) -> dict[str, Any]:
        return self.port(network_id, subnet_id, ip, owner="network:dhcp",
                         device_id=f"dhcp-{network_id}")

    def remove(self, port: dict[str, Any]) -> None:
        self.doc["ports"].remove(port)

    def drop_network(self, network_id: str) -> None:
        for kind in ("ports", "subnets"):
            self.doc[kind] = [o for o in self.doc[kind] if o["network_id"] != network_id]
        self.doc["networks"] = [n for n in self.doc["networks"] if n["id"] != network_id]


@pytest.fixture
def confs_dir() -> Iterator[Path]:
    """dhcp_confs outside pytest's 0700 tmp dirs: dnsmasq re-reads its files as nobody."""
    path = Path(tempfile.mkdtemp(prefix="openimds-dhcp-test-"))
    path.chmod(0o755)
    yield path
    # any dnsmasq still running from here: stop it by the PID in its own pid file
    for pid_file in path.glob("*/pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(pid_file).encode() in cmdline:
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def cleanup() -> Iterator[tuple[list[str], list[str]]]:
    """Namespaces and bridges to delete at the end, whatever happened."""
    namespaces: list[str] = []
    bridges: list[str] = []
    yield namespaces, bridges
    for ns in namespaces:
        links.delete_namespace(ns)
        links.remove_netns_etc(ns)
    with links.netlink() as nl:
        for name in bridges:
            for port in nl.bridge_ports(name):
                nl.delete_link(port.name)
            nl.delete_link(name)


def make_settings(tmp_path: Path, confs: Path, **defaults: Any) -> Settings:
    cfg = {
        "DEFAULT": {"state_path": str(tmp_path / "state"), "enable_isolated_metadata": True,
                    "dhcp_lease_duration": 120, **defaults},
        "dhcp": {"dhcp_confs": str(confs)},
    }
    return load_settings(str(write_config(tmp_path / "openimds.ini", cfg)), environ={})


def track(cleanup: tuple[list[str], list[str]], topo: Topo) -> None:
    namespaces, bridges = cleanup
    for n in topo.doc["networks"]:
        namespaces.append(names.dhcp_namespace(n["id"]))
        bridges.append(names.bridge_name(n["id"]))


async def plug_vm(cleanup: tuple[list[str], list[str]], port: dict[str, Any]) -> str:
    return await asyncio.to_thread(_plug_vm, cleanup, port)


def _plug_vm(cleanup: tuple[list[str], list[str]], port: dict[str, Any]) -> str:
    """A VM namespace whose eth0 (the port's MAC) sits on the network's bridge, no address."""
    ns = f"vm-{uuid.uuid4().hex[:8]}-{os.getpid()}"
    cleanup[0].append(ns)
    links.ensure_namespace(ns)
    links.write_netns_resolv_conf(ns, ())
    with links.netlink() as here, links.netlink(ns) as inside:
        here.ensure_veth(f"vmb-{ns[3:11]}", peer="eth0", inside=inside,
                         master=names.bridge_name(port["network_id"]),
                         peer_mac=port["mac_address"])
        inside.set_up("eth0")
    return ns


def ns_exec(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=check, timeout=20)


def _addresses(ns: str, ifname: str) -> list[str]:
    with links.netlink(ns) as nl:
        return nl.addresses(ifname)


async def addresses(ns: str, ifname: str) -> list[str]:
    # pyroute2's sync IPRoute runs its own loop: never call it from the test's loop thread
    return await asyncio.to_thread(_addresses, ns, ifname)


def _link_facts(ns: str | None, name: str) -> Any:
    with links.netlink(ns) as nl:
        link = nl.link(name)
        ports = [p.name for p in nl.bridge_ports(name)] if link is not None else []
        return link, ports


async def link_facts(ns: str | None, name: str) -> Any:
    """(LinkInfo or None, names of its bridge ports) of one link."""
    return await asyncio.to_thread(_link_facts, ns, name)


def dnsmasq_pid(confs: Path, network_id: str) -> int:
    return int((confs / network_id / "pid").read_text())


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        await asyncio.sleep(0.1)
    raise AssertionError("condition not met in time")


def proc_user(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


async def acquire(ns: str, client: str = "udhcpc") -> dhcp_client.Lease:
    return await asyncio.to_thread(dhcp_client.acquire, ns, "eth0", client=client)


# --- tests -------------------------------------------------------------------------------

async def test_isolated_network_gets_namespace_dnsmasq_and_option_121(
    tmp_path: Path, confs_dir: Path, cleanup: Any,
) -> None:
    topo = Topo()
    net = topo.network()
    sub = topo.subnet(net, gw=None)
    dport = topo.dhcp_port(net, sub, "10.0.0.2")
    vport = topo.port(net, sub, "10.0.0.5", hostname="vm1")
    track(cleanup, topo)
    settings = make_settings(tmp_path, confs_dir)
    agent = DhcpAgent(settings)
    try:
        await agent.converge(topo.doc)
        ns = names.dhcp_namespace(net)
        tap = names.dhcp_tap(dport["id"])
        assert links.namespace_exists(ns)
        assert await addresses(ns, tap) == ["10.0.0.2/24", "169.254.169.254/32"]
        link, _ = await link_facts(ns, tap)
        assert link is not None and link.up and link.mac == dport["mac_address"]
        lo, _ = await link_facts(ns, "lo")
        assert lo is not None and lo.up
        _, ports = await link_facts(None, names.bridge_name(net))
        assert ports == [names.dhcp_tap_peer(dport["id"])]
        conf = confs_dir / net
        assert (conf / "host").read_text() == f"{vport['mac_address']},vm1,10.0.0.5\n"
        assert f"tag:subnet-{sub},option:classless-static-route,169.254.169.254/32,10.0.0.2" \
            in (conf / "opts").read_text().splitlines()
        spec = json.loads((settings.path("proxy", "listeners") / f"network-{net}.json")
                          .read_text())
        assert spec == {"netns": ns, "host": "169.254.169.254", "port": 80,
                        "router_id": None, "network_id": net, "interface": tap}
        pid = dnsmasq_pid(confs_dir, net)
        assert pid_alive(pid)
        assert proc_user(pid) != 0  # dropped privileges (nobody), as under Neutron

        vm_ns = await plug_vm(cleanup, vport)
        lease = await acquire(vm_ns)
        assert lease.cidr == "10.0.0.5/24"
        assert lease.source == "121"
        assert lease.routes == (("169.254.169.254/32", "10.0.0.2"),)
        routes = ns_exec(vm_ns, "ip", "-4", "route").stdout
        assert "169.254.169.254 via 10.0.0.2 dev eth0" in routes
        assert "default" not in routes
        # the VM reaches the DHCP namespace's metadata address (nothing listens: refused)
        probe = ns_exec(vm_ns, "curl", "-s", "-o", "/dev/null", "-m", "3",
                        "http://169.254.169.254/", check=False)
        assert probe.returncode == 7  # connection refused: the address answered
    finally:
        await agent.shutdown(cleanup=True)
    assert not links.namespace_exists(names.dhcp_namespace(net))
    assert not (confs_dir / net).exists()
    assert not (settings.path("proxy", "listeners") / f"network-{net}.json").exists()
    # the VM is still plugged, so the bridge stays, without our leg
    _, ports = await link_facts(None, names.bridge_name(net))
    assert ports == [f"vmb-{vm_ns[3:11]}"]


async def test_dhclient_with_debian_rfc3442_hook(
    tmp_path: Path, confs_dir: Path, cleanup: Any,
) -> None:
    topo = Topo()
    net = topo.network()
    sub = topo.subnet(net)
    topo.dhcp_port(net, sub, "10.0.0.2")
    vport = topo.port(net, sub, "10.0.0.7")
    track(cleanup, topo)
    agent = DhcpAgent(make_settings(tmp_path, confs_dir))
    try:
        await agent.converge(topo.doc)
        vm_ns = await plug_vm(cleanup, vport)
        lease = await acquire(vm_ns, "dhclient")
        assert lease.cidr == "10.0.0.7/24"
        assert lease.routes == (("169.254.169.254/32", "10.0.0.2"), ("0.0.0.0/0", "10.0.0.1"))
        routes = ns_exec(vm_ns, "ip", "-4", "route").stdout
        assert "169.254.169.254 via 10.0.0.2 dev eth0" in routes
        assert "default via 10.0.0.1 dev eth0" in routes
        # no dhclient left running in the VM namespace
        assert not [p for p in Path("/proc").iterdir() if p.name.isdigit()
                    and _in_netns(int(p.name), vm_ns)]
    finally:
        await agent.shutdown(cleanup=True)


def _in_netns(pid: int, ns: str) -> bool:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return False


async def test_router_attach_detach_flips_without_restarting_dnsmasq(
    tmp_path: Path, confs_dir: Path, cleanup: Any,
) -> None:
    topo = Topo()
    net = topo.network()
    sub = topo.subnet(net)
    dport = topo.dhcp_port(net, sub, "10.0.0.2")
    vport = topo.port(net, sub, "10.0.0.5")
    other = topo.network()  # a second network that must not be touched
    osub = topo.subnet(other)
    topo.dhcp_port(other, osub, "10.0.0.2")
    track(cleanup, topo)
    settings = make_settings(tmp_path, confs_dir)
    spec_path = settings.path("proxy", "listeners") / f"network-{net}.json"
    agent = DhcpAgent(settings)
    ns, tap = names.dhcp_namespace(net), names.dhcp_tap(dport["id"])
    try:
        await agent.converge(topo.doc)
        pid = dnsmasq_pid(confs_dir, net)
        other_pid = dnsmasq_pid(confs_dir, other)
        other_opts = confs_dir / other / "opts"
        other_mtime = other_opts.stat().st_mtime_ns
        vm_ns = await plug_vm(cleanup, vport)
        lease = await acquire(vm_ns)
        assert ("169.254.169.254/32", "10.0.0.2") in lease.routes
        assert spec_path.exists()

        # attach a router on the gateway IP: routed metadata via the gateway
        rport = topo.port(net, sub, "10.0.0.1", owner="network:router_interface")
        await agent.converge(topo.doc)
        assert not spec_path.exists()
        assert await addresses(ns, tap) == ["10.0.0.2/24"]
        assert f"tag:subnet-{sub},option:classless-static-route,169.254.169.254/32," \
            "10.0.0.1,0.0.0.0/0,10.0.0.1" in (confs_dir / net / "opts").read_text()
        assert dnsmasq_pid(confs_dir, net) == pid and pid_alive(pid)
        await wait_for(lambda: "read " in (confs_dir / net / "dnsmasq.log").read_text())
        lease = await acquire(vm_ns)
        assert lease.routes == (("169.254.169.254/32", "10.0.0.1"), ("0.0.0.0/0", "10.0.0.1"))
        assert "169.254.169.254 via 10.0.0.1" in ns_exec(vm_ns, "ip", "-4", "route").stdout

        # detach: isolated again
        topo.remove(rport)
        await agent.converge(topo.doc)
        assert spec_path.exists()
        assert await addresses(ns, tap) == ["10.0.0.2/24", "169.254.169.254/32"]
        assert dnsmasq_pid(confs_dir, net) == pid
        lease = await acquire(vm_ns)
        assert ("169.254.169.254/32", "10.0.0.2") in lease.routes
        assert "169.254.169.254 via 10.0.0.2" in ns_exec(vm_ns, "ip", "-4", "route").stdout

        # the other network was never touched
        assert dnsmasq_pid(confs_dir, other) == other_pid
        assert other_opts.stat().st_mtime_ns == other_mtime
    finally:
        await agent.shutdown(cleanup=True)


async def test_dnsmasq_killed_is_respawned_and_serves_leases(
    tmp_path: Path, confs_dir: Path, cleanup: Any,
) -> None:
    topo = Topo()
    net = topo.network()
    sub = topo.subnet(net, gw=None)
    topo.dhcp_port(net, sub, "10.0.0.2")
    vport = topo.port(net, sub, "10.0.0.9")
    track(cleanup, topo)
    agent = DhcpAgent(make_settings(tmp_path, confs_dir))
    try:
        await agent.converge(topo.doc)
        pid = dnsmasq_pid(confs_dir, net)
        os.kill(pid, signal.SIGKILL)
        await wait_for(lambda: dnsmasq_pid(confs_dir, net) != pid
                       and pid_alive(dnsmasq_pid(confs_dir, net)))
        vm_ns = await plug_vm(cleanup, vport)
        lease = await acquire(vm_ns)
        assert lease.cidr == "10.0.0.9/24"
        assert agent.served[net].child.restarts == 1
    finally:
        await agent.shutdown(cleanup=True)


async def test_restart_converges_without_duplicates_and_removal_cleans_up(
    tmp_path: Path, confs_dir: Path, cleanup: Any,
) -> None:
    topo = Topo()
    net = topo.network()
    sub = topo.subnet(net, gw=None)
    dport = topo.dhcp_port(net, sub, "10.0.0.2")
    track(cleanup, topo)
    settings = make_settings(tmp_path, confs_dir)
    first = DhcpAgent(settings)
    await first.converge(topo.doc)
    old_pid = dnsmasq_pid(confs_dir, net)
    # a crashed agent leaves its dnsmasq behind; forget it without stopping it
    for served in first.served.values():
        served.child._stopping = True  # its watcher must not respawn
    second = DhcpAgent(settings)
    try:
        await second.converge(topo.doc)
        await second.converge(topo.doc)
        new_pid = dnsmasq_pid(confs_dir, net)
        assert new_pid != old_pid
        await wait_for(lambda: not pid_alive(old_pid))
        ns = names.dhcp_namespace(net)
        tap, _ = await link_facts(ns, names.dhcp_tap(dport["id"]))
        assert tap is not None
        assert await addresses(ns, names.dhcp_tap(dport["id"])) == [
            "10.0.0.2/24", "169.254.169.254/32"]

        topo.drop_network(net)
        await second.converge(topo.doc)
        assert not links.namespace_exists(ns)
        assert not (confs_dir / net).exists()
        assert not pid_alive(new_pid)
        assert (await link_facts(None, names.bridge_name(net)))[0] is None
    finally:
        await second.shutdown(cleanup=True)
        await first.shutdown(cleanup=True)
