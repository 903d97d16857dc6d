"""The udhcpc hook script on its own: RFC 3442 precedence, on-link routes, re-runs, deconfig.

udhcpc is not needed here: the hook is run as udhcpc runs it (`script bound|renew|deconfig`
with the lease in environment variables) inside a scratch namespace whose eth0 is one end of
a veth pair living entirely in that namespace.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from openimds.host import links
from openimds.lab import dhcp_client

pytestmark = pytest.mark.netns


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    ns = f"dhcpc-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    links.ensure_namespace(ns)
    try:
        subprocess.run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name",
                        "peer0"], check=True)
        for dev in ("eth0", "peer0"):
            subprocess.run(["ip", "-n", ns, "link", "set", dev, "up"], check=True)
        script = tmp_path / "hook.sh"
        script.write_text(dhcp_client.UDHCPC_SCRIPT)
        script.chmod(0o700)
        yield ns, script
    finally:
        links.delete_namespace(ns)


def hook(ns: str, script: Path, action: str, resolv: Path | None = None,
         **env: str) -> subprocess.CompletedProcess[str]:
    lease_env = {"interface": "eth0", "ip": "10.0.0.5", "mask": "24", **env}
    if resolv is not None:
        lease_env["OPENIMDS_RESOLV_CONF"] = str(resolv)
    return subprocess.run(["ip", "netns", "exec", ns, "env", *[f"{k}={v}" for k, v in
                           lease_env.items()], "sh", str(script), action],
                          capture_output=True, text=True, check=True, timeout=10)


def routes(ns: str) -> list[str]:
    out = subprocess.run(["ip", "-n", ns, "-4", "route", "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    return sorted(" ".join(line.split()) for line in out.splitlines())


def test_option_121_wins_and_router_is_ignored(scratch: tuple[str, Path]) -> None:
    ns, script = scratch
    out = hook(ns, script, "bound", router="10.0.0.1",
               staticroutes="169.254.169.254/32 10.0.0.2 10.1.0.0/24 0.0.0.0",
               msstaticroutes="192.0.2.0/24 10.0.0.3")
    lease = dhcp_client.parse_lease_line(out.stdout.strip().splitlines()[-1])
    assert lease.source == "121" and lease.cidr == "10.0.0.5/24" and lease.router == "10.0.0.1"
    assert lease.routes == (("169.254.169.254/32", "10.0.0.2"), ("10.1.0.0/24", "0.0.0.0"))
    assert routes(ns) == [
        "10.0.0.0/24 proto kernel scope link src 10.0.0.5",
        "10.1.0.0/24 proto dhcp scope link",
        "169.254.169.254 via 10.0.0.2 proto dhcp",
    ]


def test_option_249_is_the_fallback_then_router(scratch: tuple[str, Path]) -> None:
    ns, script = scratch
    hook(ns, script, "bound", router="10.0.0.1", msstaticroutes="169.254.169.254/32 10.0.0.2")
    assert "169.254.169.254 via 10.0.0.2 proto dhcp" in routes(ns)
    assert not any(r.startswith("default") for r in routes(ns))
    # renew with only a router: the old DHCP routes go, the default route comes
    out = hook(ns, script, "renew", router="10.0.0.1 10.0.0.254")
    assert "source=router" in out.stdout
    assert routes(ns) == ["10.0.0.0/24 proto kernel scope link src 10.0.0.5",
                          "default via 10.0.0.1 proto dhcp"]


def test_new_address_replaces_old_and_deconfig_clears(
    scratch: tuple[str, Path], tmp_path: Path,
) -> None:
    ns, script = scratch
    resolv = tmp_path / "resolv.conf"
    hook(ns, script, "bound", resolv, staticroutes="0.0.0.0/0 10.0.0.1", dns="192.0.2.53")
    assert resolv.read_text().splitlines()[1:] == ["nameserver 192.0.2.53"]
    hook(ns, script, "bound", ip="10.0.0.9", staticroutes="0.0.0.0/0 10.0.0.1")
    with links.netlink(ns) as nl:
        assert nl.addresses("eth0") == ["10.0.0.9/24"]
    assert "default via 10.0.0.1 proto dhcp" in routes(ns)
    hook(ns, script, "deconfig")
    with links.netlink(ns) as nl:
        assert nl.addresses("eth0") == []
    assert routes(ns) == []
