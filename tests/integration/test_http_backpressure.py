"""Back-pressure in the lean HTTP server: a client that pipelines and does not read.

The server is a real process (`tests/flood.py`) on each transport it runs on: uvloop's,
asyncio's, and accepted sockets (`http.sockets`, the proxy's VM side). The client pipelines
up to 4 MB of small requests (~93,000; 1 KiB answers: ~95 MB if all were answered) through
small kernel buffers and reads nothing. Without back-pressure the server reads all of it
and buffers every answer; with it, the server stops reading once the client's answers pile
up, and the client's sends stall with most of its flood still unsent.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import flood
from tests.support import PYTHON, Service, free_port, tcp_ready

LOOPS = ("uvloop", "asyncio", "sockets")
FLOOD_BYTES = 4_000_000
RSS_GROWTH_MAX = 32 << 20  # bounded: ~64 KiB + one read's requests; unbounded: ~95 MB


class FloodServer:
    def __init__(self, tmp: Path, loop: str, write_timeout: float) -> None:
        self.port = free_port()
        self.svc = Service(f"flood-{loop}", [
            PYTHON, flood.__file__, "--tcp", f"127.0.0.1:{self.port}", "--loop", loop,
            # only the write timeout may end a connection here
            "--write-timeout", str(write_timeout), "--idle-timeout", "600"], tmp)

    def start(self) -> FloodServer:
        self.svc.start().wait_until(tcp_ready("127.0.0.1", self.port))
        return self

    def connect(self) -> socket.socket:
        sock = flood.flood_socket(socket.socket())
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        return sock

    def stats(self) -> dict[str, Any]:
        """What /stats says (asked on a connection of its own)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(b"GET /stats HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        return json.loads(data.partition(b"\r\n\r\n")[2])  # type: ignore[no-any-return]

    def handled(self) -> int:
        """The /n/ requests answered so far."""
        return int(self.stats()["handled"])

    def timeouts(self) -> dict[str, int]:
        """The connections its timeouts ended, by kind (write, request, idle, silent)."""
        return dict(self.stats()["timeouts"])


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[FloodServer]]:
    made: list[FloodServer] = []
    try:
        yield made
    finally:
        for server in made:
            server.svc.stop()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_does_not_read_stops_being_read_and_gets_every_answer_later(
    servers: list[FloodServer], tmp_path: Path, loop: str,
) -> None:
    server = FloodServer(tmp_path, loop, write_timeout=600).start()
    servers.append(server)
    assert server.handled() == 0
    rss_before = flood.rss_bytes(server.svc.pid)
    with server.connect() as sock:
        sent = flood.flood(sock, FLOOD_BYTES)
        assert sent.stalled and not sent.reset, sent  # the server stopped reading
        answered = server.handled()
        time.sleep(1.0)
        assert server.handled() == answered < sent.whole, (answered, sent)
        growth = flood.rss_bytes(server.svc.pid) - rss_before
        assert growth < RSS_GROWTH_MAX, f"RSS grew {growth >> 20} MiB"
        # Reading now, the client gets every answer, whole and in order: nothing queued was
        # lost or reordered while it waited, and reading resumed each time it drained.
        flood.check_answers(flood.drain(sock, sent), sent.expected)
    assert server.handled() == sent.expected
    # it read in time
    assert server.timeouts() == {"write": 0, "request": 0, "idle": 0, "silent": 0}
    assert server.svc.alive()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_never_reads_is_reset_after_the_write_timeout(
    servers: list[FloodServer], tmp_path: Path, loop: str,
) -> None:
    server = FloodServer(tmp_path, loop, write_timeout=1.0).start()
    servers.append(server)
    with server.connect() as sock:
        sent = flood.flood(sock, FLOOD_BYTES, stall_s=1.0)
        assert sent.stalled, sent
        # No FIN can pass the answers queued before it: only a reset ends it (the loop's own
        # close would wait for the client forever).
        state = flood.wait_closed(sock)
        assert state != flood.TCP_ESTABLISHED
    # counted once, as a write timeout (the idle and request timeouts are 600 s here)
    assert server.timeouts() == {"write": 1, "request": 0, "idle": 0, "silent": 0}
    assert server.svc.alive()


@pytest.mark.parametrize("loop", LOOPS)
def test_a_closing_answer_the_client_never_takes_is_reset_after_the_write_timeout(
    servers: list[FloodServer], tmp_path: Path, loop: str,
) -> None:
    """The connection's last answer (Connection: close) is bigger than the kernel's buffers
    and the client reads none of it: the close waits at most the write timeout."""
    server = FloodServer(tmp_path, loop, write_timeout=1.0).start()
    servers.append(server)
    with server.connect() as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        assert flood.wait_closed(sock) != flood.TCP_ESTABLISHED
    assert server.timeouts() == {"write": 1, "request": 0, "idle": 0, "silent": 0}
    # a client that reads gets all of it (each drain below the low-water mark restarts
    # the clock: the timeout bounds a stall, not the whole transfer)
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        data = bytearray()
        while chunk := sock.recv(1 << 20):
            data += chunk
    assert data.partition(b"\r\n\r\n")[2] == b"b" * flood.BIG_BODY
