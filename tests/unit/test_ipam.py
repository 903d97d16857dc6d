"""core.ipam: CIDR, gateway, pools, fixed IPs, free-IP search, MACs."""

from __future__ import annotations

import ipaddress
import itertools
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from openimds.core import ipam
from openimds.errors import BadRequest

ip = ipaddress.ip_address
net = ipaddress.ip_network


def test_parse_cidr() -> None:
    assert ipam.parse_cidr("10.0.0.0/24") == net("10.0.0.0/24")
    assert ipam.parse_cidr("fd00::/64") == net("fd00::/64")
    for bad in ("10.0.0.1/24", "10.0.0.0/33", "10.0.0.0", "banana", "10.0.0.0/32", 5, None):
        with pytest.raises(BadRequest) as exc:
            ipam.parse_cidr(bad)
        assert exc.value.reason.startswith("cidr: ")


def test_gateway_and_default_pools() -> None:
    v4 = net("10.0.0.0/24")
    assert ipam.default_gateway(v4) == ip("10.0.0.1")
    assert ipam.default_pools(v4, ip("10.0.0.1")) == [ipam.Pool(ip("10.0.0.2"),
                                                                ip("10.0.0.254"))]
    assert ipam.default_pools(v4, None) == [ipam.Pool(ip("10.0.0.1"), ip("10.0.0.254"))]
    assert ipam.default_pools(v4, ip("10.0.0.100")) == [
        ipam.Pool(ip("10.0.0.1"), ip("10.0.0.99")), ipam.Pool(ip("10.0.0.101"),
                                                              ip("10.0.0.254"))]
    assert ipam.default_pools(v4, ip("10.0.0.254")) == [ipam.Pool(ip("10.0.0.1"),
                                                                  ip("10.0.0.253"))]
    v6 = net("fd00::/120")
    assert ipam.default_gateway(v6) == ip("fd00::1")
    assert ipam.default_pools(v6, ip("fd00::1")) == [ipam.Pool(ip("fd00::2"), ip("fd00::ff"))]
    p2p = net("10.0.0.0/31")
    assert ipam.default_pools(p2p, None) == [ipam.Pool(ip("10.0.0.0"), ip("10.0.0.1"))]


def test_validate_fixed_ip() -> None:
    v4 = net("10.0.0.0/24")
    ipam.validate_fixed_ip(v4, ip("10.0.0.5"))
    for bad in ("10.0.0.0", "10.0.0.255", "10.0.1.1", "fd00::1"):
        with pytest.raises(BadRequest) as exc:
            ipam.validate_fixed_ip(v4, ip(bad), "fixed_ip")
        assert bad in exc.value.reason and exc.value.reason.startswith("fixed_ip: ")


def test_parse_pools() -> None:
    v4 = net("10.0.0.0/24")
    gw = ip("10.0.0.1")
    pools = ipam.parse_pools([{"start": "10.0.0.50", "end": "10.0.0.60"},
                              {"start": "10.0.0.10", "end": "10.0.0.20"}], v4, gw)
    assert [p.as_dict() for p in pools] == [{"start": "10.0.0.10", "end": "10.0.0.20"},
                                            {"start": "10.0.0.50", "end": "10.0.0.60"}]
    bad_inputs = [
        ([{"start": "10.0.0.1", "end": "10.0.0.9"}], "allocation_pools[0]: pool"),
        ([{"start": "10.0.0.9", "end": "10.0.0.5"}], "allocation_pools[0]: start"),
        ([{"start": "10.0.0.5", "end": "10.0.1.5"}], "allocation_pools[0].end"),
        ([{"start": "10.0.0.5"}], "allocation_pools[0]"),
        ([{"start": "10.0.0.5", "end": "10.0.0.9"}, {"start": "10.0.0.9", "end": "10.0.0.12"}],
         "overlap"),
        ("10.0.0.5-10.0.0.9", "allocation_pools"),
    ]
    for raw, text in bad_inputs:
        with pytest.raises(BadRequest) as exc:
            ipam.parse_pools(raw, v4, gw)
        assert text in exc.value.reason


def test_dns_and_routes() -> None:
    assert ipam.parse_dns(["8.8.8.8", "2001:4860:4860::8888"]) == [
        "8.8.8.8", "2001:4860:4860::8888"]
    with pytest.raises(BadRequest):
        ipam.parse_dns(["8.8.8.8", "8.8.8.8"])
    v4 = net("10.0.0.0/24")
    assert ipam.parse_host_routes([{"destination": "0.0.0.0/0", "nexthop": "10.0.0.254"}],
                                  v4) == [{"destination": "0.0.0.0/0", "nexthop": "10.0.0.254"}]
    with pytest.raises(BadRequest) as exc:
        ipam.parse_host_routes([{"destination": "::/0", "nexthop": "fd00::1"}], v4)
    assert "host_routes[0]" in exc.value.reason


def test_first_free_skips_used() -> None:
    pools = [ipam.Pool(ip("10.0.0.2"), ip("10.0.0.4")), ipam.Pool(ip("10.0.0.10"),
                                                                  ip("10.0.0.10"))]
    assert ipam.first_free(pools, set()) == ip("10.0.0.2")
    assert ipam.first_free(pools, {ip("10.0.0.2"), ip("10.0.0.3")}) == ip("10.0.0.4")
    used = {ip("10.0.0.2"), ip("10.0.0.3"), ip("10.0.0.4")}
    assert ipam.first_free(pools, used) == ip("10.0.0.10")
    assert ipam.first_free(pools, used | {ip("10.0.0.10")}) is None


@given(taken=st.sets(st.integers(0, 40), max_size=40), v6=st.booleans(),
       split=st.integers(1, 39))
def test_first_free_of_text_matches_first_free(taken: set[int], v6: bool, split: int) -> None:
    base = ip("fd00::") if v6 else ip("10.0.0.0")
    pools = [ipam.Pool(base + 1, base + split), ipam.Pool(base + split + 2, base + 40)]
    used = {base + t for t in taken}
    # Addresses of the other version never count (a subnet holds one version).
    other = ["10.0.0.1"] if v6 else ["fd00::1"]
    assert ipam.first_free_of(pools, [str(u) for u in used] + other) == \
        ipam.first_free(pools, used)


def test_normalize_ip() -> None:
    assert ipam.normalize_ip(ip("::ffff:10.0.0.5")) == ip("10.0.0.5")
    assert ipam.normalize_ip(ip("fd00::5")) == ip("fd00::5")


def test_mac() -> None:
    assert ipam.generate_mac(lambda n: bytes([0, 0xAB, 0xFF])) == "fa:16:3e:00:ab:ff"
    rng = random.Random(7)
    macs = {ipam.generate_mac(rng.randbytes) for _ in range(200)}
    assert all(ipam.is_valid_mac(m) and m.startswith("fa:16:3e:") for m in macs)
    assert not ipam.is_valid_mac("01:00:5e:00:00:01")  # multicast
    assert not ipam.is_valid_mac("fa:16:3e:00:00")
    assert not ipam.is_valid_mac("fa:16:3e:00:00:zz")


@given(prefix=st.integers(min_value=8, max_value=30), base=st.integers(0, 2**32 - 1),
       gw_offset=st.integers(0, 2**32 - 1), taken=st.sets(st.integers(0, 300), max_size=40))
def test_allocation_never_hits_gateway_network_broadcast_or_used(
    prefix: int, base: int, gw_offset: int, taken: set[int]
) -> None:
    network = ipaddress.IPv4Network((base, prefix), strict=False)
    hosts = network.num_addresses - 2
    gateway = network.network_address + 1 + gw_offset % hosts
    pools = ipam.default_pools(network, gateway)
    used = {network.network_address + 1 + t % hosts for t in taken}
    got = ipam.first_free(pools, used)
    if got is None:
        assert len(used | {gateway}) == hosts
        return
    assert got in network and got not in used and got != gateway
    assert got not in (network.network_address, network.broadcast_address)
    ipam.validate_fixed_ip(network, got)
    # It is the lowest such address.
    lower = list(itertools.takewhile(lambda a: a != got, ipam.iter_pool_ips(pools)))
    assert all(a in used for a in lower)


@given(prefix=st.integers(min_value=64, max_value=126), base=st.integers(0, 2**128 - 1))
def test_v6_pools_cover_all_but_subnet_router_anycast_and_gateway(prefix: int,
                                                                  base: int) -> None:
    network = ipaddress.IPv6Network((base, prefix), strict=False)
    gateway = ipam.default_gateway(network)
    pools = ipam.default_pools(network, gateway)
    assert sum(int(p.end) - int(p.start) + 1 for p in pools) == network.num_addresses - 2
    assert all(network.network_address not in p and gateway not in p for p in pools)


# --- IPv6: modes, EUI-64 both ways ---------------------------------------------------------


def test_eui64_matches_neutrons_link_local_example() -> None:
    # neutron's test_agent.py uses fe80::5054:ff:fede:5bbf for MAC 52:54:00:de:5b:bf
    assert str(ipam.link_local_address("52:54:00:de:5b:bf")) == "fe80::5054:ff:fede:5bbf"
    assert ipam.mac_from_eui64(ipaddress.ip_address("fe80::5054:ff:fede:5bbf")) \
        == "52:54:00:de:5b:bf"
    net = ipaddress.IPv6Network("2001:db8:1::/64")
    assert str(ipam.eui64_address(net, "FA:16:3E:00:00:05")) == "2001:db8:1:0:f816:3eff:fe00:5"


@given(mac=st.binary(min_size=6, max_size=6), base=st.integers(0, 2**64 - 1))
def test_eui64_round_trips_every_unicast_mac(mac: bytes, base: int) -> None:
    text = ":".join(f"{b:02x}" for b in bytes([mac[0] & 0xFE]) + mac[1:])
    net = ipaddress.IPv6Network((base << 64, 64))
    addr = ipam.eui64_address(net, text)
    assert addr in net and ipam.mac_from_eui64(addr) == text


@pytest.mark.parametrize("ip", ["fe80::1", "fe80::1234:5678:9abc:def0", "10.0.0.5",
                                "fe80::300:ff:fe00:1"])  # the last one decodes to a multicast MAC
def test_no_mac_in_non_eui64_addresses(ip: str) -> None:
    assert ipam.mac_from_eui64(ipaddress.ip_address(ip)) is None


def test_ipv6_modes_follow_neutrons_rules() -> None:
    v6, v4 = ipaddress.ip_network("fd00::/64"), ipaddress.ip_network("10.0.0.0/24")
    assert ipam.parse_ipv6_modes(None, None, v4) == (None, None)
    assert ipam.parse_ipv6_modes("slaac", "slaac", v6) == ("slaac", "slaac")
    assert ipam.parse_ipv6_modes("dhcpv6-stateful", None, ipaddress.ip_network("fd00::/80")) \
        == ("dhcpv6-stateful", None)
    for args in (("slaac", None, v4), ("bogus", None, v6), ("slaac", "dhcpv6-stateless", v6),
                 ("dhcpv6-stateless", None, ipaddress.ip_network("fd00::/96"))):
        with pytest.raises(BadRequest):
            ipam.parse_ipv6_modes(*args)
