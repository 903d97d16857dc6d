"""A whole openimds stack for one test, inside the test process's private network namespace.

    def test_something(stack):                     # registry + api + agent + proxy + l3-agent
        net = stack.client.create_network("n1")
        ...
        ns = stack.plug(server["id"])              # `openimds vm plug`, unplugged at the end
        out = stack.vm_exec(server["id"], "curl", "-s", "http://169.254.169.254/")

    def test_other(make_stack):
        stack = make_stack(dhcp=True, l3=False, overrides={"DEFAULT": {...}})

Every service is started through the operator's CLI (`python -m openimds --config X ...`) and
stopped by PID. The teardown, which runs whatever happened:
1. collects every router, network and instance id the registry ever had (its change feed from
   revision 0; the topology as a fallback) and the L3 agent's router markers;
2. stops the agents, then the proxy (also one an agent respawned: by its pid file, if its
   command line is an openimds proxy), the agent, the API and the registry;
3. kills any process still inside the stack's namespaces, then deletes `qrouter-<id>`,
   `qdhcp-<id>`, `vm-<id[:8]>` and their /etc/netns dirs;
4. deletes links with our prefixes (brq, qrb-, tpb, vmb-, tap) that appeared in this
   process's netns since the stack started.
On failure the tail of every service log is printed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from openimds.config import Settings, load_settings
from openimds.host import links
from openimds.registry.client import RegistryClient
from tests import reaper
from tests.support import (
    PYTHON,
    Service,
    base_config,
    clean_env,
    http_ready,
    openimds_service,
    run_cli,
    tcp_ready,
    unix_ready,
    write_config,
)

LINK_PREFIXES = ("brq", "qrb-", "tpb", "vmb-", "tap", "qr-", "ns-")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _proc_netns_inode(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def kill_pid(pid: int, timeout: float = 5.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        stat = Path(f"/proc/{pid}/stat").read_bytes() if Path(f"/proc/{pid}").exists() else b""
        if b") Z" in stat:
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kill_processes_in(namespace: str) -> None:
    """Stop (by PID) every process whose network namespace is this named one."""
    try:
        inode = os.stat(f"/var/run/netns/{namespace}").st_ino
    except OSError:
        return
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            if _proc_netns_inode(int(entry)) == inode:
                kill_pid(int(entry))


class Stack:
    def __init__(self, root: Path, *, l3: bool, dhcp: bool, proxy: bool,
                 overrides: Mapping[str, Mapping[str, Any]],
                 services: Sequence[str] | None = None) -> None:
        self.root = root
        self.state = root / "state"
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        defaults: dict[str, dict[str, Any]] = {
            "AGENT": {"check_child_processes_interval": 0.5},
            "proxy": {"rescan_interval": 1.0},
        }
        for section, values in overrides.items():
            defaults.setdefault(section, {}).update(values)
        self.cfg = base_config(self.state, **defaults)
        self.config = write_config(root / "openimds.ini", self.cfg)
        self.settings: Settings = load_settings(str(self.config), environ={})
        self.wanted = list(services) if services is not None else (
            ["registry", "api", "agent"] + (["proxy"] if proxy else [])
            + (["l3-agent"] if l3 else []) + (["dhcp-agent"] if dhcp else []))
        self.services: dict[str, Service] = {}
        self.plugged: set[str] = set()
        self._links_before = self._our_links()
        self.client = RegistryClient.from_settings(self.settings, admin=True)

    # --- services
    def _command(self, name: str) -> tuple[str, ...]:
        return ("registry", "serve") if name == "registry" else (name,)

    def _ready(self, name: str) -> Callable[[], bool]:
        s = self.settings
        if name == "registry":
            return http_ready(s.registry.effective_url + "/v1/health")
        if name == "api":
            return tcp_ready(s.api.metadata_listen, s.api.metadata_listen_port)
        if name == "agent":
            return unix_ready(s.metadata_proxy_socket)
        if name == "proxy":
            return lambda: self.proxy_pid() is not None
        return lambda: True

    def start(self, name: str, timeout: float = 30.0) -> Service:
        return self._spawn(name).wait_until(self._ready(name), timeout)

    def _spawn(self, name: str) -> Service:
        service = openimds_service(name, self.config, *self._command(name), log_dir=self.logs)
        self.services[name] = service
        return service.start()

    def stop(self, name: str, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after timeout."""
        service = self.services.pop(name, None)
        if service is not None:
            service.stop(timeout=timeout)

    def restart(self, name: str) -> Service:
        self.stop(name)
        return self.start(name)

    # Started in waves, each one ready before the next starts, its services at once: each
    # Python start costs about a second of CPU, so a stack came up in 5-7 s one by one. The
    # agents come last and after the proxy: one started earlier spawns its own proxy, and
    # the test's would then wait on the proxy lock behind it.
    WAVES = (("registry",), ("api", "agent", "proxy"), ("l3-agent", "dhcp-agent"))

    def start_all(self) -> Stack:
        waves = [[n for n in wave if n in self.wanted] for wave in self.WAVES]
        if [n for wave in waves for n in wave] != self.wanted:
            waves = [[n] for n in self.wanted]  # an order of the test's own: kept, one by one
        for wave in waves:
            for name in wave:
                self._spawn(name)
            for name in wave:
                self.services[name].wait_until(self._ready(name), 30.0)
        return self

    def proxy_pid(self) -> int | None:
        """The running proxy's pid (whoever started it), from its pid file."""
        try:
            pid = int(self.settings.path("proxy", "proxy.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        argv = _cmdline(pid)
        if not any(b"openimds" in a for a in argv) or b"proxy" not in argv:
            return None
        return pid

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # --- helpers for tests
    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config, *args, check=check)

    def plug(self, server: str) -> str:
        ns = self.cli("vm", "plug", server).stdout.strip()
        self.plugged.add(ns)
        reaper.register_namespace(ns)  # nothing may run in it: deleted by name if pytest dies
        return ns

    def plug_many(self, *servers: str) -> list[str]:
        """`vm plug` of several servers at once (on different networks): each is a CLI
        process whose Python start alone takes a second or two on a loaded machine."""
        procs = [reaper.spawn([PYTHON, "-m", "openimds", "--config", str(self.config), "vm",
                               "plug", server], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=clean_env())
                 for server in servers]
        namespaces = []
        for server, proc in zip(servers, procs, strict=True):
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"vm plug {server} exited {proc.returncode}: {err}"
            namespaces.append(out.strip())
            self.plugged.add(namespaces[-1])
            reaper.register_namespace(namespaces[-1])
        return namespaces

    def vm_exec(self, server: str, *argv: str, check: bool = False,
                timeout: float = 60.0, env: Mapping[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config, "vm", "exec", server, "--", *argv, check=check,
                       timeout=timeout, env=env)

    @staticmethod
    def wait(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except Exception as exc:  # keep polling; report the last error
                last = exc
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}: "
                             f"{last!r}")

    # --- teardown
    def _our_links(self) -> set[str]:
        with links.netlink() as nl:
            return {lk.name for lk in nl.links() if lk.name.startswith(LINK_PREFIXES)}

    def _known_ids(self) -> dict[str, set[str]]:
        ids: dict[str, set[str]] = {"router": set(), "network": set(), "instance": set()}
        with contextlib.suppress(Exception):
            since = 0
            while True:
                page = self.client.changes(since, 0, 1000)
                for change in page["changes"]:
                    if change["kind"] in ids:
                        ids[change["kind"]].add(change["id"])
                if not page["changes"] or page["revision"] == since:
                    break
                since = page["revision"]
        with contextlib.suppress(Exception):
            topo = self.client.topology()
            ids["router"] |= {r["id"] for r in topo["routers"]}
            ids["network"] |= {n["id"] for n in topo["networks"]}
            ids["instance"] |= {p["device_id"] for p in topo["ports"]
                                if str(p.get("device_owner", "")).startswith("compute:")}
        markers = self.settings.path("l3", "routers")
        if markers.is_dir():
            ids["router"] |= {p.name for p in markers.iterdir() if not p.name.startswith(".")}
        return ids

    def _processes_with_our_config(self) -> list[int]:
        config = str(self.config).encode()
        return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid()
                and config in _cmdline(int(e))]

    def close(self) -> None:
        ids = self._known_ids()
        for name in ("dhcp-agent", "l3-agent"):
            self.stop(name)
        self.stop("proxy")
        pid = self.proxy_pid()
        if pid is not None:
            kill_pid(pid)
        for name in list(reversed(list(self.services))):
            self.stop(name, timeout=5.0)
        # A proxy the L3 agent spawned while the test restarted its own waited on the proxy
        # lock and took over when the test's stopped: the pid file named the dead one when it
        # was read above. Anything still running with this stack's config is ours: stop it.
        for pid in self._processes_with_our_config():
            kill_pid(pid)
        self.client.close()
        namespaces = set(self.plugged)
        namespaces |= {f"qrouter-{r}" for r in ids["router"]}
        namespaces |= {f"qdhcp-{n}" for n in ids["network"]}
        namespaces |= {f"vm-{i[:8]}" for i in ids["instance"] if i}
        for ns in sorted(namespaces):
            if links.namespace_exists(ns):
                kill_processes_in(ns)
                links.delete_namespace(ns)
            links.remove_netns_etc(ns)
        with links.netlink() as nl:
            for name in sorted(self._our_links() - self._links_before):
                nl.delete_link(name)


@pytest.fixture
def make_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    stacks: list[Stack] = []

    def make(*, l3: bool = True, dhcp: bool = False, proxy: bool = True,
             overrides: Mapping[str, Mapping[str, Any]] | None = None,
             services: Sequence[str] | None = None, start: bool = True) -> Stack:
        """services= names exactly which to start, in order (overrides l3/dhcp/proxy)."""
        stack = Stack(tmp_path / f"stack{len(stacks)}", l3=l3, dhcp=dhcp, proxy=proxy,
                      overrides=overrides or {}, services=services)
        stacks.append(stack)
        return stack.start_all() if start else stack

    yield make
    failed = any(getattr(getattr(request.node, f"rep_{w}", None), "failed", False)
                 for w in ("setup", "call"))
    for stack in stacks:
        if failed:
            for log in sorted(stack.logs.glob("*.log")) + sorted(
                    stack.state.glob("proxy/*.log")):
                print(f"----- {log.name} (tail) -----")
                print(log.read_text(errors="replace")[-3000:])
        stack.close()


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    """registry + api + agent + proxy + l3-agent, started and ready."""
    return make_stack()
