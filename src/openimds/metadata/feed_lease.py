"""The agent's feed lease: how long what the change feed delivered may be trusted.

The registry acknowledges a port that reuses an address only `lease_s` after its commit
when the address was released moments before (registry/reuse.py); every `/v1/changes`
answer announces `lease_s` and `head` (the registry's revision when it read). A feed call
received after a commit answers with it, so the agent trusts its cache and warm index only
until `lease_s` after it *sent* the newest call whose answer is applied:

- an answer with no changes renews at once (nothing was newer when it was read);
- an answer with changes renews once `applied(revision)` says the agent applied it;
- a resync (`/v1/health`, which announces `lease_s` too) renews once applied: the cache is
  dropped and the index reloaded from a topology read after it;
- a page that ends below `head`, or an answer without `lease_s` (a registry that does not
  hold reused IPs), renews nothing.

While no registry answers, callers the agent knows are served (agent_cache), but only until
`hold_s` after the same send (`may_know`): a reused address is acknowledged no sooner.

An agent too busy to poll in time (or one that just started) stops trusting; the first
request that meets the lapse sends one extra feed call with no wait (`probed`), shared by
every request meanwhile, and nothing newer than what was applied renews the lease: one
registry call per lapse instead of a lookup per request. Slower, never stale. The
long-poll wait is capped (`poll_wait`) so that an idle agent renews well before its lease
ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["FeedLease"]

DEFAULT_LEASE_S = 2.0  # until the registry has announced its own
POLL_SHARE = 0.3  # long-poll at most this share of the lease: two round trips fit in it


class FeedLease:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.lease_s = DEFAULT_LEASE_S
        # the registry's reuse hold: known callers may be served this long after the send
        # while no registry answers (no grace beyond the lease until it says)
        self.hold_s = DEFAULT_LEASE_S
        self.until = float("-inf")
        self.known_until = float("-inf")
        self.renewals = 0
        self.lapses = 0  # counted by the agent when its trust ends for want of a renewal
        self._pending: tuple[int, float] | None = None

    def valid(self) -> bool:
        return self.clock() < self.until

    def may_know(self) -> bool:
        """Whether callers known from before may still be served while the registry does not
        answer: a VM that reused an address is acknowledged only `hold_s` after the release
        (registry/reuse.py), so until then the address still belongs to what we knew."""
        return self.clock() < self.known_until

    def _take(self, result: Mapping[str, Any]) -> bool:
        """Adopt the announced lease_s and hold_s; False if there is no lease."""
        lease_s, hold_s = result.get("lease_s"), result.get("hold_s")
        if not isinstance(lease_s, int | float) or lease_s <= 0:
            return False
        self.lease_s = float(lease_s)
        self.hold_s = (float(hold_s) if isinstance(hold_s, int | float) and hold_s >= lease_s
                       else self.lease_s)
        return True

    def poll_wait(self, wait: float) -> float:
        return min(wait, self.lease_s * POLL_SHARE)

    def answered(self, result: Mapping[str, Any], sent: float) -> None:
        """A `/v1/changes` answer to the call sent at `sent` (this clock)."""
        self._pending = None
        head = result.get("head")
        if head is None or not self._take(result):
            return
        revision = int(result.get("revision") or 0)
        if int(head) != revision:
            return  # a page: the rest follows at once, and renews
        if result.get("changes"):
            self._pending = (revision, sent)
        else:
            self._renew(sent)

    def resync_answered(self, result: Mapping[str, Any], sent: float) -> None:
        """A `/v1/health` answer the follower resyncs from: once that resync is applied (the
        cache dropped, the index loaded from a topology read after it), the agent knows
        everything committed before `sent`."""
        self._pending = None
        if self._take(result):
            self._pending = (int(result.get("revision") or 0), sent)

    def probed(self, result: Mapping[str, Any], since: int, sent: float) -> bool:
        """An extra `/v1/changes?since=since&wait=0` sent at `sent`, where the agent has
        applied everything up to `since`: nothing newer at `head` renews as an empty
        long-poll answer would. True if it renewed."""
        head = result.get("head")
        if head is None or int(head) != since or result.get("changes"):
            return False
        if not self._take(result):
            return False
        self._renew(sent)
        return True

    def applied(self, revision: int) -> None:
        """The batch up to `revision` is applied."""
        pending = self._pending
        if pending is not None and pending[0] == revision:
            self._pending = None
            self._renew(pending[1])

    def _renew(self, sent: float) -> None:
        self.until = max(self.until, sent + self.lease_s)
        self.known_until = max(self.known_until, sent + self.hold_s)
        self.renewals += 1
