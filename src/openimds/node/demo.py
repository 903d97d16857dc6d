"""`openimds up --demo`: a small cloud to try the metadata path on.

Two tenants with the same routed subnet 10.0.0.0/24 behind their own routers, and one
isolated network (no gateway, metadata through its DHCP namespace), also 10.0.0.0/24. Three
servers, each with a key pair, user data and properties, all at 10.0.0.5:

    demo-a  tenant demo-a, routed  (static address, default route via 10.0.0.1)
    demo-b  tenant demo-b, routed  (same IP, other tenant: gets its own metadata)
    demo-c  tenant demo-b, isolated, plugged with --dhcp (address and option-121 route
            from dnsmasq)

Every step is idempotent: objects that exist (by name) are reused, plugged VMs stay. The
registry is driven over its REST API (the contract in docs/architecture.md); VMs are plugged
through the `openimds vm` CLI. The last step reads each VM's meta_data.json from inside it.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from openimds.config import Settings
from openimds.core import names
from openimds.errors import OpenImdsError
from openimds.host import netns

CIDR = "10.0.0.0/24"
VM_IP = "10.0.0.5"
META_URL = "http://169.254.169.254/openstack/latest/meta_data.json"


@dataclass(frozen=True, slots=True)
class DemoServer:
    name: str
    project: str
    network: str
    dhcp: bool
    properties: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class DemoNetwork:
    name: str
    project: str
    router: str | None  # None = isolated (no gateway)


NETWORKS = (
    DemoNetwork("demo-a-net", "demo-a", "demo-a-router"),
    DemoNetwork("demo-b-net", "demo-b", "demo-b-router"),
    DemoNetwork("demo-iso-net", "demo-b", None),
)
SERVERS = (
    DemoServer("demo-a", "demo-a", "demo-a-net", False, {"role": "web", "tenant": "a"}),
    DemoServer("demo-b", "demo-b", "demo-b-net", False, {"role": "db", "tenant": "b"}),
    DemoServer("demo-c", "demo-b", "demo-iso-net", True, {"role": "batch", "isolated": "yes"}),
)


def demo_public_key(comment: str, seed: bytes) -> str:
    """A well-formed ssh-ed25519 public key line (demo only: nobody holds its private key)."""
    def string(data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + data

    blob = string(b"ssh-ed25519") + string(seed[:32].ljust(32, b"\0"))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


def demo_user_data(server: str) -> str:
    text = (
        "#cloud-config\n"
        f"hostname: {server}\n"
        "write_files:\n"
        "  - path: /etc/motd\n"
        f"    content: \"Hello from {server}, configured by openimds metadata\\n\"\n"
        "runcmd:\n"
        f"  - echo {server} booted\n"
    )
    return base64.b64encode(text.encode()).decode()


def try_commands(config: str | None) -> list[tuple[str, str]]:
    """What to try once the demo is up: (command, what it shows)."""
    cli = "openimds" + (f" --config {config}" if config else "")
    return [
        (f"{cli} vm exec demo-a -- curl -s {META_URL}", "demo-a's own meta_data.json"),
        (f"{cli} vm exec demo-b -- curl -s {META_URL}",
         "demo-b: same IP 10.0.0.5, other tenant, its own document"),
        (f"{cli} vm exec demo-c -- curl -s http://169.254.169.254/latest/meta-data/local-ipv4",
         "demo-c: isolated network, answered in the DHCP namespace"),
        (f"{cli} vm exec demo-a -- curl -s http://169.254.169.254/openstack/latest/user_data",
         "the user data (cloud-config)"),
        (f"{cli} vm exec demo-c -- ip route", "the option-121 route dnsmasq handed out"),
        (f"{cli} server set demo-a --property color=blue", "then re-read: visible within 1 s"),
        (f"{cli} trace demo-c", "every hop of demo-c's path, timed"),
        (f"{cli} doctor", "host-wide checks"),
    ]


class DemoError(OpenImdsError):
    pass


class Registry:
    """The few REST calls the demo needs (admin token)."""

    def __init__(self, settings: Settings) -> None:
        self.http = httpx.Client(
            base_url=settings.registry.effective_url, timeout=30, trust_env=False,
            headers={"Authorization": f"Bearer {settings.registry.admin_token}"},
        )

    def close(self) -> None:
        self.http.close()

    def call(self, method: str, path: str, body: Any = None) -> Any:
        resp = self.http.request(method, path, json=body)
        if resp.status_code >= 400:
            raise DemoError(f"registry {method} {path}: {resp.status_code} {resp.text[:300]}")
        return resp.json() if resp.content else {}

    def find(self, plural: str, name: str, **match: str) -> dict[str, Any] | None:
        marker: str | None = None
        while True:
            query = "?limit=1000" + (f"&marker={marker}" if marker else "")
            page = self.call("GET", f"/v1/{plural}{query}")
            for item in page.get(plural, []):
                if item.get("name") == name and all(item.get(k) == v for k, v in match.items()):
                    found: dict[str, Any] = item
                    return found
            marker = page.get("next")
            if not marker:
                return None

    def ensure(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        existing = self.find(plural, body["name"])
        if existing is not None:
            return existing
        created: dict[str, Any] = self.call("POST", f"/v1/{plural}", body)
        return created


def _cli(config: str | None, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "openimds"]
    if config:
        argv += ["--config", config]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env=dict(os.environ))


def _plug(config: str | None, server: DemoServer, instance_id: str) -> str:
    ns = names.vm_namespace(instance_id)
    if netns.netns_exists(ns):
        return f"{ns} (already plugged)"
    args = ["vm", "plug", server.name, "-f", "json"] + (["--dhcp"] if server.dhcp else [])
    proc = _cli(config, *args, timeout=120)
    if proc.returncode != 0:
        raise DemoError(f"vm plug {server.name}: {proc.stderr.strip() or proc.stdout.strip()}")
    return ns


def _read_metadata(config: str | None, server: str, instance_id: str,
                   cancel: threading.Event, timeout_s: float = 60) -> str:
    """Read meta_data.json from inside the VM until it names the right instance."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline and not cancel.is_set():
        proc = _cli(config, "vm", "exec", server, "--", "curl", "-s", "-m", "5", META_URL)
        try:
            doc = json.loads(proc.stdout)
            if isinstance(doc, dict) and doc.get("uuid") == instance_id:
                return f"uuid {instance_id[:8]}…, {len(doc.get('public_keys', {}))} key(s)"
            last = proc.stdout[:200]
        except ValueError:
            last = (proc.stdout or proc.stderr)[:200].strip()
        time.sleep(0.5)
    raise DemoError(f"{server} could not read its metadata in {timeout_s:.0f}s: {last!r} "
                    f"(try: openimds trace {server})")


Step = tuple[str, Callable[[], str]]


def demo_steps(settings: Settings, config: str | None, reg: Registry,
               cancel: threading.Event) -> list[Step]:
    """The demo as a list of (title, action) steps; each action returns a short detail."""
    state: dict[str, dict[str, Any]] = {}
    steps: list[Step] = []

    for net in NETWORKS:
        def make_net(net: DemoNetwork = net) -> str:
            network = reg.ensure("networks", {"name": net.name, "project_id": net.project})
            subnet_name = net.name.replace("-net", "-subnet")
            body: dict[str, Any] = {"name": subnet_name, "network_id": network["id"],
                                    "cidr": CIDR, "project_id": net.project}
            if net.router is None:
                body["gateway_ip"] = None
            subnet = reg.ensure("subnets", body)
            state[net.name] = subnet
            kind = "isolated, no gateway" if net.router is None else "gateway 10.0.0.1"
            return f"{net.name} {CIDR} ({kind}) tenant {net.project}"

        steps.append((f"network {net.name}", make_net))
        if net.router is not None:
            def make_router(net: DemoNetwork = net) -> str:
                assert net.router is not None
                router = reg.ensure("routers", {"name": net.router, "project_id": net.project})
                subnet = state[net.name]
                if not any(i.get("subnet_id") == subnet["id"]
                           for i in router.get("interfaces", [])):
                    reg.call("POST", f"/v1/routers/{router['id']}/add_interface",
                             {"subnet_id": subnet["id"]})
                return f"{net.router} ({router['id'][:8]}…) on {net.name}"

            steps.append((f"router {net.router}", make_router))

    for server in SERVERS:
        def make_key(server: DemoServer = server) -> str:
            key = reg.ensure("keypairs", {
                "name": f"{server.name}-key", "project_id": server.project,
                "public_key": demo_public_key(f"{server.name}@openimds-demo",
                                              os.urandom(32)),
            })
            return f"{key['name']} {key.get('fingerprint', '')}"

        def make_server(server: DemoServer = server) -> str:
            network = reg.find("networks", server.network)
            if network is None:
                raise DemoError(f"network {server.network} is missing")
            instance = reg.ensure("instances", {
                "name": server.name, "network_id": network["id"], "fixed_ip": VM_IP,
                "key_name": f"{server.name}-key", "user_data": demo_user_data(server.name),
                "metadata": server.properties, "project_id": server.project,
            })
            state[server.name] = instance
            return f"{server.name} {instance['id'][:8]}… at {VM_IP} on {server.network}"

        def plug(server: DemoServer = server) -> str:
            ns = _plug(config, server, state[server.name]["id"])
            return f"{ns}" + (" by DHCP" if server.dhcp else "")

        steps.append((f"key pair {server.name}-key", make_key))
        steps.append((f"server {server.name}", make_server))
        steps.append((f"plug VM {server.name}" + (" (--dhcp)" if server.dhcp else ""), plug))

    for server in SERVERS:
        def check(server: DemoServer = server) -> str:
            return _read_metadata(config, server.name, state[server.name]["id"], cancel)

        steps.append((f"{server.name} reads its metadata", check))
    return steps


def build_demo(settings: Settings, config: str | None,
               cancel: threading.Event | None = None) -> int:
    """Run the demo steps with a progress display, then print what to try. 0 on success.

    Stops between steps (returning 1) once `cancel` is set."""
    cancel = cancel or threading.Event()
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    reg = Registry(settings)
    try:
        steps = demo_steps(settings, config, reg, cancel)
        console.print(f"[bold]building the demo[/bold] ({len(steps)} steps)")
        for i, (title, action) in enumerate(steps, 1):
            if cancel.is_set():
                console.print("[yellow]demo interrupted[/yellow]")
                return 1
            t0 = time.monotonic()
            with console.status(f"[{i}/{len(steps)}] {title} …"):
                try:
                    detail = action()
                except (OpenImdsError, httpx.HTTPError, subprocess.SubprocessError) as exc:
                    console.print(f"[red]✗[/red] [{i}/{len(steps)}] {title}: {exc}")
                    return 1
            ms = (time.monotonic() - t0) * 1000
            console.print(f"[green]✓[/green] [{i}/{len(steps)}] {title:<32} {ms:6.0f} ms  "
                          f"[dim]{detail}[/dim]")
    finally:
        reg.close()
    console.print("\n[bold]The demo is ready. Try:[/bold]")
    for command, what in try_commands(config):
        console.print(f"  {command}\n      [dim]# {what}[/dim]", soft_wrap=True)
    return 0


def demo_summary() -> Sequence[str]:
    return [s.name for s in SERVERS]
