"""IP address management, pure: parse and validate subnets, pools, routes; pick free IPs; MACs.

Rules (Neutron's):
- gateway_ip omitted = the first host of the CIDR; ``None`` = no gateway.
- default allocation pools = the CIDR minus the network address, minus the broadcast
  address (IPv4 only), minus the gateway.
- explicit pools must lie inside the CIDR, must not overlap each other and must not
  contain the gateway.
- a fixed IP must lie inside the CIDR and must not be the network address or the
  IPv4 broadcast address; it may lie outside the pools.

Nothing here does I/O: free-IP search gets the used set (the registry picks from each
subnet's availability ranges, core/ipranges.py), MAC generation gets the random source.
Every error is a `BadRequest` naming the field and the value.
"""

from __future__ import annotations

import bisect
import ipaddress
import socket
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from openimds.errors import BadRequest

__all__ = [
    "IPAddress",
    "IPNetwork",
    "Pool",
    "default_gateway",
    "default_pools",
    "eui64_address",
    "first_free",
    "first_free_of",
    "generate_mac",
    "is_valid_mac",
    "link_local_address",
    "mac_from_eui64",
    "normalize_ip",
    "parse_ipv6_modes",
    "parse_cidr",
    "parse_dns",
    "parse_host_routes",
    "parse_ip",
    "parse_pools",
    "validate_fixed_ip",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
MAC_PREFIX = "fa:16:3e"
# Neutron's ipv6_address_mode / ipv6_ra_mode values. SLAAC and DHCPv6-stateless subnets
# address a port by EUI-64 from its MAC (Neutron's "auto-address" subnets); stateful DHCPv6
# and static (no mode) subnets hand out addresses from the pools like IPv4.
IPV6_MODES = ("slaac", "dhcpv6-stateful", "dhcpv6-stateless")
AUTO_ADDRESS_MODES = frozenset({"slaac", "dhcpv6-stateless"})
LINK_LOCAL_NET = ipaddress.IPv6Network("fe80::/64")


@dataclass(frozen=True, slots=True)
class Pool:
    """An inclusive range of addresses."""

    start: IPAddress
    end: IPAddress

    def __contains__(self, ip: object) -> bool:
        if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return ip.version == self.start.version and self.start <= ip <= self.end  # type: ignore[operator]

    def as_dict(self) -> dict[str, str]:
        return {"start": str(self.start), "end": str(self.end)}


def parse_ip(text: Any, field: str) -> IPAddress:
    """An IPv4 or IPv6 address, or BadRequest naming the field."""
    if not isinstance(text, str):
        raise BadRequest(f"{field}: expected an IP address string, got {text!r}")
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        raise BadRequest(f"{field}: {text!r} is not an IP address") from None


def normalize_ip(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:10.0.0.5) becomes the IPv4 address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_cidr(text: Any, field: str = "cidr") -> IPNetwork:
    """A network in CIDR form with no host bits set, or BadRequest naming the field."""
    if not isinstance(text, str) or "/" not in text:
        raise BadRequest(f"{field}: {text!r} is not a CIDR (like 10.0.0.0/24)")
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise BadRequest(f"{field}: {text!r} is not a valid CIDR: {exc}") from None
    if net.num_addresses < 2:
        raise BadRequest(f"{field}: {text!r} is too small for a subnet")
    return net


def _last_usable(net: IPNetwork) -> IPAddress:
    if net.version == 4 and net.prefixlen < 31:
        return net.broadcast_address - 1
    return net.broadcast_address


def _first_usable(net: IPNetwork) -> IPAddress:
    if net.version == 4 and net.prefixlen >= 31:
        return net.network_address
    return net.network_address + 1


def default_gateway(net: IPNetwork) -> IPAddress:
    """The first host of the network."""
    return _first_usable(net)


def validate_fixed_ip(net: IPNetwork, ip: IPAddress, field: str = "ip_address") -> None:
    """BadRequest unless ip is a usable host address of net."""
    if ip.version != net.version or ip not in net:
        raise BadRequest(f"{field}: {ip} is not inside subnet {net}")
    if not _first_usable(net) <= ip <= _last_usable(net):  # type: ignore[operator]
        raise BadRequest(f"{field}: {ip} is the network or broadcast address of {net}")


def _split(pool: Pool, hole: IPAddress | None) -> list[Pool]:
    if hole is None or hole not in pool:
        return [pool]
    out = []
    if pool.start < hole:  # type: ignore[operator]
        out.append(Pool(pool.start, hole - 1))
    if hole < pool.end:  # type: ignore[operator]
        out.append(Pool(hole + 1, pool.end))
    return out


def default_pools(net: IPNetwork, gateway: IPAddress | None) -> list[Pool]:
    """The CIDR minus network address, IPv4 broadcast and gateway."""
    whole = Pool(_first_usable(net), _last_usable(net))
    return _split(whole, gateway)


def parse_pools(
    raw: Any, net: IPNetwork, gateway: IPAddress | None, field: str = "allocation_pools"
) -> list[Pool]:
    """Explicit pools [{start, end}]: inside net, ordered, disjoint, gateway outside."""
    if not isinstance(raw, list):
        raise BadRequest(f"{field}: expected a list of {{start, end}}, got {raw!r}")
    pools: list[Pool] = []
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(item, dict) or set(item) != {"start", "end"}:
            raise BadRequest(f"{where}: expected {{start, end}}, got {item!r}")
        start = parse_ip(item["start"], f"{where}.start")
        end = parse_ip(item["end"], f"{where}.end")
        validate_fixed_ip(net, start, f"{where}.start")
        validate_fixed_ip(net, end, f"{where}.end")
        if end < start:  # type: ignore[operator]
            raise BadRequest(f"{where}: start {start} is after end {end}")
        pool = Pool(start, end)
        if gateway is not None and gateway in pool:
            raise BadRequest(f"{where}: pool {start}-{end} contains the gateway {gateway}")
        pools.append(pool)
    pools.sort(key=lambda p: int(p.start))
    for a, b in zip(pools, pools[1:], strict=False):
        if int(b.start) <= int(a.end):
            raise BadRequest(f"{field}: pools {a.start}-{a.end} and {b.start}-{b.end} overlap")
    return pools


def parse_dns(raw: Any, field: str = "dns_nameservers") -> list[str]:
    if not isinstance(raw, list):
        raise BadRequest(f"{field}: expected a list of IP addresses, got {raw!r}")
    out: list[str] = []
    for i, item in enumerate(raw):
        ip = str(parse_ip(item, f"{field}[{i}]"))
        if ip in out:
            raise BadRequest(f"{field}: {ip} is listed twice")
        out.append(ip)
    return out


def parse_host_routes(raw: Any, net: IPNetwork, field: str = "host_routes") -> list[dict[str, str]]:
    """[{destination: CIDR, nexthop: IP}] with nexthop of the subnet's IP version."""
    if not isinstance(raw, list):
        raise BadRequest(f"{field}: expected a list of {{destination, nexthop}}, got {raw!r}")
    out: list[dict[str, str]] = []
    for i, item in enumerate(raw):
        where = f"{field}[{i}]"
        if not isinstance(item, dict) or set(item) != {"destination", "nexthop"}:
            raise BadRequest(f"{where}: expected {{destination, nexthop}}, got {item!r}")
        dest = item["destination"]
        try:
            dnet = ipaddress.ip_network(str(dest), strict=True)
        except ValueError:
            raise BadRequest(f"{where}.destination: {dest!r} is not a CIDR") from None
        hop = parse_ip(item["nexthop"], f"{where}.nexthop")
        if dnet.version != net.version or hop.version != net.version:
            raise BadRequest(f"{where}: route {dest} via {hop} is not IPv{net.version}")
        out.append({"destination": str(dnet), "nexthop": str(hop)})
    return out


def overlapping(net: IPNetwork, others: Iterable[IPNetwork]) -> IPNetwork | None:
    """The first of others that overlaps net, if any."""
    for other in others:
        if other.version == net.version and net.overlaps(other):
            return other
    return None


def iter_pool_ips(pools: Sequence[Pool]) -> Iterator[IPAddress]:
    for pool in pools:
        ip = pool.start
        while True:
            yield ip
            if ip == pool.end:
                break
            ip = ip + 1


def first_free(pools: Sequence[Pool], used: Collection[IPAddress]) -> IPAddress | None:
    """The lowest address of the pools not in used. Looks at most len(used)+1 addresses."""
    for ip in iter_pool_ips(pools):
        if ip not in used:
            return ip
    return None


def first_free_of(pools: Sequence[Pool], used: Iterable[str]) -> IPAddress | None:
    """`first_free` for used addresses as the registry stores them (``str`` of an address):
    each becomes an integer by inet_pton (several times cheaper than parsing an
    ``ipaddress`` object), sorted once, so a pool is walked only across its used run."""
    if not pools:
        return None
    v6 = pools[0].start.version == 6
    family = socket.AF_INET6 if v6 else socket.AF_INET
    taken = sorted({int.from_bytes(socket.inet_pton(family, t), "big")
                    for t in used if (":" in t) == v6})
    for pool in pools:
        cand, end = int(pool.start), int(pool.end)
        i = bisect.bisect_left(taken, cand)
        while i < len(taken) and taken[i] == cand:
            cand += 1
            i += 1
        if cand <= end:
            return type(pool.start)(cand)
    return None


def generate_mac(randbytes: Callable[[int], bytes]) -> str:
    """fa:16:3e:xx:xx:xx from three random bytes (OpenStack's base MAC)."""
    tail = randbytes(3)
    if len(tail) != 3:
        raise ValueError("randbytes(3) must return 3 bytes")
    return MAC_PREFIX + "".join(f":{b:02x}" for b in tail)


def is_valid_mac(text: str) -> bool:
    """A unicast MAC in lower- or upper-case colon form."""
    parts = text.split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        return False
    try:
        first = int(parts[0], 16)
        for p in parts[1:]:
            int(p, 16)
    except ValueError:
        return False
    return not first & 1


def parse_ipv6_modes(
    address_mode: Any, ra_mode: Any, net: IPNetwork,
) -> tuple[str | None, str | None]:
    """(ipv6_address_mode, ipv6_ra_mode) as Neutron validates them.

    Each is None or one of slaac, dhcpv6-stateful, dhcpv6-stateless; only an IPv6 subnet
    may set them; when both are set they must be equal; an auto-address mode (EUI-64) needs
    a /64.
    """
    modes: list[str | None] = []
    for field, raw in (("ipv6_address_mode", address_mode), ("ipv6_ra_mode", ra_mode)):
        if raw is None:
            modes.append(None)
            continue
        if raw not in IPV6_MODES:
            raise BadRequest(f"{field}: {raw!r} is not one of {', '.join(IPV6_MODES)}")
        if net.version != 6:
            raise BadRequest(f"{field}: {raw!r} is only valid on an IPv6 subnet, not {net}")
        modes.append(str(raw))
    addr_mode, ra = modes
    if addr_mode is not None and ra is not None and addr_mode != ra:
        raise BadRequest(f"ipv6_ra_mode: {ra!r} must equal ipv6_address_mode {addr_mode!r} "
                         "when both are set")
    if addr_mode in AUTO_ADDRESS_MODES and net.prefixlen != 64:
        raise BadRequest(f"cidr: {addr_mode} needs a /64 prefix, {net} is /{net.prefixlen}")
    return addr_mode, ra


def _mac_bytes(mac: str) -> bytes:
    if not is_valid_mac(mac):
        raise BadRequest(f"mac_address: {mac!r} is not a unicast MAC address")
    return bytes(int(p, 16) for p in mac.split(":"))


def eui64_address(net: IPNetwork, mac: str) -> ipaddress.IPv6Address:
    """The modified EUI-64 address of mac in a /64 (RFC 4291 §2.5.1, as SLAAC forms it).

    >>> str(eui64_address(ipaddress.ip_network("fd00:1::/64"), "fa:16:3e:00:00:05"))
    'fd00:1::f816:3eff:fe00:5'
    """
    if net.version != 6 or net.prefixlen != 64:
        raise BadRequest(f"cidr: EUI-64 addresses need an IPv6 /64, not {net}")
    b = _mac_bytes(mac)
    iid = bytes([b[0] ^ 0x02, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return ipaddress.IPv6Address(int(net.network_address) | int.from_bytes(iid, "big"))


def link_local_address(mac: str) -> ipaddress.IPv6Address:
    """The fe80::/64 EUI-64 address a guest's kernel gives the NIC with this MAC."""
    return eui64_address(LINK_LOCAL_NET, mac)


def mac_from_eui64(ip: IPAddress) -> str | None:
    """The MAC an EUI-64 interface ID was derived from, or None (privacy/stable-privacy or
    manually chosen IDs carry no MAC: LP#1460177)."""
    if ip.version != 6:
        return None
    iid = (int(ip) & ((1 << 64) - 1)).to_bytes(8, "big")
    if iid[3:5] != b"\xff\xfe":
        return None
    mac = bytes([iid[0] ^ 0x02, iid[1], iid[2], iid[5], iid[6], iid[7]])
    if mac[0] & 1:  # a multicast MAC never names a port
        return None
    return ":".join(f"{x:02x}" for x in mac)
