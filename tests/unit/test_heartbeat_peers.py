"""A heartbeat whose answer was lost makes the agent's peers unknown (it fences on expiry):
the registry may have recorded it and answered that a peer had just joined. A beat that never
reached the registry, or that it refused, leaves them as the last answer said."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from openimds.config import Settings
from openimds.errors import (
    BadRequest,
    OpenImdsError,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from openimds.registry.client import AsyncRegistryClient
from openimds.registry.heartbeat import Heartbeat


def unsent(exc: Any) -> Any:
    exc.sent = False
    return exc


class Registry:
    """Answers heartbeats from a script: a dict answer, or an error to raise."""

    def __init__(self, *script: dict[str, Any] | OpenImdsError) -> None:
        self.script = list(script)

    async def heartbeat(self, host: str, agent_type: str,
                        timeout_s: float | None = None) -> dict[str, Any]:
        step = self.script.pop(0)
        if isinstance(step, OpenImdsError):
            raise step
        return step


def beat_for(tmp_path: Path, reg: Registry, down_time_s: float = 10.0) -> Heartbeat:
    settings = dataclasses.replace(Settings(), state_path=str(tmp_path), host="net-1",
                                   agent_down_time=down_time_s)
    return Heartbeat(reg, settings, "l3", stamp_file=tmp_path / "stamp")  # type: ignore[arg-type]


SOLO = {"agent_down_time": 10, "peers": 0}


@pytest.mark.parametrize("lost", [
    UpstreamTimeout("registry did not answer"),
    UpstreamUnavailable("connection reset after sending"),
    UpstreamProtocolError("registry answered HTTP 500"),
])
def test_a_lost_answer_makes_peers_unknown(tmp_path: Path, lost: OpenImdsError) -> None:
    beat = beat_for(tmp_path, Registry(SOLO, lost))
    assert asyncio.run(beat.beat()) and beat.peers == 0
    stamped = (tmp_path / "stamp").read_text().split()
    assert not asyncio.run(beat.beat())
    assert beat.peers is None
    again = (tmp_path / "stamp").read_text().split()
    assert again == [stamped[0], "-1"]  # the last success's time, peers unknown


class SlowDisk(Heartbeat):
    """A Heartbeat whose stamp file sits on a disk that takes 0.3 s per write."""

    writers: list[int]

    def _stamp(self, line: str) -> None:
        self.writers.append(threading.get_ident())
        time.sleep(0.3)
        super()._stamp(line)


def test_every_success_refreshes_the_stamp_and_the_loop_runs_on_meanwhile(
        tmp_path: Path) -> None:
    settings = dataclasses.replace(Settings(), state_path=str(tmp_path), host="net-1")
    reg = Registry(SOLO, {"agent_down_time": 10, "peers": 2})
    beat = SlowDisk(reg, settings, "l3", stamp_file=tmp_path / "stamp")  # type: ignore[arg-type]
    beat.writers = []

    async def two_beats() -> tuple[list[list[str]], int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        seen = []
        for _ in range(2):
            assert await beat.beat()
            # written when the beat returns: what it found is on disk before it counts
            seen.append((tmp_path / "stamp").read_text().split())
            assert seen[-1][0] == f"{beat.last_ok_wall:.3f}"
        ticker.cancel()
        return seen, ticks

    (first, second), ticks = asyncio.run(two_beats())
    assert first[1] == "0" and second[1] == "2"
    assert float(second[0]) > float(first[0])  # refreshed, not only made once
    assert threading.get_ident() not in beat.writers and len(beat.writers) == 2
    # 0.6 s of writes: the loop kept running (inline, it would not have ticked at all)
    assert ticks >= 10, ticks
    assert beat._writer is not None
    beat._writer.shutdown(wait=True)


@pytest.mark.parametrize("kept", [
    unsent(UpstreamUnavailable("connection refused")),
    unsent(UpstreamTimeout("connect timed out")),
    BadRequest("type: 'bogus' is not an agent type"),
])
def test_a_beat_the_registry_never_recorded_keeps_them(tmp_path: Path,
                                                       kept: OpenImdsError) -> None:
    beat = beat_for(tmp_path, Registry(SOLO, kept))
    asyncio.run(beat.beat())
    assert not asyncio.run(beat.beat())
    assert beat.peers == 0


def test_solo_keeps_serving_but_a_lost_answer_fences(tmp_path: Path) -> None:
    async def scenario(script: list[Any], wait_s: float) -> bool:
        beat = beat_for(tmp_path, Registry(*script), down_time_s=0.5)
        beat.interval_s = 0.05
        fenced = asyncio.Event()
        beat.on_fence = fenced.set
        task = asyncio.create_task(beat.run())
        try:
            await asyncio.wait_for(beat.first_ok.wait(), 30)
            try:
                await asyncio.wait_for(fenced.wait(), wait_s)  # fence time 0.3 s
            except TimeoutError:
                return False
            return True
        finally:
            task.cancel()

    solo = {"agent_down_time": 0.5, "peers": 0}  # the registry's down time wins over ours
    down = [unsent(UpstreamUnavailable("connection refused")) for _ in range(1000)]
    # the registry is down: solo serves on (5 fence times without a fence)
    assert not asyncio.run(scenario([solo, *down], 1.5))
    lost = [UpstreamTimeout("no answer"), *down]
    # one answer lost: it may have had a peer. It fences 0.3 s on; the generous bound is for
    # a loaded machine's event loop, it returns as soon as the fence runs
    assert asyncio.run(scenario([solo, *lost], 30.0))


def test_the_client_marks_what_it_never_sent() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed: connection refused

    async def ask(url: str) -> Any:
        # the timeout given as Heartbeat.beat gives it: without one, a POST waits the
        # registry's reuse hold on top (30 s of a silent registry, for a write that binds
        # an address; a heartbeat binds none). 1 s, not less: a connect starved by a loaded
        # machine must not time out as unsent.
        async with AsyncRegistryClient(url, "t") as c:
            try:
                await c.heartbeat("h", "l3", timeout_s=1.0)
            except OpenImdsError as exc:
                return exc
        return None

    refused = asyncio.run(ask(f"http://127.0.0.1:{port}"))
    assert isinstance(refused, UpstreamUnavailable) and refused.sent is False
    with socket.socket() as silent:  # accepts, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        timed_out = asyncio.run(ask(f"http://127.0.0.1:{silent.getsockname()[1]}"))
    assert isinstance(timed_out, UpstreamTimeout) and timed_out.sent is True
