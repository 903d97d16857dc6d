"""Isolated-network metadata end to end: registry, API, agent, proxy, L3 and DHCP agents.

VMs are plugged with `openimds vm plug SERVER --dhcp`, so their address and their route to
169.254.169.254 come from dnsmasq (udhcpc, option 121), as in a cloud:
- a network without a gateway: curl and Debian's cloud-init OpenStack reader in the VM read
  its own metadata through the qdhcp- namespace's listener;
- two isolated networks with the same CIDR and the same VM IP: each VM gets its own;
- attaching a router flips the subnet to routed metadata (route via the gateway, no DHCP
  listener), detaching flips it back; dnsmasq is never restarted, and after each flip the VM
  re-runs DHCP and still reads its own metadata;
- dnsmasq killed: respawned, leases still served;
- the stack stopped: no qdhcp- namespace, tap or dnsmasq left.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openimds.core.names import dhcp_namespace, router_namespace
from openimds.host import links
from openimds.host.supervise import pid_alive
from tests.support import CLOUDINIT_PATH, PYTHON

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("dnsmasq") is None or shutil.which("udhcpc") is None,
                       reason="needs dnsmasq (dnsmasq-base) and udhcpc"),
]

MD_URL = "http://169.254.169.254/openstack/latest/meta_data.json"

CLOUDINIT_READER = r"""
import json
from cloudinit.sources.helpers import openstack
res = openstack.MetadataReader("http://169.254.169.254", ssl_details=None, timeout=5,
                               retries=2).read_v2()
md = res["metadata"]
ud = res["userdata"]
print(json.dumps({"uuid": md.get("uuid"), "name": md.get("name"),
                  "userdata": ud.decode() if isinstance(ud, bytes) else ud}))
"""


@pytest.fixture
def confs_dir() -> Iterator[Path]:
    """dhcp_confs outside pytest's 0700 tmp dirs: dnsmasq re-reads its files as nobody."""
    path = Path(tempfile.mkdtemp(prefix="openimds-dhcp-e2e-"))
    path.chmod(0o755)
    yield path
    for pid_file in path.glob("*/pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if str(pid_file).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def dhcp_stack(confs_dir: Path, make_stack: Callable[..., Any]) -> Any:
    # confs_dir first: it is torn down last, after the stack stopped the agent
    return make_stack(dhcp=True, overrides={
        "DEFAULT": {"enable_isolated_metadata": True, "dhcp_lease_duration": 300},
        "dhcp": {"dhcp_confs": str(confs_dir)},
    })


def tenant(stack: Any, tag: str, *, gateway: bool = False) -> dict[str, Any]:
    """project, network 10.0.0.0/24 (no gateway unless asked), one instance at 10.0.0.5"""
    c = stack.client
    project = c.create("project", {"name": f"dhcp-{tag}-{uuid.uuid4().hex[:6]}"})
    pid = project["id"]
    net = c.create_network(f"net-{tag}", project_id=pid)
    extra = {} if gateway else {"gateway_ip": None}
    subnet = c.create_subnet(f"sub-{tag}", net["id"], "10.0.0.0/24", project_id=pid, **extra)
    user_data = f"#cloud-config\nhostname: vm-{tag}\n"
    server = c.create_instance(f"server-{tag}", net["id"], project_id=pid, fixed_ip="10.0.0.5",
                               user_data=base64.b64encode(user_data.encode()).decode())
    dhcp_port = next(p for p in c.topology()["ports"]
                     if p["network_id"] == net["id"] and p["device_owner"] == "network:dhcp")
    return {"project": project, "network": net, "subnet": subnet, "server": server,
            "user_data": user_data, "dhcp_ip": dhcp_port["fixed_ips"][0]["ip_address"],
            "dhcp_port_id": dhcp_port["id"]}


def spec_path(stack: Any, network_id: str) -> Path:
    return stack.settings.path("proxy", "listeners", f"network-{network_id}.json")


def opts_text(confs: Path, network_id: str) -> str:
    return (confs / network_id / "opts").read_text()


def dnsmasq_pid(confs: Path, network_id: str) -> int:
    return int((confs / network_id / "pid").read_text())


def wait_served(stack: Any, confs: Path, t: dict[str, Any], *, metadata: bool) -> None:
    net = t["network"]["id"]

    def ready() -> bool:
        pid_file = confs / net / "pid"
        return (links.namespace_exists(dhcp_namespace(net)) and pid_file.exists()
                and pid_alive(int(pid_file.read_text()))
                and spec_path(stack, net).exists() == metadata)

    stack.wait(ready, 30, f"DHCP served for {net} (metadata={metadata})")


def plug_dhcp(stack: Any, server_id: str) -> str:
    """`openimds vm plug --dhcp` (again = renew); returns the VM's IPv4 routes."""
    ns = stack.cli("vm", "plug", server_id, "--dhcp").stdout.strip()
    stack.plugged.add(ns)
    return subprocess.run(["ip", "netns", "exec", ns, "ip", "-4", "route"],
                          capture_output=True, text=True, check=True).stdout


def metadata_of(stack: Any, server_id: str) -> dict[str, Any]:
    proc = stack.vm_exec(server_id, "curl", "-sS", "-f", "-m", "5", MD_URL)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def wait_metadata(stack: Any, server_id: str, timeout: float = 30.0) -> dict[str, Any]:
    result: dict[str, Any] = stack.wait(lambda: metadata_of(stack, server_id), timeout,
                                        f"metadata for {server_id}")
    return result


def test_no_gateway_network_dhcp_route_curl_and_cloud_init(
    dhcp_stack: Any, confs_dir: Path,
) -> None:
    stack = dhcp_stack
    t = tenant(stack, "nogw")
    sid = t["server"]["id"]
    wait_served(stack, confs_dir, t, metadata=True)
    routes = plug_dhcp(stack, sid)
    assert f"169.254.169.254 via {t['dhcp_ip']} dev eth0" in routes
    assert "default" not in routes
    addrs = stack.vm_exec(sid, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    assert "10.0.0.5/24" in addrs

    md = wait_metadata(stack, sid)
    assert md["uuid"] == sid and md["name"] == t["server"]["name"]

    ci = stack.vm_exec(sid, PYTHON, "-c", CLOUDINIT_READER,
                       env={"PYTHONPATH": str(CLOUDINIT_PATH)})
    assert ci.returncode == 0, ci.stderr[-3000:]
    got = json.loads(ci.stdout.strip().splitlines()[-1])
    assert got == {"uuid": sid, "name": t["server"]["name"], "userdata": t["user_data"]}

    # the host's resolv.conf was never the client's to write
    assert Path(f"/etc/netns/vm-{sid[:8]}/resolv.conf").exists()


def test_two_isolated_networks_with_overlapping_cidrs(dhcp_stack: Any, confs_dir: Path) -> None:
    stack = dhcp_stack
    a, b = tenant(stack, "a"), tenant(stack, "b")
    for t in (a, b):
        wait_served(stack, confs_dir, t, metadata=True)
        routes = plug_dhcp(stack, t["server"]["id"])
        assert f"169.254.169.254 via {t['dhcp_ip']} dev eth0" in routes
    for t in (a, b):
        md = wait_metadata(stack, t["server"]["id"])
        assert md["uuid"] == t["server"]["id"]
        assert md["name"] == t["server"]["name"]


def test_router_attach_and_detach_flip_metadata_path(dhcp_stack: Any, confs_dir: Path) -> None:
    stack = dhcp_stack
    t = tenant(stack, "flip", gateway=True)
    other = tenant(stack, "still")  # an isolated network nobody touches
    net, sid = t["network"]["id"], t["server"]["id"]
    sub = t["subnet"]["id"]
    wait_served(stack, confs_dir, t, metadata=True)
    wait_served(stack, confs_dir, other, metadata=True)
    pid = dnsmasq_pid(confs_dir, net)
    other_pid = dnsmasq_pid(confs_dir, other["network"]["id"])
    routes = plug_dhcp(stack, sid)
    assert f"169.254.169.254 via {t['dhcp_ip']} dev eth0" in routes
    assert "default via 10.0.0.1 dev eth0" in routes
    assert wait_metadata(stack, sid)["uuid"] == sid

    # attach: routed metadata via the gateway, no listener in qdhcp-
    router = stack.client.create_router("r-flip", project_id=t["project"]["id"])
    stack.client.add_interface(router["id"], sub)
    stack.wait(lambda: not spec_path(stack, net).exists()
               and "169.254.169.254/32,10.0.0.1" in opts_text(confs_dir, net), 20,
               "flip to routed")
    stack.wait(lambda: links.namespace_exists(router_namespace(router["id"]))
               and stack.settings.path("proxy", "listeners",
                                       f"router-{router['id']}.json").exists(),
               30, "router built")
    routes = plug_dhcp(stack, sid)
    assert "169.254.169.254 via 10.0.0.1 dev eth0" in routes
    assert wait_metadata(stack, sid)["uuid"] == sid
    assert dnsmasq_pid(confs_dir, net) == pid

    # detach: isolated again
    stack.client.remove_interface(router["id"], sub)
    stack.wait(lambda: spec_path(stack, net).exists()
               and f"169.254.169.254/32,{t['dhcp_ip']}" in opts_text(confs_dir, net), 20,
               "flip back to isolated")
    routes = plug_dhcp(stack, sid)
    assert f"169.254.169.254 via {t['dhcp_ip']} dev eth0" in routes
    assert wait_metadata(stack, sid)["uuid"] == sid
    assert dnsmasq_pid(confs_dir, net) == pid and pid_alive(pid)

    # the other network's dnsmasq and listener were never touched
    assert dnsmasq_pid(confs_dir, other["network"]["id"]) == other_pid
    assert spec_path(stack, other["network"]["id"]).exists()
    stack.client.delete("router", router["id"])


def test_dnsmasq_killed_is_respawned_and_leases_served(
    confs_dir: Path, make_stack: Callable[..., Any],
) -> None:
    stack = make_stack(dhcp=True, l3=False, overrides={
        "DEFAULT": {"enable_isolated_metadata": True},
        "dhcp": {"dhcp_confs": str(confs_dir)},
    })
    t = tenant(stack, "respawn")
    net, sid = t["network"]["id"], t["server"]["id"]
    wait_served(stack, confs_dir, t, metadata=True)
    old = dnsmasq_pid(confs_dir, net)
    os.kill(old, signal.SIGKILL)
    new = stack.wait(lambda: (p := dnsmasq_pid(confs_dir, net)) != old and pid_alive(p) and p,
                     20, "dnsmasq respawned")
    assert new != old
    assert "dnsmasq" in stack.log("dhcp-agent") and "respawn" in stack.log("dhcp-agent")
    routes = plug_dhcp(stack, sid)
    assert f"169.254.169.254 via {t['dhcp_ip']} dev eth0" in routes
    assert wait_metadata(stack, sid)["uuid"] == sid

    # the agent is SIGKILLed (its dnsmasq lives on in its own session) and restarted: it
    # converges to one dnsmasq, one tap, one listener
    stack.services["dhcp-agent"].kill()
    stack.stop("dhcp-agent")
    stack.start("dhcp-agent")
    newest = stack.wait(lambda: (p := dnsmasq_pid(confs_dir, net)) != new and pid_alive(p) and p,
                        20, "dnsmasq of the restarted agent")
    stack.wait(lambda: not pid_alive(new), 10, "the orphaned dnsmasq stopped")
    marker = f"--pid-file={confs_dir / net / 'pid'}".encode()
    running = [p for p in os.listdir("/proc") if p.isdigit() and pid_alive(int(p))
               and marker in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]
    assert running == [str(newest)]
    with links.netlink(dhcp_namespace(net)) as nl:
        assert sorted(lk.name for lk in nl.links()) == ["lo", f"tap{t['dhcp_port_id'][:11]}"]
    assert spec_path(stack, net).exists()
    routes = plug_dhcp(stack, sid)
    assert f"169.254.169.254 via {t['dhcp_ip']} dev eth0" in routes
    new = newest

    # stopping everything leaves nothing of the network behind
    tap_ns = dhcp_namespace(net)
    stack.cli("vm", "unplug", sid)
    stack.client.delete("instance", sid)
    stack.client.delete("subnet", t["subnet"]["id"])
    stack.client.delete("network", net)
    def leftover_links() -> list[str]:
        with links.netlink() as nl:
            return [lk.name for lk in nl.links() if lk.name.startswith(("tpb", "brq"))
                    and lk.name[3:].startswith(net[:8])]

    # The bridge goes last, after the namespace and the files: wait for all of it.
    stack.wait(lambda: not links.namespace_exists(tap_ns) and not (confs_dir / net).exists()
               and not leftover_links(), 20, "network removed")
    assert not pid_alive(new)
    assert not spec_path(stack, net).exists()
    assert not leftover_links()
