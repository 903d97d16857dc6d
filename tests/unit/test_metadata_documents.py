"""The pure document core: every listing and document byte-for-byte as Nova serves them."""

from __future__ import annotations

import base64
import copy
import datetime
import json
from typing import Any

import pytest

from openimds.core.metadata import (
    AddressLeaf,
    Document,
    DocumentOptions,
    DynamicVendorTarget,
    InstanceDocuments,
    PasswordTarget,
    SeededDocument,
    normalize_path,
    parse_view,
    root_document,
)
from openimds.errors import NotFound

TODAY = datetime.date(2026, 11, 23)
IID = "5d4b6e9a-1c2f-4a3b-9e8d-7f6a5b4c3d2e"
PROJECT = "3f2e1d0c-b9a8-4765-8432-10fedcba9876"
NET = "0b3c4d5e-6f70-4182-93a4-b5c6d7e8f901"
SUBNET = "aa11bb22-cc33-4d44-8e55-ff6677889900"
PORT = "9e8d7c6b-5a49-4382-a1f0-e1d2c3b4a596"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx test@example"


def make_view(**changes: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "revision": 42,
        "instance": {
            "id": IID, "name": "web-1", "hostname": "web-1", "project_id": PROJECT,
            "availability_zone": "nova", "flavor": "m1.small", "launch_index": 0,
            "created_at": "2026-11-23T10:00:00Z", "key_name": "mykey",
            "keypair_id": "kp-1", "metadata": {"role": "web", "dsmode": "net"},
            "user_data": base64.b64encode(b"#cloud-config\nhostname: web-1\n").decode(),
            "image_id": "c0ffee00-1111-2222-3333-444455556666", "ec2_id": 7,
            "has_password": False, "password": None, "ports": [],
        },
        "keypair": {"id": "kp-1", "name": "mykey", "public_key": KEY, "type": "ssh",
                    "fingerprint": "aa:bb"},
        "ports": [{
            "id": PORT, "mac_address": "fa:16:3e:11:22:33", "network_id": NET,
            "device_owner": "compute:nova",
            "fixed_ips": [{"subnet_id": SUBNET, "ip_address": "10.0.0.5"}],
            "network": {"id": NET, "name": "private", "mtu": 1450},
            "subnets": [{"id": SUBNET, "cidr": "10.0.0.0/24", "ip_version": 4,
                         "gateway_ip": "10.0.0.1", "enable_dhcp": True,
                         "dns_nameservers": ["10.0.0.2", "8.8.8.8"],
                         "host_routes": [{"destination": "192.168.0.0/16",
                                          "nexthop": "10.0.0.254"}],
                         "isolated": False, "dhcp_ip": "10.0.0.2"}],
        }],
    }
    for key, value in changes.items():
        if key in view:
            view[key] = value
        else:
            view["instance"][key] = value
    return view


def docs(view: dict[str, Any] | None = None, **options: Any) -> InstanceDocuments:
    opts = DocumentOptions(**{"static_vendordata": {"v": 1}, **options})
    return InstanceDocuments(parse_view(view or make_view()), opts)


def get(d: InstanceDocuments, path: str) -> Any:
    return d.lookup(normalize_path(path), TODAY)


def body(d: InstanceDocuments, path: str) -> bytes:
    target = get(d, path)
    assert isinstance(target, Document), target
    return target.body


def test_root_version_list() -> None:
    assert root_document().body == (
        b"1.0\n2007-01-19\n2007-03-01\n2007-08-29\n2007-10-10\n2007-12-15\n2008-02-01\n"
        b"2008-09-01\n2009-04-04\nlatest"
    )
    assert body(docs(), "/ec2") == root_document().body


@pytest.mark.parametrize(("raw", "norm"), [
    ("/latest/meta-data/", "/latest/meta-data"),
    ("//latest//meta-data", "/latest/meta-data"),
    ("/latest/../openstack/", "/openstack"),
    ("/", "/"), ("//", "/"), ("/..", "/"),
])
def test_normalize(raw: str, norm: str) -> None:
    assert normalize_path(raw) == norm


def test_ec2_version_listing() -> None:
    d = docs()
    assert body(d, "/latest") == b"meta-data/\nuser-data"
    assert body(d, "/2009-04-04/") == b"meta-data/\nuser-data"
    assert body(docs(make_view(user_data=None)), "/latest") == b"meta-data/"


def test_ec2_meta_data_2009() -> None:
    d = docs()
    assert body(d, "/2009-04-04/meta-data/") == (
        b"ami-id\nami-launch-index\nami-manifest-path\nblock-device-mapping/\nhostname\n"
        b"instance-action\ninstance-id\ninstance-type\nlocal-hostname\nlocal-ipv4\n"
        b"placement/\npublic-hostname\npublic-ipv4\npublic-keys/\nreservation-id\n"
        b"security-groups"
    )
    assert body(d, "/2009-04-04/meta-data/hostname") == b"web-1.novalocal"
    assert body(d, "/2009-04-04/meta-data/instance-id") == b"i-00000007"
    assert body(d, "/2009-04-04/meta-data/ami-id") == b"ami-c0ffee00"
    assert body(d, "/2009-04-04/meta-data/local-ipv4") == b"10.0.0.5"
    assert body(d, "/2009-04-04/meta-data/public-ipv4") == b""
    assert body(d, "/2009-04-04/meta-data/instance-type") == b"m1.small"
    assert body(d, "/2009-04-04/meta-data/ami-manifest-path") == b"FIXME"
    assert body(d, "/2009-04-04/meta-data/instance-action") == b"none"
    assert body(d, "/2009-04-04/meta-data/security-groups") == b"default"
    assert body(d, "/2009-04-04/meta-data/placement") == b"availability-zone"
    assert body(d, "/2009-04-04/meta-data/placement/availability-zone") == b"nova"
    assert body(d, "/2009-04-04/meta-data/block-device-mapping") == b"ami\nroot"
    assert body(d, "/2009-04-04/meta-data/block-device-mapping/root") == b"/dev/vda"
    assert body(d, "/2009-04-04/meta-data/reservation-id").startswith(b"r-")
    assert len(body(d, "/2009-04-04/meta-data/reservation-id")) == 10


def test_public_keys() -> None:
    d = docs()
    assert body(d, "/latest/meta-data/public-keys") == b"0=mykey"
    assert body(d, "/latest/meta-data/public-keys/0/") == b"openssh-key"
    assert body(d, "/latest/meta-data/public-keys/0/openssh-key") == KEY.encode()
    for bad in ("/latest/meta-data/public-keys/mykey", "/latest/meta-data/public-keys/0/_name"):
        with pytest.raises(NotFound):
            get(d, bad)
    nokey = docs(make_view(keypair=None, key_name=None))
    assert b"public-keys" not in body(nokey, "/latest/meta-data")


@pytest.mark.parametrize(("version", "absent", "present"), [
    ("1.0", ["local-hostname", "instance-type", "placement/", "instance-action",
             "block-device-mapping/"], ["hostname", "local-ipv4", "security-groups"]),
    ("2007-01-19", ["instance-type"], ["local-hostname", "public-hostname", "public-ipv4"]),
    ("2007-08-29", ["block-device-mapping/"], ["instance-type"]),
    ("2007-12-15", ["placement/"], ["block-device-mapping/"]),
    ("2008-02-01", ["instance-action"], ["placement/"]),
    ("2008-09-01", [], ["instance-action"]),
])
def test_ec2_gating(version: str, absent: list[str], present: list[str]) -> None:
    listing = body(docs(), f"/{version}/meta-data").split(b"\n")
    for key in absent:
        assert key.encode() not in listing
    for key in present:
        assert key.encode() in listing
    for key in absent:
        with pytest.raises(NotFound):
            get(docs(), f"/{version}/meta-data/{key}")


def test_latest_extra_keys_never_404() -> None:
    d = docs()
    listing = body(d, "/latest/meta-data").decode().split("\n")
    assert {"mac", "instance-life-cycle", "services/"} <= set(listing)
    assert "mac" not in body(d, "/2009-04-04/meta-data").decode().split("\n")
    assert body(d, "/latest/meta-data/mac") == b"fa:16:3e:11:22:33"
    assert body(d, "/latest/meta-data/services") == b"domain\npartition"
    assert body(d, "/latest/meta-data/services/domain") == b"novalocal"
    # every listed key, recursively, answers 200
    def crawl(path: str) -> None:
        for entry in body(d, path).decode().split("\n"):
            name = entry.split("=")[0]
            child = f"{path}/{name.rstrip('/')}"
            target = get(d, child)
            if entry.endswith("/") or "=" in entry:
                crawl(child)
            else:
                assert isinstance(target, Document)
    crawl("/latest/meta-data")


def test_ec2_alias_user_data_and_below_leaf() -> None:
    d = docs()
    assert body(d, "/ec2/latest/meta-data/hostname") == b"web-1.novalocal"
    assert body(d, "/latest/user-data") == b"#cloud-config\nhostname: web-1\n"
    assert body(d, "/latest/user-data/") == b"#cloud-config\nhostname: web-1\n"
    for bad in ("/latest/meta-data/hostname/x", "/latest/meta-data/security-groups/default",
                "/latest/user-data/x", "/2010-01-01/meta-data", "/latest/dynamic",
                "/Latest/meta-data", "/latest/meta-data/nope", "/latest/api/token"):
        with pytest.raises(NotFound):
            get(d, bad)
    with pytest.raises(NotFound):
        get(docs(make_view(user_data=None)), "/latest/user-data")


def test_local_ipv4_falls_back_to_request_address() -> None:
    view = make_view(ports=[])
    d = docs(view)
    assert isinstance(get(d, "/latest/meta-data/local-ipv4"), AddressLeaf)
    assert b"mac" not in body(d, "/latest/meta-data").split(b"\n")


def test_openstack_versions_hide_future() -> None:
    d = docs()
    assert body(d, "/openstack") == (
        b"2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\n2016-06-30\n2016-10-06\n"
        b"2017-02-22\n2018-08-27\n2020-10-14\n2025-04-04\nlatest"
    )
    early = d.lookup("/openstack", datetime.date(2018, 1, 1)).body  # type: ignore[union-attr]
    assert early == (
        b"2012-08-10\n2013-04-04\n2013-10-17\n2015-10-15\n2016-06-30\n2016-10-06\n"
        b"2017-02-22\nlatest"
    )
    # hidden versions can still be asked for by name
    assert isinstance(d.lookup("/openstack/2025-04-04/network_data.json",
                               datetime.date(2018, 1, 1)), Document)


def test_openstack_version_listing() -> None:
    d = docs()
    assert body(d, "/openstack/latest") == (
        b"meta_data.json\nuser_data\npassword\nvendor_data.json\nnetwork_data.json\n"
        b"vendor_data2.json"
    )
    assert body(d, "/openstack/2012-08-10") == b"meta_data.json\nuser_data"
    assert body(d, "/openstack/2013-04-04") == b"meta_data.json\nuser_data\npassword"
    nostatic = docs(static_vendordata=None)
    assert body(nostatic, "/openstack/2018-08-27") == (
        b"meta_data.json\nuser_data\npassword\nnetwork_data.json\nvendor_data2.json"
    )
    with pytest.raises(NotFound):
        get(nostatic, "/openstack/latest/vendor_data.json")
    with pytest.raises(NotFound):
        get(d, "/openstack/2012-08-10/password")
    with pytest.raises(NotFound):
        get(d, "/openstack/2013-04-04/vendor_data.json")
    with pytest.raises(NotFound):
        get(d, "/openstack/2016-06-30/vendor_data2.json")
    for bad in ("/openstack/2011-01-01", "/openstack/content", "/openstack/content/0000",
                "/openstack/latest/meta_data.json/x", "/OpenStack/latest",
                "/openstack/latest/nope"):
        with pytest.raises(NotFound):
            get(d, bad)


def _meta(d: InstanceDocuments, version: str) -> dict[str, Any]:
    target = get(d, f"/openstack/{version}/meta_data.json")
    if isinstance(target, SeededDocument):
        seed = base64.b64encode(b"\x01" * 512)
        raw = target.render(seed)
        assert target.etag.startswith('W/"')
    else:
        assert isinstance(target, Document)
        assert target.content_type == "application/json"
        raw = target.body
    result: dict[str, Any] = json.loads(raw)
    return result


def test_meta_data_json_order_and_gating() -> None:
    d = docs()
    md = _meta(d, "latest")
    assert list(md) == ["uuid", "meta", "public_keys", "keys", "hostname", "name",
                        "launch_index", "availability_zone", "random_seed", "project_id",
                        "devices", "dedicated_cpus"]
    assert md["uuid"] == IID
    assert md["meta"] == {"role": "web", "dsmode": "net"}
    assert md["public_keys"] == {"mykey": KEY}
    assert md["keys"] == [{"name": "mykey", "type": "ssh", "data": KEY}]
    assert md["hostname"] == "web-1.novalocal"
    assert md["random_seed"] == base64.b64encode(b"\x01" * 512).decode()
    assert list(_meta(d, "2012-08-10")) == [
        "uuid", "meta", "public_keys", "keys", "hostname", "name", "launch_index",
        "availability_zone"]
    assert "project_id" not in _meta(d, "2013-10-17")
    assert "devices" not in _meta(d, "2015-10-15")
    assert "dedicated_cpus" not in _meta(d, "2018-08-27")
    bare = docs(make_view(metadata={}, keypair=None, key_name=None))
    assert list(_meta(bare, "2018-08-27"))[:2] == ["uuid", "hostname"]


def test_meta_data_bytes_match_json_dumps() -> None:
    d = docs()
    target = get(d, "/openstack/2018-08-27/meta_data.json")
    assert isinstance(target, SeededDocument)
    md = json.loads(target.render(b"SEED"))
    assert target.render(b"SEED") == json.dumps(md).encode()


def test_meta_data_hostile_metadata_cannot_move_the_seed() -> None:
    view = make_view(metadata={"x": "\x00openimds-random-seed\x00"})
    md = _meta(docs(view), "latest")
    assert md["meta"] == {"x": "\x00openimds-random-seed\x00"}


def test_user_data_and_password() -> None:
    d = docs()
    assert body(d, "/openstack/latest/user_data") == b"#cloud-config\nhostname: web-1\n"
    with pytest.raises(NotFound):
        get(docs(make_view(user_data=None)), "/openstack/latest/user_data")
    target = get(d, "/openstack/latest/password")
    assert isinstance(target, PasswordTarget) and target.doc.body == b""
    target = get(docs(make_view(password="c2VjcmV0")), "/openstack/latest/password")
    assert isinstance(target, PasswordTarget) and target.doc.body == b"c2VjcmV0"


def test_vendor_data() -> None:
    d = docs()
    assert body(d, "/openstack/latest/vendor_data.json") == b'{"v": 1}'
    assert body(d, "/openstack/latest/vendor_data2.json") == b'{"static": {"v": 1}}'
    assert body(docs(static_vendordata=None), "/openstack/latest/vendor_data2.json") == b"{}"
    dyn = get(docs(dynamic_vendordata=True), "/openstack/latest/vendor_data2.json")
    assert isinstance(dyn, DynamicVendorTarget) and dyn.static == {"v": 1}


def test_etag_and_memo() -> None:
    d = docs()
    a = get(d, "/latest/meta-data/hostname")
    assert a is get(d, "/latest/meta-data/hostname/")
    assert isinstance(a, Document) and a.etag.startswith('"') and len(a.etag) == 26
    other = docs(make_view(hostname="web-2"))
    b = get(other, "/latest/meta-data/hostname")
    assert isinstance(b, Document) and b.etag != a.etag


def test_empty_dhcp_domain() -> None:
    d = docs(dhcp_domain="")
    assert body(d, "/latest/meta-data/hostname") == b"web-1"
    assert body(d, "/latest/meta-data/services") == b"partition"


def test_view_is_not_mutated() -> None:
    view = make_view()
    before = copy.deepcopy(view)
    get(docs(view), "/openstack/latest/network_data.json")
    assert view == before


def test_ami_id_without_image_and_odd_values() -> None:
    d = docs(make_view(image_id=None, launch_index=3))
    assert body(d, "/latest/meta-data/ami-id") == b"ami-00000000"
    assert body(d, "/latest/meta-data/ami-launch-index") == b"3"
    assert d.lookup("/openstack", TODAY) is d.lookup("/openstack", TODAY)


def test_render_node_other_values() -> None:
    from openimds.core.metadata.listing import render_node

    assert render_node(5) == b"5"
    assert render_node(["a", "b"]) == b"a\nb"


def test_parse_view_errors() -> None:
    from openimds.errors import BadRequest

    broken = make_view()
    del broken["instance"]["project_id"]
    with pytest.raises(BadRequest, match="project_id"):
        parse_view(broken)
    with pytest.raises(BadRequest):
        parse_view(make_view(ec2_id="not a number"))
    with pytest.raises(BadRequest):
        parse_view(make_view(user_data="!!notbase64"))


def test_port_without_subnets_has_no_link() -> None:
    view = make_view()
    view["ports"][0]["subnets"] = []
    nd = get(docs(view), "/openstack/latest/network_data.json")
    assert json.loads(nd.body) == {"links": [], "networks": [], "services": []}


def test_forget_drops_what_was_built_and_a_lookup_builds_the_same_again() -> None:
    d = docs()
    paths = ["/openstack", "/latest/meta-data/hostname", "/openstack/latest/network_data.json"]
    before = [get(d, p) for p in paths]
    assert d._memo and d._ec2 and d._os_listing
    d.forget(normalize_path("/latest/meta-data/hostname"))
    assert "/latest/meta-data/hostname" not in d._memo and d._ec2
    d.forget("/openstack")
    assert d._os_listing is None
    d.forget()
    assert not d._memo and not d._ec2 and d._os_listing is None
    again = [get(d, p) for p in paths]
    assert again == before and all(a is not b for a, b in zip(again, before, strict=True))
