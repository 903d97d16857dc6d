"""core.dnsmasq: Neutron's isolation rule, metadata decision, and the exact dnsmasq files."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from openimds.core import dnsmasq as dm
from openimds.core.dnsmasq import MetadataFlags

NET = "0b3c7f2e-1111-4222-8333-444455556666"
SUB = "5ab1c2d3-aaaa-4bbb-8ccc-ddddeeeeffff"
SUB2 = "6ab1c2d3-aaaa-4bbb-8ccc-ddddeeeeffff"
DHCP_PORT = "d1d2d3d4-0000-4000-8000-000000000001"
VM_PORT = "a1a2a3a4-0000-4000-8000-000000000002"
RTR_PORT = "r1r2r3r4-0000-4000-8000-000000000003"

ISOLATED = MetadataFlags(enable_isolated_metadata=True)
FORCE = MetadataFlags(force_metadata=True)
OFF = MetadataFlags()


def subnet(sid: str = SUB, cidr: str = "10.0.0.0/24", gw: str | None = "10.0.0.1",
           **kw: Any) -> dict[str, Any]:
    return {"id": sid, "network_id": NET, "cidr": cidr, "ip_version": 4, "gateway_ip": gw,
            "enable_dhcp": kw.pop("enable_dhcp", True), **kw}


def port(pid: str, owner: str, ips: list[tuple[str, str]], mac: str,
         hostname: str | None = None) -> dict[str, Any]:
    return {"id": pid, "network_id": NET, "mac_address": mac, "device_owner": owner,
            "device_id": "dev", "fixed_ips": [{"subnet_id": s, "ip_address": i} for s, i in ips],
            "hostname": hostname}


def network(subnets: list[dict[str, Any]], ports: list[dict[str, Any]],
            mtu: int = 1500) -> dm.DhcpNetwork:
    topo = {"networks": [{"id": NET, "mtu": mtu}], "subnets": subnets, "ports": ports}
    return dm.networks_from_topology(topo)[NET]


def dhcp(ip: str = "10.0.0.2", sid: str = SUB) -> dict[str, Any]:
    return port(DHCP_PORT, "network:dhcp", [(sid, ip)], "fa:16:3e:00:00:02")


def vm(ip: str = "10.0.0.5", hostname: str | None = "vm1") -> dict[str, Any]:
    return port(VM_PORT, "compute:nova", [(SUB, ip)], "FA:16:3E:00:00:05", hostname)


def router(ip: str = "10.0.0.1") -> dict[str, Any]:
    return port(RTR_PORT, "network:router_interface", [(SUB, ip)], "fa:16:3e:00:00:01")


T = f"tag:subnet-{SUB}"


# --- isolation and should_enable_metadata ------------------------------------------------

def test_subnet_without_router_is_isolated() -> None:
    assert dm.isolated_subnets(network([subnet()], [dhcp(), vm()])) == {SUB: True}


def test_router_on_gateway_ip_makes_subnet_routed() -> None:
    assert dm.isolated_subnets(network([subnet()], [dhcp(), router()])) == {SUB: False}


def test_router_on_other_ip_leaves_subnet_isolated() -> None:
    assert dm.isolated_subnets(network([subnet()], [router("10.0.0.9")])) == {SUB: True}


def test_non_router_port_on_gateway_ip_leaves_subnet_isolated() -> None:
    fake = port(RTR_PORT, "compute:nova", [(SUB, "10.0.0.1")], "fa:16:3e:00:00:01")
    assert dm.isolated_subnets(network([subnet()], [fake])) == {SUB: True}


@pytest.mark.parametrize("owner", sorted(dm.ROUTER_INTERFACE_OWNERS))
def test_every_router_owner_counts(owner: str) -> None:
    p = port(RTR_PORT, owner, [(SUB, "10.0.0.1")], "fa:16:3e:00:00:01")
    assert dm.isolated_subnets(network([subnet()], [p])) == {SUB: False}


def test_should_enable_metadata_order() -> None:
    isolated = network([subnet()], [dhcp()])
    routed = network([subnet()], [dhcp(), router()])
    assert dm.should_enable_metadata(ISOLATED, isolated)
    assert not dm.should_enable_metadata(ISOLATED, routed)
    assert not dm.should_enable_metadata(OFF, isolated)
    assert dm.should_enable_metadata(FORCE, routed)
    # 1. an OVN metadata port wins over everything
    ovn = port(RTR_PORT, "network:distributed", [(SUB, "10.0.0.3")], "fa:16:3e:00:00:03")
    assert not dm.should_enable_metadata(FORCE, network([subnet()], [ovn]))
    # 2. no DHCP subnet: never, even forced
    assert not dm.should_enable_metadata(FORCE, network([subnet(enable_dhcp=False)], []))
    # 5. metadata network needs enable_isolated_metadata as well
    meta = network([subnet(cidr="169.254.0.0/16", gw="169.254.0.1")], [router("169.254.0.1")])
    both = MetadataFlags(enable_isolated_metadata=True, enable_metadata_network=True)
    assert dm.should_enable_metadata(both, meta)
    assert not dm.should_enable_metadata(ISOLATED, meta)
    assert not dm.should_enable_metadata(MetadataFlags(enable_metadata_network=True), meta)


def test_only_dhcp_subnets_count_as_isolated() -> None:
    net = network([subnet(), subnet(SUB2, "10.1.0.0/24", "10.1.0.1", enable_dhcp=False)],
                  [dhcp(), router()])
    assert not dm.should_enable_metadata(ISOLATED, net)


# --- hosts file ---------------------------------------------------------------------------

def test_hosts_file_static_leases() -> None:
    net = network([subnet()], [dhcp(), vm(), router(),
                               port("b" * 8, "compute:nova", [(SUB, "10.0.0.7")],
                                    "fa:16:3e:00:00:07")])
    assert dm.render_hosts(net) == (
        "fa:16:3e:00:00:05,vm1,10.0.0.5\n"
        "fa:16:3e:00:00:07,host-10-0-0-7,10.0.0.7\n"
        "fa:16:3e:00:00:01,host-10-0-0-1,10.0.0.1\n"
    )


def test_hosts_file_skips_non_dhcp_subnets() -> None:
    net = network([subnet(enable_dhcp=False)], [vm()])
    assert dm.render_hosts(net) == ""


# --- opts file ----------------------------------------------------------------------------

def test_isolated_subnet_routes_metadata_via_dhcp_port() -> None:
    net = network([subnet()], [dhcp(), vm()])
    assert dm.render_opts(net, ISOLATED).splitlines() == [
        f"{T},option:dns-server",
        f"{T},option:classless-static-route,169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1",
        f"{T},249,169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1",
        f"{T},option:router,10.0.0.1",
    ]


def test_isolated_subnet_without_gateway() -> None:
    net = network([subnet(gw=None)], [dhcp(), vm()])
    assert dm.render_opts(net, ISOLATED).splitlines() == [
        f"{T},option:dns-server",
        f"{T},option:classless-static-route,169.254.169.254/32,10.0.0.2",
        f"{T},249,169.254.169.254/32,10.0.0.2",
        f"{T},option:router",
    ]


def test_routed_subnet_routes_metadata_via_gateway() -> None:
    net = network([subnet()], [dhcp(), vm(), router()])
    expected = [
        f"{T},option:dns-server",
        f"{T},option:classless-static-route,169.254.169.254/32,10.0.0.1,0.0.0.0/0,10.0.0.1",
        f"{T},249,169.254.169.254/32,10.0.0.1,0.0.0.0/0,10.0.0.1",
        f"{T},option:router,10.0.0.1",
    ]
    assert dm.render_opts(net, ISOLATED).splitlines() == expected
    # pushed even with every metadata option off, as Neutron does
    assert dm.render_opts(net, OFF).splitlines() == expected


def test_force_metadata_routes_via_dhcp_port_even_when_routed() -> None:
    net = network([subnet()], [dhcp(), router()])
    assert f"{T},option:classless-static-route,169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1" \
        in dm.render_opts(net, FORCE).splitlines()


def test_isolated_subnet_with_metadata_off_gets_no_routes() -> None:
    net = network([subnet()], [dhcp()])
    assert dm.render_opts(net, OFF).splitlines() == [
        f"{T},option:dns-server", f"{T},option:router,10.0.0.1",
    ]


def test_dns_servers_and_host_routes() -> None:
    s = subnet(dns_nameservers=["192.0.2.53", "192.0.2.54"],
               host_routes=[{"destination": "172.16.0.0/12", "nexthop": "10.0.0.254"}])
    net = network([s], [dhcp()])
    assert dm.render_opts(net, ISOLATED).splitlines() == [
        f"{T},option:dns-server,192.0.2.53,192.0.2.54",
        f"{T},option:classless-static-route,172.16.0.0/12,10.0.0.254,"
        "169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1",
        f"{T},249,172.16.0.0/12,10.0.0.254,169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1",
        f"{T},option:router,10.0.0.1",
    ]


def test_default_host_route_supplies_missing_gateway() -> None:
    s = subnet(gw=None, host_routes=[{"destination": "0.0.0.0/0", "nexthop": "10.0.0.254"}])
    net = network([s], [dhcp()])
    lines = dm.render_opts(net, ISOLATED).splitlines()
    assert lines[1] == (f"{T},option:classless-static-route,"
                        "169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.254")
    assert lines[-1] == f"{T},option:router,10.0.0.254"


def test_sibling_subnets_are_on_link_and_first() -> None:
    net = network([subnet(), subnet(SUB2, "10.1.0.0/24", "10.1.0.1")],
                  [port(DHCP_PORT, "network:dhcp", [(SUB, "10.0.0.2"), (SUB2, "10.1.0.2")],
                        "fa:16:3e:00:00:02")])
    lines = dm.render_opts(net, ISOLATED).splitlines()
    t2 = f"tag:subnet-{SUB2}"
    assert lines == [
        f"{T},option:dns-server",
        f"{T},option:classless-static-route,10.1.0.0/24,0.0.0.0,"
        "169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1",
        f"{T},249,10.1.0.0/24,0.0.0.0,169.254.169.254/32,10.0.0.2,0.0.0.0/0,10.0.0.1",
        f"{T},option:router,10.0.0.1",
        f"{t2},option:dns-server",
        f"{t2},option:classless-static-route,10.0.0.0/24,0.0.0.0,"
        "169.254.169.254/32,10.1.0.2,0.0.0.0/0,10.1.0.1",
        f"{t2},249,10.0.0.0/24,0.0.0.0,169.254.169.254/32,10.1.0.2,0.0.0.0/0,10.1.0.1",
        f"{t2},option:router,10.1.0.1",
    ]


def test_format_option() -> None:
    assert dm.format_option("subnet-x", "router") == "tag:subnet-x,option:router"
    assert dm.format_option("subnet-x", 249, "a,b") == "tag:subnet-x,249,a,b"


# --- argv and plan ------------------------------------------------------------------------

def test_dnsmasq_argv() -> None:
    net = network([subnet(), subnet(SUB2, "10.1.0.0/28", None, enable_dhcp=False)], [dhcp()])
    paths = dm.DhcpPaths("/s/dhcp/" + NET)
    argv = dm.dnsmasq_argv(net, "tapd1d2d3d4-00", paths, lease_duration_s=86400)
    d = "/s/dhcp/" + NET
    assert argv == [
        "dnsmasq", "--keep-in-foreground", "--no-hosts", "--no-resolv", "--port=0",
        "--conf-file=/dev/null", f"--pid-file={d}/pid", f"--dhcp-hostsfile={d}/host",
        f"--dhcp-optsfile={d}/opts", f"--dhcp-leasefile={d}/leases", "--log-dhcp",
        f"--log-facility={d}/dnsmasq.log", "--interface=tapd1d2d3d4-00",
        "--except-interface=lo", "--bind-interfaces", "--dhcp-authoritative",
        f"--dhcp-range=set:subnet-{SUB},10.0.0.0,static,255.255.255.0,86400s",
        "--dhcp-option-force=option:mtu,1500", "--dhcp-lease-max=256",
    ]


def test_dnsmasq_argv_infinite_lease_and_cap() -> None:
    net = network([subnet(cidr="10.0.0.0/8", gw="10.0.0.1")], [dhcp()], mtu=0)
    argv = dm.dnsmasq_argv(net, "tapx", dm.DhcpPaths("/d"), lease_duration_s=-1,
                           lease_max=1000)
    assert f"--dhcp-range=set:subnet-{SUB},10.0.0.0,static,255.0.0.0,infinite" in argv
    assert argv[-1] == "--dhcp-lease-max=1000"
    assert not any(a.startswith("--dhcp-option-force") for a in argv)


def test_plan_isolated_and_routed() -> None:
    iso = dm.plan_network(network([subnet()], [dhcp(), vm()]), ISOLATED, "/d",
                          lease_duration_s=600)
    assert iso is not None
    assert iso.namespace == f"qdhcp-{NET}"
    assert iso.tap == "tapd1d2d3d4-00" and iso.tap_peer == "tpbd1d2d3d4-00"
    assert iso.bridge == "brq0b3c7f2e-11"
    assert iso.addresses == ("10.0.0.2/24", "169.254.169.254/32")
    assert iso.metadata
    routed = dm.plan_network(network([subnet()], [dhcp(), vm(), router()]), ISOLATED, "/d",
                             lease_duration_s=600)
    assert routed is not None
    assert routed.addresses == ("10.0.0.2/24",) and not routed.metadata
    assert routed.argv == iso.argv  # a flip never needs a dnsmasq restart


def test_plan_none_without_dhcp_port_or_subnet() -> None:
    assert dm.plan_network(network([subnet()], [vm()]), ISOLATED, "/d",
                           lease_duration_s=1) is None
    assert dm.plan_network(network([subnet(enable_dhcp=False)], [dhcp()]), ISOLATED, "/d",
                           lease_duration_s=1) is None


def test_two_dhcp_nodes_each_serve_from_their_own_port() -> None:
    """k=2: each node's plan uses the port named for it; same hosts file (whichever server
    answers, the guest gets the same address), own IP as option 121 next hop, and only the
    node of the lowest port IP answers ARP for 169.254.169.254."""
    from openimds.core.models import dhcp_device_id

    ports = []
    for pid, host, ip, mac in (("p-b", "net-b", "10.0.0.3", "fa:16:3e:00:00:03"),
                               ("p-a", "net-a", "10.0.0.2", "fa:16:3e:00:00:02")):
        p = port(pid, "network:dhcp", [(SUB, ip)], mac)
        p["device_id"] = dhcp_device_id(host, NET)
        ports.append(p)
    net = network([subnet(gw=None)], [*ports, vm()])
    a = dm.plan_network(net, ISOLATED, "/d", lease_duration_s=600, host="net-a")
    b = dm.plan_network(net, ISOLATED, "/d", lease_duration_s=600, host="net-b")
    assert a is not None and b is not None
    assert (a.port_id, b.port_id) == ("p-a", "p-b")
    assert a.addresses == ("10.0.0.2/24", "169.254.169.254/32")
    assert b.addresses == ("10.0.0.3/24", "169.254.169.254/32")
    assert a.hosts == b.hosts == "fa:16:3e:00:00:05,vm1,10.0.0.5\n"
    assert f"{T},option:classless-static-route,169.254.169.254/32,10.0.0.2" in a.opts
    assert f"{T},option:classless-static-route,169.254.169.254/32,10.0.0.3" in b.opts
    assert "10.0.0.3" not in a.opts and "10.0.0.2" not in b.opts
    assert (a.metadata_arp, b.metadata_arp) == (True, False)
    assert "--dhcp-authoritative" in a.argv and a.tap != b.tap
    # a node with no port of its own (not yet handed one) builds nothing
    assert dm.plan_network(net, ISOLATED, "/d", lease_duration_s=600, host="net-c") is None
    # no metadata served: nobody holds 169.254.169.254, nobody answers ARP for it
    off = dm.plan_network(net, OFF, "/d", lease_duration_s=600, host="net-a")
    assert off is not None and not off.metadata_arp


def test_an_adopted_port_adds_its_addresses_and_maybe_the_metadata_arp() -> None:
    """A node that adopted a dead node's port holds its address after its own, keeps its own
    IP as option 121 next hop, and answers ARP for 169.254.169.254 when the adopted port is
    the lowest."""
    from openimds.core.models import dhcp_adopted_device_id, dhcp_device_id

    dead = port("p-dead", "network:dhcp", [(SUB, "10.0.0.2")], "fa:16:3e:00:00:02")
    dead["device_id"] = dhcp_adopted_device_id("net-b", NET)
    own = port("p-b", "network:dhcp", [(SUB, "10.0.0.3")], "fa:16:3e:00:00:03")
    own["device_id"] = dhcp_device_id("net-b", NET)
    net = network([subnet(gw=None)], [dead, own, vm()])
    b = dm.plan_network(net, ISOLATED, "/d", lease_duration_s=600, host="net-b")
    assert b is not None and b.port_id == "p-b" and b.mac_address == "fa:16:3e:00:00:03"
    assert b.addresses == ("10.0.0.3/24", "10.0.0.2/24", "169.254.169.254/32")
    assert b.metadata_arp
    assert f"{T},option:classless-static-route,169.254.169.254/32,10.0.0.3" in b.opts
    assert [p.id for p in dm.adopted_ports(net, "net-b")] == ["p-dead"]
    assert dm.adopted_ports(net, "net-a") == [] and dm.adopted_ports(net, None) == []
    # an adopted port alone is no port of one's own: nothing to build from
    assert dm.plan_network(network([subnet(gw=None)], [dead]), ISOLATED, "/d",
                           lease_duration_s=600, host="net-b") is None


# --- real syntax check --------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("dnsmasq") is None, reason="dnsmasq (dnsmasq-base) missing")
def test_dnsmasq_accepts_rendered_files(tmp_path: Path) -> None:
    """`dnsmasq --test` parses the argv, and a conf-file of our option lines."""
    s2 = subnet(SUB2, "10.1.0.0/24", "10.1.0.1", dns_nameservers=["192.0.2.53"])
    net = network([subnet(), s2],
                  [port(DHCP_PORT, "network:dhcp", [(SUB, "10.0.0.2"), (SUB2, "10.1.0.2")],
                        "fa:16:3e:00:00:02"), vm(), router()])
    paths = dm.DhcpPaths(str(tmp_path))
    argv = dm.dnsmasq_argv(net, "tapx", paths, lease_duration_s=600)
    # dnsmasq --test reads the main options; the hosts and opts files are read at run time,
    # so check their lines through the equivalent command-line options as a conf file.
    conf = tmp_path / "check.conf"
    lines = [f"dhcp-host={h}" for h in dm.render_hosts(net).splitlines()]
    lines += [f"dhcp-option={o}" for o in dm.render_opts(net, ISOLATED).splitlines()]
    conf.write_text("\n".join(lines) + "\n")
    argv = [a if a != "--conf-file=/dev/null" else f"--conf-file={conf}" for a in argv]
    proc = subprocess.run([*argv, "--test"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    assert "syntax check OK" in proc.stderr


# --- remaining branches -------------------------------------------------------------------

def test_metadata_network_listener_is_router_scoped() -> None:
    both = MetadataFlags(enable_isolated_metadata=True, enable_metadata_network=True)
    assert both.serves_metadata and not MetadataFlags().serves_metadata
    rport = router("169.254.0.1")
    meta = network([subnet(cidr="169.254.0.0/16", gw="169.254.0.1")],
                   [port(DHCP_PORT, "network:dhcp", [(SUB, "169.254.0.2")], "fa:16:3e:00:00:02"),
                    rport])
    assert dm.metadata_router_id(both, meta) == "dev"
    plan = dm.plan_network(meta, both, "/d", lease_duration_s=60)
    assert plan is not None and plan.metadata and plan.router_id == "dev"
    # no router port: network-scoped; option off or no 169.254 subnet: None
    no_router = network([subnet(cidr="169.254.0.0/16", gw="169.254.0.1")], [dhcp()])
    assert dm.metadata_router_id(both, no_router) is None
    assert dm.metadata_router_id(ISOLATED, meta) is None
    assert dm.metadata_router_id(both, network([subnet()], [router()])) is None


def test_ipv6_subnets_are_not_metadata_networks_and_ips_compare_by_value() -> None:
    v6 = dm.DhcpSubnet("s6", NET, "fe80::/64", 6, None, True)
    assert not dm.has_metadata_subnet([v6])
    # values ipaddress rejects (leading zeros) still compare, as text
    odd = network([subnet(gw="10.0.0.001")], [router("10.0.0.001")])
    assert dm.isolated_subnets(odd) == {SUB: False}


def test_no_dhcp_port_means_no_metadata_route_and_no_ips() -> None:
    net = network([subnet(gw=None)], [vm()])
    assert dm.dhcp_ips_by_subnet(net) == {}
    assert dm.render_opts(net, ISOLATED).splitlines() == [
        f"{T},option:dns-server", f"{T},option:router"]


def test_default_host_route_does_not_override_gateway() -> None:
    s = subnet(host_routes=[{"destination": "0.0.0.0/0", "nexthop": "10.0.0.254"}])
    lines = dm.render_opts(network([s], [dhcp(), router()]), OFF).splitlines()
    assert lines[-1] == f"{T},option:router,10.0.0.1"
    assert lines[1].endswith("169.254.169.254/32,10.0.0.1,0.0.0.0/0,10.0.0.1")


def test_ipv6_sibling_is_not_an_on_link_route() -> None:
    v6 = {"id": SUB2, "network_id": NET, "cidr": "2001:db8::/64", "ip_version": 6,
          "gateway_ip": None, "enable_dhcp": True}
    lines = dm.render_opts(network([subnet(), v6], [dhcp()]), ISOLATED).splitlines()
    assert "2001:db8" not in "".join(lines)
    assert len(lines) == 4  # the IPv6 subnet gets no options
