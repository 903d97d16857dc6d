"""Lab VMs: a network namespace that stands in for a server, so users and tests can be a VM.

`plug` makes namespace `vm-<server id[:8]>` with `eth0` (the port's MAC, the network's MTU),
a veth whose other end `vmb-<id[:8]>` is enslaved to the network's bridge, and then addresses
it according to `address_mode`:
- "static": the port's fixed IP/prefix and a default route via the subnet gateway (none for a
  subnet without a gateway), as if cloud-init had applied network_data.json; likewise its
  IPv6 fixed IPs (SLAAC ones are the EUI-64 addresses the guest would form itself) with an
  IPv6 default route via the IPv6 gateway, and with `metadata_ipv6_ula` on a network no
  router serves an on-link route to fd00:ec2::254 (what an RA route would give).
Every lab VM also has its EUI-64 link-local address, made before the link comes up so it is
usable at once (a real guest spends a second in DAD first).
Further modes (e.g. "dhcp") register in `ADDRESS_MODES`; each gets the namespace's Netlink
handle and the `VmPlan`. `/etc/netns/<ns>/resolv.conf` is always written so that nothing run
inside (`ip netns exec`) can touch the host's resolv.conf.

Rules: `plan_vm()` is pure (registry documents in, plan out); plug/unplug are idempotent.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from openimds.agents import fabric
from openimds.config import Settings
from openimds.core.firewall import METADATA_ULA
from openimds.core.ipam import link_local_address
from openimds.core.models import DEVICE_OWNER_ROUTER
from openimds.core.names import VM_NS_PREFIX, bridge_name, vm_namespace, vm_peer
from openimds.errors import BadRequest, NotFound
from openimds.host import links
from openimds.registry.client import RegistryClient

log = logging.getLogger(__name__)

VM_IFNAME = "eth0"
_UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True, slots=True)
class VmPlan:
    server_id: str
    server_name: str
    namespace: str
    interface: str
    peer: str
    bridge: str
    network_id: str
    port_id: str
    mac: str
    ip_address: str
    cidr: str  # "10.0.0.5/24"
    gateway: str | None
    mtu: int
    dns_nameservers: tuple[str, ...]
    vni: int | None = None  # the network's segmentation_id (VXLAN on a tunnel node)
    link_local: str = ""  # fe80::<EUI-64 of mac>
    ipv6_cidrs: tuple[str, ...] = ()  # the port's IPv6 fixed IPs with their prefix
    ipv6_gateway: str | None = None
    ipv6_onlink: tuple[str, ...] = ()  # /128 destinations routed on-link (the ULA)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dns_nameservers"] = list(self.dns_nameservers)
        data["ipv6_cidrs"] = list(self.ipv6_cidrs)
        data["ipv6_onlink"] = list(self.ipv6_onlink)
        return data


def plan_vm(
    instance: Mapping[str, Any], subnet: Mapping[str, Any], network: Mapping[str, Any],
    *, ipv6_subnets: Sequence[Mapping[str, Any]] = (), ipv6_onlink: Sequence[str] = (),
) -> VmPlan:
    """Where and how a server's first port is plugged (its first fixed IP, IPv4 first), with
    its addresses on `ipv6_subnets` (the port's other subnets may be passed too)."""
    ports = instance.get("ports") or []
    if not ports:
        raise BadRequest(f"server {instance['id']} has no port")
    port = ports[0]
    fixed = [f for f in port.get("fixed_ips", []) if f.get("subnet_id") == subnet["id"]]
    if not fixed:
        raise BadRequest(f"server {instance['id']} has no IP on subnet {subnet['id']}")
    ip = fixed[0]["ip_address"]
    prefix = ipaddress.ip_network(subnet["cidr"], strict=False).prefixlen
    sid = str(instance["id"])
    v6 = {s["id"]: s for s in (subnet, *ipv6_subnets)
          if ipaddress.ip_network(s["cidr"], strict=False).version == 6}
    v6_fixed = [(f["ip_address"], v6[f["subnet_id"]]) for f in port.get("fixed_ips", [])
                if f.get("subnet_id") in v6]
    mac = str(port["mac_address"]).lower()
    return VmPlan(
        server_id=sid, server_name=str(instance.get("name") or ""),
        namespace=vm_namespace(sid), interface=VM_IFNAME, peer=vm_peer(sid),
        bridge=bridge_name(str(port["network_id"])), network_id=str(port["network_id"]),
        port_id=str(port["id"]), mac=mac, ip_address=ip,
        cidr=f"{ip}/{prefix}", gateway=subnet.get("gateway_ip"),
        mtu=int(network.get("mtu") or 1500),
        dns_nameservers=tuple(subnet.get("dns_nameservers") or ()),
        vni=int(network["segmentation_id"]) if network.get("segmentation_id") else None,
        link_local=str(link_local_address(mac)),
        ipv6_cidrs=tuple(
            f"{a}/{ipaddress.ip_network(s['cidr'], strict=False).prefixlen}" for a, s in v6_fixed),
        ipv6_gateway=next((s["gateway_ip"] for _, s in v6_fixed if s.get("gateway_ip")), None),
        ipv6_onlink=tuple(ipv6_onlink),
    )


def _configure_static(nl: links.Netlink, plan: VmPlan) -> None:
    v4 = ipaddress.ip_interface(plan.cidr).version == 4
    nl.set_addresses(plan.interface, [*([plan.cidr] if v4 else []), *plan.ipv6_cidrs])
    nl.set_default_route(plan.gateway if v4 else None, plan.interface)
    nl.set_ipv6_routes(plan.interface, plan.ipv6_gateway, plan.ipv6_onlink)


def _configure_dhcp(nl: links.Netlink, plan: VmPlan) -> None:
    # a real DHCP client (udhcpc, option 121) against the network's dnsmasq: lab/dhcp_client.py
    from openimds.lab.dhcp_client import configure_dhcp

    configure_dhcp(nl, plan.namespace, plan.interface)


AddressMode = Callable[[links.Netlink, VmPlan], None]
ADDRESS_MODES: dict[str, AddressMode] = {"static": _configure_static, "dhcp": _configure_dhcp}


def apply_plug(
    plan: VmPlan, address_mode: str = "static", tunnel: fabric.Tunnel | None = None,
) -> None:
    """Build or repair the VM namespace for plan."""
    try:
        configure = ADDRESS_MODES[address_mode]
    except KeyError:
        raise BadRequest(f"address mode {address_mode!r} is not one of "
                         f"{', '.join(ADDRESS_MODES)}") from None
    links.ensure_namespace(plan.namespace)
    links.write_netns_resolv_conf(plan.namespace, plan.dns_nameservers)
    with links.netlink() as here, links.netlink(plan.namespace) as inside:
        fabric.ensure_bridge(
            here, fabric.BridgeSpec(plan.bridge, plan.network_id, plan.mtu, plan.vni), tunnel)
        here.ensure_veth(plan.peer, peer=plan.interface, inside=inside, master=plan.bridge,
                         mtu=plan.mtu, peer_mac=plan.mac)
        if plan.link_local:
            inside.add_link_local(plan.interface, plan.link_local)
        inside.set_up(plan.interface)
        configure(inside, plan)
    log.info("vm.plugged server=%s netns=%s ip=%s", plan.server_id, plan.namespace, plan.cidr)


def unplug_namespace(namespace: str) -> bool:
    """Delete the VM namespace, its veth pair and its /etc/netns dir.

    The bridge-side end is deleted first, synchronously: the kernel destroys a deleted
    namespace's devices asynchronously, and the bridge would look busy meanwhile.
    """
    if namespace.startswith(VM_NS_PREFIX):
        with links.netlink() as here:
            here.delete_link(vm_peer(namespace[len(VM_NS_PREFIX):]))
    existed = links.delete_namespace(namespace)
    links.remove_netns_etc(namespace)
    return existed


# --- registry look-ups (CLI side, admin token) ---------------------------------------------


class Registry:
    """The few registry reads `vm` needs (over the CLI's RegistryClient)."""

    def __init__(self, settings: Settings) -> None:
        self.client = RegistryClient.from_settings(settings, admin=True)
        self.ula = settings.metadata_ipv6_ula

    def find_instance(self, server: str) -> dict[str, Any]:
        """A server by id or by unique name."""
        if _UUID_RE.match(server):
            return self.client.get("instance", server)
        matches = [i for i in self.client.list("instance") if i.get("name") == server]
        if not matches:
            raise NotFound(f"no server named or with id {server!r}")
        if len(matches) > 1:
            raise BadRequest(f"{len(matches)} servers are named {server!r}; use the id")
        return matches[0]

    def plan(self, server: str) -> VmPlan:
        instance = self.find_instance(server)
        ports = instance.get("ports") or []
        if not ports or not ports[0].get("fixed_ips"):
            raise BadRequest(f"server {instance['id']} has no port with a fixed IP")
        subnets = [self.client.get("subnet", sid) for sid in
                   dict.fromkeys(f["subnet_id"] for f in ports[0]["fixed_ips"])]
        network = self.client.get("network", ports[0]["network_id"])
        onlink: list[str] = []
        if self.ula and not self.client.list(
                "port", network_id=network["id"], device_owner=DEVICE_OWNER_ROUTER):
            onlink.append(METADATA_ULA)
        return plan_vm(instance, subnets[0], network, ipv6_subnets=subnets[1:],
                       ipv6_onlink=onlink)

    def close(self) -> None:
        self.client.close()


def namespace_for(settings: Settings, server: str) -> str:
    """The VM namespace of a server given by id (no registry call) or by name."""
    if _UUID_RE.match(server):
        return vm_namespace(server)
    registry = Registry(settings)
    try:
        return vm_namespace(str(registry.find_instance(server)["id"]))
    finally:
        registry.close()


def plug(settings: Settings, server: str, *, address_mode: str = "static") -> VmPlan:
    registry = Registry(settings)
    try:
        plan = registry.plan(server)
    finally:
        registry.close()
    apply_plug(plan, address_mode, fabric.tunnel_from(settings.fabric))
    return plan
