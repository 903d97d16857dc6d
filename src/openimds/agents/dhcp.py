"""The DHCP agent (`openimds dhcp-agent`): one qdhcp- namespace and one dnsmasq per network.

It follows the registry (a `/v1/topology` snapshot, then the change feed as a trigger) and
converges every network with a DHCP-enabled IPv4 subnet and a DHCP port to the plan
`core.dnsmasq.plan_network` computes:

- namespace `qdhcp-<network id>` (lo up), this node's DHCP port (the one whose device_id
  names `[DEFAULT] host`: one per DHCP node of the network) as `tap<port id[:11]>` inside it,
  veth to `tpb<port id[:11]>` in the network's bridge (`brq...`, made through
  `agents.fabric`), with the port's MAC and IPs (and those of the dead nodes' ports it
  adopted, announced by gratuitous ARP); plus 169.254.169.254/32 while the namespace
  serves metadata, with `arp_ignore=2` on the tap unless this node is the one that answers
  ARP for it (`core.dnsmasq` module doc);
- `[dhcp] dhcp_confs/<network id>/{host,opts,leases,pid,dnsmasq.log}`; dnsmasq (from
  Debian's dnsmasq-base) runs in the foreground inside the namespace, supervised by the
  process handle: it is respawned when it dies (`[AGENT] check_child_processes_*`), sent
  SIGHUP when only the hosts/opts files changed, and restarted only when its command line
  changes (subnets added or removed, MTU);
- the proxy listener spec `network-<id>.json` in `[proxy] listeners_dir` while the network
  serves metadata (169.254.169.254:80 in the namespace), then SIGHUP to the proxy; with an
  IPv6 subnet also `fe80::a9fe:a9fe/128` (no DAD: several DHCP agents may hold it, and any of
  them answers rightly) on the tap with `network-<id>-ipv6.json` ([fe80::a9fe:a9fe%tap]:80),
  and with `metadata_ipv6_ula` `fd00:ec2::254/128` with `network-<id>-ula.json`. A router
  attach/detach only rewrites the opts file (SIGHUP to dnsmasq), the address and the spec.

What it owns is what it can find again after a restart: the per-network directories under
dhcp_confs (as Neutron's `existing_dhcp_networks`). A network that has gone is removed in
this order: listener spec (and proxy SIGHUP), dnsmasq, namespace, empty bridge, directory.
qdhcp- namespaces without a directory are never touched: they may belong to another agent.

dnsmasq drops privileges to `[dhcp] dnsmasq_user` (empty = its built-in default, `nobody`,
as under Neutron, which never passes --user). It re-reads the hosts and opts files as that
user, so directories are made 0755, files 0644, and the agent refuses to start when an
ancestor of dhcp_confs is not traversable by others (set dnsmasq_user = root, or fix the
mode). The lease and pid files are opened before the drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shutil
import signal
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from openimds.agents import fabric
from openimds.agents.l3 import ProxyKeeper, ipv6_metadata_addresses, proxy_argv
from openimds.config import Settings
from openimds.core import dnsmasq as dm
from openimds.core import names, nodes
from openimds.core.proxy_rules import ListenerSpec, render_listener_spec
from openimds.errors import ConfigError, OpenImdsError
from openimds.host import links
from openimds.host.supervise import (
    Child,
    ChildFailed,
    ChildSpec,
    pid_alive,
    signal_pid,
    stop_pid,
)
from openimds.metrics import Metric, ServiceMetrics, counter, gauge, labelled, start_metrics_server
from openimds.registry.client import AsyncRegistryClient
from openimds.registry.feed import ChangeFollower
from openimds.registry.heartbeat import Heartbeat

log = logging.getLogger(__name__)

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
RETRY_MIN_S = 0.5
RETRY_S = 2.0  # a failed converge is tried again this soon
RETRY_MAX_S = 10.0
# Change kinds that can alter a DHCP plan (router interfaces arrive as port changes).
RELEVANT_KINDS = frozenset({"network", "subnet", "port", "instance"})
_FILE_MODE = 0o644
_DIR_MODE = 0o755
_IPV6_SPEC_SUFFIXES = ("-ipv6", "-ula")  # network-<id>-ipv6.json, network-<id>-ula.json


@dataclass(slots=True)
class _Served:
    plan: dm.NetworkPlan
    child: Child


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _write_if_changed(path: Path, text: str) -> bool:
    """Atomically write text (mode 0644) unless the file already holds it; True if written."""
    try:
        if path.read_text() == text:
            return False
    except OSError:
        pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)
    return True


def check_traversable(directory: Path) -> None:
    """Raise ConfigError if a non-root dnsmasq could not reach files under directory."""
    for parent in [directory, *directory.parents]:
        try:
            mode = parent.stat().st_mode
        except FileNotFoundError:
            continue
        if not mode & stat.S_IXOTH:
            raise ConfigError(
                f"[dhcp] dhcp_confs {directory}: {parent} (mode {stat.S_IMODE(mode):04o}) is "
                "not traversable by the user dnsmasq drops to; make it o+x or set "
                "[dhcp] dnsmasq_user = root"
            )


class DhcpAgent:
    """Converges the host to the registry's DHCP view. Use from one event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.flags = dm.MetadataFlags(
            enable_isolated_metadata=settings.enable_isolated_metadata,
            force_metadata=settings.force_metadata,
            enable_metadata_network=settings.enable_metadata_network,
        )
        self.confs = Path(settings.dhcp.dhcp_confs)
        self.tunnel = fabric.tunnel_from(settings.fabric)
        self.listeners_dir = Path(settings.proxy.listeners_dir)
        self.proxy_pid_file = settings.path("proxy", "proxy.pid")
        self.served: dict[str, _Served] = {}
        self._bridge_candidates: set[str] = set()
        self.failed: set[str] = set()  # networks the last converge could not finish
        self._retry = asyncio.Event()
        self.stop_event = asyncio.Event()
        self.exit_code = 0
        self.metrics = ServiceMetrics("dhcp-agent")
        self.metrics.add(self.metric_families)
        self.feed_stats = self.metrics.feed("dhcp-agent")
        # dnsmasq restarts by reason: died (respawned), argv (command line changed)
        self.counts = {"died": 0, "argv": 0, "reloads": 0, "started": 0, "converges": 0}
        self._lock = asyncio.Lock()
        # Set by run_agent: build only networks scheduled to `host`, fenced by `heartbeat`.
        self.host: str | None = None
        self.heartbeat: Heartbeat | None = None

    def fence(self) -> list[str]:
        """Stop answering for every network of ours at once (DHCP and isolated metadata):
        take the taps down, keep everything else; the next converge brings back what is
        still scheduled here and removes what moved away. Blocking: run in a thread."""
        fenced = []
        for network_id in sorted(self.owned_networks()):
            ns = names.dhcp_namespace(network_id)
            if not links.namespace_exists(ns):
                continue
            try:
                with links.netlink(ns) as inside:
                    for link in inside.links("tap"):
                        inside.set_down(link.name)
                fenced.append(network_id)
            except (OpenImdsError, OSError) as exc:
                log.error("dhcp.fence_failed network=%s reason=%s", network_id, exc)
        if fenced:
            log.warning("dhcp.fenced networks=%s", ",".join(fenced))
        return fenced

    def metric_families(self) -> list[Metric]:
        """Networks and dnsmasq for /metrics."""
        c = self.counts
        return [
            gauge("openimds_dhcp_networks", "Networks this agent serves DHCP for",
                  len(self.served)),
            gauge("openimds_dhcp_networks_failed", "Networks the last converge could not finish",
                  len(self.failed)),
            gauge("openimds_dhcp_dnsmasq_running", "dnsmasq processes running",
                  sum(1 for x in self.served.values() if x.child.running)),
            counter("openimds_dhcp_dnsmasq_started", "dnsmasq processes started", c["started"]),
            labelled("openimds_dhcp_dnsmasq_restarts",
                     "dnsmasq restarts: died (respawned) or argv (command line changed)",
                     "counter", "reason", [("died", c["died"]), ("argv", c["argv"])]),
            counter("openimds_dhcp_dnsmasq_reloads", "SIGHUPs after host/option file changes",
                    c["reloads"]),
            counter("openimds_dhcp_converges", "Converges with the registry's topology",
                    c["converges"]),
        ]

    # --- one network ---------------------------------------------------------------------

    def _conf_dir(self, network_id: str) -> Path:
        return self.confs / network_id

    def plan(self, network: dm.DhcpNetwork) -> dm.NetworkPlan | None:
        d = self.settings.dhcp
        return dm.plan_network(
            network, self.flags, str(self._conf_dir(network.id)),
            lease_duration_s=self.settings.dhcp_lease_duration, binary=d.dnsmasq_binary,
            lease_max=d.dnsmasq_lease_max, user=d.dnsmasq_user,
            ipv6_metadata=ipv6_metadata_addresses(self.settings), host=self.host,
        )

    def _apply_links(self, plan: dm.NetworkPlan, mtu: int, vni: int | None,
                     set_arp: bool) -> None:
        """Bridge, namespace, veth and addresses (blocking netlink calls; run in a thread);
        set_arp: (re)write the tap's arp_ignore (first build, or the ARP answerer changed)."""
        links.ensure_namespace(plan.namespace)
        with links.netlink() as nl, links.netlink(plan.namespace) as inside:
            fabric.ensure_bridge(nl, fabric.BridgeSpec(plan.bridge, plan.network_id, mtu, vni),
                                 self.tunnel)
            for old in inside.links("tap"):
                if old.name != plan.tap:  # this node's port changed: the old one's addresses go
                    inside.delete_link(old.name)
            nl.ensure_veth(plan.tap_peer, peer=plan.tap, inside=inside, master=plan.bridge,
                           mtu=mtu, peer_mac=plan.mac_address)
            inside.set_addresses(plan.tap, plan.addresses)
            if set_arp:
                # 2: answer ARP only for addresses in the asker's subnet, so not for
                # 169.254.169.254/32 while another node's tap answers for it
                # promote_secondaries: an adopted port's address is a secondary of the same
                # subnet; freeing whichever is primary must not take the others with it
                links.set_sysctl(plan.namespace, f"net.ipv4.conf.{plan.tap}.arp_ignore",
                                 "0" if plan.metadata_arp or not plan.metadata else "2",
                                 (f"net.ipv4.conf.{plan.tap}.promote_secondaries", "1"))
            inside.set_up(plan.tap)

    def _write_files(self, plan: dm.NetworkPlan) -> bool:
        conf = self._conf_dir(plan.network_id)
        conf.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        os.chmod(conf, _DIR_MODE)
        paths = dm.DhcpPaths(str(conf))
        changed = _write_if_changed(Path(paths.hosts), plan.hosts)
        changed = _write_if_changed(Path(paths.opts), plan.opts) or changed
        return changed

    def _listener_path(self, network_id: str, suffix: str = "") -> Path:
        return self.listeners_dir / f"{names.network_listener_name(network_id)}{suffix}.json"

    def _listener_specs(self, plan: dm.NetworkPlan) -> dict[str, ListenerSpec]:
        """spec file suffix -> spec: 169.254.169.254:80, and with IPv6 one listener per IPv6
        metadata address (the link-local one bound to the tap, as Neutron's
        `bind [fe80::a9fe:a9fe]:80 interface tapX`)."""
        scope = {"router_id": plan.router_id,
                 "network_id": None if plan.router_id else plan.network_id}
        base = names.network_listener_name(plan.network_id)
        # bound to this node's own tap (SO_BINDTODEVICE), like the IPv6 listeners
        specs = {"": ListenerSpec(name=base, netns=plan.namespace, host=dm.METADATA_IP,
                                  port=80, interface=plan.tap, **scope)}
        for ip in plan.metadata_ipv6:
            suffix = "-ipv6" if ipaddress.ip_address(ip).is_link_local else "-ula"
            specs[suffix] = ListenerSpec(name=base + suffix, netns=plan.namespace, host=ip,
                                         port=80, interface=plan.tap, **scope)
        return specs

    def _set_listener(self, plan: dm.NetworkPlan | None, network_id: str) -> bool:
        """Write or remove the network's listener specs; True if the directory changed."""
        want = self._listener_specs(plan) if plan is not None and plan.metadata else {}
        changed = False
        for suffix in ("", *_IPV6_SPEC_SUFFIXES):
            path = self._listener_path(network_id, suffix)
            spec = want.get(suffix)
            if spec is None:
                if path.exists():
                    path.unlink(missing_ok=True)
                    log.info("dhcp.listener_removed network=%s spec=%s", network_id, path.name)
                    changed = True
                continue
            self.listeners_dir.mkdir(parents=True, exist_ok=True)
            if _write_if_changed(path, render_listener_spec(spec)):
                log.info("dhcp.listener_written network=%s netns=%s spec=%s", network_id,
                         plan.namespace if plan else "-", path.name)
                changed = True
        return changed

    def _signal_proxy(self) -> None:
        pid = _read_pid(self.proxy_pid_file)
        if pid is None or not pid_alive(pid):
            log.debug("dhcp.proxy_not_running pid_file=%s", self.proxy_pid_file)
            return
        signal_pid(pid, signal.SIGHUP)
        log.debug("dhcp.proxy_hup pid=%d", pid)

    def _child_spec(self, plan: dm.NetworkPlan, holder: list[Child]) -> ChildSpec:
        """How to run one dnsmasq; ready once its pid file names the process (holder[0])."""
        pid_file = Path(dm.DhcpPaths(str(self._conf_dir(plan.network_id))).pid)

        def ready() -> bool:
            return bool(holder) and _read_pid(pid_file) == holder[0].pid

        mon = self.settings.AGENT
        return ChildSpec(
            name=f"dnsmasq-{plan.network_id}",
            argv=("ip", "netns", "exec", plan.namespace, *plan.argv),
            log_file=self._conf_dir(plan.network_id) / "dnsmasq.stderr",
            ready=ready, ready_timeout_s=15.0,
            restart=mon.check_child_processes_interval > 0
            and mon.check_child_processes_action == "respawn",
            backoff_initial_s=max(mon.check_child_processes_interval, 0.2),
            stop_timeout_s=5.0,
        )

    def _on_dnsmasq_exit(self, network_id: str) -> Callable[[Child, int], None]:
        def callback(child: Child, rc: int) -> None:
            log.error("dhcp.dnsmasq_died network=%s pid=%s rc=%d: dnsmasq for network with "
                      "uuid %s not found. The process should not have died",
                      network_id, child.pid, rc, network_id)
            if self.settings.AGENT.check_child_processes_action == "exit":
                log.error("dhcp.exiting reason=dnsmasq died and check_child_processes_action"
                          " = exit")
                self.exit_code = 1
                self.stop_event.set()
            elif child.spec.restart:
                self.counts["died"] += 1
                log.warning("dhcp.respawning network=%s: respawning dnsmasq for uuid %s",
                            network_id, network_id)
        return callback

    async def _kill_stale(self, network_id: str) -> None:
        """Stop a dnsmasq left by an earlier agent run (pid file + cmdline naming our dir)."""
        pid_file = dm.DhcpPaths(str(self._conf_dir(network_id))).pid
        pid = _read_pid(Path(pid_file))
        if pid is not None and pid_alive(pid) and f"--pid-file={pid_file}" in _cmdline(pid):
            log.info("dhcp.stale_dnsmasq network=%s pid=%d action=stop", network_id, pid)
            await stop_pid(pid, timeout_s=5.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pid_file)

    async def _start_dnsmasq(self, plan: dm.NetworkPlan) -> Child:
        await self._kill_stale(plan.network_id)
        holder: list[Child] = []
        child = Child(self._child_spec(plan, holder))
        holder.append(child)
        child.on_exit(self._on_dnsmasq_exit(plan.network_id))
        await child.start()
        self.counts["started"] += 1
        log.info("dhcp.dnsmasq_started network=%s pid=%s", plan.network_id, child.pid)
        return child

    async def converge_network(self, network: dm.DhcpNetwork) -> None:
        plan = self.plan(network)
        if plan is None:
            if network.id in self.served or self._conf_dir(network.id).exists():
                await self.remove_network(network.id, network_gone=False)
            return
        served = self.served.get(network.id)
        # addresses gained while serving (a dead node's port adopted): announced below
        gained = () if served is None or served.plan.tap != plan.tap else tuple(
            a for a in plan.addresses if a not in served.plan.addresses)
        set_arp = (served is None or served.plan.tap != plan.tap
                   or served.plan.metadata_arp != plan.metadata_arp
                   or served.plan.metadata != plan.metadata)
        await asyncio.to_thread(self._apply_links, plan, network.mtu or 1500,
                                network.segmentation_id, set_arp)
        files_changed = await asyncio.to_thread(self._write_files, plan)
        if served is None or not served.child.running and not served.child.spec.restart:
            if served is not None:
                await served.child.stop()
            child = await self._start_dnsmasq(plan)
            self.served[network.id] = _Served(plan, child)
            # this node serves the network now (maybe moved here): tell the segment
            await self._announce(plan, plan.addresses)
        elif served.plan.argv != plan.argv:
            log.info("dhcp.dnsmasq_restart network=%s reason=command line changed", network.id)
            self.counts["argv"] += 1
            await served.child.stop()
            served.child = await self._start_dnsmasq(plan)
            served.plan = plan
        else:
            pid = served.child.pid
            pid_file = Path(dm.DhcpPaths(str(self._conf_dir(network.id))).pid)
            # Only a dnsmasq that wrote its pid file has its SIGHUP handler (and has read the
            # files once); one still starting reads the new files anyway.
            if files_changed and pid is not None and served.child.running \
                    and _read_pid(pid_file) == pid:
                signal_pid(pid, signal.SIGHUP)
                self.counts["reloads"] += 1
                log.info("dhcp.dnsmasq_reload network=%s pid=%d", network.id, served.child.pid)
            served.plan = plan
        if gained:
            await self._announce(plan, gained)
        if self._set_listener(plan, network.id):
            self._signal_proxy()

    async def _announce(self, plan: dm.NetworkPlan, addresses: tuple[str, ...]) -> None:
        """Gratuitous ARP for the IPv4 addresses (not 169.254.169.254) at the tap's MAC: the
        segment (and a VM whose cache still holds a dead node's MAC for them) follows."""
        frames = [nodes.gratuitous_arp(plan.mac_address, cidr.split("/")[0])
                  for cidr in addresses
                  if ":" not in cidr and not cidr.startswith(dm.METADATA_IP + "/")]
        if frames:
            await asyncio.to_thread(links.announce, plan.namespace, plan.tap, frames)

    async def remove_network(self, network_id: str, *, network_gone: bool = True) -> None:
        """Listener spec, dnsmasq, namespace, files; and the bridge if the network is gone
        from the registry and nothing else is attached to it."""
        if self._set_listener(None, network_id):
            self._signal_proxy()
        served = self.served.pop(network_id, None)
        if served is not None:
            await served.child.stop()
        await self._kill_stale(network_id)
        await asyncio.to_thread(self._remove_links, network_id, network_gone)
        if not network_gone:
            # its bridge may go once the network leaves the registry
            self._bridge_candidates.add(network_id)
        conf = self._conf_dir(network_id)
        if conf.exists():
            await asyncio.to_thread(shutil.rmtree, conf, True)
        log.info("dhcp.network_removed network=%s", network_id)

    def _remove_links(self, network_id: str, network_gone: bool) -> None:
        namespace = names.dhcp_namespace(network_id)
        links.delete_namespace(namespace)  # takes the tap and so its bridge-side peer
        links.remove_netns_etc(namespace)
        if network_gone:
            self._delete_bridge_if_empty(network_id)

    def _delete_bridge_if_empty(self, network_id: str) -> None:
        """The network's bridge, once the registry has no such network and nothing (but our
        dying tap peer) is attached; the fabric's rule, for hosts without an L3 agent."""
        bridge = names.bridge_name(network_id)
        with links.netlink() as nl:
            # the bridge-side peer dies with the namespace, a moment later
            deadline = time.monotonic() + 2.0
            while any(p.name.startswith("tpb") for p in nl.bridge_ports(bridge)):
                if time.monotonic() > deadline:
                    log.warning("dhcp.bridge_kept bridge=%s reason=tap peer still attached",
                                bridge)
                    return
                time.sleep(0.05)
            fabric.delete_bridge_if_unused(nl, bridge)

    # --- all networks --------------------------------------------------------------------

    def owned_networks(self) -> set[str]:
        """Networks this agent has state for (its per-network directories)."""
        try:
            return {p.name for p in self.confs.iterdir() if p.is_dir() and _UUID.match(p.name)}
        except FileNotFoundError:
            return set()

    async def converge(self, topology: Mapping[str, Any]) -> None:
        """Make the host match one /v1/topology answer. Other networks are left as they are
        (unchanged plans write nothing and signal nothing)."""
        async with self._lock:
            if self.heartbeat is not None and self.heartbeat.fenced:
                return  # lost the registry meanwhile: build nothing
            networks = dm.networks_from_topology(topology)
            if self.host is not None:  # only what the registry scheduled to this node
                mine = {str(n["id"]) for n in topology.get("networks", ())
                        if self.host in (n.get("hosts") or ())}
                networks = {k: v for k, v in networks.items() if k in mine}
            failed: set[str] = set()
            for network in networks.values():
                try:
                    await self.converge_network(network)
                    continue
                except ChildFailed as exc:
                    log.error("dhcp.converge_failed network=%s reason=dnsmasq %s log=%r",
                              network.id, exc.reason, exc.log_tail[-500:])
                except (OpenImdsError, OSError) as exc:
                    log.error("dhcp.converge_failed network=%s reason=%s", network.id, exc)
                except Exception:
                    log.exception("dhcp.converge_failed network=%s", network.id)
                failed.add(network.id)
            for network_id in (set(self.served) | self.owned_networks()) - set(networks):
                try:
                    await self.remove_network(network_id)
                except Exception:
                    log.exception("dhcp.remove_failed network=%s", network_id)
                    failed.add(network_id)
            if self.heartbeat is not None and self.heartbeat.fenced:
                await asyncio.to_thread(self.fence)  # fenced while converging
            self.failed = failed
            if failed:
                self._retry.set()
            for network_id in self._bridge_candidates - set(networks):
                self._bridge_candidates.discard(network_id)
                try:
                    await asyncio.to_thread(self._delete_bridge_if_empty, network_id)
                except Exception:
                    log.exception("dhcp.bridge_remove_failed network=%s", network_id)

    async def shutdown(self, *, cleanup: bool) -> None:
        """Stop every dnsmasq; with cleanup also remove namespaces, specs and files."""
        async with self._lock:
            for network_id in list(self.served):
                if cleanup:
                    await self.remove_network(network_id)
                else:
                    await self.served.pop(network_id).child.stop()
            if cleanup:
                for network_id in self.owned_networks():
                    await self.remove_network(network_id)

    # --- following the registry ----------------------------------------------------------

    async def reload(self, client: AsyncRegistryClient) -> None:
        """Fetch /v1/topology and converge; retried with backoff while the registry is down."""
        delay = RETRY_MIN_S
        while True:
            try:
                topology = await client.topology()
            except OpenImdsError as exc:
                log.warning("dhcp.topology_failed reason=%s retry_in_s=%.1f", exc.reason, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            await self.converge(topology)
            self.counts["converges"] += 1
            log.debug("dhcp.converged revision=%s networks=%d", topology.get("revision"),
                      len(self.served))
            return

    async def follow(self, client: AsyncRegistryClient) -> None:
        """Converge on every relevant change batch (and on resync); any change reloads the
        whole topology, since plans of untouched networks come out the same and cost nothing."""
        follower = ChangeFollower(client, stats=self.feed_stats)
        try:
            async for batch in follower:
                if batch.resync or any(c.get("kind") in RELEVANT_KINDS for c in batch.changes):
                    await self.reload(client)
        finally:
            await follower.aclose()

    async def resync_periodically(self, client: AsyncRegistryClient) -> None:
        """A full reload every [dhcp] resync_interval, and RETRY_MIN_S after a failed one."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry.wait(), self.settings.dhcp.resync_interval)
            if self._retry.is_set():
                self._retry.clear()
                await asyncio.sleep(RETRY_S)
                log.info("dhcp.retry networks=%s", sorted(self.failed))
            await self.reload(client)


async def run_agent(settings: Settings, *, cleanup_on_exit: bool = False,
                    config_path: str | None = None) -> int:
    if settings.dhcp.dnsmasq_user != "root":
        check_traversable(Path(settings.dhcp.dhcp_confs))
    if shutil.which(settings.dhcp.dnsmasq_binary) is None:
        raise ConfigError(f"[dhcp] dnsmasq_binary {settings.dhcp.dnsmasq_binary!r}: not found "
                          "(install Debian's dnsmasq-base, not the dnsmasq service package)")
    confs = settings.dhcp.dhcp_confs
    os.makedirs(confs, mode=_DIR_MODE, exist_ok=True)
    os.chmod(confs, _DIR_MODE)
    agent = DhcpAgent(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.stop_event.set)
    log.info("dhcp.starting pid=%d registry=%s confs=%s isolated_metadata=%s force=%s",
             os.getpid(), settings.registry.effective_url, confs,
             settings.enable_isolated_metadata, settings.force_metadata)
    client = AsyncRegistryClient.from_settings(settings, admin=False)

    async def fence() -> None:
        await asyncio.to_thread(agent.fence)

    reloads: set[asyncio.Task[None]] = set()

    def unfence() -> None:
        # in its own task: a long converge must not hold up the next heartbeat
        task = asyncio.create_task(agent.reload(client), name="dhcp-unfence")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    beat = Heartbeat(client, settings, "dhcp", on_fence=fence, on_unfence=unfence)
    agent.host, agent.heartbeat = settings.host, beat
    if beat.stale_at_start():
        # Away longer than the fence time: what we left may be served elsewhere now.
        await fence()

    async def follow() -> None:
        await beat.first_ok.wait()
        await agent.follow(client)

    tasks = [
        asyncio.create_task(follow(), name="dhcp-follow"),
        asyncio.create_task(agent.resync_periodically(client), name="dhcp-resync"),
        asyncio.create_task(agent.stop_event.wait(), name="dhcp-stop"),
        asyncio.create_task(beat.run(), name="dhcp-heartbeat"),
    ]
    metrics_server = await start_metrics_server(settings, agent.metrics)
    keeper_task: asyncio.Task[None] | None = None
    if agent.flags.serves_metadata and settings.proxy.spawn_from_agents:
        # Like the L3 agent: keep one `openimds proxy` for this state_path (if none holds its
        # lock), so an isolated-only host serves metadata too. Its run() returns at once when
        # respawning is off; it raises when the proxy died and the action is "exit".
        keeper = ProxyKeeper(settings, proxy_argv(config_path))
        keeper_task = asyncio.create_task(keeper.run(), name="proxy-keeper")

        def keeper_done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("dhcp.exiting reason=%s", task.exception())
                agent.exit_code = 1
                agent.stop_event.set()

        keeper_task.add_done_callback(keeper_done)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("dhcp.task_failed task=%s reason=%r", task.get_name(),
                          task.exception())
                agent.exit_code = 1
    finally:
        if keeper_task is not None:
            tasks.append(keeper_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await agent.shutdown(cleanup=cleanup_on_exit)
        await client.aclose()
        if metrics_server is not None:
            metrics_server.close()
    log.info("dhcp.stopped cleanup=%s", cleanup_on_exit)
    return agent.exit_code


def main(settings: Settings, *, cleanup_on_exit: bool = False,
         config_path: str | None = None) -> int:
    return asyncio.run(run_agent(settings, cleanup_on_exit=cleanup_on_exit,
                                 config_path=config_path))
