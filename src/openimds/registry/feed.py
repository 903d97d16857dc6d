"""Follow the registry's change feed: an async iterator of `ChangeBatch`.

    follower = ChangeFollower(client)          # since=None: start with a resync
    async for batch in follower:
        if batch.resync: reload everything     # first batch, after a 410, after an outage
        else: apply batch.changes
        # follower.registry_up says whether the registry answered the last call

A batch with ``resync=True`` carries no changes: the consumer reloads its whole state
(``/v1/topology`` or drop caches), and the follower continues from ``batch.revision``.
When the registry cannot be reached the follower retries with backoff (0.2 s doubling to
5 s), sets ``registry_up = False``, and yields a resync batch once it answers again.

``resume=True`` (the agent and the API, whose caches outlive an outage): once the registry
answers again the follower continues from where it was, so the consumer gets exactly the
changes it missed (the change table is durable) instead of dropping everything; the first
batch after an outage is yielded even when empty, so the consumer knows it is caught up. It
resyncs only when the registry cannot continue (410: outside the retained window, or a
registry whose revision went backwards). ``wake()`` cuts a retry sleep short (someone saw the
registry answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from openimds.errors import UpstreamError
from openimds.metrics import FeedStats
from openimds.registry.client import AsyncRegistryClient, ResyncRequired

log = logging.getLogger(__name__)

__all__ = ["ChangeBatch", "ChangeFollower", "follow_changes"]

BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 5.0
DEFAULT_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class ChangeBatch:
    revision: int
    changes: list[dict[str, Any]] = field(default_factory=list)
    resync: bool = False


class ChangeFollower:
    """Async iterator over the change feed; see the module docstring."""

    def __init__(self, client: AsyncRegistryClient, since: int | None = None, *,
                 wait_s: float = DEFAULT_WAIT_S, limit: int | None = None,
                 stats: FeedStats | None = None, resume: bool = False,
                 backoff_max_s: float = BACKOFF_MAX_S) -> None:
        self.client = client
        # Where the consumer stands (revision, live, lag), read by its /metrics.
        self.stats = stats if stats is not None else FeedStats()
        self.since = since
        self.wait_s = wait_s
        self.limit = limit
        self.resume = resume
        self.backoff_max_s = backoff_max_s
        self.registry_up = True
        self._caught_up_pending = False  # yield the first batch after an outage, even empty
        self._wake = asyncio.Event()
        self._gen: AsyncGenerator[ChangeBatch, None] | None = None

    def wake(self) -> None:
        """Retry now if waiting out a backoff (the registry was seen answering)."""
        self._wake.set()

    @property
    def revision(self) -> int | None:
        """The revision the next call continues from."""
        return self.since

    def __aiter__(self) -> ChangeFollower:
        return self

    async def __anext__(self) -> ChangeBatch:
        if self._gen is None:
            self._gen = self._run()
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        if self._gen is not None:
            await self._gen.aclose()

    async def _fetch(self) -> dict[str, Any] | int:
        """The next feed answer, or a revision (int) to resync to. Retries while the
        registry is down; once it answers again, asks only for its revision (a cheap call,
        not a long-poll) so the consumer resyncs at once."""
        delay = BACKOFF_MIN_S
        while True:
            try:
                stats = self.stats
                stats.up = self.registry_up
                if self.since is None or not self.registry_up:
                    revision = int((await self.client.health())["revision"])
                    stats.up = True
                    if not self.registry_up:
                        log.info("feed.registry_up revision=%s", revision)
                        self.registry_up = True
                        if self.resume and self.since is not None and revision >= self.since:
                            self._caught_up_pending = True
                            continue  # the changes missed, not a resync
                    return revision
                stats.polling = True
                try:
                    result: dict[str, Any] = await self.client.changes(
                        self.since, 0 if self._caught_up_pending else self.wait_s,
                        self.limit)
                finally:
                    stats.polling = False
                return result
            except ResyncRequired as exc:
                log.info("feed.resync since=%s revision=%s", self.since, exc.revision)
                self._caught_up_pending = False
                return exc.revision
            except UpstreamError as exc:
                if self.registry_up:
                    log.warning("feed.registry_down since=%s reason=%s", self.since,
                                exc.reason)
                self.registry_up = False
                self.stats.up = False
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                delay = min(delay * 2, self.backoff_max_s)

    async def _run(self) -> AsyncGenerator[ChangeBatch, None]:
        while True:
            result = await self._fetch()
            stats = self.stats
            if isinstance(result, int):
                self.since = result
                yield ChangeBatch(result, [], resync=True)
                stats.resyncs += 1
                self._applied(result)
                continue
            revision = int(result["revision"])
            self.since = revision
            if result["changes"] or self._caught_up_pending:
                self._caught_up_pending = False
                yield ChangeBatch(revision, list(result["changes"]), resync=False)
                stats.batches += 1
            self._applied(revision)

    def _applied(self, revision: int) -> None:
        """The consumer is back for more: everything up to `revision` is applied."""
        self.stats.revision = revision
        self.stats.caught_up_at = time.monotonic()


def follow_changes(client: AsyncRegistryClient, since: int | None = None) -> ChangeFollower:
    """The follower named in docs/architecture.md; same object as ChangeFollower."""
    return ChangeFollower(client, since)
