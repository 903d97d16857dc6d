"""Names of kernel objects, as Neutron's agents spell them. Interface names stay ≤ 15 chars.

    bridge_name("0b3c...")      -> "brq0b3c..."[:14]   (Linux bridge agent: brq + id[:11])
    router_namespace(id)        -> "qrouter-<id>"
    router_leg(port_id)         -> "qr-<port id[:11]>"   (inside the router namespace)
    router_leg_peer(port_id)    -> "qrb-<port id[:11]>"  (bridge side, 15 chars)
    dhcp_namespace(net_id)      -> "qdhcp-<id>"
    dhcp_tap(port_id)           -> "tap<port id[:11]>"   (inside the DHCP namespace)
    dhcp_tap_peer(port_id)      -> "tpb<port id[:11]>"   (bridge side)
    vm_namespace(instance_id)   -> "vm-<id[:8]>"
    vm_peer(instance_id)        -> "vmb-<id[:8]>"        (bridge side; inside the VM it is eth0)
"""

from __future__ import annotations

IFNAMSIZ = 15
ROUTER_NS_PREFIX = "qrouter-"
DHCP_NS_PREFIX = "qdhcp-"
VM_NS_PREFIX = "vm-"


def _ifname(prefix: str, ident: str) -> str:
    return (prefix + ident)[:IFNAMSIZ]


def bridge_name(network_id: str) -> str:
    return _ifname("brq", network_id[:11])


def router_namespace(router_id: str) -> str:
    return ROUTER_NS_PREFIX + router_id


def router_leg(port_id: str) -> str:
    return _ifname("qr-", port_id[:11])


def router_leg_peer(port_id: str) -> str:
    return _ifname("qrb-", port_id[:11])


def dhcp_namespace(network_id: str) -> str:
    return DHCP_NS_PREFIX + network_id


def dhcp_tap(port_id: str) -> str:
    return _ifname("tap", port_id[:11])


def dhcp_tap_peer(port_id: str) -> str:
    return _ifname("tpb", port_id[:11])


def vm_namespace(instance_id: str) -> str:
    return VM_NS_PREFIX + instance_id[:8]


def vm_peer(instance_id: str) -> str:
    return _ifname("vmb-", instance_id[:8])


def router_listener_name(router_id: str) -> str:
    """Proxy listener spec name for a router (see docs/architecture.md)."""
    return f"router-{router_id}"


def network_listener_name(network_id: str) -> str:
    """Proxy listener spec name for an isolated network."""
    return f"network-{network_id}"
