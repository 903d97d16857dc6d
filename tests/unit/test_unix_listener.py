"""host.unix_listener: only our own socket file is removed on exit, even when the
filesystem gave its successor the same inode number; a listener too busy to accept is not
taken for a stale socket."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from openimds.errors import OpenImdsError
from openimds.host.unix_listener import (
    SOCKET_MODES,
    file_id,
    listen_unix,
    remove_if_ours,
    remove_if_stale,
)


def test_a_successor_with_the_same_inode_number_is_not_removed(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    first = listen_unix(path, mode=SOCKET_MODES["user"], backlog=8, option="test")
    ours, number = file_id(path), os.stat(path).st_ino
    first.close()  # nobody accepts now: stale, so the next bind replaces the file
    for _ in range(50):  # the change time tells them apart, not the (reusable) number
        time.sleep(0.001)
        second = listen_unix(path, mode=SOCKET_MODES["user"], backlog=8, option="test")
        if os.stat(path).st_ino == number:
            break
        second.close()
    try:
        remove_if_ours(path, ours)
        assert os.path.exists(path)  # the successor's file stays
        remove_if_ours(path, file_id(path))
        assert not os.path.exists(path)
    finally:
        second.close()


def test_a_busy_listener_is_not_taken_for_a_stale_one(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    busy = listen_unix(path, mode=SOCKET_MODES["user"], backlog=0, option="test")
    ident = file_id(path)
    waiting: list[socket.socket] = []
    try:
        while True:  # fill its backlog: it never accepts
            client = socket.socket(socket.AF_UNIX)
            client.setblocking(False)
            waiting.append(client)
            try:
                client.connect(path)
            except BlockingIOError:
                break
        with pytest.raises(OpenImdsError, match="did not accept in 1 s"):
            listen_unix(path, mode=SOCKET_MODES["user"], backlog=8, option="test")
        assert file_id(path) == ident  # still the busy one's
    finally:
        for client in waiting:
            client.close()
        busy.close()


def test_remove_if_stale_keeps_a_live_socket_and_anything_else(tmp_path: Path) -> None:
    live, stale, plain = (str(tmp_path / n) for n in ("live.sock", "stale.sock", "plain"))
    serving = listen_unix(live, mode=SOCKET_MODES["user"], backlog=8, option="test")
    listen_unix(stale, mode=SOCKET_MODES["user"], backlog=8, option="test").close()
    Path(plain).write_text("x")
    try:
        for path in (live, stale, plain, str(tmp_path / "missing")):
            remove_if_stale(path)
        assert os.path.exists(live) and os.path.exists(plain)
        assert not os.path.exists(stale)
    finally:
        serving.close()
