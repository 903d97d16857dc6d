"""`openimds proxy`: the one-process namespace metadata proxy (see metadata/proxy.py)."""

from __future__ import annotations

import argparse
import signal
from typing import Any

from openimds.cli import add_command


def _proxy(args: argparse.Namespace, settings: Any) -> int:
    # An agent's SIGHUP ("rescan") must not kill a proxy that is still starting; the event
    # loop installs the real handler before the pid file (the readiness mark) is written.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Imported here so other commands do not pay for uvloop and the HTTP layer.
    from openimds.log import setup_logging
    from openimds.metadata.proxy import main

    setup_logging(debug=settings.debug, log_file=settings.log_file, component="proxy",
                  fmt=settings.log_format)
    return main(settings)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    add_command(
        sub, "proxy", _proxy,
        "serve metadata in every router/network namespace listed in [proxy] listeners_dir "
        "(one process; SIGHUP rescans)",
    )
