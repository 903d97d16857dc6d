"""Vendor data: StaticJSON loading, DynamicJSON targets with timeouts, caching, failures."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from openimds.config import ApiSettings
from openimds.core.metadata import parse_view
from openimds.errors import ConfigError, UpstreamError
from openimds.metadata.vendordata import VendorData, load_static, parse_targets
from tests.unit.test_metadata_documents import IID, PROJECT, make_view

VIEW = parse_view(make_view())


def test_static(tmp_path: Path) -> None:
    assert load_static(ApiSettings()) == {}
    assert load_static(ApiSettings(vendordata_providers=("DynamicJSON",))) is None
    good = tmp_path / "v.json"
    good.write_text('{"a": 1}')
    assert load_static(ApiSettings(vendordata_jsonfile_path=str(good))) == {"a": 1}
    for text in ("not json", "[1, 2]"):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(ConfigError):
            load_static(ApiSettings(vendordata_jsonfile_path=str(bad)))
    with pytest.raises(ConfigError):
        load_static(ApiSettings(vendordata_jsonfile_path=str(tmp_path / "missing")))


def test_targets() -> None:
    api = ApiSettings(vendordata_providers=("StaticJSON", "DynamicJSON"),
                      vendordata_dynamic_targets=("a@http://x/1", "a@http://x/2",
                                                  "b@https://y/"))
    assert parse_targets(api) == [("a", "http://x/1"), ("b", "https://y/")]
    with pytest.raises(ConfigError):
        parse_targets(ApiSettings(vendordata_providers=("DynamicJSON",),
                                  vendordata_dynamic_targets=("nourl",)))


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def dynamic(handler: httpx.MockTransport, **kw: object) -> tuple[VendorData, Clock]:
    api = ApiSettings(vendordata_providers=("StaticJSON", "DynamicJSON"),
                      vendordata_dynamic_targets=("one@http://t1/", "two@http://t2/"),
                      **kw)  # type: ignore[arg-type]
    clock = Clock()
    return VendorData(api, transport=handler, clock=clock), clock


async def test_dynamic_document_and_cache() -> None:
    calls: list[str] = []

    def handle(req: httpx.Request) -> httpx.Response:
        calls.append(str(req.url))
        body = json.loads(req.content)
        assert body["instance-id"] == IID and body["project-id"] == PROJECT
        assert set(body) == {"project-id", "instance-id", "image-id", "user-data",
                             "hostname", "metadata", "boot-roles"}
        assert req.headers["user-agent"] == "openstack-nova-vendordata"
        if req.url.host == "t1":
            return httpx.Response(200, json={"k": 1}, headers={"Cache-Control": "max-age=10"})
        return httpx.Response(200, json={"k": 2}, headers={"Cache-Control": "no-store"})

    vd, clock = dynamic(httpx.MockTransport(handle))
    doc = await vd.document(VIEW, {"s": 1})
    assert doc == {"static": {"s": 1}, "one": {"k": 1}, "two": {"k": 2}}
    assert list(doc) == ["static", "one", "two"]
    await vd.document(VIEW, {"s": 1})
    assert calls.count("http://t1/") == 1 and calls.count("http://t2/") == 2
    clock.now = 11
    await vd.document(VIEW, {"s": 1})
    assert calls.count("http://t1/") == 2
    await vd.aclose()


async def test_dynamic_failures() -> None:
    def handle(req: httpx.Request) -> httpx.Response:
        if req.url.host == "t1":
            raise httpx.ReadTimeout("slow", request=req)
        return httpx.Response(500)

    vd, _ = dynamic(httpx.MockTransport(handle))
    assert await vd.document(VIEW, None) == {"one": {}, "two": {}}
    fatal, _ = dynamic(httpx.MockTransport(handle), vendordata_dynamic_failure_fatal=True)
    with pytest.raises(UpstreamError):
        await fatal.document(VIEW, None)


async def test_vendor_data2_through_the_api() -> None:
    from openimds.config import Settings
    from openimds.metadata.api import MetadataApi
    from tests.unit.test_metadata_api import FakeRegistry, body_of, call, status

    def handle(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"from": req.url.host})

    settings = Settings(metadata_proxy_shared_secret="s3cret", api=ApiSettings(
        vendordata_providers=("StaticJSON", "DynamicJSON"),
        vendordata_dynamic_targets=("one@http://t1/",)))
    vd = VendorData(settings.api, transport=httpx.MockTransport(handle))
    api = MetadataApi(settings, FakeRegistry(), vd)
    resp = await call(api, "GET", "/openstack/latest/vendor_data2.json")
    assert status(resp) == 200
    assert json.loads(body_of(resp)) == {"static": {}, "one": {"from": "t1"}}
    assert body_of(await call(api, "GET", "/openstack/latest")).endswith(b"vendor_data2.json")
