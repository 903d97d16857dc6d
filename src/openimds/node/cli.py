"""`openimds up [--demo]`, `openimds down [--purge]`, `openimds trace SERVER`, `openimds doctor`."""

from __future__ import annotations

import argparse
from typing import Any

from openimds.cli import add_command
from openimds.node.roles import ROLE_CHOICES


def _up(args: argparse.Namespace, settings: Any) -> int:
    from openimds.node.up import cmd_up

    return cmd_up(args, settings)


def _down(args: argparse.Namespace, settings: Any) -> int:
    from openimds.node.down import cmd_down

    return cmd_down(args, settings)


def _trace(args: argparse.Namespace, settings: Any) -> int:
    from openimds.node.trace import cmd_trace

    return cmd_trace(args, settings)


def _doctor(args: argparse.Namespace, settings: Any) -> int:
    from openimds.node.doctor import cmd_doctor

    return cmd_doctor(args, settings)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = add_command(
        sub, "up", _up,
        "run the registry, metadata API, agent, proxy, L3 and DHCP agents as supervised "
        "children (Ctrl-C stops them; state is kept)", formatted=False,
    )
    up.add_argument("--demo", action="store_true",
                    help="also build a demo: two tenants, an isolated network, three VMs")
    up.add_argument("--init", action="store_true",
                    help="only create $state_path/secrets.ini (0600) if needed, then exit")
    up.add_argument("--role", action="append", choices=ROLE_CHOICES,
                    help="what this node runs (repeatable): controller = registry + API, "
                         "network = agent, proxy, L3 and DHCP agents, compute = L2 agent; "
                         "default all = controller + network (see docs/operations.md)")
    up.add_argument("--set", action="append", metavar="[SECTION.]KEY=VALUE",
                    help="setting passed to every child as OPENIMDS_* (repeatable)")
    down = add_command(
        sub, "down", _down,
        "stop the node `openimds up` runs (from any terminal); --purge also removes every "
        "namespace, link, listener spec, dnsmasq and state file it made",
    )
    down.add_argument("--purge", action="store_true",
                      help="also remove what the node made: routers, DHCP namespaces and "
                           "dnsmasq, lab VM namespaces, bridges, listener specs, state_path")
    down.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                      help="how long `up` may take to stop before it is killed (default 120)")
    trace = add_command(
        sub, "trace", _trace,
        "check each hop of a server's metadata path, from its VM namespace to the API",
    )
    trace.add_argument("server", metavar="SERVER", help="server name or id")
    add_command(sub, "doctor", _doctor,
                "host-wide checks: binaries, kernel, services, socket, secret, stale state")
