"""The API's hit path (`MetadataApi._hot`): one lookup by what the request carries, kept
only while its instance is cached, never in place of a check the request needs."""

from __future__ import annotations

import datetime
import json

from openimds.config import Settings
from openimds.core.metadata.versions import EC2_VERSIONS, OS_VERSIONS
from openimds.http.server import RawResponse, Request, Response
from openimds.metadata import api as api_mod
from openimds.metadata.api import MetadataApi
from openimds.metadata.vendordata import VendorData
from tests.unit.test_metadata_api import (
    PROJECT,
    SECRET,
    Batch,
    FakeRegistry,
    body_of,
    call,
    header,
    make_api,
    signed,
    status,
)
from tests.unit.test_metadata_documents import IID

MD = "/openstack/latest/meta_data.json"


def kept_of(api: MetadataApi, who: bytes) -> dict[str, object]:
    """The answers kept under identity spelling `who`, by path (`_hot`: a table per path)."""
    return {path: table[who] for path, table in api._hot.items() if who in table}


def hot(api: object, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> object:
    """A keep-alive GET handled synchronously (what the hit path answers)."""
    req = Request("GET", path, signed() if headers is None else headers, b"", "1.1", True,
                  None)
    return api.handle(req)  # type: ignore[attr-defined]


async def test_seeded_meta_data_is_kept_whole_with_a_fresh_seed_per_answer() -> None:
    api, reg = make_api()
    first = await call(api, "GET", MD)
    assert isinstance(first, Response)
    a, b = hot(api, MD), hot(api, MD)
    assert isinstance(a, RawResponse) and isinstance(b, RawResponse)
    md_a, md_b = json.loads(body_of(a)), json.loads(body_of(b))
    assert md_a["random_seed"] != md_b["random_seed"]
    # the same document as the slow path, seed aside, with the same head
    slow = json.loads(first.body)
    assert {**md_a, "random_seed": ""} == {**slow, "random_seed": ""}
    head = a.data.split(b"\r\n\r\n", 1)[0].decode()
    assert f"Content-Length: {len(body_of(a))}" in head
    assert f"ETag: {header(first, 'ETag')}" in head
    assert reg.calls == 1


async def test_the_hit_path_still_checks_signature_tenant_and_tokens() -> None:
    api, reg = make_api()
    await call(api, "GET", MD)
    assert isinstance(hot(api, MD), RawResponse)
    bad = [h if h[0] != b"x-instance-id-signature" else (h[0], b"00" * 32) for h in signed()]
    assert status(await call(api, "GET", MD, bad, keep_alive=True)) == 403
    other = await call(api, "GET", MD, signed(tenant="other"), keep_alive=True)
    assert status(other) == 404
    # If-None-Match and HEAD are not the kept answer
    inm = await call(api, "GET", MD, [*signed(), (b"if-none-match", b'"x"')],
                     keep_alive=True)
    assert isinstance(inm, Response)
    assert status(await call(api, "HEAD", MD, keep_alive=True)) == 200
    assert reg.calls == 1


async def test_required_tokens_are_not_skipped_by_a_kept_answer() -> None:
    api, _ = make_api(imds_tokens="required")
    put = await call(api, "PUT", "/latest/api/token",
                     [*signed(), (b"x-aws-ec2-metadata-token-ttl-seconds", b"60")])
    token = body_of(put)
    path = "/latest/meta-data/instance-id"
    with_token = [*signed(), (b"x-aws-ec2-metadata-token", token)]
    assert status(await call(api, "GET", path, with_token)) == 200
    again = hot(api, path, with_token)  # kept, and served after the token check
    assert isinstance(again, RawResponse) and body_of(again) == b"i-00000007"
    assert status(await call(api, "GET", path, keep_alive=True)) == 401


async def test_a_hit_reads_one_identity_key_per_instance_and_one_answer_object() -> None:
    """An instance's answers in every path's table are keyed by its one identity key object
    (not a key per answer), and its kept meta_data.json is one object: the answer with a
    single NUL where each answer's seed goes."""
    api, _ = make_api()
    paths = (MD, "/openstack/latest/network_data.json", "/latest/meta-data/hostname")
    for p in paths:
        assert status(await call(api, "GET", p, keep_alive=True)) == 200
    (who,) = api._cache[IID].who
    keys = [key for table in api._hot.values() for key in table]
    assert len(keys) == len(paths) and all(key is who for key in keys)
    seeded = kept_of(api, who)[MD]
    assert type(seeded) is api_mod._Seeded and seeded.count(b"\x00") == 1  # type: ignore[union-attr]
    a = hot(api, MD)
    assert isinstance(a, RawResponse) and b"\x00" not in a.data
    assert len(a.data) == len(seeded) - 1 + len(json.loads(body_of(a))["random_seed"])


async def test_kept_answers_go_with_their_instance() -> None:
    """A change from the feed, an eviction and a resync drop the instance's kept answers;
    an unkept fetch (overtaken by a change) leaves none."""
    api, reg = make_api(cache_size=1)
    api.apply_batch(Batch(42, resync=True))
    other = "11111111-2222-4333-8444-555555555555"
    reg.views[other] = json.loads(json.dumps(reg.views[IID]))
    reg.views[other]["instance"]["id"] = other
    path = "/latest/meta-data/hostname"
    await call(api, "GET", path)
    assert isinstance(hot(api, path), RawResponse)
    # a change: dropped, and the next answer is the new view's
    reg.views[IID]["instance"]["hostname"] = "web-1b"
    reg.views[IID]["revision"] = 43
    api.apply_batch(Batch(43, [{"revision": 43, "kind": "instance", "op": "update",
                                "id": IID, "attrs": {"project_id": PROJECT}}]))
    assert api._hot == {}
    assert body_of(await call(api, "GET", path, keep_alive=True)) == b"web-1b.novalocal"
    assert body_of(hot(api, path)) == b"web-1b.novalocal"  # type: ignore[arg-type]
    # evicted by another instance (cache_size=1): nothing of it is kept
    await call(api, "GET", path, signed(other))
    assert list(api._cache) == [other]
    assert all(IID.encode() not in who for table in api._hot.values() for who in table)
    calls = reg.calls
    assert status(await call(api, "GET", path, keep_alive=True)) == 200
    assert reg.calls == calls + 1  # fetched again, not answered from a kept copy
    # a resync drops everything
    api.apply_batch(Batch(50, resync=True))
    assert api._hot == {} and api._cache == {}


async def test_the_kept_openstack_version_list_follows_the_date() -> None:
    """`/openstack` hides versions dated after today (Nova), so its kept answer is today's:
    the day a version's date comes, the hit path answers the list that shows it."""
    settings = Settings(metadata_proxy_shared_secret=SECRET)
    day = [datetime.date(2025, 4, 3)]
    api = MetadataApi(settings, FakeRegistry(), VendorData(settings.api),
                      wall_clock=lambda: 1000.0, today=lambda: day[0])
    first = body_of(await call(api, "GET", "/openstack", keep_alive=True))
    assert first.endswith(b"2020-10-14\nlatest")
    assert isinstance(hot(api, "/openstack"), RawResponse)  # kept
    day[0] = datetime.date(2025, 4, 4)
    after = await call(api, "GET", "/openstack", keep_alive=True)
    assert body_of(after).endswith(b"2020-10-14\n2025-04-04\nlatest")
    assert body_of(hot(api, "/openstack")) == body_of(after)  # type: ignore[arg-type]
    day[0] = datetime.date(2025, 4, 3)  # a clock set back hides it again
    assert body_of(await call(api, "GET", "/openstack", keep_alive=True)) == first


async def test_a_kept_answer_is_not_held_twice_and_the_full_path_builds_it_again() -> None:
    """Once an answer is kept for the hit path, the instance's documents drop their copy;
    a request the hit path does not answer (HEAD, If-None-Match) gets the same bytes and
    ETag, built again from the same view, with no registry fetch."""
    api, reg = make_api()
    path = "/latest/meta-data/hostname"
    first = await call(api, "GET", path, keep_alive=True)
    assert isinstance(first, Response)
    assert path not in api._cache[IID].docs._memo  # kept once: on the hit path
    kept = hot(api, path)
    assert isinstance(kept, RawResponse) and kept.data == first.encode(keep_alive=True)
    etag = header(first, "ETag")
    assert etag is not None
    again = await call(api, "GET", path, [*signed(), (b"if-none-match", etag.encode())])
    assert status(again) == 304
    head = await call(api, "HEAD", path)
    assert isinstance(head, Response) and header(head, "ETag") == etag
    assert reg.calls == 1


async def test_kept_answers_per_instance_are_bounded_in_count_and_bytes() -> None:
    """An instance keeps at most WIRE_MAX_DOCS answers of WIRE_MAX_BYTES in all; past that
    its answers come from the full path, the same bytes, with no fetch."""
    api, reg = make_api()
    many = [f"/{v}/meta-data/{leaf}" for v in (*EC2_VERSIONS, "latest") for leaf in (
        "hostname", "instance-id", "ami-id", "reservation-id", "ami-launch-index",
        "security-groups", "ami-manifest-path")]  # 70 paths, in every version
    big = (*OS_VERSIONS, "latest")  # ~3.3 KB each, more than WIRE_MAX_BYTES in all
    other = "11111111-2222-4333-8444-555555555555"
    reg.views[other] = json.loads(json.dumps(reg.views[IID]))
    reg.views[other]["instance"]["id"] = other
    reg.views[other]["instance"]["metadata"] = {f"k{n}": "v" * 450 for n in range(5)}
    for iid, paths in ((IID, many), (other, [f"/openstack/{v}/meta_data.json" for v in big])):
        for p in paths:
            assert status(await call(api, "GET", p, signed(iid), keep_alive=True)) == 200
        entry = api._cache[iid]
        (who,) = entry.who
        kept = kept_of(api, who)
        assert len(kept) == len(entry.paths) and entry.kept_bytes == sum(
            api_mod._size(a) for a in kept.values())  # type: ignore[arg-type]
        assert len(entry.paths) <= api_mod.WIRE_MAX_DOCS
        assert entry.kept_bytes <= api_mod.WIRE_MAX_BYTES
        assert 0 < len(kept) < len(paths)  # a bound was reached: the rest were not kept
        for p in set(paths) - set(kept):  # answered by the full path, the same bytes
            got = await call(api, "GET", p, signed(iid), keep_alive=True)
            assert isinstance(got, Response), p
            want = api._cache[iid].docs.lookup(p, datetime.date.today())
            assert json.loads(got.body).keys() == json.loads(want.render(b"x")).keys() \
                if p.endswith(".json") else got.body == want.body  # type: ignore[union-attr]
    assert len(kept_of(api, api._cache[IID].who[0])) == api_mod.WIRE_MAX_DOCS
    assert reg.calls == 2


async def test_the_shared_answer_table_is_bounded_in_bytes() -> None:
    api, _ = make_api()
    for n in range(3000):
        api._shared(b"x" * 1000 + str(n).encode())
    assert api._answers_bytes <= api_mod.SHARED_BYTES
    assert sum(len(a) for a in api._answers) == api._answers_bytes
    one = b"y" * 100
    assert api._shared(bytes(one)) is api._shared(bytes(one))
