"""Known heads (`Limits.known_heads`), over real sockets: a request made from a kept head is
the request httptools makes of the same bytes, byte streams that are hostile or unusual are
answered exactly as by a server that parses everything, and a head is only reused where its
bytes (less the request ID's value) are the same."""

from __future__ import annotations

import asyncio

import pytest

from openimds.http import server as server_mod
from openimds.http.server import Limits, Request, Response, bind_tcp, serve

RID = b"X-Openimds-Request-Id"


def _describe(req: Request) -> bytes:
    return repr((req.method, req.target, req.path, req.query, req.headers, req.body,
                 req.version, req.keep_alive)).encode()


class _Recorder:
    """Answers every request with what the server made of it; keeps the requests."""

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def __call__(self, req: Request) -> Response:
        self.requests.append(req)
        return Response(200, _describe(req))


async def _exchange(port: int, chunks: list[bytes]) -> bytes:
    """Send `chunks` (one write each, a moment apart) and read until the server closes (a
    server that refused the stream may close before the last chunk: what it sent counts)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = b""
    try:
        for chunk in chunks:
            try:
                writer.write(chunk)
                await writer.drain()
            except ConnectionError:
                break
            await asyncio.sleep(0.02)
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), 10)
            except ConnectionError:
                break
            if not data:
                break
            got += data
        return got
    finally:
        writer.close()


class _Server:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.recorder = _Recorder()

    async def __aenter__(self) -> _Server:
        sock = bind_tcp("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.server = await serve(self.recorder, sock, self.limits)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()


@pytest.fixture(autouse=True)
def _fresh_memo(monkeypatch) -> None:
    monkeypatch.setattr(server_mod, "_tables", {})
    monkeypatch.setattr(server_mod, "_search", server_mod._Credit(server_mod._PROBE))


def _get(path: str, rid: bytes | None, extra: bytes = b"", *, last: bool = False) -> bytes:
    head = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.5\r\n"
    if rid is not None:
        head += RID + b": " + rid + b"\r\n"
    return head + extra + (b"Connection: close\r\n" if last else b"") + b"\r\n"


END = b"GET /end HTTP/1.1\r\nConnection: close\r\n\r\n"


async def test_a_known_head_makes_the_parsed_request_with_its_own_request_id() -> None:
    async with _Server(Limits(known_heads=True)) as on, _Server(Limits()) as off:
        stream = [_get("/a", b"id-0") + _get("/a", b"id-1") + _get("/a", b"id-2")
                  + _get("/a", b"other.3:x_y"), _get("/a", b"id-4"), END]
        got = await _exchange(on.port, stream)
        assert got == await _exchange(off.port, stream)
        reqs = on.recorder.requests[1:]
        assert [r.request_id for r in reqs] == [None, b"id-2", b"other.3:x_y", b"id-4", None]
        # the first two were parsed: the first seen, the second kept
        assert on.recorder.requests[0].shape is reqs[0].shape is None
        assert reqs[1].shape is not None
        assert reqs[1].shape is reqs[2].shape is reqs[3].shape  # one key object, kept
        assert b"id-2" not in reqs[1].shape
        assert (RID.lower(), b"id-4") in reqs[3].headers
        assert reqs[3].headers is not reqs[2].headers  # each request its own list
        reqs[2].headers.append((b"x-mutated", b"1"))  # a handler's change stays its own
        again = await _exchange(on.port, [_get("/a", b"id-5"), END])
        assert b"x-mutated" not in again
        assert on.recorder.requests[-2].request_id == b"id-5"
        # Without an ID: the head is kept whole; a different path is another head.
        stream = [_get("/b", None) * 3 + _get("/c", b"id-6") * 2, END]
        assert await _exchange(on.port, stream) == await _exchange(off.port, stream)
        assert [r.shape is not None for r in on.recorder.requests[-6:]] == [
            False, False, True, False, False, False]


async def test_a_head_is_kept_the_second_time_it_comes() -> None:
    # Most heads of a boot storm come once: keeping those would cost more than it saves.
    async with _Server(Limits(known_heads=True)) as on:
        await _exchange(on.port, [b"".join(_get(f"/once/{i}", b"id") for i in range(50)), END])
        table = server_mod._tables[()]
        assert table.known == {} and len(table.seen) == 51
        await _exchange(on.port, [_get("/once/7", b"id-a") + _get("/once/7", b"id-b"), END])
        assert [r.shape is not None for r in on.recorder.requests[-3:]] == [False, True, False]
        assert len(table.known) == 1 and len(table.seen) == 50  # END: never kept


async def test_while_searched_reads_find_no_kept_head_most_reads_are_not_searched(
    monkeypatch,
) -> None:
    monkeypatch.setattr(server_mod, "_search", server_mod._Credit(4, most=3))
    k = [_get("/k", b"k%d" % i) for i in range(8)]
    stream = k[:2] + [_get(f"/new/{i}", b"n") for i in range(5)] + k[2:] + [END]
    async with _Server(Limits(known_heads=True)) as on, _Server(Limits()) as off:
        got = await _exchange(on.port, stream)  # one read each (a write each, 20 ms apart)
        assert got == await _exchange(off.port, stream)
    kept = [r.shape is not None for r in on.recorder.requests if r.path == "/k"]
    # Reads 1-3 (/k seen, /k kept, a new head) find nothing kept: the credit runs out. Reads
    # 4-6 and 8-10 go straight to the parser, 7 and 11 are probes; 11 finds /k kept, and
    # from there every read is searched while they find it.
    assert kept == [False, False, False, False, False, True, True, True]
    assert server_mod._search.credit == 2  # 11-13 found it (up to the cap of 3), END did not


# Each stream is sent to a server with known heads three times (a head is kept the second
# time it comes) and once to a server without: every answer must be the same bytes.
STREAMS = {
    **{f"an ID {value!r} after a known head": [_get("/a", b"ok-1") + _get("/a", value), END]
       for value in (b"a b", b"a\tb", b"ab ", b"ab\t", b" ab", b"a\rb", b"a\nb", b"", b"x" * 200,
                     b"a\x00b", b"a\x7fb", b"\xff", b"a,b", b"a;b", b"a\r\n b")},
    "no space after the colon": [(b"GET /a HTTP/1.1\r\n" + RID + b":id-1\r\n\r\n") * 2, END],
    "two spaces after the colon": [(b"GET /a HTTP/1.1\r\n" + RID + b":  id-1\r\n\r\n") * 2,
                                   END],
    "two IDs, the first lower-case": [
        (b"GET /a HTTP/1.1\r\nx-openimds-request-id: one\r\n" + RID + b": two\r\n\r\n"),
        (b"GET /a HTTP/1.1\r\nx-openimds-request-id: uno\r\n" + RID + b": dos\r\n\r\n"),
        END],
    "two IDs, the first without a space": [
        (b"GET /a HTTP/1.1\r\nx-openimds-request-id:one\r\n" + RID + b": two\r\n\r\n"),
        (b"GET /a HTTP/1.1\r\nx-openimds-request-id:one\r\n" + RID + b": dos\r\n\r\n"),
        END],
    # A head is cut at its one ID line as the hops spell it: two of them, or the name in
    # another case, are parsed every time.
    "two IDs, both as the hops spell them": [
        (b"GET /a HTTP/1.1\r\n" + RID + b": one\r\n" + RID + b": one\r\n\r\n"),
        (b"GET /a HTTP/1.1\r\n" + RID + b": one\r\n" + RID + b": two\r\n\r\n"),
        (b"GET /a HTTP/1.1\r\n" + RID + b": uno\r\n" + RID + b": two\r\n\r\n"), END],
    "the ID's name in lower case": [
        b"GET /a HTTP/1.1\r\nx-openimds-request-id: i1\r\n\r\n"
        b"GET /a HTTP/1.1\r\nx-openimds-request-id: i2\r\n\r\n", END],
    "bare LF line ends": [b"GET /a HTTP/1.1\nHost: h\n" + RID + b": i1\n\n"
                          b"GET /a HTTP/1.1\nHost: h\n" + RID + b": i2\n\n", END],
    "a body": [_get("/a", b"i", b"Content-Length: 3\r\n") + b"abc" + _get("/a", b"j"), END],
    "a POST": [(b"POST /a HTTP/1.1\r\n" + RID + b": p\r\nContent-Length: 0\r\n\r\n") * 2, END],
    "a body without a length": [(b"POST /a HTTP/1.1\r\n" + RID + b": p\r\n\r\n") * 2, END],
    "chunked": [(b"GET /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
                * 2, END],
    "expect": [(b"GET /a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n") * 2, END],
    "an upgrade": [(b"GET /a HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
                   * 2],
    "a HEAD": [_get("/h", b"1").replace(b"GET", b"HEAD", 1) * 2, END],
    "Connection: close, then more": [_get("/a", b"i", last=True) + _get("/a", b"j")],
    "HTTP/1.0": [(b"GET /a HTTP/1.0\r\n" + RID + b": i\r\n\r\n")],
    "HTTP/1.0 keep-alive": [(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n" + RID
                             + b": i\r\n\r\n") * 2, END],
    "absolute form": [(b"GET http://x/a HTTP/1.1\r\n" + RID + b": i\r\n\r\n") * 2, END],
    "garbage after a known head": [_get("/a", b"i") + b"\x00\x01garbage\r\n\r\n"],
    "a head split across reads": [_get("/a", b"i1")[:20], _get("/a", b"i1")[20:]
                                  + _get("/a", b"i2")[:30], _get("/a", b"i2")[30:], END],
    "stray CRLF between requests": [_get("/a", b"i1") + b"\r\n" + _get("/a", b"i2"), END],
    "obs-fold": [(b"GET /a HTTP/1.1\r\nX-A: 1\r\n  2\r\n" + RID + b": i\r\n\r\n") * 2, END],
    "an HTTP/2 preface": [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"],
}


@pytest.mark.parametrize("name", sorted(STREAMS))
async def test_unusual_bytes_are_answered_as_if_every_head_were_parsed(name: str) -> None:
    stream = STREAMS[name]
    async with _Server(Limits(known_heads=True)) as on, _Server(Limits()) as off:
        expected = await _exchange(off.port, stream)
        assert expected  # the stream gets an answer at all
        for _ in range(2):  # the heads seen, then kept where they can be
            assert await _exchange(on.port, stream) == expected
        assert await _exchange(on.port, stream) == expected  # uses what it kept


async def test_a_head_kept_under_larger_limits_is_still_refused_by_smaller_ones() -> None:
    # The memo is per process; each server's limits are checked on every reuse.
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(8))
    head = _get("/a", b"id-1", many)
    async with _Server(Limits(known_heads=True)) as big:
        await _exchange(big.port, [head * 3, END])
        assert big.recorder.requests[2].shape is not None
    for small, status in ((Limits(known_heads=True, max_headers=5), b"431"),
                          (Limits(known_heads=True, max_header_bytes=100), b"431")):
        async with _Server(small) as srv, _Server(Limits(max_headers=small.max_headers,
                                               max_header_bytes=small.max_header_bytes)) as off:
            stream = [_get("/a", b"id-22", many), END]
            got = await _exchange(srv.port, stream)
            assert got == await _exchange(off.port, stream)
            assert got.startswith(b"HTTP/1.1 " + status)


async def test_requests_made_from_kept_heads_are_pipelined_and_bounded_as_parsed_ones(
) -> None:
    # More known heads in one read than MAX_PIPELINE: reading pauses as for parsed ones, and
    # every request is answered in order.
    count = server_mod.MAX_PIPELINE * 2 + 3
    async with _Server(Limits(known_heads=True)) as on:
        await _exchange(on.port, [_get("/p", b"learn") * 2, END])
        stream = [b"".join(_get("/p", b"n%d" % i) for i in range(count)), END]
        got = await _exchange(on.port, stream)
        assert got.count(b"HTTP/1.1 200 OK") == count + 1
        ids = [r.request_id for r in on.recorder.requests[3:]]
        assert ids == [b"n%d" % i for i in range(count)] + [None]


# -- identity lines (`Limits.identity_lines`): one kept head per shape, whatever the caller --
LINES = (b"X-Forwarded-For", b"X-Neutron-Router-ID", b"X-Neutron-Network-ID")
NAMES = frozenset(name.lower() for name in LINES)


def _vm(path: bytes, ip: bytes | None, router: bytes | None = None,
        network: bytes | None = None, rid: bytes | None = b"id", extra: bytes = b"") -> bytes:
    """A request as the proxy sends it to the agent: the caller's lines, then its ID."""
    head = b"GET " + path + b" HTTP/1.1\r\nHost: 169.254.169.254\r\nAccept: */*\r\n"
    if ip is not None:
        head += b"X-Forwarded-For: " + ip + b"\r\n"
    if router is not None:
        head += b"X-Neutron-Router-ID: " + router + b"\r\n"
    if network is not None:
        head += b"X-Neutron-Network-ID: " + network + b"\r\n"
    if rid is not None:
        head += RID + b": " + rid + b"\r\n"
    return head + extra + b"\r\n"


def _check_identity(reqs: list[Request]) -> None:
    """What a known head hands over: every header of the identity names, in order, and a
    key that holds none of their values."""
    for r in reqs:
        if r.shape is None:
            assert r.identity is None
            continue
        assert r.identity == tuple(h for h in r.headers if h[0] in NAMES)
        for _, value in r.identity:
            assert b": " + value + b"\r\n" not in r.shape


async def test_callers_asking_one_shape_share_one_kept_head_each_with_its_own_identity(
) -> None:
    callers = ([(b"10.0.%d.%d" % (i // 10, 10 + i % 10), b"router-%d" % (i % 3), None)
                for i in range(40)]
               + [(b"fd00::%x" % i, None, b"net-%d" % i) for i in range(10)])
    stream = [b"".join(_vm(b"/a", ip, r, n, rid=b"r%d" % k)
                       for k, (ip, r, n) in enumerate(callers * 3)), END]
    async with (_Server(Limits(known_heads=True, identity_lines=LINES)) as on,
                _Server(Limits()) as off):
        got = await _exchange(on.port, stream)
        assert got == await _exchange(off.port, stream)  # every caller its own headers
        reqs = on.recorder.requests[:-1]
        # Two shapes (router-scoped, network-scoped): each seen once, kept the second time,
        # then every other caller's request is made from it.
        assert len(server_mod._tables[LINES].known) == 2
        assert sum(r.shape is None for r in reqs) == 4
        _check_identity(on.recorder.requests)
        for r, (ip, router, network) in zip(reqs, callers * 3, strict=True):
            if r.shape is not None:
                assert r.identity == tuple(
                    (name, value) for name, value in (
                        (b"x-forwarded-for", ip), (b"x-neutron-router-id", router),
                        (b"x-neutron-network-id", network)) if value is not None)
        assert len({id(r.shape) for r in reqs if r.shape is not None}) == 2


async def test_identity_tables_are_kept_apart() -> None:
    # A key with X-Forwarded-For's value cut is the bytes of a head whose value is empty:
    # a server cutting nothing must never make its requests from the other's kept head.
    empty = _vm(b"/e", b"", b"router-1")
    async with (_Server(Limits(known_heads=True, identity_lines=LINES)) as cut,
                _Server(Limits(known_heads=True)) as whole, _Server(Limits()) as off):
        await _exchange(cut.port, [_vm(b"/e", b"10.0.0.5", b"router-1") * 3, END])
        assert len(server_mod._tables[LINES].known) == 1
        stream = [empty * 3, END]
        assert await _exchange(whole.port, stream) == await _exchange(off.port, stream)
        assert await _exchange(whole.port, stream) == await _exchange(off.port, stream)
        assert whole.recorder.requests[-2].shape is not None  # kept in its own table
        assert whole.recorder.requests[-2].identity is None


ONE = _vm(b"/a", b"10.0.0.5", b"router-1", rid=b"i1")
# Sent (with a plain caller's head of the same path first, so that shape is kept) three times
# to a server cutting the identity lines, and once to one that parses everything.
IDENTITY_STREAMS = {
    "two X-Forwarded-For, as the proxy spells it": [
        _vm(b"/a", b"10.0.0.99", b"router-1", extra=b"X-Forwarded-For: 10.0.0.5\r\n"),
        _vm(b"/a", b"10.0.0.98", b"router-1", extra=b"X-Forwarded-For: 10.0.0.6\r\n")],
    "an X-Forwarded-For in lower case before the proxy's": [
        _vm(b"/a", b"10.0.0.5", b"router-1").replace(
            b"Accept", b"x-forwarded-for: 10.0.0.99\r\nAccept"),
        _vm(b"/a", b"10.0.0.6", b"router-1").replace(
            b"Accept", b"x-forwarded-for: 10.0.0.98\r\nAccept")],
    "an X-Forwarded-For in lower case after the proxy's": [
        _vm(b"/a", b"10.0.0.5", b"router-1", extra=b"x-forwarded-for: 10.0.0.99\r\n"),
        _vm(b"/a", b"10.0.0.6", b"router-1", extra=b"x-forwarded-for: 10.0.0.98\r\n")],
    "only lower-case identity lines": [
        b"GET /a HTTP/1.1\r\nx-forwarded-for: 10.0.0.%d\r\nx-neutron-router-id: r\r\n\r\n" % i
        for i in range(3)],
    "router and network both": [_vm(b"/a", b"10.0.0.%d" % i, b"router-1", b"net-1")
                                for i in range(3)],
    "the router twice": [_vm(b"/a", b"10.0.0.%d" % i, b"router-1",
                             extra=b"X-Neutron-Router-ID: router-%d\r\n" % i)
                         for i in range(3)],
    "no space after the colon": [ONE.replace(b"For: ", b"For:"), ONE.replace(
        b"For: 10.0.0.5", b"For:10.0.0.6")],
    "two spaces after the colon": [ONE.replace(b"For: ", b"For:  "), ONE.replace(
        b"For: 10.0.0.5", b"For:  10.0.0.6")],
    "an empty value": [ONE.replace(b"10.0.0.5", b""), ONE.replace(b"router-1", b"")],
    "a longer name": [ONE.replace(b"X-Forwarded-For", b"X-Forwarded-For-Not"),
                      ONE.replace(b"X-Forwarded-For", b"X-Forwarded-Forx")],
    "the first line": [b"GET /a HTTP/1.1\r\nX-Forwarded-For: 10.0.0.%d\r\n"
                       b"X-Neutron-Router-ID: r\r\n\r\n" % i for i in range(3)],
    **{f"a value {value!r}": [ONE.replace(b"10.0.0.5", value), ONE.replace(b"router-1", value)]
       for value in (b"10.0.0.5, 10.0.0.6", b"10.0.0.5,10.0.0.6", b"a b", b"a\tb", b" a",
                     b"a ", b"a\x00b", b"\xff", b"a;b", b"x" * 200, b"a\rb")},
}


@pytest.mark.parametrize("name", sorted(IDENTITY_STREAMS))
async def test_unusual_identity_lines_are_answered_as_if_every_head_were_parsed(
    name: str,
) -> None:
    heads = IDENTITY_STREAMS[name]
    stream = [ONE, ONE + b"".join(heads) + ONE, END]
    async with (_Server(Limits(known_heads=True, identity_lines=LINES)) as on,
                _Server(Limits()) as off):
        expected = await _exchange(off.port, stream)
        assert expected
        for _ in range(3):
            before = len(on.recorder.requests)
            assert await _exchange(on.port, stream) == expected
        # the plain head is kept: the heads after it in the read were searched
        assert on.recorder.requests[before + 1].shape is not None
        _check_identity(on.recorder.requests)


# -- the exact look first (`_Table.exact`): a caller's own head again, less only its ID --
def _counting_cut(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the shape cuts (`_cut`), which the exact look spares."""
    calls = [0]
    cut = server_mod._cut

    def counted(*args: object) -> object:
        calls[0] += 1
        return cut(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(server_mod, "_cut", counted)
    return calls


async def test_a_callers_head_again_is_made_without_the_shape_cut_with_its_own_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _counting_cut(monkeypatch)
    # Callers of one shape, each apart from the next only in its identity values: an exact
    # key that lost any of them would hand one caller's identity (or ID) to another.
    callers = [(b"10.0.0.5", b"router-1", None), (b"10.0.0.6", b"router-1", None),
               (b"10.0.0.5", b"router-2", None), (b"10.0.0.5", None, b"net-1"),
               (b"10.0.0.5", None, b"net-2"), (b"10.0.0.50", b"router-1", None)]
    warm = [b"".join(_vm(b"/a", ip, r, n, rid=b"w%d" % k)
                     for k, (ip, r, n) in enumerate(callers * 3)), END]
    again = [b"".join(_vm(b"/a", ip, r, n, rid=b"a%d" % k)
                      for k, (ip, r, n) in enumerate(callers * 4)), END]
    async with (_Server(Limits(known_heads=True, identity_lines=LINES)) as on,
                _Server(Limits()) as off):
        assert await _exchange(on.port, warm) == await _exchange(off.port, warm)
        table = server_mod._tables[LINES]
        assert len(table.known) == 2 and len(table.exact) == len(callers)
        calls[0] = 0
        got = await _exchange(on.port, again)
        assert got == await _exchange(off.port, again)  # each its own headers and ID
        assert calls[0] == 1  # END alone: every other head was found by its exact key
        reqs = on.recorder.requests[-len(callers) * 4 - 1:-1]
        _check_identity(reqs)
        for k, (r, (ip, router, network)) in enumerate(zip(reqs, callers * 4, strict=True)):
            assert r.shape is not None and b"10.0.0" not in r.shape
            assert r.request_id == b"a%d" % k
            assert r.identity == tuple(
                (name, value) for name, value in (
                    (b"x-forwarded-for", ip), (b"x-neutron-router-id", router),
                    (b"x-neutron-network-id", network)) if value is not None)
        # the shape object the agent's memo is keyed by, whichever look found the head
        assert len({id(r.shape) for r in reqs}) == 2
        reqs[0].headers.append((b"x-mutated", b"1"))  # a handler's change stays its own
        one = [_vm(b"/a", *callers[0], rid=b"z"), END]
        assert await _exchange(on.port, one) == await _exchange(off.port, one)
        # An entry's header bytes less the ID are its shape's plus the identity values.
        for key, entry in table.exact.items():
            rid = b"z" if RID + b": \r\n" in key else b""
            whole = key.replace(RID + b": \r\n", RID + b": " + rid + b"\r\n")
            got_cut = server_mod._cut(whole, 0, len(whole), table.lines)
            assert got_cut is not None and got_cut[0] is not None
            assert entry.base + len(rid) == entry.known.base + got_cut[2]


async def test_a_callers_exact_heads_share_one_identity_whatever_its_paths() -> None:
    # One caller asking several paths has an exact head per path; their identity (and every
    # request's made from them) is one tuple per caller, not a copy per head. A shape whose
    # identity lines are apart (a header between them) gets its caller's values put back at
    # each of their places.
    def apart(path: bytes, ip: bytes, router: bytes, rid: bytes) -> bytes:
        return (b"GET " + path + b" HTTP/1.1\r\nX-Forwarded-For: " + ip + b"\r\nHost: h\r\n"
                b"X-Neutron-Router-ID: " + router + b"\r\n" + RID + b": " + rid + b"\r\n\r\n")

    callers = [(b"10.0.0.%d" % i, b"router-%d" % i) for i in range(3)]
    heads = [lambda ip, r, k, p=p: _vm(p, ip, r, rid=b"q%d" % k) for p in (b"/a", b"/b")]
    heads.append(lambda ip, r, k: apart(b"/c", ip, r, b"q%d" % k))
    stream = [b"".join(make(ip, r, k) for k in range(4) for ip, r in callers for make in heads),
              END]
    async with (_Server(Limits(known_heads=True, identity_lines=LINES)) as on,
                _Server(Limits()) as off):
        assert await _exchange(on.port, stream) == await _exchange(off.port, stream)
    table = server_mod._tables[LINES]
    assert len(table.known) == 3 and len(table.exact) == len(callers) * len(heads)
    for ip, router in callers:
        mine = [e.identity for k, e in table.exact.items() if b": " + ip + b"\r\n" in k]
        assert len(mine) == len(heads)
        assert mine[0] == ((b"x-forwarded-for", ip), (b"x-neutron-router-id", router))
        assert all(ident is mine[0] for ident in mine)  # one tuple, not one per head
        made = [r for r in on.recorder.requests if r.identity == mine[0]]
        assert len(made) >= 3 * len(heads) and all(r.identity is mine[0] for r in made)
    _check_identity(on.recorder.requests)


async def test_an_exact_key_is_refused_by_smaller_limits_with_its_identity_counted() -> None:
    # Kept under the default limits; a server whose header bytes end inside the identity
    # values must refuse it as the parser would (431), whichever look finds it.
    vm = _vm(b"/a", b"10.0.0.5", b"router-1", rid=b"id-1")
    async with _Server(Limits(known_heads=True, identity_lines=LINES)) as big:
        await _exchange(big.port, [vm * 4, END])
        assert len(server_mod._tables[LINES].exact) == 1
    header_bytes = len(vm) - len(b"GET /a HTTP/1.1\r\n") - 2  # header lines, about
    for limit in range(header_bytes - 40, header_bytes + 1, 4):
        limits = dict(max_header_bytes=limit)
        async with (_Server(Limits(known_heads=True, identity_lines=LINES, **limits)) as srv,
                    _Server(Limits(**limits)) as off):
            stream = [vm.replace(b"id-1", b"id-2"), END]
            assert await _exchange(srv.port, stream) == await _exchange(off.port, stream)


def _exact_of(head: bytes) -> bytes:
    """`head`'s exact key: its bytes less its ID's value."""
    got = server_mod._cut(head, 0, len(head), ())
    assert got is not None
    return got[0]


async def test_an_exact_entry_is_made_the_second_time_its_key_comes_while_fills_pay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # More callers' heads in turn than two generations hold: the young one turns old with
    # no read served by the look since the last turn, and from then on only one fill in
    # _EXACT_PROBE is made, until a turn finds the look served enough reads again.
    monkeypatch.setattr(server_mod, "_EXACT_MAX", 4)  # fills pay at 4 // 4 = 1 read served
    monkeypatch.setattr(server_mod, "_EXACT_PROBE", 3)
    monkeypatch.setattr(server_mod, "_search", server_mod._Credit(1))
    calls = _counting_cut(monkeypatch)
    learn = [_vm(b"/a", b"10.9.0.%d" % i, b"r") for i in range(2)]  # seen, then kept
    c = [[_vm(b"/a", b"10.1.0.%d" % i, b"r", rid=b"c%d-%d" % (i, k)) for k in range(3)]
         for i in range(8)]
    stream = learn + [c[i][k] for i in range(8) for k in range(2)] + [c[0][2], END]
    async with (_Server(Limits(known_heads=True, identity_lines=LINES)) as on,
                _Server(Limits()) as off):
        got = await _exchange(on.port, stream)  # one read each
        assert got == await _exchange(off.port, stream)
    table = server_mod._tables[LINES]
    # Each caller's first head only marks its key; second heads fill c0-c3, and c4's turns
    # the young generation old (no read served: fills stop) before it goes in; of c5-c7
    # only c7's is made (the probe). c0's third is found in the old one, made young.
    assert calls[0] == len(stream) - 1
    assert set(table.exact_old) == {_exact_of(c[i][0]) for i in (1, 2, 3)}
    assert set(table.exact) == {_exact_of(c[i][0]) for i in (4, 7, 0)}
    assert table.exact_credit.credit == 0 and table.exact_hits == 1
    _check_identity(on.recorder.requests)
    found = on.recorder.requests[len(learn) + 16]
    assert found.identity == ((b"x-forwarded-for", b"10.1.0.0"), (b"x-neutron-router-id", b"r"))
    assert found.request_id == b"c0-2"
    assert found.memo is table.exact[_exact_of(c[0][0])]
    # the next turn finds one read served since the last: fills pay again
    entry = table.exact[_exact_of(c[0][0])]
    table.keep_exact(b"fourth", entry)
    table.keep_exact(b"fifth", entry)
    assert table.exact_credit.credit == 1 and table.exact_hits == 0
    assert set(table.exact) == {b"fifth"}


async def test_exact_entries_are_kept_in_two_generations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A full young generation becomes the old one; a key found there comes back young; the
    # old one is dropped whole at the next turn.
    monkeypatch.setattr(server_mod, "_EXACT_MAX", 2)
    calls = _counting_cut(monkeypatch)
    k = [[_vm(b"/a", b"10.2.0.%d" % i, b"r", rid=b"k%d-%d" % (i, n)) for n in range(3)]
         for i in range(4)]
    warm = [_vm(b"/a", b"10.9.0.%d" % i, b"r") for i in range(2)] + [
        k[i][n] for n in range(2) for i in range(3)] + [END]  # k0, k1, k2 filled in turn
    async with (_Server(Limits(known_heads=True, identity_lines=LINES)) as on,
                _Server(Limits()) as off):
        assert await _exchange(on.port, warm) == await _exchange(off.port, warm)
        table = server_mod._tables[LINES]
        assert set(table.exact) == {_exact_of(k[2][0])}
        assert set(table.exact_old) == {_exact_of(k[i][0]) for i in (0, 1)}
        calls[0] = 0
        stream = [k[0][2], k[3][0], k[3][1], k[1][2], END]
        assert await _exchange(on.port, stream) == await _exchange(off.port, stream)
        # k0 found in the old generation, made young (no cut); k3 filled, which turned the
        # young {k2, k0} old and dropped {k1}: k1 is cut again (and filled: seen before)
        assert calls[0] == 4
        assert set(table.exact) == {_exact_of(k[i][0]) for i in (3, 1)}
        assert set(table.exact_old) == {_exact_of(k[i][0]) for i in (2, 0)}
        assert on.recorder.requests[-5].request_id == b"k0-2"
        _check_identity(on.recorder.requests)
