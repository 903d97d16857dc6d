"""Prewarming the API's view cache from the change feed: the pure plan and queue
(core.metadata.invalidation), then the API in-process with a fake registry."""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
from typing import Any

from openimds.config import ApiSettings, Settings
from openimds.core.metadata import parse_view
from openimds.core.metadata.invalidation import DependencyIndex, PrewarmQueue, plan_refresh
from openimds.errors import NotFound
from openimds.http.server import RawResponse, Response
from openimds.metadata.api import BOOT_PATHS, MetadataApi
from openimds.metadata.vendordata import VendorData
from tests.unit.test_metadata_api import SECRET, Batch, body_of, call, signed, status
from tests.unit.test_metadata_documents import IID, PORT, PROJECT, make_view

NET = make_view()["ports"][0]["network_id"]


def change(rev: int, kind: str, op: str, ident: str, **attrs: Any) -> dict[str, Any]:
    return {"revision": rev, "kind": kind, "op": op, "id": ident, "attrs": attrs}


def index_with_view() -> DependencyIndex:
    index = DependencyIndex()
    index.add(parse_view(make_view()))
    return index


# -- plan_refresh ---------------------------------------------------------------------------
def test_created_instance_is_fetched_unknown_update_is_not() -> None:
    plan = plan_refresh([change(2, "instance", "create", "new"),
                         change(3, "instance", "update", "idle")], DependencyIndex(), set())
    assert plan.refresh == ("new",)
    assert plan.invalidate == {"new", "idle"}
    assert not plan.deleted


def test_known_instance_is_refetched_once_in_latest_order() -> None:
    plan = plan_refresh([change(2, "instance", "update", IID),
                         change(3, "instance", "create", "new"),
                         change(4, "port", "update", PORT, device_id=IID,
                                device_owner="compute:nova", network_id=NET)],
                        index_with_view(), {IID})
    assert plan.refresh == ("new", IID)


def test_deleted_instance_is_dropped_never_fetched() -> None:
    plan = plan_refresh([change(2, "instance", "create", "gone"),
                         change(3, "instance", "delete", "gone"),
                         change(3, "port", "delete", "p-gone", device_id="gone",
                                device_owner="compute:nova", network_id=NET),
                         change(4, "instance", "delete", IID)],
                        index_with_view(), {IID})
    assert plan.refresh == ()
    assert plan.deleted == {"gone", IID}
    assert {"gone", IID} <= plan.invalidate


def test_dependency_changes_refresh_cached_holders() -> None:
    index = index_with_view()
    for c in (change(2, "keypair", "create", "kp-9", name="mykey", project_id=PROJECT),
              change(2, "port", "create", "dhcp-port", device_id="dhcp",
                     device_owner="network:dhcp", network_id=NET),
              change(2, "network", "update", NET)):
        plan = plan_refresh([c], index, {IID})
        assert IID in plan.refresh, c
        assert "dhcp" not in plan.refresh  # a non-instance device is not an instance
    unrelated = plan_refresh([change(2, "network", "update", "other-net")], index, {IID})
    assert unrelated.refresh == () and not unrelated.invalidate


# -- PrewarmQueue ---------------------------------------------------------------------------
def test_queue_coalesces_and_orders_feed_before_backfill() -> None:
    q = PrewarmQueue(10)
    q.push("b1", low=True)
    q.push("a1")
    q.push("a2")
    q.push("a1")
    q.push("b2", low=True)
    q.push("b2", low=True)
    q.push("b1")  # promoted: the feed names it
    assert len(q) == 4 and "b2" in q
    assert [q.pop() for _ in range(5)] == ["a1", "a2", "b1", "b2", None]


def test_queue_bound_drops_backfill_first_then_oldest() -> None:
    q = PrewarmQueue(3)
    for iid in ("l1", "l2"):
        q.push(iid, low=True)
    for iid in ("h1", "h2", "h3", "h4"):
        q.push(iid)
    assert q.dropped == 3
    q.discard("h3")
    assert [q.pop() for _ in range(3)] == ["h2", "h4", None]


# -- the API --------------------------------------------------------------------------------
class SnapshotRegistry:
    """get_view reads the registry's state when called, then (optionally) waits at a gate:
    an answer that is overtaken by a change while it travels."""

    def __init__(self) -> None:
        self.views: dict[str, dict[str, Any]] = {IID: make_view()}
        self.views[IID]["revision"] = 43  # the registry answers at its current revision
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    async def get_view(self, instance_id: str) -> dict[str, Any]:
        self.calls.append(instance_id)
        snapshot = copy.deepcopy(self.views.get(instance_id))
        if self.gate is not None:
            await self.gate.wait()
        if snapshot is None:
            raise NotFound("no instance")
        return snapshot

    async def set_password(self, instance_id: str, password: str) -> dict[str, Any]:
        raise NotImplementedError


def make(prewarm: int = 4) -> tuple[MetadataApi, SnapshotRegistry]:
    settings = Settings(metadata_proxy_shared_secret=SECRET,
                        api=ApiSettings(prewarm_concurrency=prewarm))
    reg = SnapshotRegistry()
    return MetadataApi(settings, reg, VendorData(settings.api), wall_clock=lambda: 1000.0), reg


async def settle(api: MetadataApi) -> None:
    for _ in range(50):
        await asyncio.sleep(0)
    await api.stop_prewarm()


async def test_created_instance_is_cached_before_its_first_request() -> None:
    api, reg = make()
    api.apply_batch(Batch(42, resync=True))
    api.apply_batch(Batch(43, [change(43, "instance", "create", IID, project_id=PROJECT)]))
    await settle(api)
    assert reg.calls == [IID]
    assert api.stats["prewarmed"] == 1
    resp = await call(api, "GET", "/latest/meta-data/hostname")
    assert status(resp) == 200 and body_of(resp) == b"web-1.novalocal"
    assert api.stats["misses"] == 0 and reg.calls == [IID]


async def test_prewarm_off_fetches_only_on_request() -> None:
    api, reg = make(prewarm=0)
    api.apply_batch(Batch(42, resync=True))
    api.apply_batch(Batch(43, [change(43, "instance", "create", IID, project_id=PROJECT)]))
    await settle(api)
    assert reg.calls == []
    assert status(await call(api, "GET", "/latest/meta-data/hostname")) == 200
    assert api.stats["misses"] == 1


async def test_overtaken_prewarm_is_not_installed_and_newer_view_is() -> None:
    api, reg = make()
    api.apply_batch(Batch(42, resync=True))
    reg.gate = asyncio.Event()
    api.apply_batch(Batch(43, [change(43, "instance", "create", IID, project_id=PROJECT)]))
    await asyncio.sleep(0.01)  # the prewarm holds the revision-42 view, not yet answered
    reg.views[IID]["instance"]["hostname"] = "web-2"
    reg.views[IID]["revision"] = 44
    api.apply_batch(Batch(44, [change(44, "instance", "update", IID, project_id=PROJECT)]))
    # a request now must not join the overtaken fetch
    pending = asyncio.ensure_future(call(api, "GET", "/latest/meta-data/hostname"))
    await asyncio.sleep(0.01)
    reg.gate.set()
    assert body_of(await pending) == b"web-2.novalocal"
    await settle(api)
    assert body_of(await call(api, "GET", "/latest/meta-data/hostname")) == b"web-2.novalocal"
    assert api.stats["misses"] == 1  # only the request made while the change was in flight


async def test_property_change_refreshes_cached_instance_in_background() -> None:
    api, reg = make()
    api.apply_batch(Batch(42, resync=True))
    assert body_of(await call(api, "GET", "/latest/meta-data/hostname")) == b"web-1.novalocal"
    reg.views[IID]["instance"]["hostname"] = "web-3"
    reg.views[IID]["revision"] = 43
    api.apply_batch(Batch(43, [change(43, "instance", "update", IID, project_id=PROJECT)]))
    await settle(api)
    assert len(reg.calls) == 2 and api.stats["prewarmed"] == 1
    assert body_of(await call(api, "GET", "/latest/meta-data/hostname")) == b"web-3.novalocal"
    assert api.stats["misses"] == 1


async def test_deleted_instance_is_dropped_not_fetched() -> None:
    api, reg = make()
    api.apply_batch(Batch(42, resync=True))
    assert status(await call(api, "GET", "/latest/meta-data/hostname")) == 200
    del reg.views[IID]
    api.apply_batch(Batch(43, [
        change(43, "instance", "delete", IID, project_id=PROJECT),
        change(43, "port", "delete", PORT, device_id=IID, device_owner="compute:nova",
               network_id=NET)]))
    await settle(api)
    assert reg.calls == [IID]
    assert status(await call(api, "GET", "/latest/meta-data/hostname")) == 404


async def test_resync_refetches_what_was_cached() -> None:
    api, reg = make()
    api.apply_batch(Batch(42, resync=True))
    assert status(await call(api, "GET", "/latest/meta-data/hostname")) == 200
    api.apply_batch(Batch(50, resync=True))
    await settle(api)
    assert reg.calls == [IID, IID]
    assert status(await call(api, "GET", "/latest/meta-data/hostname")) == 200
    assert api.stats["misses"] == 1


async def test_prewarm_concurrency_is_bounded() -> None:
    api, reg = make(prewarm=3)
    api.apply_batch(Batch(42, resync=True))
    reg.gate = asyncio.Event()
    for n in range(10):
        reg.views[f"i-{n}"] = make_view()
    api.apply_batch(Batch(43, [change(43, "instance", "create", f"i-{n}") for n in range(10)]))
    await asyncio.sleep(0.01)
    assert len(reg.calls) == 3
    reg.gate.set()
    for _ in range(100):
        await asyncio.sleep(0)
    assert len(reg.calls) == 10  # each once
    await api.stop_prewarm()


async def test_prewarmed_instance_boot_requests_are_kept_hits_from_the_first() -> None:
    """A prewarmed instance's cloud-init boot paths are answered from the hit path on their
    first request (a RawResponse, no document built), with the bytes the first request of an
    instance fetched on demand is answered with; a wrong signature or tenant is not."""
    api, _ = make()
    cold, _ = make(prewarm=0)
    for a in (api, cold):
        a.apply_batch(Batch(42, resync=True))
    api.apply_batch(Batch(43, [change(43, "instance", "create", IID, project_id=PROJECT)]))
    await settle(api)
    assert api.stats["prewarmed"] == 1
    built = api._cache[IID].docs
    assert not built._memo and not built._ec2  # kept once: as the hit path's answers
    kept = 0
    for path in BOOT_PATHS:
        want = await call(cold, "GET", path, keep_alive=True)
        if status(want) != 200:
            continue  # a document this instance lacks
        got = await call(api, "GET", path, keep_alive=True)
        assert isinstance(want, Response) and isinstance(got, RawResponse), path
        wire = want.encode(keep_alive=True)
        if path.endswith("meta_data.json"):  # a fresh random_seed in each answer
            seed = json.loads(body_of(got))["random_seed"]
            got = RawResponse(got.data.replace(seed.encode(), json.loads(want.body)[
                "random_seed"].encode()))
        assert got.data == wire, path
        kept += 1
    assert kept >= 20 and api.stats["misses"] == 0
    path = "/latest/meta-data/instance-id"
    wrong = [(k, b"0" * 64 if k == b"x-instance-id-signature" else v) for k, v in signed()]
    assert status(await call(api, "GET", path, wrong, keep_alive=True)) == 403
    other = status(await call(api, "GET", path, signed(tenant="other"), keep_alive=True))
    assert other == 404


async def test_kept_answers_the_same_for_every_instance_are_kept_once() -> None:
    api, reg = make()
    api.apply_batch(Batch(42, resync=True))
    other = "a1b2c3d4-0000-4000-8000-000000000001"
    reg.views[other] = copy.deepcopy(reg.views[IID])
    reg.views[other]["instance"]["id"] = other
    reg.views[other]["instance"]["hostname"] = "web-2"
    api.apply_batch(Batch(43, [change(43, "instance", "create", i, project_id=PROJECT)
                               for i in (IID, other)]))
    await settle(api)
    same = [await call(api, "GET", "/latest/meta-data/placement/availability-zone",
                       signed(iid=i), keep_alive=True) for i in (IID, other)]
    own = [await call(api, "GET", "/latest/meta-data/hostname", signed(iid=i),
                      keep_alive=True) for i in (IID, other)]
    assert all(isinstance(r, RawResponse) for r in same + own)
    assert same[0].data is same[1].data  # type: ignore[union-attr]
    assert [body_of(r) for r in own] == [b"web-1.novalocal", b"web-2.novalocal"]


async def test_a_prewarmed_openstack_version_list_follows_the_date() -> None:
    """The boot answers kept at prewarm include `/openstack`, whose list depends on the
    date: past the day a version's date comes, it is not answered from the day before."""
    settings = Settings(metadata_proxy_shared_secret=SECRET,
                        api=ApiSettings(prewarm_concurrency=4))
    day = [datetime.date(2025, 4, 3)]
    api = MetadataApi(settings, SnapshotRegistry(), VendorData(settings.api),
                      wall_clock=lambda: 1000.0, today=lambda: day[0])
    api.apply_batch(Batch(42, resync=True))
    api.apply_batch(Batch(43, [change(43, "instance", "create", IID, project_id=PROJECT)]))
    await settle(api)
    kept = await call(api, "GET", "/openstack", keep_alive=True)
    assert isinstance(kept, RawResponse) and body_of(kept).endswith(b"2020-10-14\nlatest")
    day[0] = datetime.date(2025, 4, 5)
    later = await call(api, "GET", "/openstack", keep_alive=True)
    assert body_of(later).endswith(b"2020-10-14\n2025-04-04\nlatest")
    assert api.stats["misses"] == 0


async def test_a_boot_path_that_depends_on_the_request_is_not_kept_at_prewarm() -> None:
    """local-ipv4 of an instance without a fixed IPv4 is the request's own address
    (X-Forwarded-For): prewarm keeps no answer for it, and each request gets its own."""
    api, reg = make()
    reg.views[IID] = make_view(ports=[])
    reg.views[IID]["revision"] = 43
    api.apply_batch(Batch(42, resync=True))
    api.apply_batch(Batch(43, [change(43, "instance", "create", IID, project_id=PROJECT)]))
    await settle(api)
    assert api.stats["prewarmed"] == 1
    path = "/latest/meta-data/local-ipv4"
    assert path not in api._hot
    for address in (b"10.0.0.5", b"10.0.0.6"):
        headers = [(k, address if k == b"x-forwarded-for" else v) for k, v in signed()]
        assert body_of(await call(api, "GET", path, headers, keep_alive=True)) == address
    assert api.stats["misses"] == 0
