"""`openimds dhcp-agent`: one qdhcp- namespace and dnsmasq per network (see agents/dhcp.py)."""

from __future__ import annotations

import argparse
from typing import Any

from openimds.cli import add_command


def _dhcp_agent(args: argparse.Namespace, settings: Any) -> int:
    # Imported here so other commands do not pay for pyroute2 and httpx.
    from openimds.agents.dhcp import main
    from openimds.log import setup_logging

    setup_logging(debug=settings.debug, log_file=settings.log_file, component="dhcp-agent",
                  fmt=settings.log_format)
    return main(settings, cleanup_on_exit=args.cleanup_on_exit, config_path=args.config)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = add_command(
        sub, "dhcp-agent", _dhcp_agent,
        "serve DHCP (dnsmasq in qdhcp-<network> namespaces) and isolated-network metadata, "
        "following the registry",
        formatted=False,
    )
    parser.add_argument(
        "--cleanup-on-exit", action="store_true",
        help="on SIGTERM also remove the namespaces, listener specs and files it made "
             "(default: stop dnsmasq only; a restart converges)",
    )
