"""The registry REST API through a real `openimds registry serve`, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import ipaddress
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openimds.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from openimds.registry.client import RegistryClient
from tests.integration.registry_support import BACKENDS, Registry, registry_process

ED25519 = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@host"
)


@pytest.fixture(scope="module", params=BACKENDS)
def reg(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Registry]:
    state = tmp_path_factory.mktemp(f"registry-{request.param}")
    with registry_process(state, request.param, max_page_size=50) as r:
        yield r


@pytest.fixture
def api(reg: Registry) -> Iterator[RegistryClient]:
    with reg.client() as c:
        yield c


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _net(api: RegistryClient, cidr: str = "10.0.0.0/24", **subnet: Any) -> tuple[dict[str, Any],
                                                                              dict[str, Any]]:
    net = api.create("network", {"name": _name("net")})
    sub = api.create("subnet", {"name": _name("sub"), "network_id": net["id"], "cidr": cidr,
                                **subnet})
    return net, sub


def _raw(reg: Registry, method: str, path: str, *, token: str | None = None,
         content: bytes | None = None, json: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {reg.admin_token if token is None else token}"}
    if token == "":
        headers = {}
    return httpx.request(method, reg.url + path, headers=headers, content=content, json=json,
                         timeout=10, trust_env=False)


# ---------------------------------------------------------------------- basics, auth, errors


def test_health_and_openapi_need_no_token(reg: Registry) -> None:
    health = _raw(reg, "GET", "/v1/health", token="")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and isinstance(health.json()["revision"], int)
    doc = _raw(reg, "GET", "/v1/openapi.json", token="").json()
    assert doc["openapi"].startswith("3.1")
    assert "/v1/instances/{id}/view" in doc["paths"]


def test_tokens(reg: Registry) -> None:
    assert _raw(reg, "GET", "/v1/networks", token="").status_code == 401
    wrong = _raw(reg, "GET", "/v1/networks", token="nope")
    assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
    assert _raw(reg, "GET", "/v1/networks", token=reg.reader_token).status_code == 200
    denied = _raw(reg, "POST", "/v1/networks", token=reg.reader_token, json={"name": "x"})
    assert denied.status_code == 403
    with reg.client(admin=False) as reader, pytest.raises(Forbidden):
        reader.create("network", {"name": "x"})
    with reg.client(token="bad") as bad, pytest.raises(Unauthorized):
        bad.topology()


def test_malformed_json_and_unknown_fields(reg: Registry) -> None:
    resp = _raw(reg, "POST", "/v1/networks", content=b'{"name": ')
    assert resp.status_code == 400
    assert resp.json()["field"] == "body" and "malformed JSON" in resp.json()["reason"]
    resp = _raw(reg, "POST", "/v1/networks", json={"name": "n", "colour": "red"})
    assert resp.status_code == 400 and resp.json()["field"] == "colour"
    resp = _raw(reg, "POST", "/v1/networks", json=["not", "an", "object"])
    assert resp.status_code == 400
    resp = _raw(reg, "POST", "/v1/networks", json={"name": "n", "mtu": "big"})
    assert resp.status_code == 400 and resp.json()["field"] == "mtu"
    assert _raw(reg, "GET", "/v1/nothing").status_code == 404
    assert _raw(reg, "GET", f"/v1/networks/{uuid.uuid4()}").json()["error"] == "not_found"


def test_pagination(api: RegistryClient) -> None:
    names = sorted(_name("proj") for _ in range(5))
    created = [api.create("project", {"name": n}) for n in names]
    ids = sorted(p["id"] for p in created)
    seen: list[str] = []
    marker = None
    while True:
        page = api.request("GET", "/v1/projects", params={"limit": 2, "marker": marker})
        assert len(page["projects"]) <= 2
        seen += [p["id"] for p in page["projects"]]
        marker = page["next"]
        if marker is None:
            break
    assert set(ids) <= set(seen) and seen == sorted(seen)
    with pytest.raises(BadRequest):
        api.request("GET", "/v1/projects", params={"limit": "x"})
    with pytest.raises(Conflict):
        api.create("project", {"name": names[0]})


# ---------------------------------------------------------------------- networks and subnets


def test_subnet_defaults_and_dhcp_port(api: RegistryClient) -> None:
    net, sub = _net(api, dns_nameservers=["192.0.2.53"])
    assert sub["gateway_ip"] == "10.0.0.1" and sub["ip_version"] == 4
    assert sub["allocation_pools"] == [{"start": "10.0.0.2", "end": "10.0.0.254"}]
    assert sub["enable_dhcp"] is True and sub["dns_nameservers"] == ["192.0.2.53"]
    assert sub["project_id"] == net["project_id"] and sub["revision"] > net["revision"]
    assert sub["created_at"].endswith("Z")
    dhcp = api.list("port", network_id=net["id"], device_owner="network:dhcp")
    assert len(dhcp) == 1  # no DHCP node yet: one port keeps its address reserved
    assert dhcp[0]["device_id"] == "reserved_dhcp_port"
    assert dhcp[0]["fixed_ips"] == [{"subnet_id": sub["id"], "ip_address": "10.0.0.2"}]
    assert dhcp[0]["mac_address"].startswith("fa:16:3e:")
    # A second DHCP subnet adds an IP to the same DHCP port.
    v6 = api.create("subnet", {"name": "v6", "network_id": net["id"], "cidr": "fd00:1::/64"})
    assert v6["gateway_ip"] == "fd00:1::1" and v6["ip_version"] == 6
    assert v6["allocation_pools"] == [{"start": "fd00:1::2", "end": "fd00:1::ffff:ffff:ffff:ffff"}]
    dhcp = api.list("port", network_id=net["id"], device_owner="network:dhcp")
    assert [i["ip_address"] for i in dhcp[0]["fixed_ips"]] == ["10.0.0.2", "fd00:1::2"]
    assert api.get("network", net["id"])["subnets"] == [sub["id"], v6["id"]]


def test_subnet_options(api: RegistryClient) -> None:
    net = api.create("network", {"name": _name("net"), "mtu": 1450})
    assert net["mtu"] == 1450
    nogw = api.create("subnet", {"network_id": net["id"], "cidr": "10.1.0.0/28",
                                 "gateway_ip": None})
    assert nogw["gateway_ip"] is None
    assert nogw["allocation_pools"] == [{"start": "10.1.0.1", "end": "10.1.0.14"}]
    dhcp = api.list("port", network_id=net["id"], device_owner="network:dhcp")
    assert dhcp[0]["fixed_ips"][0]["ip_address"] == "10.1.0.1"
    net2, sub = _net(api, "10.2.0.0/24", gateway_ip="10.2.0.254", enable_dhcp=False,
                     allocation_pools=[{"start": "10.2.0.100", "end": "10.2.0.110"}],
                     host_routes=[{"destination": "192.168.0.0/16", "nexthop": "10.2.0.9"}])
    assert sub["gateway_ip"] == "10.2.0.254"
    assert sub["host_routes"] == [{"destination": "192.168.0.0/16", "nexthop": "10.2.0.9"}]
    assert api.list("port", network_id=net2["id"]) == []
    inst = api.create("instance", {"name": "pooled", "network_id": net2["id"]})
    assert inst["ports"][0]["fixed_ips"][0]["ip_address"] == "10.2.0.100"
    # Gateway in the middle of the default pool splits it.
    _, mid = _net(api, "10.3.0.0/29", gateway_ip="10.3.0.4")
    assert mid["allocation_pools"] == [{"start": "10.3.0.1", "end": "10.3.0.3"},
                                       {"start": "10.3.0.5", "end": "10.3.0.6"}]


@pytest.mark.parametrize(("body", "field"), [
    ({"cidr": "10.0.0.0/33"}, "cidr"),
    ({"cidr": "not-a-cidr"}, "cidr"),
    ({"cidr": "10.0.0.5/24"}, "cidr"),
    ({"cidr": "10.9.0.0/24", "gateway_ip": "10.8.0.1"}, "gateway_ip"),
    ({"cidr": "10.9.0.0/24", "gateway_ip": "nope"}, "gateway_ip"),
    ({"cidr": "10.9.0.0/24", "dns_nameservers": ["8.8.8"]}, "dns_nameservers[0]"),
    ({"cidr": "10.9.0.0/24", "allocation_pools": [{"start": "10.9.0.1", "end": "10.9.0.9"}]},
     "allocation_pools[0]"),
    ({"cidr": "10.9.0.0/24", "allocation_pools": [{"start": "10.9.1.1", "end": "10.9.1.9"}]},
     "allocation_pools[0].start"),
    ({"cidr": "10.9.0.0/24", "host_routes": [{"destination": "x", "nexthop": "10.9.0.1"}]},
     "host_routes[0].destination"),
    ({"cidr": "10.9.0.0/24", "enable_dhcp": "yes"}, "enable_dhcp"),
])
def test_subnet_bad_input(reg: Registry, api: RegistryClient, body: dict[str, Any],
                          field: str) -> None:
    net = api.create("network", {"name": _name("net")})
    resp = _raw(reg, "POST", "/v1/subnets", json={"network_id": net["id"], **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == field, resp.json()


def test_subnet_overlap_and_unknown_network(reg: Registry, api: RegistryClient) -> None:
    net, _ = _net(api, "10.20.0.0/16")
    resp = _raw(reg, "POST", "/v1/subnets", json={"network_id": net["id"],
                                                  "cidr": "10.20.5.0/24"})
    assert resp.status_code == 409 and "overlaps" in resp.json()["reason"]
    # Overlapping CIDRs on different networks are normal.
    _net(api, "10.20.0.0/16")
    resp = _raw(reg, "POST", "/v1/subnets", json={"network_id": str(uuid.uuid4()),
                                                  "cidr": "10.30.0.0/24"})
    assert resp.status_code == 404 and "network_id" in resp.json()["reason"]


# ---------------------------------------------------------------------- instances


def test_instance_create_allocates_and_fills_defaults(api: RegistryClient) -> None:
    net, sub = _net(api)
    a = api.create("instance", {"name": "Web Server_1", "network_id": net["id"]})
    b = api.create("instance", {"name": "db", "network_id": net["id"], "fixed_ip": "10.0.0.77",
                                "hostname": "db-primary", "availability_zone": "az2",
                                "flavor": "m1.large", "image_id": "img-1",
                                "metadata": {"role": "db"}})
    c = api.create("instance", {"name": "c", "network_id": net["id"]})
    ip = [i["ports"][0]["fixed_ips"][0]["ip_address"] for i in (a, b, c)]
    assert ip == ["10.0.0.3", "10.0.0.77", "10.0.0.4"]  # .1 gateway, .2 DHCP
    assert a["hostname"] == "web-server-1" and b["hostname"] == "db-primary"
    assert a["availability_zone"] == "nova" and a["flavor"] == "m1.small"
    assert b["availability_zone"] == "az2" and b["flavor"] == "m1.large"
    assert a["launch_index"] == 0 and a["project_id"] == net["project_id"]
    assert b["ec2_id"] > a["ec2_id"] and c["ec2_id"] > b["ec2_id"]
    assert b["metadata"] == {"role": "db"} and b["image_id"] == "img-1"
    assert a["ports"][0]["device_id"] == a["id"]
    assert a["ports"][0]["device_owner"] == "compute:nova"
    assert uuid.UUID(a["id"]).version == 4
    got = api.get("instance", a["id"])
    assert got["ports"] == a["ports"] and got["has_password"] is False
    assert api.lookup("10.0.0.77", network_id=net["id"])["ports"][0]["device_id"] == b["id"]
    assert [p["id"] for p in api.list("port", ip_address="10.0.0.77")] == [b["ports"][0]["id"]]
    assert sub["id"] == a["ports"][0]["fixed_ips"][0]["subnet_id"]


def test_networks_get_their_own_vni_and_instances_their_host(api: RegistryClient) -> None:
    a, _ = _net(api)
    b = api.create("network", {"name": _name("net")})
    vnis = [api.get("network", n["id"])["segmentation_id"] for n in (a, b)]
    assert vnis[0] == a["segmentation_id"] and vnis[1] == b["segmentation_id"]
    assert all(isinstance(v, int) and 0 < v < 2**24 for v in vnis) and vnis[0] != vnis[1]
    topo = {n["id"]: n["segmentation_id"] for n in api.topology()["networks"]}
    assert topo[a["id"]] == vnis[0] and topo[b["id"]] == vnis[1]
    placed = api.create("instance", {"name": "p", "network_id": a["id"], "host": "compute-2"})
    free = api.create("instance", {"name": "f", "network_id": a["id"]})
    assert placed["host"] == "compute-2" and free["host"] is None
    assert api.get("instance", placed["id"])["host"] == "compute-2"
    listed = {i["id"]: i["host"] for i in api.list("instance")}
    assert listed[placed["id"]] == "compute-2" and listed[free["id"]] is None
    api.delete("instance", placed["id"])
    api.delete("instance", free["id"])
    api.delete("network", b["id"])  # its segment goes with it
    c = api.create("network", {"name": _name("net")})
    assert c["segmentation_id"] not in (vnis[0],)


def test_instance_bad_input(reg: Registry, api: RegistryClient) -> None:
    net, _ = _net(api)
    api.create("instance", {"name": "one", "network_id": net["id"], "fixed_ip": "10.0.0.9"})

    def post(**body: Any) -> httpx.Response:
        return _raw(reg, "POST", "/v1/instances", json={"name": "x", "network_id": net["id"],
                                                        **body})

    outside = post(fixed_ip="10.0.1.5")
    assert outside.status_code == 400
    assert "10.0.1.5" in outside.json()["reason"] and "10.0.0.0/24" in outside.json()["reason"]
    taken = post(fixed_ip="10.0.0.9")
    assert taken.status_code == 409 and "10.0.0.9" in taken.json()["reason"]
    assert post(fixed_ip="10.0.0.1").status_code == 409  # the gateway
    assert post(fixed_ip="10.0.0.255").status_code == 400  # broadcast
    assert post(fixed_ip="banana").json()["field"] == "fixed_ip"
    unknown = _raw(reg, "POST", "/v1/instances", json={"name": "x",
                                                        "network_id": str(uuid.uuid4())})
    assert unknown.status_code == 404
    big = base64.b64encode(b"x" * (65536 + 1)).decode()
    resp = post(user_data=big)
    assert resp.status_code == 400 and resp.json()["field"] == "user_data"
    assert post(user_data="!!!notbase64").json()["field"] == "user_data"
    assert post(metadata={"k": 5}).status_code == 400
    assert post(key_name="nokey").json()["field"] == "key_name"
    assert post(hostname="bad_host!").json()["field"] == "hostname"
    assert _raw(reg, "POST", "/v1/instances", json={"network_id": net["id"]}).json()[
        "field"] == "name"
    # Nothing half-created: the failed creates left no ports.
    ports = api.list("port", network_id=net["id"])
    assert sorted(p["device_owner"] for p in ports) == ["compute:nova", "network:dhcp"]


def test_user_data_limit_is_inclusive(api: RegistryClient) -> None:
    net, _ = _net(api)
    data = bytes(range(256)) * 256  # exactly 64 KiB, binary
    inst = api.create("instance", {"name": "ud", "network_id": net["id"],
                                   "user_data": base64.b64encode(data).decode()})
    assert base64.b64decode(api.get("instance", inst["id"])["user_data"]) == data
    assert api.get_view(inst["id"])["instance"]["user_data"] == inst["user_data"]


def test_update_metadata_and_password(api: RegistryClient) -> None:
    net, _ = _net(api)
    inst = api.create("instance", {"name": "p", "network_id": net["id"],
                                   "metadata": {"a": "1", "b": "2"}})
    upd = api.update("instance", inst["id"], {"metadata": {"b": "3", "c": "4"},
                                              "metadata_unset": ["a"]})
    assert upd["metadata"] == {"b": "3", "c": "4"} and upd["revision"] > inst["revision"]
    with pytest.raises(NotFound):
        api.update("instance", inst["id"], {"metadata_unset": ["zzz"]})
    assert api.get_password(inst["id"]) is None
    with pytest.raises(BadRequest):
        api.set_password(inst["id"], "x" * 1021)
    api.set_password(inst["id"], "p" * 1020)
    assert api.get_password(inst["id"]) == "p" * 1020
    assert api.get("instance", inst["id"])["has_password"] is True
    with pytest.raises(Conflict):
        api.set_password(inst["id"], "again")
    api.request("DELETE", f"/v1/instances/{inst['id']}/password")
    assert api.get_password(inst["id"]) is None
    api.set_password(inst["id"], "second")
    assert api.get_view(inst["id"])["instance"]["password"] == "second"


def test_keypairs(reg: Registry, api: RegistryClient) -> None:
    project = _name("proj")
    kp = api.create("keypair", {"name": "k1", "public_key": ED25519, "project_id": project})
    blob = base64.b64decode(ED25519.split()[1])
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    assert kp["fingerprint"] == ":".join(digest[i:i + 2] for i in range(0, 32, 2))
    assert kp["type"] == "ssh" and kp["public_key"] == ED25519
    with pytest.raises(Conflict):
        api.create("keypair", {"name": "k1", "public_key": ED25519, "project_id": project})
    # Same name in another project is fine.
    api.create("keypair", {"name": "k1", "public_key": ED25519, "project_id": _name("p")})
    bad = _raw(reg, "POST", "/v1/keypairs", json={"name": "k2", "public_key": "ssh-rsa AAAA!"})
    assert bad.status_code == 400 and bad.json()["field"] == "public_key"
    bad = _raw(reg, "POST", "/v1/keypairs", json={"name": "k2", "public_key": "hello world"})
    assert bad.status_code == 400
    net = api.create("network", {"name": _name("net"), "project_id": project})
    api.create("subnet", {"network_id": net["id"], "cidr": "10.0.0.0/24"})
    inst = api.create("instance", {"name": "withkey", "network_id": net["id"],
                                   "key_name": "k1"})
    assert inst["key_name"] == "k1" and inst["keypair_id"] == kp["id"]
    view = api.get_view(inst["id"])
    assert view["keypair"] == {"id": kp["id"], "name": "k1", "public_key": ED25519,
                               "type": "ssh", "fingerprint": kp["fingerprint"]}
    api.delete("keypair", kp["id"])
    assert api.get_view(inst["id"])["keypair"]["name"] == "k1"  # the copy taken at boot

    # Nova keeps key pairs per user: a key of another project is found when its name is unique.
    lone = _name("lone")
    other = api.create("keypair", {"name": lone, "public_key": ED25519})
    inst = api.create("instance", {"name": "k", "network_id": net["id"], "key_name": lone})
    assert inst["keypair_id"] == other["id"]
    with pytest.raises(BadRequest):  # "k1" now names key pairs in two other projects
        api.create("keypair", {"name": "k1", "public_key": ED25519, "project_id": _name("p")})
        api.create("instance", {"name": "k", "network_id": net["id"], "key_name": "k1"})


# ---------------------------------------------------------------------- routers, view, lookup


def test_router_interfaces_view_and_lookup(reg: Registry, api: RegistryClient) -> None:
    net, sub = _net(api, dns_nameservers=["10.0.0.53"])
    inst = api.create("instance", {"name": "vm", "network_id": net["id"]})
    view = api.get_view(inst["id"])
    vsub = view["ports"][0]["subnets"][0]
    assert vsub["isolated"] is True and vsub["dhcp_ip"] == "10.0.0.2"
    assert vsub["dns_nameservers"] == ["10.0.0.53"] and vsub["cidr"] == "10.0.0.0/24"
    assert view["ports"][0]["network"] == {"id": net["id"], "name": net["name"], "mtu": 1500}
    assert view["instance"]["id"] == inst["id"] and view["keypair"] is None

    router = api.create("router", {"name": _name("r")})
    port = api.add_interface(router["id"], sub["id"])
    assert port["device_owner"] == "network:router_interface"
    assert port["device_id"] == router["id"]
    assert port["fixed_ips"] == [{"subnet_id": sub["id"], "ip_address": "10.0.0.1"}]
    with pytest.raises(Conflict):
        api.add_interface(router["id"], sub["id"])
    with pytest.raises(Conflict):  # another router: the gateway IP is taken
        api.add_interface(api.create("router", {"name": _name("r")})["id"], sub["id"])
    got = api.get("router", router["id"])
    assert got["interfaces"] == [{"port_id": port["id"], "subnet_id": sub["id"],
                                  "network_id": net["id"], "ip_address": "10.0.0.1"}]
    after = api.get_view(inst["id"])
    assert after["ports"][0]["subnets"][0]["isolated"] is False
    assert after["revision"] > view["revision"]

    ip = inst["ports"][0]["fixed_ips"][0]["ip_address"]
    found = api.lookup(ip, router_id=router["id"])
    assert [p["device_id"] for p in found["ports"]] == [inst["id"]]
    assert set(found["ports"][0]) == {"id", "network_id", "device_id", "device_owner",
                                      "project_id", "mac_address"}
    assert api.lookup(f"::ffff:{ip}", network_id=net["id"])["ports"] == found["ports"]
    # Same IP on an overlapping network not behind this router is not found.
    other, _ = _net(api)
    api.create("instance", {"name": "twin", "network_id": other["id"], "fixed_ip": ip})
    assert len(api.lookup(ip, router_id=router["id"])["ports"]) == 1
    assert len(api.lookup(ip, network_id=other["id"])["ports"]) == 1
    assert api.lookup(ip, router_id=str(uuid.uuid4()))["ports"] == []
    for params in ({"ip": ip}, {"ip": ip, "router_id": "a", "network_id": "b"},
                   {"ip": "nope", "network_id": net["id"]}):
        assert _raw(reg, "GET", "/v1/lookup?" + httpx.QueryParams(params).__str__()
                    ).status_code == 400

    with pytest.raises(Conflict):
        api.delete("router", router["id"])
    nogw = api.create("subnet", {"network_id": other["id"], "cidr": "10.99.0.0/24",
                                 "gateway_ip": None})
    with pytest.raises(BadRequest):
        api.add_interface(router["id"], nogw["id"])
    api.remove_interface(router["id"], sub["id"])
    assert api.get_view(inst["id"])["ports"][0]["subnets"][0]["isolated"] is True
    with pytest.raises(NotFound):
        api.remove_interface(router["id"], sub["id"])
    api.delete("router", router["id"])


def test_topology(api: RegistryClient) -> None:
    net, sub = _net(api)
    inst = api.create("instance", {"name": "topo-vm", "network_id": net["id"],
                                   "hostname": "topo"})
    topo = api.topology()
    assert topo["revision"] >= inst["revision"]
    assert net["id"] in {n["id"] for n in topo["networks"]}
    assert sub["id"] in {s["id"] for s in topo["subnets"]}
    by_id = {p["id"]: p for p in topo["ports"]}
    assert by_id[inst["ports"][0]["id"]]["hostname"] == "topo"
    dhcp = [p for p in topo["ports"] if p["network_id"] == net["id"]
            and p["device_owner"] == "network:dhcp"]
    assert dhcp[0]["hostname"] is None


def test_deletes_cascade_and_refuse(api: RegistryClient) -> None:
    net, sub = _net(api)
    inst = api.create("instance", {"name": "del", "network_id": net["id"]})
    with pytest.raises(Conflict):
        api.delete("subnet", sub["id"])
    with pytest.raises(Conflict):
        api.delete("network", net["id"])
    with pytest.raises(Conflict):
        api.delete("port", inst["ports"][0]["id"])
    api.delete("instance", inst["id"])
    with pytest.raises(NotFound):
        api.get("port", inst["ports"][0]["id"])
    with pytest.raises(NotFound):
        api.get("instance", inst["id"])
    free = api.create("port", {"network_id": net["id"], "name": "loose",
                               "fixed_ips": [{"ip_address": "10.0.0.200"}],
                               "mac_address": "FA:16:3E:00:00:01"})
    assert free["mac_address"] == "fa:16:3e:00:00:01"
    with pytest.raises(Conflict):
        api.create("port", {"network_id": net["id"], "mac_address": "fa:16:3e:00:00:01"})
    api.delete("port", free["id"])
    api.delete("subnet", sub["id"])
    assert api.list("port", network_id=net["id"]) == []  # the DHCP port went with it
    api.delete("network", net["id"])
    with pytest.raises(NotFound):
        api.get("network", net["id"])


def test_concurrent_creates_get_unique_ips(api: RegistryClient, reg: Registry) -> None:
    net, _ = _net(api, "10.40.0.0/26")

    def create(i: int) -> str:
        with reg.client() as c:
            inst = c.create("instance", {"name": f"c{i}", "network_id": net["id"]})
            return str(inst["ports"][0]["fixed_ips"][0]["ip_address"])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        ips = list(pool.map(create, range(40)))
    assert len(set(ips)) == 40
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.40.0.0/26") for ip in ips)


@pytest.mark.postgres
def test_two_registries_share_postgres_without_duplicate_ips(tmp_path: Path) -> None:
    with registry_process(tmp_path / "a", "postgres", name="reg-a") as a:
        text = a.config.read_text()
        conn = next(line.split("=", 1)[1].strip() for line in text.splitlines()
                    if line.startswith("connection"))
        with registry_process(tmp_path / "b", "sqlite", name="reg-b", connection=conn) as b:
            with a.client() as c:
                net = c.create("network", {"name": "shared"})
                c.create("subnet", {"network_id": net["id"], "cidr": "10.50.0.0/25"})

            def create(i: int) -> str:
                target = a if i % 2 else b
                with target.client() as c:
                    inst = c.create("instance", {"name": f"s{i}", "network_id": net["id"]})
                    return str(inst["ports"][0]["fixed_ips"][0]["ip_address"])

            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                ips = list(pool.map(create, range(60)))
            assert len(set(ips)) == 60
            with b.client() as c:
                assert c.health()["revision"] == a.client().health()["revision"]


# ---------------------------------------------------------------------- IPv6


def test_ipv6_subnets_address_ports_and_lookup_by_link_local(
        reg: Registry, api: RegistryClient) -> None:
    net, v4 = _net(api)
    slaac = api.create("subnet", {"network_id": net["id"], "cidr": "fd00:1::/64",
                                  "ipv6_address_mode": "slaac", "ipv6_ra_mode": "slaac"})
    assert slaac["ip_version"] == 6 and slaac["gateway_ip"] == "fd00:1::1"
    assert (slaac["ipv6_address_mode"], slaac["ipv6_ra_mode"]) == ("slaac", "slaac")
    assert v4["ipv6_address_mode"] is None
    static = api.create("subnet", {"network_id": net["id"], "cidr": "fd00:2::/64"})
    assert static["ipv6_address_mode"] is None
    inst = api.create("instance", {"name": "vm6", "network_id": net["id"]})
    port = inst["ports"][0]
    mac = port["mac_address"]
    b = bytes(int(x, 16) for x in mac.split(":"))
    iid = bytes([b[0] ^ 2, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    eui = str(ipaddress.IPv6Address(b"\xfd\x00\x00\x01" + bytes(4) + iid))
    link_local = str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + iid))
    by_subnet = {f["subnet_id"]: f["ip_address"] for f in port["fixed_ips"]}
    # one IPv4 from the pool, the EUI-64 address on the SLAAC subnet, one static IPv6
    assert by_subnet[v4["id"]] == "10.0.0.3"
    assert by_subnet[slaac["id"]] == eui
    assert ipaddress.ip_address(by_subnet[static["id"]]) in ipaddress.ip_network("fd00:2::/64")
    # the DHCP port gets its EUI-64 address on the SLAAC subnet too
    dhcp = api.list("port", network_id=net["id"], device_owner="network:dhcp")[0]
    assert any(f["subnet_id"] == slaac["id"] for f in dhcp["fixed_ips"])

    # lookup: global address by fixed IP, link-local by the MAC its EUI-64 came from
    for ip in (eui, by_subnet[static["id"]], link_local, link_local.upper() + "%eth0"):
        found = api.lookup(ip, network_id=net["id"])["ports"]
        assert [p["device_id"] for p in found] == [inst["id"]], ip
    router = api.create("router", {"name": _name("r6")})
    gw = api.add_interface(router["id"], slaac["id"])
    assert gw["fixed_ips"] == [{"subnet_id": slaac["id"], "ip_address": "fd00:1::1"}]
    assert [p["device_id"] for p in api.lookup(link_local, router_id=router["id"])["ports"]] \
        == [inst["id"]]
    other, _ = _net(api)  # a link-local source is only looked up on the caller's networks
    assert api.lookup(link_local, network_id=other["id"])["ports"] == []
    # a privacy address carries no MAC: nobody (Neutron's LP#1460177)
    assert api.lookup("fe80::1234:5678:9abc:def0", network_id=net["id"])["ports"] == []
    view_sub = {s["id"]: s for s in api.get_view(inst["id"])["ports"][0]["subnets"]}
    assert view_sub[slaac["id"]]["ipv6_address_mode"] == "slaac"
    assert view_sub[slaac["id"]]["ip_version"] == 6


@pytest.mark.parametrize("body,field", [
    ({"cidr": "10.1.0.0/24", "ipv6_address_mode": "slaac"}, "ipv6_address_mode"),
    ({"cidr": "fd00:9::/64", "ipv6_address_mode": "dhcp"}, "ipv6_address_mode"),
    ({"cidr": "fd00:9::/64", "ipv6_address_mode": "slaac", "ipv6_ra_mode": "dhcpv6-stateful"},
     "ipv6_ra_mode"),
    ({"cidr": "fd00:9::/80", "ipv6_address_mode": "slaac"}, "cidr"),
    ({"cidr": "fd00:9::/64", "ip_version": 4}, "ip_version"),
])
def test_ipv6_subnet_bad_modes(reg: Registry, api: RegistryClient, body: dict[str, Any],
                               field: str) -> None:
    net = api.create("network", {"name": _name("net")})
    resp = _raw(reg, "POST", "/v1/subnets", json={"network_id": net["id"], **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["reason"].startswith(field)


def test_a_new_slaac_subnet_addresses_existing_ports(api: RegistryClient) -> None:
    net, v4 = _net(api)
    inst = api.create("instance", {"name": "early", "network_id": net["id"]})
    router = api.create("router", {"name": _name("r")})
    api.add_interface(router["id"], v4["id"])
    slaac = api.create("subnet", {"network_id": net["id"], "cidr": "fd00:7::/64",
                                  "ipv6_address_mode": "slaac"})
    port = api.get("instance", inst["id"])["ports"][0]
    got = {f["subnet_id"]: f["ip_address"] for f in port["fixed_ips"]}
    assert ipaddress.ip_address(got[slaac["id"]]) in ipaddress.ip_network("fd00:7::/64")
    assert ipaddress.ip_address(got[slaac["id"]]).packed[-3:] == bytes(
        int(x, 16) for x in port["mac_address"].split(":")[3:])  # EUI-64 of its MAC
    # the router's port on the IPv4 subnet gains nothing (router ports hold gateways only)
    rport = api.get("router", router["id"])["interfaces"]
    assert [i["subnet_id"] for i in rport] == [v4["id"]]
    assert [p["device_id"] for p in api.lookup(got[slaac["id"]], network_id=net["id"])[
        "ports"]] == [inst["id"]]


def test_no_fixed_address_on_a_slaac_subnet(api: RegistryClient) -> None:
    net = api.create("network", {"name": _name("net")})
    api.create("subnet", {"network_id": net["id"], "cidr": "fd00:3::/64",
                          "ipv6_address_mode": "dhcpv6-stateless"})
    with pytest.raises(BadRequest, match="EUI-64"):
        api.create("instance", {"name": "x", "network_id": net["id"], "fixed_ip": "fd00:3::99"})
    inst = api.create("instance", {"name": "y", "network_id": net["id"]})
    assert [f["ip_address"] for f in inst["ports"][0]["fixed_ips"]][0].startswith("fd00:3::")


def test_a_held_write_outlasts_the_clients_read_timeout(tmp_path: Path) -> None:
    """A create on a fixed IP released moments ago is answered after the reuse hold: the
    client (CLI) waits for it as long as the hold, not only its read timeout, so a create that
    committed is never reported as failed."""
    import time

    from openimds.config import load_settings

    with registry_process(tmp_path, "sqlite", reuse_hold=3.0) as r:
        settings = load_settings(str(r.config), environ={})
        with RegistryClient.from_settings(settings, admin=True, timeout_s=1.0) as c:
            assert c.write_timeout_s == 1.0 + 3.0
            net, _ = _net(c)
            first = c.create("instance", {"name": _name("a"), "network_id": net["id"],
                                          "fixed_ip": "10.0.0.9"})
            c.delete("instance", first["id"])
            started = time.monotonic()
            again = c.create("instance", {"name": _name("b"), "network_id": net["id"],
                                          "fixed_ip": "10.0.0.9"})
            assert time.monotonic() - started >= 3.0 - 0.1  # it was held
            assert again["id"] != first["id"]
            with pytest.raises(NotFound):  # a GET keeps the short read timeout's meaning
                c.request("GET", f"/v1/instances/{first['id']}")
