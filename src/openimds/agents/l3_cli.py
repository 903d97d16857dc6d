"""`openimds l3-agent`: router namespaces, legs, metadata rules and proxy listener specs."""

from __future__ import annotations

import argparse
from typing import Any

from openimds.cli import add_command
from openimds.log import setup_logging


def _l3_agent(args: argparse.Namespace, settings: Any) -> int:
    from openimds.agents.l3 import run_agent

    setup_logging(debug=settings.debug, log_file=settings.log_file, component="l3-agent",
                  fmt=settings.log_format)
    return run_agent(settings, args.config)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_command(
        sub, "l3-agent", _l3_agent,
        "run the L3 agent: qrouter- namespaces, metadata rules, proxy listener specs",
    )
