"""core.headers: what crosses the agent to the metadata API, and what never does."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from openimds.core.headers import is_dropped, redact, rewrite_request_headers

OURS = {b"x-forwarded-for", b"x-instance-id", b"x-tenant-id", b"x-instance-id-signature"}


def rewrite(headers: list[tuple[bytes, bytes]], **kw: object) -> list[tuple[bytes, bytes]]:
    args: dict[str, object] = dict(forwarded_for="10.0.0.5", instance_id="i-1",
                                   tenant_id="t-1", signature="ab" * 32)
    args.update(kw)
    return rewrite_request_headers(headers, **args)  # type: ignore[arg-type]


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [n.lower() for n, _ in headers]


def test_adds_the_four_headers_once() -> None:
    out = rewrite([(b"host", b"169.254.169.254"), (b"user-agent", b"cloud-init")])
    d = {n.lower(): v for n, v in out}
    assert d[b"x-forwarded-for"] == b"10.0.0.5"
    assert d[b"x-instance-id"] == b"i-1"
    assert d[b"x-tenant-id"] == b"t-1"
    assert d[b"x-instance-id-signature"] == b"ab" * 32
    assert d[b"user-agent"] == b"cloud-init"
    assert names(out).count(b"host") == 1
    assert b"content-length" not in d


def test_drops_spoofed_identity_headers() -> None:
    spoof = [
        (b"x-forwarded-for", b"6.6.6.6"), (b"x-forwarded-host", b"evil"),
        (b"x-forwarded-proto", b"https"), (b"forwarded", b"for=6.6.6.6"),
        (b"x-instance-id", b"victim"), (b"x-instance-id-signature", b"00"),
        (b"x-tenant-id", b"victim-project"), (b"x-project-id", b"victim-project"),
        (b"x-neutron-router-id", b"r"), (b"x-neutron-network-id", b"n"),
        (b"x-ovn-network-id", b"n"), (b"x-metadata-provider", b"p"),
        (b"x-metadata-provider-signature", b"s"),
    ]
    out = rewrite(spoof)
    for name in OURS:
        assert names(out).count(name) == 1
    joined = b"".join(v for _, v in out)
    for bad in (b"6.6.6.6", b"victim", b"evil", b"https"):
        assert bad not in joined
    assert not {b"x-neutron-router-id", b"x-metadata-provider", b"forwarded"} & set(names(out))


def test_underscore_spellings_are_dropped() -> None:
    out = rewrite([(b"x_instance_id", b"victim"), (b"x_tenant_id", b"victim"),
                   (b"x_neutron_router_id", b"r"), (b"x-instance_id-signature", b"0"),
                   (b"x_forwarded_for", b"6.6.6.6"), (b"accept", b"*/*")])
    assert b"victim" not in b"".join(v for _, v in out)
    assert b"6.6.6.6" not in b"".join(v for _, v in out)
    assert (b"accept", b"*/*") in out


def test_drops_hop_by_hop_and_connection_named() -> None:
    out = rewrite([(b"connection", b"keep-alive, x-secret-hop"), (b"keep-alive", b"300"),
                   (b"x-secret-hop", b"1"), (b"te", b"trailers"), (b"upgrade", b"h2c"),
                   (b"transfer-encoding", b"chunked"), (b"content-length", b"999"),
                   (b"accept", b"*/*")])
    assert names(out)[:1] == [b"accept"]
    assert not {b"connection", b"keep-alive", b"x-secret-hop", b"te", b"upgrade",
                b"transfer-encoding", b"content-length"} & set(names(out))


def test_content_length_from_body() -> None:
    out = rewrite([(b"content-length", b"999")], method=b"POST", body_length=12)
    assert (b"content-length", b"12") in out
    assert names(out).count(b"content-length") == 1
    out = rewrite([], method=b"POST", body_length=0)
    assert (b"content-length", b"0") in out


def test_host_added_when_missing_and_duplicate_dropped() -> None:
    assert (b"host", b"169.254.169.254") in rewrite([])
    out = rewrite([(b"host", b"a"), (b"host", b"b")])
    assert [v for n, v in out if n == b"host"] == [b"a"]


def test_imds_token_headers_pass() -> None:
    out = rewrite([(b"x-aws-ec2-metadata-token", b"tok"),
                   (b"x-aws-ec2-metadata-token-ttl-seconds", b"60")])
    assert (b"x-aws-ec2-metadata-token", b"tok") in out


def test_redact_hides_signature_and_tokens() -> None:
    shown = dict(redact([(b"x-instance-id-signature", b"secretsig"), (b"authorization", b"x"),
                         (b"X-AWS-EC2-Metadata-Token", b"tok"), (b"accept", b"a\r\nb")]))
    assert shown["x-instance-id-signature"] == "***"
    assert shown["authorization"] == "***"
    assert shown["X-AWS-EC2-Metadata-Token"] == "***"
    assert shown["accept"] == "a??b"


_name = st.one_of(
    st.sampled_from([b"x-forwarded-for", b"x-instance-id", b"x-instance-id-signature",
                     b"x-tenant-id", b"x-neutron-router-id", b"x-neutron-network-id",
                     b"connection", b"host", b"content-length", b"transfer-encoding"]),
    st.binary(min_size=1, max_size=30).map(lambda b: b.lower()),
)


@settings(max_examples=500)
@given(st.lists(st.tuples(_name, st.binary(max_size=40)), max_size=12),
       st.integers(min_value=0, max_value=10**9))
def test_hostile_headers_never_cross(headers: list[tuple[bytes, bytes]], length: int) -> None:
    out = rewrite(headers, body_length=length)
    ns = names(out)
    for name in OURS:
        assert ns.count(name) == 1
    assert ns.count(b"host") == 1
    assert ns.count(b"content-length") == (1 if length else 0)
    assert b"transfer-encoding" not in ns and b"connection" not in ns
    assert not any(n.startswith(b"x-neutron-") for n in ns)
    d = {n.lower(): v for n, v in out}
    assert d[b"x-instance-id"] == b"i-1" and d[b"x-tenant-id"] == b"t-1"
    # every header kept came from the input unchanged or is one of ours
    for n, v in out:
        assert (n, v) in headers or n.lower() in OURS | {b"host", b"content-length"}
        assert not is_dropped(n.lower()) or n.lower() in OURS | {b"content-length"}


def test_verdict_memo_stays_bounded() -> None:
    from openimds.core import headers as mod

    for i in range(mod._MAX_VERDICTS + 10):
        assert not is_dropped(f"x-junk-{i}".encode())
    assert len(mod._verdicts) <= mod._MAX_VERDICTS
    assert is_dropped(b"x-neutron-router-id") and is_dropped(b"x_neutron_router_id")


def test_two_connection_headers_and_host_named_in_connection() -> None:
    out = rewrite([(b"connection", b"x-a"), (b"connection", b"x-b, host"), (b"x-a", b"1"),
                   (b"x-b", b"2"), (b"host", b"vm-chosen"), (b"x-c", b"3")])
    assert names(out)[0] == b"x-c"
    assert not {b"x-a", b"x-b", b"connection"} & set(names(out))
    assert [v for n, v in out if n == b"host"] == [b"169.254.169.254"]
