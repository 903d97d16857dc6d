"""Pre-forked worker processes: one hot hop on every core (`metadata_workers`, `[api] workers`,
`[proxy] workers`).

Rules:
- The parent binds what must be shared (the agent's Unix socket, the API's SO_REUSEPORT
  sockets) *before* forking and before any event loop exists; each worker then runs its own
  event loop, caches and change-feed follower, so nothing is shared at run time and the wire
  contract is the same as with one process.
- The parent forwards SIGTERM/SIGINT (stop) and SIGHUP (rescan) to every worker and exits once
  they all have. A worker that dies on its own is started again after a second; one that
  exits with an error status within `FAIL_FAST_S` of its start (a bad config, a port in
  use) stops them all, with its status, as a single process would have failed. A worker
  killed by a signal is always started again.
- A worker calls `ready()` once it serves; the parent's `on_ready` runs when every worker
  has (the proxy writes its pid file, its readiness mark, then).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

FAIL_FAST_S = 5.0
RESPAWN_DELAY_S = 1.0

Work = Callable[[int, Callable[[], None]], int]


def run_workers(
    count: int, work: Work, *, name: str,
    prepare: Callable[[], None] | None = None,
    finish: Callable[[], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run `work(index, ready)` in `count` forked processes until stopped; see the module
    docstring. `prepare` runs in the parent once its signal handlers are in place, before
    the first fork; `finish` runs in the parent after the last worker exited."""
    stopping = False
    workers: dict[int, tuple[int, float]] = {}  # pid -> (index, started at)

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    ready_r, ready_w = os.pipe()
    status = 0
    try:
        if prepare is not None:
            prepare()
        for index in range(count):
            if stopping:
                break
            _spawn(index, work, ready_w, old, workers)
        early = _await_ready(ready_r, count, workers, lambda: stopping)
        if early is not None:
            log.error("%s.worker_failed status=%d before it was ready; stopping all", name,
                      early)
            status = early if early > 0 else 1
            forward(signal.SIGTERM, None)
        elif on_ready is not None and not stopping and len(workers) == count:
            on_ready()
        log.info("%s.workers_started count=%d pids=%s", name, count,
                 ",".join(str(p) for p in workers))
        while workers:
            try:
                pid, wstatus = os.wait()
            except ChildProcessError:
                break
            index, started = workers.pop(pid, (-1, 0.0))
            if index < 0:
                continue
            code = os.waitstatus_to_exitcode(wstatus)
            if stopping:
                continue
            if time.monotonic() - started < FAIL_FAST_S and code > 0:
                log.error("%s.worker_failed index=%d pid=%d status=%d; stopping all",
                          name, index, pid, code)
                status = code if code > 0 else 1
                forward(signal.SIGTERM, None)
                continue
            log.error("%s.worker_died index=%d pid=%d status=%d; starting it again",
                      name, index, pid, code)
            time.sleep(RESPAWN_DELAY_S)
            if not stopping:
                _spawn(index, work, ready_w, old, workers)
    finally:
        for pid in list(workers):  # only on an error in the parent itself
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for s, handler in old.items():
            signal.signal(s, handler)
        os.close(ready_r)
        os.close(ready_w)
        if finish is not None:
            finish()
    return status


def _spawn(
    index: int, work: Work, ready_w: int, handlers: Mapping[signal.Signals, Any],
    workers: dict[int, tuple[int, float]],
) -> None:
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            for s, handler in handlers.items():
                signal.signal(s, handler)

            def ready() -> None:
                with contextlib.suppress(OSError):
                    os.write(ready_w, b".")

            code = work(index, ready)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("worker %d failed", index)
        finally:
            from openimds.log import access_line

            access_line.flush()
            logging.shutdown()
            os._exit(code)
    workers[pid] = (index, time.monotonic())


def _await_ready(fd: int, count: int, workers: dict[int, tuple[int, float]],
                 stopping: Callable[[], bool]) -> int | None:
    """Block until `count` workers said ready or we are stopping; the exit status of a
    worker that exited first (it is reaped here)."""
    import select

    got = 0
    while got < count and not stopping():
        readable, _, _ = select.select([fd], [], [], 0.2)
        if readable:
            got += len(os.read(fd, count - got))
            continue
        for pid in list(workers):
            with contextlib.suppress(ChildProcessError):
                done, wstatus = os.waitpid(pid, os.WNOHANG)
                if done:
                    workers.pop(pid)
                    return os.waitstatus_to_exitcode(wstatus)
    return None
