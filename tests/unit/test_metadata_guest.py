"""What a guest sees beyond Nova (issue 11): token rules, identity, change notification,
the header gate, tags, percent-decoded paths. The API handler in-process, fake registry."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from openimds.config import ApiSettings, Settings
from openimds.core.metadata import normalize_path
from openimds.core.metadata.ec2 import is_tag_key
from openimds.core.metadata.identity import IdentitySigner, generate_identity
from openimds.errors import ConfigError
from openimds.http.server import Response
from openimds.metadata.api import MetadataApi, parse_required_header
from openimds.metadata.vendordata import VendorData
from tests.unit.test_metadata_api import (
    SECRET,
    Batch,
    FakeRegistry,
    body_of,
    call,
    header,
    signed,
    status,
)
from tests.unit.test_metadata_documents import IID, PROJECT, make_view

TTL = (b"x-aws-ec2-metadata-token-ttl-seconds", b"60")


@pytest.fixture(scope="module")
def signer() -> IdentitySigner:
    key_pem, cert_pem = generate_identity("test", datetime.datetime.now(datetime.UTC))
    return IdentitySigner(key_pem, cert_pem)


def make(signer: IdentitySigner | None = None, wall: list[float] | None = None,
         **api: Any) -> tuple[MetadataApi, FakeRegistry]:
    settings = Settings(metadata_proxy_shared_secret=SECRET, api=ApiSettings(**api))
    reg = FakeRegistry()
    clock = wall if wall is not None else [1000.0]
    return MetadataApi(settings, reg, VendorData(settings.api), wall_clock=lambda: clock[0],
                       identity=signer, architecture="x86_64"), reg


# -- tokens ---------------------------------------------------------------------------------
async def test_firecracker_header_names_and_echo() -> None:
    api, _ = make()
    resp = await call(api, "PUT", "/latest/api/token",
                      [*signed(), (b"x-metadata-token-ttl-seconds", b"300")])
    assert status(resp) == 200 and isinstance(resp, Response)
    assert header(resp, "X-metadata-token-ttl-seconds") == "300"
    assert header(resp, "X-aws-ec2-metadata-token-ttl-seconds") is None
    ok = await call(api, "GET", "/latest/meta-data/instance-id",
                    [*signed(), (b"x-metadata-token", resp.body)])
    assert status(ok) == 200 and body_of(ok) == b"i-00000007"


@pytest.mark.parametrize(("ttl", "why"), [
    (None, b"is missing"), (b"0", b"1 to 21600"), (b"21601", b"1 to 21600"),
    (b"sixty", b"1 to 21600"), (b"1.5", b"1 to 21600"),
])
async def test_bad_ttl_400(ttl: bytes | None, why: bytes) -> None:
    api, _ = make()
    headers = signed() if ttl is None else [*signed(), (TTL[0], ttl)]
    resp = await call(api, "PUT", "/latest/api/token", headers)
    assert status(resp) == 400 and why in body_of(resp)


async def test_versioned_token_path_403_and_methods_405() -> None:
    api, reg = make()
    resp = await call(api, "PUT", "/2021-03-23/api/token", [*signed(), TTL])
    assert status(resp) == 403 and b"/latest/api/token" in body_of(resp)
    for method in ("GET", "POST", "DELETE", "HEAD"):
        r = await call(api, method, "/latest/api/token", [*signed(), TTL])
        assert status(r) == 405 and isinstance(r, Response) and header(r, "Allow") == "PUT"
    assert reg.calls == 0


async def test_guest_forwarded_marker_refuses_token() -> None:
    api, _ = make()
    resp = await call(api, "PUT", "/latest/api/token",
                      [*signed(), TTL, (b"x-openimds-guest-forwarded", b"1")])
    assert status(resp) == 403 and b"forwarded" in body_of(resp)


async def test_401_says_why() -> None:
    clock = [1000.0]
    api, reg = make(wall=clock, imds_tokens="required")
    missing = await call(api, "GET", "/latest/meta-data/instance-id")
    assert status(missing) == 401 and b"required" in body_of(missing)
    token = body_of(await call(api, "PUT", "/latest/api/token", [*signed(), TTL]))
    other = make_view()
    other["instance"]["id"] = "other-instance"
    reg.views["other-instance"] = other
    wrong = await call(api, "GET", "/latest/meta-data/instance-id",
                       [*signed(iid="other-instance"), (b"x-aws-ec2-metadata-token", token)])
    assert status(wrong) == 401 and b"another instance" in body_of(wrong)
    clock[0] += 61
    old = await call(api, "GET", "/latest/meta-data/instance-id",
                     [*signed(), (b"x-aws-ec2-metadata-token", token)])
    assert status(old) == 401 and b"expired" in body_of(old)
    junk = await call(api, "GET", "/latest/meta-data/instance-id",
                      [*signed(), (b"x-aws-ec2-metadata-token", b"junk")])
    assert status(junk) == 401 and b"not valid" in body_of(junk)


async def test_tokens_survive_an_api_restart() -> None:
    first, _ = make()
    token = body_of(await call(first, "PUT", "/latest/api/token", [*signed(), TTL]))
    second, _ = make()  # a new process (or a replica) with the same shared secret
    ok = await call(second, "GET", "/latest/meta-data/instance-id",
                    [*signed(), (b"x-aws-ec2-metadata-token", token)])
    assert status(ok) == 200


async def test_required_ec2_tokens_never_lock_out_openstack() -> None:
    api, _ = make(imds_tokens="required")
    assert status(await call(api, "GET", "/latest/meta-data/instance-id")) == 401
    assert status(await call(api, "GET", "/openstack/latest/meta_data.json")) == 200
    both, _ = make(imds_tokens="required", openstack_tokens="required")
    assert status(await call(both, "GET", "/openstack/latest/meta_data.json")) == 401
    only_os, _ = make(openstack_tokens="required")
    assert status(await call(only_os, "GET", "/latest/meta-data/instance-id")) == 200


# -- header gate, tags, paths ---------------------------------------------------------------
async def test_required_header_gate() -> None:
    api, _ = make(required_header="Metadata-Flavor: Google")
    resp = await call(api, "GET", "/latest/meta-data/instance-id")
    assert status(resp) == 403 and b"Metadata-Flavor: Google" in body_of(resp)
    wrong = await call(api, "GET", "/latest/meta-data/instance-id",
                       [*signed(), (b"metadata-flavor", b"Amazon")])
    assert status(wrong) == 403
    ok = await call(api, "GET", "/latest/meta-data/instance-id",
                    [*signed(), (b"metadata-flavor", b"Google")])
    assert status(ok) == 200
    off, _ = make()
    assert status(await call(off, "GET", "/latest/meta-data/instance-id")) == 200


def test_required_header_parsing() -> None:
    assert parse_required_header("") is None
    assert parse_required_header("Metadata: true") == (b"metadata", b"true")
    for bad in ("Metadata", "Meta data: x", ": x", "Metadata:"):
        with pytest.raises(ConfigError, match="required_header"):
            parse_required_header(bad)


async def test_tags_opt_in_with_aws_key_rules() -> None:
    view = make_view(metadata={"role": "web", "team:owner": "ops", "bad key": "x",
                               "a/b": "y", "_index": "z"})
    off, reg = make()
    reg.views[IID] = view
    assert status(await call(off, "GET", "/latest/meta-data/tags/instance")) == 404
    api, reg = make(expose_tags=True)
    reg.views[IID] = view
    listing = await call(api, "GET", "/latest/meta-data/tags/instance/")
    assert body_of(listing) == b"role\nteam:owner"
    assert body_of(await call(api, "GET", "/latest/meta-data/tags/instance/team:owner")) == b"ops"
    assert b"tags/" in body_of(await call(api, "GET", "/latest/meta-data/"))
    assert is_tag_key("a+b=c.d_e:f@g-h") and not is_tag_key("..") and not is_tag_key("a b")


async def test_percent_encoded_paths() -> None:
    assert normalize_path("/latest/meta-data/instance%2Did") == "/latest/meta-data/instance-id"
    api, _ = make()
    resp = await call(api, "GET", "/latest/meta-data/instance%2Did")
    assert status(resp) == 200 and body_of(resp) == b"i-00000007"
    assert status(await call(api, "GET", "/latest/meta-data%2Finstance-id")) == 200


# -- identity -------------------------------------------------------------------------------
async def test_identity_document_and_signature(signer: IdentitySigner) -> None:
    api, _ = make(signer, region="lab-1")
    assert body_of(await call(api, "GET", "/latest/dynamic/")) == b"instance-identity/"
    assert body_of(await call(api, "GET", "/latest/dynamic/instance-identity/")) == \
        b"document\npkcs7\nrsa2048\nsignature"
    assert b"dynamic/" in body_of(await call(api, "GET", "/latest/"))
    raw = body_of(await call(api, "GET", "/latest/dynamic/instance-identity/document"))
    doc = json.loads(raw)
    assert b'"accountId" : ' in raw  # AWS's separators
    assert doc["accountId"] == PROJECT and doc["region"] == "lab-1"
    assert doc["instanceId"] == "i-00000007" and doc["instanceType"] == "m1.small"
    assert doc["privateIp"] == "10.0.0.5" and doc["availabilityZone"] == "nova"
    assert doc["pendingTime"] == "2026-11-23T10:00:00Z" and doc["version"] == "2017-09-30"
    assert doc["imageId"] == "ami-c0ffee00" and doc["architecture"] == "x86_64"
    assert doc["kernelId"] is None and "billingProducts" in doc
    sig = base64.b64decode(body_of(
        await call(api, "GET", "/latest/dynamic/instance-identity/signature")))
    cert = x509.load_pem_x509_certificate(signer.cert_pem)
    public = cert.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(sig, raw, padding.PKCS1v15(), hashes.SHA256())  # raises when wrong
    pkcs7 = body_of(await call(api, "GET", "/latest/dynamic/instance-identity/pkcs7"))
    assert not pkcs7.startswith(b"-----") and base64.b64decode(pkcs7)
    # older versions have no dynamic tree, and without a signer there is none
    assert status(await call(api, "GET", "/2009-04-04/dynamic/")) == 404
    plain, _ = make()
    assert status(await call(plain, "GET", "/latest/dynamic/instance-identity/document")) == 404


def _verify_jwt(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    head_b64, claims_b64, sig_b64 = token.split(".")

    def unb64(text: str) -> bytes:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

    head = json.loads(unb64(head_b64))
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == head["kid"]]
    assert head["alg"] == "RS256" == jwk["alg"]
    public = rsa.RSAPublicNumbers(int.from_bytes(unb64(jwk["e"]), "big"),
                                  int.from_bytes(unb64(jwk["n"]), "big")).public_key()
    public.verify(unb64(sig_b64), f"{head_b64}.{claims_b64}".encode(), padding.PKCS1v15(),
                  hashes.SHA256())
    claims: dict[str, Any] = json.loads(unb64(claims_b64))
    return claims


async def test_identity_jwt(signer: IdentitySigner) -> None:
    clock = [1000.0]
    api, _ = make(signer, wall=clock)
    resp = await call(api, "GET", "/openstack/latest/identity?audience=https://vault.lab")
    assert status(resp) == 200 and isinstance(resp, Response)
    assert resp.content_type == "application/jwt"
    claims = _verify_jwt(resp.body.decode(), signer.jwks())
    assert claims["aud"] == "https://vault.lab" and claims["sub"] == IID
    assert claims["instance_id"] == IID and claims["project_id"] == PROJECT
    assert claims["iat"] == 1000 and 0 < claims["exp"] - claims["iat"] <= 3600
    # memoised a while (no signature per request), then fresh
    again = await call(api, "GET", "/openstack/latest/identity?audience=https://vault.lab")
    assert body_of(again) == resp.body
    clock[0] += 301
    later = await call(api, "GET", "/openstack/latest/identity?audience=https://vault.lab")
    assert _verify_jwt(body_of(later).decode(), signer.jwks())["iat"] == 1301
    other = await call(api, "GET", "/openstack/latest/identity?audience=other")
    assert _verify_jwt(body_of(other).decode(), signer.jwks())["aud"] == "other"
    assert status(await call(api, "GET", "/openstack/latest/identity")) == 400


# -- change notification --------------------------------------------------------------------
async def test_wait_for_change_answers_at_once_when_etag_differs() -> None:
    api, _ = make()
    resp = await call(api, "GET", "/latest/meta-data/instance-id?wait_for_change=true"
                      "&last_etag=stale")
    assert status(resp) == 200 and body_of(resp) == b"i-00000007"


async def test_wait_for_change_held_until_change() -> None:
    api, reg = make()
    first = await call(api, "GET", "/openstack/latest/meta_data.json")
    etag = header(first, "ETag")  # type: ignore[arg-type]
    api.apply_batch(Batch(50))  # the first batch: synced
    assert etag
    held = asyncio.ensure_future(call(
        api, "GET", f"/openstack/latest/meta_data.json?wait_for_change=true&last_etag={etag}"
        "&timeout_sec=30"))
    await asyncio.sleep(0.05)
    assert not held.done()
    # an unrelated instance changes: still held
    api.apply_batch(Batch(51, [{"revision": 51, "kind": "instance", "op": "update",
                                "id": "someone-else", "attrs": {}}]))
    await asyncio.sleep(0.05)
    assert not held.done()
    reg.views[IID]["instance"]["metadata"] = {"role": "db"}
    reg.views[IID]["revision"] = 52
    api.apply_batch(Batch(52, [{"revision": 52, "kind": "instance", "op": "update",
                                "id": IID, "attrs": {}}]))
    resp = await asyncio.wait_for(held, 2)
    assert status(resp) == 200 and json.loads(body_of(resp))["meta"] == {"role": "db"}
    assert header(resp, "ETag") != etag  # type: ignore[arg-type]
    assert not api._waiters


async def test_wait_for_change_times_out_unchanged() -> None:
    api, _ = make()
    first = await call(api, "GET", "/latest/meta-data/hostname")
    etag = header(first, "ETag")  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    resp = await call(api, "GET", f"/latest/meta-data/hostname?wait_for_change=true"
                      f"&last_etag={etag}&timeout_sec=0.3")
    assert 0.25 < loop.time() - t0 < 2
    assert status(resp) == 200 and header(resp, "ETag") == etag  # type: ignore[arg-type]


async def test_wait_for_change_bounded_per_instance() -> None:
    api, _ = make(max_waits_per_instance=2)
    etag = header(await call(api, "GET", "/latest/meta-data/hostname"), "ETag")  # type: ignore[arg-type]
    target = f"/latest/meta-data/hostname?wait_for_change=true&last_etag={etag}&timeout_sec=5"
    held = [asyncio.ensure_future(call(api, "GET", target)) for _ in range(2)]
    await asyncio.sleep(0.05)
    third = await call(api, "GET", target)
    assert status(third) == 429
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    await asyncio.sleep(0)
    assert not api._waiters


async def test_recursive_json_directory() -> None:
    api, _ = make()
    resp = await call(api, "GET", "/latest/meta-data/?recursive=true&alt=json")
    assert status(resp) == 200 and isinstance(resp, Response)
    assert resp.content_type == "application/json"
    tree = json.loads(resp.body)
    assert tree["instance-id"] == "i-00000007"
    assert tree["placement"] == {"availability-zone": "nova"}
    assert tree["public-keys"]["0"]["openssh-key"].startswith("ssh-")
    # and it can be waited on like a document
    etag = header(resp, "ETag")
    now = await call(api, "GET", "/latest/meta-data/?recursive=true&alt=json"
                     "&wait_for_change=true&last_etag=other")
    assert header(now, "ETag") == etag  # type: ignore[arg-type]


async def test_recursive_without_alt_is_json_and_alt_text_is_not() -> None:
    api, _ = make()
    resp = await call(api, "GET", "/latest/meta-data/placement?recursive=true")
    assert json.loads(body_of(resp)) == {"availability-zone": "nova"}
    text = await call(api, "GET", "/latest/meta-data/placement?recursive=true&alt=text")
    assert body_of(text) == b"availability-zone"
    listing = await call(api, "GET", "/openstack/latest?recursive=true")
    assert status(listing) == 200 and b"meta_data.json" in body_of(listing)
