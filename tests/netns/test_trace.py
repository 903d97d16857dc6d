"""`openimds trace` and `openimds doctor` on a real stack: every hop OK, then each hop broken on
purpose and named by trace as the first failure."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from openimds.core import names
from tests.support import Service, unique_name

pytestmark = pytest.mark.netns

ISOLATED = {"DEFAULT": {"enable_isolated_metadata": True}, "dhcp": {"dnsmasq_user": "root"}}


class World:
    """A routed server `web` (router r1) and an isolated server `iso`, both plugged."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        c = stack.client
        net = c.create_network("t-routed", project_id="tenant-a")
        sub = c.create_subnet("t-routed-sub", net["id"], "10.0.0.0/24", project_id="tenant-a")
        router = c.create_router("t-r1", project_id="tenant-a")
        c.add_interface(router["id"], sub["id"])
        iso = c.create_network("t-iso", project_id="tenant-b")
        c.create_subnet("t-iso-sub", iso["id"], "10.0.0.0/24", gateway_ip=None,
                        project_id="tenant-b")
        self.router_id = router["id"]
        self.iso_net = iso["id"]
        self.web = c.create_instance("web", net["id"], fixed_ip="10.0.0.5",
                                     project_id="tenant-a")
        self.iso = c.create_instance("iso", iso["id"], fixed_ip="10.0.0.5",
                                     project_id="tenant-b")
        stack.wait(lambda: stack.proxy_pid() is not None, 20, "a proxy")

    def plug(self) -> None:
        _, ns = self.stack.plug_many(self.web["id"], self.iso["id"])
        dhcp_ip = self.stack.wait(self._dhcp_ip, 30, "the DHCP port")
        subprocess.run(["ip", "-n", ns, "route", "replace", "169.254.169.254/32", "via",
                        dhcp_ip, "dev", "eth0"], check=True)

    def _dhcp_ip(self) -> str | None:
        for port in self.stack.client.topology()["ports"]:
            if port["network_id"] == self.iso_net and port["device_owner"] == "network:dhcp":
                return str(port["fixed_ips"][0]["ip_address"])
        return None

    def trace(self, server: str, **env: str) -> dict[str, Any]:
        proc = self.stack.cli("trace", server, "-f", "json", check=False) if not env else \
            subprocess.run(
                [sys.executable, "-m", "openimds", "--config", str(self.stack.config), "trace",
                 server, "-f", "json"], capture_output=True, text=True, timeout=60,
                env={**_clean_env(), **env})
        try:
            result: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise AssertionError(f"trace output: {proc.stdout}\n{proc.stderr}") from None
        assert proc.returncode == (0 if result["ok"] else 1)
        return result

    def wait_ok(self, server: str, timeout: float = 30) -> dict[str, Any]:
        last: dict[str, Any] = {}

        def ok() -> bool:
            nonlocal last
            last = self.trace(server)
            return bool(last["ok"])

        try:
            self.stack.wait(ok, timeout, f"trace {server} OK")
        except AssertionError:
            raise AssertionError(json.dumps(last, indent=1)) from None
        return last


def _clean_env() -> dict[str, str]:
    from tests.support import clean_env

    return clean_env()


@pytest.fixture
def world(make_stack: Callable[..., Any]) -> World:
    stack = make_stack(dhcp=True, overrides=ISOLATED)
    w = World(stack)
    w.plug()
    return w


def test_all_hops_ok_and_doctor(world: World) -> None:
    for server, namespace in (("web", names.router_namespace(world.router_id)),
                              ("iso", names.dhcp_namespace(world.iso_net))):
        result = world.wait_ok(server)
        assert result["namespace"] == namespace
        assert [h["status"] for h in result["hops"]] == ["ok"] * 15
        assert all(h["ms"] >= 0 for h in result["hops"])
    table = world.stack.cli("trace", "web").stdout
    assert "all hops OK" in table and "end-to-end" in table
    doctor = world.stack.cli("doctor", "-f", "json", check=False)
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    for name in ("binaries", "secret", "registry", "api", "agent-socket", "proxy"):
        assert checks[name]["status"] == "ok", checks[name]
    assert doctor.returncode == 0


def _vm(world: World, server: str) -> str:
    inst = world.web if server == "web" else world.iso
    return names.vm_namespace(inst["id"])


def _ns_cmd(ns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *argv], check=True, capture_output=True)


def break_vm_namespace(world: World, server: str) -> None:
    world.stack.cli("vm", "unplug", server)


def break_vm_address(world: World, server: str) -> None:
    subprocess.run(["ip", "-n", _vm(world, server), "addr", "flush", "dev", "eth0"], check=True)


def break_vm_route(world: World, server: str) -> None:
    subprocess.run(["ip", "-n", _vm(world, server), "route", "del", "default"], check=True)


def break_hop_namespace(world: World, server: str) -> None:
    world.stack.stop("l3-agent")
    subprocess.run(["ip", "netns", "del", names.router_namespace(world.router_id)], check=True)


def break_intercept(world: World, server: str) -> None:
    world.stack.stop("l3-agent")
    _ns_cmd(names.router_namespace(world.router_id), "nft", "flush", "ruleset")


def break_intercept_isolated(world: World, server: str) -> None:
    world.stack.stop("dhcp-agent")
    ns = names.dhcp_namespace(world.iso_net)
    out = subprocess.run(["ip", "-n", ns, "-j", "addr"], check=True, capture_output=True,
                         text=True).stdout
    for link in json.loads(out):
        for info in link.get("addr_info", []):
            if info.get("local") == "169.254.169.254":
                subprocess.run(["ip", "-n", ns, "addr", "del", "169.254.169.254/"
                                f"{info['prefixlen']}", "dev", link["ifname"]], check=True)


def break_proxy(world: World, server: str) -> None:
    world.stack.stop("l3-agent")  # it would rewrite the spec
    spec = world.stack.settings.path("proxy", "listeners",
                                     f"{names.router_listener_name(world.router_id)}.json")
    spec.unlink()
    pid = world.stack.proxy_pid()
    assert pid is not None
    import os

    os.kill(pid, signal.SIGHUP)
    ns = names.router_namespace(world.router_id)

    def closed() -> bool:
        out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-Hltn"], capture_output=True,
                             text=True).stdout
        return ":9697" not in out

    world.stack.wait(closed, 10, "the proxy to close the listener")


def break_agent_socket(world: World, server: str) -> None:
    world.stack.stop("agent")


def break_lookup(world: World, server: str) -> None:
    # The VM sends from a secondary address that is not its port's IP (Neutron's classic
    # "instance not found"): its own IP is still there, the route too.
    ns = _vm(world, server)
    subprocess.run(["ip", "-n", ns, "addr", "flush", "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "10.0.0.99/24", "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", ns, "addr", "add", "10.0.0.5/24", "dev", "eth0"], check=True)
    subprocess.run(["ip", "-n", ns, "route", "replace", "default", "via", "10.0.0.1"],
                   check=True)


def break_signature(world: World, server: str) -> None:
    stack = world.stack
    stack.stop("api")
    api = Service("api-other-secret", [sys.executable, "-m", "openimds", "--config",
                                       str(stack.config), "api"], stack.logs,
                  env={"OPENIMDS_METADATA_PROXY_SHARED_SECRET": "not-the-agents-secret"})
    stack.services["api"] = api
    s = stack.settings
    from tests.support import tcp_ready

    api.start().wait_until(tcp_ready(s.api.metadata_listen, s.api.metadata_listen_port), 30)


FAKE_API = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.rstrip('/') == '/openstack':
            body, status = b'latest', 200
        else:
            body, status = b'instance documents unavailable', 500
        self.send_response(status); self.send_header('Content-Length', str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
http.server.HTTPServer((sys.argv[1], int(sys.argv[2])), H).serve_forever()
"""


def break_api(world: World, server: str) -> None:
    stack = world.stack
    stack.stop("api")
    s = stack.settings
    fake = Service("fake-api", [sys.executable, "-c", FAKE_API, s.api.metadata_listen,
                                str(s.api.metadata_listen_port)], stack.logs)
    stack.services["api"] = fake
    from tests.support import tcp_ready

    fake.start().wait_until(tcp_ready(s.api.metadata_listen, s.api.metadata_listen_port), 10)


def _vm_rejects(world: World, server: str, family: str, daddr: str) -> None:
    # Everything on the path is right, but the VM's own firewall rejects the request.
    ns = _vm(world, server)
    table = unique_name("t").replace("-", "_")
    rules = (f"table {family} {table} {{\n chain out {{\n  type filter hook output priority 0;"
             f"\n  {family} daddr {daddr} tcp dport 80 reject with tcp reset\n }}\n}}\n")
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
                   check=True)


def break_end_to_end(world: World, server: str) -> None:
    _vm_rejects(world, server, "ip", "169.254.169.254")


def break_v6_intercept(world: World, server: str) -> None:
    # the IPv4 path stays intact; the router leg loses the IPv6 metadata address
    ns = names.router_namespace(world.router_id)
    leg = next(line.split(":")[1].strip().split("@")[0] for line in subprocess.run(
        ["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True,
        check=True).stdout.splitlines() if ": qr-" in line)
    subprocess.run(["ip", "-n", ns, "addr", "del", "fe80::a9fe:a9fe/128", "dev", leg],
                   check=True)


def break_v6_end_to_end(world: World, server: str) -> None:
    _vm_rejects(world, server, "ip6", "fe80::a9fe:a9fe")


CASES: list[tuple[str, str, Callable[[World, str], None]]] = [
    ("web", "vm-namespace", break_vm_namespace),
    ("web", "vm-address", break_vm_address),
    ("web", "vm-route", break_vm_route),
    ("web", "hop-namespace", break_hop_namespace),
    ("web", "intercept", break_intercept),
    ("iso", "intercept", break_intercept_isolated),
    ("web", "proxy", break_proxy),
    ("iso", "agent-socket", break_agent_socket),
    ("web", "lookup", break_lookup),
    ("web", "signature", break_signature),
    ("iso", "api", break_api),
    ("web", "end-to-end", break_end_to_end),
    ("web", "v6-intercept", break_v6_intercept),
    ("web", "v6-end-to-end", break_v6_end_to_end),
]


@pytest.mark.parametrize(("server", "hop", "breaker"), CASES,
                         ids=[f"{s}-{h}" for s, h, _ in CASES])
def test_trace_names_the_broken_hop(world: World, server: str, hop: str,
                                    breaker: Callable[[World, str], None]) -> None:
    world.wait_ok(server)
    breaker(world, server)
    result = world.trace(server)
    assert not result["ok"]
    assert result["failed_hop"] == hop, json.dumps(result, indent=1)
    hops = result["hops"]
    failed = next(h for h in hops if h["status"] == "fail")
    assert failed["advice"], failed
    index = hops.index(failed)
    assert all(h["status"] == "ok" for h in hops[:index])
    assert all(h["status"] == "skip" for h in hops[index + 1:])
    table = world.stack.cli("trace", server, check=False)
    assert table.returncode == 1
    assert f"FAIL {hop}" in table.stdout and "->" in table.stdout


def test_trace_unknown_server(world: World) -> None:
    proc = world.stack.cli("trace", "no-such-server", check=False)
    assert proc.returncode == 1 and "no-such-server" in proc.stderr


def test_doctor_reports_a_dead_agent(world: World) -> None:
    world.stack.stop("agent")
    proc = world.stack.cli("doctor", check=False)
    assert proc.returncode == 1
    assert "FAIL agent-socket" in proc.stdout, proc.stdout
