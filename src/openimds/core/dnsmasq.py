"""What the DHCP agent wants for one network, rendered the way Neutron's Dnsmasq driver does.

This module never touches a file, a process or the kernel: it receives the registry's
topology as plain data and returns text and argv lists. `agents/dhcp.py` applies them.

Rules kept from Neutron (`neutron/agent/linux/dhcp.py`, reference/neutron.md §2.4):

- a subnet is *isolated* unless a router-interface port holds exactly its gateway IP
  (`isolated_subnets`); a router attached with another IP leaves it isolated;
- `should_enable_metadata` is evaluated in Neutron's order: OVN metadata port, no DHCP
  subnet, force_metadata, enable_isolated_metadata, enable_metadata_network, any isolated
  DHCP subnet;
- the opts file carries, per DHCP-enabled IPv4 subnet and tagged `subnet-<id>`: the DNS
  servers (an empty `dns-server` when there are none: dnsmasq runs with `--port=0`, so it
  has no DNS of its own to offer), option 121 and the Microsoft option 249 with the same
  routes, and the router option (empty when the subnet has no gateway). The metadata route
  goes via the DHCP port's IP when metadata is served from the DHCP namespace
  (force_metadata, or an isolated subnet with enable_isolated_metadata), else via the
  gateway of a routed subnet; sibling subnets of the network are on-link (`<cidr>,0.0.0.0`)
  and come first; when any route is pushed and there is a gateway, `0.0.0.0/0,<gw>` ends
  the list, because RFC 3442 clients ignore option 3 once option 121 is present;
- the hosts file holds one static lease `<mac>,<hostname>,<ip>` per fixed IP on a
  DHCP-enabled IPv4 subnet (the DHCP port itself and OVN metadata ports need none);
- dnsmasq gets one `--dhcp-range=set:subnet-<id>,<network>,static,<netmask>,<lease>` per
  DHCP-enabled IPv4 subnet and `--dhcp-lease-max` capped at the subnets' total size.

Several DHCP nodes per network (`[DEFAULT] dhcp_agents_per_network`): each node has its own
DHCP port (device_id `dhcp<uuid5(host)>-<network>`, `dhcp_port(network, host)`), so each
dnsmasq serves the whole subnet with the same static hosts file (whichever answers, a guest
gets the same address) and announces its *own* port IP as the option 121 next hop, and
`--dhcp-authoritative` lets a server ACK a renewal or reboot request for a lease the other
one granted (without it, dnsmasq NAKs a REQUEST it has no lease for: a rebinding client would
get an ACK from one server and a NAK from the other). Every node serving metadata holds
169.254.169.254/32 on its tap, but only one answers ARP for it (`metadata_arp`): the node of
the port with the lowest IPv4 address, the same port network_data.json routes static guests
via; the others run the tap with arp_ignore=2, which answers ARP only for an address in the
asker's own subnet, so their port IPs still resolve and 169.254.169.254 (a /32) does not. A
guest that ARPs for 169.254.169.254 directly (an on-link 169.254/16 route) thus sees one MAC.
A node that adopted a dead node's port (`adopted_ports`, `core.nodes` module doc) holds that
port's addresses too, as secondary addresses on its own tap (its own MAC: the agent announces
them with gratuitous ARP, so guests' neighbour caches drop the dead MAC), and answers ARP for
169.254.169.254 if the adopted port is the lowest one.

IPv6 subnets are ignored here (no DHCPv6 yet). Deliberate differences from Neutron are
marked "Unlike Neutron" where they occur.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from openimds.core import names
from openimds.core.models import dhcp_adopted_device_id, dhcp_device_id

__all__ = [
    "DHCP_OWNER",
    "METADATA_CIDR",
    "METADATA_IP",
    "DhcpNetwork",
    "DhcpPaths",
    "DhcpPort",
    "DhcpSubnet",
    "FixedIp",
    "MetadataFlags",
    "NetworkPlan",
    "adopted_ports",
    "dhcp_ips_by_subnet",
    "dhcp_port",
    "dnsmasq_argv",
    "format_option",
    "has_metadata_subnet",
    "isolated_subnets",
    "metadata_arp_port",
    "metadata_router_id",
    "networks_from_topology",
    "plan_network",
    "render_hosts",
    "render_opts",
    "should_enable_metadata",
]

METADATA_IP = "169.254.169.254"
METADATA_CIDR = "169.254.169.254/32"
# enable_metadata_network: a subnet inside this range is a "metadata network".
METADATA_NETWORK_CIDR = ipaddress.IPv4Network("169.254.0.0/16")
IPV4_ANY = "0.0.0.0/0"
# Microsoft's classless static route option, sent next to option 121 (Windows XP/2003).
WIN2K3_STATIC_ROUTES = 249
SUBNET_TAG = "subnet-{}"
DNSMASQ_LEASE_MAX = 2**24  # Neutron's dnsmasq_lease_max default

DHCP_OWNER = "network:dhcp"
OVN_METADATA_OWNER = "network:distributed"
ROUTER_INTERFACE_OWNERS = frozenset({
    "network:router_interface",
    "network:ha_router_replicated_interface",
    "network:router_interface_distributed",
})
# Ports that never ask for a lease: the DHCP port itself and OVN's metadata port.
_NO_LEASE_OWNERS = frozenset({DHCP_OWNER, OVN_METADATA_OWNER})


@dataclass(frozen=True, slots=True)
class FixedIp:
    subnet_id: str
    ip_address: str


@dataclass(frozen=True, slots=True)
class DhcpSubnet:
    id: str
    network_id: str
    cidr: str
    ip_version: int
    gateway_ip: str | None
    enable_dhcp: bool
    dns_nameservers: tuple[str, ...] = ()
    host_routes: tuple[tuple[str, str], ...] = ()  # (destination, nexthop)


@dataclass(frozen=True, slots=True)
class DhcpPort:
    id: str
    network_id: str
    mac_address: str
    device_owner: str
    device_id: str
    fixed_ips: tuple[FixedIp, ...]
    hostname: str | None = None


@dataclass(frozen=True, slots=True)
class DhcpNetwork:
    id: str
    mtu: int
    subnets: tuple[DhcpSubnet, ...]
    ports: tuple[DhcpPort, ...]
    segmentation_id: int | None = None  # the network's VNI (the fabric's, not dnsmasq's)

    @property
    def dhcp_subnets(self) -> tuple[DhcpSubnet, ...]:
        """DHCP-enabled IPv4 subnets, the ones dnsmasq serves."""
        return tuple(s for s in self.subnets if s.enable_dhcp and s.ip_version == 4)


@dataclass(frozen=True, slots=True)
class MetadataFlags:
    """The three [DEFAULT] options that decide isolated metadata (Neutron's names)."""

    enable_isolated_metadata: bool = False
    force_metadata: bool = False
    enable_metadata_network: bool = False

    @property
    def serves_metadata(self) -> bool:
        return self.enable_isolated_metadata or self.force_metadata


@dataclass(frozen=True, slots=True)
class DhcpPaths:
    """Where one network's dnsmasq files live (`[dhcp] dhcp_confs`/<network id>/...)."""

    conf_dir: str

    def _file(self, kind: str) -> str:
        return f"{self.conf_dir}/{kind}"

    @property
    def hosts(self) -> str:
        return self._file("host")

    @property
    def opts(self) -> str:
        return self._file("opts")

    @property
    def leases(self) -> str:
        return self._file("leases")

    @property
    def pid(self) -> str:
        return self._file("pid")

    @property
    def log(self) -> str:
        return self._file("dnsmasq.log")


# --- parsing the registry's /v1/topology ------------------------------------------------

def _subnet(raw: Mapping[str, Any]) -> DhcpSubnet:
    return DhcpSubnet(
        id=str(raw["id"]),
        network_id=str(raw["network_id"]),
        cidr=str(raw["cidr"]),
        ip_version=int(raw.get("ip_version") or ipaddress.ip_network(raw["cidr"]).version),
        gateway_ip=raw.get("gateway_ip") or None,
        enable_dhcp=bool(raw.get("enable_dhcp", True)),
        dns_nameservers=tuple(str(d) for d in raw.get("dns_nameservers") or ()),
        host_routes=tuple(
            (str(r["destination"]), str(r["nexthop"])) for r in raw.get("host_routes") or ()
        ),
    )


def _port(raw: Mapping[str, Any]) -> DhcpPort:
    return DhcpPort(
        id=str(raw["id"]),
        network_id=str(raw["network_id"]),
        mac_address=str(raw["mac_address"]).lower(),
        device_owner=str(raw.get("device_owner") or ""),
        device_id=str(raw.get("device_id") or ""),
        fixed_ips=tuple(
            FixedIp(str(f["subnet_id"]), str(f["ip_address"])) for f in raw.get("fixed_ips") or ()
        ),
        hostname=raw.get("hostname") or None,
    )


def networks_from_topology(topology: Mapping[str, Any]) -> dict[str, DhcpNetwork]:
    """Every network of a `/v1/topology` answer with its subnets and ports, by network id."""
    subnets: dict[str, list[DhcpSubnet]] = {}
    for raw in topology.get("subnets", ()):
        s = _subnet(raw)
        subnets.setdefault(s.network_id, []).append(s)
    ports: dict[str, list[DhcpPort]] = {}
    for raw in topology.get("ports", ()):
        p = _port(raw)
        ports.setdefault(p.network_id, []).append(p)
    result: dict[str, DhcpNetwork] = {}
    for raw in topology.get("networks", ()):
        net_id = str(raw["id"])
        result[net_id] = DhcpNetwork(
            id=net_id,
            mtu=int(raw.get("mtu") or 0),
            subnets=tuple(sorted(subnets.get(net_id, ()), key=lambda s: s.id)),
            ports=tuple(sorted(ports.get(net_id, ()), key=lambda p: p.id)),
            segmentation_id=int(raw["segmentation_id"]) if raw.get("segmentation_id") else None,
        )
    return result


# --- Neutron's decisions ----------------------------------------------------------------

def isolated_subnets(network: DhcpNetwork) -> dict[str, bool]:
    """subnet id -> isolated. Non-isolated only if a router port holds the gateway IP."""
    result = {s.id: True for s in network.subnets}
    gateways = {s.id: s.gateway_ip for s in network.subnets}
    for port in network.ports:
        if port.device_owner not in ROUTER_INTERFACE_OWNERS:
            continue
        for fip in port.fixed_ips:
            gw = gateways.get(fip.subnet_id)
            if gw is not None and _same_ip(gw, fip.ip_address):
                result[fip.subnet_id] = False
    return result


def has_metadata_subnet(subnets: Iterable[DhcpSubnet]) -> bool:
    """Whether some IPv4 subnet lies inside 169.254.0.0/16 (enable_metadata_network)."""
    for s in subnets:
        net = ipaddress.ip_network(s.cidr, strict=False)
        if isinstance(net, ipaddress.IPv4Network) and net.subnet_of(METADATA_NETWORK_CIDR):
            return True
    return False


def should_enable_metadata(flags: MetadataFlags, network: DhcpNetwork) -> bool:
    """Whether the DHCP namespace serves metadata for this network (Neutron's order)."""
    if any(p.device_owner == OVN_METADATA_OWNER for p in network.ports):
        return False
    dhcp_subnets = [s for s in network.subnets if s.enable_dhcp]
    if not dhcp_subnets:
        return False
    if flags.force_metadata:
        return True
    if not flags.enable_isolated_metadata:
        return False
    if flags.enable_metadata_network and has_metadata_subnet(network.subnets):
        return True
    isolated = isolated_subnets(network)
    return any(isolated[s.id] for s in dhcp_subnets)


def metadata_router_id(flags: MetadataFlags, network: DhcpNetwork) -> str | None:
    """The router a metadata network's listener speaks for, else None (network-scoped).

    With enable_metadata_network, a network holding a 169.254/16 subnet and a router port is
    served router-scoped: X-Neutron-Router-ID of the first router port's router.
    """
    if not (flags.enable_metadata_network and has_metadata_subnet(network.subnets)):
        return None
    for port in network.ports:
        if port.device_owner in ROUTER_INTERFACE_OWNERS and port.device_id:
            return port.device_id
    return None


def dhcp_port(network: DhcpNetwork, host: str | None = None) -> DhcpPort | None:
    """The DHCP port (device_owner network:dhcp) the node `host` serves: the one whose
    device_id names it. host=None (a single agent that is told no node name): the lowest
    id of the network's DHCP ports."""
    want = None if host is None else dhcp_device_id(host, network.id)
    for port in network.ports:
        if port.device_owner == DHCP_OWNER and (want is None or port.device_id == want):
            return port
    return None


def adopted_ports(network: DhcpNetwork, host: str | None) -> list[DhcpPort]:
    """The DHCP ports of dead nodes that the node `host` adopted (serves besides its own)."""
    if host is None:
        return []
    want = dhcp_adopted_device_id(host, network.id)
    return [p for p in network.ports if p.device_owner == DHCP_OWNER and p.device_id == want]


def _lowest_ipv4(port: DhcpPort) -> tuple[int, int]:
    addrs = [int(ipaddress.ip_address(f.ip_address)) for f in port.fixed_ips
             if ":" not in f.ip_address]
    return (0, min(addrs)) if addrs else (1, 0)


def metadata_arp_port(network: DhcpNetwork) -> DhcpPort | None:
    """The DHCP port whose node answers ARP for 169.254.169.254: the one holding the lowest
    IPv4 address (the next hop network_data.json gives static guests; stable, since a port
    keeps its addresses when it moves to another node)."""
    ports = [p for p in network.ports if p.device_owner == DHCP_OWNER]
    return min(ports, key=lambda p: (_lowest_ipv4(p), p.id)) if ports else None


def dhcp_ips_by_subnet(network: DhcpNetwork, port: DhcpPort | None = None) -> dict[str, str]:
    """subnet id -> the DHCP port's IP on it (port: this node's; default `dhcp_port`)."""
    port = port or dhcp_port(network)
    if port is None:
        return {}
    result: dict[str, str] = {}
    for fip in port.fixed_ips:
        result.setdefault(fip.subnet_id, fip.ip_address)
    return result


# --- rendering --------------------------------------------------------------------------

def format_option(tag: str, option: str | int, *values: str) -> str:
    """One opts-file line for an IPv4 option: named options get `option:`, codes stay bare.

    >>> format_option("subnet-1", "router", "10.0.0.1")
    'tag:subnet-1,option:router,10.0.0.1'
    >>> format_option("subnet-1", 249, "169.254.169.254/32,10.0.0.2")
    'tag:subnet-1,249,169.254.169.254/32,10.0.0.2'
    """
    name = str(option)
    if not name.isdigit():
        name = f"option:{name}"
    return ",".join((f"tag:{tag}", name, *values))


def _same_ip(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


def _default_hostname(ip: str) -> str:
    # Neutron's dns_assignment for ports without a dns_name: host-10-0-0-5
    return "host-" + ip.replace(".", "-").replace(":", "-")


def render_hosts(network: DhcpNetwork) -> str:
    """The dhcp-hostsfile: one `<mac>,<hostname>,<ip>` static lease per line."""
    dhcp_ids = {s.id for s in network.dhcp_subnets}
    lines: list[str] = []
    for port in network.ports:
        if port.device_owner in _NO_LEASE_OWNERS:
            continue
        for fip in port.fixed_ips:
            if fip.subnet_id not in dhcp_ids:
                continue
            hostname = port.hostname or _default_hostname(fip.ip_address)
            lines.append(f"{port.mac_address},{hostname},{fip.ip_address}")
    return "".join(line + "\n" for line in lines)


def _subnet_options(
    subnet: DhcpSubnet, network: DhcpNetwork, flags: MetadataFlags,
    isolated: Mapping[str, bool], dhcp_ips: Mapping[str, str],
) -> list[str]:
    tag = SUBNET_TAG.format(subnet.id)
    options: list[str] = []
    servers = [d for d in subnet.dns_nameservers if d != "0.0.0.0"]
    # Unlike Neutron (which then offers the DHCP port's own DNS), an empty value: we run
    # dnsmasq with --port=0, so it has no resolver to offer.
    options.append(format_option(tag, "dns-server", *([",".join(servers)] if servers else [])))

    gateway = subnet.gateway_ip
    routes: list[str] = []
    for destination, nexthop in subnet.host_routes:
        if destination == IPV4_ANY:
            if not gateway:
                gateway = nexthop
        else:
            routes.append(f"{destination},{nexthop}")

    if flags.force_metadata or (isolated[subnet.id] and flags.enable_isolated_metadata):
        dhcp_ip = dhcp_ips.get(subnet.id)
        if dhcp_ip:
            routes.append(f"{METADATA_CIDR},{dhcp_ip}")
    elif not isolated[subnet.id] and gateway:
        routes.append(f"{METADATA_CIDR},{gateway}")

    for sibling in network.subnets:
        if sibling.ip_version == 4 and sibling.cidr != subnet.cidr:
            routes.insert(0, f"{sibling.cidr},0.0.0.0")

    if routes:
        if gateway:
            routes.append(f"{IPV4_ANY},{gateway}")
        joined = ",".join(routes)
        options.append(format_option(tag, "classless-static-route", joined))
        options.append(format_option(tag, WIN2K3_STATIC_ROUTES, joined))

    options.append(format_option(tag, "router", *([gateway] if gateway else [])))
    return options


def render_opts(network: DhcpNetwork, flags: MetadataFlags,
                port: DhcpPort | None = None) -> str:
    """The dhcp-optsfile: per-subnet DNS, option 121/249 routes and router lines; the
    metadata route goes via `port` (this node's DHCP port; default `dhcp_port`)."""
    isolated = isolated_subnets(network)
    dhcp_ips = dhcp_ips_by_subnet(network, port)
    options: list[str] = []
    for subnet in network.dhcp_subnets:
        options += _subnet_options(subnet, network, flags, isolated, dhcp_ips)
    return "".join(line + "\n" for line in options)


def dnsmasq_argv(
    network: DhcpNetwork, interface: str, paths: DhcpPaths, *, lease_duration_s: int,
    binary: str = "dnsmasq", lease_max: int = DNSMASQ_LEASE_MAX, user: str = "",
) -> list[str]:
    """The dnsmasq command line for one network (run inside its qdhcp- namespace).

    Unlike Neutron, dnsmasq stays in the foreground (we supervise the process we spawned, not
    a pid file) and never serves DNS (`--port=0`).
    """
    lease = "infinite" if lease_duration_s == -1 else f"{lease_duration_s}s"
    argv = [
        binary,
        "--keep-in-foreground",
        "--no-hosts",
        "--no-resolv",
        "--port=0",
        "--conf-file=/dev/null",
        *([f"--user={user}"] if user else []),
        f"--pid-file={paths.pid}",
        f"--dhcp-hostsfile={paths.hosts}",
        f"--dhcp-optsfile={paths.opts}",
        f"--dhcp-leasefile={paths.leases}",
        "--log-dhcp",
        f"--log-facility={paths.log}",
        f"--interface={interface}",
        "--except-interface=lo",
        "--bind-interfaces",
        # ACK renewals of leases another DHCP node of the network granted (module doc)
        "--dhcp-authoritative",
    ]
    possible_leases = 0
    for subnet in network.dhcp_subnets:
        net = ipaddress.ip_network(subnet.cidr, strict=False)
        argv.append(
            f"--dhcp-range=set:{SUBNET_TAG.format(subnet.id)},{net.network_address},static,"
            f"{net.netmask},{lease}"
        )
        possible_leases += net.num_addresses
    if network.mtu > 0:
        argv.append(f"--dhcp-option-force=option:mtu,{network.mtu}")
    argv.append(f"--dhcp-lease-max={min(possible_leases, lease_max)}")
    return argv


# --- the whole plan for one network -----------------------------------------------------

@dataclass(frozen=True, slots=True)
class NetworkPlan:
    """Everything the agent makes for one network; compare plans to know what changed."""

    network_id: str
    namespace: str
    bridge: str
    port_id: str
    tap: str  # inside the namespace
    tap_peer: str  # bridge side
    mac_address: str
    addresses: tuple[str, ...]  # "ip/prefixlen" on the tap
    metadata: bool  # serve metadata from this namespace (listener + 169.254.169.254/32)
    router_id: str | None  # the listener is router-scoped (enable_metadata_network)
    # IPv6 addresses metadata also answers on (fe80::a9fe:a9fe[, fd00:ec2::254]): only when
    # metadata is served and the network has an IPv6 subnet; each is a /128 on the tap.
    metadata_ipv6: tuple[str, ...]
    # this node answers ARP for 169.254.169.254 (else the tap runs with arp_ignore=2)
    metadata_arp: bool
    hosts: str
    opts: str
    argv: tuple[str, ...]


def plan_network(
    network: DhcpNetwork, flags: MetadataFlags, conf_dir: str, *, lease_duration_s: int,
    binary: str = "dnsmasq", lease_max: int = DNSMASQ_LEASE_MAX, user: str = "",
    ipv6_metadata: tuple[str, ...] = (), host: str | None = None,
) -> NetworkPlan | None:
    """What to build for one network, or None when it needs no DHCP namespace.

    A network needs one when it has a DHCP-enabled IPv4 subnet and a DHCP port. Unlike
    Neutron, which adds 169.254.169.254/32 to every DHCP tap once isolated metadata is
    configured, the address follows `should_enable_metadata` together with the listener, so
    a routed network's DHCP namespace holds nothing that answers for the metadata IP.
    The IPv6 metadata addresses (`ipv6_metadata`) join it when the network has an IPv6
    subnet (Neutron adds fe80::a9fe:a9fe/128 then, LP#2074207). host: this node's name,
    whose own DHCP port is used (None: the network's first DHCP port), plus the addresses
    of the ports it adopted (after its own: the tap's primary addresses stay its own).
    """
    port = dhcp_port(network, host)
    if not network.dhcp_subnets or port is None:
        return None
    prefixes = {s.id: ipaddress.ip_network(s.cidr, strict=False).prefixlen
                for s in network.dhcp_subnets}
    addresses = [f"{f.ip_address}/{prefixes[f.subnet_id]}"
                 for f in port.fixed_ips if f.subnet_id in prefixes]
    if not addresses:
        return None  # no address to serve from (its subnets' pools were full)
    adopted = adopted_ports(network, host)
    addresses += [f"{f.ip_address}/{prefixes[f.subnet_id]}"
                  for a in adopted for f in a.fixed_ips if f.subnet_id in prefixes]
    metadata = should_enable_metadata(flags, network)
    metadata_ipv6: tuple[str, ...] = ()
    if metadata:
        addresses.append(METADATA_CIDR)
        if any(s.ip_version == 6 for s in network.subnets):
            metadata_ipv6 = tuple(ipv6_metadata)
            addresses += [f"{ip}/128" for ip in metadata_ipv6]
    tap = names.dhcp_tap(port.id)
    paths = DhcpPaths(conf_dir)
    return NetworkPlan(
        network_id=network.id,
        namespace=names.dhcp_namespace(network.id),
        bridge=names.bridge_name(network.id),
        port_id=port.id,
        tap=tap,
        tap_peer=names.dhcp_tap_peer(port.id),
        mac_address=port.mac_address,
        addresses=tuple(addresses),
        metadata=metadata,
        router_id=metadata_router_id(flags, network) if metadata else None,
        metadata_ipv6=metadata_ipv6,
        metadata_arp=metadata and metadata_arp_port(network) in (port, *adopted),
        hosts=render_hosts(network),
        opts=render_opts(network, flags, port),
        argv=tuple(dnsmasq_argv(network, tap, paths, lease_duration_s=lease_duration_s,
                                binary=binary, lease_max=lease_max, user=user)),
    )
