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

# Composed from a literal list: each module has register(subparsers).
COMMAND_MODULES = (
    "openimds.registry.cli",
    "openimds.metadata.api_cli",
    "openimds.metadata.identity_cli",
    "openimds.metadata.agent_cli",
    "openimds.metadata.proxy_cli",
    "openimds.agents.l3_cli",
    "openimds.agents.dhcp_cli",
    "openimds.agents.l2_cli",
    "openimds.lab.cli",
    "openimds.lab.cluster_cli",
    "openimds.node.cli",
    "openimds.metrics.status_cli",
    "openimds.node.host_cli",
)


# The services `openimds up` (re)starts, and the one module each is in: running one of them
# imports only that module, not every command's (~70 ms of a ~430 ms start, measured with
# bench/restart_bench.py), so a killed service accepts again sooner.
SERVICE_COMMANDS = {
    "registry": "openimds.registry.cli",
    "api": "openimds.metadata.api_cli",
    "agent": "openimds.metadata.agent_cli",
    "proxy": "openimds.metadata.proxy_cli",
    "l3-agent": "openimds.agents.l3_cli",
    "dhcp-agent": "openimds.agents.dhcp_cli",
    "l2-agent": "openimds.agents.l2_cli",
}


def _command_of(argv: Sequence[str]) -> str | None:
    """The top-level command in argv (after the global options), if any."""
    args = iter(argv)
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


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

    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    command = _command_of(sys.argv[1:] if argv is None else argv)
    only = SERVICE_COMMANDS.get(command or "")
    parser = build_parser((only,) if only else COMMAND_MODULES)
    args = parser.parse_args(argv)
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
