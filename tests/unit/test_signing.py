from hypothesis import given
from hypothesis import strategies as st

from openimds.core.signing import sign_instance_id, verify_signature

VECTOR = "773ba44693c7553d6ee20f61ea5d2757a9a4f4a44d2841ae4e95b52e4cd62db4"


def test_neutron_test_vector() -> None:
    assert sign_instance_id(b"secret", "foo") == VECTOR
    assert verify_signature(b"secret", "foo", VECTOR)


def test_uppercase_wrong_secret_and_empty_signature_fail() -> None:
    assert not verify_signature(b"secret", "foo", VECTOR.upper())
    assert not verify_signature(b"other", "foo", VECTOR)
    assert not verify_signature(b"secret", "foo", "")


def test_empty_secret_still_signs_and_checks() -> None:
    sig = sign_instance_id(b"", "foo")
    assert len(sig) == 64 and sig != VECTOR
    assert verify_signature(b"", "foo", sig)
    assert not verify_signature(b"", "bar", sig)


@given(st.binary(max_size=64), st.text(max_size=64))
def test_sign_then_verify_roundtrip(secret: bytes, instance_id: str) -> None:
    sig = sign_instance_id(secret, instance_id)
    assert sig == sig.lower() and len(sig) == 64
    assert verify_signature(secret, instance_id, sig)
