"""The proxy's copy of an agent's rate-limit 429, for answering that source itself.

The agent counts per instance (`core.ratelimit`) and says in its 429 when the instance may
come back (`Retry-After`, `RateLimit`). Until then, every further request of that source
would cost a proxy -> agent hop just to hear 429 again. The proxy keeps the answer and
renders the same kind of 429 with the times counted down. Pure: no I/O, no clock; the
caller passes the seconds elapsed since the agent's answer.

Only the rate limiter's 429 is taken (it is the one with `Retry-After`, `RateLimit-Policy`
and `RateLimit`); any other 429 (the API's held-request bound, say) is relayed as it is.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["Limited429", "parse_limited_429"]

_ITEM = re.compile(r'^"([A-Za-z0-9_.-]{1,32})";r=(\d{1,9});t=(\d{1,9})$')
_RETRY_TAIL = re.compile(r";? ?retry in \d+ s$")
_PREFIX = "429 Too Many Requests: "
_MAX_RETRY_S = 86400  # a garbled Retry-After is not remembered for longer than a day


@dataclass(frozen=True, slots=True)
class Limited429:
    """What the agent said: Retry-After, the policy verbatim, each window's r and t, and
    the body's reason without its "retry in N s" tail."""

    retry_after: int
    policy: str
    windows: tuple[tuple[str, int, int], ...]
    reason: str

    def retry_in(self, elapsed: float) -> int:
        """Retry-After `elapsed` seconds later: the rest, rounded up, at least 1."""
        return max(1, math.ceil(self.retry_after - elapsed))

    def headers(self, elapsed: float) -> list[tuple[str, str]]:
        """Retry-After, RateLimit-Policy and RateLimit as the agent's, counted down."""
        state = ", ".join(f'"{name}";r={r};t={max(0, math.ceil(t - elapsed))}'
                          for name, r, t in self.windows)
        return [("Retry-After", str(self.retry_in(elapsed))),
                ("RateLimit-Policy", self.policy), ("RateLimit", state)]

    def body_reason(self, elapsed: float) -> str:
        return f"{self.reason}; retry in {self.retry_in(elapsed)} s"


def parse_limited_429(raw: bytes) -> Limited429 | None:
    """The agent's complete 429 answer (head and body bytes) as a Limited429; None when it
    is not a rate-limit answer or any part is malformed (then nothing is remembered)."""
    end = raw.find(b"\r\n\r\n")
    if end < 0 or not raw.startswith(b"HTTP/1.1 429 "):
        return None
    fields: dict[str, str] = {}
    for line in raw[:end].split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            fields[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    retry, policy, state = (fields.get("retry-after"), fields.get("ratelimit-policy"),
                            fields.get("ratelimit"))
    if retry is None or policy is None or state is None or not retry.isdigit():
        return None
    if not policy.isprintable() or len(policy) > 256:
        return None
    windows: list[tuple[str, int, int]] = []
    for item in state.split(","):
        m = _ITEM.match(item.strip())
        if m is None:
            return None
        windows.append((m.group(1), int(m.group(2)), int(m.group(3))))
    body = raw[end + 4:].decode("utf-8", "replace").strip()
    reason = body.removeprefix(_PREFIX)
    reason = _RETRY_TAIL.sub("", reason) if reason and reason.isprintable() else ""
    return Limited429(min(int(retry), _MAX_RETRY_S), policy, tuple(windows),
                      reason[:200] or "rate limit exceeded for this instance")
