"""IMDSv2 tokens, forwarded-request detection, invalidation, and the signature vector."""

from __future__ import annotations

from openimds.core.metadata import parse_view
from openimds.core.metadata.invalidation import DependencyIndex
from openimds.core.metadata.tokens import (
    EXPIRED,
    MALFORMED,
    OTHER_INSTANCE,
    check_token,
    derive_key,
    forwarded_by_guest,
    mint_token,
    parse_ttl,
)
from openimds.core.signing import sign_instance_id, verify_signature
from tests.unit.test_metadata_documents import IID, NET, PORT, PROJECT, SUBNET, make_view

KEY = b"k" * 32


def test_signature_vector() -> None:
    expected = "773ba44693c7553d6ee20f61ea5d2757a9a4f4a44d2841ae4e95b52e4cd62db4"
    assert sign_instance_id(b"secret", "foo") == expected
    assert verify_signature(b"secret", "foo", expected)
    assert not verify_signature(b"secret", "foo", expected.upper())
    assert not verify_signature(b"secret", "foo", "")
    assert verify_signature(b"", "foo", sign_instance_id(b"", "foo"))


def test_ttl_parsing() -> None:
    assert parse_ttl(b"21600") == 21600
    assert parse_ttl(b"1") == 1
    for bad in (None, b"", b"0", b"21601", b"-5", b"1.5", b"abc", b"9999999999"):
        assert parse_ttl(bad) is None


def test_token_roundtrip_binding_and_expiry() -> None:
    token = mint_token(KEY, IID, 60, 1000.0, b"12345678").encode()
    assert len(token) <= 80
    assert check_token(KEY, IID, token, 1000.0) is None
    assert check_token(KEY, IID, token, 1059.9) is None
    assert check_token(KEY, IID, token, 1060.0) == EXPIRED
    assert check_token(KEY, "other-instance", token, 1000.0) == OTHER_INSTANCE
    assert check_token(b"x" * 32, IID, token, 1000.0) == MALFORMED
    for bad in (b"", b".", b"garbage", token[:-2], token + b"A", b"\xff\xfe", b"a.b.c",
                b"A" * 4000):
        assert check_token(KEY, IID, bad, 1000.0) == MALFORMED
    # a genuine token of another instance that has also expired: "another instance" wins
    assert check_token(KEY, "other-instance", token, 5000.0) == OTHER_INSTANCE


def test_token_survives_a_restart() -> None:
    """Two API processes with the same shared secret but different random fallbacks."""
    one = derive_key(b"shared", b"random-one")
    two = derive_key(b"shared", b"random-two")
    token = mint_token(one, IID, 60, 1000.0, b"abcdefgh").encode()
    assert check_token(two, IID, token, 1001.0) is None


def test_token_key() -> None:
    assert derive_key(b"", b"random") == b"random"
    assert derive_key(b"s", b"random") == derive_key(b"s", b"other")
    assert derive_key(b"s", b"r") != b"s"


def test_forwarded_by_guest() -> None:
    ours = [(b"host", b"169.254.169.254"), (b"x-forwarded-for", b"10.0.0.5")]
    assert not forwarded_by_guest(ours)
    assert forwarded_by_guest([*ours, (b"via", b"1.1 squid")])
    assert forwarded_by_guest([*ours, (b"x-real-ip", b"1.2.3.4")])
    assert forwarded_by_guest([*ours, (b"x-openimds-guest-forwarded", b"1")])
    assert forwarded_by_guest([(b"x-forwarded-for", b"1.2.3.4, 10.0.0.5")])
    assert forwarded_by_guest([*ours, (b"x-forwarded-for", b"1.2.3.4")])


def test_invalidation_index() -> None:
    index = DependencyIndex()
    index.add(parse_view(make_view()))
    assert index.affected({"kind": "instance", "id": IID}) == {IID}
    assert index.affected({"kind": "instance", "id": "x"}) == {"x"}
    assert index.affected({"kind": "keypair", "id": "kp-1", "attrs": {}}) == {IID}
    assert index.affected({"kind": "keypair", "id": "kp-9",
                           "attrs": {"name": "mykey", "project_id": PROJECT}}) == {IID}
    assert index.affected({"kind": "keypair", "id": "kp-9",
                           "attrs": {"name": "mykey", "project_id": "other"}}) == set()
    assert index.affected({"kind": "port", "id": PORT, "attrs": {}}) == {IID}
    assert index.affected({"kind": "port", "id": "p2", "attrs": {
        "device_id": "r1", "device_owner": "network:router_interface",
        "network_id": NET}}) == {"r1", IID}
    assert index.affected({"kind": "port", "id": "p3", "attrs": {
        "device_id": "other-vm", "device_owner": "compute:nova", "network_id": NET}}) == {
        "other-vm"}
    assert index.affected({"kind": "subnet", "id": SUBNET, "attrs": {}}) == {IID}
    assert index.affected({"kind": "network", "id": NET}) == {IID}
    assert index.affected({"kind": "router", "id": "r1"}) == set()
    assert index.affected({"kind": "project", "id": PROJECT}) == set()
    index.remove(IID)
    assert len(index) == 0
    assert index.affected({"kind": "network", "id": NET}) == set()


def _through_agent(vm_headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    from openimds.core.headers import rewrite_request_headers

    out = rewrite_request_headers(vm_headers, forwarded_for="10.0.0.5", instance_id=IID,
                                  tenant_id=PROJECT, signature="00", method=b"PUT")
    return [(name.lower(), value) for name, value in out]


def test_forwarded_detection_after_the_agent_rewrite() -> None:
    ttl = (b"x-aws-ec2-metadata-token-ttl-seconds", b"21600")
    # a direct PUT from the guest
    assert not forwarded_by_guest(_through_agent([(b"host", b"169.254.169.254"), ttl]))
    # squid / nginx in the guest leave Via / X-Real-IP, which the agent passes through
    assert forwarded_by_guest(_through_agent([ttl, (b"via", b"1.1 squid"),
                                              (b"x-forwarded-for", b"192.168.1.5")]))
    assert forwarded_by_guest(_through_agent([ttl, (b"x-real-ip", b"192.168.1.5"),
                                              (b"x-forwarded-for", b"192.168.1.5")]))
    # a proxy that adds only X-Forwarded-For (haproxy `option forwardfor`): our agent drops
    # the guest's X-Forwarded-*, but the namespace proxy marks the request first
    assert not forwarded_by_guest(_through_agent([ttl, (b"x-forwarded-for", b"192.168.1.5")]))
    assert forwarded_by_guest(_through_agent([ttl, (b"x-openimds-guest-forwarded", b"1")]))
