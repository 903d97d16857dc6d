"""Unmodified real clients against `openimds api` (through a signing relay that plays the
agent): cloud-init's OpenStack reader (`MetadataReader.read_v2()`, EC2 crawl redirected to the
same base URL) and its EC2 helpers, botocore's IMDS fetchers via
AWS_EC2_METADATA_SERVICE_ENDPOINT (IMDSv2 token first), and the IMDSv2-only `ec2-metadata`
package. Each runs in a subprocess; every value must be what the registry holds."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.test_api_server import PUBKEY, USER_DATA, SigningRelay, Stack, api_stack
from tests.support import CLOUDINIT_PATH, PYTHON, clean_env

CLIENT_SCRIPT = r'''
import base64, json, os, sys
from unittest import mock

base = sys.argv[1]
which = sys.argv[2]
out = {}

def jsonable(value):
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value

if which == "cloudinit":
    from cloudinit.sources.helpers import ec2, openstack

    def _ec2(self):
        return ec2.get_instance_metadata(metadata_address=self.base_path,
                                         ssl_details=self.ssl_details, timeout=self.timeout,
                                         retries=self.retries)

    with mock.patch.object(openstack.MetadataReader, "_read_ec2_metadata", _ec2):
        reader = openstack.MetadataReader(base, ssl_details=None, timeout=5, retries=0)
        res = reader.read_v2()
    out["version_used"] = reader._find_working_version()
    out["read_v2"] = jsonable(res)
    mac = res["networkdata"]["links"][0]["ethernet_mac_address"]
    out["net_config"] = openstack.convert_net_json(res["networkdata"], known_macs={mac: "eth0"})
    out["ec2_userdata"] = jsonable(ec2.get_instance_userdata("2009-04-04", base, timeout=5,
                                                             retries=0))
    out["ec2_2009"] = jsonable(ec2.get_instance_metadata("2009-04-04", base, timeout=5,
                                                         retries=0))
elif which == "botocore":
    import botocore.session
    from botocore.utils import (IMDSFetcher, InstanceMetadataFetcher,
                                InstanceMetadataRegionFetcher)
    session = botocore.session.get_session()
    endpoint = session.get_config_variable("ec2_metadata_service_endpoint")
    config = {"ec2_metadata_service_endpoint": endpoint}
    out["endpoint"] = endpoint
    out["region"] = InstanceMetadataRegionFetcher(timeout=2, num_attempts=1,
                                                  config=config).retrieve_region()
    out["credentials"] = InstanceMetadataFetcher(
        timeout=2, num_attempts=1, config=config).retrieve_iam_role_credentials()
    fetcher = IMDSFetcher(timeout=2, num_attempts=1, config=config)
    token = fetcher._fetch_metadata_token()
    out["token"] = bool(token)
    resp = fetcher._get_request("latest/meta-data/instance-id", None, token)
    out["instance_id"] = resp.text
elif which == "ec2metadata":
    from ec2_metadata import EC2Metadata
    md = EC2Metadata()
    md.service_url = base + "/latest/"
    md.dynamic_url = md.service_url + "dynamic/"
    md.metadata_url = md.service_url + "meta-data/"
    md.userdata_url = md.service_url + "user-data/"
    for name in ("ami_id", "ami_launch_index", "ami_manifest_path", "availability_zone",
                 "availability_zone_id", "instance_action", "instance_id",
                 "instance_life_cycle", "instance_type", "kernel_id", "mac",
                 "private_hostname", "private_ipv4", "public_hostname", "public_ipv4",
                 "partition", "domain", "reservation_id", "security_groups", "user_data",
                 "region", "account_id"):
        out[name] = jsonable(getattr(md, name))
    out["public_keys"] = {k: {"openssh_key": v.openssh_key} for k, v in md.public_keys.items()}
print(json.dumps(out))
'''


def run_client(which: str, base: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    extra = {"PYTHONPATH": str(CLOUDINIT_PATH), "AWS_CONFIG_FILE": "/dev/null",
             "AWS_SHARED_CREDENTIALS_FILE": "/dev/null", **(env or {})}
    proc = subprocess.run([PYTHON, "-c", CLIENT_SCRIPT, base, which], capture_output=True,
                          text=True, timeout=120, env=clean_env(extra))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def unb64(value: Any) -> bytes:
    assert isinstance(value, dict) and "b64" in value, value
    return base64.b64decode(value["b64"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("api-clients")
    vendor = root / "vendor.json"
    vendor.write_text(json.dumps({"cloud-init": "#cloud-config\npackages: [htop]\n"}))
    with api_stack(root, api={"vendordata_jsonfile_path": str(vendor)}) as s:
        yield s


@pytest.fixture(scope="module")
def relay(stack: Stack) -> Iterator[SigningRelay]:
    with SigningRelay(stack) as r:
        yield r


def _expected(stack: Stack) -> dict[str, Any]:
    inst = stack.registry.get("instance", stack.instance["id"])
    port = inst["ports"][0]
    return {"inst": inst, "ip": port["fixed_ips"][0]["ip_address"],
            "mac": port["mac_address"], "hostname": f"{inst['hostname']}.novalocal",
            "instance_id": f"i-{inst['ec2_id']:08x}"}


def test_cloud_init_openstack_reader(stack: Stack, relay: SigningRelay) -> None:
    exp = _expected(stack)
    inst = exp["inst"]
    out = run_client("cloudinit", relay.url)
    assert out["version_used"] == "2018-08-27"
    res = out["read_v2"]
    md = res["metadata"]
    assert md["uuid"] == inst["id"]
    assert md["name"] == inst["name"]
    assert md["hostname"] == exp["hostname"]
    assert md["meta"] == inst["metadata"]
    assert md["public_keys"] == {"mykey": PUBKEY}
    assert md["keys"] == [{"name": "mykey", "type": "ssh", "data": PUBKEY}]
    assert md["availability_zone"] == inst["availability_zone"]
    assert md["project_id"] == inst["project_id"]
    assert md["launch_index"] == inst["launch_index"]
    assert len(unb64(md["random_seed"])) == 512  # cloud-init decodes the seed
    assert unb64(res["userdata"]) == USER_DATA
    assert res["vendordata"] == {"cloud-init": "#cloud-config\npackages: [htop]\n"}
    assert res["vendordata2"] == {"static": {"cloud-init": "#cloud-config\npackages: [htop]\n"}}
    nd = res["networkdata"]
    assert nd["links"][0]["ethernet_mac_address"] == exp["mac"]
    assert nd["networks"][0]["network_id"] == stack.network["id"]
    assert nd["services"] == [{"type": "dns", "address": "10.20.0.53"}]
    cfg = out["net_config"]["config"]
    assert cfg[0]["mac_address"] == exp["mac"] and cfg[0]["name"] == "eth0"
    # the EC2 crawl inside read_v2 (latest)
    ec2 = res["ec2-metadata"]
    assert ec2["instance-id"] == exp["instance_id"]
    assert ec2["local-ipv4"] == exp["ip"]
    assert ec2["hostname"] == exp["hostname"]
    assert ec2["placement"] == {"availability-zone": inst["availability_zone"]}
    assert ec2["public-keys"] == {"mykey": [PUBKEY]} or ec2["public-keys"] == {"mykey": PUBKEY}
    assert ec2["block-device-mapping"] == {"ami": "vda", "root": "/dev/vda"}
    assert ec2["mac"] == exp["mac"]
    # no request the crawl made was answered with an error
    failed = [r for r in relay.requests if r[2] >= 400 and "user_data" not in r[1]]
    assert not failed, failed


def test_cloud_init_ec2_2009(stack: Stack, relay: SigningRelay) -> None:
    exp = _expected(stack)
    out = run_client("cloudinit", relay.url)
    assert unb64(out["ec2_userdata"]) == USER_DATA
    ec2 = out["ec2_2009"]
    assert ec2["instance-id"] == exp["instance_id"]
    assert ec2["instance-type"] == exp["inst"]["flavor"]
    assert ec2["local-hostname"] == exp["hostname"]
    assert "mac" not in ec2  # 2009-04-04 is exactly Nova's tree


def test_botocore(stack: Stack, relay: SigningRelay) -> None:
    exp = _expected(stack)
    before = len(relay.requests)
    out = run_client("botocore", relay.url,
                     {"AWS_EC2_METADATA_SERVICE_ENDPOINT": relay.url + "/"})
    assert out["endpoint"] == relay.url + "/"
    assert out["region"] == exp["inst"]["availability_zone"][:-1]
    assert out["credentials"] == {}
    assert out["token"] is True
    assert out["instance_id"] == exp["instance_id"]
    made = relay.requests[before:]
    assert ("PUT", "/latest/api/token", 200) in made


def test_ec2_metadata_package(stack: Stack, relay: SigningRelay) -> None:
    exp = _expected(stack)
    inst = exp["inst"]
    out = run_client("ec2metadata", relay.url)
    assert out["instance_id"] == exp["instance_id"]
    assert out["ami_id"] == "ami-c0ffee00"
    assert out["ami_launch_index"] == inst["launch_index"]
    assert out["ami_manifest_path"] == "FIXME"
    assert out["availability_zone"] == inst["availability_zone"]
    assert out["availability_zone_id"] is None
    assert out["instance_action"] == "none"
    assert out["instance_life_cycle"] == "on-demand"
    assert out["instance_type"] == inst["flavor"]
    assert out["kernel_id"] is None
    assert out["mac"] == exp["mac"]
    assert out["private_hostname"] == exp["hostname"]
    assert out["private_ipv4"] == exp["ip"]
    assert out["public_hostname"] == exp["hostname"]
    assert out["partition"] == "openstack"
    assert out["domain"] == "novalocal"
    assert out["security_groups"] == ["default"]
    assert unb64(out["user_data"]) == USER_DATA
    assert out["public_keys"] == {"mykey": {"openssh_key": PUBKEY}}
    # from the signed instance identity document
    assert out["region"] == "RegionOne"
    assert out["account_id"] == inst["project_id"]
