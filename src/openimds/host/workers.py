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
- Workers sharing one listening socket (the agent's Unix socket: no SO_REUSEPORT for Unix
  sockets) accept through `serve_shared`: one connection per wake-up, and a worker holding
  more connections than the others lets them take the next one (`ConnectionShares`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import mmap
import os
import signal
import socket
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from openimds.http.server import Handler, HttpProtocol, Limits

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


# -- one listening socket, several workers -------------------------------------------------

SHARE_SLACK = 2  # connections a worker may hold over the least loaded one before yielding
YIELD_S = 0.05  # how long it leaves a new connection to the others before taking it anyway


class ConnectionShares:
    """Open connections per worker, in memory the parent maps before forking (MAP_SHARED):
    each worker writes only its own slot and reads the others'."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._mem = mmap.mmap(-1, 8 * max(1, count))
        self._slots = memoryview(self._mem).cast("q")

    def add(self, index: int, delta: int) -> None:
        self._slots[index] += delta

    def reset(self, index: int) -> None:
        """A (re)started worker holds nothing: its predecessor's connections died with it."""
        self._slots[index] = 0

    def held(self) -> list[int]:
        return list(self._slots)

    def over(self, index: int) -> bool:
        """This worker holds more than its share: more than the least loaded one + slack."""
        slots = self._slots
        return slots[index] > min(slots) + SHARE_SLACK


class _CountedProtocol(HttpProtocol):
    __slots__ = ("_index", "_shares")

    def __init__(self, handler: Handler, limits: Limits, loop: asyncio.AbstractEventLoop,
                 shares: ConnectionShares, index: int) -> None:
        super().__init__(handler, limits, loop)
        self._shares = shares
        self._index = index

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._shares.add(self._index, -1)


class SharedAcceptor:
    """Serves `handler` on a listening socket other workers accept on too.

    Every worker's event loop watches the socket, and the kernel wakes all of them for a
    new connection; libuv's own accept loop then takes every pending connection in one go,
    so a burst (the proxy filling its pool of 64 at the start of a load) could all land on
    one worker and stay there (measured: 64/0 in 2 of 5 bursts). Here a worker takes one
    connection per wake-up, and one that holds more than the least loaded worker (+ slack)
    leaves the next one for `YIELD_S`, then takes it anyway (a stopped or dead worker
    must not leave connections unanswered).
    """

    def __init__(self, handler: Handler, sock: socket.socket, limits: Limits,
                 shares: ConnectionShares, index: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._handler = handler
        self._sock = sock
        self._fd = sock.fileno()
        self._limits = limits
        self._shares = shares
        self._index = index
        self._yielded = False
        self._watching = False
        self._closed = False
        self._tasks: set[asyncio.Task[Any]] = set()
        shares.reset(index)
        self._watch()

    def _watch(self) -> None:
        if not self._closed and not self._watching:
            self._loop.add_reader(self._fd, self._readable)
            self._watching = True

    def _unwatch(self) -> None:
        if self._watching:
            self._loop.remove_reader(self._fd)
            self._watching = False

    def _pause(self, seconds: float) -> None:
        self._unwatch()
        self._loop.call_later(seconds, self._watch)

    def _readable(self) -> None:
        if not self._yielded and self._shares.over(self._index):
            self._yielded = True
            self._pause(YIELD_S)
            return
        self._yielded = False
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it
        except OSError as exc:  # EMFILE and the like: back off as asyncio's server does
            log.warning("http.accept_failed error=%s; retrying in 1 s", exc)
            self._pause(1.0)
            return
        conn.setblocking(False)
        self._shares.add(self._index, 1)
        task = self._loop.create_task(self._loop.connect_accepted_socket(
            lambda: _CountedProtocol(self._handler, self._limits, self._loop, self._shares,
                                     self._index), conn))
        self._tasks.add(task)
        task.add_done_callback(functools.partial(self._started, conn))

    def _started(self, conn: socket.socket, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled() or task.exception() is not None:
            # No protocol saw the connection, so nothing else counts it down.
            self._shares.add(self._index, -1)
            conn.close()

    def close(self) -> None:
        """Stop accepting (connections already open are served until they close)."""
        self._closed = True
        self._unwatch()


def serve_shared(handler: Handler, sock: socket.socket, limits: Limits | None,
                 shares: ConnectionShares, index: int) -> SharedAcceptor:
    """Worker `index` of `shares.count` serving `handler` on a socket they all share."""
    return SharedAcceptor(handler, sock, limits or Limits(), shares, index)
