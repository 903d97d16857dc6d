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



class _Entry:
    """One key's counters: per window [period start, current count, previous count]."""

    __slots__ = ("counts", "denied", "last", "limited")

    def __init__(self, n: int, now: float) -> None:
        self.counts = [[now, 0, 0] for _ in range(n)]
        self.last = now
        self.limited = False
        self.denied = 0


def _advance(c: list[float], seconds: float, now: float) -> None:
    """Roll a window's periods forward to the one containing `now`."""
    elapsed = now - c[0]
    if elapsed < seconds:
        return
    periods = int(elapsed // seconds)
    c[2] = c[1] if periods == 1 else 0
    c[1] = 0
    c[0] += periods * seconds


def _rate(c: list[float], seconds: float, now: float) -> float:
    frac = (now - c[0]) / seconds
    return c[1] + c[2] * (1.0 - frac)


def _wait(c: list[float], seconds: float, limit: int, now: float) -> float:
    """Seconds until one more request would keep this window at or under its limit."""
    room = limit - 1  # the next request adds one: rate <= limit - 1 before it
    curr, prev = c[1], c[2]
    frac = (now - c[0]) / seconds
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
        self._entries: dict[str, _Entry] = {}
        self._expire_s = 2.0 * max(w.seconds for w in self.windows)
        self.policy = ", ".join(f'"{w.name}";q={w.limit};w={_secs(w.seconds)}'
                                for w in self.windows)
        self.denied_total = 0

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, key: str, now: float) -> Verdict:
        """Count one request of `key` at `now` and say whether it may pass."""
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.max_keys:
                self._make_room(now)
            entry = _Entry(len(self.windows), now)
            self._entries[key] = entry
        entry.last = now
        denied_by: Window | None = None
        for w, c in zip(self.windows, entry.counts, strict=True):
            _advance(c, w.seconds, now)
            c[1] += 1
            if denied_by is None and _rate(c, w.seconds, now) > w.limit:
                denied_by = w
        if denied_by is None:
            if entry.limited:
                entry.limited = False
            return Verdict(True, 0, None, False, (), (), self.policy)
        started = not entry.limited
        entry.limited = True
        entry.denied += 1
        self.denied_total += 1
        remaining: list[int] = []
        resets: list[int] = []
        wait = 0.0
        for w, c in zip(self.windows, entry.counts, strict=True):
            rate = _rate(c, w.seconds, now)
            remaining.append(max(0, math.floor(w.limit - rate)))
            secs = _wait(c, w.seconds, w.limit, now)
            resets.append(math.ceil(secs))
            wait = max(wait, secs)
        return Verdict(False, max(1, math.ceil(wait)), denied_by, started, tuple(remaining),
                       tuple(resets), self.policy)

    def headers(self, verdict: Verdict) -> list[tuple[str, str]]:
        """Retry-After, RateLimit-Policy and RateLimit for a denied request."""
        state = ", ".join(
            f'"{w.name}";r={r};t={t}'
            for w, r, t in zip(self.windows, verdict.remaining, verdict.resets, strict=True))
        return [("Retry-After", str(verdict.retry_after)), ("RateLimit-Policy", self.policy),
                ("RateLimit", state)]

    def denied(self, key: str) -> int:
        """Requests of `key` denied since it was first seen (0 for an unknown key)."""
        entry = self._entries.get(key)
        return entry.denied if entry is not None else 0

    def _make_room(self, now: float) -> None:
        horizon = now - self._expire_s
        stale = [k for k, e in self._entries.items() if e.last < horizon]
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
