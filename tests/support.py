"""Helpers shared by the integration and netns tests: real processes, stopped by PID."""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests import reaper

REPO = Path(__file__).resolve().parent.parent
CLOUDINIT_PATH = REPO / ".cache" / "cloud-init" / "usr" / "lib" / "python3" / "dist-packages"
AWS_JS_PATH = REPO / ".cache" / "aws-js" / "node_modules"  # scripts/setup, from npm
PG_SOCKET_DIR = "/var/run/postgresql"
PYTHON = sys.executable
METRICS_SERVICES = ("registry", "api", "agent", "proxy", "l3_agent", "dhcp_agent")


_PICKED: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 of the (private) namespace we run in, below the
    namespace's ephemeral range (tests/conftest.py), so no connection takes it before the
    service it is for binds it; never the same one twice in a test session."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
        low = int(fh.read().split()[0])
    if low <= 20000:  # not in the private namespace (not root): the kernel's pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in range(1000):
        port = random.randrange(20000, low)
        if port in _PICKED:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _PICKED.add(port)
        return port
    raise RuntimeError(f"no free port in 20000-{low - 1}")


def write_config(path: Path, sections: Mapping[str, Mapping[str, Any]]) -> Path:
    """Write an INI file: {"DEFAULT": {...}, "registry": {...}}."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            lines.append(f"{key} = {value}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def base_config(state: Path, **overrides: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A complete test configuration under `state`, with fresh secrets and free ports."""
    cfg: dict[str, dict[str, Any]] = {
        "DEFAULT": {
            "state_path": str(state),
            "debug": "false",
            "metadata_proxy_shared_secret": secrets.token_hex(16),
            "nova_metadata_host": "127.0.0.1",
            "nova_metadata_port": free_port(),
        },
        "registry": {
            "bind_host": "127.0.0.1",
            "bind_port": free_port(),
            "admin_token": "admin-" + secrets.token_hex(8),
            "reader_token": "reader-" + secrets.token_hex(8),
        },
        "api": {},
        # every service's metrics listener on a free port (several stacks may run at once)
        "metrics": {f"{svc}_port": free_port() for svc in METRICS_SERVICES},
    }
    for section, values in overrides.items():
        cfg.setdefault(section, {}).update(values)
    cfg["api"].setdefault("metadata_listen", "127.0.0.1")
    cfg["api"].setdefault("metadata_listen_port", cfg["DEFAULT"]["nova_metadata_port"])
    return cfg


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: no stray OPENIMDS_* options, no proxies."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENIMDS_")}
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.pop(k, None)
    env["NO_PROXY"] = "*"
    # Bytecode cached outside src/: with PYTHONDONTWRITEBYTECODE (set in this machine's shell)
    # every service and CLI call compiled openimds from source again, ~0.4 s of CPU each
    # (`openimds --help` 2.2 -> 1.4 s median, 5 alternated runs, load 5).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.setdefault("PYTHONPYCACHEPREFIX", str(REPO / ".cache" / "pycache"))
    if extra:
        env.update(extra)
    return env


def run_cli(
    config: Path, *args: str, check: bool = False, input: bytes | None = None,
    timeout: float = 60, env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `openimds --config CONFIG ARGS...` as a real subprocess."""
    proc = reaper.run(
        [PYTHON, "-m", "openimds", "--config", str(config), *args],
        capture_output=True, text=True, timeout=timeout, env=clean_env(env),
        input=input.decode() if input is not None else None,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"openimds {' '.join(args)} exited {proc.returncode}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def cli_json(config: Path, *args: str) -> Any:
    """Run a CLI command with -f json and parse its output."""
    return json.loads(run_cli(config, *args, "-f", "json", check=True).stdout)


class Service:
    """One real process, started from argv, stopped by its PID (never by name), killed with
    pytest if pytest dies first (tests/reaper.py)."""

    def __init__(
        self, name: str, argv: Sequence[str], log_dir: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_dir / f"{name}.log"
        self.env = clean_env(env)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Service:
        log = self.log_path.open("ab")
        self.proc = reaper.spawn(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_until(self, ready: Callable[[], bool], timeout: float = 60.0) -> Service:
        """Poll ready until true; the deadline is for a loaded machine (a service's Python
        start took seconds there), it returns as soon as ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.name} exited early:\n{self.log()[-4000:]}")
            with contextlib.suppress(Exception):
                if ready():
                    return self
            time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def openimds_service(name: str, config: Path, *args: str, log_dir: Path) -> Service:
    """A Service running `python -m openimds --config CONFIG ARGS...`."""
    return Service(name, [PYTHON, "-m", "openimds", "--config", str(config), *args], log_dir)


def http_ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status < 500)

    return check


def tcp_ready(host: str, port: int) -> Callable[[], bool]:
    def check() -> bool:
        with socket.create_connection((host, port), timeout=1):
            return True

    return check


def unix_ready(path: str | Path) -> Callable[[], bool]:
    def check() -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1)
            s.connect(str(path))
            return True

    return check


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database over the Unix socket; dropped afterwards. Yields its URL."""
    name = "openimds_test_" + uuid.uuid4().hex[:12]

    def psql(sql: str) -> None:
        subprocess.run(
            ["psql", "-h", PG_SOCKET_DIR, "-d", "postgres", "-qAtc", sql],
            check=True, capture_output=True, env=clean_env({"PGUSER": "root"}),
        )

    psql(f"CREATE DATABASE {name}")
    try:
        yield f"postgresql+psycopg://root@/{name}?host={PG_SOCKET_DIR}"
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    """Poll predicate until it returns something true (returned) or timeout (AssertionError)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def unique_name(prefix: str) -> str:
    """A namespace name unique to this test process and call (deleted if pytest dies before
    the test deletes it)."""
    name = f"{prefix}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    reaper.register_namespace(name)
    return name


def scrape(port: int, host: str = "127.0.0.1", path: str = "/metrics") -> str:
    """One Prometheus scrape of a service's metrics listener (the text format)."""
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as resp:
        return str(resp.read().decode())


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """{(sample name, labels): value} parsed by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def promtool_check(text: str) -> None:
    """`promtool check metrics` accepts the exposition (names, types, units, lint)."""
    proc = subprocess.run(["promtool", "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode() + text[:2000]
