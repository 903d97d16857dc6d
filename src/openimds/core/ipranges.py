"""A subnet's free pool addresses as availability ranges, pure (the registry keeps them in
``ip_ranges`` / ``ip_released``, registry/ipalloc.py).

The free addresses of a subnet's allocation pools are split in two disjoint parts:

- *ranges*: inclusive spans of free addresses that no port released since the state was
  built (a new subnet's ranges are its pools);
- *released*: single addresses a port gave back, each checked against the IP quarantine
  (released within the reuse hold's window, registry/reuse.py) when it is picked.

A pick is the lowest free address not quarantined, or, when every free one is, the lowest
quarantined one: the lowest range start or the lowest unquarantined released address,
whichever is lower (`choose`), so a pick reads two index entries whatever the subnet's size.
Taking an address splits the span holding it (`carve`); giving one back adds it to released.
Addresses are integers here; a key is the address as fixed-width big-endian bytes, which
sort as the integers do in SQLite (memcmp) and PostgreSQL (bytea) alike.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from typing import Literal

__all__ = ["Span", "Source", "carve", "choose", "free_spans", "in_spans", "int_of",
           "key_of", "spans_of"]

Span = tuple[int, int]  # first, last (inclusive)
Source = Literal["range", "released"]


def key_of(ip: int, version: int) -> bytes:
    """The address as its 4 (IPv4) or 16 (IPv6) big-endian bytes: a key that sorts by value."""
    return ip.to_bytes(4 if version == 4 else 16, "big")


def int_of(key: bytes) -> int:
    return int.from_bytes(key, "big")


def spans_of(pools: Iterable[tuple[int, int]]) -> list[Span]:
    """The pools as sorted spans (pools are disjoint: `ipam.parse_pools` checks it)."""
    return sorted((int(a), int(b)) for a, b in pools)


def in_spans(spans: Sequence[Span], ip: int) -> bool:
    """Whether ip lies in one of the sorted, disjoint spans."""
    i = bisect.bisect_right(spans, (ip, 2**128)) - 1
    return i >= 0 and spans[i][0] <= ip <= spans[i][1]


def free_spans(spans: Sequence[Span], used: Iterable[int]) -> list[Span]:
    """The sorted spans minus the used addresses: at most len(spans) + len(used) spans,
    whatever the pools' size (a /64 with three ports is four spans)."""
    taken = sorted(set(used))
    out: list[Span] = []
    for first, last in spans:
        i = bisect.bisect_left(taken, first)
        cand = first
        while i < len(taken) and taken[i] <= last:
            if taken[i] > cand:
                out.append((cand, taken[i] - 1))
            cand = taken[i] + 1
            i += 1
        if cand <= last:
            out.append((cand, last))
    return out


def carve(span: Span, ip: int) -> list[Span]:
    """The span without ip (which it must hold): none, one or two spans."""
    first, last = span
    if not first <= ip <= last:
        raise ValueError(f"{ip} is not in span {first}-{last}")
    return [s for s in ((first, ip - 1), (ip + 1, last)) if s[0] <= s[1]]


def choose(range_first: int | None, released_free: int | None,
           released_any: int | None) -> tuple[Source, int] | None:
    """The address to pick: the lowest of the lowest range start and the lowest released
    address out of quarantine; else the lowest released one (quarantined: its reuse is held,
    but the pool has nothing else); None when the subnet has no free pool address."""
    if range_first is not None and (released_free is None or range_first < released_free):
        return "range", range_first
    if released_free is not None:
        return "released", released_free
    if released_any is not None:
        return "released", released_any
    return None
