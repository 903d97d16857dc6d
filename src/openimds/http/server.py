"""A small HTTP/1.1 server for the three hot hops: asyncio Protocol + httptools' C parser.

Rules:
- A handler takes a `Request` and returns a `Response`/`RawResponse`, or an awaitable of one.
  A plain value is written at once, with no task per request; an awaitable runs as a task.
- Pipelined requests are answered strictly in order. Safe ones (GET/HEAD, no body, keep-
  alive) start as they are parsed, up to MAX_PIPELINE at once, while earlier ones still
  await: an answer ready early is held until those before it are written. Any other
  request starts only once every earlier one is answered, and later ones wait for it
  (reading pauses once the queue is long). The answers a read produces at once, or that
  become ready together, leave in one write (up to MAX_PIPELINE of them): one syscall for
  a pipelined batch, not one per request.
- Back-pressure: once a connection's unsent answers pass `Limits.write_buffer_bytes` (the
  transport calls `pause_writing`), its queued requests wait and reading stops until they
  drain below a quarter of that (`resume_writing`). A client that pipelines and never reads
  costs us that much plus one read, not every answer; one that does not take a quarter of it
  within `write_timeout_s`, or does not take the rest after we closed, is aborted (RST).
- Connections ended by a timeout are counted in `Limits.timeouts` (a hop's /metrics), on the
  timeout's path only: nothing is counted per request. A quiet connection is `idle` once it
  was answered (keep-alive expiry), `silent` if no first request ever began.
- `Limits.known_heads`: a request head seen before is not parsed again. A complete GET/HEAD
  head (keep-alive, no body, origin-form) that httptools parsed at a message boundary is
  kept by its bytes, less the values of its one `X-Openimds-Request-Id: ` line and of its
  `Limits.identity_lines` (the caller's: `X-Forwarded-For: ` and the router or network ID
  on the agent's socket), each spelled as the hop before writes it: one entry per request
  *shape*, however many callers send it. The same bytes at a boundary later make the same
  `Request` with those values put back, and carry `shape` (the kept key: a memo key for the
  hop), `request_id` and `identity` (the identity lines as parsed headers: every header of
  those names the request has). Anything else, or any doubt (a value outside
  `[A-Za-z0-9._:-]`, a name twice, another spelling, a limit), is parsed. A head is kept the
  second time it comes; while searched reads mostly find nothing kept (a boot storm, more
  heads than are kept), only one read in 16 is searched.
- Limits are enforced here, once, for every hop: header bytes (431), body bytes (413),
  time to receive a whole request (408), idle keep-alive time, malformed input (400).
  Every error answer carries a one-line reason and closes the connection.

The server never logs per request; handlers do (they know who asked).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import stat
import string
import struct
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import httptools

from openimds.http.sockets import SocketTransport

log = logging.getLogger(__name__)

__all__ = [
    "Abandonable",
    "Deferred",
    "Handler",
    "HeadMemo",
    "Limits",
    "RawResponse",
    "Request",
    "Response",
    "TimeoutCounts",
    "bind_tcp",
    "bind_unix",
    "error_response",
    "parse_one",
    "serve",
]

_PHRASES = {s.value: s.phrase for s in HTTPStatus}
# The usual method names as str without a decode per request.
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "PUT", "POST", "DELETE", "OPTIONS", "PATCH")}
MAX_PIPELINE = 32
# Requests that may start while earlier ones on the connection are unanswered.
_SAFE = frozenset(("GET", "HEAD"))


class TimeoutCounts:
    """Connections a server ended because one of its timeouts passed, by which one. Bumped
    only where a timeout fires (never per request); read when /metrics is scraped."""

    __slots__ = ("idle", "request", "silent", "write")

    def __init__(self) -> None:
        self.write = 0  # reset: answers not taken within write_timeout_s
        self.request = 0  # 408: a request begun and not received within request_timeout_s
        self.idle = 0  # closed: answered, then no next request within keepalive_timeout_s
        # closed: not one byte of a first request within request_timeout_s (a scanner, a
        # stuck guest, a slow-loris start): kept apart from the routine keep-alive expiry
        self.silent = 0


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-connection limits; the defaults suit metadata traffic (small requests)."""

    max_header_bytes: int = 16384
    max_headers: int = 100
    max_body_bytes: int = 65536 + 4096
    request_timeout_s: float = 30.0
    keepalive_timeout_s: float = 30.0
    # Unsent answer bytes held per connection before its requests wait (the low-water mark,
    # where they go on, is a quarter of it), and how long it may stay above the low-water
    # mark (or hold unsent bytes once closing) before it is aborted.
    write_buffer_bytes: int = 65536
    write_timeout_s: float = 30.0
    # Where the connections these limits ended are counted (the hop's); None: nowhere.
    timeouts: TimeoutCounts | None = field(default=None, compare=False, repr=False)
    # Requests whose head was seen before are made from what its parse gave (see the module
    # docstring): the hop that opts in (its requests repeat) skips httptools' callbacks.
    known_heads: bool = False
    # With known_heads: header names, spelled as the hop before writes them, whose values
    # are cut out of the kept key and handed over as `Request.identity` (each caller's
    # requests differ there, so a key per caller would keep every head of every caller).
    identity_lines: tuple[bytes, ...] = ()


class Request:
    """One parsed request. Header names are lower-cased bytes; values are raw bytes."""

    __slots__ = ("body", "headers", "identity", "keep_alive", "memo", "method", "path",
                 "peer", "query", "request_id", "shape", "target", "version")

    def __init__(
        self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes,
        version: str, keep_alive: bool, peer: tuple[str, int] | None,
    ) -> None:
        self.method = method
        self.target = target
        path, _, query = target.partition("?")
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.version = version
        self.keep_alive = keep_alive
        self.peer = peer
        # Set only for a known head (`Limits.known_heads`): its key, the same object for
        # every request with these bytes less the cut values; the ID's value (None: none);
        # and the headers named by `Limits.identity_lines`, (lower-cased name, value) in
        # order: all the request has of those names (a head with any other is parsed).
        self.shape: bytes | None = None
        self.request_id: bytes | None = None
        self.identity: tuple[tuple[bytes, bytes], ...] | None = None
        # Set only for a head found by its exact bytes less the ID's value (or made an exact
        # entry now): the handler's slot on that entry (`HeadMemo`).
        self.memo: HeadMemo | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (name in lower case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_all(self, name: bytes) -> list[bytes]:
        """Every value of a header, in order."""
        return [value for key, value in self.headers if key == name]


class Response:
    """A response to render: status, body, content type and extra headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self, status: int = 200, body: bytes = b"", *,
        content_type: str = "text/plain; charset=UTF-8",
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers

    def encode(self, *, keep_alive: bool, head: bool = False) -> bytes:
        parts = [
            f"HTTP/1.1 {self.status} {_PHRASES.get(self.status, 'Unknown')}\r\n"
            f"Content-Type: {self.content_type}\r\n"
            f"Content-Length: {len(self.body)}\r\n"
        ]
        for name, value in self.headers:
            parts.append(f"{name}: {value}\r\n")
        if not keep_alive:
            parts.append("Connection: close\r\n")
        parts.append("\r\n")
        head_bytes = "".join(parts).encode("latin-1")
        if head or self.status in (204, 304) or self.status < 200:
            return head_bytes
        return head_bytes + self.body


class RawResponse:
    """Bytes sent verbatim: a complete answer relayed from an upstream hop."""

    __slots__ = ("close", "data")

    def __init__(self, data: bytes, *, close: bool = False) -> None:
        self.data = data
        self.close = close


AnyResponse = Response | RawResponse


class _Pending:
    """A started request whose answer is not written yet (`resp` set once it is ready).
    Called with the answer when it is a Deferred's (it is that Deferred's `_deliver`)."""

    __slots__ = ("abandonable", "deferred", "proto", "req", "resp", "task")

    def __init__(self, proto: HttpProtocol, req: Request, resp: AnyResponse | None) -> None:
        self.proto = proto
        self.req = req
        self.resp = resp
        self.deferred: Deferred | None = None
        self.task: asyncio.Future[AnyResponse] | None = None
        self.abandonable = False

    def __call__(self, resp: AnyResponse) -> None:
        self.proto._resolved(self, resp)


class Abandonable:
    """An awaitable answer the client may give up on (a held `wait_for_change` request):
    an EOF from the client while it is pending closes the connection and cancels it, where
    other requests are still answered to a half-closed client. Nobody half-closes to wait
    for an hour; a client that gave up must not keep a hold on every hop behind us."""

    __slots__ = ("_aw",)

    def __init__(self, aw: Awaitable[AnyResponse]) -> None:
        self._aw = aw

    def __await__(self) -> Generator[Any, None, AnyResponse]:
        return self._aw.__await__()


def _closing(data: bytes) -> bytes:
    """A relayed answer with `Connection: close` in its head (replacing any other value)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    head = data[:end]
    lower = head.lower()
    at = lower.find(b"\r\nconnection:")
    if at < 0:
        return head + b"\r\nConnection: close" + data[end:]
    stop = head.find(b"\r\n", at + 2)
    stop = len(head) if stop < 0 else stop
    return head[:at] + b"\r\nConnection: close" + head[stop:] + data[end:]


closing_answer = _closing  # public for a hop that writes a relayed answer itself


def _ignore(response: AnyResponse) -> None:
    pass


class Deferred:
    """A response the handler learns later, from a callback (a relayed upstream answer).

    The handler returns a Deferred and later calls `resolve(response)` once; the server
    writes the response right then: no Task, no future, no extra event-loop iteration (each
    of which is a measurable share of a proxied request). If the client went away meanwhile,
    `resolve` does nothing.
    """

    __slots__ = ("_deliver", "_early")

    def __init__(self) -> None:
        self._deliver: Callable[[AnyResponse], None] | None = None
        self._early: AnyResponse | None = None

    def resolve(self, response: AnyResponse) -> None:
        deliver = self._deliver
        if deliver is not None:
            self._deliver = _ignore
            deliver(response)
        elif self._early is None:  # resolved before the handler returned
            self._early = response


Handler = Callable[[Request], AnyResponse | Awaitable[AnyResponse] | Deferred]


def error_response(
    status: int, reason: str, headers: Sequence[tuple[str, str]] = ()
) -> Response:
    """A short text answer: the status line's phrase and a one-line reason."""
    line = reason.replace("\r", " ").replace("\n", " ")
    body = f"{status} {_PHRASES.get(status, 'Error')}: {line}\n".encode()
    return Response(status, body, headers=headers)


def _origin_form(method: str, target: str, headers: list[tuple[bytes, bytes]]) -> str:
    """A target that is not origin-form (`/path`): absolute-form becomes origin-form with Host
    set from it (RFC 9112 3.2.2: the target's authority wins); `*` only for OPTIONS; anything
    else (authority-form, a bare word) is a 400. Hops behind us only ever see `/...`."""
    if target == "*":
        if method == "OPTIONS":
            return target
        raise _ProtocolError(400, "asterisk-form target is only allowed with OPTIONS")
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        raise _ProtocolError(400, "request target must be a path (origin-form)")
    end = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0),
              default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if not authority or "@" in authority or tail.startswith("#"):
        raise _ProtocolError(400, "absolute-form target without a plain authority and path")
    headers[:] = [(k, v) for k, v in headers if k != b"host"]
    headers.append((b"host", authority.encode("ascii")))
    return tail if tail.startswith("/") else "/" + tail


class _ProtocolError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


# -- known heads (`Limits.known_heads`) ----------------------------------------------------
_ID_NAME = b"x-openimds-request-id"
# The ID's header line as the hops write it (`proxy_rules.REQUEST_ID_HEADER`, one space): a
# head is cut only there, and at its `Limits.identity_lines` spelled the same way. Found
# without a lower-cased copy of the head; a head spelling one of those names otherwise is
# never kept (`_learn`), so it is parsed as before.
_ID_LINE = b"\r\nX-Openimds-Request-Id: "
_ID_MAX = 128  # longer values (the ID's, an identity line's) are parsed, not cut
# All a cut value may hold to be put back (what strip() leaves of a good one is b""):
# request IDs, IP addresses, UUIDs. Nothing that could end a line or hide another.
_ID_CHARS = (string.ascii_letters + string.digits + "-._:").encode()
_KNOWN_MAX = 4096  # heads (shapes) kept per table (cleared when full)
_KNOWN_HEAD_MAX = 1024  # longer heads are not kept (the hops' own are ~250-450 bytes)
_KNOWN_METHODS = frozenset(("GET", "HEAD"))
# A kept head with any of these is parsed every time (framing, 100-continue, upgrades).
_KNOWN_NEVER = frozenset((b"content-length", b"transfer-encoding", b"expect", b"upgrade"))

# One value cut out of a head: where it was (start, end in the read), the parsed header
# name it belongs to, and the value.
_Cut = tuple[int, int, bytes, bytes]


class _Known:
    """What httptools made of one head (`Request` less the cut values and the peer)."""

    __slots__ = ("base", "cut_at", "headers", "id_at", "ident_at", "ident_hi", "ident_lo",
                 "key", "method", "n_headers", "path", "query", "target", "version")

    def __init__(self, key: bytes, req: Request, counted: int, cut_at: tuple[int, ...],
                 cut_len: int) -> None:
        self.key = key
        self.method = req.method
        self.target = req.target
        self.path = req.path
        self.query = req.query
        self.version = req.version
        self.headers = req.headers
        self.n_headers = len(req.headers)
        # header bytes as the parser callbacks count them, less the cut values'
        self.base = counted - cut_len
        self.cut_at = cut_at  # per cut value, in head order: its index in `headers`
        # The same indexes split (every head of this key has its cut lines there): the ID's
        # (-1: none), and the identity lines', as one slice of `headers` when they are next
        # to each other (ident_lo < 0: they are not), where an exact hit puts its caller's.
        names = [req.headers[i][0] for i in cut_at]
        self.id_at = cut_at[names.index(_ID_NAME)] if _ID_NAME in names else -1
        self.ident_at = tuple(i for i in cut_at if i != self.id_at)
        at = self.ident_at
        whole = bool(at) and at == tuple(range(at[0], at[0] + len(at)))
        self.ident_lo = at[0] if whole else -1
        self.ident_hi = at[-1] + 1 if whole else -1


class HeadMemo:
    """The handler's own slots on one exact known head (`Request.memo`): what it made of the
    head's caller and of its shape, kept as long as the entry is. Every request carrying it
    has the same bytes less its ID's value, so the same identity and the same shape."""

    __slots__ = ("caller", "shape")

    def __init__(self) -> None:
        self.caller: Any = None
        self.shape: Any = None


class _Exact(HeadMemo):
    """A kept head as it last came less only its request ID's value (`_Table.exact`): its
    shape's parse (`known`) and the caller's identity items, which a hit puts in a copy of
    the shape's headers with its own ID. Only what a hit needs: at 10,000 callers a VM
    asking 4 paths has 4 of these, ~0.8 KiB each with its own header list and identity."""

    __slots__ = ("base", "identity", "known")

    def __init__(self, known: _Known, identity: tuple[tuple[bytes, bytes], ...] | None,
                 identity_len: int) -> None:
        HeadMemo.__init__(self)
        self.known = known  # method, target, ... and the shape (`Request.shape`)
        self.identity = identity  # `_Table.intern`'s: one per caller, whatever its paths
        self.base = known.base + identity_len  # header bytes less the ID's value


class _Table:
    """The known heads of every server cutting one set of identity lines. Never shared
    between sets: a key made by one set's cuts may be another head's bytes under another
    (a head whose X-Forwarded-For is empty, where one set cuts the value)."""

    __slots__ = ("exact", "exact_credit", "exact_hits", "exact_marked", "exact_marks",
                 "exact_old", "identities", "known", "lines", "names", "seen")

    def __init__(self, identity_lines: tuple[bytes, ...]) -> None:
        # each line's start as written, and its name as parsed
        self.lines = tuple((b"\r\n" + name + b": ", name.lower()) for name in identity_lines)
        self.names = frozenset(name.lower() for name in identity_lines)
        if _ID_NAME in self.names or len(self.names) != len(identity_lines):
            raise ValueError(f"identity_lines {identity_lines!r}: the request ID, or a name twice")
        self.known: dict[bytes, _Known] = {}
        # Keys seen once and not kept yet: a head is kept the second time it comes. Most
        # heads of a boot storm come once (a VM asks each path once, and without identity
        # lines the proxy's requests name the VM), and keeping one costs more than the parse
        # it would save (in-process: 4 us per head kept).
        self.seen: set[bytes] = set()
        # The same heads less only the ID's value, each as its shape was last used: a
        # keep-alive connection repeats its caller's heads, and this key is one rfind and
        # two slices where the shape's cuts every identity line too (~0.8 against ~2.2 us).
        # Exact: the key holds the identity lines as they came, and the ID's value, which
        # holds no CR or LF, cannot hide or make one (`_cut`). Filled only from a kept head,
        # the second time its key comes (`exact_marks`). Two generations of at most
        # _EXACT_MAX each (`exact`, the young one, and `exact_old`): a key back within
        # _EXACT_MAX others stays, so 10,000 callers' repeated heads are all found (a table
        # cleared at 4,096 found none of them, and every such head was cut).
        self.exact: dict[bytes, _Exact] = {}
        self.exact_old: dict[bytes, _Exact] = {}
        # Exact keys seen once, by hash: one bit each (a collision only fills an entry a
        # time early), cleared once _EXACT_MARKS_MAX are set. Most heads of a boot storm
        # come once: an entry for each would cost its making (~1.5 us) and its memory.
        self.exact_marks = bytearray(_EXACT_MARK_BITS >> 3)
        self.exact_marked = 0
        # Whether fills pay (1) or not (0: only one in _EXACT_PROBE is made), decided each
        # time the young generation turns old by the reads the look served since the last
        # turn (`exact_hits`): with more callers' heads in turn than two generations hold, a
        # head is dropped before it comes back and every fill is lost work (~1.5 us).
        self.exact_credit = _Credit(_EXACT_PROBE, most=1)
        self.exact_hits = 0
        # One identity tuple per caller (`intern`): its exact heads (one per path it asks)
        # and the handler (the agent keys its callers by it) share it instead of a copy
        # each (~280 bytes with its items and values). Cleared when full.
        self.identities: dict[tuple[tuple[bytes, bytes], ...],
                              tuple[tuple[bytes, bytes], ...]] = {}

    def intern(self, identity: tuple[tuple[bytes, bytes], ...],
               ) -> tuple[tuple[bytes, bytes], ...]:
        """The kept tuple equal to `identity` (the same values, byte for byte), or it, kept."""
        identities = self.identities
        if len(identities) >= _IDENTITIES_MAX:
            identities.clear()
        return identities.setdefault(identity, identity)

    def keep_exact(self, key: bytes, entry: _Exact) -> None:
        """`entry` for `key` in the young generation (the young one made old when full)."""
        young = self.exact
        if len(young) >= _EXACT_MAX and key not in young:
            self.exact_old = young
            self.exact = young = {}
            self.exact_credit.tally(self.exact_hits >= _EXACT_MAX // 4)
            self.exact_hits = 0
        young[key] = entry

    def seen_before(self, key: bytes) -> bool:
        """Whether `key` was marked (`exact_marks`); marks it if not."""
        h = hash(key) & (_EXACT_MARK_BITS - 1)
        marks = self.exact_marks
        bit = 1 << (h & 7)
        if marks[h >> 3] & bit:
            return True
        marks[h >> 3] |= bit
        self.exact_marked += 1
        if self.exact_marked >= _EXACT_MARKS_MAX:
            self.exact_marks = bytearray(_EXACT_MARK_BITS >> 3)
            self.exact_marked = 0
        return False


_tables: dict[tuple[bytes, ...], _Table] = {}


def _table_for(identity_lines: tuple[bytes, ...]) -> _Table:
    table = _tables.get(identity_lines)
    if table is None:
        table = _tables[identity_lines] = _Table(identity_lines)
    return table


def _head(data: bytes, start: int, end: int) -> bytes:
    """`data[start:end]`, without a copy when that is all of it (one request per read)."""
    return data if start == 0 and end == len(data) else data[start:end]


def _value(data: bytes, vs: int, end: int) -> bytes | None:
    """The cut value starting at `vs` (to the line's CRLF, before `end`), or None if it may
    not be cut: empty, longer than _ID_MAX, or holding anything but _ID_CHARS."""
    ve = data.find(b"\r\n", vs, end)
    if not 0 < ve - vs <= _ID_MAX:
        return None
    value = data[vs:ve]
    return None if value.strip(_ID_CHARS) else value


def _cut(
    data: bytes, start: int, end: int, lines: tuple[tuple[bytes, bytes], ...],
) -> tuple[bytes, list[_Cut], int] | None:
    """The key of the head `data[start:end]` (its bytes less the values of its last ID line
    and of the first line of each identity name, all as written), those values in head
    order, and their length; None if one may not be cut (the head is parsed).

    Every cut line starts with CRLF and keeps its name and ": " in the key, and no cut value
    holds CR or LF, so cutting makes or hides no line start: the same key always has the
    same cut lines at the same places, and the bytes come back as key + values."""
    cuts: list[_Cut] = []
    cut_len = 0
    at = data.rfind(_ID_LINE, start, end)
    if at >= 0:
        vs = at + len(_ID_LINE)
        value = _value(data, vs, end)
        if value is None:
            return None
        cuts.append((vs, vs + len(value), _ID_NAME, value))
        cut_len = len(value)
    for line, name in lines:
        at = data.find(line, start, end)
        if at >= 0:
            vs = at + len(line)
            value = _value(data, vs, end)
            if value is None:
                return None
            cuts.append((vs, vs + len(value), name, value))
            cut_len += len(value)
    if not cuts:
        return _head(data, start, end), cuts, 0
    if len(cuts) > 1:
        cuts.sort()
    parts = []
    last = start
    for vs, ve, _, _ in cuts:
        parts.append(data[last:vs])
        last = ve
    parts.append(data[last:end])
    return b"".join(parts), cuts, cut_len


def _exact_key(data: bytes, start: int, end: int) -> tuple[bytes, bytes | None] | None:
    """The exact look's key (`_Table.exact`): the head `data[start:end]` less the value of
    its last ID line, and that value (None: no ID line); None if the value may not be cut
    (the head is parsed)."""
    at = data.rfind(_ID_LINE, start, end)
    if at < 0:
        return _head(data, start, end), None
    vs = at + len(_ID_LINE)
    rid = _value(data, vs, end)
    if rid is None:
        return None
    return data[start:vs] + data[vs + len(rid):end], rid


# The search pays only while most searched reads use a kept head (a hit saves ~1.5 us of
# parse, a search that finds nothing costs ~1.4): a storm of new VMs, or more heads than are
# kept, would pay it on every read. Its credit rises with a read that used one, falls with
# one that did not; at 0 only one read in `probe` is searched (and its heads seen or kept),
# the others go straight to the parser.
_CREDIT_MAX = 64
_PROBE = 16
# The same for `_Table.exact`'s fills (its credit is the table's).
_EXACT_PROBE = 64
_EXACT_MAX = 16384  # exact heads per generation (two are kept)
_EXACT_MARK_BITS = 1 << 20  # 128 KiB of marks
_EXACT_MARKS_MAX = _EXACT_MARK_BITS // 4  # cleared when a quarter is set
_IDENTITIES_MAX = 16384  # callers' identity tuples kept for sharing (`_Table.intern`)


class _Credit:
    """Whether a look pays (`_search`, `_Table.exact_credit`): `credit` rises with a read
    the look served, falls with one it did not; at 0 only one read in `probe` looks."""

    __slots__ = ("credit", "most", "probe", "unsearched")

    def __init__(self, probe: int, most: int | None = None) -> None:
        self.most = _CREDIT_MAX if most is None else most
        self.credit = self.most
        self.probe = probe
        self.unsearched = 0  # reads since the last probe, while credit is 0

    def due(self) -> bool:
        """At credit 0: whether this read is the one in `probe` that looks."""
        self.unsearched += 1
        if self.unsearched >= self.probe:
            self.unsearched = 0
            return True
        return False

    def tally(self, served: bool) -> None:
        """A read that looked: did the look serve it?"""
        if served:
            if self.credit < self.most:
                self.credit += 1
        elif self.credit:
            self.credit -= 1


_search = _Credit(_PROBE)  # process-wide: every known-heads server's reads


class _Dropped(list[tuple[bytes, bytes]]):
    """Where a request's chunked trailer fields go (`on_headers_complete`): nowhere."""

    def append(self, field: tuple[bytes, bytes]) -> None:
        pass


_TRAILERS = _Dropped()

_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
WHEEL_TICK_S = 0.25  # how late a connection's timeout may fire


class _Wheel:
    """The request and keep-alive timeouts of every connection of one loop, in slots of
    WHEEL_TICK_S: the connections due in one slot share one loop timer. A new connection
    costs a set insertion instead of a timer (call_at + cancel, ~1.5-2 us of a
    one-request connection); a slot fires at its end, never before a deadline in it."""

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: dict[int, set[HttpProtocol]] = {}

    def add(self, proto: HttpProtocol, when: float) -> int:
        key = int(when / WHEEL_TICK_S) + 1
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = set()
            proto._loop.call_at(key * WHEEL_TICK_S, self._fire, key)
        slot.add(proto)
        return key

    def discard(self, proto: HttpProtocol, key: int) -> None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.discard(proto)

    def _fire(self, key: int) -> None:
        for proto in self._slots.pop(key, ()):
            try:
                proto._on_timer()
            except Exception:  # one connection's bug must not stop the others' timeouts
                log.exception("http.timeout_failed")


# One wheel per event loop (tests run several loops in one process).
_WHEELS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wheel] = (
    weakref.WeakKeyDictionary())


_last_wheel: tuple[weakref.ref[asyncio.AbstractEventLoop], _Wheel] | None = None


def _wheel_for(loop: asyncio.AbstractEventLoop) -> _Wheel:
    global _last_wheel
    last = _last_wheel
    if last is not None and last[0]() is loop:  # a process has one loop: no dict lookup
        return last[1]
    wheel = _WHEELS.get(loop)
    if wheel is None:
        wheel = _WHEELS[loop] = _Wheel()
    _last_wheel = (weakref.ref(loop), wheel)
    return wheel


class HttpProtocol(asyncio.Protocol):
    """One client connection."""

    __slots__ = (
        "_barrier", "_begun", "_body", "_body_len", "_closing", "_flush_due", "_handler",
        "_header_bytes", "_headers", "_in_request", "_eof", "_failure", "_head",
        "_last_keep_alive", "_last_name", "_limits", "_loop", "_parser", "_paused", "_peer",
        "_pending", "_queue", "_deadline", "_slot", "_slot_end", "_wheel", "_transport",
        "_url", "_max_header_bytes", "_out", "_write_paused", "_known_heads", "_answered",
    )

    def __init__(self, handler: Handler, limits: Limits, loop: asyncio.AbstractEventLoop):
        self._handler = handler
        self._limits = limits
        self._loop = loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer: tuple[str, int] | None = None
        self._url = b""
        # The header fields being parsed; once the block is complete, `_head` (and
        # `_headers` the sink chunked trailer fields go to).
        self._headers: list[tuple[bytes, bytes]] = []
        self._head: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._in_request = False
        self._begun = False  # a request began in the read being handled
        self._last_name = b""
        self._body: list[bytes] = []
        self._body_len = 0
        self._queue: deque[Request] = deque()  # parsed, not started
        self._pending: deque[_Pending] = deque()  # started, answer not written; in order
        self._barrier = False  # the one started request is not safe: nothing joins it
        self._flush_due = False  # a call_soon will write the ready answers at the head
        self._paused = False  # reading paused (queue, failure, last request, write_paused)
        self._write_paused = False  # the transport holds more than write_buffer_bytes
        self._closing = False
        # A keep-alive answer was written: a quiet spell ending now is the routine `idle`,
        # not `silent` (stored where the keep-alive timeout is armed, not per read).
        self._answered = False
        self._wheel = _wheel_for(loop)
        self._slot = 0  # the timer wheel's slot this connection waits in; 0: none
        self._slot_end = 0.0  # when that slot fires
        self._deadline = 0.0
        self._max_header_bytes = limits.max_header_bytes  # read per header: one lookup
        self._known_heads = (_table_for(limits.identity_lines) if limits.known_heads
                             else None)
        # Hostile-input state: the client half-closed; a parse error waiting until the
        # requests before it are answered.
        self._eof = False
        self._failure: tuple[int, str] | None = None
        self._last_keep_alive = True
        # Answers produced while a read is handled, written together when it is done.
        self._out: list[bytes] | None = None

    @property
    def _busy(self) -> bool:
        """A started request is not answered yet."""
        return bool(self._pending)

    @property
    def _deferred(self) -> Deferred | None:
        """The Deferred the oldest unanswered request waits on, if it is one."""
        return self._pending[0].deferred if self._pending else None

    # -- transport events -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: no isinstance check here.
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = peer if len(peer) == 2 else (str(peer[0]), int(peer[1]))
        high = self._limits.write_buffer_bytes
        # uvloop's own low-water mark is 16 bytes: a client would be let go on only once it
        # took nearly everything, one pause per high-water mark of answers.
        transport.set_write_buffer_limits(high, high // 4)  # type: ignore[attr-defined]
        self._arm(self._limits.request_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._slot:
            self._wheel.discard(self, self._slot)
            self._slot = 0
        for pending in self._pending:
            if pending.task is not None and not pending.task.done():
                pending.task.cancel()
            if pending.deferred is not None:
                pending.deferred._deliver = _ignore
        self._pending.clear()
        self._queue.clear()
        self._transport = None
        # Break the protocol <-> parser cycle so the connection is freed by refcounting, not
        # by the cyclic collector (measured: ~5 us less CPU per one-request connection).
        self._parser = None  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._closing or self._failure is not None:
            return
        # A pipelining client (wrk -s pipeline, a proxy batching) sends many requests per
        # read: their answers leave in one write instead of one syscall each.
        out: list[bytes] = []
        self._out = out
        try:
            self._receive(data)
        finally:
            self._out = None
            if out:
                self._write_out(out)

    def _receive(self, data: bytes) -> None:
        try:
            if (self._known_heads and not self._in_request and self._last_keep_alive
                    and self._failure is None and (_search.credit or _search.due())):
                data = self._take_known(data)
            if data:
                self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request asking for it is answered as if Upgrade were absent (RFC 9110 7.8
            # lets a server ignore it); the parser stops there, so the connection ends.
            if self._queue:
                self._fail_after_queue(0, "")
            else:
                self._fail_after_queue(400, "protocol upgrade is not supported")
        except httptools.HttpParserError as exc:
            # Our callbacks raise _ProtocolError; httptools wraps it in a callback error.
            cause = exc.__context__
            if isinstance(cause, _ProtocolError):
                self._fail_after_queue(cause.status, cause.reason)
            elif not self._last_keep_alive and not self._in_request:
                # Bytes after a request that ends the connection: answer it, ignore them.
                self._fail_after_queue(0, "")
            else:
                self._fail_after_queue(400, f"malformed request: {exc}")
        if self._begun:
            self._begun = False
            if self._in_request:  # begun in this read, not complete: its time runs from now
                self._arm(self._limits.request_timeout_s)
        self._drain_queue()

    def _take_known(self, data: bytes) -> bytes:
        """Queue the requests at the start of `data` whose heads are known, parse (and learn)
        the others one head at a time; return what is left for the parser (from the first
        incomplete head, or a request that is not complete at its head's end)."""
        table = self._known_heads
        assert table is not None
        known_heads = table.known
        exact_heads = table.exact
        lines = table.lines
        used = False
        exact_used = False
        start = 0
        size = len(data)
        queue = self._queue
        while start < size:
            end = data.find(b"\r\n\r\n", start)
            if end < 0 or end + 4 - start > _KNOWN_HEAD_MAX:
                break
            end += 4
            # First the head less its ID's value alone (`_Table.exact`): the same caller's
            # heads again, as a keep-alive connection sends them.
            looked = _exact_key(data, start, end)
            if looked is None:
                break  # an ID a kept head cannot take back: parsed
            exact_key, rid = looked
            exact = exact_heads.get(exact_key)
            if exact is None and table.exact_old:
                exact = table.exact_old.pop(exact_key, None)
                if exact is not None:  # back in the young generation
                    table.keep_exact(exact_key, exact)
                    exact_heads = table.exact
            if exact is not None:
                exact_used = True
                kept = exact.known
                headers = kept.headers.copy()
                ident = exact.identity
                if ident is not None:  # the caller's values where its shape cut them
                    if kept.ident_lo >= 0:
                        headers[kept.ident_lo:kept.ident_hi] = ident
                    else:
                        for index, item in zip(kept.ident_at, ident, strict=True):
                            headers[index] = item
                if rid is not None:  # the same key has its ID where its shape has
                    headers[kept.id_at] = (_ID_NAME, rid)
                    base = exact.base + len(rid)
                else:
                    base = exact.base
                memo: HeadMemo | None = exact
            else:
                got = _cut(data, start, end, lines)
                if got is None:
                    break  # a value a kept head cannot take back: parsed
                key, cuts, cut_len = got
                known = known_heads.get(key)
                if known is None:
                    head = _head(data, start, end)
                    seen = table.seen
                    again = key in seen
                    if not again:
                        if len(seen) >= _KNOWN_MAX:
                            seen.clear()
                        seen.add(key)
                    queued = len(queue)
                    self._parser.feed_data(head)  # the ordinary parse (may raise: the caller's)
                    start = end
                    if self._in_request or self._failure is not None:
                        break  # a body follows, or the stream is bad: the parser goes on
                    if again and len(queue) == queued + 1:
                        self._learn(table, key, queue[-1], head, cuts, cut_len)
                    if not self._last_keep_alive:
                        break
                    continue
                kept = known
                base = known.base + cut_len
                headers = known.headers.copy()
                rid = None
                identity = []
                # The same key has the same cut lines in the same order (`_cut`), which
                # `_learn` matched one to one with the parsed headers.
                for (_, _, name, value), index in zip(cuts, known.cut_at, strict=True):
                    item = headers[index] = (name, value)
                    if name is _ID_NAME:
                        rid = value
                    else:
                        identity.append(item)
                ident = table.intern(tuple(identity)) if lines else None
                memo = None
                if table.seen_before(exact_key):
                    credit = table.exact_credit
                    if credit.credit or credit.due():
                        memo = _Exact(known, ident,
                                      cut_len - (len(rid) if rid is not None else 0))
                        table.keep_exact(exact_key, memo)
                        exact_heads = table.exact
            if base > self._max_header_bytes or kept.n_headers > self._limits.max_headers:
                break  # this server's limits are not the ones it was kept under
            req = Request.__new__(Request)
            req.method = kept.method
            req.target = kept.target
            req.path = kept.path
            req.query = kept.query
            req.headers = headers
            req.body = b""
            req.version = kept.version
            req.keep_alive = True
            req.peer = self._peer
            req.shape = kept.key
            req.request_id = rid
            req.identity = ident
            req.memo = memo
            used = True
            queue.append(req)
            if (len(queue) + len(self._pending) > MAX_PIPELINE and self._transport
                    and not self._paused):
                self._transport.pause_reading()
                self._paused = True
            start = end
        # (the usual read leaves both credits full: no call)
        if not used or _search.credit < _search.most:
            _search.tally(used)
        if exact_used:
            table.exact_hits += 1
        return data[start:] if start else data

    def _learn(self, table: _Table, key: bytes, req: Request, head: bytes, cuts: list[_Cut],
               cut_len: int) -> None:
        """Keep `head`, which parsed into `req` alone, if every later copy may skip the parse:
        a plain GET/HEAD whose headers of the cut names (the ID, the identity lines) are
        exactly the ones `cuts` were cut from, one to one, in order, with those values."""
        if (req.method not in _KNOWN_METHODS or not req.keep_alive or req.body
                or not req.target.startswith("/") or len(req.headers) > self._limits.max_headers
                or head.count(b"\n") != head.count(b"\r\n")):  # no bare LF: lines are CRLF
            return
        names = table.names
        cut_at: list[int] = []
        for index, (name, value) in enumerate(req.headers):
            if name in _KNOWN_NEVER:
                return
            if name == _ID_NAME or name in names:
                # One not cut (a second of the name, another spelling of it, another space
                # after the colon) would keep a caller's value in the key, or hand over an
                # identity without it: this head is parsed every time.
                at = len(cut_at)
                if at >= len(cuts) or cuts[at][2] != name or cuts[at][3] != value:
                    return
                cut_at.append(index)
        if len(cut_at) != len(cuts):
            return
        known = table.known
        if len(known) >= _KNOWN_MAX:
            known.clear()
        table.seen.discard(key)
        # The learning request keeps its own list: the kept one is copied for each use.
        known[key] = _Known(key, Request(req.method, req.target, list(req.headers), b"",
                                         req.version, True, None),
                            self._header_bytes, tuple(cut_at), cut_len)

    def pause_writing(self) -> None:
        """The transport holds more than write_buffer_bytes: the client does not read its
        answers as fast as it asks. Its requests wait (answering them would only buffer
        more) and reading stops, so what it sends stays in the kernel's buffers."""
        self._write_paused = True
        transport = self._transport
        if transport is None or self._closing:
            return
        if not self._paused:
            transport.pause_reading()
            self._paused = True
        self._arm(self._limits.write_timeout_s)

    def resume_writing(self) -> None:
        """Drained below the low-water mark: answer what waited, then read again."""
        self._write_paused = False
        if self._closing or self._transport is None:
            return
        self._arm(self._limits.request_timeout_s if self._in_request
                  else self._limits.keepalive_timeout_s)
        out: list[bytes] = []
        self._out = out
        try:
            self._drain_queue()
        finally:
            self._out = None
            if out:
                self._write_out(out)

    def eof_received(self) -> bool | None:
        """The client half-closed (`nc`, `curl` with stdin): answer what it sent, then close."""
        if any(p.abandonable for p in self._pending):
            return None  # a held request whose client went: close, which cancels it
        if self._pending or self._queue:
            self._eof = True
            return True  # keep our half open for the answers
        return None  # nothing pending: the transport closes

    def _fail_after_queue(self, status: int, reason: str) -> None:
        """A bad byte stream: the requests complete before it are still answered, in order;
        then the error (status 0: none) and close. Nothing after it is read."""
        self._failure = (status, reason)
        if self._transport is not None and not self._paused:
            self._transport.pause_reading()
            self._paused = True

    # -- parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._in_request = True
        self._url = b""
        self._headers = []
        self._header_bytes = 0
        self._body = []
        self._body_len = 0
        # Its request timeout is armed once the read is handled, if it is still incomplete
        # then (`_receive`): most requests end in the read they begin in.
        self._begun = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._max_header_bytes:
            raise _ProtocolError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        # Called for every header of every request: only the byte bound here (it bounds
        # the count too, and memory); the count is checked once the block is complete.
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes:
            raise _ProtocolError(431, "request headers too large")
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        headers = self._headers
        # Chunked trailer fields are dropped (RFC 9110 6.5.1 allows it): merged into the
        # headers they would arrive after every check the header block went through. They
        # still count toward the header bytes.
        self._head = headers
        self._headers = _TRAILERS
        if len(headers) > self._limits.max_headers:
            raise _ProtocolError(431, "too many request headers")
        continued = False
        for name, value in headers:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _ProtocolError(400, "bad Content-Length") from None
                if length > self._limits.max_body_bytes:
                    raise _ProtocolError(
                        413, f"body of {length} bytes exceeds {self._limits.max_body_bytes}"
                    )
            elif (name == b"expect" and value.lower() == b"100-continue" and self._transport
                  and not self._pending and not self._queue and not continued):
                # Only for the request answered next: a 100 written while an earlier
                # pipelined request waits would be read as that request's interim answer.
                continued = True
                self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_len += len(body)
        if self._body_len > self._limits.max_body_bytes:
            raise _ProtocolError(413, f"body exceeds {self._limits.max_body_bytes} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_request = False
        parser = self._parser
        try:
            target = self._url.decode("ascii")
        except UnicodeDecodeError:
            raise _ProtocolError(400, "request target is not ASCII") from None
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _ProtocolError(505, f"HTTP/{version} is not supported; use HTTP/1.1")
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii", "replace")
        if not target.startswith("/"):
            target = _origin_form(method, target, self._head)
        keep_alive = parser.should_keep_alive()
        self._last_keep_alive = keep_alive
        req = Request(
            method, target, self._head, b"".join(self._body) if self._body else b"",
            version, keep_alive, self._peer,
        )
        self._queue.append(req)
        if (len(self._queue) + len(self._pending) > MAX_PIPELINE and self._transport
                and not self._paused):
            self._transport.pause_reading()
            self._paused = True

    # -- dispatch -----------------------------------------------------------------------
    def _drain_queue(self) -> None:
        queue = self._queue
        pending = self._pending
        while queue and not self._closing and not self._write_paused:
            req = queue[0]
            if pending and (self._barrier or len(pending) >= MAX_PIPELINE or req.body
                            or req.method not in _SAFE or not req.keep_alive):
                break  # waits until the ones before it are answered
            queue.popleft()
            try:
                result = self._handler(req)
            except Exception:
                log.exception("http.handler_failed method=%s path=%s", req.method, req.path)
                result = error_response(500, "internal error")
            if type(result) is RawResponse:  # the usual answer given at once
                if pending:  # written once the ones before it are
                    pending.append(_Pending(self, req, result))
                else:
                    self._send(req, result)
                continue
            if isinstance(result, Deferred):
                if result._early is None:
                    slot = _Pending(self, req, None)
                    slot.deferred = result
                    result._deliver = slot
                    # (as _started)
                    self._barrier = not (req.method in _SAFE and not req.body
                                         and req.keep_alive)
                    pending.append(slot)
                    if not req.keep_alive and not self._paused and type(result) is Deferred \
                            and isinstance(self._transport, SocketTransport):
                        # The last request of the connection: later bytes would be ignored,
                        # so the socket need not be registered with the loop while it waits
                        # (a plain Deferred only: a subclass may want to see the client's
                        # EOF).
                        self._transport.pause_reading()
                        self._paused = True
                    continue
                result = result._early
            if isinstance(result, Response | RawResponse):
                if pending:  # written once the ones before it are
                    pending.append(_Pending(self, req, result))
                else:
                    self._send(req, result)
                continue
            slot = _Pending(self, req, None)
            slot.abandonable = isinstance(result, Abandonable)
            task = slot.task = asyncio.ensure_future(result)
            task.add_done_callback(functools.partial(self._finish, slot))
            self._started(slot)
        if pending or queue or self._closing:
            return  # (write_paused with an empty queue: reading resumes with writing)
        if self._failure is not None:
            status, reason = self._failure
            if status:
                self._fail(status, reason)
            else:
                self._close()
        elif self._eof:
            self._close()
        elif self._paused and self._transport and not self._write_paused:
            self._transport.resume_reading()
            self._paused = False

    def _started(self, slot: _Pending) -> None:
        # Only a safe request joins others; one that is not runs alone (sequential
        # semantics for anything with effects) and nothing joins it.
        req = slot.req
        self._barrier = not (req.method in _SAFE and not req.body and req.keep_alive)
        self._pending.append(slot)

    def begin_answer(self, req: Request) -> Callable[[AnyResponse], None]:
        """Start `req` (parsed elsewhere, e.g. kept by its bytes) as this connection's next
        request, without the handler: call what this returns once with its answer, which is
        then written in order, as a Deferred's would be."""
        slot = _Pending(self, req, None)
        self._started(slot)
        return slot

    def _resolved(self, slot: _Pending, resp: AnyResponse) -> None:
        """A started request's answer is ready: written now if it is the oldest unanswered
        one, else when those before it are."""
        slot.resp = resp
        pending = self._pending
        if self._closing or not pending or pending[0] is not slot:
            return
        if len(pending) == 1:  # the common case: no one behind it, write it now
            pending.clear()
            try:
                self._send(slot.req, resp)
                self._drain_queue()
            except Exception:  # runs inside someone else's I/O callback: never raise into it
                log.exception("http.send_failed method=%s path=%s",
                              slot.req.method, slot.req.path)
                self._close()
        elif not self._flush_due:
            # Others started behind it: their answers often come in the same upstream read
            # (the pool pipelines them too), so they go in one write at the end of it.
            self._flush_due = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write the ready answers at the head of the pending ones, in one write."""
        self._flush_due = False
        if self._closing:
            return
        pending = self._pending
        out: list[bytes] = []
        self._out = out
        try:
            while pending and pending[0].resp is not None and not self._closing:
                slot = pending.popleft()
                self._send(slot.req, slot.resp)  # type: ignore[arg-type]
            self._drain_queue()
        except Exception:  # never raise into the loop's callback
            log.exception("http.send_failed")
            self._close()
        finally:
            self._out = None
            if out:
                self._write_out(out)

    def _finish(self, slot: _Pending, task: asyncio.Future[AnyResponse]) -> None:
        slot.task = None
        slot.abandonable = False
        if self._closing:
            return
        req = slot.req
        exc = asyncio.CancelledError() if task.cancelled() else task.exception()
        if exc is not None:
            log.error("http.handler_failed method=%s path=%s error=%r",
                      req.method, req.path, exc)
            self._resolved(slot, error_response(500, "internal error"))
        else:
            self._resolved(slot, task.result())

    def _send(self, req: Request, resp: AnyResponse) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        if isinstance(resp, RawResponse):
            keep = req.keep_alive and not resp.close
            if not keep:
                self._cork()
            # A relayed answer was framed for a keep-alive hop: when this connection closes
            # after it, say so (RFC 9112 §9.6), as a Response does.
            data = resp.data if keep else _closing(resp.data)
        else:
            keep = req.keep_alive
            if not keep:
                self._cork()
            data = resp.encode(keep_alive=keep, head=req.method == "HEAD")
        if keep and not self._queue and not self._pending:
            # Before the write: a pause_writing from it arms the write timeout instead.
            self._arm(self._limits.keepalive_timeout_s)
            self._answered = True
        out = self._out
        if out is not None:
            out.append(data)
            if len(out) >= MAX_PIPELINE:
                # A read of many small requests must not make answers without bound before
                # the transport can say it holds too much (pause_writing, from this write).
                self._write_out(out)
        else:
            transport.write(data)
        if not keep:
            self._close()

    def _cork(self) -> None:
        """The last answer on a TCP connection leaves in one segment with our FIN (TCP_CORK
        until the close): sent apart, the client read the answer and closed first, so
        TIME_WAIT landed on the client (a VM, or wrk: 85 % of one-request connections,
        half its port range in TIME_WAIT), and each close cost one more segment."""
        transport = self._transport
        if transport is None or self._peer is None:  # no peer address: not TCP
            return
        if isinstance(transport, SocketTransport):
            transport.cork()  # MSG_MORE on the write, no setsockopt
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)

    def _write(self, data: bytes) -> None:
        out = self._out
        if out is not None:
            out.append(data)
        elif self._transport is not None:
            self._transport.write(data)

    def _write_out(self, out: list[bytes]) -> None:
        if self._transport is not None:
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _fail(self, status: int, reason: str) -> None:
        if self._transport is not None and not self._closing:
            self._write(error_response(status, reason).encode(keep_alive=False))
        self._close()

    def _close(self) -> None:
        self._closing = True
        if self._out:  # answers of this read still batched: they go before the close
            self._write_out(self._out)
        transport = self._transport
        if transport is not None and transport.get_write_buffer_size():
            # The transport closes once the client took the rest: bounded by the write
            # timeout (its own close would wait forever for a client that never reads).
            self._arm(self._limits.write_timeout_s)
        elif self._slot:
            self._wheel.discard(self, self._slot)
            self._slot = 0
        if transport is not None:
            transport.close()

    def _abort(self) -> None:
        """Close now, dropping what the client did not take; a reset, so the kernel drops
        its copy too (a plain close leaves it trying to deliver for minutes)."""
        self._closing = True
        transport = self._transport
        if transport is None:
            return
        unsent = transport.get_write_buffer_size()
        if unsent:  # (none: the transport is closing by itself, the client took it all)
            counts = self._limits.timeouts
            if counts is not None:
                counts.write += 1
            log.info("http.write_timeout peer=%s unsent=%d",
                     self._peer[0] if self._peer else "-", unsent)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        transport.abort()

    def _arm(self, seconds: float) -> None:
        # A slot of the loop's timer wheel, moved lazily: re-arming for each request only
        # stores the new deadline (the slot, when it comes, finds it later and moves on).
        # A call_later per request cost ~5 us of the ~8 us this protocol spent per request.
        deadline = self._loop.time() + seconds
        self._deadline = deadline
        slot = self._slot
        if slot:
            # Kept if it fires at most a tick after the new deadline (the wheel's bound):
            # a request's deadline just after the connection's stays in the same slot.
            if self._slot_end <= deadline + WHEEL_TICK_S:
                return
            self._wheel.discard(self, slot)
        slot = self._slot = self._wheel.add(self, deadline)
        self._slot_end = slot * WHEEL_TICK_S

    def _on_timer(self) -> None:
        """The wheel's slot came (it forgot us already)."""
        self._slot = 0
        if self._loop.time() < self._deadline:
            slot = self._slot = self._wheel.add(self, self._deadline)
            self._slot_end = slot * WHEEL_TICK_S
            return
        self._on_timeout()

    def _on_timeout(self) -> None:
        if self._write_paused or self._closing:
            # Answers the client did not take within write_timeout_s (or, closing, that it
            # still has not taken): it is not reading, a wait would hold them forever.
            self._abort()
            return
        if self._pending:
            # The handler owns the time now; upstream timeouts bound it.
            return
        counts = self._limits.timeouts
        if self._in_request:
            if counts is not None:
                counts.request += 1
            self._fail(408, "request not received in time")
        else:
            # An idle keep-alive connection (or one that never sent a byte) just closes:
            # an unprompted 408 would be read as the answer to the client's next request.
            if counts is not None:
                if self._answered:
                    counts.idle += 1
                else:
                    counts.silent += 1
            self._close()


def parse_one(
    data: bytes, limits: Limits, loop: asyncio.AbstractEventLoop,
) -> Request | None:
    """The request `data` holds, exactly as `HttpProtocol` parses it as the first read of a
    new connection; None unless `data` is one complete request and nothing else (partial,
    pipelined, malformed, over a limit, an upgrade, or one it would answer `100 Continue`).

    For a hop that keeps what it made of a first read, keyed by its bytes: identical bytes
    parse identically, so this is the parse every later copy would get. `Request.peer` is
    None (the caller knows the peer)."""
    got: list[Request] = []

    def record(req: Request) -> Deferred:
        got.append(req)
        return Deferred()  # never resolved: a second request would stay queued

    proto = HttpProtocol(record, limits, loop)
    try:
        proto.data_received(data)
        one = (len(got) == 1 and not proto._queue and not proto._in_request
               and proto._failure is None and got[0].header(b"expect") is None)
    finally:
        proto.connection_lost(None)  # off the timer wheel; the parser cycle broken
    return got[0] if one else None


def bind_tcp(
    host: str, port: int, *, backlog: int = 4096, reuse_port: bool = False,
) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR), non-blocking. `reuse_port`: SO_REUSEPORT, so
    worker processes each listen on the same address and the kernel spreads connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_unix(path: str, *, mode: int = 0o666, backlog: int = 4096) -> socket.socket:
    """A listening Unix socket at path: parent made (0755), a stale socket replaced."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o755, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    handler: Handler, sock: socket.socket, limits: Limits | None = None,
    *, backlog: int = 4096,
) -> asyncio.Server:
    """Serve handler on an already bound, listening socket; returns the started Server."""
    loop = asyncio.get_running_loop()
    lim = limits or Limits()

    def factory() -> HttpProtocol:
        return HttpProtocol(handler, lim, loop)

    return await loop.create_server(factory, sock=sock, backlog=backlog)


def install_uvloop() -> None:
    """Use uvloop's event loop policy when available (it is a declared dependency)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
