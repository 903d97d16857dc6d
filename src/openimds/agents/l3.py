"""The L3 agent: router namespaces, their legs, Neutron's metadata rules, proxy listener specs.

Rules: the registry is the truth. `plan_routers(topology)` (pure) says what every router
should look like; `RouterDriver.converge()` makes the host match it and removes what the
registry no longer has. Every step is idempotent, so a restart at any moment converges without
duplicates. The agent only ever deletes `qrouter-` namespaces it can identify as its own: each
router it builds is first recorded as a marker file `$state_path/l3/routers/<router id>`, and
only marked routers are torn down (other stacks on the same host, e.g. parallel test runs,
keep theirs).

Per router (Neutron's L3 agent + MetadataDriver, see neutron.md §2.3):
- namespace `qrouter-<id>`, lo up, IPv4 and IPv6 forwarding on, no DAD on its legs (the
  registry made their addresses unique; a tentative address would drop redirected traffic);
- the metadata rules (`core.firewall`), one atomic `nft -f -` (or iptables-nft-restore);
- one `qr-<port[:11]>` leg per interface, a veth created directly inside the namespace whose
  bridge-side peer `qrb-<port[:11]>` is enslaved to the network's `brq` bridge; the leg holds
  the port's MAC and its gateway IP/prefix, and `fe80::a9fe:a9fe/128`, so the router itself
  answers a guest's neighbour solicitation for the IPv6 metadata address (Neutron relies on
  radvd's RFC 4191 route, which Linux guests ignore by default);
- the listener spec `router-<id>.json` in `[proxy] listeners_dir`, then SIGHUP to the proxy.
Tear-down runs the other way: spec first (the proxy closes its socket, which would otherwise
keep the namespace alive), then the namespace with its legs.

The agent follows the change feed, converges on any router/port/subnet/network change, resyncs
fully every `[l3] resync_interval` and on a feed resync, and keeps one `openimds proxy` running
if no proxy holds the proxy lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from openimds.agents import fabric
from openimds.config import Settings
from openimds.core import firewall, nodes
from openimds.core.names import (
    bridge_name,
    router_leg,
    router_leg_peer,
    router_listener_name,
    router_namespace,
)
from openimds.core.proxy_rules import ListenerSpec, render_listener_spec
from openimds.errors import OpenImdsError
from openimds.host import links
from openimds.host.run import run
from openimds.metrics import Metric, ServiceMetrics, counter, gauge, labelled, start_metrics_server
from openimds.registry.client import AsyncRegistryClient
from openimds.registry.feed import ChangeFollower
from openimds.registry.heartbeat import Heartbeat

log = logging.getLogger(__name__)

ROUTER_INTERFACE_OWNER = "network:router_interface"
# What one router's build or tear-down may raise without stopping the others.
HOST_ERRORS: tuple[type[Exception], ...] = (OpenImdsError, OSError, NetlinkError)
RELEVANT_KINDS = frozenset({"router", "port", "subnet", "network"})
LEG_PREFIX = "qr-"


# --- the plan (pure) ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Leg:
    port_id: str
    network_id: str
    ifname: str  # inside the router namespace
    peer: str  # bridge side, in the agent's namespace
    bridge: str
    mac: str
    cidrs: tuple[str, ...]  # "10.0.0.1/24"
    mtu: int


@dataclass(frozen=True, slots=True)
class RouterPlan:
    router_id: str
    namespace: str
    legs: tuple[Leg, ...]


def plan_routers(topology: Mapping[str, Any], host: str | None = None,
                 ) -> dict[str, RouterPlan]:
    """What every router of the topology should look like, by router id; with `host`, only
    the routers the registry scheduled to that node (`routers[].hosts`).

    A router's legs are its `network:router_interface` ports (device_id = router id); each
    leg carries the port's IPs with the prefix length of their subnet.
    """
    subnets = {s["id"]: s for s in topology.get("subnets", [])}
    networks = {n["id"]: n for n in topology.get("networks", [])}
    ports_by_router: dict[str, list[Mapping[str, Any]]] = {}
    for port in topology.get("ports", []):
        if port.get("device_owner") == ROUTER_INTERFACE_OWNER and port.get("device_id"):
            ports_by_router.setdefault(port["device_id"], []).append(port)
    plans: dict[str, RouterPlan] = {}
    for router in topology.get("routers", []):
        if host is not None and host not in (router.get("hosts") or ()):
            continue
        rid = str(router["id"])
        legs = []
        for port in sorted(ports_by_router.get(rid, []), key=lambda p: str(p["id"])):
            cidrs = []
            for fixed in port.get("fixed_ips", []):
                subnet = subnets.get(fixed.get("subnet_id"))
                if subnet is None:
                    continue
                prefix = ipaddress.ip_network(subnet["cidr"], strict=False).prefixlen
                cidrs.append(f"{fixed['ip_address']}/{prefix}")
            net_id = str(port["network_id"])
            mtu = int((networks.get(net_id) or {}).get("mtu") or 1500)
            legs.append(Leg(
                port_id=str(port["id"]), network_id=net_id, ifname=router_leg(port["id"]),
                peer=router_leg_peer(port["id"]), bridge=bridge_name(net_id),
                mac=str(port["mac_address"]).lower(), cidrs=tuple(sorted(cidrs)), mtu=mtu,
            ))
        plans[rid] = RouterPlan(rid, router_namespace(rid), tuple(legs))
    return plans


def is_relevant(change: Mapping[str, Any]) -> bool:
    """Whether a feed change can alter what the L3 agent builds."""
    kind = change.get("kind")
    if kind not in RELEVANT_KINDS:
        return False
    if kind == "port":
        owner = (change.get("attrs") or {}).get("device_owner")
        return owner in (None, ROUTER_INTERFACE_OWNER)
    return True


def router_listener(router_id: str, metadata_port: int, *, ipv6: bool = True) -> ListenerSpec:
    """The proxy listener spec of one router (docs/architecture.md): one dual-stack socket,
    as Neutron's `bind :::9697`, behind the IPv4 and IPv6 REDIRECTs (IPv4 only on a kernel
    without IPv6, as Neutron's `bind 0.0.0.0:9697`)."""
    return ListenerSpec(
        name=router_listener_name(router_id), netns=router_namespace(router_id),
        host="::" if ipv6 else "0.0.0.0", port=metadata_port, router_id=router_id,
        network_id=None,
    )


def announcements(plan: RouterPlan) -> list[tuple[str, str, tuple[bytes, ...]]]:
    """Gratuitous ARPs for every IPv4 address of the router's legs: a router that moved here
    (or came back up) must tell the segment, or VXLAN learning and the VMs keep sending its
    MAC to the node it left until their entries age out."""
    out = []
    for leg in plan.legs:
        frames = tuple(nodes.gratuitous_arp(leg.mac, cidr.split("/")[0])
                       for cidr in leg.cidrs if ":" not in cidr)
        if frames:
            out.append((plan.namespace, leg.ifname, frames))
    return out


def send_announcements(items: Sequence[tuple[str, str, tuple[bytes, ...]]]) -> None:
    for namespace, ifname, frames in items:
        links.announce(namespace, ifname, frames)


def ipv6_metadata_addresses(settings: Settings) -> tuple[str, ...]:
    """The IPv6 addresses metadata answers on: link-local always, the ULA if configured;
    none on a kernel without IPv6."""
    if not links.ipv6_enabled():
        return ()
    ula = (firewall.METADATA_ULA,) if settings.metadata_ipv6_ula else ()
    return (firewall.METADATA_IPV6, *ula)


# --- applying it --------------------------------------------------------------------------


def apply_firewall(namespace: str, rules: Sequence[firewall.Rule], driver: str) -> None:
    """Replace the namespace's metadata rules in one call; the other driver's rules go."""
    nft = ["ip", "netns", "exec", namespace, "nft", "-f", "-"]
    if driver == "nft":
        script = firewall.render_nft_delete(firewall.IPTABLES_NFT_TABLES)
        run(nft, input=script + firewall.render_nft(rules))
    elif driver == "iptables":
        run(nft, input=firewall.render_nft_delete([(firewall.NFT_FAMILY, firewall.NFT_TABLE)]))
        run(["ip", "netns", "exec", namespace, "iptables-nft-restore", "-w", "5"],
            input=firewall.render_iptables(rules))
    else:
        raise ValueError(f"unknown firewall_driver {driver!r}")


def _write_atomic(path: Path, text: str) -> bool:
    """Write text to path via a temp file + rename; False if it already had that content."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return True


@dataclass(slots=True)
class ConvergeReport:
    routers: int = 0
    created: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    specs_changed: bool = False
    # (namespace, leg, frames): gratuitous ARPs of the legs built or brought up now
    announced: list[tuple[str, str, tuple[bytes, ...]]] = field(default_factory=list)


class RouterDriver:
    """Makes this host's routers match a plan. Blocking (netlink, commands): run in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.markers = settings.path("l3", "routers")
        self.tunnel = fabric.tunnel_from(settings.fabric)
        self.listeners_dir = Path(settings.proxy.listeners_dir)
        self.rules = firewall.metadata_rules(
            settings.metadata_port, settings.access_mark,
            proxy_enabled=settings.enable_metadata_proxy,
            ipv6=ipv6_metadata_addresses(settings),
        )
        self.ipv6 = links.ipv6_enabled()
        self._leg_extra = ((f"{firewall.METADATA_IPV6}/128",)
                           if settings.enable_metadata_proxy and self.ipv6 else ())
        v6 = (("net.ipv6.conf.all.forwarding", "1"), ("net.ipv6.conf.all.accept_dad", "0"),
              ("net.ipv6.conf.default.accept_dad", "0"))
        self._sysctls: tuple[tuple[str, str], ...] = v6 if self.ipv6 else ()
        # Namespaces whose sysctl and rules were applied by this process, and the plans applied
        # in full: an unchanged router costs nothing on a feed-triggered converge. A full
        # resync re-checks them cheaply from one link dump of this namespace (see
        # `_verify_applied`) and rebuilds the ones that drifted.
        self._prepared: set[str] = set()
        self._applied: dict[str, RouterPlan] = {}

    # markers: which routers are ours
    def owned(self) -> set[str]:
        if not self.markers.is_dir():
            return set()
        return {p.name for p in self.markers.iterdir() if not p.name.startswith(".")}

    def _mark(self, router_id: str) -> None:
        self.markers.mkdir(parents=True, exist_ok=True)
        (self.markers / router_id).touch()

    def _unmark(self, router_id: str) -> None:
        (self.markers / router_id).unlink(missing_ok=True)

    def _spec_path(self, router_id: str) -> Path:
        return self.listeners_dir / f"{router_listener_name(router_id)}.json"

    def forget_applied(self) -> None:
        self._prepared.clear()
        self._applied.clear()

    def _verify_applied(self, here: links.Netlink) -> None:
        """Forget applied plans whose namespace or bridge-side legs are gone or detached."""
        by_name = {link.name: link for link in here.links()}
        for router_id, plan in list(self._applied.items()):
            intact = links.namespace_exists(plan.namespace)
            for leg in plan.legs:
                peer, bridge = by_name.get(leg.peer), by_name.get(leg.bridge)
                if peer is None or bridge is None or peer.master != bridge.index or not peer.up:
                    intact = False
            if not intact:
                log.warning("l3.drift router=%s: rebuilding", router_id)
                del self._applied[router_id]
                self._prepared.discard(plan.namespace)

    def fence(self) -> list[str]:
        """Stop answering for every router of ours at once, keeping its namespace: take the
        legs down (no ARP, no routing, no metadata). The next converge brings back up what is
        still scheduled here and removes what moved away."""
        fenced = []
        for router_id in sorted(self.owned()):
            ns = router_namespace(router_id)
            if not links.namespace_exists(ns):
                continue
            try:
                with links.netlink(ns) as inside:
                    for link in inside.links(LEG_PREFIX):
                        inside.set_down(link.name)
                fenced.append(router_id)
            except HOST_ERRORS as exc:
                log.error("l3.fence_failed router=%s reason=%s", router_id, exc)
        self.forget_applied()
        if fenced:
            log.warning("l3.fenced routers=%s", ",".join(fenced))
        return fenced

    def converge(self, topology: Mapping[str, Any], *, full: bool = False,
                 host: str | None = None) -> ConvergeReport:
        """Make this host match the plan; `host`: build only routers scheduled there (the
        agent passes `[DEFAULT] host`; None = every router, for tests of the driver)."""
        plans = plan_routers(topology, host)
        report = ConvergeReport(routers=len(plans))
        networks = topology.get("networks", [])
        with links.netlink() as here:
            fabric.converge(here, networks, delete_stale=False, tunnel=self.tunnel)
            if full:
                self._verify_applied(here)
            for plan in plans.values():
                if (self._applied.get(plan.router_id) == plan
                        and links.namespace_exists(plan.namespace)):
                    continue
                self._applied.pop(plan.router_id, None)
                try:
                    if self.converge_router(here, plan):
                        report.created.append(plan.router_id)
                    self._applied[plan.router_id] = plan
                    report.announced += announcements(plan)
                except HOST_ERRORS as exc:
                    log.error("l3.router_failed router=%s reason=%s", plan.router_id, exc)
                    report.failed.append(plan.router_id)
            for router_id in sorted(self.owned() - set(plans)):
                try:
                    self.remove_router(router_id)
                    report.removed.append(router_id)
                except HOST_ERRORS as exc:
                    log.error("l3.remove_failed router=%s reason=%s", router_id, exc)
                    report.failed.append(router_id)
            report.specs_changed = self._converge_specs(plans)
            fabric.converge(here, networks, delete_stale=True, tunnel=self.tunnel)
        send_announcements(report.announced)
        return report

    def converge_router(self, here: links.Netlink, plan: RouterPlan) -> bool:
        """Build or repair one router; True if its namespace was created now."""
        self._mark(plan.router_id)  # before the namespace: a crash in between leaks nothing
        ns = plan.namespace
        created = links.ensure_namespace(ns)
        if created or ns not in self._prepared:
            links.set_sysctl(ns, "net.ipv4.ip_forward", "1", *self._sysctls)
            apply_firewall(ns, self.rules, self.settings.l3.firewall_driver)
            self._prepared.add(ns)
        with links.netlink(ns) as inside:
            wanted = {leg.ifname for leg in plan.legs}
            for link in inside.links(LEG_PREFIX):
                if link.name not in wanted:
                    inside.delete_link(link.name)  # its bridge-side peer goes with it
                    log.info("l3.leg_removed router=%s leg=%s", plan.router_id, link.name)
            for leg in plan.legs:  # bridges: fabric.converge ran first
                if here.ensure_veth(leg.peer, peer=leg.ifname, inside=inside, master=leg.bridge,
                                    mtu=leg.mtu, peer_mac=leg.mac):
                    log.info("l3.leg_added router=%s leg=%s bridge=%s cidrs=%s",
                             plan.router_id, leg.ifname, leg.bridge, ",".join(leg.cidrs))
                inside.set_addresses(leg.ifname, (*leg.cidrs, *self._leg_extra))
                inside.set_up(leg.ifname)
        if created:
            log.info("l3.router_added router=%s legs=%d", plan.router_id, len(plan.legs))
        return created

    def remove_router(self, router_id: str) -> None:
        """Spec first (the proxy must close its socket), then the namespace, then the marker."""
        if self._spec_path(router_id).exists():
            self._spec_path(router_id).unlink(missing_ok=True)
            signal_proxy(self.settings)
        ns = router_namespace(router_id)
        if links.namespace_exists(ns):
            with links.netlink(ns) as inside:
                for link in inside.links(LEG_PREFIX):
                    inside.delete_link(link.name)
            links.delete_namespace(ns)
        self._prepared.discard(ns)
        self._applied.pop(router_id, None)
        self._unmark(router_id)
        log.info("l3.router_removed router=%s", router_id)

    def _converge_specs(self, plans: Mapping[str, RouterPlan]) -> bool:
        changed = False
        want: dict[str, str] = {}
        if self.settings.enable_metadata_proxy:
            for rid in plans:
                spec = router_listener(rid, self.settings.metadata_port, ipv6=self.ipv6)
                want[f"{spec.name}.json"] = render_listener_spec(spec)
        for name, text in want.items():
            changed |= _write_atomic(self.listeners_dir / name, text)
        if self.listeners_dir.is_dir():
            for path in self.listeners_dir.glob("router-*.json"):
                if path.name not in want:
                    path.unlink(missing_ok=True)
                    changed = True
        return changed


# --- the proxy: signal it, keep one running -----------------------------------------------


def proxy_dir(settings: Settings) -> Path:
    return settings.path("proxy")


def read_proxy_pid(settings: Settings) -> int | None:
    try:
        return int((proxy_dir(settings) / "proxy.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def signal_proxy(settings: Settings) -> bool:
    """SIGHUP the running proxy so it converges to the listener directory now."""
    pid = read_proxy_pid(settings)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


def proxy_running(settings: Settings) -> bool:
    """True if some process holds the proxy's flock (only a running proxy does)."""
    path = proxy_dir(settings) / "proxy.lock"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)  # closing drops our probe lock, if we got it
    return False


class ProxyKeeper:
    """Keeps one `openimds proxy` running for this state_path.

    If no process holds the proxy lock, spawn one (in its own session, so it outlives an agent
    restart as Neutron's haproxy does; the spec files keep it correct). Our own child is reaped
    on every check. (A minimal keeper on purpose: host/supervise.py's Child owns its process
    through an asyncio transport, which kills the child when the transport is collected.)
    """

    def __init__(self, settings: Settings, argv: Sequence[str]) -> None:
        self.settings = settings
        self.argv = list(argv)
        self.child: subprocess.Popen[bytes] | None = None
        self.spawned = 0

    def check(self) -> None:
        if self.child is not None and self.child.poll() is not None:
            log.warning("l3.proxy_exited pid=%d rc=%s", self.child.pid, self.child.returncode)
            self.child = None
            if self.settings.AGENT.check_child_processes_action == "exit":
                raise ProxyDied("the metadata proxy exited and "
                                "[AGENT] check_child_processes_action = exit")
        if self.child is not None or proxy_running(self.settings):
            return
        directory = proxy_dir(self.settings)
        directory.mkdir(parents=True, exist_ok=True)
        with (directory / "proxy-spawned.log").open("ab") as out:
            self.child = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.spawned += 1
        log.info("l3.proxy_spawned pid=%d", self.child.pid)

    async def run(self) -> None:
        """Check every [AGENT] check_child_processes_interval; 0 = start once, never respawn."""
        interval_s = self.settings.AGENT.check_child_processes_interval
        while True:
            try:
                self.check()
            except OSError as exc:
                log.error("l3.proxy_spawn_failed reason=%s", exc)
            if interval_s <= 0:
                return
            await asyncio.sleep(interval_s)


class ProxyDied(OpenImdsError):
    """The supervised proxy exited and the configured action is to exit too."""


def proxy_argv(config_path: str | None) -> list[str]:
    argv = [sys.executable, "-m", "openimds"]
    if config_path:
        argv += ["--config", config_path]
    return argv + ["proxy"]


# --- following the registry ---------------------------------------------------------------


class L3Agent:
    """Follows the change feed; converges on relevant changes, on resync, periodically and
    (sooner) after a failure. One converge at a time, always from a fresh /v1/topology."""

    RETRY_S = 2.0

    def __init__(
        self, settings: Settings, *, config_path: str | None = None,
        client: AsyncRegistryClient | None = None, supervise_proxy: bool = True,
    ) -> None:
        self.settings = settings
        self.driver = RouterDriver(settings)
        self.client = client or AsyncRegistryClient.from_settings(settings, admin=False)
        self.keeper = (
            ProxyKeeper(settings, proxy_argv(config_path))
            if supervise_proxy and settings.enable_metadata_proxy
            and settings.proxy.spawn_from_agents else None
        )
        self.revision: int | None = None
        self._wake = asyncio.Event()
        self._full = True
        self._background: set[asyncio.Task[None]] = set()
        self.heartbeat = Heartbeat(self.client, settings, "l3", on_fence=self._fence,
                                   on_unfence=lambda: self.request_converge(full=True))
        self.metrics = ServiceMetrics("l3-agent")
        self.metrics.add(self.metric_families)
        self.feed_stats = self.metrics.feed("l3-agent")
        self.last_report = ConvergeReport()
        self.last_converge_s = 0.0
        self.counts = {"full": 0, "incremental": 0, "failed": 0, "created": 0, "removed": 0}

    async def _announce_again(self, items: list[tuple[str, str, tuple[bytes, ...]]]) -> None:
        for delay in (0.5, 2.0):
            await asyncio.sleep(delay)
            await asyncio.to_thread(send_announcements, items)

    async def _fence(self) -> None:
        await asyncio.to_thread(self.driver.fence)

    def metric_families(self) -> list[Metric]:
        """Routers and converges for /metrics."""
        c, r = self.counts, self.last_report
        return [
            gauge("openimds_l3_routers", "Routers this agent serves", r.routers),
            gauge("openimds_l3_routers_failed", "Routers the last converge could not build",
                  len(r.failed)),
            labelled("openimds_l3_converges", "Converges with the registry's topology",
                     "counter", "kind", [("full", c["full"]), ("incremental", c["incremental"])]),
            counter("openimds_l3_converge_failures",
                    "Converges that failed (registry unreachable, a bug)", c["failed"]),
            counter("openimds_l3_namespaces_created", "qrouter- namespaces created",
                    c["created"]),
            counter("openimds_l3_namespaces_removed", "qrouter- namespaces removed",
                    c["removed"]),
            gauge("openimds_l3_last_converge_duration_seconds", "How long the last converge took",
                  self.last_converge_s),
        ]

    def request_converge(self, *, full: bool) -> None:
        self._full |= full
        self._wake.set()

    async def converge(self, *, full: bool) -> ConvergeReport:
        t0 = time.monotonic()
        topology = await self.client.topology()
        if self.heartbeat.fenced:  # lost the registry meanwhile: build nothing
            return ConvergeReport()
        report = await asyncio.to_thread(self.driver.converge, topology, full=full,
                                         host=self.settings.host)
        if self.heartbeat.fenced:  # fenced while converging: what it brought up goes down
            await asyncio.to_thread(self.driver.fence)
        self.revision = int(topology.get("revision", 0))
        self.last_converge_s = time.monotonic() - t0
        self.last_report = report
        self.counts["full" if full else "incremental"] += 1
        self.counts["created"] += len(report.created)
        self.counts["removed"] += len(report.removed)
        if report.specs_changed:
            signal_proxy(self.settings)
        if report.announced:  # again shortly, as Neutron's send_arp_for_ha does
            task = asyncio.create_task(self._announce_again(report.announced))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        log.info("l3.converged revision=%s full=%s routers=%d created=%d removed=%d failed=%d",
                 self.revision, full, report.routers, len(report.created), len(report.removed),
                 len(report.failed))
        return report

    async def _watch(self) -> None:
        follower = ChangeFollower(self.client, stats=self.feed_stats)
        try:
            async for batch in follower:
                if batch.resync:
                    self.request_converge(full=True)
                elif any(is_relevant(c) for c in batch.changes):
                    self.request_converge(full=False)
        finally:
            await follower.aclose()

    async def _converge_loop(self) -> None:
        if self.heartbeat.stale_at_start():
            # Away longer than the fence time: what we left may be served elsewhere now.
            await asyncio.to_thread(self.driver.fence)
        await self.heartbeat.first_ok.wait()
        resync_s = self.settings.l3.resync_interval
        last_full = time.monotonic()
        retry_at: float | None = None
        while True:
            now = time.monotonic()
            deadline = last_full + resync_s if retry_at is None else min(retry_at,
                                                                          last_full + resync_s)
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, deadline - now))
            except TimeoutError:
                self._full = True
            self._wake.clear()
            full, self._full = self._full, False
            if self.heartbeat.fenced:
                self._full = True  # unfencing asks for a full converge
                continue
            try:
                report = await self.converge(full=full)
            except OpenImdsError as exc:  # registry unreachable or refusing: retry soon
                self.counts["failed"] += 1
                log.warning("l3.converge_failed reason=%s retry_in_s=%.1f", exc.reason,
                            self.RETRY_S)
                self._full |= full
                retry_at = time.monotonic() + self.RETRY_S
                continue
            except Exception:  # a bug or an unforeseen kernel answer: keep serving, retry
                self.counts["failed"] += 1
                log.exception("l3.converge_crashed retry_in_s=%.1f", self.RETRY_S)
                self._full = True
                retry_at = time.monotonic() + self.RETRY_S
                continue
            if full:
                last_full = time.monotonic()
            retry_at = time.monotonic() + self.RETRY_S if report.failed else None

    async def run(self) -> None:
        tasks = [
            asyncio.create_task(self._watch(), name="l3-watch"),
            asyncio.create_task(self._converge_loop(), name="l3-converge"),
        ]
        tasks.append(asyncio.create_task(self.heartbeat.run(), name="l3-heartbeat"))
        if self.keeper is not None:
            tasks.append(asyncio.create_task(self.keeper.run(), name="proxy-keeper"))
        metrics_server = await start_metrics_server(self.settings, self.metrics)
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                for task in done:
                    task.result()  # re-raise: a crashed task is a bug (or ProxyDied)
                if tasks[0] in done or tasks[1] in done:
                    return
        finally:
            if metrics_server is not None:
                metrics_server.close()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.aclose()


def run_agent(settings: Settings, config_path: str | None) -> int:
    """Entry of `openimds l3-agent`: run until SIGTERM/SIGINT."""

    async def main() -> None:
        agent = L3Agent(settings, config_path=config_path)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await agent.run()
        log.info("l3.stopped")

    asyncio.run(main())
    return 0

