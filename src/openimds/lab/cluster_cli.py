"""`openimds lab cluster up|down|show` and `openimds lab node list|exec|kill|start NODE`.

A lab cloud on one machine (see lab/cluster.py). Every command takes `--name` (default
`lab`); the host's CLI then talks to the cluster with `--config /run/openimds-lab/<name>/
host.ini` (printed by `cluster up`).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from openimds.cli import add_command
from openimds.errors import BadRequest
from openimds.output import emit_list, emit_one

_NODE_COLUMNS = ("name", "role", "ip", "pid", "alive")


def _name_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="lab",
                   help="cluster name: 1-6 lowercase letters/digits (default: lab)")


def _up(args: argparse.Namespace, settings: Any) -> int:
    from openimds.lab import cluster

    removed = cluster.clear_leftovers(args.name)
    if removed:
        print(f"removed what a killed `lab cluster up --name {args.name}` left: "
              + ", ".join(removed), file=sys.stderr)
    made = cluster.create(
        args.name, network_nodes=args.network_nodes, compute_nodes=args.compute_nodes,
        subnet=args.subnet, connection=args.connection, sets=args.set or [],
    )
    if args.format == "table":
        emit_list(made.as_dict()["nodes"], _NODE_COLUMNS, "table")
        print(f"\nregistry {made.registry_url}; from this host:\n"
              f"  export OPENIMDS_CONFIG={made.host_config}\n"
              f"  openimds server create vm1 --network NET --host compute-1 && "
              f"openimds vm plug vm1")
    else:
        emit_one(made.as_dict(), args.format)
    return 0


def _down(args: argparse.Namespace, settings: Any) -> int:
    from openimds.lab import cluster

    removed = cluster.destroy(cluster.load(args.name))
    if args.format == "table":
        print("\n".join(f"removed {what}" for what in removed))
    else:
        emit_one({"name": args.name, "removed": removed}, args.format)
    return 0


def _show(args: argparse.Namespace, settings: Any) -> int:
    from openimds.lab import cluster

    found = cluster.load(args.name)
    if args.format == "table":
        emit_list(found.as_dict()["nodes"], _NODE_COLUMNS, "table")
    else:
        emit_one(found.as_dict(), args.format)
    return 0


def _node_list(args: argparse.Namespace, settings: Any) -> int:
    from openimds.lab import cluster

    emit_list(cluster.load(args.name).as_dict()["nodes"], _NODE_COLUMNS, args.format)
    return 0


def _node_exec(args: argparse.Namespace, settings: Any) -> int:
    from openimds.lab import cluster

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise BadRequest("lab node exec: no command given (openimds lab node exec NODE -- CMD)")
    found = cluster.load(args.name)
    node = found.node(args.node)
    # The node's own config for any openimds command run inside (it reads $OPENIMDS_CONFIG).
    argv = cluster.enter_argv(node, ["env", f"OPENIMDS_CONFIG={found.node_config(node)}",
                                     *command])
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)  # noqa: S606 - stdin/stdout, signals and exit code pass through


def _node_kill(args: argparse.Namespace, settings: Any) -> int:
    from openimds.lab import cluster

    found = cluster.load(args.name)
    killed_at = cluster.kill_node(found, found.node(args.node))
    emit_one({"node": args.node, "killed": killed_at is not None, "killed_at": killed_at},
             args.format)
    return 0


def _node_start(args: argparse.Namespace, settings: Any) -> int:
    from openimds.lab import cluster

    found = cluster.load(args.name)
    node = found.node(args.node)
    cluster.start_node(found, node, wait=not args.no_wait)
    emit_one({"node": node.name, "pid": node.pid, "alive": node.alive()}, args.format)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="a lab cloud on this machine: nodes as namespaces")
    lab_sub = lab.add_subparsers(dest="lab_kind", metavar="KIND", required=True)

    cl = lab_sub.add_parser("cluster", help="build or remove a lab cluster")
    cl_sub = cl.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add_command(cl_sub, "up", _up, "build a cluster: a controller, network and compute "
                    "nodes on an underlay bridge, one PostgreSQL")
    _name_arg(p)
    p.add_argument("--network-nodes", type=int, default=2, metavar="N")
    p.add_argument("--compute-nodes", type=int, default=2, metavar="N")
    p.add_argument("--subnet", default="10.250.0.0/24",
                   help="underlay addresses (nodes from the first, the host the last)")
    p.add_argument("--connection", default="",
                   help="registry database URL; default: a new database on the local "
                        "PostgreSQL (started if needed), dropped by `cluster down`")
    p.add_argument("--set", action="append", metavar="[SECTION.]KEY=VALUE",
                   help="an option for every node's config (repeatable)")
    p = add_command(cl_sub, "down", _down, "remove everything the cluster made")
    _name_arg(p)
    p = add_command(cl_sub, "show", _show, "the cluster's nodes and where to reach it")
    _name_arg(p)

    nd = lab_sub.add_parser("node", help="one node of a lab cluster")
    nd_sub = nd.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add_command(nd_sub, "list", _node_list, "the cluster's nodes")
    _name_arg(p)
    p = add_command(nd_sub, "exec", _node_exec,
                    "run a command inside a node (its namespaces; OPENIMDS_CONFIG = its "
                    "config)", formatted=False)
    _name_arg(p)
    p.add_argument("node")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")
    p = add_command(nd_sub, "kill", _node_kill,
                    "kill -9 every process of a node, as a crash (its namespaces go too)")
    _name_arg(p)
    p.add_argument("node")
    p = add_command(nd_sub, "start", _node_start, "boot a node again on its state")
    _name_arg(p)
    p.add_argument("node")
    p.add_argument("--no-wait", action="store_true", help="do not wait for its services")
