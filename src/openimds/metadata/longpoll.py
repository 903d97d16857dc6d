"""How held requests (GCE's `?wait_for_change=true`) cross the proxy and the agent.

A held request can wait up to `[api] max_wait_timeout` (3600 s), far past Neutron's
`[metadata_haproxy] timeout_server` (32 s) and the agent's `upstream_timeout` (60 s), and it
occupies one upstream connection for all that time. Sent over the ordinary pools it would
time out at 32 s, and 64 of them would take every pooled connection from every other VM.
So each hop sends a request whose query asks for `wait_for_change` over its own pool:

- sized `[api] max_waits` (the node-wide bound the API also enforces, 503 beyond), so held
  requests queue behind each other, never in front of ordinary ones;
- with the longer deadline, `max_wait_timeout + LONG_POLL_MARGIN_S`: the API answers first
  (at the latest when timeout_sec, capped, runs out), the hops' deadline only catches a lost
  answer;
- not counted against the agent's `max_concurrency` (`HeldUpstream.held` is subtracted), so
  a thousand idle long-polls do not make the agent answer 503 to everyone else.

A held request costs a parked callback and two idle sockets per hop: no CPU while it waits
(bench/longpoll_bench.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from openimds.config import Settings
from openimds.http.client import UpstreamResponse

__all__ = ["LONG_POLL_MARGIN_S", "HeldUpstream", "is_long_poll", "long_poll_timeout"]

LONG_POLL_MARGIN_S = 30.0


def is_long_poll(query: str) -> bool:
    """Whether a request's query asks to be held (cheap: most queries are empty)."""
    return bool(query) and "wait_for_change" in query


def long_poll_timeout(settings: Settings) -> float:
    """The hops' deadline for a held request."""
    return float(settings.api.max_wait_timeout) + LONG_POLL_MARGIN_S


class HeldUpstream:
    """An upstream pool for held requests that counts how many it holds right now."""

    __slots__ = ("held", "pool")

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.held = 0

    async def request(
        self, method: str, target: str, headers: Any = (), body: bytes = b"",
    ) -> UpstreamResponse:
        self.held += 1
        try:
            resp: UpstreamResponse = await self.pool.request(method, target, headers, body)
        finally:
            self.held -= 1
        return resp

    def send(
        self, method: str, target: str, headers: Any, body: bytes,
        on_result: Callable[[UpstreamResponse | BaseException], None],
    ) -> None:
        self.held += 1

        def done(result: UpstreamResponse | BaseException) -> None:
            self.held -= 1
            on_result(result)

        try:
            self.pool.send(method, target, headers, body, done)
        except BaseException:
            self.held -= 1
            raise

    async def close(self) -> None:
        await self.pool.close()
