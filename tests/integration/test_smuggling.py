"""A catalogue of named request-smuggling and malformed-request cases, over real loopback
sockets: the lean HTTP server (echo handler) and the namespace proxy's request path in front
of a strict recording upstream (tests/hostile.py).

For each case: what the client gets (statuses, in order; the connection always ends) and what
reached the handler or the upstream (method, target, body length). Nothing the client did not
send as a request of its own ever reaches the upstream, and the upstream never sees framing
it would have to guess at (its own parser flags that as a violation).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from openimds.http.server import Limits
from tests.hostile import ROUTER_ID, TIMEOUT_S, HostileLab, parse_answers

H = b"Host: 169.254.169.254\r\n"


@dataclass(frozen=True)
class Case:
    data: bytes
    statuses: tuple[int, ...]
    reached: tuple[tuple[str, str, int], ...] = ()


CASES: dict[str, Case] = {
    # -- framing: Content-Length / Transfer-Encoding disagreements (CL.CL, CL.TE, TE.CL, TE.TE)
    "cl-cl-different": Case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
                            b"Content-Length: 5\r\n\r\nabcde", (400,)),
    "cl-cl-same": Case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n"
                       b"Content-Length: 3\r\n\r\nabc", (400,)),
    "cl-list": Case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 3, 3\r\n\r\nabc", (400,)),
    "cl-te": Case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 6\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", (400,)),
    "te-cl": Case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                  b"Content-Length: 6\r\n\r\n0\r\n\r\nG", (400,)),
    "te-te-twice": Case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", (400,)),
    "te-obfuscated-value": Case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n"
                                b"\r\n0\r\n\r\n", (400,)),
    "te-not-last": Case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n"
                        b"\r\n0\r\n\r\n", (400,)),
    "te-space-before-colon": Case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding : chunked"
                                  b"\r\n\r\n0\r\n\r\n", (400,)),
    "te-obs-fold": Case(b"POST / HTTP/1.1\r\n" + H + b"X-A: a\r\nTransfer-Encoding:\r\n"
                        b" chunked\r\n\r\n0\r\n\r\n", (400,)),
    "chunk-size-overflow": Case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
                                b"\r\nfffffffffffffffff1\r\nabc\r\n0\r\n\r\n", (400,)),
    "chunked-valid-reframed": Case(b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked"
                                   b"\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
                                   (200,), (("POST", "/", 5),)),
    "chunked-then-pipelined": Case(b"GET /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked"
                                   b"\r\n\r\n0\r\n\r\nGET /b HTTP/1.1\r\n" + H + b"\r\n",
                                   (200, 200), (("GET", "/a", 0), ("GET", "/b", 0))),
    "cl-negative": Case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", (400,)),
    "cl-plus-sign": Case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +3\r\n\r\nabc", (400,)),
    "cl-hex": Case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 0x3\r\n\r\nabc", (400,)),
    "cl-overflow": Case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: "
                        b"99999999999999999999999\r\n\r\n", (400,)),
    "cl-over-limit": Case(b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 10000000\r\n\r\n",
                          (413,)),
    # -- a request hidden in another's body is that request's body, never a second request
    "request-in-body": Case(b"POST /a HTTP/1.1\r\n" + H + b"Content-Length: 32\r\n\r\n"
                            b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n", (200,),
                            (("POST", "/a", 32),)),
    "get-with-body": Case(b"GET /a HTTP/1.1\r\n" + H + b"Content-Length: 28\r\n\r\n"
                          b"GET /smug HTTP/1.1\r\nX: y\r\n\r\n", (200,), (("GET", "/a", 28),)),
    # -- line endings and control bytes
    "bare-lf": Case(b"GET / HTTP/1.1\n" + H.replace(b"\r", b"") + b"\n", (400,)),
    "bare-lf-in-headers": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\nX-B: b\r\n\r\n", (400,)),
    "bare-cr-header-injection": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rX-Neutron-Router-ID:"
                                     b" evil\r\n\r\n", (400,)),
    "obs-fold": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n b\r\n\r\n", (400,)),
    "nul-in-value": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n", (400,)),
    "ctl-in-value": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n", (400,)),
    "del-in-value": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n", (400,)),
    "nul-in-name": Case(b"GET / HTTP/1.1\r\n" + H + b"X\x00A: b\r\n\r\n", (400,)),
    "empty-header-name": Case(b"GET / HTTP/1.1\r\n" + H + b": b\r\n\r\n", (400,)),
    "space-in-target": Case(b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "tab-in-target": Case(b"GET /a\tb HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "non-ascii-target": Case(b"GET /a\xffb HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    # -- methods, versions, targets
    "unknown-method": Case(b"GETT / HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "lower-case-method": Case(b"get / HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "nul-in-method": Case(b"GE\x00T / HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "http-0.9": Case(b"GET /\r\n\r\n", (505,)),
    "http-2.0-line": Case(b"GET / HTTP/2.0\r\n" + H + b"\r\n", (505,)),
    "h2c-upgrade-answered-then-closed": Case(
        b"GET /u HTTP/1.1\r\n" + H + b"Connection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (200,), (("GET", "/u", 0),)),
    "connect-authority-form": Case(b"CONNECT evil.example:80 HTTP/1.1\r\n" + H + b"\r\n",
                                   (400,)),
    "authority-form-with-get": Case(b"GET evil.example:80 HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "absolute-form-becomes-origin-form": Case(
        b"GET http://169.254.169.254/latest/meta-data/?x=1 HTTP/1.1\r\n" + H + b"\r\n",
        (200,), (("GET", "/latest/meta-data/?x=1", 0),)),
    "absolute-form-userinfo": Case(b"GET http://user@evil/ HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "asterisk-form-options": Case(b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", (200,),
                                  (("OPTIONS", "*", 0),)),
    "asterisk-form-get": Case(b"GET * HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    "dot-dot-path-passed-verbatim": Case(b"GET /latest/../../etc/passwd HTTP/1.1\r\n" + H
                                         + b"\r\n", (200,),
                                         (("GET", "/latest/../../etc/passwd", 0),)),
    "percent-00-path": Case(b"GET /latest/%00/x HTTP/1.1\r\n" + H + b"\r\n", (200,),
                            (("GET", "/latest/%00/x", 0),)),
    "very-long-target": Case(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n" + H + b"\r\n", (414,)),
    "very-long-header": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: " + b"a" * 20000 + b"\r\n\r\n",
                             (431,)),
    "too-many-headers": Case(b"GET / HTTP/1.1\r\n" + H + b"X-A: a\r\n" * 150 + b"\r\n", (431,)),
    # -- pipelining and connection ends (each fixed here: see test names in the module doc)
    "pipelined-garbage-after-valid": Case(b"GET /a HTTP/1.1\r\n" + H + b"\r\nGARBAGE\r\n\r\n",
                                          (200, 400), (("GET", "/a", 0),)),
    "pipelined-after-connection-close": Case(
        b"GET /a HTTP/1.1\r\n" + H + b"Connection: close\r\n\r\nGET /b HTTP/1.1\r\n" + H
        + b"\r\n", (200,), (("GET", "/a", 0),)),
    "pipelined-after-http-1.0": Case(b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n", (200,),
                                     (("GET", "/a", 0),)),
    "head-then-pipelined-get": Case(b"HEAD /h HTTP/1.1\r\n" + H + b"\r\nGET /g HTTP/1.1\r\n"
                                    + H + b"\r\n", (200, 200),
                                    (("HEAD", "/h", 0), ("GET", "/g", 0))),
    "three-pipelined": Case((b"GET /p HTTP/1.1\r\n" + H + b"\r\n") * 3, (200, 200, 200),
                            (("GET", "/p", 0),) * 3),
    "expect-100-with-body": Case(b"POST /e HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\n"
                                 b"Content-Length: 3\r\n\r\nabc", (100, 200),
                                 (("POST", "/e", 3),)),
    "expect-100-twice-one-interim": Case(b"POST /e HTTP/1.1\r\n" + H + b"Expect: 100-continue"
                                         b"\r\nExpect: 100-continue\r\nContent-Length: 1\r\n"
                                         b"\r\na", (100, 200), (("POST", "/e", 1),)),
    "expect-100-behind-a-pipelined-request": Case(
        b"GET /a HTTP/1.1\r\n" + H + b"\r\nPOST /e HTTP/1.1\r\n" + H
        + b"Expect: 100-continue\r\nContent-Length: 1\r\n\r\na", (200, 200),
        (("GET", "/a", 0), ("POST", "/e", 1))),
    "trailer-fields-dropped": Case(b"POST /t HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked"
                                   b"\r\n\r\n1\r\na\r\n0\r\nX-Neutron-Router-ID: evil\r\n"
                                   b"X-Forwarded-For: 6.6.6.6\r\n\r\n", (200,),
                                   (("POST", "/t", 1),)),
}


@pytest.fixture(scope="module")
def lab() -> Iterator[HostileLab]:
    with HostileLab() as lab:
        yield lab
        assert lab.loop_errors == []


def _settle(lab: HostileLab) -> None:
    # The upstream records in its own threads; let a late request show up before counting.
    time.sleep(0.02)


@pytest.mark.parametrize("name", sorted(CASES))
def test_lean_server(lab: HostileLab, name: str) -> None:
    case = CASES[name]
    lab.reset()
    out, closed, _ = lab.send(lab.lean_port, case.data)
    assert closed, "the server held the connection past its timeout"
    answers = parse_answers(out, heads=True)
    assert tuple(s for s, _, _ in answers) == case.statuses, answers
    for status, _, body in answers:
        if status >= 400:
            assert body.endswith(b"\n") and body.count(b"\n") == 1, body
    got = tuple((r.method, r.target, len(r.body)) for r in lab.lean_requests)
    assert got == case.reached
    for r in lab.lean_requests:  # trailer fields never join the headers
        assert r.header(b"x-neutron-router-id") is None


@pytest.mark.parametrize("name", sorted(CASES))
def test_proxy(lab: HostileLab, name: str) -> None:
    case = CASES[name]
    lab.reset()
    out, closed, _ = lab.send(lab.proxy_port, case.data)
    assert closed, "the proxy held the connection past its timeout"
    _settle(lab)
    answers = parse_answers(out, heads=True)
    assert tuple(s for s, _, _ in answers) == case.statuses, answers
    up = lab.upstream
    assert up.violations == []
    # Pipelined GET/HEAD are relayed concurrently (on as many pooled connections, each served
    # by its own thread here): what reached the upstream, not in which order it was recorded.
    assert sorted((r.method, r.target, len(r.body)) for r in up.requests) == sorted(case.reached)
    for r in up.requests:  # exactly the proxy's identity, whatever the VM sent
        assert [v for k, v in r.headers if k == b"x-neutron-router-id"] == [ROUTER_ID.encode()]
        assert [v for k, v in r.headers if k == b"x-forwarded-for"] == [b"127.0.0.1"]


def test_absolute_form_sets_host_from_the_target(lab: HostileLab) -> None:
    lab.reset()
    out, _, _ = lab.send(lab.proxy_port, b"GET http://169.254.169.254:80/x HTTP/1.1\r\n"
                         b"Host: evil\r\n\r\n")
    _settle(lab)
    assert [s for s, _, _ in parse_answers(out)] == [200]
    hosts = [v for k, v in lab.upstream.requests[0].headers if k == b"host"]
    assert hosts == [b"169.254.169.254:80"]


def test_half_closed_client_still_gets_the_proxied_answer(lab: HostileLab) -> None:
    # Regression: the proxy dropped the pending answer when the client shut its write side.
    lab.reset()
    out, closed, _ = lab.send(lab.proxy_port, b"GET /hc HTTP/1.1\r\n" + H + b"\r\n",
                              half_close=True)
    assert closed and [s for s, _, _ in parse_answers(out)] == [200]


# -- slowloris and friends: every stalled connection ends within the timeout ---------------

def _timed(lab: HostileLab, port: int, trickle: list[bytes], gap_s: float) -> tuple[bytes, float]:
    t0 = time.monotonic()
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S + 3) as sock:
        try:
            for piece in trickle:
                sock.sendall(piece)
                time.sleep(gap_s)
        except OSError:
            pass
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    return out, time.monotonic() - t0


@pytest.mark.parametrize("which", ["lean", "proxy"])
def test_header_trickle_is_408_at_the_request_timeout(lab: HostileLab, which: str) -> None:
    port = lab.lean_port if which == "lean" else lab.proxy_port
    head = b"GET / HTTP/1.1\r\n" + H + b"X-Slow: " + b"a" * 40
    out, secs = _timed(lab, port, [bytes([b]) for b in head], 0.05)
    assert [s for s, _, _ in parse_answers(out)] == [408]
    assert TIMEOUT_S * 0.9 <= secs < TIMEOUT_S + 1.5


@pytest.mark.parametrize("which", ["lean", "proxy"])
def test_body_shorter_than_content_length_is_408(lab: HostileLab, which: str) -> None:
    port = lab.lean_port if which == "lean" else lab.proxy_port
    lab.reset()
    out, secs = _timed(lab, port, [b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 10\r\n\r\nab"],
                       0)
    assert [s for s, _, _ in parse_answers(out)] == [408]
    assert secs < TIMEOUT_S + 1.5
    assert lab.upstream.requests == []


@pytest.mark.parametrize("which", ["lean", "proxy"])
def test_silent_and_idle_connections_close_without_an_answer(
    lab: HostileLab, which: str,
) -> None:
    port = lab.lean_port if which == "lean" else lab.proxy_port
    counts = lab.limits.timeouts
    assert counts is not None

    def ended() -> tuple[int, int, int]:
        return counts.silent, counts.idle, counts.request

    s0, i0, r0 = ended()  # the lab is the module's: earlier tests' counts are in there
    out, secs = _timed(lab, port, [], 0)  # never sends a byte
    assert out == b"" and secs < TIMEOUT_S + 1.5
    # counted before the close the client saw: `silent`, the kind to alert on
    assert ended() == (s0 + 1, i0, r0)
    out, secs = _timed(lab, port, [b"GET / HTTP/1.1\r\n" + H + b"\r\n"], 0)  # then idles
    assert [s for s, _, _ in parse_answers(out)] == [200]
    assert secs < 2 * TIMEOUT_S + 1.5
    # answered, then quiet: the routine keep-alive expiry
    assert ended() == (s0 + 1, i0 + 1, r0)


# -- per-source connection cap -------------------------------------------------------------

def test_connections_over_the_per_source_cap_get_429_and_close() -> None:
    limits = Limits(request_timeout_s=5.0, keepalive_timeout_s=5.0)
    with HostileLab(limits, max_connections_per_source=3) as lab:
        held = [socket.create_connection(("127.0.0.1", lab.proxy_port)) for _ in range(3)]
        try:
            time.sleep(0.1)
            t0 = time.monotonic()
            out, closed, _ = lab.send(lab.proxy_port, b"GET /over HTTP/1.1\r\n" + H + b"\r\n",
                                      half_close=False, deadline_s=4.0)
            answers = parse_answers(out)
            assert closed and [s for s, _, _ in answers] == [429]
            assert answers[0][1][b"retry-after"] == b"1"
            assert answers[0][1][b"connection"] == b"close"
            assert b"at most 3" in answers[0][2]
            # A silent connection over the cap is closed quickly, not at the request timeout.
            out, closed, secs = lab.send(lab.proxy_port, b"", half_close=False, deadline_s=4.0)
            assert closed and out == b"" and secs < 3.0
            assert time.monotonic() - t0 < 4.0
            # The held connections still work, and when one goes a new one gets in.
            held[0].sendall(b"GET /held HTTP/1.1\r\n" + H + b"\r\n")
            assert b" 200 " in held[0].recv(65536)
            held.pop(0).close()
            time.sleep(0.1)
            out, _, _ = lab.send(lab.proxy_port, b"GET /after HTTP/1.1\r\n" + H + b"\r\n")
            assert [s for s, _, _ in parse_answers(out)] == [200]
            time.sleep(0.05)
            assert [r.target for r in lab.upstream.requests] == ["/held", "/after"]
            assert lab.listener.cap is not None and lab.listener.cap.rejected == 2
        finally:
            for sock in held:
                sock.close()
