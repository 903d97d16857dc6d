"""Loaded into `openimds registry serve` by `bench/scale_bench.py --trace-registry` (through
PYTHONPATH): writes one line per cyclic-GC collection of generation 1 or 2 and per SQLAlchemy
statement compiled (a compiled-cache miss) to $BENCH_REGISTRY_TRACE, each stamped with the
wall clock, so the bench can tell what the registry did while a create was slow. Bench-only:
the registry has no such hook of its own."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

_PATH = os.environ.get("BENCH_REGISTRY_TRACE")
if _PATH:
    _out = open(_PATH, "a", buffering=1)  # for the life of the process
    _started = [0.0]

    def _on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            _started[0] = time.perf_counter()
        elif info["generation"] >= 1:
            ms = (time.perf_counter() - _started[0]) * 1000
            _out.write(f"{time.time():.6f} gc{info['generation']} {ms:.3f}\n")

    gc.callbacks.append(_on_gc)

    from sqlalchemy.sql import elements

    _compile = elements.ClauseElement._compile_w_cache

    def _traced(self: Any, dialect: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = _compile(self, dialect, **kw)
        if out[-1] is dialect.CACHE_MISS:
            ms = (time.perf_counter() - t) * 1000
            head = " ".join(str(out[0]).split()[:3])
            _out.write(f"{time.time():.6f} compile {ms:.3f} {head}\n")
        return out

    elements.ClauseElement._compile_w_cache = _traced  # type: ignore[method-assign]

    # Inside each `Store.write` (a create is one): how long the write took, each statement's
    # round trip (SQLAlchemy's cursor execute, start to answer; a statement queued in a
    # pipeline returns at once) and the COMMIT (on PostgreSQL the wait for the WAL flush, on
    # SQLite the fsync), so the bench can split a slow create
    # into database round trips, commit and the rest (lock wait, Python, the HTTP hop).
    # Reads (the feed, views) are not counted: under load the agents' feed reads run on
    # other threads at the same time.
    import contextlib
    import threading
    from collections.abc import Iterator

    from sqlalchemy import event
    from sqlalchemy.engine import Engine, default

    from openimds.registry import store as _store

    _local = threading.local()
    _write = _store.Store.write

    @contextlib.contextmanager
    def _traced_write(self: Any, **kw: Any) -> Iterator[Any]:
        _local.stmts = []
        _local.commit = 0.0
        t = time.perf_counter()
        try:
            with _write(self, **kw) as tx:
                yield tx
        finally:
            ms = (time.perf_counter() - t) * 1000
            stmts = _local.stmts
            _local.stmts = None
            _out.write(f"{time.time():.6f} write {ms:.3f} {len(stmts)} "
                       f"{sum(stmts):.3f} {_local.commit:.3f}\n")

    _store.Store.write = _traced_write  # type: ignore[method-assign]

    @event.listens_for(Engine, "before_cursor_execute")
    def _before(*_args: Any) -> None:
        _local.t = time.perf_counter()

    @event.listens_for(Engine, "after_cursor_execute")
    def _after(*_args: Any) -> None:
        stmts = getattr(_local, "stmts", None)
        if stmts is not None:
            stmts.append((time.perf_counter() - _local.t) * 1000)

    _do_commit: Any = default.DefaultDialect.do_commit

    def _traced_commit(self: Any, dbapi_connection: Any) -> None:
        t = time.perf_counter()
        try:
            _do_commit(self, dbapi_connection)
        finally:
            if getattr(_local, "stmts", None) is not None:
                _local.commit += (time.perf_counter() - t) * 1000

    default.DefaultDialect.do_commit = _traced_commit  # type: ignore[method-assign]

    # PostgreSQL: the write's last statements and its COMMIT go out in one pipeline whose
    # Sync, on leaving it, is the wait for the commit; that wait is counted as the commit
    # (less the statements queued inside, counted as statements)
    _pipelined = _store.Store._pipelined

    @contextlib.contextmanager
    def _traced_pipelined(self: Any, conn: Any) -> Iterator[bool]:
        stmts = getattr(_local, "stmts", None)
        t, n = time.perf_counter(), len(stmts or ())
        try:
            with _pipelined(self, conn) as pipelined:
                yield pipelined
        finally:
            if stmts is not None:
                _local.commit += ((time.perf_counter() - t) * 1000 - sum(stmts[n:]))

    _store.Store._pipelined = _traced_pipelined  # type: ignore[method-assign]

    # PostgreSQL: a write's BEGIN, revision bump and first read go out in one pipeline
    # (`Store._batch`) whose Sync, on leaving it, is their round trip: counted as one
    # statement's (an older checkout without it sends them one by one)
    _batch: Any = getattr(_store.Store, "_batch", None)

    @contextlib.contextmanager
    def _traced_batch(self: Any, conn: Any, batch: bool) -> Iterator[None]:
        stmts = getattr(_local, "stmts", None)
        t, n = time.perf_counter(), len(stmts or ())
        try:
            with _batch(self, conn, batch):
                yield
        finally:
            if stmts is not None and batch:
                stmts.append((time.perf_counter() - t) * 1000 - sum(stmts[n:]))

    if _batch is not None:
        _store.Store._batch = _traced_batch  # type: ignore[method-assign]
