"""network_data.json from the view, as Nova's netutils builds it (plus the metadata route)."""

from __future__ import annotations

import json
from typing import Any

from openimds.core.metadata import parse_view
from openimds.core.metadata.network_data import network_data
from tests.unit.test_metadata_documents import NET, PORT, SUBNET, docs, get, make_view


def _port(subnets: list[dict[str, Any]], ips: list[tuple[str, str]], **kw: Any) -> dict[str, Any]:
    port = {"id": PORT, "mac_address": "fa:16:3e:11:22:33", "network_id": NET,
            "device_owner": "compute:nova",
            "fixed_ips": [{"subnet_id": s, "ip_address": a} for s, a in ips],
            "network": {"id": NET, "name": "private", "mtu": 1450}, "subnets": subnets}
    port.update(kw)
    return port


def _subnet(**kw: Any) -> dict[str, Any]:
    subnet = {"id": SUBNET, "cidr": "10.0.0.0/24", "ip_version": 4, "gateway_ip": "10.0.0.1",
              "enable_dhcp": False, "dns_nameservers": ["8.8.8.8"], "host_routes": [],
              "isolated": False, "dhcp_ip": None}
    subnet.update(kw)
    return subnet


def test_dhcp_network() -> None:
    nd = network_data(parse_view(make_view()))
    assert nd == {
        "links": [{"id": "tap9e8d7c6b-5a", "vif_id": PORT, "type": "bridge", "mtu": None,
                   "ethernet_mac_address": "fa:16:3e:11:22:33"}],
        "networks": [{"id": "network0", "type": "ipv4_dhcp", "link": "tap9e8d7c6b-5a",
                      "network_id": NET}],
        "services": [{"type": "dns", "address": "10.0.0.2"},
                     {"type": "dns", "address": "8.8.8.8"}],
    }


def test_static_dual_stack_with_routes() -> None:
    v6 = _subnet(id="v6", cidr="fd00::/64", ip_version=6, gateway_ip="fd00::1",
                 dns_nameservers=["8.8.8.8", "fd00::53"])
    v4 = _subnet(host_routes=[{"destination": "192.168.0.0/16", "nexthop": "10.0.0.254"}])
    view = make_view(ports=[_port([v4, v6], [("v6", "fd00::5"), (SUBNET, "10.0.0.5")])])
    nd = network_data(parse_view(view))
    assert nd["links"][0]["mtu"] == 1450
    assert nd["networks"] == [
        {"id": "network0", "type": "ipv4", "link": "tap9e8d7c6b-5a", "ip_address": "10.0.0.5",
         "netmask": "255.255.255.0",
         "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.0.0.1"},
                    {"network": "192.168.0.0", "netmask": "255.255.0.0",
                     "gateway": "10.0.0.254"}],
         "network_id": NET, "services": [{"type": "dns", "address": "8.8.8.8"}]},
        {"id": "network1", "type": "ipv6", "link": "tap9e8d7c6b-5a", "ip_address": "fd00::5",
         "netmask": "ffff:ffff:ffff:ffff::",
         "routes": [{"network": "::", "netmask": "::", "gateway": "fd00::1"}],
         "network_id": NET, "services": [{"type": "dns", "address": "8.8.8.8"},
                                         {"type": "dns", "address": "fd00::53"}]},
    ]
    assert nd["services"] == [{"type": "dns", "address": "8.8.8.8"},
                              {"type": "dns", "address": "fd00::53"}]
    assert list(nd["networks"][0]) == ["id", "type", "link", "ip_address", "netmask", "routes",
                                       "network_id", "services"]


def test_static_ipv6_with_an_address_mode_is_typed_by_it() -> None:
    for mode, kind in ((None, "ipv6"), ("slaac", "ipv6_slaac"),
                       ("dhcpv6-stateless", "ipv6_dhcpv6-stateless")):
        v6 = _subnet(id="v6", cidr="fd00::/64", ip_version=6, gateway_ip="fd00::1",
                     enable_dhcp=False, ipv6_address_mode=mode)
        view = make_view(ports=[_port([v6], [("v6", "fd00::f816:3eff:fe00:5")])])
        net = network_data(parse_view(view))["networks"][0]
        assert net["type"] == kind and net["ip_address"] == "fd00::f816:3eff:fe00:5"
    dhcp = _subnet(id="v6", cidr="fd00::/64", ip_version=6, ipv6_address_mode="slaac",
                   enable_dhcp=True)
    view = make_view(ports=[_port([dhcp], [("v6", "fd00::5")])])
    assert network_data(parse_view(view))["networks"][0]["type"] == "ipv6_dhcp"


def test_metadata_route_on_isolated_static_subnet() -> None:
    iso = _subnet(isolated=True, dhcp_ip="10.0.0.2", gateway_ip=None)
    nd = network_data(parse_view(make_view(ports=[_port([iso], [(SUBNET, "10.0.0.5")])])))
    assert nd["networks"][0]["routes"] == [
        {"network": "169.254.169.254", "netmask": "255.255.255.255", "gateway": "10.0.0.2"}]
    routed = _subnet(isolated=False, dhcp_ip="10.0.0.2")
    nd = network_data(parse_view(make_view(ports=[_port([routed], [(SUBNET, "10.0.0.5")])])))
    assert all(r["network"] != "169.254.169.254" for r in nd["networks"][0]["routes"])



def test_metadata_route_with_several_dhcp_nodes_goes_via_the_lowest_address() -> None:
    iso = _subnet(isolated=True, gateway_ip=None, dhcp_ips=["10.0.0.30", "10.0.0.4"],
                  dhcp_ip="10.0.0.30")
    view = parse_view(make_view(ports=[_port([iso], [(SUBNET, "10.0.0.5")])]))
    assert view.ports[0].subnets[0].dhcp_ips == ("10.0.0.4", "10.0.0.30")
    assert network_data(view)["networks"][0]["routes"] == [
        {"network": "169.254.169.254", "netmask": "255.255.255.255", "gateway": "10.0.0.4"}]

def test_two_ports_numbering_and_no_ports() -> None:
    second = _port([_subnet(id="s2", cidr="10.1.0.0/24")], [("s2", "10.1.0.9")],
                   id="11112222-3333-4444-5555-666677778888", mac_address="fa:16:3e:00:00:02")
    view = make_view(ports=[make_view()["ports"][0], second])
    nd = network_data(parse_view(view))
    assert [link["id"] for link in nd["links"]] == ["tap9e8d7c6b-5a", "tap11112222-33"]
    assert [n["id"] for n in nd["networks"]] == ["network0", "network1"]
    assert nd["networks"][1]["link"] == "tap11112222-33"
    assert network_data(parse_view(make_view(ports=[]))) == {
        "links": [], "networks": [], "services": []}


def test_served_as_json_for_any_version() -> None:
    d = docs()
    target = get(d, "/openstack/2012-08-10/network_data.json")
    assert target.content_type == "application/json"
    assert json.loads(target.body) == network_data(parse_view(make_view()))
