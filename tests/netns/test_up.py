"""`openimds up --demo` as an operator runs it: everything starts in order, the demo VMs read
their own metadata, a killed child is restarted, SIGTERM stops every child and keeps the
namespaces, and a second start reuses the generated secrets."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from openimds.config import load_settings
from openimds.registry.client import RegistryClient
from tests import reaper
from tests.support import PYTHON, clean_env

pytestmark = pytest.mark.netns

SERVICES = ("registry", "api", "agent", "proxy", "l3-agent", "dhcp-agent")


def children_of(pid: int) -> dict[str, int]:
    """{service: pid} of the openimds children of pid."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_bytes()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
        if ppid != pid or b"openimds" not in argv:
            continue
        words = [a.decode() for a in argv if a]
        for name in SERVICES:
            if name in words:
                found[name] = int(entry)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2:][:1] not in (b"Z", b"X")


class Up:
    def __init__(self, config: Path, out: Path, *args: str) -> None:
        self.out = out
        self.proc = reaper.spawn(
            [PYTHON, "-m", "openimds", "--config", str(config), "up", *args],
            stdout=out.open("ab"), stderr=subprocess.STDOUT, env=clean_env(),
        )
        self.children: dict[str, int] = {}

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if self.proc.poll() is not None:
                raise AssertionError(f"up exited {self.proc.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} after {timeout}s:\n{self.text()}")
            time.sleep(0.1)
        self.children = children_of(self.proc.pid)

    def stop(self, timeout: float = 90) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill_all(self) -> None:
        """Finalizer: whatever happened, nothing of this up survives (by PID)."""
        kids = children_of(self.proc.pid) if self.proc.poll() is None else {}
        kids.update(self.children)
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for pid in kids.values():
            if alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def ups() -> Iterator[list[Up]]:
    started: list[Up] = []
    yield started
    for up in started:
        up.kill_all()


def test_up_demo_restart_stop_and_reuse(
    make_stack: Callable[..., Any], ups: list[Up], tmp_path: Path,
) -> None:
    # The stack fixture gives a config (free ports, its own state_path) and, at the end,
    # removes every namespace and link the registry ever described; `up` runs everything.
    stack = make_stack(start=False, overrides={"dhcp": {"dnsmasq_user": "root"}})
    cfg = stack.config.read_text()
    # let `up` generate the secrets: drop them from the config
    cfg = re.sub(r"^(metadata_proxy_shared_secret|admin_token|reader_token) = .*\n", "", cfg,
                 flags=re.M)
    stack.config.write_text(cfg)
    up = Up(stack.config, tmp_path / "up.out", "--demo")
    ups.append(up)
    up.wait_for("The demo is ready", timeout=180)
    text = up.text()
    order = [m.group(1) for m in re.finditer(r"✓ (\S+) +ready", text)]
    assert order == list(SERVICES), text
    assert "vm exec demo-a -- curl -s http://169.254.169.254/openstack/latest/meta_data.json" \
        in text
    for step in ("network demo-iso-net", "plug VM demo-c (--dhcp)", "demo-c reads its metadata"):
        assert step in text

    secrets = stack.state / "secrets.ini"
    assert secrets.stat().st_mode & 0o777 == 0o600
    first_secrets = secrets.read_text()
    # the CLI on this host reads the same secrets: the registry answers it
    stack.settings = load_settings(str(stack.config), environ={})
    stack.client.close()
    stack.client = RegistryClient.from_settings(stack.settings, admin=True)

    uuids = {}
    for server in ("demo-a", "demo-b", "demo-c"):
        out = stack.vm_exec(server, "curl", "-s", "-m", "10",
                            "http://169.254.169.254/openstack/latest/meta_data.json").stdout
        doc = json.loads(out)
        assert doc["name"] == server
        assert doc["public_keys"]
        uuids[server] = doc["uuid"]
    assert len(set(uuids.values())) == 3
    ud = stack.vm_exec("demo-a", "curl", "-s", "-m", "10",
                       "http://169.254.169.254/openstack/latest/user_data").stdout
    assert ud.startswith("#cloud-config")
    route = stack.vm_exec("demo-c", "ip", "route").stdout
    assert "169.254.169.254" in route
    for server in ("demo-a", "demo-c"):
        trace = stack.cli("trace", server, check=False)
        assert trace.returncode == 0 and "all hops OK" in trace.stdout, trace.stdout
    # all-in-one: the agent reaches the API over its Unix socket (trace above used TCP)
    assert f"(agent via {stack.state / 'api.sock'})" in text
    assert re.search(r"agent\.started .* api=unix:" + re.escape(str(stack.state / "api.sock")),
                     (stack.state / "log" / "agent.log").read_text())

    # a killed child is restarted (logged) and serves again
    old_agent = up.children["agent"]
    os.kill(old_agent, signal.SIGKILL)
    stack.wait(lambda: children_of(up.proc.pid).get("agent", old_agent) != old_agent, 20,
               "a new agent")
    assert re.search(r"supervise\.exited name=agent pid=\d+ rc=-9", up.text())
    stack.wait(lambda: json.loads(stack.vm_exec(
        "demo-a", "curl", "-s", "-m", "5",
        "http://169.254.169.254/openstack/latest/meta_data.json").stdout)["uuid"]
        == uuids["demo-a"], 20, "metadata after the agent restart")

    # SIGTERM stops every child, in reverse order, and removes nothing
    children = children_of(up.proc.pid)
    assert set(children) == set(SERVICES)
    assert up.stop() == 0
    for name, pid in children.items():
        assert not alive(pid), f"{name} (pid {pid}) survived up"
    text = up.text()
    assert "stopping: dhcp-agent, l3-agent, proxy, agent, api, registry" in text
    assert "stopped." in text
    for server, uuid in uuids.items():
        assert Path(f"/run/netns/vm-{uuid[:8]}").exists(), f"{server}'s namespace was removed"
    assert not (stack.state / "api.sock").exists()  # the API removed its socket file
    specs = list((stack.state / "proxy" / "listeners").glob("*.json"))
    assert len(specs) >= 3  # two routers + the isolated network

    # a second start reuses the secrets and serves the same VMs again
    again = Up(stack.config, tmp_path / "up2.out")
    ups.append(again)
    again.wait_for("Ctrl-C or SIGTERM stops", timeout=120)
    assert secrets.read_text() == first_secrets
    assert "generated" not in again.text()
    stack.wait(lambda: json.loads(stack.vm_exec(
        "demo-b", "curl", "-s", "-m", "5",
        "http://169.254.169.254/openstack/latest/meta_data.json").stdout)["uuid"]
        == uuids["demo-b"], 30, "metadata after the second start")
    # one up per state_path
    second = subprocess.run([PYTHON, "-m", "openimds", "--config", str(stack.config), "up"],
                            capture_output=True, text=True, timeout=30, env=clean_env())
    assert second.returncode == 1 and "another openimds up" in second.stderr
    assert again.stop() == 0
    # the stack's teardown needs the registry to list what to remove
    stack.start("registry")


def _config_without_secrets(stack: Any) -> None:
    cfg = stack.config.read_text()
    stack.config.write_text(re.sub(
        r"^(metadata_proxy_shared_secret|admin_token|reader_token) = .*\n", "", cfg, flags=re.M))


def test_up_killed_minus_9_leaves_no_orphans_and_the_next_up_starts(
    make_stack: Callable[..., Any], ups: list[Up], tmp_path: Path,
) -> None:
    # Before the fix: the children of a kill -9'd up lived on, the next up took the orphaned
    # registry for its new one (ready in 4 ms) and then failed with "another openimds proxy
    # already runs".
    stack = make_stack(start=False, overrides={"dhcp": {"dnsmasq_user": "root"}})
    _config_without_secrets(stack)
    first = Up(stack.config, tmp_path / "up1.out")
    ups.append(first)
    first.wait_for("Ctrl-C or SIGTERM stops", timeout=120)
    old = dict(first.children)
    assert set(old) == set(SERVICES)
    record = json.loads((stack.state / "up.children.json").read_text())
    assert {c["name"]: c["pid"] for c in record["children"]} == old
    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    # the next up starts at once, whatever of the first is still shutting down
    second = Up(stack.config, tmp_path / "up2.out")
    ups.append(second)
    second.wait_for("Ctrl-C or SIGTERM stops", timeout=120)
    text = second.text()
    assert "another openimds" not in text and "failed" not in text, text
    for name, pid in old.items():
        assert not alive(pid), f"{name} (pid {pid}) of the killed up survived"
    new = second.children
    assert set(new) == set(SERVICES) and not set(new.values()) & set(old.values())
    # and the new children are the ones serving: the agent socket and the proxy pid file
    proxy_pid = int(stack.settings.path("proxy", "proxy.pid").read_text().strip())
    assert proxy_pid == new["proxy"]
    assert second.stop() == 0
    assert not (stack.state / "up.children.json").exists()
    for name, pid in new.items():
        assert not alive(pid), f"{name} (pid {pid}) survived up"


def test_up_does_not_take_another_process_on_the_port_for_its_child(
    make_stack: Callable[..., Any], ups: list[Up], tmp_path: Path,
) -> None:
    stack = make_stack(start=False)
    _config_without_secrets(stack)
    port = stack.settings.registry.bind_port
    # somebody else answers the registry's health check on its port
    impostor = reaper.spawn(
        [PYTHON, "-c",
         "import http.server, sys\n"
         "class H(http.server.BaseHTTPRequestHandler):\n"
         "    def do_GET(self):\n"
         "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
         f"http.server.HTTPServer(('127.0.0.1', {port}), H).serve_forever()\n"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        stack.wait(lambda: urllib_ok(f"http://127.0.0.1:{port}/v1/health"), 10, "the impostor")
        up = Up(stack.config, tmp_path / "up.out")
        ups.append(up)
        rc = up.proc.wait(90)
        text = up.text()
        assert rc == 1, text
        assert "registry failed to start" in text and "✓ registry" not in text, text
    finally:
        impostor.kill()
        impostor.wait(10)


def urllib_ok(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=2) as resp:
        return bool(resp.status == 200)


def _host_state() -> tuple[set[str], set[str]]:
    """(namespaces, links with our prefixes) of this (the test's private) network namespace."""
    from openimds.host import links

    with links.netlink() as nl:
        ours = {lk.name for lk in nl.links()
                if lk.name.startswith(("brq", "qrb-", "tpb", "vmb-", "tap", "vxlan-"))}
    return set(links.list_namespaces()), ours


def test_down_purge_from_another_terminal_leaves_the_host_as_it_was(
    make_stack: Callable[..., Any], ups: list[Up], tmp_path: Path,
) -> None:
    stack = make_stack(start=False, overrides={"dhcp": {"dnsmasq_user": "root"}})
    _config_without_secrets(stack)
    namespaces0, links0 = _host_state()
    up = Up(stack.config, tmp_path / "up.out", "--demo")
    ups.append(up)
    up.wait_for("The demo is ready", timeout=240)
    children = children_of(up.proc.pid)
    assert set(children) == set(SERVICES)
    dnsmasq = [int(p.read_text()) for p in (stack.state / "dhcp").glob("*/pid")]
    assert dnsmasq and all(alive(pid) for pid in dnsmasq)
    # /run/netns is shared with whatever else runs on this host: look at this node's only
    stack.settings = load_settings(str(stack.config), environ={})
    stack.client.close()
    stack.client = RegistryClient.from_settings(stack.settings, admin=True)
    topo = stack.client.topology()
    ours = ({f"qrouter-{r['id']}" for r in topo["routers"]}
            | {f"vm-{p['device_id'][:8]}" for p in topo["ports"]
               if p["device_owner"].startswith("compute:")})
    namespaces1, links1 = _host_state()
    made = namespaces1 - namespaces0
    assert ours <= made, ours - made
    assert sum(ns.startswith("vm-") for ns in ours) == 3
    assert any(ns.startswith("qdhcp-") and ns[6:] in {n["id"] for n in topo["networks"]}
               for ns in made)
    ours |= {ns for ns in made if ns.startswith("qdhcp-")
             and ns[6:] in {n["id"] for n in topo["networks"]}}
    assert links1 - links0

    down = subprocess.run(
        [PYTHON, "-m", "openimds", "--config", str(stack.config), "down", "--purge"],
        capture_output=True, text=True, timeout=240, env=clean_env())
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"stopping openimds up (pid {up.proc.pid})" in down.stdout
    assert up.proc.wait(30) == 0
    for name, pid in children.items():
        assert not alive(pid), f"{name} (pid {pid}) survived down"
    for pid in dnsmasq:
        assert not alive(pid), f"dnsmasq (pid {pid}) survived down --purge"
    namespaces2, links2 = _host_state()
    assert not ours & namespaces2, ours & namespaces2
    assert links2 == links0, links2 ^ links0
    assert not stack.state.exists(), list(stack.state.rglob("*"))[:20]
    assert "removed 3 VM namespaces" in down.stdout, down.stdout
    # again: nothing runs, nothing to remove, still fine
    again = subprocess.run(
        [PYTHON, "-m", "openimds", "--config", str(stack.config), "down", "--purge"],
        capture_output=True, text=True, timeout=60, env=clean_env())
    assert again.returncode == 0 and "no openimds up runs" in again.stdout, again.stdout
    assert "nothing to remove" in again.stdout
