"""The one way openimds runs external commands: argv lists, never a shell.

Failures are translated once, here, into `CommandFailed(argv, returncode, stderr)`.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Sequence

from openimds.errors import CommandFailed

log = logging.getLogger(__name__)


def run(
    argv: Sequence[str], *, check: bool = True, input: str | None = None,
    timeout_s: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """Run argv, capture output as text; raise CommandFailed on a non-zero exit if check."""
    log.debug("run.start argv=%s", " ".join(argv))
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, input=input, timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandFailed(argv, 127, f"{argv[0]}: not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(argv, -1, f"timed out after {timeout_s}s") from exc
    if check and proc.returncode != 0:
        raise CommandFailed(argv, proc.returncode, proc.stderr)
    return proc


async def run_async(
    argv: Sequence[str], *, check: bool = True, input: str | None = None,
    timeout_s: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """run() without blocking the event loop."""
    return await asyncio.to_thread(run, argv, check=check, input=input, timeout_s=timeout_s)
