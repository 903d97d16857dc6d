"""`openimds vm plug|exec|unplug SERVER`: be a VM on the real datapath (see lab/vm.py)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from openimds.cli import add_command
from openimds.errors import BadRequest, NotFound
from openimds.output import emit_one


def _on_node(settings: Any, server: str, command: list[str]) -> None:
    """In a lab cluster (host.ini), run `openimds vm COMMAND` inside the server's node and
    never return; return if the server has no node (then it is plugged here)."""
    from openimds.lab import cluster
    from openimds.lab.vm import Registry

    if cluster.cluster_of(settings) is None:
        return
    registry = Registry(settings)
    try:
        instance = registry.find_instance(server)
    finally:
        registry.close()
    found = cluster.node_of(settings, instance.get("host"))
    if found is None:
        return
    lab, node = found
    argv = [sys.executable, "-m", "openimds", "--config", str(lab.node_config(node)), "vm",
            command[0], str(instance["id"]), *command[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    entered = cluster.enter_argv(node, argv)
    os.execvp(entered[0], entered)  # noqa: S606


def _plug(args: argparse.Namespace, settings: Any) -> int:
    from openimds.lab.vm import plug

    _on_node(settings, args.server, ["plug", "--address-mode", args.address_mode,
                                     "-f", args.format] + (["-v"] if args.verbose else []))

    plan = plug(settings, args.server, address_mode=args.address_mode)
    if args.format == "table" and not args.verbose:
        print(plan.namespace)
    else:
        emit_one(plan.as_dict(), args.format)
    return 0


def _exec(args: argparse.Namespace, settings: Any) -> int:
    from openimds.host.links import namespace_exists
    from openimds.lab.vm import namespace_for

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise BadRequest("vm exec: no command given (openimds vm exec SERVER -- CMD ...)")
    _on_node(settings, args.server, ["exec", "--", *command])
    ns = namespace_for(settings, args.server)
    if not namespace_exists(ns):
        raise NotFound(f"server {args.server} is not plugged (no namespace {ns})")
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process: stdin/stdout/stderr, signals and the exit code pass straight
    # through. `ip netns exec` also binds /etc/netns/<ns>/resolv.conf over /etc/resolv.conf.
    os.execvp("ip", ["ip", "netns", "exec", ns, *command])  # noqa: S606


def _unplug(args: argparse.Namespace, settings: Any) -> int:
    from openimds.lab.vm import namespace_for, unplug_namespace

    _on_node(settings, args.server, ["unplug", "-f", args.format])
    ns = namespace_for(settings, args.server)
    removed = unplug_namespace(ns)
    if args.format == "table":
        print(f"{ns} {'removed' if removed else 'was not plugged'}")
    else:
        emit_one({"namespace": ns, "removed": removed}, args.format)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    vm = sub.add_parser("vm", help="lab VMs: a namespace plugged into a server's network")
    vm_sub = vm.add_subparsers(dest="action", metavar="ACTION", required=True)

    plug = add_command(vm_sub, "plug", _plug,
                       "make namespace vm-<id[:8]> with the server's port on its network")
    plug.add_argument("server", help="server id or unique name")
    plug.add_argument("--address-mode", default="static", choices=("static", "dhcp"),
                      help="how eth0 gets its address (default: static fixed IP + gateway)")
    plug.add_argument("--dhcp", dest="address_mode", action="store_const", const="dhcp",
                      help="run a DHCP client (udhcpc, option 121 routes) instead; run again "
                           "to renew")
    plug.add_argument("-v", "--verbose", action="store_true",
                      help="print every field, not just the namespace name")

    ex = add_command(vm_sub, "exec", _exec, "run a command inside a plugged server's namespace")
    ex.add_argument("server", help="server id or unique name")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...]")

    unplug = add_command(vm_sub, "unplug", _unplug, "remove a server's VM namespace")
    unplug.add_argument("server", help="server id or unique name")
