"""Where one HTTP/1.1 answer ends in a buffer holding several. Pure: bytes in, offsets out.

The upstream pool pipelines requests to our own hops (agent, API), whose answers always
carry a Content-Length; httptools parses them but cannot say where one answer's bytes end,
and a relaying hop needs each answer's exact bytes. `frame_answer()` finds that end for the
one framing it accepts, and refuses everything else with `NotFramed`, so the caller stops
pipelining on that connection instead of guessing:

- a status line `HTTP/1.1 NNN ...` or `HTTP/1.0 NNN ...`, a final status (no 1xx), CRLF line
  ends only (no bare LF), no obs-fold of a framing header;
- the body's length: none for an answer to HEAD, and for 204 and 304 (RFC 9112 §6.3);
  otherwise exactly one Content-Length of digits, no Transfer-Encoding at all (chunked or an
  answer read until close is never pipelined).

A wrong boundary would hand one caller's answer to the next (another VM's metadata), so
the rules are strict: when in doubt, NotFramed.
"""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Framed", "NotFramed", "frame_answer", "header_fields"]

_CL = b"\r\ncontent-length:"
_TE = b"transfer-encoding"
_CONNECTION = b"\r\nconnection:"


class NotFramed(ValueError):
    """The answer is not one `frame_answer` can delimit; `str()` says why."""


class Framed(NamedTuple):
    """An answer's place in the buffer: `buf[start:end]` is all of it."""

    end: int  # just past the answer
    body_start: int  # just past the blank line ending the head
    status: int
    keep_alive: bool


def frame_answer(buf: bytes, start: int, head_only: bool) -> Framed | None:
    """The answer starting at `buf[start]`: its end once the head is complete (the body
    may still be arriving: `end > len(buf)`), None while the head is incomplete.
    `head_only`: it answers a HEAD request (no body whatever its headers say)."""
    head_end = buf.find(b"\r\n\r\n", start)
    if head_end < 0:
        if buf.find(b"\n\n", start) >= 0 or buf.find(b"\n\r\n", start) >= 0:
            raise NotFramed("bare LF in the head")
        return None
    body_start = head_end + 4
    # Runs once per pipelined answer on the hot hops, and an upstream sends the same few
    # heads again and again (the API's answer to one document): parsed once, then looked
    # up (~0.2 us instead of ~1 us). Only accepted heads are kept, keyed by their bytes.
    head = buf[start:body_start]
    known = _HEADS.get(head)
    if known is None:
        known = _parse_head(head)
        if len(_HEADS) >= _HEADS_MAX:
            _HEADS.clear()
        _HEADS[head] = known
    status, keep_alive, length = known
    if head_only:
        length = 0
    elif length is None:
        raise NotFramed("no Content-Length")
    return _framed(Framed, (body_start + length, body_start, status, keep_alive))


_HEADS: dict[bytes, tuple[int, bool, int | None]] = {}
_HEADS_MAX = 1024  # distinct heads kept (about 200 KiB); then the memo starts over


def _parse_head(head: bytes) -> tuple[int, bool, int | None]:
    """(status, keep-alive, body length: None without a Content-Length) of a complete
    head, status line to blank line; NotFramed if it breaks a rule of the module."""
    # Lower-cased once; header names are found at line starts ("\r\n" + name + ":"), which
    # a value cannot fake: every LF is part of a CRLF (checked here).
    low = head[:-2].lower()
    if low.count(b"\n") != low.count(b"\r\n"):
        raise NotFramed("bare LF in the head")
    version = low[:9]
    if version != b"http/1.1 " and version != b"http/1.0 ":
        raise NotFramed(f"not an HTTP/1.x status line: {bytes(head[:12])!r}")
    code = low[9:12]
    if not code.isdigit() or low[12] not in _AFTER_CODE:
        raise NotFramed(f"bad status code: {bytes(low[9:13])!r}")
    status = int(code)
    if status < 200:
        raise NotFramed(f"interim answer {status}")
    if _TE in low:
        raise NotFramed("Transfer-Encoding (chunked or until close)")
    keep_alive = _keep_alive(low, version == b"http/1.1 ")
    if status == 204 or status == 304:
        return status, keep_alive, 0
    count = low.count(_CL)
    if count == 0:
        return status, keep_alive, None
    if count > 1:
        raise NotFramed("more than one Content-Length")
    at = low.find(_CL) + len(_CL)
    line_end = low.index(b"\r\n", at)
    if low[line_end + 2:line_end + 3] in _FOLD:
        raise NotFramed("obs-fold in Content-Length")
    value = low[at:line_end].strip(b" \t")
    if not value.isdigit() or len(value) > 15:
        raise NotFramed(f"bad Content-Length: {bytes(value)!r}")
    return status, keep_alive, int(value)


_AFTER_CODE = frozenset(b" \r")
_framed = tuple.__new__  # Framed(...) without NamedTuple's Python-level __new__ (~0.2 us)
_FOLD = (b" ", b"\t")


def _keep_alive(head: bytes, http11: bool) -> bool:
    """RFC 9112 §9.3: 1.1 persists unless `close`; 1.0 only with `keep-alive`."""
    keep = http11
    at = head.find(_CONNECTION)
    while at >= 0:
        end = head.index(b"\r\n", at + 2)
        if head[end + 2:end + 3] in _FOLD:
            raise NotFramed("obs-fold in Connection")
        tokens = {t.strip(b" \t") for t in head[at + len(_CONNECTION):end].split(b",")}
        if b"close" in tokens:
            return False
        if b"keep-alive" in tokens:
            keep = True
        at = head.find(_CONNECTION, end)
    return keep


def header_fields(buf: bytes, start: int, body_start: int) -> list[tuple[bytes, bytes]]:
    """The framed answer's header fields: lower-cased names, values without surrounding
    whitespace (what `UpstreamResponse.headers` holds)."""
    lines = buf[start:body_start - 4].split(b"\r\n")
    fields = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        fields.append((name.lower(), value.strip(b" \t")))
    return fields
