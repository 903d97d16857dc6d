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
