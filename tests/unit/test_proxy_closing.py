"""metadata.proxy: the fast path's closing answer (`_Hit.closing`, which keeps the last
head's rewrite) is byte for byte `closing_answer` of the same answer, whatever heads come
one after another through the same kept request."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from openimds.http.server import Request, closing_answer
from openimds.metadata.proxy import _UNMADE, _Hit

HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n"
        b'ETag: W/"c159fabb"\r\n\r\n')


def _hit() -> _Hit:
    return _Hit(_UNMADE, Request("GET", "/", [], b"", "1.1", True, None))


def test_a_repeated_head_is_rewritten_once_and_the_body_follows() -> None:
    hit = _hit()
    for body in (b'{"seed": "a"}', b'{"seed": "b"}', b""):
        data = HEAD + body
        assert hit.closing(data) == closing_answer(data)
        assert b"\r\nConnection: close\r\n\r\n" in hit.closing(data)
    assert hit.answer_head == HEAD


def test_a_changed_head_is_not_taken_for_the_last() -> None:
    hit = _hit()
    first = HEAD + b"{}"
    assert hit.closing(first) == closing_answer(first)
    # the same bytes as the last head but one, a head that is the last one's prefix, one
    # with a Connection header, one longer, no head end at all
    for data in (HEAD.replace(b"12", b"13") + b"{}",
                 HEAD[:-4] + b"\r\nConnection: keep-alive\r\n\r\n{}",
                 HEAD[:-4] + b"\r\nX-Extra: 1\r\n\r\n{}",
                 b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
                 HEAD[:-2]):
        assert hit.closing(data) == closing_answer(data)
        assert hit.closing(first) == closing_answer(first)


_LINE = st.binary(max_size=12).map(lambda b: b.replace(b"\r\n\r\n", b"\r\n"))


@given(st.lists(st.tuples(st.lists(st.sampled_from([
    b"Content-Length: 2", b"Connection: keep-alive", b"connection: Keep-Alive, x",
    b"ETag: W/\"1\"", b"X-A: \r\nconnection:"]) | _LINE, max_size=4), st.binary(max_size=8)),
    min_size=1, max_size=6))
def test_any_sequence_of_answers_matches_closing_answer(
        answers: list[tuple[list[bytes], bytes]]) -> None:
    hit = _hit()
    for lines, body in answers:
        data = b"\r\n".join([b"HTTP/1.1 200 OK", *lines]) + b"\r\n\r\n" + body
        assert hit.closing(data) == closing_answer(data)
