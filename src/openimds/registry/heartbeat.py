"""An agent's heartbeat into the registry, and the fence that goes with it.

    beat = Heartbeat(client, settings, "l3", on_fence=..., on_unfence=...)
    task = asyncio.create_task(beat.run())
    await beat.first_ok.wait()       # build nothing before the registry knows we are alive

Every `[AGENT] report_interval` the agent POSTs /v1/agents {host, type}. The registry
declares it dead (and moves its work) once its last heartbeat is older than agent_down_time
(the value the registry returns, which wins over ours). So the agent must stop serving before
that moment by itself, whatever the reason it cannot report (registry down, network cut,
event loop stalled): it is *fenced* once `fence_after_s` = FENCE_FRACTION × agent_down_time
has passed since the send time of its last successful heartbeat, and `on_fence` runs (the
L3/DHCP agents take their legs down). The send time, not the answer time, is what the
registry may have recorded at the earliest, so the margin (4 s of 10) covers the registry's
reaper tick, clock skew between registry processes and the fence's own work. When a
heartbeat succeeds again, `on_unfence` runs (the agents converge: whatever is still
scheduled to this node comes back, whatever moved away is removed).

Solo agents do not fence. Each answer says how many other alive agents of our type exist
(`peers`); if the last successful one said none, nobody can take our work over (the registry
moves a dead agent's work only to agents alive since before its last heartbeat), so on expiry
we keep serving: a registry outage costs the VMs nothing. Unknown peers (no answer yet, an
old stamp file, an old registry) count as peers: fence. A beat whose answer was lost (a
timeout, a connection cut after sending, a 5xx) makes them unknown too: the registry may have
recorded it and answered that a peer had just joined, and it keeps that answer
(`agents.peers`) to decide whether our work moves. Only a beat that surely never reached the
registry (connection refused, connect timed out) or that it refused (4xx) leaves them as the
last answer said, so a registry that is down still costs a solo agent nothing.

The wall-clock time of the last success and its peers are kept in `stamp_file`, so an agent
that starts after being away longer than the fence time (a crash that left its namespaces
behind) knows to fence what it finds before anything else (`stale_at_start`), unless it was
solo.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openimds.config import Settings
from openimds.errors import OpenImdsError, UpstreamError
from openimds.registry.client import AsyncRegistryClient

log = logging.getLogger(__name__)

FENCE_FRACTION = 0.6
Callback = Callable[[], Awaitable[None] | None]


class Heartbeat:
    def __init__(self, client: AsyncRegistryClient, settings: Settings, agent_type: str, *,
                 on_fence: Callback | None = None, on_unfence: Callback | None = None,
                 stamp_file: Path | None = None) -> None:
        self.client = client
        self.host = settings.host
        self.type = agent_type
        self.interval_s = settings.AGENT.report_interval
        self.down_time_s = settings.agent_down_time
        self.on_fence = on_fence
        self.on_unfence = on_unfence
        self.stamp_file = stamp_file or settings.path("heartbeat", agent_type)
        self.first_ok = asyncio.Event()
        self.last_ok: float | None = None  # monotonic send time of the last success
        self.peers: int | None = None  # other alive agents of our type, per the last success
        self.last_ok_wall = 0.0  # wall-clock time of the last success (the stamp file's)
        self.solo_serving = False  # expired, but solo: serving on (logged once)
        self.fenced = True  # until the registry has heard from us
        self.sent = 0
        self.failed = 0
        self._writer: ThreadPoolExecutor | None = None  # writes the stamp file (_save_stamp)

    @property
    def fence_after_s(self) -> float:
        return FENCE_FRACTION * self.down_time_s

    def stale_at_start(self) -> bool:
        """Whether the last success recorded on disk is older than the fence time (or
        missing) and that run had peers: state left from it may be served elsewhere now."""
        try:
            fields = self.stamp_file.read_text().split()
            last = float(fields[0])
            peers = int(fields[1]) if len(fields) > 1 else None
        except (OSError, ValueError, IndexError):
            return True
        if time.time() - last <= self.fence_after_s:
            return False
        if peers == 0:
            log.warning("heartbeat.stale_solo host=%s type=%s age_s=%.1f: keep what the last "
                        "run left, it had no peer that could have taken it over", self.host,
                        self.type, time.time() - last)
            return False
        log.warning("heartbeat.stale host=%s type=%s age_s=%.1f peers=%s: fence what the last "
                    "run left, it may be served elsewhere now", self.host, self.type,
                    time.time() - last, "unknown" if peers is None else peers)
        return True

    def _stamp(self, line: str) -> None:
        with contextlib.suppress(OSError):
            self.stamp_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.stamp_file.with_name(f".{self.stamp_file.name}.tmp")
            tmp.write_text(line)
            os.replace(tmp, self.stamp_file)

    async def _save_stamp(self) -> None:
        """_stamp, off the event loop: the write and the rename over the old file block on the
        disk (~0.5 ms on ext4 here, more on a busy disk), and the loop serves requests. A
        thread of our own, not the loop's default pool: an agent's converges fill that pool
        and must not hold up a beat; one thread also keeps the stamps in order. Awaited, so
        the file says what a beat found before the beat counts (first_ok, stale_at_start);
        shielded, so a beat cancelled at shutdown still leaves its stamp."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix=f"heartbeat-{self.type}")
        line = f"{self.last_ok_wall:.3f} {-1 if self.peers is None else self.peers}\n"
        await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._writer,
                                                                        self._stamp, line))

    async def beat(self) -> bool:
        """One heartbeat; True if the registry recorded it."""
        sent_at = time.monotonic()
        self.sent += 1
        try:
            answer = await self.client.heartbeat(self.host, self.type,
                                                 timeout_s=max(self.fence_after_s, 1.0))
        except OpenImdsError as exc:
            self.failed += 1
            lost = isinstance(exc, UpstreamError) and exc.sent
            log.warning("heartbeat.failed host=%s type=%s reason=%s%s", self.host, self.type,
                        exc.reason, "; peers unknown (the registry may have recorded it)"
                        if lost and self.peers is not None else "")
            if lost and self.peers is not None:
                self.peers = None
                await self._save_stamp()
            return False
        down = answer.get("agent_down_time")
        if isinstance(down, int | float) and down > 0:
            self.down_time_s = float(down)
        peers = answer.get("peers")
        self.peers = peers if isinstance(peers, int) and not isinstance(peers, bool) else None
        self.last_ok = sent_at
        self.last_ok_wall = time.time()
        self.solo_serving = False
        await self._save_stamp()
        return True

    def expired(self) -> bool:
        return self.last_ok is None or time.monotonic() - self.last_ok > self.fence_after_s

    async def _call(self, callback: Callback | None) -> None:
        if callback is None:
            return
        result = callback()
        if result is not None:
            await result

    async def run(self) -> None:
        """Beat every report_interval; fence and unfence as the module doc says. A beat runs
        in its own task, so a registry that hangs cannot delay the fence."""
        next_beat = time.monotonic()
        inflight: asyncio.Task[bool] | None = None
        try:
            while True:
                if inflight is not None and inflight.done():
                    ok, inflight = inflight.result(), None
                    if ok and self.fenced and not self.expired():
                        self.fenced = False
                        log.info("heartbeat.serving host=%s type=%s", self.host, self.type)
                        self.first_ok.set()
                        await self._call(self.on_unfence)
                if inflight is None and time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval_s
                    inflight = asyncio.create_task(self.beat())
                if not self.fenced and self.expired() and self.peers == 0:
                    if not self.solo_serving:
                        self.solo_serving = True
                        log.warning("heartbeat.solo host=%s type=%s reason=no heartbeat "
                                    "recorded for %.1f s, but no other %s agent was alive: "
                                    "keep serving (nobody can take our work over)",
                                    self.host, self.type, self.fence_after_s, self.type)
                elif not self.fenced and self.expired():
                    self.fenced = True
                    log.error("heartbeat.fenced host=%s type=%s reason=no heartbeat recorded "
                              "for %.1f s, peers=%s: stop serving before the registry moves "
                              "our work", self.host, self.type, self.fence_after_s,
                              "unknown" if self.peers is None else self.peers)
                    await self._call(self.on_fence)
                await asyncio.sleep(0.05 if inflight is not None else
                                    max(0.05, min(0.25, next_beat - time.monotonic())))
        finally:
            if inflight is not None:
                inflight.cancel()
            if self._writer is not None:
                self._writer.shutdown(wait=False)  # a stamp still queued is written
                self._writer = None
