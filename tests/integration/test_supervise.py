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
    Supervisor,
    file_ready,
    next_backoff,
    pid_alive,
    stop_pid,
    unix_ready,
)

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
        + f"pathlib.Path({str(ready)!r}).write_text(str(os.getpid()))\n"
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
    deadline = time.monotonic() + 10
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
    proc = await asyncio.create_subprocess_exec(PY, "-c", "import time; time.sleep(60)")
    task = asyncio.create_task(proc.wait())
    killed = await stop_pid(proc.pid, timeout_s=5)
    await task
    assert killed is False
