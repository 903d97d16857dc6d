"""host.supervise: real child processes started, probed, restarted with backoff, stopped."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from openimds.host.supervise import (
    Child,
    ChildFailed,
    ChildSpec,
    Recorded,
    Supervisor,
    file_ready,
    next_backoff,
    owns_tcp_listener,
    owns_unix_listener,
    pid_alive,
    proc_start_time,
    read_record,
    stop_pid,
    stop_recorded,
    unix_ready,
    write_record,
)
from tests import reaper

PY = sys.executable


def test_next_backoff_doubles_then_caps_and_resets() -> None:
    spec = ChildSpec("x", ("true",), backoff_initial_s=0.5, backoff_max_s=3, stable_after_s=10)
    assert next_backoff(0, 0, spec) == 0.5
    assert next_backoff(0.5, 1, spec) == 1.0
    assert next_backoff(2, 1, spec) == 3
    assert next_backoff(3, 1, spec) == 3
    assert next_backoff(3, 11, spec) == 0.5


def _sleeper(tmp: Path, name: str = "s", *, ignore_term: bool = False) -> ChildSpec:
    ready = tmp / f"{name}.ready"
    code = (
        "import os, signal, sys, time, pathlib\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignore_term else "")
        # atomic, as the supervisor child below
        + f"pathlib.Path({str(ready)!r} + '.tmp').write_text(str(os.getpid()))\n"
        + f"os.replace({str(ready)!r} + '.tmp', {str(ready)!r})\n"
        + "print('up', flush=True)\n"
        + "time.sleep(600)\n"
    )
    return ChildSpec(
        name, (PY, "-c", code), log_file=tmp / f"{name}.log", ready=file_ready(ready),
        ready_timeout_s=10, stop_timeout_s=0.5, backoff_initial_s=0.1, backoff_max_s=0.4,
    )


async def test_start_restart_and_stop(tmp_path: Path) -> None:
    child = Child(_sleeper(tmp_path))
    exits: list[int] = []
    child.on_exit(lambda c, rc: exits.append(rc))
    await child.start()
    first = child.pid
    assert first is not None and pid_alive(first)
    (tmp_path / "s.ready").unlink()
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (child.pid == first or not (tmp_path / "s.ready").exists()) and \
            time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert child.pid != first and child.restarts == 1
    assert exits == [-signal.SIGKILL]
    second = child.pid
    rc = await child.stop()
    assert rc == -signal.SIGTERM
    assert second is not None and not pid_alive(second)
    assert "up" in (tmp_path / "s.log").read_text()


async def test_sigkill_after_timeout(tmp_path: Path) -> None:
    child = Child(_sleeper(tmp_path, ignore_term=True))
    await child.start()
    t0 = time.monotonic()
    rc = await child.stop()
    assert rc == -signal.SIGKILL
    assert time.monotonic() - t0 >= 0.5


async def test_exit_before_ready_raises_with_log(tmp_path: Path) -> None:
    spec = ChildSpec(
        "bad", (PY, "-c", "print('boom'); raise SystemExit(3)"), log_file=tmp_path / "b.log",
        ready=unix_ready(tmp_path / "nope.sock"), ready_timeout_s=5,
    )
    with pytest.raises(ChildFailed) as info:
        await Child(spec).start()
    assert "exited 3" in info.value.reason and "boom" in info.value.log_tail


async def test_not_ready_in_time_is_stopped(tmp_path: Path) -> None:
    spec = ChildSpec("slow", (PY, "-c", "import time; time.sleep(60)"),
                     ready=lambda: False, ready_timeout_s=0.3, stop_timeout_s=1)
    child = Child(spec)
    with pytest.raises(ChildFailed, match="not ready"):
        await child.start()
    assert child.pid is not None and not pid_alive(child.pid)


async def test_supervisor_order_and_rollback(tmp_path: Path) -> None:
    sup = Supervisor()
    a = sup.add(_sleeper(tmp_path, "a"))
    sup.add(ChildSpec("b", (PY, "-c", "raise SystemExit(1)"), ready=lambda: False))
    with pytest.raises(ChildFailed):
        await sup.start_all()
    assert a.pid is not None and not pid_alive(a.pid)


async def test_stop_pid_by_pid(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(PY, "-c", "import time; time.sleep(60)",
                                                **reaper.child_kwargs())
    reaper.track(proc.pid)
    task = asyncio.create_task(proc.wait())
    killed = await stop_pid(proc.pid, timeout_s=5)
    await task
    assert killed is False


# --- a supervisor killed -9 leaves nothing behind ---------------------------------------------

SUPERVISOR = """
import asyncio, sys
from pathlib import Path
from openimds.host.supervise import ChildSpec, Supervisor, file_ready
tmp = Path(sys.argv[1])
child = "import os, signal, time, pathlib\\n"
if sys.argv[2] == "ignore-term":
    child += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
# atomic: file_ready is true once the file exists and the test reads the pid from it (a child
# preempted between creating and writing it would hand the test an empty file)
ready = str(tmp / "c.ready")
child += f"pathlib.Path({ready!r} + '.tmp').write_text(str(os.getpid()))\\n"
child += f"os.replace({ready!r} + '.tmp', {ready!r})\\ntime.sleep(600)\\n"
async def main():
    sup = Supervisor(record=tmp / "children.json")
    sup.add(ChildSpec("c", (sys.executable, "-c", child), ready=file_ready(tmp / "c.ready"),
                      die_with_parent=sys.argv[3] == "pdeathsig"))
    await sup.start_all()
    print("started", flush=True)
    await asyncio.sleep(600)
asyncio.run(main())
"""


def _run_supervisor(tmp: Path, term: str, death: str) -> tuple[int, int]:
    """Start a supervisor process with one child; kill -9 the supervisor. -> pids."""
    import subprocess

    sup = reaper.spawn([PY, "-c", SUPERVISOR, str(tmp), term, death],
                       stdout=subprocess.PIPE, text=True)
    assert sup.stdout is not None and sup.stdout.readline().strip() == "started"
    child = int((tmp / "c.ready").read_text())
    os.kill(sup.pid, signal.SIGKILL)
    sup.wait(10)
    return sup.pid, child


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


def test_children_die_with_a_killed_supervisor(tmp_path: Path) -> None:
    _, child = _run_supervisor(tmp_path, "default", "pdeathsig")
    assert _gone_within(child, 30), "the child outlived its kill -9'd supervisor"


async def test_leftovers_of_a_killed_supervisor_are_found_and_stopped(tmp_path: Path) -> None:
    # a child that ignores SIGTERM and was not told to die with its parent: an orphan
    _, child = _run_supervisor(tmp_path, "ignore-term", "none")
    try:
        assert not _gone_within(child, 0.3)
        entries = read_record(tmp_path / "children.json")
        assert [(e.name, e.pid) for e in entries] == [("c", child)]
        assert entries[0].start_time == proc_start_time(child)
        # the same pid with another start time is somebody else: never touched
        write_record(tmp_path / "other.json",
                     [Recorded("c", child, entries[0].start_time + 1)])
        assert await stop_recorded(tmp_path / "other.json", timeout_s=0.2) == []
        assert pid_alive(child)
        stopped = await stop_recorded(tmp_path / "children.json", timeout_s=0.5)
        assert [e.pid for e in stopped] == [child]
        assert _gone_within(child, 30)
    finally:
        if pid_alive(child):
            os.kill(child, signal.SIGKILL)


async def test_listener_ownership_names_the_process_on_the_port(tmp_path: Path) -> None:
    import socket

    code = ("import socket, sys, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "u = socket.socket(socket.AF_UNIX); u.bind(sys.argv[1]); u.listen()\n"
            "print(s.getsockname()[1], flush=True); time.sleep(60)\n")
    path = tmp_path / "l.sock"
    proc = await asyncio.create_subprocess_exec(PY, "-c", code, str(path),
                                                stdout=asyncio.subprocess.PIPE,
                                                **reaper.child_kwargs())
    other = await asyncio.create_subprocess_exec(PY, "-c", "import time; time.sleep(60)",
                                                 **reaper.child_kwargs())
    reaper.track(proc.pid)
    reaper.track(other.pid)
    try:
        assert proc.stdout is not None
        port = int((await proc.stdout.readline()).decode())
        assert owns_tcp_listener(proc.pid, port)
        assert owns_unix_listener(proc.pid, path)
        assert not owns_tcp_listener(other.pid, port)  # it answers nothing there
        assert not owns_unix_listener(other.pid, path)
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            assert not owns_tcp_listener(proc.pid, free.getsockname()[1])
    finally:
        for p in (proc, other):
            p.kill()
            await p.wait()
