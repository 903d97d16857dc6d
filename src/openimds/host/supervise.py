"""Supervise child processes from asyncio: start, wait until ready, restart with backoff, stop.

A `Child` runs one argv (with its own environment and log file) and keeps it alive:

    child = Child(ChildSpec("proxy", ("openimds", "proxy"), log_file=Path("proxy.log"),
                            ready=unix_ready("/var/lib/openimds/metadata_proxy")))
    await child.start()          # spawn, then poll `ready` until true (or raise)
    ...                          # the child is respawned with exponential backoff if it dies
    await child.stop()           # SIGTERM, then SIGKILL after stop_timeout_s

`Supervisor` starts several children in the order given (each one ready before the next
starts) and stops them in reverse order. Processes are always signalled by their own PID (or,
with ``kill_group``, the process group this module created for them), never by name.

Rules: no polling thread (Neutron's ProcessMonitor checks every 60 s; we `await proc.wait()`
and learn of a death at once), no pid-file or cmdline guessing: the handle we spawned is the
truth. Backoff: `next_backoff()` is pure; a child that stayed up `stable_after_s` starts again
from `backoff_initial_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import inspect
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ReadyCheck = Callable[[], Awaitable[bool] | bool]


class ChildFailed(Exception):
    """A child exited before it became ready, or did not become ready in time."""

    def __init__(self, name: str, reason: str, log_tail: str = "") -> None:
        self.name = name
        self.reason = reason
        self.log_tail = log_tail
        super().__init__(f"{name}: {reason}")


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """How to run and watch one child process."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None  # None = inherit ours
    log_file: Path | None = None  # stdout+stderr appended here; None = inherit
    cwd: str | None = None
    ready: ReadyCheck | None = None  # None = ready as soon as it is spawned
    ready_timeout_s: float = 30.0
    ready_interval_s: float = 0.05
    stop_timeout_s: float = 10.0
    restart: bool = True
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    stable_after_s: float = 10.0
    kill_group: bool = False  # signal the child's whole process group (it leads a new session)
    stop_signal: int = signal.SIGTERM
    # The kernel sends the child SIGTERM when we die, however we die (kill -9 too):
    # PR_SET_PDEATHSIG, set between fork and exec.
    die_with_parent: bool = False


def next_backoff(previous_s: float, uptime_s: float, spec: ChildSpec) -> float:
    """Delay before the next restart: doubles per quick death, resets after a stable run."""
    if previous_s <= 0 or uptime_s >= spec.stable_after_s:
        return spec.backoff_initial_s
    return min(previous_s * 2, spec.backoff_max_s)


def read_tail(path: Path | None, max_bytes: int = 4000) -> str:
    """The end of a log file (for error messages); empty if there is none."""
    if path is None:
        return ""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def signal_pid(pid: int, sig: int, *, group: bool = False) -> bool:
    """Send sig to pid (or its process group); False if it is already gone."""
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return False
    # state is the field after the ")" that closes comm
    return stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3] not in (b"Z", b"X")


async def stop_pid(
    pid: int, *, timeout_s: float = 10.0, sig: int = signal.SIGTERM, group: bool = False,
) -> bool:
    """Stop a process we do not hold a handle for: sig, wait, then SIGKILL.

    Returns True if it had to be killed. Polls /proc, so it works for any PID (e.g. one read
    from a pid file); for our own children prefer `Child.stop`, which reaps them.
    """
    if not signal_pid(pid, sig, group=group):
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return False
        await asyncio.sleep(0.05)
    log.warning("supervise.kill pid=%d reason=no exit %.1fs after signal %d", pid, timeout_s, sig)
    signal_pid(pid, signal.SIGKILL, group=group)
    return True


# --- dying with the parent, and finding what a dead parent left ------------------------------

PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    # loaded in the parent: the child between fork and exec must not dlopen
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def die_with_parent_preexec(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A preexec_fn that makes the kernel send sig to the child when this process dies."""
    libc = _load_libc()
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def proc_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/pid/stat):
    with the pid it names one process for good, even after the pid is reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class Recorded:
    """One process a supervisor started: enough to find it again, and only it."""

    name: str
    pid: int
    start_time: int

    def alive(self) -> bool:
        return proc_start_time(self.pid) == self.start_time and pid_alive(self.pid)


def read_record(path: Path) -> list[Recorded]:
    """The processes recorded in path (empty if it is missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
        return [Recorded(str(e["name"]), int(e["pid"]), int(e["start_time"]))
                for e in data.get("children", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def write_record(path: Path, entries: Sequence[Recorded], owner: int | None = None) -> None:
    """Atomically write the record (owner = the supervising process's pid)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps({
        "owner": owner if owner is not None else os.getpid(),
        "children": [{"name": e.name, "pid": e.pid, "start_time": e.start_time}
                     for e in entries],
    }) + "\n")
    os.replace(tmp, path)


async def stop_recorded(path: Path, timeout_s: float = 20.0) -> list[Recorded]:
    """Stop every process in the record that still runs (same pid AND start time: a reused
    pid is someone else's), SIGTERM then SIGKILL, all at once. Returns those stopped."""
    alive = [e for e in read_record(path) if e.alive()]
    for entry in alive:
        log.warning("supervise.leftover name=%s pid=%d action=stop", entry.name, entry.pid)
    await asyncio.gather(*(stop_pid(e.pid, timeout_s=timeout_s) for e in alive))
    return alive


def _socket_inodes(pids: Sequence[int]) -> set[int]:
    inodes: set[int] = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (worker processes hold listeners too)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        with contextlib.suppress(IndexError, ValueError):
            ppid = int(stat[stat.rfind(b")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, ()))
    return tree


def tcp_listener_inodes(pid: int, port: int) -> set[int]:
    """Inodes of the TCP sockets listening on port in pid's network namespace."""
    found: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # local_address is HEXIP:HEXPORT; st 0A = LISTEN; inode is column 9
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(cols[9]))
    return found


def unix_listener_inodes(pid: int, path: str | Path) -> set[int]:
    """Inodes of the listening Unix stream sockets bound to path (pid's namespace)."""
    found: set[int] = set()
    try:
        lines = Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]
    except OSError:
        return found
    for line in lines:
        cols = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = accepting
        if len(cols) >= 8 and cols[7] == str(path) and int(cols[3], 16) & 0x10000:
            found.add(int(cols[6]))
    return found


def owns_tcp_listener(pid: int, port: int) -> bool:
    """True if pid (or a descendant) holds a socket listening on TCP port: the process that
    answers there is ours, not another one that happened to be on the port."""
    listeners = tcp_listener_inodes(pid, port)
    return bool(listeners) and bool(listeners & _socket_inodes(process_tree(pid)))


def owns_unix_listener(pid: int, path: str | Path) -> bool:
    """True if pid (or a descendant) holds a socket listening on the Unix socket path."""
    listeners = unix_listener_inodes(pid, path)
    return bool(listeners) and bool(listeners & _socket_inodes(process_tree(pid)))


def all_ready(*checks: ReadyCheck) -> Callable[[], Awaitable[bool]]:
    """Ready when every check is (in order; stops at the first that is not)."""

    async def check() -> bool:
        for one in checks:
            if not await _check(one):
                return False
        return True

    return check


async def _check(ready: ReadyCheck) -> bool:
    try:
        result = ready()
        if inspect.isawaitable(result):
            result = await result
        return bool(result)
    except Exception:  # a readiness probe failing is the normal "not yet"
        return False


class Child:
    """One supervised process. Not thread-safe; use from one event loop."""

    def __init__(self, spec: ChildSpec) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.started_at = 0.0
        self.last_returncode: int | None = None
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._on_exit: list[Callable[[Child, int], None]] = []
        self._on_spawn: list[Callable[[Child], None]] = []

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def on_exit(self, callback: Callable[[Child, int], None]) -> None:
        """Call callback(child, returncode) each time the process exits unexpectedly."""
        self._on_exit.append(callback)

    def on_spawn(self, callback: Callable[[Child], None]) -> None:
        """Call callback(child) each time a new process is spawned (self.pid is the new one)."""
        self._on_spawn.append(callback)

    async def _spawn(self) -> asyncio.subprocess.Process:
        spec = self.spec
        out: int | None = None
        if spec.log_file is not None:
            spec.log_file.parent.mkdir(parents=True, exist_ok=True)
            out = os.open(spec.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT if out is not None else None,
                env=dict(spec.env) if spec.env is not None else None,
                cwd=spec.cwd,
                start_new_session=True,
                preexec_fn=die_with_parent_preexec() if spec.die_with_parent else None,
            )
        except OSError as exc:
            raise ChildFailed(spec.name, f"cannot execute {spec.argv[0]!r}: {exc}") from exc
        finally:
            if out is not None:
                os.close(out)
        self.started_at = time.monotonic()
        log.info("supervise.started name=%s pid=%d", spec.name, proc.pid)
        self.proc = proc
        for callback in self._on_spawn:
            callback(self)
        return proc

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        spec = self.spec
        if spec.ready is None:
            return
        deadline = time.monotonic() + spec.ready_timeout_s
        while True:
            if proc.returncode is not None:
                raise ChildFailed(
                    spec.name, f"exited {proc.returncode} before it was ready",
                    read_tail(spec.log_file),
                )
            if await _check(spec.ready):
                log.info(
                    "supervise.ready name=%s pid=%d after_ms=%.0f", spec.name, proc.pid,
                    (time.monotonic() - self.started_at) * 1000,
                )
                return
            if time.monotonic() >= deadline:
                raise ChildFailed(
                    spec.name, f"not ready after {spec.ready_timeout_s:.0f}s",
                    read_tail(spec.log_file),
                )
            # wake early if the process dies meanwhile
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(proc.wait()), spec.ready_interval_s)

    async def start(self) -> None:
        """Spawn the child and wait until it is ready; then keep it alive in the background.

        Raises ChildFailed (with the log tail) if it exits or is not ready in time; the
        half-started process is stopped first.
        """
        if self.running:
            return
        self._stopping = False
        proc = await self._spawn()
        self.proc = proc
        try:
            await self._wait_ready(proc)
        except BaseException:
            await self._terminate(proc)
            raise
        self._watch = asyncio.create_task(self._keep_alive(), name=f"supervise-{self.name}")

    async def _keep_alive(self) -> None:
        spec = self.spec
        delay = 0.0
        while True:
            proc = self.proc
            if proc is None:
                return
            rc = await proc.wait()
            self.last_returncode = rc
            if self._stopping:
                return
            uptime = time.monotonic() - self.started_at
            for callback in self._on_exit:
                callback(self, rc)
            if not spec.restart:
                log.error("supervise.exited name=%s pid=%d rc=%d restart=no", spec.name,
                          proc.pid, rc)
                return
            delay = next_backoff(delay, uptime, spec)
            log.error(
                "supervise.exited name=%s pid=%d rc=%d uptime_s=%.1f restart_in_s=%.1f",
                spec.name, proc.pid, rc, uptime, delay,
            )
            await asyncio.sleep(delay)
            if self._stopping:
                return
            try:
                new = await self._spawn()
            except ChildFailed as exc:
                log.error("supervise.respawn_failed name=%s reason=%s", spec.name, exc.reason)
                self.started_at = time.monotonic()
                continue
            self.proc = new
            self.restarts += 1
            try:
                await self._wait_ready(new)
            except ChildFailed as exc:
                log.error("supervise.not_ready name=%s reason=%s", spec.name, exc.reason)
                await self._terminate(new)
                # loop: wait() returns at once, the next backoff applies

    async def _terminate(self, proc: asyncio.subprocess.Process) -> int | None:
        spec = self.spec
        if proc.returncode is not None:
            return proc.returncode
        signal_pid(proc.pid, spec.stop_signal, group=spec.kill_group)
        try:
            return await asyncio.wait_for(asyncio.shield(proc.wait()), spec.stop_timeout_s)
        except TimeoutError:
            log.warning("supervise.kill name=%s pid=%d reason=no exit %.1fs after signal %d",
                        spec.name, proc.pid, spec.stop_timeout_s, spec.stop_signal)
            signal_pid(proc.pid, signal.SIGKILL, group=spec.kill_group)
            return await proc.wait()

    async def stop(self) -> int | None:
        """Stop supervising and stop the process: stop_signal, then SIGKILL. Returns its rc."""
        self._stopping = True
        watch, self._watch = self._watch, None
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if self.proc is None:
            return None
        rc = await self._terminate(self.proc)
        log.info("supervise.stopped name=%s pid=%d rc=%s", self.name, self.proc.pid, rc)
        return rc

    async def restart(self) -> None:
        """Stop and start again (e.g. after a config change)."""
        await self.stop()
        await self.start()


@dataclass
class Supervisor:
    """Children started in order, each ready before the next; stopped in reverse order."""

    children: list[Child] = field(default_factory=list)
    # Where every spawned child's pid and start time is written, so that whoever runs next
    # can stop what a killed supervisor left (`stop_recorded`).
    record: Path | None = None

    def add(self, spec: ChildSpec) -> Child:
        child = Child(spec)
        self.children.append(child)
        if self.record is not None:
            child.on_spawn(lambda _c: self.write_record())
        return child

    def write_record(self) -> None:
        if self.record is None:
            return
        entries = []
        for child in self.children:
            pid = child.pid
            start = proc_start_time(pid) if pid is not None and child.running else None
            if pid is not None and start is not None:
                entries.append(Recorded(child.name, pid, start))
        try:
            write_record(self.record, entries)
        except OSError as exc:
            log.error("supervise.record_failed path=%s reason=%s", self.record, exc)

    def get(self, name: str) -> Child:
        for child in self.children:
            if child.name == name:
                return child
        raise KeyError(name)

    async def start_all(
        self, progress: Callable[[Child], None] | None = None,
    ) -> None:
        """Start every child in order. On failure, stops those already started and re-raises."""
        for child in self.children:
            try:
                await child.start()
            except BaseException:
                await self.stop_all()
                raise
            if progress is not None:
                progress(child)

    async def stop_all(self) -> None:
        """Stop every child, last started first."""
        for child in reversed(self.children):
            try:
                await child.stop()
            except Exception:
                log.exception("supervise.stop_failed name=%s", child.name)
        if self.record is not None:
            with contextlib.suppress(OSError):
                self.record.unlink()


# Readiness probes (async callables for ChildSpec.ready).

def unix_ready(path: str | Path, timeout_s: float = 1.0) -> Callable[[], Awaitable[bool]]:
    """Ready when a stream connection to the Unix socket at path succeeds."""

    async def check() -> bool:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout_s)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    return check


def tcp_ready(host: str, port: int, timeout_s: float = 1.0) -> Callable[[], Awaitable[bool]]:
    """Ready when a TCP connection to host:port succeeds."""

    async def check() -> bool:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    return check


def http_ready(
    host: str, port: int, path: str = "/", timeout_s: float = 2.0, max_status: int = 499,
) -> Callable[[], Awaitable[bool]]:
    """Ready when GET path on host:port answers with a status ≤ max_status."""

    async def check() -> bool:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), timeout_s)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        parts = line.split()
        return len(parts) >= 2 and parts[1].isdigit() and int(parts[1]) <= max_status

    return check


def file_ready(path: str | Path) -> Callable[[], bool]:
    """Ready when path exists (e.g. a pid file the child writes once it is serving)."""
    return lambda: Path(path).exists()


def socket_listening(family: int, address: str | tuple[str, int]) -> bool:
    """Synchronous probe: can we connect to address? (For CLI checks outside a loop.)"""
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(address)
        except OSError:
            return False
        return True
