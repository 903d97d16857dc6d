"""`openimds doctor`: host-wide checks, each OK, WARN or FAIL with what to do.

binaries (ip, nft or iptables, dnsmasq, udhcpc), kernel features (network namespaces,
nf_tables nat, bridge, veth), the registry and the metadata API reachable, the agent's socket
(mode, listen backlog), the proxy running, the shared secret set, and stale state: namespaces
and listener specs the registry no longer describes. Unlike `trace`, every check runs.
Verdicts over captured output are the pure `judge_*` functions.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import pwd
import shutil
import socket
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from openimds.config import Settings
from openimds.core import names
from openimds.errors import CommandFailed
from openimds.host.run import run
from openimds.node.checks import (
    FAIL,
    WARN,
    Check,
    CheckFailed,
    CheckResult,
    CheckWarning,
    render_line,
    run_checks,
)
from openimds.node.trace import api_client, proxy_pid, registry_client

SOCKET_MODES = {"user": 0o644, "group": 0o664, "all": 0o666}


# --- pure verdicts ---------------------------------------------------------------------------

def expected_socket_mode(setting: str, proxy_user: str, proxy_group: str,
                         agent_user: str = "root", agent_group: str = "root") -> int:
    """The socket mode metadata_proxy_socket_mode asks for, with Neutron's `deduce` rule.

    deduce: proxy user empty, 0, root or the agent's own -> user (0644); else proxy group
    empty or the agent's own -> group (0664); else all (0666).
    """
    if setting in SOCKET_MODES:
        return SOCKET_MODES[setting]
    if proxy_user in ("", "0", "root", agent_user):
        return SOCKET_MODES["user"]
    if proxy_group in ("", agent_group):
        return SOCKET_MODES["group"]
    return SOCKET_MODES["all"]


def judge_socket_mode(mode: int, expected: int) -> str:
    if (mode & 0o777) != expected:
        raise CheckWarning(
            f"socket mode {mode & 0o777:04o}, expected {expected:04o}",
            "a proxy running as another user may not connect: check "
            "metadata_proxy_socket_mode",
        )
    return f"mode {mode & 0o777:04o}"


def judge_backlog(ss_text: str, path: str, want: int) -> str:
    """`ss -Hxl` lines: Netid State Recv-Q Send-Q Local ...; for listeners Send-Q = backlog."""
    for line in ss_text.splitlines():
        cols = line.split()
        if path in cols and len(cols) >= 5:
            # with -H and -x: u_str LISTEN recvq sendq path inode ...
            try:
                backlog = int(cols[3])
            except ValueError:
                continue
            if backlog < want:
                raise CheckWarning(
                    f"listen backlog {backlog}, configured {want}",
                    "the kernel caps backlog at net.core.somaxconn: raise it, or a boot "
                    "storm gets EAGAIN at the proxy",
                )
            return f"backlog {backlog}"
    raise CheckWarning(f"{path} is not in ss -xl output", "is the agent listening?")


def judge_neighbour_table(gc_thresh3: int, namespaces: int) -> str:
    """Every VM resolves its gateway and every router its VMs: about 2 entries per namespace
    in a table shared by all namespaces (gc_thresh3 caps it; 1024 by default)."""
    need = 2 * namespaces
    if gc_thresh3 < need:
        raise CheckWarning(
            f"ARP table limit gc_thresh3={gc_thresh3} for {namespaces} namespaces",
            f"raise it before VMs fail with EHOSTUNREACH (neighbor table overflow): sysctl "
            f"-w net.ipv4.neigh.default.gc_thresh3={max(4 * need, 4096)} "
            f"net.ipv4.neigh.default.gc_thresh2={max(2 * need, 2048)}",
        )
    return f"gc_thresh3={gc_thresh3}, room for {gc_thresh3 // 2} namespaces"


def stale_namespaces(
    namespaces: Iterable[str], router_ids: set[str], network_ids: set[str],
    instance_prefixes: set[str],
) -> list[str]:
    """qrouter-/qdhcp-/vm- namespaces the registry no longer describes."""
    stale = []
    for ns in namespaces:
        if ns.startswith(names.ROUTER_NS_PREFIX):
            if ns[len(names.ROUTER_NS_PREFIX):] not in router_ids:
                stale.append(ns)
        elif ns.startswith(names.DHCP_NS_PREFIX):
            if ns[len(names.DHCP_NS_PREFIX):] not in network_ids:
                stale.append(ns)
        elif ns.startswith(names.VM_NS_PREFIX):
            if ns[len(names.VM_NS_PREFIX):] not in instance_prefixes:
                stale.append(ns)
    return stale


def stale_specs(spec_names: Iterable[str], router_ids: set[str],
                network_ids: set[str]) -> list[str]:
    """Listener spec files (<name>.json) for routers/networks the registry no longer has."""
    stale = []
    for name in spec_names:
        stem = name.removesuffix(".json")
        kind, _, ident = stem.partition("-")
        for suffix in ("-ipv6", "-ula"):  # a network's IPv6 listeners (network-<id>-ipv6)
            ident = ident.removesuffix(suffix)
        if (kind == "router" and ident not in router_ids) or \
                (kind == "network" and ident not in network_ids):
            stale.append(name)
    return stale


# --- probes ----------------------------------------------------------------------------------

@dataclass
class DoctorContext:
    settings: Settings
    http: httpx.Client
    topology: dict[str, Any] | None = None


def _binaries(required: Sequence[str], optional: Sequence[str] = ()) -> str:
    missing = [b for b in required if shutil.which(b) is None]
    if missing:
        raise CheckFailed(f"missing: {', '.join(missing)}",
                          "install them: scripts/setup (apt: iproute2 nftables dnsmasq-base "
                          "udhcpc)")
    absent = [b for b in optional if shutil.which(b) is None]
    found = ", ".join(shutil.which(b) or b for b in required)
    if absent:
        raise CheckWarning(f"found {found}; optional missing: {', '.join(absent)}",
                           "only needed for the haproxy comparison and dhclient VMs")
    return found


def probe_binaries(ctx: DoctorContext) -> str:
    firewall = "nft" if ctx.settings.l3.firewall_driver == "nft" else "iptables"
    return _binaries(["ip", firewall, ctx.settings.dhcp.dnsmasq_binary, "udhcpc", "ss"],
                     ["haproxy", "dhclient"])


def probe_kernel(ctx: DoctorContext) -> str:
    if not os.path.exists("/proc/self/ns/net"):
        raise CheckFailed("no network namespace support (/proc/self/ns/net)",
                          "use a kernel with CONFIG_NET_NS")
    if os.geteuid() != 0:
        raise CheckWarning("not root: namespaces, nftables and bridges need root",
                           "run openimds as root")
    try:
        run(["nft", "list", "tables"], timeout_s=10)
    except CommandFailed as exc:
        raise CheckFailed(f"nftables unusable: {exc.reason}",
                          "load nf_tables (modprobe nf_tables nft_nat nft_redir)") from exc
    release = os.uname().release
    missing = []
    if not Path("/lib/modules", release).is_dir():
        return f"netns, nftables on {release} (no module tree: drivers built in)"
    for mod in ("bridge", "veth"):
        if Path("/sys/module", mod).exists():
            continue
        builtin = Path("/lib/modules", release, "modules.builtin")
        if builtin.exists() and f"/{mod}.ko" in builtin.read_text(errors="replace"):
            continue
        if list(Path("/lib/modules", release).glob(f"kernel/**/{mod}.ko*")):
            continue
        missing.append(mod)
    if missing:
        raise CheckWarning(f"kernel modules not found: {', '.join(missing)}",
                           "modprobe them, or check the kernel config")
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    return f"netns, nftables, bridge, veth on {release}" + (
        "" if forward.exists() else " (no ip_forward sysctl)")


def probe_registry(ctx: DoctorContext) -> str:
    try:
        health = ctx.http.get("/v1/health")
        health.raise_for_status()
        topo = ctx.http.get("/v1/topology")
    except httpx.HTTPError as exc:
        raise CheckFailed(f"{ctx.http.base_url} unreachable: {exc}",
                          "start it: openimds up, or openimds registry serve") from exc
    if topo.status_code in (401, 403):
        raise CheckFailed(f"registry refuses our token ({topo.status_code})",
                          "set [registry] admin_token/reader_token as the registry has them")
    topo.raise_for_status()
    ctx.topology = topo.json()
    t = ctx.topology or {}
    return (f"{ctx.http.base_url} revision {health.json().get('revision')}: "
            f"{len(t.get('routers', []))} routers, {len(t.get('networks', []))} networks, "
            f"{len(t.get('ports', []))} ports")


def probe_api(ctx: DoctorContext) -> str:
    # where the agent goes: nova_metadata_socket when set, else host:port (trace.api_client)
    client, where = api_client(ctx.settings, timeout_s=5)
    try:
        with client:
            resp = client.get("/")
    except httpx.HTTPError as exc:
        advice = ("start it with [api] unix_socket = that path" if where.startswith("unix:")
                  else "start it: openimds up, or openimds api")
        raise CheckFailed(f"{where}/ unreachable: {exc}", advice) from exc
    # unsigned requests are refused with 400: that still proves the API answers
    return f"{where}/ answers ({resp.status_code} to an unsigned request)"


def probe_agent_socket(ctx: DoctorContext) -> str:
    s = ctx.settings
    path = s.metadata_proxy_socket
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        raise CheckFailed(f"{path} does not exist",
                          "start the agent: openimds up, or openimds agent") from exc
    if not stat.S_ISSOCK(st.st_mode):
        raise CheckFailed(f"{path} is not a socket", "remove it and restart the agent")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(path)
        except OSError as exc:
            raise CheckFailed(f"{path}: {exc.strerror}",
                              "a stale socket: restart the agent") from exc
    me = pwd.getpwuid(os.geteuid()).pw_name
    my_group = grp.getgrgid(os.getegid()).gr_name
    parts = [path, judge_socket_mode(st.st_mode, expected_socket_mode(
        s.metadata_proxy_socket_mode, s.metadata_proxy_user, s.metadata_proxy_group,
        me, my_group))]
    try:
        parts.append(judge_backlog(run(["ss", "-Hxl"], timeout_s=10).stdout, path,
                                   s.metadata_backlog))
    except CommandFailed:
        pass
    return ", ".join(parts)


def probe_proxy(ctx: DoctorContext) -> str:
    pid = proxy_pid(ctx.settings)
    pidfile = ctx.settings.path("proxy", "proxy.pid")
    if pid is None:
        raise CheckFailed(f"no live proxy (pid file {pidfile})",
                          "start it: openimds up, or openimds proxy")
    specs = list(Path(ctx.settings.proxy.listeners_dir).glob("*.json"))
    fds = len(os.listdir(f"/proc/{pid}/fd")) if os.path.isdir(f"/proc/{pid}/fd") else 0
    return f"pid {pid}, {len(specs)} listener specs, {fds} open fds"


def probe_secret(ctx: DoctorContext) -> str:
    s = ctx.settings
    if not s.metadata_proxy_shared_secret:
        raise CheckFailed("metadata_proxy_shared_secret is empty",
                          "anyone reaching the API could forge requests: set it (openimds up "
                          "generates one in $state_path/secrets.ini)")
    secrets_file = s.path("secrets.ini")
    if secrets_file.exists() and (secrets_file.stat().st_mode & 0o077):
        raise CheckWarning(f"{secrets_file} is readable by others",
                           f"chmod 600 {secrets_file}")
    if not s.registry.admin_token:
        raise CheckWarning("secret set, but no [registry] admin_token",
                           "the registry refuses to start without one")
    return f"shared secret set ({len(s.metadata_proxy_shared_secret)} chars), tokens set"


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def probe_stale(ctx: DoctorContext) -> str:
    if ctx.topology is None:
        raise CheckWarning("skipped: the registry is unreachable", "")
    topo = ctx.topology
    routers = {r["id"] for r in topo.get("routers", [])}
    networks = {n["id"] for n in topo.get("networks", [])}
    instances = {p["device_id"][:8] for p in topo.get("ports", [])
                 if p.get("device_id") and not str(p.get("device_owner", "")).startswith(
                     "network:")}
    namespaces = list_namespaces()
    ns_stale = stale_namespaces(namespaces, routers, networks, instances)
    spec_dir = Path(ctx.settings.proxy.listeners_dir)
    specs = sorted(p.name for p in spec_dir.glob("*.json")) if spec_dir.is_dir() else []
    spec_stale = stale_specs(specs, routers, networks)
    if ns_stale or spec_stale:
        shown = ns_stale[:5] + spec_stale[:5]
        raise CheckWarning(
            f"{len(ns_stale)} stale namespaces, {len(spec_stale)} stale listener specs: "
            + ", ".join(shown) + (" ..." if len(ns_stale) + len(spec_stale) > 10 else ""),
            "restart the L3/DHCP agents so they converge (they remove what the registry no "
            "longer has); unplug stale lab VMs with ip netns del",
        )
    return f"{len(namespaces)} namespaces, {len(specs)} listener specs, none stale"


def probe_neighbours(ctx: DoctorContext) -> str:
    try:
        thresh = int(Path("/proc/sys/net/ipv4/neigh/default/gc_thresh3").read_text())
    except (OSError, ValueError):
        return "gc_thresh3 not visible here (not the initial network namespace)"
    return judge_neighbour_table(thresh, len(list_namespaces()))


CHECKS: tuple[Check[DoctorContext], ...] = (
    Check("binaries", probe_binaries),
    Check("kernel", probe_kernel),
    Check("neighbours", probe_neighbours),
    Check("secret", probe_secret),
    Check("registry", probe_registry),
    Check("api", probe_api),
    Check("agent-socket", probe_agent_socket),
    Check("proxy", probe_proxy),
    Check("stale-state", probe_stale),
)


def doctor(settings: Settings) -> list[CheckResult]:
    with registry_client(settings) as http:
        return run_checks(CHECKS, DoctorContext(settings, http), stop_on_failure=False)


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    with registry_client(settings) as http:
        ctx = DoctorContext(settings, http)

        def show(result: CheckResult) -> None:
            if args.format == "table":
                print(render_line(result), flush=True)

        results = run_checks(CHECKS, ctx, stop_on_failure=False, on_result=show)
    failed = [r for r in results if r.status == FAIL]
    if args.format == "json":
        print(json.dumps({"ok": not failed, "checks": [r.as_dict() for r in results]}, indent=2))
    elif args.format == "value":
        for r in results:
            print(f"{r.name} {r.status}")
    else:
        warned = sum(r.status == WARN for r in results)
        print(f"{len(results) - len(failed) - warned} ok, {warned} warnings, {len(failed)} failed")
    return 1 if failed else 0
