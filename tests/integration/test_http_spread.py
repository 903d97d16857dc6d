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
