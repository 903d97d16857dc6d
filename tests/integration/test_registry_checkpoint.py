"""SQLite's WAL checkpoints run in a pause between writes, not right after one: a checkpoint's
page copies and database fsync share the disk with the next commit's fdatasync. Real files,
a real checkpoint thread; what is asserted is whether a checkpoint ran and what the WAL then
holds, never how long anything took."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from openimds.registry.service import Registry
from openimds.registry.store import Store, _Checkpointer
from tests.support import wait_for

EVERY, MOST = 4, 10


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    s.create_schema()
    yield s
    s.dispose()


def _checkpointer(store: Store, quiet_s: float) -> _Checkpointer:
    assert store.checkpointer is not None
    store.checkpointer.close()
    path = str(store.url.database)
    store.checkpointer = _Checkpointer(path, every=EVERY, quiet_s=quiet_s, most=MOST)
    return store.checkpointer


def _wal_restarts(store: Store) -> int:
    """The WAL header's checkpoint sequence number: +1 each time a writer starts the WAL
    over from its head, which it does only after a checkpoint copied all of it (read from
    the file, so asking changes nothing)."""
    with open(f"{store.url.database}-wal", "rb") as wal:
        return struct.unpack(">I", wal.read(16)[12:16])[0]


def test_no_checkpoint_while_writes_keep_coming_until_most(store: Store) -> None:
    # never quiet: the checkpoint waits for `most` pending writes, then runs at once
    ckpt = _checkpointer(store, quiet_s=3600.0)
    reg = Registry(store)
    reg.create_network({"name": "n0"})
    restarts = _wal_restarts(store)
    for i in range(1, MOST - 1):
        reg.create_network({"name": f"n{i}"})
    assert ckpt.done == 0, "checkpointed right after a write, with writes still coming"
    assert _wal_restarts(store) == restarts
    reg.create_network({"name": "last"})
    wait_for(lambda: ckpt.done == 1, 10, "the checkpoint due at `most` pending writes")


def test_checkpoint_in_a_pause_restarts_the_wal(store: Store) -> None:
    ckpt = _checkpointer(store, quiet_s=0.01)
    reg = Registry(store)
    for i in range(EVERY - 1):
        reg.create_network({"name": f"n{i}"})
    assert ckpt.done == 0  # fewer than `every` pending: no checkpoint however quiet
    reg.create_network({"name": "fourth"})
    wait_for(lambda: ckpt.done == 1, 10, "the checkpoint in the pause after `every` writes")
    # complete (no writer came after it): the next write starts the WAL over from its head
    before = _wal_restarts(store)
    reg.create_network({"name": "after"})
    assert _wal_restarts(store) == before + 1
    assert ckpt.done == 1
    names = {n["name"] for n in reg.list_networks({})["networks"]}
    assert {"fourth", "after"} <= names and len(names) == EVERY + 1
