"""The HTTP server layer's own Python per request, two versions of it side by side.

    .venv/bin/python bench/server_ab.py BASE.py [NEW.py] [--rounds 25]
    # BASE.py: e.g. git show COMMIT:src/openimds/http/server.py > /tmp/server_base.py

`openimds.http.server` runs every hot hop, but a cut of 0.1-0.5 us of its Python per request
is 1-4 % of a hop's CPU: below what a chain_bench run on a shared machine resolves (an A/A
run there moved 5-13 %). Here both versions are loaded into one process (NEW defaults to the
checkout's own) and driven with fake transports, the rounds alternating A, B / B, A per
scenario, so both meet the same machine; run BASE against itself for the noise (A/A).

Scenarios (µs of process CPU per request, the minimum and median over rounds):
- **api 1/read, 8/read**: a plain parse of the request the agent sends the API (7 header
  fields), a sync `RawResponse`; one request per read, or eight pipelined (the agent's pool
  pipelines 8 deep);
- **known 1/read, 8/read**: `Limits(known_heads=True)` (the agent), the proxy's request, a
  `Deferred` resolved after the read (as the agent's pool does), batches flushed as the
  server's call_soon would;
- **known, every head new**: as above with a new peer address in every head (a boot storm:
  each VM asks each path once), nothing kept beforehand;
- **close**: a new connection per request (protocol, parser, the answer, connection_lost).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import uvloop

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 700\r\n\r\n"
          + b"x" * 700)
API_REQUEST = (b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 127.0.0.1:8775\r\n"
               b"X-Forwarded-For: 10.0.0.5\r\n"
               b"X-Instance-ID: 4b1f9a2e-6c1d-4f7e-9a3b-1c2d3e4f5a6b\r\n"
               b"X-Tenant-ID: 0123456789abcdef0123456789abcdef\r\n"
               b"X-Instance-ID-Signature: " + b"ab" * 32 + b"\r\n"
               b"X-Openimds-Request-Id: req-%08x\r\n\r\n")
AGENT_REQUEST = (b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 10.0.0.1:9697\r\n"
                 b"User-Agent: Cloud-Init/23.1\r\nAccept: */*\r\n"
                 b"Accept-Encoding: gzip, deflate\r\nX-Forwarded-For: 10.0.0.5\r\n"
                 b"X-Neutron-Router-ID: 7a1f9a2e-6c1d-4f7e-9a3b-1c2d3e4f5a6b\r\n"
                 b"X-Openimds-Request-Id: req-%08x\r\n\r\n")
CLOSE_REQUEST = (b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 10.0.0.1\r\n"
                 b"Connection: close\r\n\r\n")
N = 8000  # requests per scenario run


class _Client:
    """A client connection's transport: answers are dropped."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.5", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        raise AssertionError("requests queued: the server did not answer at once")

    resume_reading = pause_reading


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def scenarios(srv: Any, loop: asyncio.AbstractEventLoop) -> dict[str, Callable[[], None]]:
    answer = srv.RawResponse(ANSWER)
    out: dict[str, Callable[[], None]] = {}

    def connection(handler: Callable[[Any], Any], known: bool = False) -> Any:
        proto = srv.HttpProtocol(handler, srv.Limits(known_heads=known), loop)
        proto.connection_made(_Client())
        return proto

    def reads(proto: Any, chunks: list[bytes]) -> Callable[[], None]:
        def run() -> None:
            for chunk in chunks:
                proto.data_received(chunk)
        return run

    out["api 1/read"] = reads(connection(lambda _req: srv.RawResponse(ANSWER)),
                              [API_REQUEST % i for i in range(N)])
    out["api 8/read"] = reads(connection(lambda _req: srv.RawResponse(ANSWER)),
                              [b"".join(API_REQUEST % (i * 8 + j) for j in range(8))
                               for i in range(N // 8)])

    waiting: list[Any] = []

    def deferred(_req: Any) -> Any:
        d = srv.Deferred()
        waiting.append(d)
        return d

    known1 = connection(deferred, known=True)
    agent_singles = [AGENT_REQUEST % i for i in range(N)]

    def known_one() -> None:
        for r in agent_singles:
            known1.data_received(r)
            waiting.pop().resolve(answer)

    out["known 1/read, deferred"] = known_one
    known8 = connection(deferred, known=True)
    agent_eights = [b"".join(AGENT_REQUEST % (i * 8 + j) for j in range(8))
                    for i in range(N // 8)]

    def known_eight() -> None:
        for b in agent_eights:
            known8.data_received(b)
            for d in waiting:
                d.resolve(answer)
            waiting.clear()
            known8._flush()  # what the server's call_soon runs

    out["known 8/read, deferred"] = known_eight
    new_heads = [AGENT_REQUEST.replace(b"10.0.0.5", b"10.%d.%d.%d" % (
        i >> 16 & 255, i >> 8 & 255, i & 255)) % i for i in range(N)]
    fresh = connection(lambda _req: answer, known=True)

    def every_head_new() -> None:
        srv._known.clear()
        for name in ("_seen",):  # (not in older versions)
            if hasattr(srv, name):
                getattr(srv, name).clear()
        for r in new_heads:
            fresh.data_received(r)

    out["known, every head new"] = every_head_new
    limits = srv.Limits()

    def close() -> None:
        for _ in range(N):
            proto = srv.HttpProtocol(lambda _req: answer, limits, loop)
            proto.connection_made(_Client())
            proto.data_received(CLOSE_REQUEST)
            proto.connection_lost(None)

    out["close"] = close
    return out


async def main(base: Path, new: Path, rounds: int) -> None:
    loop = asyncio.get_running_loop()
    runs = (scenarios(load(base, "server_a"), loop), scenarios(load(new, "server_b"), loop))
    got: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in runs[0]}
    for rnd in range(rounds):
        for name in runs[0]:
            for i in ((0, 1) if rnd % 2 == 0 else (1, 0)):
                t = time.process_time()
                runs[i][name]()
                got[name][i].append((time.process_time() - t) / N * 1e6)
    print(f"A {base}\nB {new}\n{rounds} rounds of {N} requests, us per request")
    print("| scenario | A min | B min | B/A min | B/A median |\n|---|---|---|---|---|")
    for name, (a, b) in got.items():
        print(f"| {name} | {min(a):.2f} | {min(b):.2f} | {min(b) / min(a):.3f} | "
              f"{statistics.median(b) / statistics.median(a):.3f} |")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("base", type=Path)
    p.add_argument("new", type=Path, nargs="?",
                   default=REPO / "src" / "openimds" / "http" / "server.py")
    p.add_argument("--rounds", type=int, default=25)
    a = p.parse_args()
    uvloop.install()
    asyncio.run(main(a.base, a.new, a.rounds))
