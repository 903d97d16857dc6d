"""The routed metadata path end to end, on real namespaces and real processes.

Two tenants with overlapping 10.0.0.0/24 subnets behind two routers, one VM each, both
10.0.0.5. Inside each VM: curl 169.254.169.254 and Debian's cloud-init OpenStack reader see that
VM's own instance; spoofed headers change nothing; a direct connection to the router's :9697
is dropped. Then the lifecycle: the proxy killed and respawned, the L3 agent SIGKILLed and
restarted (no duplicates; a router deleted meanwhile is cleaned up), a router deleted live.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import time
import uuid

import pytest

from openimds.core.names import router_namespace
from openimds.host import links
from tests.support import CLOUDINIT_PATH, PYTHON

pytestmark = pytest.mark.netns

MD_URL = "http://169.254.169.254/openstack/latest/meta_data.json"
UD_URL = "http://169.254.169.254/openstack/latest/user_data"

CLOUDINIT_READER = r"""
import json
from cloudinit.sources.helpers import openstack
res = openstack.MetadataReader("http://169.254.169.254", ssl_details=None, timeout=5,
                               retries=2).read_v2()
md = res["metadata"]
ud = res["userdata"]
print(json.dumps({
    "uuid": md.get("uuid"), "name": md.get("name"), "public_keys": md.get("public_keys"),
    "meta": md.get("meta"),
    "userdata": ud.decode() if isinstance(ud, bytes) else ud,
    "ec2_instance_id": (res.get("ec2-metadata") or {}).get("instance-id"),
}))
"""


def ns_exec(ns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *argv], capture_output=True, text=True,
                          check=check, timeout=30)


def make_tenant(stack, tag: str) -> dict:
    """project, network 10.0.0.0/24, router with that interface, keypair, one instance .5"""
    c = stack.client
    project = c.create("project", {"name": f"tenant-{tag}-{uuid.uuid4().hex[:6]}"})
    pid = project["id"]
    net = c.create_network(f"net-{tag}", project_id=pid)
    subnet = c.create_subnet(f"sub-{tag}", net["id"], "10.0.0.0/24", project_id=pid)
    router = c.create_router(f"router-{tag}", project_id=pid)
    c.add_interface(router["id"], subnet["id"])
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + os.urandom(32)
    pubkey = f"ssh-ed25519 {base64.b64encode(blob).decode()} {tag}@lab"
    c.create("keypair", {"name": f"key-{tag}", "public_key": pubkey, "project_id": pid})
    user_data = f"#cloud-config\nhostname: vm-{tag}\n"
    server = c.create_instance(
        f"server-{tag}", net["id"], project_id=pid, fixed_ip="10.0.0.5", key_name=f"key-{tag}",
        user_data=base64.b64encode(user_data.encode()).decode(), metadata={"tenant": tag},
    )
    return {"tag": tag, "project": project, "network": net, "subnet": subnet, "router": router,
            "server": server, "pubkey": pubkey, "user_data": user_data, "key": f"key-{tag}"}


def curl(stack, server_id: str, url: str, *extra: str, timeout: int = 10):
    return stack.vm_exec(server_id, "curl", "-sS", "-m", str(timeout), *extra, url)


def metadata_of(stack, server_id: str, *extra: str) -> dict:
    proc = curl(stack, server_id, MD_URL, "-f", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def wait_metadata(stack, server_id: str, timeout: float = 30.0) -> dict:
    return stack.wait(lambda: metadata_of(stack, server_id), timeout,
                      f"metadata for {server_id}")


def wait_router_ready(stack, router_id: str) -> None:
    spec = stack.settings.path("proxy", "listeners", f"router-{router_id}.json")
    stack.wait(lambda: links.namespace_exists(router_namespace(router_id)) and spec.exists(),
               30, f"router {router_id} built")


def router_snapshot(router_id: str) -> tuple:
    ns = router_namespace(router_id)
    with links.netlink(ns) as nl:
        legs = sorted((lk.name, lk.mac, tuple(nl.addresses(lk.name))) for lk in nl.links())
    return legs, ns_exec(ns, "nft", "list", "ruleset").stdout


def proxy_logs(stack) -> str:
    """The fixture's proxy log plus the log of any proxy the L3 agent respawned."""
    spawned = stack.settings.path("proxy", "proxy-spawned.log")
    return stack.log("proxy") + (spawned.read_text(errors="replace") if spawned.exists() else "")


def test_two_tenants_overlapping_subnets(stack):
    a, b = make_tenant(stack, "a"), make_tenant(stack, "b")
    for t in (a, b):
        wait_router_ready(stack, t["router"]["id"])
        assert stack.plug(t["server"]["id"]) == f"vm-{t['server']['id'][:8]}"

    for t, other in ((a, b), (b, a)):
        sid = t["server"]["id"]
        md = wait_metadata(stack, sid)
        assert md["uuid"] == sid
        assert md["name"] == t["server"]["name"]
        assert md["public_keys"] == {t["key"]: t["pubkey"]}
        assert md["meta"] == {"tenant": t["tag"]}
        ud = curl(stack, sid, UD_URL, "-f")
        assert ud.returncode == 0 and ud.stdout == t["user_data"]

        # spoofed identity headers from the VM change nothing
        spoofed = metadata_of(
            stack, sid,
            "-H", f"X-Neutron-Router-ID: {other['router']['id']}",
            "-H", f"X-Neutron-Network-ID: {other['network']['id']}",
            "-H", f"X-Instance-ID: {other['server']['id']}",
            "-H", "X-Instance-ID-Signature: 00",
            "-H", f"X-Tenant-ID: {other['project']['id']}",
            "-H", "X-Forwarded-For: 10.0.0.99",
        )
        assert spoofed["uuid"] == sid

        # a direct connection to the router's metadata port is dropped (timeout, not refused)
        direct = curl(stack, sid, "http://10.0.0.1:9697/", timeout=2)
        assert direct.returncode == 28, (direct.returncode, direct.stderr)

        # Debian's cloud-init OpenStack reader, run inside the VM
        ci = stack.vm_exec(sid, PYTHON, "-c", CLOUDINIT_READER,
                           env={"PYTHONPATH": str(CLOUDINIT_PATH)})
        assert ci.returncode == 0, ci.stderr[-3000:]
        got = json.loads(ci.stdout.strip().splitlines()[-1])
        assert got["uuid"] == sid and got["name"] == t["server"]["name"]
        assert got["public_keys"] == {t["key"]: t["pubkey"]}
        assert got["userdata"] == t["user_data"]


def test_router_lifecycle_proxy_and_agent_restarts(stack):
    a, b = make_tenant(stack, "a"), make_tenant(stack, "b")
    ra, rb = a["router"]["id"], b["router"]["id"]
    for t in (a, b):
        wait_router_ready(stack, t["router"]["id"])
        stack.plug(t["server"]["id"])
        wait_metadata(stack, t["server"]["id"])

    # the proxy is killed: the L3 agent starts a new one, which re-opens every listener
    old = stack.proxy_pid()
    assert old is not None
    stack.services["proxy"].kill()
    new = stack.wait(lambda: (p := stack.proxy_pid()) is not None and p != old and p, 10,
                     "a respawned proxy")
    assert new != old
    for t in (a, b):
        assert wait_metadata(stack, t["server"]["id"], 10)["uuid"] == t["server"]["id"]

    # the L3 agent dies at an arbitrary moment and restarts: same state, no duplicates
    before = {r: router_snapshot(r) for r in (ra, rb)}
    stack.services["l3-agent"].kill()
    stack.stop("l3-agent")
    # meanwhile tenant b's router goes away in the registry
    stack.client.remove_interface(rb, b["subnet"]["id"])
    stack.client.delete("router", rb)
    stack.start("l3-agent")
    stack.wait(lambda: not links.namespace_exists(router_namespace(rb)), 20,
               "stale router removed after restart")
    assert not stack.settings.path("proxy", "listeners", f"router-{rb}.json").exists()
    assert router_snapshot(ra) == before[ra]
    assert wait_metadata(stack, a["server"]["id"])["uuid"] == a["server"]["id"]
    # b's VM lost its router: no metadata
    assert curl(stack, b["server"]["id"], MD_URL, "-f", timeout=2).returncode != 0

    # killed in the middle of building a router: the restarted agent finishes it, once
    c = make_tenant(stack, "c")
    rc = c["router"]["id"]
    time.sleep(0.15)
    stack.services["l3-agent"].kill()
    stack.stop("l3-agent")
    stack.start("l3-agent")
    wait_router_ready(stack, rc)
    stack.plug(c["server"]["id"])
    assert wait_metadata(stack, c["server"]["id"])["uuid"] == c["server"]["id"]
    legs, ruleset = router_snapshot(rc)
    assert len([leg for leg in legs if leg[0].startswith("qr-")]) == 1
    assert ruleset.count("redirect to :9697") == 2  # one per family (IPv4, fe80::a9fe:a9fe)

    # a router deleted live: legs, rules, listener and namespace go
    stack.client.remove_interface(ra, a["subnet"]["id"])
    stack.wait(lambda: len(router_snapshot(ra)[0]) == 1, 20, "leg removed")  # only lo left
    stack.client.delete("router", ra)
    stack.wait(lambda: not links.namespace_exists(router_namespace(ra)), 20, "router removed")
    assert not stack.settings.path("proxy", "listeners", f"router-{ra}.json").exists()
    stack.wait(lambda: f"proxy.listener_closed name=router-{ra}" in proxy_logs(stack), 10,
               "the proxy closed the deleted router's listener")
    stack.wait(lambda: f"proxy.listener_closed name=router-{rb}" in proxy_logs(stack), 10,
               "the proxy closed the listener of the router deleted while the agent was down")
    assert sorted(p.name for p in stack.settings.path("l3", "routers").iterdir()) == [rc]


def test_iptables_driver_end_to_end(make_stack):
    """[l3] firewall_driver = iptables: the same path through iptables-nft rules."""
    stack = make_stack(overrides={"l3": {"firewall_driver": "iptables"}})
    t = make_tenant(stack, "ipt")
    wait_router_ready(stack, t["router"]["id"])
    sid = t["server"]["id"]
    stack.plug(sid)
    assert wait_metadata(stack, sid)["uuid"] == sid
    assert curl(stack, sid, "http://10.0.0.1:9697/", timeout=2).returncode == 28
    ns = router_namespace(t["router"]["id"])
    assert "-j REDIRECT --to-ports 9697" in ns_exec(ns, "iptables-save").stdout
    assert "inet openimds" not in ns_exec(ns, "nft", "list", "tables").stdout
