"""The one `openimds` command. Each component module contributes its subcommands.

A handler is ``func(args, settings) -> int``. Settings are built once here and passed down.
`OpenImdsError` prints one line (`openimds: error: ...`) and exits 1 (2 for config errors);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from openimds import __version__
from openimds.config import load_settings, render_settings, settings_as_dict
from openimds.errors import ConfigError, OpenImdsError
from openimds.output import FORMATS, emit_one

Handler = Callable[[argparse.Namespace, Any], int]

# Every top-level command: the module whose register(subparsers) adds it, and its one line of
# help. An invocation imports only its own command's module (`openimds network list` had
# imported all thirteen, the metadata API's and agent's included: ~0.1 s of every call); the
# others stay stubs carrying this help, which is all `openimds --help` shows of them. A
# module's commands are listed together, in the order its register adds them;
# tests/unit/test_cli_lazy.py checks the table against the modules.
COMMANDS: dict[str, tuple[str, str]] = {
    "registry": ("openimds.registry.cli", "the registry (control plane)"),
    "project": ("openimds.registry.cli", "projects (tenants)"),
    "network": ("openimds.registry.cli", "networks"),
    "subnet": ("openimds.registry.cli", "subnets"),
    "router": ("openimds.registry.cli", "routers"),
    "keypair": ("openimds.registry.cli", "SSH key pairs"),
    "server": ("openimds.registry.cli", "instances"),
    "port": ("openimds.registry.cli", "ports"),
    "api": ("openimds.metadata.api_cli", "serve the metadata API (Nova's side): EC2 and "
            "OpenStack documents from the registry"),
    "identity": ("openimds.metadata.identity_cli", "print the certificate (cert) or JWKS "
                 "(jwks) that verify instance identities"),
    "agent": ("openimds.metadata.agent_cli", "run the metadata agent: identify the VM, sign, "
              "forward to the metadata API"),
    "proxy": ("openimds.metadata.proxy_cli", "serve metadata in every router/network "
              "namespace listed in [proxy] listeners_dir (one process; SIGHUP rescans)"),
    "l3-agent": ("openimds.agents.l3_cli", "run the L3 agent: qrouter- namespaces, metadata "
                 "rules, proxy listener specs"),
    "dhcp-agent": ("openimds.agents.dhcp_cli", "serve DHCP (dnsmasq in qdhcp-<network> "
                   "namespaces) and isolated-network metadata, following the registry"),
    "l2-agent": ("openimds.agents.l2_cli", "run the L2 agent of a compute node: one bridge "
                 "per network, heartbeats"),
    "vm": ("openimds.lab.cli", "lab VMs: a namespace plugged into a server's network"),
    "lab": ("openimds.lab.cluster_cli", "a lab cloud on this machine: nodes as namespaces"),
    "up": ("openimds.node.cli", "run the registry, metadata API, agent, proxy, L3 and DHCP "
           "agents as supervised children (Ctrl-C stops them; state is kept)"),
    "down": ("openimds.node.cli", "stop the node `openimds up` runs (from any terminal); "
             "--purge also removes every namespace, link, listener spec, dnsmasq and state "
             "file it made"),
    "trace": ("openimds.node.cli", "check each hop of a server's metadata path, from its VM "
              "namespace to the API"),
    "doctor": ("openimds.node.cli", "host-wide checks: binaries, kernel, services, socket, "
               "secret, stale state"),
    "status": ("openimds.metrics.status_cli", "every service's state, request rate, error "
               "ratio, p99 and connections ended by a timeout per hop, cache hit ratio and "
               "change-feed lag, read from their /metrics ([metrics] ports)"),
    "host": ("openimds.node.host_cli", "nodes and what they serve"),
}

COMMAND_MODULES = tuple(dict.fromkeys(module for module, _ in COMMANDS.values()))


def format_parent() -> argparse.ArgumentParser:
    """Parent parser giving a command `-f/--format table|json|value`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("-f", "--format", choices=FORMATS, default="table",
                        help="output format (default: table)")
    return parent


def add_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, func: Handler,
    help: str, *, formatted: bool = True,
) -> argparse.ArgumentParser:
    """Add one leaf command whose handler is func(args, settings)."""
    parents = [format_parent()] if formatted else []
    parser = sub.add_parser(name, help=help, description=help, parents=parents)
    parser.set_defaults(func=func)
    return parser


def _config_show(args: argparse.Namespace, settings: Any) -> int:
    if args.format == "json":
        emit_one(settings_as_dict(settings), "json")
    else:
        sys.stdout.write(render_settings(settings))
    return 0


def build_parser(modules: Sequence[str] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The `openimds` parser with the commands of `modules` in full; every other command is
    a stub with its help and no arguments (enough to list it and to tell it was chosen)."""
    parser = argparse.ArgumentParser(
        prog="openimds", description="Instance-metadata service for multi-tenant Linux clouds."
    )
    parser.add_argument("--config", default=None,
                        help="INI file (default: $OPENIMDS_CONFIG or /etc/openimds/openimds.ini)")
    parser.add_argument("--version", action="version", version=f"openimds {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    config = sub.add_parser("config", help="show the effective settings")
    config_sub = config.add_subparsers(dest="action", metavar="ACTION", required=True)
    add_command(config_sub, "show", _config_show, "print the effective settings, secrets masked")

    registered: set[str] = set()
    for name, (module, help) in COMMANDS.items():
        if module not in modules:
            # No -h of its own: `openimds NAME --help` is answered by the full parser.
            sub.add_parser(name, help=help, add_help=False)
        elif module not in registered:
            registered.add(module)
            importlib.import_module(module).register(sub)
    return parser


def _parser_for(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser with the chosen command in full. The command is the one argparse itself
    picks (a stub parser, so abbreviated options like `--conf X` count as they will); a
    missing or unknown command, `--help` and `--version` are answered by that stub parser,
    whose top level is the full parser's."""
    chosen, _ = build_parser(()).parse_known_args(argv)
    entry = COMMANDS.get(chosen.command)
    return build_parser((entry[0],) if entry else ())


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser_for(argv).parse_args(argv)
    try:
        settings = load_settings(args.config)
        return int(args.func(args, settings))
    except ConfigError as exc:
        print(f"openimds: config error: {exc.reason}", file=sys.stderr)
        return 2
    except OpenImdsError as exc:
        print(f"openimds: error: {exc.reason}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
