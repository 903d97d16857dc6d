"""Fabric, L3 router driver and lab VMs on real namespaces, driven from topology documents.

No registry here: `RouterDriver.converge()` gets the same `/v1/topology` shape the agent reads,
so these tests check the kernel side (namespaces, legs, MACs, addresses, bridges, rules, spec
files, idempotence, ownership) in isolation. The full agent on a real registry is exercised in
test_routed_e2e.py.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest

from openimds.agents import fabric
from openimds.agents.l3 import RouterDriver, plan_routers
from openimds.config import load_settings
from openimds.core.names import bridge_name, router_leg, router_leg_peer, router_namespace
from openimds.host import links
from openimds.lab import vm
from tests.support import PYTHON, Service, unique_name, write_config

pytestmark = pytest.mark.netns


def ns_exec(ns: str, *argv: str, check: bool = True, timeout: float = 15):
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=check, timeout=timeout)


def mac() -> str:
    return "fa:16:3e:" + ":".join(uuid.uuid4().hex[i:i + 2] for i in (0, 2, 4))


class Topo:
    """A hand-built /v1/topology document."""

    def __init__(self) -> None:
        self.doc: dict = {"revision": 1, "networks": [], "subnets": [], "routers": [],
                          "ports": []}

    def network(self, mtu: int = 1500) -> str:
        nid = str(uuid.uuid4())
        self.doc["networks"].append({"id": nid, "name": nid[:6], "mtu": mtu})
        return nid

    def subnet(self, network_id: str, cidr: str = "10.0.0.0/24", gw: str | None = "10.0.0.1"):
        sid = str(uuid.uuid4())
        self.doc["subnets"].append({"id": sid, "network_id": network_id, "cidr": cidr,
                                    "gateway_ip": gw, "ip_version": 4, "dns_nameservers": []})
        return sid

    def router(self) -> str:
        rid = str(uuid.uuid4())
        self.doc["routers"].append({"id": rid, "name": rid[:6], "interfaces": []})
        return rid

    def port(self, network_id: str, subnet_id: str, ip: str, *, owner: str = "",
             device_id: str = "") -> dict:
        port = {"id": str(uuid.uuid4()), "network_id": network_id, "mac_address": mac(),
                "fixed_ips": [{"subnet_id": subnet_id, "ip_address": ip}],
                "device_owner": owner, "device_id": device_id}
        self.doc["ports"].append(port)
        return port

    def attach(self, router_id: str, network_id: str, subnet_id: str, ip: str = "10.0.0.1"):
        port = self.port(network_id, subnet_id, ip, owner="network:router_interface",
                         device_id=router_id)
        for r in self.doc["routers"]:
            if r["id"] == router_id:
                r["interfaces"].append({"port_id": port["id"], "subnet_id": subnet_id,
                                        "network_id": network_id, "ip_address": ip})
        return port

    def detach(self, port: dict) -> None:
        self.doc["ports"].remove(port)
        for r in self.doc["routers"]:
            r["interfaces"] = [i for i in r["interfaces"] if i["port_id"] != port["id"]]

    def drop_router(self, router_id: str) -> None:
        for port in [p for p in self.doc["ports"] if p["device_id"] == router_id]:
            self.detach(port)
        self.doc["routers"] = [r for r in self.doc["routers"] if r["id"] != router_id]


@pytest.fixture
def cleanup():
    """Names to delete at the end, whatever happened: namespaces and links of this netns.

    Every step is attempted; the first error is raised at the end so a leak is not silent.
    """
    namespaces: list[str] = []
    bridges: list[str] = []
    yield namespaces, bridges
    errors: list[BaseException] = []
    for ns in namespaces:
        try:
            vm.unplug_namespace(ns)
        except Exception as exc:
            errors.append(exc)
    with links.netlink() as nl:
        for name in bridges:
            try:
                for port in nl.bridge_ports(name):
                    nl.delete_link(port.name)
                nl.delete_link(name)
            except Exception as exc:
                errors.append(exc)
    if errors:
        raise errors[0]


def make_settings(tmp_path: Path, **sections):
    cfg = {"DEFAULT": {"state_path": str(tmp_path / "state")}, **sections}
    return load_settings(str(write_config(tmp_path / "openimds.ini", cfg)), environ={})


def track(cleanup, topo: Topo) -> None:
    namespaces, bridges = cleanup
    namespaces += [router_namespace(r["id"]) for r in topo.doc["routers"]]
    bridges += [bridge_name(n["id"]) for n in topo.doc["networks"]]


def leg_state(router_id: str, port: dict) -> tuple:
    with links.netlink(router_namespace(router_id)) as nl:
        link = nl.link(router_leg(port["id"]))
        assert link is not None
        return link.mac, link.up, link.mtu, nl.addresses(link.name)


def test_fabric_creates_and_removes_only_idle_stale_bridges(cleanup):
    topo = Topo()
    a, b = topo.network(), topo.network(mtu=1450)
    track(cleanup, topo)
    with links.netlink() as nl:
        report = fabric.converge(nl, topo.doc["networks"])
        assert sorted(report.created) == sorted([bridge_name(a), bridge_name(b)])
        assert nl.link(bridge_name(b)).mtu == 1450
        assert nl.link(bridge_name(a)).up
        assert fabric.converge(nl, topo.doc["networks"]).created == []
        # a foreign bridge and a busy stale bridge are left alone
        foreign = "brx" + uuid.uuid4().hex[:8]
        cleanup[1].append(foreign)
        nl.ensure_bridge(foreign)
        ns = unique_name("fab")
        cleanup[0].append(ns)
        links.ensure_namespace(ns)
        veth = "vmb-" + uuid.uuid4().hex[:8]
        with links.netlink(ns) as inside:
            nl.ensure_veth(veth, peer="eth0", inside=inside, master=bridge_name(b))
        report = fabric.converge(nl, [])
        assert report.deleted == [bridge_name(a)]
        assert report.kept_busy == [bridge_name(b)]
        assert nl.link(foreign) is not None
        nl.delete_link(veth)
        assert fabric.converge(nl, []).deleted == [bridge_name(b)]


def test_router_driver_builds_converges_and_tears_down(tmp_path, cleanup):
    settings = make_settings(tmp_path)
    topo = Topo()
    net_a, net_b = topo.network(), topo.network(mtu=1400)
    sub_a, sub_b = topo.subnet(net_a), topo.subnet(net_b)  # same 10.0.0.0/24 twice
    net_c = topo.network()
    sub_c = topo.subnet(net_c, "192.168.7.0/26", "192.168.7.1")
    r1, r2 = topo.router(), topo.router()
    p1 = topo.attach(r1, net_a, sub_a)
    p2 = topo.attach(r2, net_b, sub_b)
    p3 = topo.attach(r1, net_c, sub_c, "192.168.7.1")
    track(cleanup, topo)

    driver = RouterDriver(settings)
    report = driver.converge(topo.doc)
    assert sorted(report.created) == sorted([r1, r2]) and not report.failed

    for rid, port, cidr, mtu in ((r1, p1, "10.0.0.1/24", 1500), (r2, p2, "10.0.0.1/24", 1400),
                                 (r1, p3, "192.168.7.1/26", 1500)):
        assert leg_state(rid, port) == (port["mac_address"], True, mtu,
                                        [cidr, "fe80::a9fe:a9fe/128"])
    with links.netlink() as nl:
        peer = nl.link(router_leg_peer(p1["id"]))
        assert peer is not None and peer.up
        assert peer.master == nl.link(bridge_name(net_a)).index
        assert nl.link(router_leg_peer(p2["id"])).master == nl.link(bridge_name(net_b)).index
    ns1 = router_namespace(r1)
    assert ns_exec(ns1, "sysctl", "-n", "net.ipv4.ip_forward").stdout.strip() == "1"
    ruleset = ns_exec(ns1, "nft", "list", "ruleset").stdout
    assert "redirect to :9697" in ruleset and 'iifname "qr-*"' in ruleset
    assert "table ip nat" not in ruleset  # never both drivers in one namespace
    with links.netlink(ns1) as nl:
        assert nl.link("lo").up
    spec = json.loads((Path(settings.proxy.listeners_dir) / f"router-{r1}.json").read_text())
    assert spec == {"netns": ns1, "host": "::", "port": 9697, "router_id": r1,
                    "network_id": None}

    # converging again, and from a fresh driver (an agent restart), changes nothing
    def snapshot():
        with links.netlink(ns1) as nl:
            return ([(lk.name, lk.mac) for lk in nl.links()],
                    {lk.name: nl.addresses(lk.name) for lk in nl.links("qr-")},
                    ns_exec(ns1, "nft", "list", "ruleset").stdout)
    before = snapshot()
    assert driver.converge(topo.doc).created == []
    restarted = RouterDriver(settings)
    again = restarted.converge(topo.doc)
    assert again.created == [] and again.removed == [] and not again.specs_changed
    assert snapshot() == before

    # drift (a leg deleted behind the agent's back) is repaired by a full resync only
    with links.netlink() as nl:
        nl.delete_link(router_leg_peer(p2["id"]))
    assert restarted.converge(topo.doc).created == []
    with links.netlink() as nl:
        assert nl.link(router_leg_peer(p2["id"])) is None
    restarted.converge(topo.doc, full=True)
    assert leg_state(r2, p2) == (p2["mac_address"], True, 1400,
                                 ["10.0.0.1/24", "fe80::a9fe:a9fe/128"])
    with links.netlink() as nl:
        assert nl.link(router_leg_peer(p2["id"])).master == nl.link(bridge_name(net_b)).index

    # a foreign qrouter- namespace (not ours) survives; an unplanned router of ours goes
    foreign = router_namespace(str(uuid.uuid4()))
    cleanup[0].append(foreign)
    links.ensure_namespace(foreign)

    topo.detach(p3)
    restarted.converge(topo.doc)
    with links.netlink(ns1) as nl:
        assert nl.link(router_leg(p3["id"])) is None
    with links.netlink() as nl:
        assert nl.link(router_leg_peer(p3["id"])) is None

    topo.drop_router(r2)
    report = restarted.converge(topo.doc)
    assert report.removed == [r2]
    assert not links.namespace_exists(router_namespace(r2))
    assert not (Path(settings.proxy.listeners_dir) / f"router-{r2}.json").exists()
    assert (Path(settings.proxy.listeners_dir) / f"router-{r1}.json").exists()
    assert links.namespace_exists(foreign)
    assert r2 not in restarted.owned()

    topo.drop_router(r1)
    restarted.converge(topo.doc)
    assert not links.namespace_exists(ns1)
    assert restarted.owned() == set()


def test_iptables_driver_replaces_nft_table(tmp_path, cleanup):
    topo = Topo()
    net = topo.network()
    rid = topo.router()
    topo.attach(rid, net, topo.subnet(net))
    track(cleanup, topo)
    ns = router_namespace(rid)
    RouterDriver(make_settings(tmp_path)).converge(topo.doc)
    assert "table inet openimds" in ns_exec(ns, "nft", "list", "tables").stdout

    driver = RouterDriver(make_settings(tmp_path, l3={"firewall_driver": "iptables"}))
    driver.converge(topo.doc)
    tables = ns_exec(ns, "nft", "list", "tables").stdout
    assert "inet openimds" not in tables
    saved = ns_exec(ns, "iptables-save").stdout
    assert ("-A PREROUTING -d 169.254.169.254/32 -i qr-+ -p tcp -m tcp --dport 80 "
            "-j REDIRECT --to-ports 9697") in saved
    assert "-A openimds-scope -m mark --mark 0x1/0xffff -j DROP" in saved
    driver.converge(topo.doc)  # idempotent: no duplicated rules
    assert ns_exec(ns, "iptables-save").stdout.count("REDIRECT") == 1
    topo.drop_router(rid)
    driver.converge(topo.doc)
    assert not links.namespace_exists(ns)


ECHO_SERVER = r"""
import socket, struct, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.recv(65536)
    dst = c.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
    port, ip = struct.unpack("!H", dst[2:4])[0], socket.inet_ntoa(dst[4:8])
    body = f"{peer[0]} {ip}:{port}".encode()
    c.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    c.close()
"""


def test_vm_to_router_redirect_and_direct_drop(tmp_path, cleanup):
    """The rules on the wire: a VM reaches the router's :9697 only through the REDIRECT."""
    topo = Topo()
    net = topo.network()
    sub = topo.subnet(net)
    rid = topo.router()
    topo.attach(rid, net, sub)
    server_port = topo.port(net, sub, "10.0.0.5", owner="compute:nova")
    track(cleanup, topo)
    RouterDriver(make_settings(tmp_path)).converge(topo.doc)

    server_id = str(uuid.uuid4())
    instance = {"id": server_id, "name": "lab", "ports": [server_port]}
    subnet = next(s for s in topo.doc["subnets"] if s["id"] == sub)
    plan = vm.plan_vm(instance, subnet, topo.doc["networks"][0])
    cleanup[0].append(plan.namespace)
    vm.apply_plug(plan)
    vm.apply_plug(plan)  # idempotent
    with links.netlink(plan.namespace) as nl:
        eth0 = nl.link("eth0")
        assert eth0.mac == server_port["mac_address"] and eth0.up
        assert nl.addresses("eth0") == ["10.0.0.5/24"]
        assert nl.default_gateway() == "10.0.0.1"
    assert Path(f"/etc/netns/{plan.namespace}/resolv.conf").exists()

    script = tmp_path / "echo.py"
    script.write_text(ECHO_SERVER)
    echo = Service("echo", ["ip", "netns", "exec", router_namespace(rid), PYTHON, str(script),
                            "9697"], tmp_path).start()
    try:
        echo.wait_until(lambda: "ready" in echo.log())
        got = ns_exec(plan.namespace, "curl", "-sS", "-m", "5",
                      "http://169.254.169.254/latest").stdout
        assert got == "10.0.0.5 169.254.169.254:80"
        direct = ns_exec(plan.namespace, "curl", "-sS", "-m", "2", "http://10.0.0.1:9697/",
                         check=False)
        assert direct.returncode == 28, direct  # timed out: dropped, not refused
    finally:
        echo.stop()
    vm.unplug_namespace(plan.namespace)
    assert not links.namespace_exists(plan.namespace)
    assert not Path(f"/etc/netns/{plan.namespace}").exists()


def test_vm_without_gateway_has_no_default_route(cleanup):
    topo = Topo()
    net = topo.network()
    sub = topo.subnet(net, gw=None)
    port = topo.port(net, sub, "10.0.0.9", owner="compute:nova")
    track(cleanup, topo)
    subnet = topo.doc["subnets"][0]
    plan = vm.plan_vm({"id": str(uuid.uuid4()), "name": "x", "ports": [port]}, subnet,
                      topo.doc["networks"][0])
    cleanup[0].append(plan.namespace)
    vm.apply_plug(plan)
    with links.netlink(plan.namespace) as nl:
        assert nl.default_gateway() is None
        assert nl.addresses("eth0") == ["10.0.0.9/24"]


def test_plan_routers_shapes():
    topo = Topo()
    net = topo.network(mtu=9000)
    sub = topo.subnet(net, "10.1.0.0/16", "10.1.0.1")
    rid = topo.router()
    port = topo.attach(rid, net, sub, "10.1.0.1")
    topo.port(net, sub, "10.1.0.7", owner="compute:nova")
    plans = plan_routers(topo.doc)
    (leg,) = plans[rid].legs
    assert leg.cidrs == ("10.1.0.1/16",) and leg.mtu == 9000
    assert leg.ifname == ("qr-" + port["id"])[:14] and len(leg.peer) <= 15


def test_l3_agent_follows_a_real_registry(make_stack):
    """`openimds l3-agent` against `openimds registry serve`: builds from the feed, spawns a
    proxy when none runs, removes a detached leg and a deleted router."""
    stack = make_stack(services=["registry", "l3-agent"])
    c = stack.client
    net = c.create_network("n")
    sub = c.create_subnet("s", net["id"], "10.0.0.0/24")
    router = c.create_router("r")
    port = c.add_interface(router["id"], sub["id"])
    ns = router_namespace(router["id"])
    spec = stack.settings.path("proxy", "listeners", f"router-{router['id']}.json")
    stack.wait(lambda: links.namespace_exists(ns) and spec.exists(), 20, "router built")

    def leg():
        with links.netlink(ns) as nl:
            link = nl.link(router_leg(port["id"]))
            return link and (link.mac, nl.addresses(link.name))
    assert stack.wait(leg, 10, "leg") == (port["mac_address"],
                                          ["10.0.0.1/24", "fe80::a9fe:a9fe/128"])
    with links.netlink() as nl:
        assert nl.link(bridge_name(net["id"])) is not None
    assert "redirect to :9697" in ns_exec(ns, "nft", "list", "ruleset").stdout
    # no proxy was running: the agent started one
    assert stack.wait(stack.proxy_pid, 15, "proxy spawned by the l3-agent")

    c.remove_interface(router["id"], sub["id"])
    stack.wait(lambda: not leg(), 10, "leg removed")
    c.delete("router", router["id"])
    stack.wait(lambda: not links.namespace_exists(ns), 10, "namespace removed")
    assert not spec.exists()


def test_vm_cli_plug_exec_unplug(make_stack):
    """`openimds vm plug|exec|unplug` against a real registry: JSON output, by name,
    stdin/stdout and the exit code passed through, idempotent plug, clean unplug."""
    stack = make_stack(services=["registry"])
    c = stack.client
    net = c.create_network("n", mtu=1400)
    sub = c.create_subnet("s", net["id"], "10.9.0.0/24", dns_nameservers=["10.9.0.53"])
    server = c.create_instance("lab-vm", net["id"], fixed_ip="10.9.0.7")
    port = server["ports"][0]
    out = json.loads(stack.cli("vm", "plug", "lab-vm", "-f", "json").stdout)
    ns = out["namespace"]
    stack.plugged.add(ns)
    assert ns == f"vm-{server['id'][:8]}"
    assert out["cidr"] == "10.9.0.7/24" and out["gateway"] == sub["gateway_ip"] == "10.9.0.1"
    assert out["mac"] == port["mac_address"] and out["mtu"] == 1400
    assert stack.plug(server["id"]) == ns  # again: same namespace, nothing duplicated
    with links.netlink(ns) as nl:
        assert [lk.name for lk in nl.links()] == ["lo", "eth0"]
        assert nl.addresses("eth0") == ["10.9.0.7/24"]
        assert nl.default_gateway() == "10.9.0.1"
    with links.netlink() as nl:
        assert nl.link(f"vmb-{server['id'][:8]}").master == nl.link(bridge_name(net["id"])).index

    rc = stack.vm_exec(server["id"], "sh", "-c", "exit 7")
    assert rc.returncode == 7
    echo = subprocess.run(
        [PYTHON, "-m", "openimds", "--config", str(stack.config), "vm", "exec", "lab-vm", "--",
         "sh", "-c", "cat; ip -o -4 addr show dev eth0 | wc -l; cat /etc/resolv.conf"],
        input="hello\n", capture_output=True, text=True, timeout=30, check=False)
    assert echo.returncode == 0, echo.stderr
    assert echo.stdout.startswith("hello\n1\n") and "nameserver 10.9.0.53" in echo.stdout

    gone = json.loads(stack.cli("vm", "unplug", server["id"], "-f", "json").stdout)
    assert gone == {"namespace": ns, "removed": True}
    assert not links.namespace_exists(ns)
    assert not Path(f"/etc/netns/{ns}").exists()
    again = stack.cli("vm", "exec", server["id"], "--", "true", check=False)
    assert again.returncode == 1 and "not plugged" in again.stderr
