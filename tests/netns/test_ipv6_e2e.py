"""The IPv6 metadata paths end to end, from real VM namespaces through the real datapath.

- routed: two tenants with the same dual-stack subnets (10.0.0.0/24 + SLAAC fd00:a::/64)
  behind their own routers; each VM reads its own metadata on `[fe80::a9fe:a9fe%eth0]`
  (the router leg answers for the address, ip6 REDIRECT to the dual-stack :9697 listener,
  the caller found through the MAC of its link-local address) and on the ULA fd00:ec2::254
  (routed through its IPv6 gateway, found through its SLAAC address); every spoof of the
  routed catalogue changes nothing over either address; the router's :9697 is unreachable;
- isolated: the DHCP namespace holds fe80::a9fe:a9fe/128 (and the ULA) on its tap with a
  listener bound to that tap;
- real clients over IPv6: cloud-init's EC2 crawl and OpenStack reader on its own IPv6 URL
  (the Ec2 datasource's fd00:ec2::254), botocore and the AWS JS SDK in IPv6 endpoint mode;
  the link-local URL in cloud-init's form (`%25eth0`) with curl.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from openimds.core.ipam import link_local_address
from openimds.core.names import dhcp_namespace, dhcp_tap
from openimds.host import links
from tests.netns.test_dhcp_e2e import confs_dir  # noqa: F401  (fixture)
from tests.netns.test_dhcp_e2e import tenant as isolated_tenant
from tests.netns.test_proxy import SPOOFS
from tests.netns.test_routed_e2e import make_tenant, wait_router_ready
from tests.support import AWS_JS_PATH, CLOUDINIT_PATH, PYTHON

pytestmark = pytest.mark.netns

LL = "fe80::a9fe:a9fe"
ULA = "fd00:ec2::254"
LL_BASE = f"http://[{LL}%eth0]"
ULA_BASE = f"http://[{ULA}]"
MD = "/openstack/latest/meta_data.json"


def curl(stack: Any, server_id: str, url: str, *extra: str, timeout: int = 10
         ) -> subprocess.CompletedProcess[str]:
    """curl inside the VM (`ip netns exec` directly: the catalogue makes many requests;
    the first request of each test goes through `openimds vm exec`)."""
    return subprocess.run(["ip", "netns", "exec", f"vm-{server_id[:8]}", "curl", "-g", "-sS",
                           "-m", str(timeout), *extra, url],
                          capture_output=True, text=True, timeout=timeout + 20)


def md_of(stack: Any, server_id: str, base: str, *extra: str) -> dict[str, Any]:
    proc = curl(stack, server_id, base + MD, "-f", *extra)
    assert proc.returncode == 0, (base, proc.stderr)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def add_ipv6(stack: Any, tenant: dict[str, Any], cidr: str = "fd00:a::/64") -> dict[str, Any]:
    """A SLAAC subnet on the tenant's network, attached to its router; the server's port
    gains its EUI-64 address (Neutron gives existing ports an address on a new SLAAC
    subnet too)."""
    c = stack.client
    sub = c.create_subnet(f"v6-{tenant['tag']}", tenant["network"]["id"], cidr,
                          ipv6_address_mode="slaac", ipv6_ra_mode="slaac",
                          project_id=tenant["project"]["id"])
    c.add_interface(tenant["router"]["id"], sub["id"])
    return sub


@pytest.fixture
def ula_stack(make_stack: Any) -> Any:
    return make_stack(overrides={"DEFAULT": {"metadata_ipv6_ula": True}})


def spoof_catalogue(other: dict[str, Any]) -> list[tuple[str, str]]:
    """The routed tests' spoofs: the other tenant's identity headers and every header-name
    variant the proxy must strip, plus an X-Forwarded-For naming the other VM's addresses."""
    other_ips = [f["ip_address"] for f in other["server"]["ports"][0]["fixed_ips"]]
    return [
        ("X-Neutron-Router-ID", other["router"]["id"]),
        ("X-Neutron-Network-ID", other["network"]["id"]),
        ("X-Instance-ID", other["server"]["id"]),
        ("X-Instance-ID-Signature", "00"),
        ("X-Tenant-ID", other["project"]["id"]),
        *SPOOFS,
        *[("X-Forwarded-For", ip) for ip in other_ips],
        ("X-Forwarded-For", f"{other['link_local']}, {other_ips[-1]}"),
    ]


def as_curl_headers(headers: list[tuple[str, str]]) -> list[str]:
    return [arg for name, value in headers for arg in ("-H", f"{name}: {value}")]


def token(stack: Any, sid: str, base: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return curl(stack, sid, base + "/latest/api/token", "-X", "PUT",
                "-H", "X-aws-ec2-metadata-token-ttl-seconds: 60", *extra)


def status(stack: Any, sid: str, url: str, *extra: str) -> str:
    return curl(stack, sid, url, "-o", "/dev/null", "-w", "%{http_code}", *extra).stdout


def test_routed_link_local_and_ula(ula_stack: Any) -> None:
    stack = ula_stack
    tenants = []
    for tag in ("a", "b"):
        t = make_tenant(stack, tag)
        t["v6"] = add_ipv6(stack, t)
        t["server"] = stack.client.get("instance", t["server"]["id"])  # now with its v6 IP
        tenants.append(t)
    for t in tenants:
        wait_router_ready(stack, t["router"]["id"])
        stack.plug(t["server"]["id"])
        t["link_local"] = str(link_local_address(t["server"]["ports"][0]["mac_address"]))
    # the two tenants' SLAAC addresses share the prefix, never the address
    v6_of = [t["server"]["ports"][0]["fixed_ips"][-1]["ip_address"] for t in tenants]
    assert all(ip.startswith("fd00:a::") for ip in v6_of) and v6_of[0] != v6_of[1]

    for t, other in (tenants, tenants[::-1]):
        sid = t["server"]["id"]
        stack.wait(lambda s=sid: md_of(stack, s, LL_BASE), 30, f"link-local metadata {sid}")
        cli = stack.vm_exec(sid, "curl", "-g", "-sSf", "-m", "10", LL_BASE + MD)
        assert json.loads(cli.stdout)["uuid"] == sid, cli.stderr
        for base in (LL_BASE, ULA_BASE):
            md = stack.wait(lambda b=base, s=sid: md_of(stack, s, b), 30, f"{base} for {sid}")
            assert md["uuid"] == sid and md["meta"] == {"tenant": t["tag"]}
            # every spoof in the routed catalogue, alone and all together, changes nothing
            spoofs = spoof_catalogue(other)
            for one in spoofs if (t is tenants[0] and base == LL_BASE) else ():
                assert md_of(stack, sid, base, *as_curl_headers([one]))["uuid"] == sid, one
            assert md_of(stack, sid, base, *as_curl_headers(spoofs))["uuid"] == sid
            # tokens: a guest-forwarded PUT gets none; a token is the instance's own, on
            # either address family, and the other tenant's token is refused
            forwarded = token(stack, sid, base, "-H", "Via: 1.1 guest-proxy", "-w",
                              "%{http_code}", "-o", "/dev/null")
            assert forwarded.stdout == "403", forwarded
            mine = token(stack, sid, base, "-f")
            assert mine.returncode == 0 and mine.stdout, mine.stderr
            t.setdefault("tokens", {})[base] = mine.stdout
            iid_url = base + "/latest/meta-data/instance-id"
            assert status(stack, sid, iid_url, "-H",
                          f"X-aws-ec2-metadata-token: {mine.stdout}") == "200"
        v4_token = token(stack, sid, "http://169.254.169.254", "-f").stdout
        assert status(stack, sid, LL_BASE + "/latest/meta-data/instance-id",
                      "-H", f"X-aws-ec2-metadata-token: {v4_token}") == "200"
        # the router's metadata port itself is unreachable over IPv6 too (dropped)
        direct = curl(stack, sid, "http://[fd00:a::1]:9697/", timeout=2)
        assert direct.returncode == 28, (direct.returncode, direct.stderr)
    a, b = tenants
    for base in (LL_BASE, ULA_BASE):
        assert status(stack, a["server"]["id"], base + "/latest/meta-data/instance-id",
                      "-H", f"X-aws-ec2-metadata-token: {b['tokens'][base]}") == "401"


CLIENTS = r"""
import json, os, sys
from unittest import mock
which, out = sys.argv[1], {}
if which == "cloudinit":
    from cloudinit.sources import DataSourceEc2
    from cloudinit.sources.helpers import ec2, openstack
    # cloud-init 22.4's own IPv6 URL: the Ec2 datasource's fd00:ec2::254. (Its link-local
    # form http://[fe80::a9fe:a9fe%25eth0], tried first by newer releases, cannot be fetched
    # with the venv's requests 2.34/urllib3 2.8: they resolve "fe80::...%25eth0" as a name.)
    ula = [u for u in DataSourceEc2.DataSourceEc2.metadata_urls if "[" in u][0]
    out["ula_url"] = ula
    out["ec2"] = ec2.get_instance_metadata("latest", ula, timeout=5, retries=0)
    out["ec2_userdata"] = ec2.get_instance_userdata("latest", ula, timeout=5,
                                                    retries=0).decode()
    def _ec2(self):
        return ec2.get_instance_metadata(metadata_address=self.base_path, timeout=5, retries=0)
    with mock.patch.object(openstack.MetadataReader, "_read_ec2_metadata", _ec2):
        res = openstack.MetadataReader(ula, ssl_details=None, timeout=5, retries=0).read_v2()
    out["uuid"] = res["metadata"]["uuid"]
    out["os_ec2_instance_id"] = res["ec2-metadata"]["instance-id"]
    out["userdata"] = res["userdata"].decode()
elif which == "botocore":
    import botocore.session
    from botocore.utils import IMDSFetcher, IMDSRegionProvider, resolve_imds_endpoint_mode
    session = botocore.session.get_session()
    # botocore's own resolution of AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE, as its
    # credential and region providers do it
    config = {"ec2_metadata_service_endpoint_mode": resolve_imds_endpoint_mode(session)}
    fetcher = IMDSFetcher(timeout=2, num_attempts=1, config=config)
    out["base_url"] = fetcher.get_base_url()
    tok = fetcher._fetch_metadata_token()
    out["token"] = bool(tok)
    out["instance_id"] = fetcher._get_request("latest/meta-data/instance-id", None, tok).text
    out["region"] = IMDSRegionProvider(session).provide()
print(json.dumps(out))
"""

JS_CLIENT = r"""
const imds = require("@smithy/credential-provider-imds");
(async () => {
  const ep = await imds.getInstanceMetadataEndpoint();   // AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE
  const opts = {hostname: ep.hostname, port: ep.port, timeout: 5000};
  const token = (await imds.httpRequest({...opts, method: "PUT", path: "/latest/api/token",
      headers: {"x-aws-ec2-metadata-token-ttl-seconds": "21600"}})).toString();
  const get = async (path) => (await imds.httpRequest({...opts, path,
      headers: {"x-aws-ec2-metadata-token": token}})).toString();
  console.log(JSON.stringify({hostname: ep.hostname, token: token.length > 0,
      instance_id: await get("/latest/meta-data/instance-id"),
      local_ipv4: await get("/latest/meta-data/local-ipv4")}));
})().catch((err) => { console.error(err); process.exit(1); });
"""


def in_vm(server_id: str, argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    base_env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "NO_PROXY": "*",
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
    proc = subprocess.run(["ip", "netns", "exec", f"vm-{server_id[:8]}", *argv],
                          capture_output=True, text=True, timeout=120, env={**base_env, **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_real_clients_over_ipv6(ula_stack: Any) -> None:
    stack = ula_stack
    t = make_tenant(stack, "c")
    add_ipv6(stack, t)
    wait_router_ready(stack, t["router"]["id"])
    stack.plug(t["server"]["id"])
    sid = t["server"]["id"]
    inst = stack.client.get("instance", sid)
    ec2_id = f"i-{inst['ec2_id']:08x}"
    stack.wait(lambda: md_of(stack, sid, ULA_BASE) and md_of(stack, sid, LL_BASE), 30,
               "IPv6 metadata")

    ci = in_vm(sid, [PYTHON, "-c", CLIENTS, "cloudinit"], {"PYTHONPATH": str(CLOUDINIT_PATH)})
    assert ci["ula_url"] == "http://[fd00:ec2::254]"
    assert ci["ec2"]["instance-id"] == ec2_id and ci["ec2"]["local-ipv4"] == "10.0.0.5"
    assert ci["ec2_userdata"] == t["user_data"]
    assert ci["uuid"] == sid and ci["os_ec2_instance_id"] == ec2_id
    assert ci["userdata"] == t["user_data"]

    boto = in_vm(sid, [PYTHON, "-c", CLIENTS, "botocore"],
                 {"AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"})
    assert boto["base_url"] == "http://[fd00:ec2::254]/"
    assert boto["token"] is True and boto["instance_id"] == ec2_id
    assert boto["region"] == inst["availability_zone"][:-1]

    node = shutil.which("node")
    assert node is not None and Path(AWS_JS_PATH).is_dir(), "scripts/setup installs both"
    js = in_vm(sid, [node, "-e", JS_CLIENT], {"NODE_PATH": str(AWS_JS_PATH),
                                              "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv6"})
    assert js == {"hostname": "[fd00:ec2::254]", "token": True, "instance_id": ec2_id,
                  "local_ipv4": "10.0.0.5"}


def test_isolated_link_local_and_ula_from_the_dhcp_namespace(
        confs_dir: Path, make_stack: Any) -> None:  # noqa: F811
    stack = make_stack(dhcp=True, overrides={
        "DEFAULT": {"enable_isolated_metadata": True, "metadata_ipv6_ula": True},
        "dhcp": {"dhcp_confs": str(confs_dir)},
    })
    tenants = [isolated_tenant(stack, tag) for tag in ("i", "j")]
    for t in tenants:  # the same static IPv6 subnet, no gateway, on both isolated networks
        stack.client.create_subnet(f"v6-{t['network']['id'][:4]}", t["network"]["id"],
                                   "fd00:b::/64", gateway_ip=None, enable_dhcp=False,
                                   project_id=t["project"]["id"])
    for t in tenants:
        net = t["network"]["id"]
        listeners = stack.settings.path("proxy", "listeners")
        stack.wait(lambda n=net, d=listeners: all((d / f"network-{n}{x}.json").exists()
                                     for x in ("", "-ipv6", "-ula")), 30, f"v6 specs {net}")
        spec = json.loads((listeners / f"network-{net}-ipv6.json").read_text())
        tap = dhcp_tap(t["dhcp_port_id"])
        assert spec == {"host": LL, "interface": tap, "netns": dhcp_namespace(net),
                        "network_id": net, "port": 80, "router_id": None}
        with links.netlink(dhcp_namespace(net)) as nl:
            assert {f"{LL}/128", f"{ULA}/128"} <= set(nl.addresses(tap))
        stack.plug(t["server"]["id"])
    for t, other in (tenants, tenants[::-1]):
        sid = t["server"]["id"]
        other["server"] = stack.client.get("instance", other["server"]["id"])
        other["router"] = {"id": "00000000-0000-4000-8000-000000000000"}
        other["link_local"] = str(
            link_local_address(other["server"]["ports"][0]["mac_address"]))
        for base in (LL_BASE, ULA_BASE):
            md = stack.wait(lambda b=base, s=sid: md_of(stack, s, b), 30, f"{base} {sid}")
            assert md["uuid"] == sid
            spoofed = md_of(stack, sid, base, *as_curl_headers(spoof_catalogue(other)))
            assert spoofed["uuid"] == sid
    # the agent saw the VMs by their link-local addresses, scoped to their networks
    log = stack.log("agent")
    for t in tenants:
        assert f"network={t['network']['id']} instance={t['server']['id']}" in log
