"""The Python share of each hot hop's CPU per request, without the kernel.

    .venv/bin/python bench/hop_python.py [--requests 20000] [--repeat 5] [--profile HOP]
    .venv/bin/python bench/hop_python.py --micro access-line [--micro-ref REV]

chain_bench.py measures what a hop costs per request on real sockets; most of that is the
kernel's and the event loop's (reads, writes, wake-ups: see docs/benchmarks.md). This bench
measures only what our Python adds, so a change to the hot path can be judged on a loaded
machine in seconds: the real hop objects (`HttpProtocol`, the proxy's `Forwarder` and
`_ClientProtocol`, `MetadataAgent`, `UpstreamPool` with a raw connection) driven with fake
transports; the upstream answers from inside `write()`, so one `data_received` runs the
whole request: parse, handler, upstream send, upstream answer, relay.

Rows (µs of process CPU per request, the best of `--repeat` runs of `--requests` each):
- **bare**: httptools parsing the request and a callback that writes a pre-encoded answer
  (what chain_bench's bare server does in Python);
- **server**: `HttpProtocol` answering a plain `RawResponse` (the lean server's own cost);
- **proxy** keep-alive, and **proxy close** (a new client connection per request), both
  through the parser and the handler (the slow path); **proxy kept** and **proxy kept
  close**: the same on the fast path (`KeptReads`: a keep-alive read kept by its bytes, and
  a new connection's first read served by the listener's acceptor, `FirstRequests`, off a
  fake accepted socket);
- **agent** (a cache hit, metrics off as in chain_bench), with and without its access line
  (written to a file, as shipped); **agent pipelined**: as the agent runs in the chain
  (known heads, four requests per read as the proxy's pipelined pool sends them, its own
  pool 8 deep to the API, each batch answered in one read, the access line on).

`--profile HOP` (proxy, agent): cProfile of that hop's loop, by own time.

`--micro access-line`: `AccessLine.write` plus its flush alone, µs per line, this tree's
against the class at `--micro-ref` (git, loaded from `git show REV:src/openimds/log.py`)
in the same process, rounds alternating; a second instance of the reference gives the A/A
noise. Lines go to a real file, a batch per event-loop iteration (`--batch` lines), flushed
as the loop's timer would.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import pstats
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

import httptools  # noqa: E402
import uvloop  # noqa: E402

from openimds.config import MetricsSettings, Settings  # noqa: E402
from openimds.core.proxy_rules import ListenerSpec  # noqa: E402
from openimds.http.client import UpstreamPool, _RawConn  # noqa: E402
from openimds.http.server import HttpProtocol, Limits, RawResponse  # noqa: E402
from openimds.log import setup_logging  # noqa: E402
from openimds.metadata.agent import MetadataAgent  # noqa: E402
from openimds.metadata.proxy import (  # noqa: E402
    FirstRequests,
    Forwarder,
    KeptReads,
    _ClientProtocol,
)

ANSWER = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n\r\n"
          b'{"name": "vm-bench"}')
VM_REQUEST = b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 10.0.0.1:9697\r\n\r\n"
VM_CLOSE = VM_REQUEST[:-2] + b"Connection: close\r\n\r\n"  # cloud-init's, one per connection
# What the proxy sends the agent (the request ID changes every time, as it does there).
AGENT_REQUEST = (b"GET /openstack/latest/meta_data.json HTTP/1.1\r\nHost: 10.0.0.1:9697\r\n"
                 b"X-Forwarded-For: 10.0.0.5\r\nX-Neutron-Router-ID: router-1\r\n"
                 b"X-Openimds-Request-Id: 0a1b2c3d-%x\r\n\r\n")


class _Upstream:
    """An upstream connection's transport: every request is answered at once."""

    def __init__(self, conn: _RawConn) -> None:
        self.conn = conn

    def write(self, data: bytes) -> None:
        self.conn.data_received(ANSWER * data.count(b"\r\n\r\n"))  # a batch: one read

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return None


class _Client:
    """A client connection's transport: answers are dropped."""

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("10.0.0.5", 40000) if name == "peername" else None

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        raise AssertionError("requests queued: the hop did not answer at once")

    resume_reading = pause_reading


class _Accepted:
    """An accepted VM connection whose first read is `VM_CLOSE` and which takes the answer."""

    __slots__ = ()

    def recv(self, size: int, flags: int = 0) -> bytes:
        return VM_CLOSE

    def send(self, data: bytes, flags: int = 0) -> int:
        return len(data)

    def close(self) -> None:
        pass


def _pool(**kw: Any) -> UpstreamPool:
    pool = UpstreamPool(size=64, raw_only=True, **kw)
    conn = _RawConn(1 << 20)
    conn.connection_made(_Upstream(conn))  # type: ignore[arg-type]
    pool._idle.append(conn)
    return pool


def best_us(run: Callable[[int], object], n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        run(n)
        best = min(best, (time.process_time() - t) / n * 1e6)
    return best


async def measure(n: int, repeat: int, profile: str | None) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    limits = Limits()
    out: dict[str, float] = {}

    class Bare:
        def __init__(self) -> None:
            self.parser = httptools.HttpRequestParser(self)
            self.transport = _Client()

        def on_message_complete(self) -> None:
            self.transport.write(ANSWER)

    bare = Bare()
    out["bare"] = best_us(lambda k: [bare.parser.feed_data(VM_REQUEST)  # type: ignore[func-returns-value]
                                     for _ in range(k)], n, repeat)

    answer = RawResponse(ANSWER)
    server = HttpProtocol(lambda _req: answer, limits, loop)
    server.connection_made(_Client())  # type: ignore[arg-type]
    out["server"] = best_us(lambda k: [server.data_received(VM_REQUEST)  # type: ignore[func-returns-value]
                                       for _ in range(k)], n, repeat)

    fwd = Forwarder(_pool(unix_path="/nonexistent"), count=False)
    handler = fwd.handler_for(ListenerSpec("r", "ns", "0.0.0.0", 80, "r" * 36, None))
    conns: set[Any] = set()
    proxy = _ClientProtocol(handler, limits, loop, conns, None, 1)
    proxy.connection_made(_Client())  # type: ignore[arg-type]

    def proxy_keep(k: int) -> None:
        for _ in range(k):
            proxy.data_received(VM_REQUEST)

    def proxy_close(k: int) -> None:
        for _ in range(k):
            p = _ClientProtocol(handler, limits, loop, conns, None, 1)
            p.connection_made(_Client())  # type: ignore[arg-type]
            p.data_received(VM_REQUEST)
            p.connection_lost(None)

    out["proxy"] = best_us(proxy_keep, n, repeat)
    out["proxy close"] = best_us(proxy_close, n, repeat)

    fast = Forwarder(_pool(unix_path="/nonexistent"), count=False)
    spec = ListenerSpec("f", "ns", "0.0.0.0", 80, "f" * 36, None)
    route = fast.route(spec)
    kept = KeptReads(fast, route, limits)
    fast_handler = fast.handler_for(spec, route=route)
    kept_conns: set[Any] = set()
    kept_conn = _ClientProtocol(fast_handler, limits, loop, kept_conns, None, 1, False, kept)
    kept_conn.connection_made(_Client())  # type: ignore[arg-type]
    listening, other = socket.socketpair()  # never readable: the acceptor only needs an fd

    def client(answered: bool = False) -> _ClientProtocol:
        return _ClientProtocol(fast_handler, limits, loop, kept_conns, None, 1, answered, kept)

    acceptor = FirstRequests(loop, listening, client, kept, None, kept_conns)
    accepted, peer = _Accepted(), ("10.0.0.5", 40000)

    def kept_keep(k: int) -> None:
        for _ in range(k):
            kept_conn.data_received(VM_REQUEST)

    def kept_close(k: int) -> None:
        for _ in range(k):
            acceptor.serve(accepted, peer)  # type: ignore[arg-type]

    kept_keep(1)
    kept_close(1)
    out["proxy kept"] = best_us(kept_keep, n, repeat)
    out["proxy kept close"] = best_us(kept_close, n, repeat)
    # every one a fast-path hit (the first of each learned it), nothing left open
    assert fast.first_hits == 2 + 2 * n * repeat and kept_conns == {kept_conn._own}
    acceptor.close()
    other.close()

    for access in (False, True):
        settings = dataclasses.replace(
            Settings(), metadata_proxy_shared_secret="bench",
            metrics=dataclasses.replace(MetricsSettings(), enabled=False))
        settings = dataclasses.replace(settings, metadata_agent=dataclasses.replace(
            settings.metadata_agent, access_log=access))
        from tests.unit.test_agent_handler import FakeRegistry

        registry = FakeRegistry()
        registry.add("router-1", "10.0.0.5", "inst-1")
        agent = MetadataAgent(settings, registry=registry,
                              upstream=_pool(host="127.0.0.1", port=1), feed_up=lambda: True)
        agent.apply_batch({"revision": 0, "changes": [], "resync": False})
        conn = HttpProtocol(agent.handle, limits, loop)
        conn.connection_made(_Client())  # type: ignore[arg-type]
        conn.data_received(AGENT_REQUEST % 0)  # the miss: a registry lookup
        while conn._busy:
            await asyncio.sleep(0.01)
        seq = [0]

        def agent_hits(k: int, conn: HttpProtocol = conn, seq: list[int] = seq) -> None:
            for _ in range(k):
                seq[0] += 1
                conn.data_received(AGENT_REQUEST % seq[0])

        async def agent_run(agent_hits: Callable[[int], None] = agent_hits) -> float:
            # one request per event-loop iteration, as at a modest rate: the access line's
            # write is paid when the loop runs
            best = float("inf")
            for _ in range(repeat):
                t = time.process_time()
                for _ in range(n // 10):
                    agent_hits(10)
                    await asyncio.sleep(0)
                best = min(best, (time.process_time() - t) / (n // 10 * 10) * 1e6)
            return best

        out["agent, access line on" if access else "agent"] = await agent_run()
        assert agent.stats()["cache_hits"] >= n, agent.stats()
        if profile == "agent" and access:
            prof = cProfile.Profile()
            prof.runcall(agent_hits, n)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    out["agent pipelined"] = await agent_pipelined(loop, n, repeat)
    if profile == "proxy":
        prof = cProfile.Profile()
        prof.runcall(proxy_keep, n)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return out


async def agent_pipelined(loop: asyncio.AbstractEventLoop, n: int, repeat: int) -> float:
    """The agent's hit as it runs in the chain (the module docstring's **agent pipelined**);
    two loop iterations per read: the pool's flush, then the server's."""
    settings = dataclasses.replace(
        Settings(), metadata_proxy_shared_secret="bench",
        metrics=dataclasses.replace(MetricsSettings(), enabled=False))
    from tests.unit.test_agent_handler import FakeRegistry

    registry = FakeRegistry()
    registry.add("router-1", "10.0.0.5", "inst-1")
    agent = MetadataAgent(settings, registry=registry, feed_up=lambda: True,
                          upstream=_pool(host="127.0.0.1", port=1, pipeline_depth=8))
    agent.apply_batch({"revision": 0, "changes": [], "resync": False})
    conn = HttpProtocol(agent.handle, Limits(known_heads=True), loop)
    conn.connection_made(_Client())  # type: ignore[arg-type]
    per_read, seq = 4, 0
    best = float("inf")
    for rnd in range(repeat + 1):  # the first learns the head and makes the miss
        t = time.process_time()
        for _ in range(n // per_read):
            conn.data_received(b"".join(AGENT_REQUEST % (seq + i) for i in range(per_read)))
            seq += per_read
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            while rnd == 0 and conn._busy:
                await asyncio.sleep(0.01)
            assert not conn._busy
        if rnd:
            best = min(best, (time.process_time() - t) / (n // per_read * per_read) * 1e6)
    assert agent.stats()["cache_hits"] >= n * repeat, agent.stats()
    return best


REF_LOG = "b8c3422"  # the AccessLine that formatted each line in write()


def _ref_access_line(rev: str) -> Any:
    """A fresh AccessLine class from `rev`'s log.py, as its own module."""
    import importlib.util
    import subprocess

    src = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:src/openimds/log.py"],
                         check=True, capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location(f"_ref_log_{rev}", f.name)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    Path(f.name).unlink()
    return mod.AccessLine


async def micro_access_line(n: int, rounds: int, batch: int, rev: str) -> dict[str, list[float]]:
    from openimds.log import AccessLine

    ref = _ref_access_line(rev)
    message = ("agent request_id=req-0123456789abcdef ip=10.0.0.5 router=r-1 instance=inst-1 "
               "status=200 ms=0.12 method=GET path=/openstack/latest/meta_data.json")
    out: dict[str, list[float]] = {"ref": [], "ref again (A/A)": [], "new": []}
    with tempfile.TemporaryDirectory(prefix="access-line-") as tmp:
        lines: dict[str, Any] = {}
        streams: list[Any] = []
        for name, cls in (("ref", ref), ("ref again (A/A)", ref), ("new", AccessLine)):
            line = lines[name] = cls()
            streams.append(open(Path(tmp) / f"{len(lines)}.log", "a", encoding="utf-8"))
            line.configure(streams[-1], "agent")
        for _ in range(rounds):
            for name, line in lines.items():
                write, flush = line.write, line.flush
                t = time.process_time()
                for _ in range(n // batch):
                    for _ in range(batch):
                        write(message)
                    flush()
                out[name].append((time.process_time() - t) / (n // batch * batch) * 1e6)
                await asyncio.sleep(0)
        await asyncio.sleep(0.05)  # the pending timers: nothing left to write
        for line in lines.values():
            line.configure(None, "agent")
        for stream in streams:
            stream.close()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--profile", choices=("proxy", "agent"))
    p.add_argument("--micro", choices=("access-line",))
    p.add_argument("--micro-ref", default=REF_LOG)
    p.add_argument("--batch", type=int, default=2)
    a = p.parse_args()
    if a.micro:
        rounds = uvloop.run(micro_access_line(a.requests, a.repeat * 4, a.batch, a.micro_ref))
        ref = statistics.median(rounds["ref"])
        print(f"AccessLine write+flush, {a.batch} lines a batch, {a.repeat * 4} rounds "
              f"of {a.requests} lines, against {a.micro_ref}:")
        for name, us in rounds.items():
            med = statistics.median(us)
            print(f"{name:16s} median {med:5.2f} us/line  best {min(us):5.2f}  "
                  f"({med / ref:4.2f}x ref)")
        return 0
    with tempfile.NamedTemporaryFile(prefix="hop-python-", suffix=".log") as log:
        setup_logging(debug=False, log_file=log.name, component="agent")
        out = uvloop.run(measure(a.requests, a.repeat, a.profile))
    bare = out["bare"]
    for name, us_req in out.items():
        print(f"{name:24s} {us_req:6.2f} us/request  ({us_req / bare:4.1f}x bare's Python)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
