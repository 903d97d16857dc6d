"""A spread pool (`worker_paths`) where nothing is idle: which worker its next connection
goes to. Real pools against real servers, one per worker socket, each counting what it
answered."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from openimds.http.client import UpstreamPool
from openimds.http.server import Request, Response, bind_unix, serve


async def workers(tmp_path: Path, n: int) -> tuple[list[str], Counter[str], list[asyncio.Server]]:
    """n servers on worker sockets `up.sock.w<N>` (the shared `up.sock` has none: a
    connection there would fail the test), and the requests each answered."""
    answered: Counter[str] = Counter()
    paths = [str(tmp_path / f"up.sock.w{i}") for i in range(n)]
    servers = []
    for path in paths:
        async def handler(req: Request, path: str = path) -> Response:
            answered[path] += 1
            return Response(200, b"ok")
        servers.append(await serve(handler, bind_unix(path)))
    return paths, answered, servers


@pytest.mark.parametrize("at_once", [1, 3])
async def test_connections_made_again_and_again_alternate_their_odd_one(
    tmp_path: Path, at_once: int,
) -> None:
    """Every answer ends its connection (`Connection: close`: as a HEAD's does here, or a
    lull the upstream's keep-alive timeout closes), so each round finds nothing idle and
    opens `at_once` connections at equal counts. Ties went to worker 0 every time: 10/0
    one at a time, 20/10 three at a time; now in turn from the worker after the one
    connected to last: even over an even number of rounds."""
    paths, answered, servers = await workers(tmp_path, 2)
    pool = UpstreamPool(unix_path=str(tmp_path / "up.sock"), size=8,
                        worker_paths=lambda: paths)
    data = pool.encode_request("GET", "/", [], b"")
    data = data.removesuffix(b"\r\n") + b"Connection: close\r\n\r\n"
    try:
        for _ in range(10):
            answers = await asyncio.gather(*(pool.request_encoded(data, False)
                                             for _ in range(at_once)))
            assert all(a.status == 200 and not a.keep_alive for a in answers)
            assert pool.connections_by_socket() == {}  # each one closed after its answer
        assert answered[paths[0]] == answered[paths[1]] == 5 * at_once, answered
    finally:
        await pool.close()
        for server in servers:
            server.close()


async def test_a_busy_pool_grows_on_the_worker_with_fewest_then_in_turn(tmp_path: Path) -> None:
    """Requests held (every connection busy) open connections on the worker with the
    fewest, ties in turn; the burst still splits within 1 (three workers, 7 held: 3/2/2,
    the odd one on the worker after the last connected to, not always worker 0)."""
    gate = asyncio.Event()
    held: Counter[str] = Counter()
    paths = [str(tmp_path / f"up.sock.w{i}") for i in range(3)]
    servers = []
    for path in paths:
        async def handler(req: Request, path: str = path) -> Response:
            held[path] += 1
            await gate.wait()
            return Response(200, b"ok")
        servers.append(await serve(handler, bind_unix(path)))
    pool = UpstreamPool(unix_path=str(tmp_path / "up.sock"), size=16,
                        worker_paths=lambda: paths)
    try:
        # One connection first, alone: worker 0 (nothing connected to yet), then answered
        # and closed by hand, so the next burst starts at equal counts after worker 0.
        gate.set()
        await pool.request("GET", "/")
        await pool.close()
        assert pool.connections_by_socket() == {}
        gate.clear()
        held.clear()
        tasks = [asyncio.ensure_future(pool.request("GET", "/")) for _ in range(7)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if sum(held.values()) == 7:
                break
        assert pool.connections_by_socket() == {paths[0]: 2, paths[1]: 3, paths[2]: 2}
        assert held == {paths[0]: 2, paths[1]: 3, paths[2]: 2}
        gate.set()
        assert all(a.status == 200 for a in await asyncio.gather(*tasks))
    finally:
        gate.set()
        await pool.close()
        for server in servers:
            server.close()


class _Answering(asyncio.Protocol):
    """A worker that answers every request at once and can be told to close the
    connection it served least recently (as a keep-alive timeout ends the one a LIFO
    pool left at the bottom of its idle list)."""

    served = 0  # the order of last use, across every connection

    def __init__(self, conns: list[_Answering]) -> None:
        self.conns = conns
        self.transport: asyncio.Transport | None = None
        self.last = 0
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conns.append(self)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            _, _, self.buf = self.buf.partition(b"\r\n\r\n")
            _Answering.served += 1
            self.last = _Answering.served
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.remove(self)


async def test_a_connection_ended_while_idle_no_longer_counts_as_idle(tmp_path: Path) -> None:
    """Two connections per worker; the upstream ends worker 0's least recently used one
    (the bottom of its idle LIFO, under the live one). It was still counted idle, so
    worker 0 looked to have one fewer request in flight than it had: every request taken
    one at a time went to worker 0 (10/0). Now a lost connection leaves the idle list:
    ties in turn, 5/5."""
    loop = asyncio.get_running_loop()
    paths = [str(tmp_path / f"up.sock.w{i}") for i in range(2)]
    conns: list[list[_Answering]] = [[], []]
    servers = [await loop.create_unix_server(lambda i=i: _Answering(conns[i]), path)
               for i, path in enumerate(paths)]
    pool = UpstreamPool(unix_path=str(tmp_path / "up.sock"), size=8,
                        worker_paths=lambda: paths)
    try:
        await asyncio.gather(*(pool.request("GET", "/") for _ in range(4)))  # 2 on each
        for _ in range(4):  # each worker's top connection used again, its bottom one not
            await pool.request("GET", "/")
        assert pool.connections_by_socket() == {paths[0]: 2, paths[1]: 2}
        oldest = min(conns[0], key=lambda c: c.last)
        assert oldest.transport is not None
        oldest.transport.close()
        for _ in range(200):
            if pool.connections_by_socket().get(paths[0]) == 1:
                break
            await asyncio.sleep(0.01)
        assert pool.connections_by_socket() == {paths[0]: 1, paths[1]: 2}
        before = [max(c.last for c in conns[i]) for i in range(2)]
        got = Counter()
        for _ in range(10):
            await pool.request("GET", "/")
            latest = max((c for side in conns for c in side), key=lambda c: c.last)
            got[0 if latest in conns[0] else 1] += 1
        assert got == {0: 5, 1: 5}, (got, before)
    finally:
        await pool.close()
        for server in servers:
            server.close()
