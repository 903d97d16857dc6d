"""Named log streams. Only cli.py configures handlers; modules use getLogger(__name__)."""

from __future__ import annotations

import logging
import sys

access = logging.getLogger("openimds.access")
audit = logging.getLogger("openimds.audit")


def setup_logging(*, debug: bool, log_file: str = "", component: str = "openimds") -> None:
    """Configure the root logger once: one line per event, key=value style messages."""
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {component} %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Library chatter stays out of our logs unless debugging.
    for noisy in ("httpx", "httpcore", "aiohttp.access", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
