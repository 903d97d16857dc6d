"""Namespaces, bridges, veth pairs, addresses and routes, through netlink (pyroute2).

Rules of this module: every helper is idempotent (ensure_* converges, delete_* of something
absent is a no-op) and works by name, never by parsing `ip` output. Code outside `host/` gets
names in and plain data out. Never read /sys/class/net: tests run in a private netns where
sysfs still shows the host. Sysctls of a named namespace are written from inside it with
`ip netns exec NS sysctl -w` (through `host.run`), since /proc/sys/net is per opener's netns.

    with netlink() as nl:                       # the current netns (where bridges live)
        nl.ensure_bridge("brq0b3c1d2e3f4", mtu=1500)
        with netlink("qrouter-...") as inside:
            nl.ensure_veth("qrb-1234", peer="qr-1234", inside=inside,
                           master="brq0b3c1d2e3f4", mtu=1500, peer_mac="fa:16:3e:..")
            inside.set_addresses("qr-1234", ["10.0.0.1/24"])
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns
from pyroute2 import config as pyroute2_config
from pyroute2.netlink.exceptions import NetlinkError

from openimds.errors import CommandFailed, NotFound
from openimds.host.netns import socket_in_netns
from openimds.host.run import run

log = logging.getLogger(__name__)
IFA_F_NODAD = 0x02

# pyroute2 forks a helper to open a socket inside a namespace and stops it with SIGTERM. The
# fork shares asyncio's signal wakeup fd, so the helper's Python-level SIGTERM handler would
# write into the *parent's* loop, which then believes it got SIGTERM and shuts the agent
# down. With this flag the helper resets SIGTERM to SIG_DFL first and dies quietly.
pyroute2_config.disable_mp_signal = True

NETLINK_ROUTE = 0
_FLOOD_MAC = "00:00:00:00:00:00"
NETNS_RUN_DIR = Path("/var/run/netns")
ETC_NETNS = Path("/etc/netns")


@dataclass(frozen=True, slots=True)
class LinkInfo:
    index: int
    name: str
    kind: str | None  # "bridge", "veth", ... (None for lo / physical)
    mac: str | None
    mtu: int
    up: bool
    master: int | None  # ifindex of the bridge it is enslaved to


# --- namespaces ---------------------------------------------------------------------------


ETH_P_ARP = 0x0806


def announce(namespace: str, ifname: str, frames: Iterable[bytes]) -> int:
    """Send raw Ethernet frames (gratuitous ARPs) out of one link inside a namespace; how
    many went out. A link that is gone or not up yet is logged, not raised: the next
    converge announces again."""
    sent = 0
    try:
        sock = socket_in_netns(namespace, socket.AF_PACKET, socket.SOCK_RAW,
                               socket.htons(ETH_P_ARP))
    except OSError as exc:
        log.warning("link.announce_failed netns=%s link=%s reason=%s", namespace, ifname, exc)
        return 0
    with sock:
        try:
            sock.bind((ifname, ETH_P_ARP))
            for frame in frames:
                sock.send(frame)
                sent += 1
        except OSError as exc:
            log.warning("link.announce_failed netns=%s link=%s reason=%s", namespace, ifname,
                        exc)
    return sent


def list_namespaces(prefix: str = "") -> list[str]:
    """Named namespaces (`ip netns list`) whose name starts with prefix."""
    return sorted(n for n in netns.listnetns() if n.startswith(prefix))


def namespace_exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def ensure_namespace(name: str) -> bool:
    """Create the named namespace with lo up; True if it was created now."""
    created = False
    if not namespace_exists(name):
        try:
            netns.create(name)
            created = True
            log.info("netns.created name=%s", name)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
    with netlink(name) as nl:
        nl.set_up("lo")
    return created


def delete_namespace(name: str) -> bool:
    """Delete the named namespace (its interfaces go with it); True if it existed."""
    if not namespace_exists(name):
        return False
    try:
        netns.remove(name)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
        return False
    log.info("netns.deleted name=%s", name)
    return True


def ipv6_enabled() -> bool:
    """Whether this kernel has IPv6 at all (not booted with ipv6.disable=1)."""
    return os.path.isdir("/proc/sys/net/ipv6")


def set_sysctl(namespace: str, key: str, value: str, *more: tuple[str, str]) -> None:
    """Write sysctls inside a named namespace (e.g. net.ipv4.ip_forward=1), in one command."""
    pairs = [f"{k}={v}" for k, v in ((key, value), *more)]
    run(["ip", "netns", "exec", namespace, "sysctl", "-q", "-w", *pairs])


def write_netns_resolv_conf(namespace: str, nameservers: Iterable[str] = ()) -> Path:
    """/etc/netns/<ns>/resolv.conf, which `ip netns exec` binds over /etc/resolv.conf.

    Then DHCP clients and resolvers in the namespace never touch the host's file.
    """
    directory = ETC_NETNS / namespace
    directory.mkdir(parents=True, exist_ok=True)
    text = "# written by openimds for this namespace\n"
    text += "".join(f"nameserver {ns}\n" for ns in nameservers)
    path = directory / "resolv.conf"
    tmp = directory / ".resolv.conf.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def remove_netns_etc(namespace: str) -> None:
    directory = ETC_NETNS / namespace
    if not directory.is_dir():
        return
    for child in directory.iterdir():
        child.unlink(missing_ok=True)
    with contextlib.suppress(FileNotFoundError):
        directory.rmdir()


# --- links, addresses, routes -------------------------------------------------------------


def _link_info(msg: Any) -> LinkInfo:
    linkinfo = msg.get_attr("IFLA_LINKINFO")
    kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
    flags = int(msg.get("flags", 0))
    return LinkInfo(
        index=int(msg["index"]),
        name=str(msg.get_attr("IFLA_IFNAME")),
        kind=kind,
        mac=msg.get_attr("IFLA_ADDRESS"),
        mtu=int(msg.get_attr("IFLA_MTU") or 0),
        up=bool(flags & 1),  # IFF_UP
        master=msg.get_attr("IFLA_MASTER"),
    )


class Netlink:
    """One netlink socket in one namespace (None = the current one)."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        if namespace is not None and not namespace_exists(namespace):
            raise NotFound(f"network namespace {namespace} does not exist")
        if namespace:
            # The netlink socket is created inside the namespace by host/netns.py (setns on
            # this thread and straight back) and handed to pyroute2: ~2 ms, where pyroute2's
            # own netns= path forks a helper process (~20 ms) per handle.
            sock = socket_in_netns(namespace, socket.AF_NETLINK, socket.SOCK_DGRAM,
                                   NETLINK_ROUTE)
            self._ipr = IPRoute(use_socket=sock)
        else:
            self._ipr = IPRoute()

    def close(self) -> None:
        self._ipr.close()

    # links
    def links(self, prefix: str = "") -> list[LinkInfo]:
        out = [_link_info(m) for m in self._ipr.get_links()]
        return [link for link in out if link.name.startswith(prefix)]

    def link(self, name: str) -> LinkInfo | None:
        """One link by name (a single RTM_GETLINK by name, not a dump), None if absent."""
        try:
            # link("get") sends RTM_GETLINK with IFLA_IFNAME; get_links(ifname=) would dump
            # and decode every link of the namespace (170 ms at 200 links).
            found = self._ipr.link("get", ifname=name)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise
        return _link_info(found[0]) if found else None

    def _index(self, name: str) -> int:
        link = self.link(name)
        if link is None:
            raise NotFound(f"link {name} not found in {self.namespace or 'current netns'}")
        return link.index

    def set_up(self, name: str) -> None:
        link = self.link(name)
        if link is None:
            raise NotFound(f"link {name} not found in {self.namespace or 'current netns'}")
        if not link.up:
            self._ipr.link("set", index=link.index, state="up")

    def set_down(self, name: str) -> None:
        """Take one link down (a fenced router leg or DHCP tap); missing is fine."""
        link = self.link(name)
        if link is not None and link.up:
            self._ipr.link("set", index=link.index, state="down")

    def set_link(
        self, name: str, *, mtu: int | None = None, mac: str | None = None,
        master: str | None = None, up: bool = True,
    ) -> None:
        """Converge MTU, MAC, bridge membership and state of one link."""
        link = self.link(name)
        if link is None:
            raise NotFound(f"link {name} not found in {self.namespace or 'current netns'}")
        changes: dict[str, Any] = {}
        if mtu is not None and link.mtu != mtu:
            changes["mtu"] = mtu
        if mac is not None and (link.mac or "").lower() != mac.lower():
            changes["address"] = mac.lower()
        if master is not None:
            master_index = self._index(master)
            if link.master != master_index:
                changes["master"] = master_index
        if changes:
            self._ipr.link("set", index=link.index, **changes)
        if up and not link.up:
            self._ipr.link("set", index=link.index, state="up")

    def ensure_bridge(self, name: str, *, mtu: int | None = None) -> bool:
        """A Linux bridge, up; True if it was created now."""
        created = False
        link = self.link(name)
        if link is not None and link.kind != "bridge":
            raise CommandFailed(["netlink", "bridge", name], 1, f"{name} exists as {link.kind}")
        if link is None:
            with _tolerate(errno.EEXIST):
                self._ipr.link("add", ifname=name, kind="bridge")
                created = True
                log.info("link.created kind=bridge name=%s", name)
        self.set_link(name, mtu=mtu)
        return created

    def ensure_veth(
        self, name: str, *, peer: str, inside: Netlink, master: str | None = None,
        mtu: int | None = None, peer_mac: str | None = None,
    ) -> bool:
        """A veth pair: `name` here (enslaved to master), `peer` created directly inside the
        namespace `inside` speaks for; both up. True if the pair was created now.

        Deleting one end deletes the other, but a `name` whose peer sits elsewhere (e.g. its
        namespace was re-created) is replaced.
        """
        if inside.namespace is None:
            raise ValueError("ensure_veth needs a named namespace for the peer")
        created = False
        link = self.link(name)
        peer_link = inside.link(peer)
        if link is not None and peer_link is None:
            self.delete_link(name)
            link = None
        if peer_link is not None and link is None:
            inside.delete_link(peer)
        if link is None:
            peer_spec: dict[str, Any] = {"ifname": peer, "net_ns_fd": inside.namespace}
            if peer_mac:
                peer_spec["address"] = peer_mac.lower()
            if mtu:
                peer_spec["mtu"] = mtu
            self._ipr.link("add", ifname=name, kind="veth", peer=peer_spec)
            created = True
            log.info("link.created kind=veth name=%s peer=%s netns=%s",
                     name, peer, inside.namespace)
        inside.set_link(peer, mtu=mtu, mac=peer_mac)
        self.set_link(name, mtu=mtu, master=master)
        return created

    def delete_link(self, name: str) -> bool:
        link = self.link(name)
        if link is None:
            return False
        with _tolerate(errno.ENODEV):
            self._ipr.link("del", index=link.index)
        log.info("link.deleted name=%s netns=%s", name, self.namespace or "-")
        return True

    def ensure_vxlan(
        self, name: str, *, vni: int, local: str, port: int = 4789, group: str | None = None,
        device: str | None = None, ttl: int = 0, mtu: int | None = None,
        master: str | None = None,
    ) -> bool:
        """A VXLAN device (learning on, as the linuxbridge agent without l2population), up,
        enslaved to master. One whose VNI, local address or group differs is replaced. True if
        it was created now."""
        link = self.link(name)
        if link is not None:
            found = self._ipr.link("get", index=link.index)[0]
            info = found.get_attr("IFLA_LINKINFO")
            data = info.get_attr("IFLA_INFO_DATA") if info is not None else None
            same = (link.kind == "vxlan" and data is not None
                    and data.get_attr("IFLA_VXLAN_ID") == vni
                    and data.get_attr("IFLA_VXLAN_LOCAL") == local
                    and data.get_attr("IFLA_VXLAN_PORT") == port
                    and (data.get_attr("IFLA_VXLAN_GROUP") or None) == (group or None))
            if not same:
                self.delete_link(name)
                link = None
        created = False
        if link is None:
            spec: dict[str, Any] = {"vxlan_id": vni, "vxlan_local": local, "vxlan_port": port,
                                    "vxlan_learning": 1, "vxlan_ttl": ttl}
            if group:
                spec["vxlan_group"] = group
            if device:
                spec["vxlan_link"] = self._index(device)
            with _tolerate(errno.EEXIST):
                self._ipr.link("add", ifname=name, kind="vxlan", **spec)
                created = True
                log.info("link.created kind=vxlan name=%s vni=%d local=%s group=%s",
                         name, vni, local, group or "-")
        self.set_link(name, mtu=mtu, master=master)
        return created

    def flood_peers(self, name: str) -> set[str]:
        """Remote addresses of the all-zeros FDB entries (head-end replication) of a VXLAN."""
        index = self._index(name)
        return {str(m.get_attr("NDA_DST")) for m in self._ipr.fdb("dump", ifindex=index)
                if m["ifindex"] == index and m.get_attr("NDA_DST")
                and m.get_attr("NDA_LLADDR") == _FLOOD_MAC}

    def set_flood_peers(self, name: str, peers: Iterable[str]) -> None:
        """Exactly these flood entries on a VXLAN device: BUM traffic goes to every peer."""
        index = self._index(name)
        want = set(peers)
        have = self.flood_peers(name)
        for extra in sorted(have - want):
            with _tolerate(errno.ENOENT):
                self._ipr.fdb("del", ifindex=index, lladdr=_FLOOD_MAC, dst=extra)
        for missing in sorted(want - have):
            with _tolerate(errno.EEXIST):
                self._ipr.fdb("append", ifindex=index, lladdr=_FLOOD_MAC, dst=missing)

    def bridge_ports(self, bridge: str) -> list[LinkInfo]:
        link = self.link(bridge)
        if link is None:
            return []
        return [other for other in self.links() if other.master == link.index]

    # addresses
    def addresses(self, name: str) -> list[str]:
        """Addresses of a link as 'ip/prefixlen', except the kernel's own IPv6 link-local
        (fe80::/64); a link-local /128 someone added (fe80::a9fe:a9fe) is listed."""
        index = self._index(name)
        out = []
        for msg in self._ipr.get_addr(index=index):
            ip = ipaddress.ip_address(msg.get_attr("IFA_ADDRESS"))
            if ip.is_link_local and ip.version == 6 and msg["prefixlen"] != 128:
                continue
            out.append(f"{ip}/{msg['prefixlen']}")
        return sorted(out)

    def link_with_address(self, ip: str) -> str | None:
        """The name of the link holding this address, None if no link does."""
        for msg in self._ipr.get_addr():
            if msg.get_attr("IFA_ADDRESS") == ip or msg.get_attr("IFA_LOCAL") == ip:
                found = self._ipr.link("get", index=msg["index"])
                return str(found[0].get_attr("IFLA_IFNAME")) if found else None
        return None

    def set_addresses(self, name: str, cidrs: Iterable[str]) -> None:
        """Exactly these addresses ('10.0.0.1/24') on the link; the kernel's IPv6 link-local
        is kept. IPv6 ones skip DAD (the registry made them unique), so they are usable at
        once instead of tentative for a second or two."""
        index = self._index(name)
        want = {str(ipaddress.ip_interface(c)) for c in cidrs}
        have = set(self.addresses(name))
        for extra in sorted(have - want):
            iface = ipaddress.ip_interface(extra)
            with _tolerate(errno.EADDRNOTAVAIL):
                self._ipr.addr("del", index=index, address=str(iface.ip),
                               prefixlen=iface.network.prefixlen)
        for missing in sorted(want - have):
            iface = ipaddress.ip_interface(missing)
            flags = IFA_F_NODAD if iface.version == 6 else 0
            with _tolerate(errno.EEXIST):
                self._ipr.addr("add", index=index, address=str(iface.ip),
                               prefixlen=iface.network.prefixlen, flags=flags)

    def add_link_local(self, name: str, address: str) -> None:
        """Add the kernel-style fe80::/64 address now, without DAD (idempotent): added before
        the link comes up, the kernel's own identical EUI-64 address is then never made
        tentative, so the address answers at once."""
        with _tolerate(errno.EEXIST):
            self._ipr.addr("add", index=self._index(name), address=address, prefixlen=64,
                           flags=IFA_F_NODAD)

    def set_ipv6_routes(self, device: str, gateway: str | None,
                        onlink: Iterable[str] = ()) -> None:
        """The IPv6 default route via gateway on device (replaced, never removed), and on-link
        routes to the given /128 destinations."""
        oif = self._index(device)
        if gateway is not None:
            self._ipr.route("replace", family=socket.AF_INET6, dst="::/0", gateway=gateway,
                            oif=oif)
        for dest in onlink:
            self._ipr.route("replace", family=socket.AF_INET6, dst=f"{dest}/128", oif=oif)

    # routes
    def default_gateway(self) -> str | None:
        for msg in self._ipr.get_routes(family=2, table=254):
            if msg["dst_len"] == 0 and msg.get_attr("RTA_GATEWAY"):
                return str(msg.get_attr("RTA_GATEWAY"))
        return None

    def set_default_route(self, gateway: str | None, device: str) -> None:
        """The IPv4 default route via gateway on device, or none if gateway is None."""
        current = self.default_gateway()
        if current == gateway:
            return
        if current is not None:
            with _tolerate(errno.ESRCH):
                self._ipr.route("del", dst="0.0.0.0/0")
        if gateway is not None:
            self._ipr.route("replace", dst="0.0.0.0/0", gateway=gateway,
                            oif=self._index(device))

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def netlink(namespace: str | None = None) -> Iterator[Netlink]:
    """A Netlink handle for the named namespace (None = current), closed afterwards."""
    nl = Netlink(namespace)
    try:
        yield nl
    finally:
        nl.close()


@contextlib.contextmanager
def _tolerate(code: int) -> Iterator[None]:
    """Ignore one netlink errno: the state we wanted is already there (races, re-runs)."""
    try:
        yield
    except NetlinkError as exc:
        if exc.code != code:
            raise
