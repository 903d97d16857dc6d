"""metadata.proxy: the agent-bound request made from a template shared by every VM and
listener (`Forwarder.template`, `Route.added_for`) is byte for byte the request encoded
whole for that VM on that listener (`rewrite_headers` + `proxy_headers` +
`encode_request`), on the slow path and on the fast path."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openimds.core.proxy_rules import (
    ListenerSpec,
    guest_request_id,
    proxy_headers,
    rewrite_headers,
)
from openimds.http.client import UpstreamPool
from openimds.http.server import Limits, Request, parse_one
from openimds.metadata.proxy import Forwarder, KeptReads

RID = "5d3c1f0e-8a0b-4c6e-9f1d-2b7a4c9e0f11"
NID = "a1b2c3d4-0000-4000-8000-00000000abcd"
ROUTER = ListenerSpec(f"router-{RID}", f"qrouter-{RID}", "0.0.0.0", 9697, RID, None)
NETWORK = ListenerSpec(f"network-{NID}", f"qdhcp-{NID}", "169.254.169.254", 80, None, NID)
PEERS = ["10.0.0.5", "10.0.0.6", "::ffff:10.0.0.7", "fe80::5%eth0", "2001:db8::5"]
HEAD_RID = b"\r\nX-Openimds-Request-Id: "
REQUESTS = [
    # cloud-init's
    b"GET /openstack/2018-08-27/meta_data.json HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"User-Agent: Cloud-Init/22.4.2\r\nAccept-Encoding: gzip, deflate\r\nAccept: */*\r\n"
    b"Connection: close\r\n\r\n",
    # no Host (the pool adds its own, after the proxy's headers), HTTP/1.0
    b"GET /latest/meta-data/ HTTP/1.0\r\n\r\n",
    b"HEAD /openstack HTTP/1.1\r\nHost: h\r\n\r\n",
    # forged identity and forwarding headers (stripped; the guest-forwarded mark after
    # the proxy's headers), a Connection list naming a header, a guest request ID
    b"GET /openstack/latest/user_data HTTP/1.1\r\nHost: 169.254.169.254\r\n"
    b"X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Neutron-Router-ID: evil\r\n"
    b"X-Instance-ID: victim\r\nX-Openimds-Splice: x\r\nX-Request-Id: req-1234\r\n"
    b"Connection: close, X-Custom\r\nX-Custom: dropped\r\nX-Kept: 1\r\n\r\n",
    b"GET http://169.254.169.254/openstack?x=1 HTTP/1.1\r\nHost: evil\r\n\r\n",
]


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def whole(fwd: Forwarder, req: Request, host: str, spec: ListenerSpec, rid: bytes) -> bytes:
    """The reference: the request encoded whole for `host` on `spec`'s listener."""
    data = fwd.pool.encode_request(req.method, req.target,
                                   rewrite_headers(req.headers, proxy_headers(host, spec)),
                                   req.body)
    cut = data.index(b"\r\n\r\n")
    return data[:cut] + HEAD_RID + rid + data[cut:]


def parsed(data: bytes, loop: asyncio.AbstractEventLoop) -> Request:
    req = parse_one(data, Limits(), loop)
    assert req is not None
    return req


@pytest.mark.parametrize("data", REQUESTS)
def test_slow_path_bytes_are_the_whole_encoding(data: bytes,
                                                loop: asyncio.AbstractEventLoop) -> None:
    fwd = Forwarder(UpstreamPool(unix_path="/nonexistent"), count=False)
    routes = [fwd.route(ROUTER), fwd.route(NETWORK)]
    req = parsed(data, loop)
    for route in routes:
        for host in PEERS:
            head, tail, rid = fwd.encoded_for(route, req, host)
            assert rid == guest_request_id(req.headers)
            assert head + HEAD_RID + b"id-1" + tail == whole(fwd, req, host, route.spec,
                                                             b"id-1")
    assert len(fwd._encoded) == 1  # one template for both listeners and every source


@pytest.mark.parametrize("data", REQUESTS)
def test_fast_path_bytes_are_the_whole_encoding(data: bytes,
                                                loop: asyncio.AbstractEventLoop) -> None:
    """Every source on both listeners: one kept read, and the agent-bound bytes of each
    send are that source's own request (captured from the pool)."""
    sent: list[bytes] = []

    class Pool(UpstreamPool):
        def send_encoded(self, data: bytes, head_only: bool, on_result: object) -> None:
            sent.append(data)

    fwd = Forwarder(Pool(unix_path="/nonexistent"), count=False)
    limits = Limits()

    async def run() -> None:
        for spec in (ROUTER, NETWORK):
            kept = KeptReads(fwd, fwd.route(spec), limits)
            for host in PEERS:
                hit = kept.hit(host, data)
                assert hit is not None
                kept.send(host, hit, lambda _resp: None)
                req = parsed(data, loop)
                rid = guest_request_id(req.headers) or sent[-1].split(HEAD_RID)[1].split(
                    b"\r\n")[0]
                assert sent[-1] == whole(fwd, req, host, spec, rid)

    loop.run_until_complete(run())
    assert list(fwd.first) == [data]
    assert len(sent) == 2 * len(PEERS)


def test_listeners_of_one_forwarder_share_one_limits() -> None:
    """A read is kept under the Limits it was parsed with: a second Limits is refused."""
    fwd = Forwarder(UpstreamPool(unix_path="/nonexistent"), count=False)
    limits = Limits()
    KeptReads(fwd, fwd.route(ROUTER), limits)
    KeptReads(fwd, fwd.route(NETWORK), limits)
    with pytest.raises(ValueError, match="share one Limits"):
        KeptReads(fwd, fwd.route(NETWORK), Limits())


_TOKEN = st.text("abcdefghijklmnopqrstuvwxyz-ABCXYZ0123456789_", min_size=1, max_size=12)
_VALUE = st.text("abc xyz=,;:/0123456789-", max_size=20).map(str.strip)


@settings(max_examples=150, deadline=None)
@given(headers=st.lists(st.tuples(_TOKEN, _VALUE), max_size=8),
       path=st.text("abcdefghij/-_.", max_size=40), peer=st.sampled_from(PEERS),
       network=st.booleans())
def test_any_headers_make_the_whole_encoding(headers: list[tuple[str, str]], path: str,
                                             peer: str, network: bool) -> None:
    data = (f"GET /{path} HTTP/1.1\r\n"
            + "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n").encode()
    loop = asyncio.new_event_loop()
    try:
        req = parse_one(data, Limits(), loop)
    finally:
        loop.close()
    if req is None:  # e.g. a Content-Length or Transfer-Encoding header: not one request
        return
    fwd = Forwarder(UpstreamPool(unix_path="/nonexistent"), count=False)
    route = fwd.route(NETWORK if network else ROUTER)
    head, tail, _ = fwd.encoded_for(route, req, peer)
    assert head + HEAD_RID + b"x" + tail == whole(fwd, req, peer, route.spec, b"x")
