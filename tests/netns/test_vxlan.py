"""VXLAN between nodes on real namespaces: two "node" namespaces joined by an underlay veth,
each with the network's bridge + vxlan-<VNI> (agents/fabric.py), lab VMs plugged on each.

Checks: VMs on different nodes reach each other over the tunnel (unicast flood entries and
multicast group), two networks with the same subnet stay apart (their own VNI), and a stale
bridge goes with its VXLAN port. Everything is deleted at the end, whatever happened.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from openimds.agents import fabric
from openimds.config import FabricSettings
from openimds.core.names import bridge_name
from openimds.errors import ConfigError
from openimds.host import links
from tests import reaper
from tests.support import unique_name

pytestmark = pytest.mark.netns


def ns_run(ns: str, *argv: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=check, timeout=20)


@pytest.fixture
def namespaces() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for ns in reversed(made):  # deleting a node takes its bridges, vxlans and veth ends
        links.delete_namespace(ns)
        links.remove_netns_etc(ns)


def make_ns(made: list[str], prefix: str) -> str:
    ns = unique_name(prefix)
    made.append(ns)
    links.ensure_namespace(ns)
    return ns


def two_nodes(made: list[str]) -> tuple[str, str]:
    """Two node namespaces, underlay veth ul0 10.99.0.1/24 <-> 10.99.0.2/24, MTU 1600."""
    a, b = make_ns(made, "nodea"), make_ns(made, "nodeb")
    with links.netlink(a) as na, links.netlink(b) as nb:
        na.ensure_veth("ul0", peer="ul0", inside=nb, mtu=1600)
        na.set_addresses("ul0", ["10.99.0.1/24"])
        nb.set_addresses("ul0", ["10.99.0.2/24"])
        nb.set_up("ul0")
    return a, b


def plug_vm(made: list[str], node: str, bridge: str, cidr: str) -> str:
    vm = make_ns(made, "vxvm")
    peer = "vmb-" + uuid.uuid4().hex[:8]
    with links.netlink(node) as here, links.netlink(vm) as inside:
        here.ensure_veth(peer, peer="eth0", inside=inside, master=bridge, mtu=1500)
        inside.set_addresses("eth0", [cidr])
        inside.set_up("eth0")
    return vm


def network(vni: int) -> dict[str, object]:
    return {"id": str(uuid.uuid4()), "mtu": 1500, "segmentation_id": vni}


_SERVE_ONCE = (
    "import socket,sys\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind((sys.argv[1], 8080)); s.listen(); s.settimeout(8)\n"
    "while True:\n"
    "    c,_=s.accept(); c.recv(1024)\n"
    "    c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\n'+sys.argv[2].encode()); c.close()\n"
)


@pytest.fixture
def servers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait(timeout=5)


def serve(procs: list[subprocess.Popen[bytes]], vm: str, ip: str, name: str) -> None:
    """A tiny HTTP server in the VM answering its own name (stopped by PID at the end)."""
    procs.append(reaper.spawn(["ip", "netns", "exec", vm, "python3", "-c", _SERVE_ONCE,
                               ip, name], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL))


def fetch(vm: str, ip: str) -> str | None:
    """What the server at ip:8080 answers from inside vm, None if nothing answers."""
    for _ in range(10):
        out = ns_run(vm, "curl", "-s", "--max-time", "1", f"http://{ip}:8080/")
        if out.returncode == 0:
            return out.stdout
        if out.returncode == 28:  # timed out: no route/L2 to it
            return None
        time.sleep(0.2)  # refused: the server is not listening yet
    return None


@pytest.mark.parametrize("mode", ["unicast", "multicast"])
def test_vms_on_two_nodes_share_a_network_and_only_their_own(namespaces, servers, mode):
    a, b = two_nodes(namespaces)
    settings = {"a": FabricSettings(local_ip="10.99.0.1", flood_peers=("10.99.0.1", "10.99.0.2")),
                "b": FabricSettings(local_ip="10.99.0.2", flood_peers=("10.99.0.1", "10.99.0.2"))}
    if mode == "multicast":
        settings = {k: FabricSettings(local_ip=s.local_ip, vxlan_group="239.1.1.42")
                    for k, s in settings.items()}
    tunnels = {k: fabric.tunnel_from(s) for k, s in settings.items()}
    assert tunnels["a"] is not None and tunnels["b"] is not None
    if mode == "unicast":
        assert tunnels["a"].peers == ("10.99.0.2",)  # never itself
    red, blue = network(4100), network(4101)
    for node, key in ((a, "a"), (b, "b")):
        with links.netlink(node) as nl:
            report = fabric.converge(nl, [red, blue], tunnel=tunnels[key])
            assert sorted(report.created) == sorted(bridge_name(str(n["id"])) for n in (red, blue))
            vx = nl.link("vxlan-4100")
            assert vx is not None and vx.kind == "vxlan" and vx.up
            assert vx.master == nl.link(bridge_name(str(red["id"]))).index
            if mode == "unicast":
                other = "10.99.0.2" if key == "a" else "10.99.0.1"
                assert nl.flood_peers("vxlan-4100") == {other}
            # converging again changes nothing
            assert fabric.converge(nl, [red, blue], tunnel=tunnels[key]).created == []
    # the same subnet on both networks: red VMs and blue VMs use the same addresses
    red_a = plug_vm(namespaces, a, bridge_name(str(red["id"])), "10.0.0.5/24")
    red_b = plug_vm(namespaces, b, bridge_name(str(red["id"])), "10.0.0.6/24")
    blue_b = plug_vm(namespaces, b, bridge_name(str(blue["id"])), "10.0.0.7/24")
    serve(servers, red_b, "10.0.0.6", "red-b")
    serve(servers, blue_b, "10.0.0.7", "blue-b")
    serve(servers, red_a, "10.0.0.5", "red-a")
    assert fetch(red_a, "10.0.0.6") == "red-b", "red VMs on two nodes do not meet"
    assert fetch(red_b, "10.0.0.5") == "red-a"
    assert fetch(red_a, "10.0.0.7") is None, "a blue VM answered on the red network"
    assert fetch(blue_b, "10.0.0.5") is None


def test_stale_bridge_goes_with_its_vxlan_and_busy_one_stays(namespaces):
    node = make_ns(namespaces, "nodec")
    with links.netlink(node) as nl:
        nl.ensure_bridge("ul-br")
        nl.set_addresses("ul-br", ["10.98.0.1/24"])
    tunnel = fabric.tunnel_from(FabricSettings(local_ip="10.98.0.1", flood_peers=("10.98.0.9",)))
    idle, busy = network(4200), network(4201)
    with links.netlink(node) as nl:
        fabric.converge(nl, [idle, busy], tunnel=tunnel)
    plug_vm(namespaces, node, bridge_name(str(busy["id"])), "10.0.0.5/24")
    with links.netlink(node) as nl:
        report = fabric.converge(nl, [], tunnel=tunnel)
        assert report.deleted == [bridge_name(str(idle["id"]))]
        assert report.kept_busy == [bridge_name(str(busy["id"]))]
        assert nl.link("vxlan-4200") is None
        assert nl.link("vxlan-4201") is not None
        # a peer that left the config is dropped from the flood list, a new one added
        moved = fabric.tunnel_from(FabricSettings(local_ip="10.98.0.1",
                                                  flood_peers=("10.98.0.7",)))
        assert moved is not None
        fabric.ensure_vxlan(nl, fabric.bridge_spec(busy), moved)
        assert nl.flood_peers("vxlan-4201") == {"10.98.0.7"}


def test_no_local_ip_means_no_tunnel_and_bad_addresses_are_named():
    assert fabric.tunnel_from(FabricSettings()) is None
    with pytest.raises(ConfigError, match="local_ip.*'nope'"):
        fabric.tunnel_from(FabricSettings(local_ip="nope"))
    with pytest.raises(ConfigError, match="vxlan_group.*not a multicast"):
        fabric.tunnel_from(FabricSettings(local_ip="10.0.0.1", vxlan_group="10.0.0.2"))
    with pytest.raises(ConfigError, match="flood_peers.*'x'"):
        fabric.tunnel_from(FabricSettings(local_ip="10.0.0.1", flood_peers=("x",)))
