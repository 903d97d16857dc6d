"""Nodes, agent types and placement: pure decisions the registry's scheduler applies.

A node is a machine named by its `[DEFAULT] host`. Each agent on it heartbeats into the
registry as (host, type); a node's roles follow from the types it runs. Routers are placed on
nodes running an alive L3 agent (exactly one each), networks' DHCP on nodes running an alive
DHCP agent (`[DEFAULT] dhcp_agents_per_network` each). `place` is the whole policy:

- a resource bound to a dead node moves to an alive one, if one is free for it; with no alive
  candidate it stays where it is (so the node that comes back finds it and nothing flaps),
  unless the node is `gone` (deleted with `openimds host delete`: it will not come back), then
  that binding is dropped (a network's other DHCP nodes keep serving; a router waits unbound
  for the next alive node);
- `takers` narrows who may take a dead node's work: only nodes that were already alive when
  it last reported (it was told it had peers, so it fenced itself); a solo node's work waits
  for it, or for `openimds host delete`, so no newcomer answers an IP it may still serve;
- a resource with fewer nodes than wanted gets the least-loaded alive nodes (ties: name);
- a node that comes back alive takes nothing back: bindings only move off dead nodes;
- surplus bindings (the wanted count was lowered) go, dead nodes first, then the most loaded;
- adoption (`place_adopting`, networks' DHCP): a dead node's binding that no free node can
  take, on a resource that still has an alive node allowed to take its work (`takers`), is
  dropped and that node *adopts* its DHCP port: it serves the port's address besides its
  own. The move happens when the registry declares the node dead (agent_down_time), after
  the node fenced itself (0.6 × agent_down_time, `registry.heartbeat`), the rule router
  failover follows, so no address is answered by two nodes. A node that comes back takes
  nothing back: the adopted port stays where it is; the node is bound again only if the
  wanted count needs it, and then gets a port (and address) of its own.

`dhcp_ports` turns a network's DHCP nodes into its DHCP ports: one per node, named for it
(`models.dhcp_device_id`), each with its own address. A port whose node lost the binding is
handed to a node that gained one (re-bound: same port, same MAC, same IPs), so clients that
renew against the old server address, and guests routing metadata via it, keep working once
the new node announces it. A port named for a dead node that a live node adopts is re-bound
to it as `models.dhcp_adopted_device_id` (the node then holds several DHCP ports' addresses);
an adopted port follows its adopter's own port when that is handed over, else it is handed
over or freed like any other port.
Only a port nobody takes is freed; a network with no DHCP node keeps
one port reserved, so its address (the first of the pool) survives until a node claims it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from openimds.core.models import (
    DHCP_RESERVED_DEVICE_ID,
    dhcp_adopted_device_id,
    dhcp_device_id,
)

__all__ = [
    "AGENT_TYPES",
    "KIND_AGENT",
    "ROLES",
    "ROLE_OF_AGENT",
    "DhcpPortPlan",
    "dhcp_ports",
    "place",
    "place_adopting",
    "roles_of",
]

# What heartbeats, and which role a node running it has.
ROLE_OF_AGENT: dict[str, str] = {
    "registry": "controller",
    "api": "controller",
    "l3": "network",
    "dhcp": "network",
    "metadata": "network",
    "l2": "compute",
}
AGENT_TYPES = frozenset(ROLE_OF_AGENT)
ROLES = ("controller", "network", "compute")
# The agent type that serves each schedulable kind.
KIND_AGENT: dict[str, str] = {"router": "l3", "network": "dhcp"}


def roles_of(agent_types: Iterable[str]) -> list[str]:
    """A node's roles, in ROLES order, from the agent types it runs."""
    have = {ROLE_OF_AGENT[t] for t in agent_types if t in ROLE_OF_AGENT}
    return [r for r in ROLES if r in have]


def place(
    current: Mapping[str, Sequence[str]], resources: Iterable[str], alive: Iterable[str],
    wanted: int, takers: Mapping[str, Iterable[str]] | None = None,
    gone: Iterable[str] = (),
) -> dict[str, list[str]]:
    """The new host lists of the resources whose placement must change (see module doc).

    current: resource id -> bound hosts; resources: every existing resource id; alive: hosts
    whose agent for this kind is alive; wanted: hosts per resource; takers: dead host -> the
    alive hosts that may take its work (a dead host not in it: any alive host); gone: hosts
    the registry no longer knows (deleted).
    """
    return _place(current, resources, alive, wanted, takers, gone, adopt=False)[0]


def place_adopting(
    current: Mapping[str, Sequence[str]], resources: Iterable[str], alive: Iterable[str],
    wanted: int, takers: Mapping[str, Iterable[str]] | None = None,
    gone: Iterable[str] = (),
) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """`place`, plus adoption (module doc): (changed host lists, resource id -> {dead host:
    the alive host, still bound, that adopts its DHCP port})."""
    return _place(current, resources, alive, wanted, takers, gone, adopt=True)


def _place(
    current: Mapping[str, Sequence[str]], resources: Iterable[str], alive: Iterable[str],
    wanted: int, takers: Mapping[str, Iterable[str]] | None, gone: Iterable[str], *,
    adopt: bool,
) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    gone_set = set(gone)
    allowed = {dead: set(hosts) for dead, hosts in (takers or {}).items()}
    alive_set = set(alive)
    existing = sorted(set(resources))
    load: Counter[str] = Counter()
    for rid in existing:
        load.update(current.get(rid, ()))
    changed: dict[str, list[str]] = {}
    adopted: dict[str, dict[str, str]] = {}
    for rid in existing:
        before = list(current.get(rid, ()))
        hosts = list(before)
        for dead in [h for h in hosts if h not in alive_set]:
            free = alive_set - set(hosts)
            if dead in allowed:
                free &= allowed[dead]
            candidate = _least_loaded(free, load)
            if candidate is None:
                if dead in gone_set:
                    hosts.remove(dead)
                    load[dead] -= 1
                elif adopt:
                    mates = alive_set & set(hosts)
                    if dead in allowed:
                        mates &= allowed[dead]
                    adopter = _least_loaded(mates, load)
                    if adopter is not None:
                        hosts.remove(dead)
                        load[dead] -= 1
                        adopted.setdefault(rid, {})[dead] = adopter
                continue
            hosts[hosts.index(dead)] = candidate
            load[dead] -= 1
            load[candidate] += 1
        while len(hosts) < wanted:
            candidate = _least_loaded(alive_set - set(hosts), load)
            if candidate is None:
                break
            hosts.append(candidate)
            load[candidate] += 1
        while len(hosts) > wanted:
            victim = max(hosts, key=lambda h: (h not in alive_set, load[h], h))
            hosts.remove(victim)
            load[victim] -= 1
        if sorted(hosts) != sorted(before):
            changed[rid] = sorted(hosts)
    return changed, adopted


def _least_loaded(candidates: set[str], load: Counter[str]) -> str | None:
    if not candidates:
        return None
    return min(candidates, key=lambda h: (load[h], h))


@dataclass(slots=True)
class DhcpPortPlan:
    """What to do with one network's DHCP ports (see module doc)."""

    rebind: dict[str, str] = field(default_factory=dict)  # port id -> its new device_id
    create: list[str] = field(default_factory=list)  # hosts that need a new port
    delete: list[str] = field(default_factory=list)  # port ids to free

    def __bool__(self) -> bool:
        return bool(self.rebind or self.create or self.delete)


def dhcp_ports(network_id: str, hosts: Iterable[str], ports: Mapping[str, str], *,
               has_dhcp: bool = True, adopt: Mapping[str, str] | None = None) -> DhcpPortPlan:
    """The changes that give each of `hosts` exactly one DHCP port on the network.

    ports: port id -> device_id of the network's DHCP ports. Ports already named for a host
    stay, and so do ports adopted by one of them; the rest (a node that lost its binding, a
    reserved port, a legacy `dhcp-<network>` one) go, in port id order, to the hosts without
    one, in name order; then new ports for hosts still without one. adopt: dead host -> the
    host (one of `hosts`) that adopts its port: a left-over port named for the dead host is
    re-bound to the adopter; ports a node had adopted follow its own port when that is
    handed over (they stay together). Other left-over ports are freed, except one kept reserved when
    no host serves the network. has_dhcp=False (no DHCP-enabled subnet): no ports at all.
    """
    plan = DhcpPortPlan()
    if not has_dhcp:
        plan.delete = sorted(ports)
        return plan
    wanted = {dhcp_device_id(h, network_id): h for h in sorted(set(hosts))}
    kept_adopted = {dhcp_adopted_device_id(h, network_id) for h in wanted.values()}
    claimed = {dev for dev in ports.values() if dev in wanted}
    needy = [wanted[dev] for dev in wanted if dev not in claimed]
    spare: list[str] = []
    seen: set[str] = set()
    # adopted ports last: a node's own port is what a node without one takes over
    for pid in sorted(ports, key=lambda p: (ports[p].endswith("-adopted"), p)):
        dev = ports[pid]
        if dev in kept_adopted:
            continue  # served by a bound node besides its own
        if dev in wanted and dev not in seen:
            seen.add(dev)
        else:
            spare.append(pid)  # named for no host we want (or a second port of the same)
    adopters = {dhcp_device_id(dead, network_id): dhcp_adopted_device_id(by, network_id)
                for dead, by in (adopt or {}).items() if by in wanted.values()}
    for host, pid in zip(needy, spare, strict=False):
        plan.rebind[pid] = dhcp_device_id(host, network_id)
        # the node taking this port over also takes what its old node had adopted
        adopters[ports[pid] + "-adopted"] = dhcp_adopted_device_id(host, network_id)
    plan.create = needy[len(spare):]
    left = spare[len(needy):]
    for pid in [p for p in left if ports[p] in adopters]:
        plan.rebind[pid] = adopters[ports[pid]]
        left.remove(pid)
    if not wanted and left:
        keep = next((p for p in left if ports[p] == DHCP_RESERVED_DEVICE_ID), left[0])
        if ports[keep] != DHCP_RESERVED_DEVICE_ID:
            plan.rebind[keep] = DHCP_RESERVED_DEVICE_ID
        left = [p for p in left if p != keep]
    plan.delete = left
    return plan


def gratuitous_arp(mac: str, ip: str) -> bytes:
    """An Ethernet broadcast ARP request announcing ip at mac (sender = target = ip), as
    `arping -U` sends: after a router or DHCP port moves to another node, it tells the L2
    (bridges, VXLAN learning, the VMs' neighbour caches) where that address lives now."""
    hw = bytes.fromhex(mac.replace(":", ""))
    addr = bytes(int(part) for part in ip.split("."))
    if len(hw) != 6 or len(addr) != 4:
        raise ValueError(f"gratuitous_arp: bad MAC {mac!r} or IPv4 address {ip!r}")
    ether = b"\xff" * 6 + hw + b"\x08\x06"
    arp = b"\x00\x01\x08\x00\x06\x04\x00\x01" + hw + addr + b"\x00" * 6 + addr
    return ether + arp
