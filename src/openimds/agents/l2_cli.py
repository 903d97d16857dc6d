"""`openimds l2-agent`: a compute node's bridges, one per network (see agents/l2.py)."""

from __future__ import annotations

import argparse
from typing import Any

from openimds.cli import add_command
from openimds.log import setup_logging


def _l2_agent(args: argparse.Namespace, settings: Any) -> int:
    from openimds.agents.l2 import run_agent

    setup_logging(debug=settings.debug, log_file=settings.log_file, component="l2-agent")
    return run_agent(settings)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_command(sub, "l2-agent", _l2_agent,
                "run the L2 agent of a compute node: one bridge per network, heartbeats")
