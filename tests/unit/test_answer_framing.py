"""frame_answer: where each of several pipelined answers ends, and what it refuses."""

from __future__ import annotations

import pytest

from openimds.core.answer_framing import Framed, NotFramed, frame_answer, header_fields
from openimds.http.server import Response


def answer(status: int, body: bytes, *extra: str, keep_alive: bool = True) -> bytes:
    headers = tuple(tuple(h.split(": ", 1)) for h in extra)
    return Response(status, body, headers=headers).encode(keep_alive=keep_alive)  # type: ignore[arg-type]


def test_splits_a_buffer_holding_several_answers() -> None:
    parts = [answer(200, b"one"), answer(404, b"not here"), answer(200, b"")]
    buf = b"".join(parts)
    start, ends = 0, []
    for part in parts:
        framed = frame_answer(buf, start, False)
        assert framed is not None
        assert buf[start:framed.end] == part
        assert buf[framed.body_start:framed.end] == part.split(b"\r\n\r\n", 1)[1]
        ends.append(framed.status)
        start = framed.end
    assert ends == [200, 404, 200] and start == len(buf)


def test_incomplete_head_needs_more_and_incomplete_body_says_where_it_ends() -> None:
    full = answer(200, b"0123456789")
    assert frame_answer(full[:20], 0, False) is None
    framed = frame_answer(full[:-4], 0, False)
    assert framed is not None and framed.end == len(full) > len(full) - 4


def test_head_204_and_304_have_no_body_whatever_their_length_says() -> None:
    head = Response(200, b"x" * 50).encode(keep_alive=True, head=True)
    assert b"Content-Length: 50" in head
    framed = frame_answer(head + b"HTTP/1.1 ...", 0, True)
    assert framed == Framed(len(head), len(head), 200, True)
    for status in (204, 304):
        raw = b"HTTP/1.1 %d X\r\nContent-Length: 7\r\n\r\n" % status
        framed = frame_answer(raw, 0, False)
        assert framed is not None and framed.end == len(raw) and framed.status == status


def test_keep_alive_follows_version_and_connection() -> None:
    def keep(raw: bytes) -> bool:
        framed = frame_answer(raw, 0, False)
        assert framed is not None
        return framed.keep_alive

    assert keep(answer(200, b"a"))
    assert not keep(answer(200, b"a", keep_alive=False))
    assert not keep(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n")
    assert not keep(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert keep(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n")


@pytest.mark.parametrize(("raw", "why"), [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", "Transfer"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: x\r\n\r\nab", "Transfer"),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end", "no Content-Length"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "interim"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na", "more than one"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1 2\r\n\r\n", "bad Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\na", "no Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n 2\r\n\r\n12", "obs-fold"),
    (b"HTTP/1.1 200 OK\r\nConnection: x\r\n\tclose\r\nContent-Length: 0\r\n\r\n", "obs-fold"),
    (b"HTTP/1.1 200 OK\r\nX: a\nContent-Length: 0\r\n\r\n", "bare LF"),
    (b"HTTP/1.1 200 OK\r\nX: a\rContent-Length: 0\r\n\r\n", "no Content-Length"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\n", "bare LF"),
    (b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "bare LF"),
    (b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n", "status line"),
    (b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", "status code"),
    (b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", "status code"),
])
def test_refuses_what_it_cannot_delimit_exactly(raw: bytes, why: str) -> None:
    with pytest.raises(NotFramed, match=why):
        frame_answer(raw, 0, False)


def test_a_header_value_cannot_fake_a_content_length() -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-Note: content-length: 99\r\nContent-Length: 2\r\n\r\nok"
    framed = frame_answer(b"junk" + raw, 4, False)
    assert framed is not None and framed.end == 4 + len(raw)


def test_header_fields_are_lower_cased_and_stripped() -> None:
    raw = answer(200, b"{}", "X-Thing:  v ")
    framed = frame_answer(raw, 0, False)
    assert framed is not None
    fields = header_fields(raw, 0, framed.body_start)
    assert (b"content-length", b"2") in fields and (b"x-thing", b"v") in fields


def test_a_known_head_frames_the_same_and_a_refused_one_stays_refused() -> None:
    raw = answer(200, b"abc")
    first, again = frame_answer(raw, 0, False), frame_answer(b"xx" + raw, 2, False)
    assert first is not None and again is not None
    assert (again.end - 2, again.body_start - 2, again.status) == (first.end, first.body_start, 200)
    head_only = frame_answer(raw, 0, True)  # the same head answering a HEAD: no body
    assert head_only is not None and head_only.end == head_only.body_start
    bad = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    for _ in range(2):
        with pytest.raises(NotFramed, match="more than one"):
            frame_answer(bad, 0, False)
    no_length = b"HTTP/1.1 200 OK\r\nX: y\r\n\r\n"
    assert frame_answer(no_length, 0, True) is not None  # a HEAD's answer needs none
    with pytest.raises(NotFramed, match="no Content-Length"):
        frame_answer(no_length, 0, False)
