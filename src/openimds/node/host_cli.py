"""`openimds host list|show|delete`: the nodes the registry knows, from their agents' heartbeats.

Each node: its roles (from the agent types it runs), whether every agent on it is alive
(heartbeat younger than `[DEFAULT] agent_down_time`), its last heartbeat, the routers and
networks scheduled to it, and for each agent the peers its last heartbeat answer counted (0:
it is solo and does not fence on a registry outage; ? unknown); `dhcp` lists its DHCP ports
(network, port, addresses): each node serving a network's DHCP has its own port and address.
"""

from __future__ import annotations

import argparse
from typing import Any

from openimds.cli import add_command
from openimds.output import emit_list, emit_one
from openimds.registry.client import RegistryClient

Obj = dict[str, Any]
COLUMNS = ("name", "roles", "alive", "last_heartbeat", "heartbeat_age_s", "routers",
           "networks", "dhcp_ips")


def _peers(a: Obj) -> str:
    peers = a.get("peers")
    return "?" if peers is None else str(peers)


def _table(h: Obj) -> Obj:
    """Counts instead of ID lists, agents as type=alive|dead(peers=N): N other alive agents of
    its type, as its last heartbeat answer said (? unknown); peers=0 means it does not fence."""
    return {**h, "routers": len(h["routers"]), "networks": len(h["networks"]),
            "dhcp_ips": [ip for d in h.get("dhcp", ()) for ip in d["ip_addresses"]],
            "agents": [f"{a['type']}={'alive' if a['alive'] else 'dead'}(peers={_peers(a)})"
                       for a in h["agents"]]}


def _host_list(args: argparse.Namespace, settings: Any) -> int:
    with RegistryClient.from_settings(settings, admin=False) as c:
        hosts = c.list("host")
    if args.format != "json":
        hosts = [_table(h) for h in hosts]
    emit_list(hosts, [*COLUMNS, "agents"], args.format)
    return 0


def _host_show(args: argparse.Namespace, settings: Any) -> int:
    with RegistryClient.from_settings(settings, admin=False) as c:
        host = c.get("host", args.host)
    emit_one(host, args.format)
    return 0


def _host_delete(args: argparse.Namespace, settings: Any) -> int:
    with RegistryClient.from_settings(settings, admin=True) as c:
        for name in args.hosts:
            c.delete("host", name)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("host", help="nodes and what they serve",
                            description="nodes and what they serve")
    group = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_command(group, "list", _host_list, "list nodes: roles, alive, last heartbeat, load")
    p = add_command(group, "show", _host_show, "show one node with its agents and resources")
    p.add_argument("host", metavar="HOST")
    p = add_command(group, "delete", _host_delete,
                    "forget decommissioned (dead) nodes; what they served moves elsewhere")
    p.add_argument("hosts", nargs="+", metavar="HOST")
