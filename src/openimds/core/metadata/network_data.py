"""`network_data.json` from the view, as Nova's `nova/virt/netutils.get_network_metadata`.

Per port (a Nova VIF) one link; per link the first IPv4 and the first IPv6 subnet holding one
of the port's addresses become networks, numbered across the document (`network0`, ...).

- link: `id` is the tap device (`tap` + port id[:11], as Neutron's Linux bridge names it),
  `type` is `bridge` (our VIF type), `mtu` is the network's MTU, or null when the subnet has a
  DHCP server (DHCP delivers it; Nova's rule since the "do not send mtu" fix);
- a subnet with `enable_dhcp` is `ipv4_dhcp` / `ipv6_dhcp` with no addresses (Neutron gives
  the DHCP port addresses only on such subnets, so this is Nova's "has a DHCP server" rule);
  otherwise it is static with `ip_address`, `netmask`, the default route via the gateway, the
  host routes, and `services` (its DNS servers); a static IPv6 network with an
  `ipv6_address_mode` is typed `ipv6_<mode>` (`ipv6_slaac`, ...), as Nova types it;
- the metadata route: a static network on an isolated subnet (no router holds its gateway)
  cannot reach 169.254.169.254 through a router, so when the network's DHCP ports (whose
  namespaces serve metadata) have addresses on it, a `169.254.169.254/32` route via the
  lowest of them is added: the route Neutron's DHCP agent pushes with option 121 to DHCP
  clients. With several DHCP nodes the lowest address is the stable choice: a DHCP port keeps
  its address when its node dies and the port moves, and the node holding it is also the one
  that answers ARP for 169.254.169.254 (core/dnsmasq.py). (A DHCP network gets its route,
  via the answering server's own port, from DHCP itself.)
- top-level `services`: the DNS entries of every network, de-duplicated, in order.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from openimds.core.metadata.view import Port, Subnet, View
from openimds.core.names import dhcp_tap

__all__ = ["METADATA_IP", "network_data"]

METADATA_IP = "169.254.169.254"
VIF_TYPE = "bridge"


def _has_dhcp(subnet: Subnet) -> bool:
    return subnet.enable_dhcp


def _dns(subnet: Subnet) -> list[dict[str, str]]:
    return [{"type": "dns", "address": a} for a in subnet.dns_nameservers]


def _network(
    port: Port, subnet: Subnet, address: str, num: int, link_id: str
) -> dict[str, Any]:
    version = subnet.ip_version
    if _has_dhcp(subnet):
        return {"id": f"network{num}", "type": f"ipv{version}_dhcp", "link": link_id,
                "network_id": port.network_id}
    net = ipaddress.ip_network(subnet.cidr, strict=False)
    routes: list[dict[str, str]] = []
    if subnet.gateway_ip:
        anywhere = "0.0.0.0" if version == 4 else "::"
        routes.append({"network": anywhere, "netmask": anywhere, "gateway": subnet.gateway_ip})
    for destination, nexthop in subnet.host_routes:
        dest = ipaddress.ip_network(destination, strict=False)
        routes.append({"network": str(dest.network_address), "netmask": str(dest.netmask),
                       "gateway": nexthop})
    if version == 4 and subnet.isolated and subnet.dhcp_ip and not any(
        r["network"] == METADATA_IP for r in routes
    ):
        routes.append({"network": METADATA_IP, "netmask": "255.255.255.255",
                       "gateway": subnet.dhcp_ip})
    kind = f"ipv{version}"
    if version == 6 and subnet.ipv6_address_mode:
        kind = f"ipv6_{subnet.ipv6_address_mode}"
    return {
        "id": f"network{num}",
        "type": kind,
        "link": link_id,
        "ip_address": address,
        "netmask": str(net.netmask),
        "routes": routes,
        "network_id": port.network_id,
        "services": _dns(subnet),
    }


def network_data(view: View) -> dict[str, Any]:
    """The document as a dict, keys in Nova's order."""
    links: list[dict[str, Any]] = []
    networks: list[dict[str, Any]] = []
    services: list[dict[str, str]] = []
    ifc_num = -1
    net_num = -1
    for port in view.ports:
        by_id = {s.id: s for s in port.subnets}
        first: dict[int, tuple[Subnet, str]] = {}
        for subnet_id, address in port.fixed_ips:
            subnet = by_id.get(subnet_id)
            if subnet is not None and subnet.ip_version not in first:
                first[subnet.ip_version] = (subnet, address)
        if not port.subnets:
            continue
        ifc_num += 1
        link_id = dhcp_tap(port.id) if port.id else f"interface{ifc_num}"
        mtu = None if any(_has_dhcp(s) for s in port.subnets) else port.network_mtu
        links.append({"id": link_id, "vif_id": port.id, "type": VIF_TYPE, "mtu": mtu,
                      "ethernet_mac_address": port.mac_address})
        for version in (4, 6):
            if version in first:
                subnet, address = first[version]
                net_num += 1
                networks.append(_network(port, subnet, address, net_num, link_id))
                services += [d for d in _dns(subnet) if d not in services]
    return {"links": links, "networks": networks, "services": services}
