"""`openimds down [--purge]`: stop the node `openimds up` runs, from any terminal; with
`--purge`, also remove everything the node made, so the host is left as it was.

Stopping: the `up` named by `$state_path/up.pid` (only if that process is alive and its command
line is `... openimds ... up`) gets SIGTERM and stops its children in reverse order, as on
Ctrl-C; if it has not exited in time it is killed (its children get SIGTERM from the kernel).
Then whatever is left of the children recorded in `$state_path/up.children.json` (pid and
start time) and a proxy an agent started are stopped, as the next `up` would.

Purging removes only what the node's own records name, never anything else on the host:
- the routers the L3 agent marked as its own (`$state_path/l3/routers/<id>`) and the routers
  in the registry: their listener specs, `qrouter-<id>` namespaces (nft rules and legs go
  with them) and markers;
- the networks the DHCP agent keeps state for (`[dhcp] dhcp_confs/<id>`) and the networks in
  the registry: dnsmasq (by its pid file), `qdhcp-<id>` namespaces and /etc/netns dirs,
  and the `brq<id>` bridges (with their VXLAN ports) once nothing else is attached;
- the lab VM namespaces `vm-<id[:8]>` of the registry's instances and their veths;
- every listener spec in `[proxy] listeners_dir`, and finally `state_path` itself (the SQLite
  registry, secrets, logs, pid files). A registry on PostgreSQL is left alone: `up` did not
  make that database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from openimds.config import Settings
from openimds.errors import OpenImdsError
from openimds.host.supervise import pid_alive, signal_pid
from openimds.node.up import CHILDREN_FILE, _cmdline, stop_leftovers

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 120.0


def running_up(state: Path) -> int | None:
    """The pid of the `openimds up` running on state, or None."""
    try:
        pid = int((state / "up.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    argv = _cmdline(pid)
    if pid_alive(pid) and any(b"openimds" in a for a in argv) and b"up" in argv:
        return pid
    return None


def up_lock_free(state: Path) -> bool:
    """True if no process holds $state_path/up.lock (no `up` runs there)."""
    try:
        fd = os.open(state / "up.lock", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)  # also drops the probe lock
    return True


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


async def stop_node(settings: Settings, *, timeout_s: float = STOP_TIMEOUT_S,
                    say: Callable[[str], None] = print) -> bool:
    """Stop the `up` on settings.state_path and whatever it left. True if anything ran."""
    state = Path(settings.state_path)
    pid = running_up(state)
    found = pid is not None
    if pid is not None:
        say(f"stopping openimds up (pid {pid})")
        signal_pid(pid, signal.SIGTERM)
        if not await asyncio.to_thread(_wait_gone, pid, timeout_s):
            say(f"openimds up (pid {pid}) did not stop in {timeout_s:.0f} s: killing it")
            signal_pid(pid, signal.SIGKILL)
            await asyncio.to_thread(_wait_gone, pid, 30.0)
    elif not up_lock_free(state):
        raise OpenImdsError(f"another process holds {state / 'up.lock'} but {state / 'up.pid'}"
                            " does not name a running openimds up; not touching it")
    left = await stop_leftovers(settings)
    if left:
        say("stopped what was left running: " + ", ".join(left))
    return found or bool(left)


# --- purge -----------------------------------------------------------------------------------

@dataclass
class Purged:
    routers: list[str] = field(default_factory=list)
    networks: list[str] = field(default_factory=list)
    vms: list[str] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)
    specs: int = 0
    state: str | None = None

    def lines(self) -> list[str]:
        out = []
        for label, items in (("routers", self.routers), ("networks", self.networks),
                             ("VM namespaces", self.vms), ("bridges", self.bridges)):
            if items:
                out.append(f"removed {len(items)} {label}: {', '.join(sorted(items))}")
        if self.specs:
            out.append(f"removed {self.specs} proxy listener specs")
        if self.state:
            out.append(f"removed {self.state}")
        return out


def registry_ids(settings: Settings) -> dict[str, set[str]]:
    """Network, router and instance ids in the registry (read directly from its store: the
    registry is stopped by now). Empty if there is no store to read."""
    from openimds.registry.store import Store
    from openimds.registry.views import topology

    ids: dict[str, set[str]] = {"network": set(), "router": set(), "instance": set()}
    url = settings.registry_connection
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        return ids
    try:
        store = Store(url)
        try:
            topo = topology(store)
        finally:
            store.engine.dispose()
    except Exception as exc:  # a missing or broken store: purge by the agents' own records
        log.warning("down.registry_unreadable url=%s error=%r", url, exc)
        return ids
    ids["network"] = {str(n["id"]) for n in topo.get("networks", ())}
    ids["router"] = {str(r["id"]) for r in topo.get("routers", ())}
    ids["instance"] = {str(p["device_id"]) for p in topo.get("ports", ())
                       if str(p.get("device_owner") or "").startswith("compute:")
                       and p.get("device_id")}
    return ids


def _is_state_dir(state: Path) -> bool:
    """Only a directory that looks like an openimds state_path is removed whole."""
    resolved = state.resolve()
    if len(resolved.parts) < 3:  # never "/", "/var", "/tmp" ...
        return False
    return any((state / name).exists() for name in ("secrets.ini", "up.lock", CHILDREN_FILE))


async def purge(settings: Settings) -> Purged:
    """Remove everything the node made (see the module docstring)."""
    from openimds.agents.dhcp import DhcpAgent

    done = Purged()
    ids = await asyncio.to_thread(_purge_routers, settings, done)
    dhcp = DhcpAgent(settings)
    owned = await asyncio.to_thread(dhcp.owned_networks)
    for network_id in sorted(owned | ids["network"]):
        if network_id in owned or await asyncio.to_thread(_has_dhcp_namespace, network_id):
            await dhcp.remove_network(network_id, network_gone=True)
            done.networks.append(network_id)
    await asyncio.to_thread(_purge_rest, settings, ids, done)
    return done


def _has_dhcp_namespace(network_id: str) -> bool:
    from openimds.core import names
    from openimds.host import links

    return links.namespace_exists(names.dhcp_namespace(network_id))


def _purge_routers(settings: Settings, done: Purged) -> dict[str, set[str]]:
    from openimds.agents.l3 import RouterDriver, proxy_running
    from openimds.core import names
    from openimds.host import links

    if not proxy_running(settings):
        # stale: the agents would SIGHUP whatever process now has that pid
        settings.path("proxy", "proxy.pid").unlink(missing_ok=True)
    ids = registry_ids(settings)
    driver = RouterDriver(settings)
    owned = driver.owned()
    for router_id in sorted(owned | ids["router"]):
        if router_id in owned or links.namespace_exists(names.router_namespace(router_id)):
            driver.remove_router(router_id)
            done.routers.append(router_id)
    return ids


def _purge_rest(settings: Settings, ids: dict[str, set[str]], done: Purged) -> None:
    from openimds.agents.fabric import delete_bridge_if_unused
    from openimds.core import names
    from openimds.host import links
    from openimds.lab.vm import unplug_namespace

    for instance_id in sorted(ids["instance"]):
        if unplug_namespace(names.vm_namespace(instance_id)):
            done.vms.append(names.vm_namespace(instance_id))
    with links.netlink() as nl:
        present = {link.name for link in nl.links()}
        for network_id in sorted(ids["network"] | set(done.networks)):
            bridge = names.bridge_name(network_id)
            if bridge in present and delete_bridge_if_unused(nl, bridge):
                done.bridges.append(bridge)
    specs = Path(settings.proxy.listeners_dir)
    if specs.is_dir():
        for spec in specs.glob("*.json"):
            spec.unlink(missing_ok=True)
            done.specs += 1
    state = Path(settings.state_path)
    if state.is_dir() and _is_state_dir(state):
        shutil.rmtree(state)
        done.state = str(state)


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    async def run() -> int:
        ran = await stop_node(settings, timeout_s=args.timeout)
        if not ran:
            print(f"no openimds up runs on {settings.state_path}")
        if args.purge:
            with contextlib.suppress(KeyboardInterrupt):
                done = await purge(settings)
                for line in done.lines() or ["nothing to remove"]:
                    print(line)
        elif ran:
            print("stopped (namespaces and state are kept; --purge removes them)")
        return 0

    return asyncio.run(run())


__all__ = ["cmd_down", "purge", "running_up", "stop_node"]
