"""Process limits the hot hops raise at start."""

from __future__ import annotations

import contextlib
import resource

__all__ = ["raise_nofile_limit"]


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit and return it: every listener,
    client and upstream connection is one fd, and a held `wait_for_change` request keeps
    two at the agent and one at the API for as long as it waits (`[api] max_waits`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
