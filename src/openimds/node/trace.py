"""`openimds trace SERVER`: follow one server's metadata request hop by hop.

The seeds' troubleshooting, automated, in the order a request travels:

    vm-namespace    the lab VM's namespace exists                 (vm-<id[:8]>)
    vm-address      eth0 holds the port's fixed IP
    vm-route        169.254.169.254 is routed via the gateway (routed) or the DHCP port (isolated)
    hop-namespace   qrouter-<router> or qdhcp-<network> exists
    intercept       routed: the mark + REDIRECT :80 -> :9697 rules; isolated: 169.254.169.254
                    on the DHCP tap
    proxy           a listener in that namespace (ss inside it), the listener spec, proxy pid
    agent-socket    the agent's Unix socket accepts a connection
    lookup          the registry maps (ip, router|network) to exactly this server's port
    signature       the API accepts our signature made with the configured secret
    api             the API answers meta_data.json with this server's uuid
    end-to-end      a real request from inside the VM namespace gets its own meta_data.json
    v6-intercept    routed: fe80::a9fe:a9fe/128 on a router leg and its ip6 REDIRECT; isolated:
                    fe80::a9fe:a9fe on the DHCP tap (when the network has an IPv6 subnet)
    v6-lookup       the registry maps the VM's link-local address (EUI-64 of its MAC) to it
    v6-end-to-end   a real request to [fe80::a9fe:a9fe%eth0]:80 gets its own meta_data.json
    ula-end-to-end  with metadata_ipv6_ula: the same to [fd00:ec2::254]:80

Each hop prints OK with its time, or FAIL with what to do; hops after the first failure are
not checked. Verdicts over captured command output are the pure `judge_*` functions below.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from openimds.config import Settings
from openimds.core import names
from openimds.core.ipam import link_local_address
from openimds.core.signing import sign_instance_id
from openimds.errors import CommandFailed, NotFound
from openimds.host import netns
from openimds.host.run import run
from openimds.node.checks import (
    FAIL,
    Check,
    CheckFailed,
    CheckResult,
    first_failure,
    render_line,
    run_checks,
)

METADATA_IP = "169.254.169.254"
METADATA_IPV6 = "fe80::a9fe:a9fe"
METADATA_ULA = "fd00:ec2::254"
META_DATA_PATH = "/openstack/latest/meta_data.json"


# --- pure verdicts ---------------------------------------------------------------------------

def judge_vm_address(addr_json: str, ip: str) -> str:
    """`ip -j addr show` output must hold ip on some interface other than lo."""
    for link in json.loads(addr_json or "[]"):
        for info in link.get("addr_info", []):
            if info.get("local") == ip:
                state = link.get("operstate", "?")
                if state == "DOWN":
                    raise CheckFailed(
                        f"{ip} is on {link.get('ifname')} but the link is DOWN",
                        "bring it up: openimds vm exec SERVER -- ip link set eth0 up",
                    )
                return f"{ip}/{info.get('prefixlen')} on {link.get('ifname')}"
    raise CheckFailed(
        f"no interface holds {ip}",
        "the VM has no address: re-plug it (openimds vm unplug/plug SERVER), or for --dhcp "
        "check the DHCP agent and dnsmasq logs under $state_path",
    )


def judge_route(route_json: str, via: str | None) -> str:
    """`ip -j route get 169.254.169.254` must go via the expected next hop."""
    try:
        routes = json.loads(route_json or "[]")
    except json.JSONDecodeError:
        routes = []
    if not routes:
        raise CheckFailed(
            f"no route to {METADATA_IP}",
            "routed: add the default route via the subnet gateway; isolated: the DHCP lease "
            "must carry option 121 (udhcpc -O staticroutes)",
        )
    route = routes[0]
    gateway = route.get("gateway")
    dev = route.get("dev", "?")
    if via is not None and gateway != via:
        got = f"via {gateway}" if gateway else "directly on-link"
        raise CheckFailed(
            f"{METADATA_IP} is routed {got} dev {dev}, expected via {via}",
            "the VM would not reach the metadata proxy: fix its routes (re-plug it, or check "
            "the DHCP option 121 route)",
        )
    return f"{METADATA_IP} via {gateway or 'on-link'} dev {dev}"


def route_source(route_json: str) -> str | None:
    """The source address the VM uses toward 169.254.169.254 (what the proxy will see)."""
    try:
        routes = json.loads(route_json or "[]")
    except json.JSONDecodeError:
        return None
    return str(routes[0]["prefsrc"]) if routes and routes[0].get("prefsrc") else None


def judge_nft_redirect(ruleset: str, port: int, ip: str = METADATA_IP) -> str:
    """The router's nft ruleset must REDIRECT ip:80 to port."""
    text = " ".join(ruleset.split())
    if ip not in text:
        raise CheckFailed(
            f"no rule mentions {ip} in the router namespace's nftables",
            "the L3 agent has not written the metadata rules: check that openimds l3-agent is "
            "running and its log",
        )
    if not any(ip in line and f"redirect to :{port}" in line for line in ruleset.splitlines()):
        raise CheckFailed(
            f"no 'redirect to :{port}' rule for {ip}",
            "the REDIRECT is missing: restart openimds l3-agent so it rewrites the rules",
        )
    mark = "meta mark set" in text or "mark set" in text
    return f"REDIRECT {ip}:80 -> :{port}" + (" (marked)" if mark else "")


def judge_iptables_redirect(save_text: str, port: int, ip: str = METADATA_IP) -> str:
    """`iptables-save` (`ip6tables-save`) inside the router must hold Neutron's REDIRECT."""
    for line in save_text.splitlines():
        if ip in line and "REDIRECT" in line and f"--to-ports {port}" in line:
            return f"REDIRECT {ip}:80 -> :{port} (iptables)"
    raise CheckFailed(
        f"no REDIRECT of {ip}:80 to :{port} in iptables-save",
        "the L3 agent has not written the metadata rules: check openimds l3-agent and its log",
    )


def judge_isolated_address(addr_json: str, ip: str = METADATA_IP) -> str:
    """The DHCP namespace (or a router leg) must hold ip on an interface other than lo."""
    for link in json.loads(addr_json or "[]"):
        for info in link.get("addr_info", []):
            if info.get("local") == ip and link.get("ifname") != "lo":
                return f"{ip}/{info.get('prefixlen')} on {link.get('ifname')}"
    raise CheckFailed(
        f"{ip} is not on the DHCP tap" if ip == METADATA_IP else f"{ip} is on no interface",
        "isolated metadata is off or the DHCP agent has not converged: set "
        "enable_isolated_metadata = true and check openimds dhcp-agent" if ip == METADATA_IP
        else "the L3 or DHCP agent has not added it: restart it and check its log",
    )


def judge_listening(ss_text: str, port: int, hosts: Sequence[str]) -> str:
    """`ss -Hltn` output must show a listener on one of hosts:port."""
    for line in ss_text.splitlines():
        cols = line.split()
        if len(cols) < 4:
            continue
        local = cols[3]
        host, _, lport = local.rpartition(":")
        # a listener bound to its device shows as addr%dev (the DHCP tap's, since each node
        # of a network listens on its own tap)
        host = host.partition("%")[0].strip("[]")
        if lport == str(port) and (host in hosts or host in ("*", "0.0.0.0", "::")):
            return f"listening on {local}"
    raise CheckFailed(
        f"nothing listens on port {port} in the namespace",
        "the proxy has no listener here: is openimds proxy running (openimds doctor), and does "
        "the agent's listener spec exist?",
    )


def judge_lookup(body: dict[str, Any], instance_id: str, where: str) -> str:
    """The registry lookup must return exactly one port, owned by this server."""
    ports = body.get("ports", [])
    if not ports:
        raise CheckFailed(
            f"the registry finds no port for {where}",
            "the agent would answer 404: the server's port is not on a network this "
            "router/network serves (check router add-interface and the server's IP)",
        )
    if len(ports) > 1:
        ids = ", ".join(p.get("id", "?") for p in ports)
        raise CheckFailed(f"the registry finds {len(ports)} ports for {where}: {ids}",
                          "ambiguous: two ports hold this IP behind one router; delete one")
    if ports[0].get("device_id") != instance_id:
        raise CheckFailed(
            f"the port found for {where} belongs to {ports[0].get('device_id')}, not this server",
            "another server holds this IP on the router's networks",
        )
    return f"port {ports[0].get('id')} (revision {body.get('revision')})"


def judge_metadata(status: int, body: bytes, instance_id: str) -> str:
    """meta_data.json must be 200 JSON naming this instance."""
    if status != 200:
        snippet = body[:200].decode(errors="replace").strip()
        raise CheckFailed(f"HTTP {status}: {snippet}", _status_advice(status))
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise CheckFailed("meta_data.json is not JSON", "check the API's log") from exc
    uuid = doc.get("uuid") if isinstance(doc, dict) else None
    if uuid != instance_id:
        raise CheckFailed(f"meta_data.json is for {uuid}, not {instance_id}",
                          "the request was attributed to another server: check the lookup")
    return f"200, uuid {uuid}, {len(body)} bytes"


def _status_advice(status: int) -> str:
    return {
        400: "a hop did not set the identifying headers (proxy -> agent)",
        403: "signature rejected: the agent's and the API's metadata_proxy_shared_secret differ",
        404: "the agent could not map the VM to one port, or the API does not know the server",
        502: "a hop behind the proxy answered garbage: check the agent and API logs",
        503: "a hop behind is down (agent socket, API or registry): run openimds doctor",
        504: "a hop behind is too slow: check the API's and registry's logs",
    }.get(status, "check the proxy, agent and API logs")


def parse_http_response(data: bytes) -> tuple[int, bytes]:
    """Status and body of a raw HTTP/1.x response (Connection: close)."""
    head, _, body = data.partition(b"\r\n\r\n")
    first = head.split(b"\r\n", 1)[0].split()
    if len(first) < 2 or not first[1].isdigit():
        raise CheckFailed(f"not an HTTP response: {data[:60]!r}", "check the proxy's log")
    return int(first[1]), body


# --- facts about the server ------------------------------------------------------------------

@dataclass
class TraceContext:
    settings: Settings
    http: httpx.Client
    instance: dict[str, Any]
    ip: str
    network_id: str
    subnet: dict[str, Any]
    router_id: str | None
    dhcp_ip: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def instance_id(self) -> str:
        return str(self.instance["id"])

    @property
    def project_id(self) -> str:
        return str(self.instance["project_id"])

    @property
    def routed(self) -> bool:
        return self.router_id is not None

    @property
    def vm_ns(self) -> str:
        return names.vm_namespace(self.instance_id)

    @property
    def hop_ns(self) -> str:
        if self.router_id is not None:
            return names.router_namespace(self.router_id)
        return names.dhcp_namespace(self.network_id)

    @property
    def listener_name(self) -> str:
        if self.router_id is not None:
            return names.router_listener_name(self.router_id)
        return names.network_listener_name(self.network_id)

    @property
    def where(self) -> str:
        if self.router_id is not None:
            return f"ip {self.ip} behind router {self.router_id}"
        return f"ip {self.ip} on network {self.network_id}"


def registry_client(settings: Settings, timeout_s: float = 5.0) -> httpx.Client:
    token = settings.registry.admin_token or settings.registry.reader_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=settings.registry.effective_url, headers=headers,
                        timeout=timeout_s, trust_env=False)


_API_ADVICE = ("start it: openimds up (or openimds api); check nova_metadata_host/"
               "nova_metadata_port, or nova_metadata_socket against [api] unix_socket")


def api_client(settings: Settings, timeout_s: float = 10.0) -> tuple[httpx.Client, str]:
    """A client to the metadata API the way the agent reaches it: over `nova_metadata_socket`
    when set, else nova_metadata_protocol://host:port with the agent's TLS options; and
    where that is, for messages."""
    s = settings
    if s.nova_metadata_socket:
        return (httpx.Client(base_url="http://localhost", timeout=timeout_s, trust_env=False,
                             transport=httpx.HTTPTransport(uds=s.nova_metadata_socket)),
                f"unix:{s.nova_metadata_socket}")
    url = f"{s.nova_metadata_protocol}://{s.nova_metadata_host}:{s.nova_metadata_port}"
    verify: bool | str = not s.nova_metadata_insecure
    if s.auth_ca_cert and verify:
        verify = s.auth_ca_cert
    cert = (s.nova_client_cert, s.nova_client_priv_key) if s.nova_client_cert else None
    return (httpx.Client(base_url=url, verify=verify, cert=cert, timeout=timeout_s,
                         trust_env=False), url)


def _get(http: httpx.Client, path: str, **params: str) -> Any:
    try:
        resp = http.get(path, params=params or None)
    except httpx.HTTPError as exc:
        raise CheckFailed(f"registry unreachable at {http.base_url}: {exc}",
                          "start it: openimds up (or openimds registry serve)") from exc
    if resp.status_code == 404:
        raise NotFound(f"{path}: not found")
    if resp.status_code >= 400:
        raise CheckFailed(f"registry answered {resp.status_code} for {path}: {resp.text[:200]}",
                          "check the registry tokens in the config / secrets.ini")
    return resp.json()


def find_server(http: httpx.Client, server: str) -> dict[str, Any]:
    """The instance named or identified by `server`. Raises NotFound."""
    try:
        found: dict[str, Any] = _get(http, f"/v1/instances/{server}")
        return found
    except NotFound:
        pass
    marker: str | None = None
    matches: list[dict[str, Any]] = []
    while True:
        params = {"limit": "1000"}
        if marker:
            params["marker"] = marker
        page = _get(http, "/v1/instances", **params)
        matches += [i for i in page.get("instances", []) if i.get("name") == server]
        marker = page.get("next")
        if not marker:
            break
    if not matches:
        raise NotFound(f"no server named or identified {server!r}")
    if len(matches) > 1:
        raise NotFound(f"{len(matches)} servers are named {server!r}: use its id")
    return matches[0]


def build_context(settings: Settings, http: httpx.Client, server: str) -> TraceContext:
    instance = find_server(http, server)
    view = _get(http, f"/v1/instances/{instance['id']}/view")
    ports = view.get("ports") or []
    if not ports or not ports[0].get("fixed_ips"):
        raise NotFound(f"server {server!r} has no port with a fixed IP")
    port = ports[0]
    fixed = port["fixed_ips"][0]
    subnet: dict[str, Any] = next(
        (s for s in port.get("subnets", []) if s["id"] == fixed["subnet_id"]), {}
    )
    router_id: str | None = None
    if not subnet.get("isolated", True):
        marker: str | None = None
        while router_id is None:
            params = {"limit": "1000"}
            if marker:
                params["marker"] = marker
            page = _get(http, "/v1/routers", **params)
            for router in page.get("routers", []):
                if any(i.get("subnet_id") == fixed["subnet_id"]
                       for i in router.get("interfaces", [])):
                    router_id = router["id"]
                    break
            marker = page.get("next")
            if not marker:
                break
    ctx = TraceContext(
        settings=settings, http=http, instance=view.get("instance", instance),
        ip=fixed["ip_address"], network_id=port["network_id"], subnet=subnet,
        router_id=router_id, dhcp_ip=subnet.get("dhcp_ip"),
    )
    ctx.extra["mac"] = str(port.get("mac_address") or "")
    ctx.extra["has_ipv6"] = any(int(s.get("ip_version") or 4) == 6
                                for s in port.get("subnets", []))
    return ctx


# --- probes (I/O) ----------------------------------------------------------------------------

def _cmd(argv: Sequence[str]) -> str:
    try:
        return run(argv, timeout_s=10).stdout
    except CommandFailed as exc:
        raise CheckFailed(exc.reason, "") from exc


def probe_vm_namespace(ctx: TraceContext) -> str:
    if not netns.netns_exists(ctx.vm_ns):
        raise CheckFailed(f"namespace {ctx.vm_ns} does not exist",
                          f"plug the VM: openimds vm plug {ctx.instance.get('name') or ''}".strip())
    return ctx.vm_ns


def probe_vm_address(ctx: TraceContext) -> str:
    return judge_vm_address(_cmd(["ip", "-n", ctx.vm_ns, "-j", "addr", "show"]), ctx.ip)


def probe_vm_route(ctx: TraceContext) -> str:
    if ctx.routed:
        via = ctx.subnet.get("gateway_ip")
    else:
        via = ctx.dhcp_ip
    proc = run(["ip", "-n", ctx.vm_ns, "-j", "route", "get", METADATA_IP], check=False,
               timeout_s=10)
    text = proc.stdout if proc.returncode == 0 else ""
    detail = judge_route(text, via)
    source = route_source(text)
    if source:
        ctx.extra["source_ip"] = source
        detail += f" src {source}"
    return detail


def probe_hop_namespace(ctx: TraceContext) -> str:
    if netns.netns_exists(ctx.hop_ns):
        return ctx.hop_ns
    if ctx.routed:
        raise CheckFailed(f"router namespace {ctx.hop_ns} does not exist",
                          "the L3 agent has not built the router: is openimds l3-agent running? "
                          "see its log under $state_path/log")
    raise CheckFailed(f"DHCP namespace {ctx.hop_ns} does not exist",
                      "the DHCP agent has not built the network: is openimds dhcp-agent running "
                      "and the subnet DHCP-enabled?")


def probe_intercept(ctx: TraceContext) -> str:
    if not ctx.routed:
        return judge_isolated_address(_cmd(["ip", "-n", ctx.hop_ns, "-j", "addr", "show"]))
    port = ctx.settings.metadata_port
    if ctx.settings.l3.firewall_driver == "iptables":
        text = _cmd(["ip", "netns", "exec", ctx.hop_ns, "iptables-save", "-t", "nat"])
        return judge_iptables_redirect(text, port)
    return judge_nft_redirect(_cmd(["ip", "netns", "exec", ctx.hop_ns, "nft", "list",
                                    "ruleset"]), port)


def proxy_pid(settings: Settings) -> int | None:
    """The running proxy's PID from its pid file, if that process is alive."""
    try:
        pid = int(settings.path("proxy", "proxy.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


def probe_proxy(ctx: TraceContext) -> str:
    spec = Path(ctx.settings.proxy.listeners_dir, f"{ctx.listener_name}.json")
    pid = proxy_pid(ctx.settings)
    port = ctx.settings.metadata_port if ctx.routed else 80
    hosts = ("0.0.0.0", "::") if ctx.routed else (METADATA_IP,)
    text = _cmd(["ip", "netns", "exec", ctx.hop_ns, "ss", "-Hltn"])
    try:
        detail = judge_listening(text, port, hosts)
    except CheckFailed as exc:
        if pid is None:
            exc.advice = ("the proxy is not running: start openimds up (or openimds proxy); "
                          f"its pid file is {ctx.settings.path('proxy', 'proxy.pid')}")
        elif not spec.exists():
            exc.advice = (f"listener spec {spec} is missing: the "
                          f"{'L3' if ctx.routed else 'DHCP'} agent has not written it")
        else:
            exc.advice = (f"proxy pid {pid} has the spec {spec.name} but no listener: "
                          "send it SIGHUP and check its log")
        raise
    return detail + (f", proxy pid {pid}" if pid else "")


def probe_agent_socket(ctx: TraceContext) -> str:
    path = ctx.settings.metadata_proxy_socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(path)
        except FileNotFoundError as exc:
            raise CheckFailed(f"{path} does not exist",
                              "the metadata agent is not running: openimds up "
                              "(or openimds agent)") from exc
        except OSError as exc:
            raise CheckFailed(f"cannot connect to {path}: {exc.strerror}",
                              "the agent socket is stale or full: restart openimds agent, "
                              "check metadata_backlog") from exc
    return f"{path} accepts connections"


def probe_lookup(ctx: TraceContext) -> str:
    # The agent looks up the address the request comes from, which is the VM's source address
    # toward 169.254.169.254, not necessarily its port's IP (a secondary address, a wrong
    # manual configuration: Neutron's "instance not found").
    source = str(ctx.extra.get("source_ip") or ctx.ip)
    try:
        return _lookup(ctx, source, "ip")
    except CheckFailed as exc:
        if source != ctx.ip:
            exc.advice = (f"the VM sends from {source}, not its port's IP {ctx.ip}: the agent "
                          "cannot map it to the server; make the port's IP its primary address")
        raise


def _lookup(ctx: TraceContext, source: str, label: str) -> str:
    """The registry's answer for (source, this router or network), judged."""
    params = {"ip": source}
    if ctx.router_id is not None:
        params["router_id"] = ctx.router_id
        where = f"{label} {source} behind router {ctx.router_id}"
    else:
        params["network_id"] = ctx.network_id
        where = f"{label} {source} on network {ctx.network_id}"
    return judge_lookup(_get(ctx.http, "/v1/lookup", **params), ctx.instance_id, where)


def _api_get(ctx: TraceContext, path: str) -> httpx.Response:
    s = ctx.settings
    headers = {
        "X-Instance-ID": ctx.instance_id,
        "X-Tenant-ID": ctx.project_id,
        "X-Instance-ID-Signature": sign_instance_id(s.secret_bytes, ctx.instance_id),
        "X-Forwarded-For": ctx.ip,
    }
    name, _, value = s.api.required_header.partition(":")
    if value.strip():  # [api] required_header: every request must carry it, ours too
        headers[name.strip()] = value.strip()
    client, where = api_client(s)
    try:
        with client:
            return client.get(path, headers=headers)
    except httpx.HTTPError as exc:
        raise CheckFailed(f"metadata API unreachable at {where}: {exc}", _API_ADVICE) from exc


def probe_signature(ctx: TraceContext) -> str:
    resp = _api_get(ctx, "/openstack")
    if resp.status_code == 403:
        raise CheckFailed("the API rejects the signature made with the configured secret",
                          _status_advice(403))
    if resp.status_code >= 400:
        raise CheckFailed(f"HTTP {resp.status_code}: {resp.text[:200].strip()}",
                          _status_advice(resp.status_code))
    return f"HMAC-SHA256 accepted ({resp.status_code})"


def probe_api(ctx: TraceContext) -> str:
    resp = _api_get(ctx, META_DATA_PATH)
    return judge_metadata(resp.status_code, resp.content, ctx.instance_id)


def _ipv6_served(ctx: TraceContext) -> bool:
    """Routers always answer on IPv6; a DHCP namespace only for a network with IPv6."""
    return ctx.routed or bool(ctx.extra.get("has_ipv6"))


def probe_v6_intercept(ctx: TraceContext) -> str:
    if not _ipv6_served(ctx):
        return "the network has no IPv6 subnet: its DHCP namespace serves IPv4 only"
    on_leg = judge_isolated_address(_cmd(["ip", "-n", ctx.hop_ns, "-j", "addr", "show"]),
                                    METADATA_IPV6)
    if not ctx.routed:
        return on_leg
    port = ctx.settings.metadata_port
    if ctx.settings.l3.firewall_driver == "iptables":
        text = _cmd(["ip", "netns", "exec", ctx.hop_ns, "ip6tables-save", "-t", "nat"])
        return f"{on_leg}, {judge_iptables_redirect(text, port, METADATA_IPV6)}"
    ruleset = _cmd(["ip", "netns", "exec", ctx.hop_ns, "nft", "list", "ruleset"])
    return f"{on_leg}, {judge_nft_redirect(ruleset, port, METADATA_IPV6)}"


def probe_v6_lookup(ctx: TraceContext) -> str:
    if not _ipv6_served(ctx):
        return "not served here (no IPv6 subnet)"
    return _lookup(ctx, str(link_local_address(ctx.extra["mac"])), "link-local")


def probe_v6_end_to_end(ctx: TraceContext) -> str:
    if not _ipv6_served(ctx):
        return "not served here (no IPv6 subnet)"
    return _request_from_vm(ctx, METADATA_IPV6, interface="eth0")


def probe_ula_end_to_end(ctx: TraceContext) -> str:
    if not ctx.settings.metadata_ipv6_ula:
        return "metadata_ipv6_ula is off"
    if not _ipv6_served(ctx):
        return "not served here (no IPv6 subnet)"
    return _request_from_vm(ctx, METADATA_ULA)


def probe_end_to_end(ctx: TraceContext) -> str:
    return _request_from_vm(ctx, METADATA_IP)


def _request_from_vm(ctx: TraceContext, address: str, interface: str | None = None) -> str:
    host = f"[{address}]" if ":" in address else address
    gate = ctx.settings.api.required_header.strip()
    extra = f"{gate}\r\n" if gate else ""  # [api] required_header, as a guest must send it
    request = (f"GET {META_DATA_PATH} HTTP/1.1\r\nHost: {host}\r\n{extra}"
               "User-Agent: openimds-trace\r\nConnection: close\r\n\r\n").encode()
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = netns.socket_in_netns(ctx.vm_ns, family, socket.SOCK_STREAM)
    chunks: list[bytes] = []
    with sock:
        sock.settimeout(10)
        try:
            if interface is not None:  # a link-local destination needs its interface
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            sock.connect((address, 80))
            sock.sendall(request)
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        except OSError as exc:
            raise CheckFailed(
                f"request from {ctx.vm_ns} to {host}:80 failed: {exc}",
                "the hops above look right: check the proxy, agent and API logs for this VM's "
                "IP (timeouts mean packets are dropped: check the mark/INPUT rules)",
            ) from exc
    status, body = parse_http_response(b"".join(chunks))
    if b"\r\ntransfer-encoding: chunked" in b"".join(chunks).lower().split(b"\r\n\r\n")[0]:
        body = _dechunk(body)
    return judge_metadata(status, body, ctx.instance_id)


def _dechunk(body: bytes) -> bytes:
    out = bytearray()
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2:]
    return bytes(out)


HOPS: tuple[Check[TraceContext], ...] = (
    Check("vm-namespace", probe_vm_namespace),
    Check("vm-address", probe_vm_address),
    Check("vm-route", probe_vm_route),
    Check("hop-namespace", probe_hop_namespace),
    Check("intercept", probe_intercept),
    Check("proxy", probe_proxy),
    Check("agent-socket", probe_agent_socket),
    Check("lookup", probe_lookup),
    Check("signature", probe_signature),
    Check("api", probe_api),
    Check("end-to-end", probe_end_to_end),
    Check("v6-intercept", probe_v6_intercept),
    Check("v6-lookup", probe_v6_lookup),
    Check("v6-end-to-end", probe_v6_end_to_end),
    Check("ula-end-to-end", probe_ula_end_to_end),
)


def trace(
    settings: Settings, server: str, on_result: Callable[[CheckResult], None] | None = None,
) -> tuple[TraceContext, list[CheckResult]]:
    """Resolve server and run every hop. Raises NotFound if the server does not exist."""
    with registry_client(settings) as http:
        ctx = build_context(settings, http, server)
        return ctx, run_checks(HOPS, ctx, on_result=on_result)


def cmd_trace(args: argparse.Namespace, settings: Settings) -> int:
    fmt = args.format
    t0 = time.perf_counter()
    with registry_client(settings) as http:
        try:
            ctx = build_context(settings, http, args.server)
        except CheckFailed as exc:
            print(render_line(CheckResult("registry", FAIL, exc.reason, exc.advice)))
            return 1
        if fmt == "table":
            print(f"trace {ctx.instance.get('name')} ({ctx.instance_id}): {ctx.where}, "
                  f"{'routed via ' if ctx.routed else 'isolated via '}{ctx.hop_ns}", flush=True)

        def show(result: CheckResult) -> None:
            if fmt == "table":
                print(render_line(result), flush=True)

        results = run_checks(HOPS, ctx, on_result=show)
    failed = first_failure(results)
    if fmt == "json":
        print(json.dumps({"server": ctx.instance_id, "name": ctx.instance.get("name"),
                          "ip": ctx.ip, "router_id": ctx.router_id,
                          "network_id": ctx.network_id, "namespace": ctx.hop_ns,
                          "ok": failed is None, "failed_hop": failed.name if failed else None,
                          "hops": [r.as_dict() for r in results]}, indent=2))
    elif fmt == "value":
        for r in results:
            print(f"{r.name} {r.status}")
    else:
        ms = (time.perf_counter() - t0) * 1000
        print(f"failed at hop {failed.name}" if failed else f"all hops OK in {ms:.0f} ms")
    return 1 if failed else 0
