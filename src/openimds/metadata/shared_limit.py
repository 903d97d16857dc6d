"""One rate-limit table for every agent worker: `core.ratelimit` over shared memory.

With `metadata_workers = N` the workers take turns accepting the proxy's connections, so one
VM's requests land on all of them; a per-worker table would give each instance N budgets.
The agent's parent makes this table before forking (an anonymous shared mapping and a
process-shared lock), so every worker counts into the same slots: the budget stays exact.

Layout: `slots` fixed-size slots, each an 8-byte key hash (0 = free) and the limiter's state
(`RateLimiter.width` doubles). A key lives in one of `PROBES` consecutive slots from its
hash; a full neighbourhood gives up the slot idle longest (like the dict table's eviction).
One lock guards load-count-store: about a microsecond per request, only when limiting is on.
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
import struct
from collections.abc import Sequence

from openimds.core.ratelimit import DEFAULT_MAX_KEYS, RateLimiter, Verdict, Window

__all__ = ["SharedRateLimiter"]

PROBES = 8


class SharedRateLimiter(RateLimiter):
    """A RateLimiter whose table is shared by the processes forked after it was made."""

    def __init__(self, windows: Sequence[Window], *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        super().__init__(windows, max_keys=max_keys)
        self._slots = max(PROBES, max_keys)
        self._struct = struct.Struct(f"<Q{self.width}d")
        self._mem = mmap.mmap(-1, self._slots * self._struct.size)  # MAP_SHARED|ANONYMOUS
        self._lock = multiprocessing.get_context("fork").Lock()
        self._slot = 0  # where the state being counted lives (valid under the lock)
        self._key_hash = 0

    def hit(self, key: str, now: float) -> Verdict:
        with self._lock:
            return super().hit(key, now)

    def __len__(self) -> int:
        size = self._struct.size
        return sum(1 for i in range(self._slots)
                   if struct.unpack_from("<Q", self._mem, i * size)[0])

    def denied(self, key: str) -> int:
        h = _hash(key)
        with self._lock:
            for i in self._neighbourhood(h):
                got = self._struct.unpack_from(self._mem, i * self._struct.size)
                if got[0] == h:
                    return int(got[-1])
        return 0

    def _neighbourhood(self, h: int) -> range | list[int]:
        start = h % self._slots
        if start + PROBES <= self._slots:
            return range(start, start + PROBES)
        return [(start + k) % self._slots for k in range(PROBES)]

    def _load(self, key: str, now: float) -> list[float]:
        h = self._key_hash = _hash(key)
        size = self._struct.size
        victim, victim_last, free = -1, float("inf"), -1
        for i in self._neighbourhood(h):
            got = self._struct.unpack_from(self._mem, i * size)
            if got[0] == h:
                self._slot = i
                return list(got[1:])
            if free < 0:
                if got[0] == 0:
                    free = i
                else:
                    state = list(got[1:])
                    if self.expired(state, now):
                        free = i
                    elif state[3 * len(self.windows)] < victim_last:
                        victim, victim_last = i, state[3 * len(self.windows)]
        self._slot = free if free >= 0 else victim
        return self.fresh(now)

    def _store(self, key: str, state: list[float]) -> None:
        self._struct.pack_into(self._mem, self._slot * self._struct.size, self._key_hash,
                               *state)


def _hash(key: str) -> int:
    # Stable in every process (str hashes are salted per interpreter); never 0 (= free).
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") or 1
