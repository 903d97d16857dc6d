"""The API handler in-process, with a fake registry: status matrix, tokens, cache, feed."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
from dataclasses import dataclass, field
from typing import Any

import pytest

from openimds.config import ApiSettings, Settings
from openimds.core.signing import sign_instance_id
from openimds.errors import Conflict, NotFound, UpstreamUnavailable
from openimds.http.server import RawResponse, Request, Response
from openimds.metadata.api import MetadataApi
from openimds.metadata.vendordata import VendorData, cache_ttl
from tests.unit.test_metadata_documents import IID, KEY, PORT, PROJECT, make_view

SECRET = "s3cret"


class FakeRegistry:
    def __init__(self) -> None:
        self.views: dict[str, dict[str, Any]] = {IID: make_view()}
        self.calls = 0
        self.down = False
        self.gate: asyncio.Event | None = None

    async def get_view(self, instance_id: str) -> dict[str, Any]:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.down:
            raise UpstreamUnavailable("registry down")
        if instance_id not in self.views:
            raise NotFound("no instance")
        return copy.deepcopy(self.views[instance_id])

    async def set_password(self, instance_id: str, password: str) -> dict[str, Any]:
        inst = self.views[instance_id]["instance"]
        if inst["password"]:
            raise Conflict("already set")
        inst["password"] = password
        return {"password": password}


@dataclass
class Batch:
    revision: int
    changes: list[dict[str, Any]] = field(default_factory=list)
    resync: bool = False


def make_api(**api: Any) -> tuple[MetadataApi, FakeRegistry]:
    settings = Settings(metadata_proxy_shared_secret=SECRET, api=ApiSettings(**api))
    reg = FakeRegistry()
    vd = VendorData(settings.api)
    return MetadataApi(settings, reg, vd, wall_clock=lambda: 1000.0), reg


def signed(iid: str = IID, tenant: str = PROJECT, **extra: str) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"x-forwarded-for", b"10.0.0.5"),
        (b"x-instance-id", iid.encode()),
        (b"x-tenant-id", tenant.encode()),
        (b"x-instance-id-signature", sign_instance_id(SECRET.encode(), iid).encode()),
    ]
    headers += [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in extra.items()]
    return headers


async def call(api: MetadataApi, method: str, path: str,
               headers: list[tuple[bytes, bytes]] | None = None, body: bytes = b"",
               keep_alive: bool = False) -> Response | RawResponse:
    req = Request(method, path, signed() if headers is None else headers, body, "1.1",
                  keep_alive, ("127.0.0.1", 1234))
    result = api.handle(req)
    if inspect.isawaitable(result):
        result = await result
    assert isinstance(result, Response | RawResponse)
    return result


def status(resp: Response | RawResponse) -> int:
    if isinstance(resp, RawResponse):
        return int(resp.data.split(b" ", 2)[1])
    return resp.status


def body_of(resp: Response | RawResponse) -> bytes:
    if isinstance(resp, RawResponse):
        return resp.data.split(b"\r\n\r\n", 1)[1]
    return resp.body


def header(resp: Response, name: str) -> str | None:
    for k, v in resp.headers:
        if k.lower() == name.lower():
            return v
    return None


async def test_root_needs_no_identity() -> None:
    api, reg = make_api()
    resp = await call(api, "GET", "/", headers=[])
    assert status(resp) == 200 and body_of(resp).endswith(b"2009-04-04\nlatest")
    assert reg.calls == 0


@pytest.mark.parametrize(("drop", "message"), [
    (b"x-instance-id", "X-Instance-ID header is missing"),
    (b"x-instance-id-signature", "X-Instance-ID-Signature header is missing"),
    (b"x-tenant-id", "X-Tenant-ID header is missing"),
])
async def test_missing_headers_400(drop: bytes, message: str) -> None:
    api, reg = make_api()
    headers = [h for h in signed() if h[0] != drop]
    resp = await call(api, "GET", "/latest/meta-data/", headers=headers)
    assert status(resp) == 400 and message.encode() in body_of(resp)
    assert reg.calls == 0


async def test_signature_and_tenant() -> None:
    api, reg = make_api()
    bad = [h if h[0] != b"x-instance-id-signature" else (h[0], b"00" * 32) for h in signed()]
    assert status(await call(api, "GET", "/latest/meta-data/", headers=bad)) == 403
    upper = [h if h[0] != b"x-instance-id-signature" else (h[0], h[1].upper())
             for h in signed()]
    assert status(await call(api, "GET", "/latest/meta-data/", headers=upper)) == 403
    assert reg.calls == 0
    assert status(await call(api, "GET", "/latest/meta-data/", signed(tenant="other"))) == 404
    assert status(await call(api, "GET", "/latest/meta-data/", signed(iid="nope"))) == 404
    dup = [*signed(), (b"x-instance-id", b"another")]
    assert status(await call(api, "GET", "/latest/meta-data/", headers=dup)) == 400


async def test_documents_and_cache_hits() -> None:
    api, reg = make_api()
    resp = await call(api, "GET", "/latest/meta-data/hostname")
    assert status(resp) == 200 and body_of(resp) == b"web-1.novalocal"
    assert isinstance(resp, Response) and header(resp, "ETag")
    # a keep-alive GET is answered synchronously from pre-encoded bytes
    req = Request("GET", "/latest/meta-data/hostname", signed(), b"", "1.1", True, None)
    again = api.handle(req)
    assert isinstance(again, RawResponse) and again.data.endswith(b"\r\n\r\nweb-1.novalocal")
    assert b"ETag: " in again.data
    assert reg.calls == 1
    md = json.loads(body_of(await call(api, "GET", "/openstack/latest/meta_data.json")))
    md2 = json.loads(body_of(await call(api, "GET", "/openstack/latest/meta_data.json")))
    assert md["random_seed"] != md2["random_seed"]
    assert body_of(await call(api, "GET", "/latest/meta-data/public-keys/0/openssh-key")) == (
        KEY.encode())
    assert status(await call(api, "GET", "/latest/meta-data/hostname/x")) == 404
    assert status(await call(api, "GET", "/openstack/latest/nope")) == 404
    assert reg.calls == 1


async def test_if_none_match_304() -> None:
    api, _ = make_api()
    resp = await call(api, "GET", "/openstack/latest/network_data.json")
    assert isinstance(resp, Response) and resp.content_type == "application/json"
    etag = header(resp, "ETag")
    assert etag
    again = await call(api, "GET", "/openstack/latest/network_data.json",
                       [*signed(), (b"if-none-match", etag.encode())])
    assert status(again) == 304 and body_of(again) == b""
    seeded = await call(api, "GET", "/openstack/latest/meta_data.json")
    weak = header(seeded, "ETag")  # type: ignore[arg-type]
    assert weak and weak.startswith("W/")
    again = await call(api, "GET", "/openstack/latest/meta_data.json",
                       [*signed(), (b"if-none-match", weak.encode())])
    assert status(again) == 304


async def test_methods() -> None:
    api, reg = make_api()
    for method, path, allow in [("POST", "/latest/meta-data/hostname", "GET, HEAD"),
                                ("DELETE", "/openstack/latest/password", "GET, HEAD, POST"),
                                ("PUT", "/", "GET, HEAD"),
                                ("GET", "/latest/api/token", "PUT"),
                                ("PATCH", "/openstack", "GET, HEAD")]:
        resp = await call(api, method, path)
        assert status(resp) == 405, (method, path)
        assert isinstance(resp, Response) and header(resp, "Allow") == allow
    assert reg.calls == 0
    head = await call(api, "HEAD", "/latest/meta-data/hostname")
    assert status(head) == 200


async def test_local_ipv4_fallback() -> None:
    api, reg = make_api()
    reg.views[IID] = make_view(ports=[])
    resp = await call(api, "GET", "/latest/meta-data/local-ipv4")
    assert body_of(resp) == b"10.0.0.5"


async def test_password_once() -> None:
    api, reg = make_api()
    assert body_of(await call(api, "GET", "/openstack/latest/password")) == b""
    big = await call(api, "POST", "/openstack/latest/password", body=b"x" * 1021)
    assert status(big) == 400
    ok = await call(api, "POST", "/openstack/latest/password", body=b"c2VjcmV0")
    assert status(ok) == 200
    assert body_of(await call(api, "GET", "/openstack/latest/password")) == b"c2VjcmV0"
    assert status(await call(api, "POST", "/openstack/latest/password", body=b"x")) == 409
    assert status(await call(api, "POST", "/openstack/2012-08-10/password", body=b"x")) == 404


async def test_registry_down_503_and_cached_still_served() -> None:
    api, reg = make_api()
    assert status(await call(api, "GET", "/latest/meta-data/hostname")) == 200
    reg.down = True
    assert status(await call(api, "GET", "/latest/meta-data/hostname")) == 200
    api.apply_batch(Batch(5, resync=True))
    resp = await call(api, "GET", "/latest/meta-data/hostname")
    assert status(resp) == 503 and isinstance(resp, Response)
    assert header(resp, "Retry-After") == "2"


async def test_single_flight() -> None:
    api, reg = make_api()
    reg.gate = asyncio.Event()
    tasks = [asyncio.ensure_future(call(api, "GET", "/latest/meta-data/instance-id"))
             for _ in range(20)]
    await asyncio.sleep(0.01)
    reg.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(status(r) == 200 for r in results)
    assert reg.calls == 1


async def test_feed_invalidation() -> None:
    api, reg = make_api()
    api.apply_batch(Batch(42, resync=True))
    assert body_of(await call(api, "GET", "/latest/meta-data/hostname")) == b"web-1.novalocal"
    reg.views[IID]["instance"]["hostname"] = "web-2"
    reg.views[IID]["revision"] = 43
    api.apply_batch(Batch(43, [{"revision": 43, "kind": "network", "op": "update",
                                "id": "unrelated", "attrs": {}}]))
    assert body_of(await call(api, "GET", "/latest/meta-data/hostname")) == b"web-1.novalocal"
    api.apply_batch(Batch(44, [{"revision": 44, "kind": "instance", "op": "update",
                                "id": IID, "attrs": {"project_id": PROJECT}}]))
    assert body_of(await call(api, "GET", "/latest/meta-data/hostname")) == b"web-2.novalocal"
    reg.views[IID]["ports"][0]["mac_address"] = "fa:16:3e:99:99:99"
    api.apply_batch(Batch(45, [{"revision": 45, "kind": "port", "op": "update", "id": PORT,
                                "attrs": {"device_id": IID, "device_owner": "compute:nova"}}]))
    assert body_of(await call(api, "GET", "/latest/meta-data/mac")) == b"fa:16:3e:99:99:99"


async def test_change_during_fetch_is_not_cached() -> None:
    api, reg = make_api()
    api.apply_batch(Batch(42, resync=True))
    reg.gate = asyncio.Event()
    task = asyncio.ensure_future(call(api, "GET", "/latest/meta-data/hostname"))
    await asyncio.sleep(0.01)
    # the keypair change arrives while the (revision 42) view is in flight
    api.apply_batch(Batch(43, [{"revision": 43, "kind": "keypair", "op": "delete",
                                "id": "kp-1", "attrs": {"name": "mykey",
                                                        "project_id": PROJECT}}]))
    reg.gate.set()
    await task
    reg.gate = None
    await call(api, "GET", "/latest/meta-data/hostname")
    assert reg.calls == 2  # the stale view was served once but not kept


async def test_imdsv2_tokens() -> None:
    api, _ = make_api()
    resp = await call(api, "PUT", "/latest/api/token",
                      [*signed(), (b"x-aws-ec2-metadata-token-ttl-seconds", b"21600")])
    assert status(resp) == 200 and isinstance(resp, Response)
    assert header(resp, "X-aws-ec2-metadata-token-ttl-seconds") == "21600"
    token = resp.body
    ok = await call(api, "GET", "/latest/meta-data/instance-id",
                    [*signed(), (b"x-aws-ec2-metadata-token", token)])
    assert status(ok) == 200
    bad = await call(api, "GET", "/latest/meta-data/instance-id",
                     [*signed(), (b"x-aws-ec2-metadata-token", token + b"x")])
    assert status(bad) == 401
    for ttl in (b"0", b"21601", b"x"):
        r = await call(api, "PUT", "/latest/api/token",
                       [*signed(), (b"x-aws-ec2-metadata-token-ttl-seconds", ttl)])
        assert status(r) == 400
    assert status(await call(api, "PUT", "/latest/api/token")) == 400
    proxied = await call(api, "PUT", "/latest/api/token", [
        *signed(), (b"x-aws-ec2-metadata-token-ttl-seconds", b"60"), (b"via", b"1.1 squid")])
    assert status(proxied) == 403
    # a token for another instance is refused
    other = make_view()
    other["instance"]["id"] = "other-instance"
    api._registry.views["other-instance"] = other  # type: ignore[attr-defined]
    resp2 = await call(api, "GET", "/latest/meta-data/instance-id", [
        *signed(iid="other-instance"), (b"x-aws-ec2-metadata-token", token)])
    assert status(resp2) == 401
    # what /metrics shows: 1 issued, 2 refused for a bad token, 5 token PUTs refused
    # (3 bad TTLs, 1 missing, 1 forwarded)
    assert api.token_counts == {"issued": 1, "rejected": 2, "refused": 5}


async def test_imdsv2_required() -> None:
    api, _ = make_api(imds_tokens="required")
    assert status(await call(api, "GET", "/latest/meta-data/instance-id")) == 401
    assert status(await call(api, "GET", "/", headers=[])) == 200
    resp = await call(api, "PUT", "/latest/api/token",
                      [*signed(), (b"x-aws-ec2-metadata-token-ttl-seconds", b"60")])
    token = body_of(resp)
    ok = await call(api, "GET", "/latest/meta-data/instance-id",
                    [*signed(), (b"x-aws-ec2-metadata-token", token)])
    assert status(ok) == 200


def test_cache_control() -> None:
    assert cache_ttl(None, 300) == 300
    assert cache_ttl("max-age=60", 300) == 60
    assert cache_ttl("public, max-age=5", 300) == 5
    assert cache_ttl("no-store", 300) == 0
    assert cache_ttl("no-cache, max-age=60", 300) == 0
    assert cache_ttl("public", 300) == 300


async def test_access_log_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    api, _ = make_api()
    api.access_log = True
    with caplog.at_level("INFO", logger="openimds.access"):
        headers = [*signed(), (b"x-openimds-request-id", b"rid-7")]
        req = Request("GET", "/latest/meta-data/hostname", headers, b"", "1.1", True, None)
        result = api.handle_observed(req)
        if inspect.isawaitable(result):
            result = await result
        again = api.handle_observed(req)
        assert isinstance(again, RawResponse)
    lines = [r.getMessage() for r in caplog.records if r.name == "openimds.access"]
    assert len(lines) == 2 and all("status=200" in line for line in lines)
    assert all(line.startswith("api request_id=rid-7 ") for line in lines)
    assert api.hop.count == 2 and api.hop.in_flight() == 0
    assert api.hop.by_class() == {("2xx", "ec2"): 2}


async def test_cache_bound_evicts_oldest_and_an_evicted_instance_is_fetched_fresh() -> None:
    """[api] cache_size bounds the instances held; eviction only drops: the next request
    fetches a fresh view, and feed changes for an evicted instance touch nothing."""
    api, reg = make_api(cache_size=2)
    api.apply_batch(Batch(42, resync=True))
    ids = [IID, "11111111-2222-4333-8444-555555555555", "22222222-3333-4444-8555-666666666666"]
    for n, iid in enumerate(ids[1:], start=2):
        reg.views[iid] = make_view(id=iid, hostname=f"web-{n}")

    async def hostname(iid: str) -> bytes:
        return body_of(await call(api, "GET", "/latest/meta-data/hostname", signed(iid)))

    assert [await hostname(i) for i in ids] == [b"web-1.novalocal", b"web-2.novalocal",
                                                b"web-3.novalocal"]
    assert reg.calls == 3
    assert await hostname(ids[2]) == b"web-3.novalocal" and reg.calls == 3  # held
    # the first was evicted (oldest); it changed meanwhile: its next request sees the change
    reg.views[IID]["instance"]["hostname"] = "web-1b"
    reg.views[IID]["revision"] = 43
    api.apply_batch(Batch(43, [{"revision": 43, "kind": "instance", "op": "update",
                                "id": IID, "attrs": {"project_id": PROJECT}}]))
    assert await hostname(IID) == b"web-1b.novalocal" and reg.calls == 4
    # bringing it back evicted the oldest held (ids[1]), never the one just asked for
    assert await hostname(ids[2]) == b"web-3.novalocal" and reg.calls == 4
    assert await hostname(ids[1]) == b"web-2.novalocal" and reg.calls == 5  # evicts ids[2]
    assert await hostname(IID) == b"web-1b.novalocal" and reg.calls == 5
    assert len(api._cache) == 2
    # a change to an evicted instance is harmless; a change to a held one still drops it
    api.apply_batch(Batch(44, [{"revision": 44, "kind": "instance", "op": "update",
                                "id": ids[2], "attrs": {"project_id": PROJECT}}]))
    reg.views[ids[1]]["instance"]["hostname"] = "web-2b"
    reg.views[ids[1]]["revision"] = 45
    api.apply_batch(Batch(45, [{"revision": 45, "kind": "instance", "op": "update",
                                "id": ids[1], "attrs": {"project_id": PROJECT}}]))
    assert await hostname(ids[1]) == b"web-2b.novalocal" and reg.calls == 6
    assert await hostname(IID) == b"web-1b.novalocal" and reg.calls == 6
