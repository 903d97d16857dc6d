"""core.caller: the proxy's headers -> Caller, and the registry's ports -> one instance."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openimds.core.caller import Caller, normalise_ip, parse_caller, resolve
from openimds.errors import (
    AmbiguousCaller,
    BadRequest,
    OpenImdsError,
    SpoofedRequest,
    UnknownCaller,
)

R = "7d1f3a0e-0c55-4d0b-9a39-5f0a4b2c9e11"
N = "3b0f9c2a-1111-4e4e-8a8a-222233334444"


def h(**kw: str) -> list[tuple[bytes, bytes]]:
    names = {"xff": b"x-forwarded-for", "router": b"x-neutron-router-id",
             "network": b"x-neutron-network-id"}
    return [(names[k], v.encode()) for k, v in kw.items()]


def test_router_caller() -> None:
    c = parse_caller(h(xff="10.0.0.5", router=R))
    assert c == Caller(ip="10.0.0.5", router_id=R, network_id=None)
    assert c.scope == ("router", R)
    assert c.describe() == f"ip=10.0.0.5 router={R}"


def test_network_caller() -> None:
    c = parse_caller(h(xff="10.0.0.5", network=N))
    assert c.scope == ("network", N)


@pytest.mark.parametrize("raw,want", [
    ("::ffff:10.0.0.5", "10.0.0.5"),
    ("::FFFF:10.0.0.5", "10.0.0.5"),
    (" 10.0.0.5 ", "10.0.0.5"),
    ("2001:DB8::0:1", "2001:db8::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("::ffff:a00:5", "10.0.0.5"),
])
def test_normalise(raw: str, want: str) -> None:
    assert normalise_ip(raw) == want
    assert parse_caller(h(xff=raw, router=R)).ip == want


def test_last_forwarded_value_wins() -> None:
    # a VM-sent XFF followed by the one our proxy wrote, as two headers or one comma list
    two = [(b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-for", b"10.0.0.7"),
           (b"x-neutron-router-id", R.encode())]
    assert parse_caller(two).ip == "10.0.0.7"
    assert parse_caller(h(xff="6.6.6.6, ::ffff:10.0.0.8", router=R)).ip == "10.0.0.8"


@pytest.mark.parametrize("xff", ["", "nonsense", "10.0.0", "10.0.0.5, junk", "1.2.3.4/24",
                                 "[::1]", "10.0.0.5:80"])
def test_garbage_forwarded_for_is_400(xff: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_caller(h(xff=xff, router=R))
    assert err.value.status == 400


def test_missing_forwarded_for_is_400() -> None:
    with pytest.raises(BadRequest, match="missing"):
        parse_caller(h(router=R))


def test_both_ids_is_spoofed() -> None:
    with pytest.raises(SpoofedRequest, match="both") as err:
        parse_caller(h(xff="10.0.0.5", router=R, network=N))
    assert err.value.status == 400


def test_neither_id_is_spoofed() -> None:
    with pytest.raises(SpoofedRequest, match="neither"):
        parse_caller(h(xff="10.0.0.5"))


def test_repeated_id_is_spoofed() -> None:
    hs = h(xff="10.0.0.5", router=R) + [(b"x-neutron-router-id", R.encode())]
    with pytest.raises(SpoofedRequest, match="2 times"):
        parse_caller(hs)


@pytest.mark.parametrize("bad", ["", "a b", "a&network_id=x", "../x", "é", "x" * 200])
def test_garbage_id_is_spoofed(bad: str) -> None:
    with pytest.raises(SpoofedRequest):
        parse_caller([(b"x-forwarded-for", b"10.0.0.5"),
                      (b"x-neutron-network-id", bad.encode())])


def test_non_ascii_forwarded_for() -> None:
    with pytest.raises(BadRequest):
        parse_caller([(b"x-forwarded-for", b"\xff10.0.0.1"), (b"x-neutron-router-id", b"r")])


def test_huge_forwarded_for() -> None:
    with pytest.raises(BadRequest, match="too long"):
        parse_caller([(b"x-forwarded-for", b"1" * 10000), (b"x-neutron-router-id", b"r")])


def port(pid: str, device: str = "inst", project: str = "proj") -> dict[str, str]:
    return {"id": pid, "network_id": N, "device_id": device, "device_owner": "compute:nova",
            "project_id": project, "mac_address": "fa:16:3e:00:00:01"}


def test_resolve_one_port() -> None:
    c = Caller("10.0.0.5", router_id=R)
    r = resolve(c, [port("p1", "i1", "t1")])
    assert (r.instance_id, r.project_id, r.port_id, r.network_id) == ("i1", "t1", "p1", N)


def test_resolve_zero_ports() -> None:
    with pytest.raises(UnknownCaller) as err:
        resolve(Caller("10.0.0.5", network_id=N), [])
    assert err.value.status == 404
    assert "10.0.0.5" in err.value.reason and N in err.value.reason


def test_resolve_two_ports_names_them() -> None:
    with pytest.raises(AmbiguousCaller) as err:
        resolve(Caller("10.0.0.5", router_id=R), [port("p1"), port("p2")])
    assert err.value.status == 404
    assert "p1" in err.value.reason and "p2" in err.value.reason


def test_resolve_port_without_device() -> None:
    with pytest.raises(UnknownCaller, match="no device"):
        resolve(Caller("10.0.0.5", router_id=R), [port("p1", device="")])



def test_resolve_never_takes_a_dhcp_port_for_an_instance() -> None:
    dhcp = {**port("pd", device=f"dhcp{'1' * 8}-{N}"), "device_owner": "network:dhcp"}
    with pytest.raises(UnknownCaller, match="DHCP port") as err:
        resolve(Caller("10.0.0.3", network_id=N), [dhcp])
    assert err.value.status == 404

_names = st.sampled_from([b"x-forwarded-for", b"x-neutron-router-id", b"x-neutron-network-id",
                          b"host", b"x-other"])
_headers = st.lists(st.tuples(_names, st.binary(max_size=80)), max_size=8)


@settings(max_examples=500)
@given(_headers)
def test_hostile_headers_parse_or_raise_a_400(headers: list[tuple[bytes, bytes]]) -> None:
    try:
        c = parse_caller(headers)
    except OpenImdsError as exc:
        assert exc.status == 400
        assert "\n" not in exc.reason and "\r" not in exc.reason
        return
    ipaddress.ip_address(c.ip)  # always a clean address
    assert (c.router_id is None) != (c.network_id is None)
    ident = c.router_id or c.network_id
    assert ident is not None and ident.isprintable() and " " not in ident


@given(st.ip_addresses(v=4))
def test_mapped_v4_always_normalises(addr: ipaddress.IPv4Address) -> None:
    mapped = f"::ffff:{addr}"
    assert parse_caller(h(xff=mapped, network=N)).ip == str(addr)


@given(st.ip_addresses())
def test_any_address_round_trips(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    ip = parse_caller(h(xff=str(addr), router=R)).ip
    parsed = ipaddress.ip_address(ip)
    assert parsed == addr or (isinstance(addr, ipaddress.IPv6Address)
                              and addr.ipv4_mapped == parsed)
