"""Every process the tests start dies with pytest, however pytest dies.

Three layers, because each covers a death the others miss:

1. `spawn()` (and `child_kwargs()` for asyncio) starts each child in its own session with
   PR_SET_PDEATHSIG=SIGKILL: the kernel kills it when pytest dies, kill -9 included. The
   signal follows the *thread* that forked, so a spawn from any thread but the main one is
   handed to one spawner thread that lives as long as pytest.
2. A watchdog process (this file run as a script, in its own session so a Ctrl-C or a kill of
   pytest's group does not reach it) holds the read end of a pipe from pytest. When the pipe
   ends (pytest is gone, whatever the signal) it kills, over a few rounds: every process in
   pytest's private network namespace (tests/conftest.py), every process whose command line
   names the session's base temp dir (a service's config or state lives there, also in another
   namespace: dnsmasq in qdhcp-, a proxy in qrouter-), and every process group it was told of;
   then deletes the named namespaces those processes were in and those the tests named
   (`register_namespace`). This catches what the agents start themselves (proxies, dnsmasq),
   which PDEATHSIG does not: it is not inherited by their children.
3. In pytest, SIGTERM and SIGHUP raise KeyboardInterrupt as Ctrl-C does, so pytest tears its
   fixtures down (stacks, namespaces) as on an interrupt; a session finalizer and an atexit
   handler then kill whatever is left (a second signal cuts the teardown short: the watchdog
   still sweeps after it).

Nothing is ever found by name: by PID (with its start time), by namespace, or by our temp dir.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any

PDEATHSIG = signal.SIGKILL


# --- shared by pytest and the watchdog (stdlib only: the watchdog starts in ~30 ms) ---------

def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/pid/stat: with the pid it names one process for good."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 2:].split()
    if fields[:1] in ([b"Z"], [b"X"]):
        return None  # a zombie is dead (its parent reaps it)
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def _netns(pid: int | str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read()
    except OSError:
        return b""


# The namespace pytest started in, read when tests/conftest.py imports this module, before
# it moves pytest into a private one (/proc/1/ns/net is not readable on every machine).
OUTER_NETNS = _netns("self")


def private_netns() -> int | None:
    """Our network namespace's inode if it is not the one pytest started in (then nothing
    else is in it); None when we run in that one (not root): never sweep it."""
    ours = _netns("self")
    return ours if ours is not None and OUTER_NETNS is not None and ours != OUTER_NETNS else None


def sweep(*, spare: Iterable[int], netns: int | None, marker: bytes | None,
          groups: Iterable[tuple[int, int]], outside: int | None = None,
          rounds: int = 20) -> set[int]:
    """SIGKILL every process that is ours (see the module doc) except `spare`, round after
    round until one finds none (a supervisor may respawn a child between two kills).
    groups: (leader pid, its start time), signalled only while that leader is the same
    process. outside: the machine's namespace, where the marker is not looked for. Returns
    the network namespace inodes the killed processes were in."""
    keep = set(spare) | {os.getpid()}
    init = outside if outside is not None else _netns(1)
    seen_ns: set[int] = set()
    for _ in range(rounds):
        found = 0
        for leader, started in groups:
            if _start_time(leader) == started:
                with contextlib.suppress(OSError):
                    os.killpg(leader, signal.SIGKILL)
                    found += 1
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in keep:
                continue
            ns = _netns(entry)
            # the marker only outside the machine's own namespace: services run in ours or
            # in a named one below it, while a `tail -f` of one of their logs is not ours
            if (netns is not None and ns == netns) or (
                    marker is not None and ns != init and marker in _cmdline(entry)):
                if _start_time(int(entry)) is None:
                    continue  # a zombie: nothing to kill
                with contextlib.suppress(OSError):
                    os.kill(int(entry), signal.SIGKILL)
                    found += 1
                    if ns is not None and ns not in (netns, init):
                        seen_ns.add(ns)
        if not found:
            break
        time.sleep(0.05)
    return seen_ns


def delete_namespaces(names: Iterable[str], inodes: set[int]) -> None:
    """Delete the named namespaces given, and those whose inode is in `inodes`, after killing
    what still runs in them."""
    run_dir = Path("/var/run/netns")
    wanted = set(names)
    with contextlib.suppress(OSError):
        for entry in run_dir.iterdir():
            with contextlib.suppress(OSError):
                if entry.stat().st_ino in inodes:
                    wanted.add(entry.name)
    for name in sorted(wanted):
        try:
            inode = (run_dir / name).stat().st_ino
        except OSError:
            continue
        sweep(spare=(), netns=inode, marker=None, groups=())
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, check=False)
        with contextlib.suppress(OSError):
            # `ip netns exec` reads /etc/netns/NAME; the product's own remove_netns_etc
            for f in (Path("/etc/netns") / name).iterdir():
                f.unlink()
            (Path("/etc/netns") / name).rmdir()


def watch(stream: IO[str], netns: int | None, marker: bytes | None,
          outside: int | None) -> None:
    """The watchdog's body: read registrations until EOF, then sweep and delete."""
    pytest_pid = os.getppid()
    pytest_start = _start_time(pytest_pid)
    groups: list[tuple[int, int]] = []
    names: list[str] = []
    for line in stream:
        kind, _, rest = line.strip().partition(" ")
        if kind == "group":
            pid, started = rest.split()
            groups.append((int(pid), int(started)))
        elif kind == "netns":
            names.append(rest)
    # the pipe also ends when a pytest that finished closes its files on the way out: let it
    # go first (it is in the namespace swept), and never kill it
    deadline = time.monotonic() + 30
    while _start_time(pytest_pid) == pytest_start and time.monotonic() < deadline:
        time.sleep(0.02)
    inodes = sweep(spare=(pytest_pid,) if _start_time(pytest_pid) == pytest_start else (),
                   netns=netns, marker=marker, groups=groups, outside=outside)
    delete_namespaces(names, inodes)


# --- in pytest ------------------------------------------------------------------------------

class _Reaper:
    """The session's registrations, the watchdog's pipe and the spawner thread."""

    def __init__(self) -> None:
        self.groups: list[tuple[int, int]] = []
        self.namespaces: list[str] = []
        self.marker: bytes | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self._pipe: IO[str] | None = None
        self._lock = threading.RLock()  # a signal handler may take it again
        self._spawner: queue.SimpleQueue[Callable[[], None]] | None = None
        self._signals = 0

    # registrations ----------------------------------------------------------------------
    def _tell(self, line: str) -> None:
        with self._lock:
            if self._pipe is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._pipe.write(line + "\n")
                    self._pipe.flush()

    def track(self, pid: int) -> None:
        started = _start_time(pid)
        if started is not None:
            with self._lock:
                self.groups.append((pid, started))
            self._tell(f"group {pid} {started}")

    def register_namespace(self, name: str) -> None:
        with self._lock:
            self.namespaces.append(name)
        self._tell(f"netns {name}")

    # the watchdog -----------------------------------------------------------------------
    def start(self, basetemp: Path) -> None:
        """Start the watchdog (once per session), after pytest entered its namespace."""
        if self.watchdog is not None:
            return
        self.marker = (str(basetemp.resolve()) + "/").encode()
        netns = private_netns()
        read, write = os.pipe()
        self.watchdog = subprocess.Popen(
            [sys.executable, __file__, str(netns or ""), self.marker.decode(),
             str(OUTER_NETNS or "")],
            stdin=read, stdout=subprocess.DEVNULL, start_new_session=True)
        os.close(read)
        # the write end is not inherited (os.pipe is close-on-exec): EOF = pytest is gone
        self._pipe = os.fdopen(write, "w")
        for pid, started in list(self.groups):
            self._tell(f"group {pid} {started}")
        for name in list(self.namespaces):
            self._tell(f"netns {name}")
        atexit.register(self.reap)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # the first one: as Ctrl-C, pytest tears the fixtures down; a second one: kill now
        self._signals += 1
        if self._signals > 1:
            self.reap()
        raise KeyboardInterrupt(f"signal {signum}")

    def reap(self) -> None:
        """Kill whatever the tests left running (session end, atexit, a second signal)."""
        spare = {self.watchdog.pid} if self.watchdog is not None else set()
        with self._lock:
            groups = list(self.groups)
        inodes = sweep(spare=spare, netns=private_netns(), marker=self.marker, groups=groups,
                       outside=OUTER_NETNS)
        if inodes:
            delete_namespaces((), inodes)

    # spawning ---------------------------------------------------------------------------
    def on_main_thread(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the main thread or, from another thread, on the spawner thread: a child's
        PDEATHSIG fires when the thread that forked it ends, not only when pytest does."""
        if threading.current_thread() is threading.main_thread():
            return fn()
        with self._lock:
            if self._spawner is None:
                jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
                self._spawner = jobs
                threading.Thread(target=lambda: [job() for job in iter(jobs.get, None)],
                                 name="reaper-spawner", daemon=True).start()
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def job() -> None:
            try:
                done.set_result(fn())
            except BaseException as exc:  # handed back to the caller
                done.set_exception(exc)

        self._spawner.put(job)
        return done.result()


REAPER = _Reaper()


def _die_with_pytest() -> Callable[[], None]:
    # the product's own preexec (openimds.host.supervise), with SIGKILL: a test's service
    # has nothing to save when pytest is gone
    from openimds.host.supervise import die_with_parent_preexec

    return die_with_parent_preexec(PDEATHSIG)


def child_kwargs() -> dict[str, Any]:
    """Keywords for asyncio.create_subprocess_exec (then `track(proc.pid)`), as `spawn` sets."""
    return {"start_new_session": True, "preexec_fn": _die_with_pytest()}


def track(pid: int) -> None:
    """Kill pid's process group at the end of the session or when pytest dies."""
    REAPER.track(pid)


def register_namespace(name: str) -> None:
    """A named namespace a test creates: deleted if pytest dies before the test does it."""
    REAPER.register_namespace(name)


def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """subprocess.Popen(argv, **kwargs) in its own session, killed when pytest dies."""

    def start() -> subprocess.Popen[Any]:
        return subprocess.Popen(list(argv), **child_kwargs(), **kwargs)

    proc: subprocess.Popen[Any] = REAPER.on_main_thread(start)
    track(proc.pid)
    return proc


def run(argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
    """subprocess.run for a command that may hang (a CLI call): dies with pytest too. In the
    calling thread (which waits for it, so outlives it): calls from threads run at once."""
    return subprocess.run(list(argv), preexec_fn=_die_with_pytest(), **kwargs)


if __name__ == "__main__":
    # the watchdog: argv = netns inode ("" = none), base temp dir (with its trailing "/"),
    # the machine's netns inode
    for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(_sig, signal.SIG_IGN)  # it stops when pytest's pipe ends, not before
    watch(sys.stdin, int(sys.argv[1]) if sys.argv[1] else None,
          sys.argv[2].encode() if sys.argv[2] else None,
          int(sys.argv[3]) if sys.argv[3] else None)
