"""Per-instance request budgets: Neutron's `[metadata_rate_limiting]`, counted per instance.

Pure logic: the caller passes the key (an instance ID) and the clock reading (`now`, seconds on
any monotonic clock). No I/O, no clock of its own.

Semantics follow haproxy's `http_req_rate(<window>)` as Neutron renders it (neutron.md §2.2):
- each window estimates the request rate over the last `seconds` as a sliding window:
  the count of the current period plus the previous period's count weighted by how much of
  it still overlaps (haproxy's freq_ctr);
- every request is counted, denied ones too (a client that keeps hammering stays blocked);
- a request is denied when, counted, it takes any window's rate above its limit (N requests
  per window pass, the N+1st gets 429).
Unlike haproxy, the key is the instance (so its IPv4 and IPv6 addresses share one budget)
and the answer says when to come back: `Retry-After` is the time until, with no further
requests, the next one would pass; `RateLimit-Policy` / `RateLimit` follow
draft-ietf-httpapi-ratelimit-headers (structured-field lists, `"name";q=;w=` and
`"name";r=;t=`).

    lim = RateLimiter([Window("burst", 10.0, 10), Window("base", 60.0, 100)])
    v = lim.hit("instance-uuid", now=time.monotonic())
    if not v.allowed: answer 429 with v.headers()
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_KEYS", "RateLimiter", "Verdict", "Window", "parse_ip_versions"]

DEFAULT_MAX_KEYS = 65536


@dataclass(frozen=True, slots=True)
class Window:
    """One budget: at most `limit` requests per `seconds`, named for the RateLimit headers."""

    name: str
    seconds: float
    limit: int

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.limit < 1:
            raise ValueError(f"window {self.name}: needs seconds > 0 and limit >= 1")


@dataclass(frozen=True, slots=True)
class Verdict:
    """The answer for one request.

    `allowed`: pass it on. `retry_after`: whole seconds until the next request would pass
    (0 when allowed). `window`: the first window that denied it (None when allowed).
    `started`: this denial begins an episode (the key was allowed before): log it once.
    `remaining`/`resets`: per window, for the RateLimit header.
    """

    allowed: bool
    retry_after: int
    window: Window | None
    started: bool
    remaining: tuple[int, ...]
    resets: tuple[int, ...]
    policy: str



# One key's state is a flat list of floats (so that it can live in shared memory too, see
# metadata/shared_limit.py): per window i, [3i] period start, [3i+1] count of the current
# period, [3i+2] count of the previous one; then last-seen time, limited flag, denials.


def _advance(c: list[float], i: int, seconds: float, now: float) -> None:
    """Roll window i's periods forward to the one containing `now`."""
    elapsed = now - c[i]
    if elapsed < seconds:
        return
    periods = int(elapsed // seconds)
    c[i + 2] = c[i + 1] if periods == 1 else 0
    c[i + 1] = 0
    c[i] += periods * seconds


def _rate(c: list[float], i: int, seconds: float, now: float) -> float:
    frac = (now - c[i]) / seconds
    return c[i + 1] + c[i + 2] * (1.0 - frac)


def _wait(c: list[float], i: int, seconds: float, limit: int, now: float) -> float:
    """Seconds until one more request would keep window i at or under its limit."""
    room = limit - 1  # the next request adds one: rate <= limit - 1 before it
    curr, prev = c[i + 1], c[i + 2]
    frac = (now - c[i]) / seconds
    if curr + prev * (1.0 - frac) <= room:
        return 0.0
    if curr <= room and prev > 0:
        # Within this period: prev * (1 - f) <= room - curr.
        f = 1.0 - (room - curr) / prev
        return max(0.0, (f - frac) * seconds)
    # Next period: prev' = curr, curr' = 0: curr * (1 - f') <= room.
    until_next = (1.0 - frac) * seconds
    f2 = 1.0 - room / curr if curr > 0 else 0.0
    return until_next + max(0.0, f2) * seconds


class RateLimiter:
    """Sliding-window budgets per key; at most `max_keys` keys are tracked (idle ones first
    to go, then the oldest), like haproxy's stick-table `size`."""

    def __init__(self, windows: Sequence[Window], *, max_keys: int = DEFAULT_MAX_KEYS) -> None:
        if not windows:
            raise ValueError("a rate limiter needs at least one window")
        self.windows = tuple(windows)
        self.max_keys = max(1, max_keys)
        self.width = 3 * len(self.windows) + 3  # floats of one key's state
        self._entries: dict[str, list[float]] = {}
        self._expire_s = 2.0 * max(w.seconds for w in self.windows)
        self.policy = ", ".join(f'"{w.name}";q={w.limit};w={_secs(w.seconds)}'
                                for w in self.windows)
        self.denied_total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, key: str, now: float) -> Verdict:
        """Count one request of `key` at `now` and say whether it may pass."""
        state = self._load(key, now)
        verdict = self._count(state, now)
        self._store(key, state)
        return verdict

    def fresh(self, now: float) -> list[float]:
        """The state of a key never seen before."""
        state = [now, 0.0, 0.0] * len(self.windows)
        return [*state, now, 0.0, 0.0]

    def _count(self, c: list[float], now: float) -> Verdict:
        n = 3 * len(self.windows)
        c[n] = now
        denied_by: Window | None = None
        for k, w in enumerate(self.windows):
            i = 3 * k
            _advance(c, i, w.seconds, now)
            c[i + 1] += 1
            if denied_by is None and _rate(c, i, w.seconds, now) > w.limit:
                denied_by = w
        if denied_by is None:
            c[n + 1] = 0.0
            return Verdict(True, 0, None, False, (), (), self.policy)
        started = not c[n + 1]
        c[n + 1] = 1.0
        c[n + 2] += 1
        self.denied_total += 1
        remaining: list[int] = []
        resets: list[int] = []
        wait = 0.0
        for k, w in enumerate(self.windows):
            i = 3 * k
            remaining.append(max(0, math.floor(w.limit - _rate(c, i, w.seconds, now))))
            secs = _wait(c, i, w.seconds, w.limit, now)
            resets.append(math.ceil(secs))
            wait = max(wait, secs)
        return Verdict(False, max(1, math.ceil(wait)), denied_by, started, tuple(remaining),
                       tuple(resets), self.policy)

    # Storage: a dict here; metadata/shared_limit.py overrides these three for shared memory.
    def _load(self, key: str, now: float) -> list[float]:
        state = self._entries.get(key)
        if state is None:
            if len(self._entries) >= self.max_keys:
                self._make_room(now)
            state = self._entries[key] = self.fresh(now)
        return state

    def _store(self, key: str, state: list[float]) -> None:
        pass  # the dict holds the list itself

    def expired(self, state: list[float], now: float) -> bool:
        """Idle long enough that forgetting it changes nothing."""
        return state[3 * len(self.windows)] < now - self._expire_s

    def headers(self, verdict: Verdict) -> list[tuple[str, str]]:
        """Retry-After, RateLimit-Policy and RateLimit for a denied request."""
        state = ", ".join(
            f'"{w.name}";r={r};t={t}'
            for w, r, t in zip(self.windows, verdict.remaining, verdict.resets, strict=True))
        return [("Retry-After", str(verdict.retry_after)), ("RateLimit-Policy", self.policy),
                ("RateLimit", state)]

    def denied(self, key: str) -> int:
        """Requests of `key` denied since it was first seen (0 for an unknown key)."""
        state = self._entries.get(key)
        return int(state[-1]) if state is not None else 0

    def _make_room(self, now: float) -> None:
        stale = [k for k, e in self._entries.items() if self.expired(e, now)]
        for k in stale:
            del self._entries[k]
        if len(self._entries) >= self.max_keys:
            # Still full: drop the oldest-inserted key (dicts keep insertion order).
            del self._entries[next(iter(self._entries))]


def _secs(seconds: float) -> str:
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


def parse_ip_versions(values: Sequence[str]) -> frozenset[int]:
    """Neutron's `ip_versions` list ("4", "6") as a set of ints; raises ValueError otherwise."""
    out: set[int] = set()
    for raw in values:
        text = str(raw).strip()
        if text not in ("4", "6"):
            raise ValueError(f"ip version {raw!r} is not 4 or 6")
        out.add(int(text))
    if not out:
        raise ValueError("ip_versions is empty")
    return frozenset(out)
