"""A real DHCP client inside a lab VM namespace, so its address and routes come from dnsmasq.

Two clients, as on real guests (reference/datapath.md §2):

- busybox **udhcpc** (default). It only receives option 121 when it asks for it, so it runs
  with `-O staticroutes -O msstaticroutes`, and with our own hook script (written to a
  private temp dir for the run): Debian's default.script ignores `staticroutes` and rewrites
  /etc/resolv.conf. Ours applies the address, then the option 121 routes, falling back to
  option 249, and installs `$router` as default route only when neither came (RFC 3442: a
  client that got option 121 ignores option 3). Routes it installs carry `proto dhcp`, so a
  re-run replaces exactly them.
- ISC **dhclient**, with Debian's `dhclient-script` and its RFC 3442 exit hook (which runs on
  BOUND/REBOOT only and knows option 121 only). `-1` makes it daemonize once bound; we stop it
  by the PID in its pid file straight away, so nothing stays behind.

Both run through `ip netns exec <ns>`, which binds `/etc/netns/<ns>/resolv.conf` over
/etc/resolv.conf; that file is created first, so a client writing DNS never touches the host's
file. (dnsmasq sends no DNS server either unless the subnet has dns_nameservers.)

Re-running `acquire()` is how a lab VM "renews" after the network changed category (router
attached or detached): the new lease's routes replace the old ones.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from openimds.errors import BadRequest, CommandFailed
from openimds.host import links
from openimds.host.run import run

log = logging.getLogger(__name__)

CLIENTS = ("udhcpc", "dhclient")
LEASE_MARK = "OPENIMDS_LEASE"

# The udhcpc hook. udhcpc exports: interface, ip, mask (prefix length), router, dns, mtu,
# staticroutes / msstaticroutes ("dest/len gw dest/len gw ...").
UDHCPC_SCRIPT = r"""#!/bin/sh
# openimds lab VM hook for busybox udhcpc: address, RFC 3442 routes, never the host's DNS.
PATH=/usr/sbin:/usr/bin:/sbin:/bin

apply_routes() {
    set -- $1
    while [ $# -ge 2 ]; do
        dest=$1; gw=$2; shift 2
        [ "$dest" = "0.0.0.0/0" ] && dest=default
        if [ "$gw" = "0.0.0.0" ]; then
            ip -4 route replace "$dest" dev "$interface" proto dhcp scope link
        else
            ip -4 route replace "$dest" via "$gw" dev "$interface" proto dhcp
        fi
    done
}

case "$1" in
    deconfig)
        ip -4 route flush dev "$interface" proto dhcp 2>/dev/null
        ip -4 addr flush dev "$interface"
        ip link set dev "$interface" up
        ;;
    bound|renew)
        [ -n "$mtu" ] && ip link set dev "$interface" mtu "$mtu"
        want="$ip/$mask"
        for have in $(ip -4 -o addr show dev "$interface" | awk '{print $4}'); do
            [ "$have" = "$want" ] || ip -4 addr del "$have" dev "$interface"
        done
        ip -4 addr replace "$want" dev "$interface"
        ip -4 route flush dev "$interface" proto dhcp 2>/dev/null
        if [ -n "$staticroutes" ]; then
            apply_routes "$staticroutes"; source=121; routes=$staticroutes
        elif [ -n "$msstaticroutes" ]; then
            apply_routes "$msstaticroutes"; source=249; routes=$msstaticroutes
        elif [ -n "$router" ]; then
            set -- $router
            ip -4 route replace default via "$1" dev "$interface" proto dhcp
            source=router; routes="0.0.0.0/0 $1"
        else
            source=none; routes=
        fi
        if [ -n "$OPENIMDS_RESOLV_CONF" ]; then
            { echo "# from DHCP on $interface"; for s in $dns; do echo "nameserver $s"; done; } \
                > "$OPENIMDS_RESOLV_CONF"
        fi
        echo "OPENIMDS_LEASE ip=$ip mask=$mask router=$router source=$source routes=$routes"
        ;;
esac
exit 0
"""


@dataclass(frozen=True, slots=True)
class Lease:
    """What the client applied."""

    ip: str
    prefixlen: int
    router: str | None
    source: str  # "121", "249", "router" or "none": where the routes came from
    routes: tuple[tuple[str, str], ...] = field(default=())  # (destination, gateway)

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefixlen}"


def parse_lease_line(line: str) -> Lease:
    """Parse the hook's `OPENIMDS_LEASE key=value ...` line (routes is the last key)."""
    body = line.split(LEASE_MARK, 1)[1].strip()
    head, _, routes_text = body.partition("routes=")
    values = dict(part.split("=", 1) for part in head.split() if "=" in part)
    words = routes_text.split()
    routes = tuple(zip(words[0::2], words[1::2], strict=False))
    router = values.get("router", "").split()[0] if values.get("router") else None
    return Lease(ip=values["ip"], prefixlen=int(values["mask"]), router=router,
                 source=values.get("source", "none"), routes=routes)


def udhcpc_argv(interface: str, script: str, *, tries: int = 5) -> list[str]:
    """One-shot udhcpc: stay in the foreground, quit once bound, fail if no lease."""
    return ["udhcpc", "-i", interface, "-f", "-q", "-n", "-t", str(tries), "-T", "1",
            "-A", "1", "-O", "staticroutes", "-O", "msstaticroutes", "-s", script]


def _netns_resolv_conf(namespace: str) -> Path:
    path = links.ETC_NETNS / namespace / "resolv.conf"
    if not path.exists():
        links.write_netns_resolv_conf(namespace, ())
    return path


def _run_udhcpc(namespace: str, interface: str, timeout_s: float) -> Lease:
    with tempfile.TemporaryDirectory(prefix="openimds-udhcpc-") as tmp:
        script = Path(tmp, "udhcpc-script.sh")
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o700)
        resolv = _netns_resolv_conf(namespace)
        argv = ["ip", "netns", "exec", namespace, "env",
                f"OPENIMDS_RESOLV_CONF={resolv}", *udhcpc_argv(interface, str(script))]
        proc = run(argv, timeout_s=timeout_s)
    for line in proc.stdout.splitlines():
        if line.startswith(LEASE_MARK):
            return parse_lease_line(line)
    raise CommandFailed(argv, proc.returncode, proc.stderr or "udhcpc: no lease applied")


def _run_dhclient(namespace: str, interface: str, timeout_s: float) -> Lease:
    _netns_resolv_conf(namespace)
    tmp = Path(tempfile.mkdtemp(prefix="openimds-dhclient-"))
    pid_file = tmp / "dhclient.pid"
    conf = tmp / "dhclient.conf"
    # Debian's dhclient.conf declares and requests rfc3442-classless-static-routes; keep its
    # request list (minus DNS-related options we do not want) in a private file.
    conf.write_text(
        "option rfc3442-classless-static-routes code 121 = array of unsigned integer 8;\n"
        "request subnet-mask, broadcast-address, time-offset, routers, interface-mtu,\n"
        "        rfc3442-classless-static-routes;\n"
    )
    argv = ["ip", "netns", "exec", namespace, "dhclient", "-4", "-1", "-v", "-cf", str(conf),
            "-lf", str(tmp / "leases"), "-pf", str(pid_file), interface]
    try:
        run(argv, timeout_s=timeout_s)
    finally:
        _stop_pid_file(pid_file)
    text = (tmp / "leases").read_text() if (tmp / "leases").exists() else ""
    shutil.rmtree(tmp, ignore_errors=True)
    return _lease_from_dhclient(text, namespace, interface)


def _stop_pid_file(pid_file: Path) -> None:
    """dhclient -1 daemonizes once bound: stop it by its PID.

    The daemon writes its pid file a moment after the parent exits, so wait for it; and stop
    any process whose command line names this (unique, private) pid file as well.
    """
    marker = str(pid_file).encode()
    deadline = time.monotonic() + 3
    pids: set[int] = set()
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            pids.add(int(pid_file.read_text().strip()))
        pids |= _pids_with_arg(marker)
        if pids:
            break
        time.sleep(0.05)
    for pid in sorted(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.05)
    for pid in pids:
        if _running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _pids_with_arg(marker: bytes) -> set[int]:
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0"):
                    found.add(int(entry))
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


def _lease_from_dhclient(leases: str, namespace: str, interface: str) -> Lease:
    """Read back what dhclient-script applied (its lease file has the raw option)."""
    ip = ""
    prefixlen = 32
    router: str | None = None
    routes: list[tuple[str, str]] = []
    for raw in leases.splitlines():
        line = raw.strip().rstrip(";")
        if line.startswith("fixed-address "):
            ip = line.split()[1]
        elif line.startswith("option subnet-mask "):
            prefixlen = ipaddress.IPv4Network(f"0.0.0.0/{line.split()[2]}").prefixlen
        elif line.startswith("option routers "):
            router = line.split()[2].split(",")[0]
        elif line.startswith("option rfc3442-classless-static-routes "):
            routes = _decode_rfc3442(line.split()[2])
    if not ip:
        raise CommandFailed(["dhclient", interface], 1, f"no lease in {namespace}")
    source = "121" if routes else ("router" if router else "none")
    return Lease(ip=ip, prefixlen=prefixlen, router=router, source=source,
                 routes=tuple(routes))


def _decode_rfc3442(text: str) -> list[tuple[str, str]]:
    """'32,169,254,169,254,10,0,0,2' -> [('169.254.169.254/32', '10.0.0.2')]."""
    octets = [int(x) for x in text.split(",") if x]
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(octets):
        width = octets[i]
        n = (width + 7) // 8
        dest = octets[i + 1 : i + 1 + n] + [0] * (4 - n)
        gw = octets[i + 1 + n : i + 5 + n]
        out.append((f"{'.'.join(map(str, dest))}/{width}", ".".join(map(str, gw))))
        i += 5 + n
    return out


def acquire(
    namespace: str, interface: str = "eth0", *, client: str = "udhcpc", timeout_s: float = 30.0,
) -> Lease:
    """Run one DHCP exchange in namespace and apply the lease; returns what was applied.

    Raises BadRequest for an unknown client, CommandFailed when no lease came.
    """
    if client not in CLIENTS:
        raise BadRequest(f"DHCP client {client!r} is not one of {', '.join(CLIENTS)}")
    lease = (_run_udhcpc if client == "udhcpc" else _run_dhclient)(
        namespace, interface, timeout_s)
    log.info("vm.dhcp_lease netns=%s client=%s ip=%s source=%s routes=%s", namespace, client,
             lease.cidr, lease.source, lease.routes)
    return lease


def configure_dhcp(
    nl: links.Netlink, namespace: str, interface: str, *, client: str = "udhcpc",
) -> Lease:
    """Address mode "dhcp" for lab VMs: drop any static address and default route, then
    let the DHCP client configure the interface."""
    nl.set_up(interface)
    nl.set_default_route(None, interface)
    nl.set_addresses(interface, [])
    return acquire(namespace, interface, client=client)
