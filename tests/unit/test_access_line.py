"""openimds.log.AccessLine: the fast access line is what the logging handler writes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from openimds import log as logmod
from openimds.log import AccessLine, JsonFormatter, setup_logging


@pytest.mark.parametrize("as_json", [False, True])
def test_lines_match_the_formatter_across_milliseconds_and_seconds(
    monkeypatch: pytest.MonkeyPatch, as_json: bool,
) -> None:
    """The line's head is kept per millisecond: every line still carries its own time."""
    formatter: logging.Formatter = (
        JsonFormatter("agent") if as_json
        else logging.Formatter("%(asctime)s %(levelname)s agent %(name)s %(message)s"))
    times = [1764650000.1234, 1764650000.1236, 1764650000.9991, 1764650001.0004,
             1764650001.0004, 1764650061.5]  # same ms twice, next ms, next second, next minute
    clock = iter(times)
    monkeypatch.setattr(logmod, "_now", lambda: next(clock))
    stream = io.StringIO()
    line = AccessLine()
    line.configure(stream, "agent", as_json=as_json)
    for n in range(len(times)):
        line.write(f"agent request_id=r{n} status=200")
    line.flush()
    monkeypatch.undo()
    expected = []
    for n, t in enumerate(times):
        record = logging.LogRecord("openimds.access", logging.INFO, __file__, 1,
                                   f"agent request_id=r{n} status=200", None, None)
        record.created, record.msecs = t, (t - int(t)) * 1000
        expected.append(formatter.format(record))
    got = stream.getvalue().splitlines()
    assert got == expected
    if as_json:
        assert [json.loads(g)["message"] for g in got][0] == "agent request_id=r0 status=200"


NOISY = ("httpx", "httpcore", "aiohttp.access", "pyroute2", "asyncio")  # setup_logging's


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_log_file_bytes_match_the_debug_logging_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fmt: str,
) -> None:
    """The same requests, at the same clock readings, make the same log file whether the
    access lines take the fast path (buffered, formatted at flush) or the logging path
    (debug): byte for byte, interleaved with other records in the same order."""
    times = [1764650000.1234, 1764650000.1236, 1764650000.9991, 1764650001.0004,
             1764650001.0004, 1764650061.5, 1764650061.5005, 1764650061.7, 1764650062.0]

    async def requests() -> None:
        other = logging.getLogger("openimds.test")
        for n in range(len(times) - 2):  # and two other records
            logmod.access_line.write(
                f"agent request_id=r{n} ip=10.0.0.5 router=r-1 instance=i-{n} status=200 "
                f"ms={n * 0.37:.2f} method=GET path=/latest/meta-data/ \u00e9\"x")
            if n in (2, 5):
                other.warning("between requests n=%d", n)  # flushes the lines before it
            if n % 2:
                await asyncio.sleep(0)  # lines spread over loop iterations
        await asyncio.sleep(logmod.AccessLine.FLUSH_S * 3)  # the scheduled flush

    def run(debug: bool) -> bytes:
        log_file = tmp_path / f"{fmt}-{'debug' if debug else 'fast'}.log"
        clock = iter(times)

        def now() -> float:
            return next(clock)

        root = logging.getLogger()
        saved = root.handlers[:], root.level
        factory = logging.getLogRecordFactory()
        noisy = {name: logging.getLogger(name).level for name in NOISY}
        try:
            setup_logging(debug=debug, log_file=str(log_file), component="agent", fmt=fmt)
            logging.getLogger("asyncio").setLevel(logging.WARNING)  # its selector's line
            # One clock for both paths: the fast line's own, and the LogRecord's (set as
            # LogRecord sets it: time.time() itself is the event loop's too).
            def record(*args: Any, **kwargs: Any) -> logging.LogRecord:
                rec = factory(*args, **kwargs)
                if rec.name.startswith("openimds."):  # not asyncio's debug chatter
                    rec.created = t = now()
                    rec.msecs = int((t - int(t)) * 1000) + 0.0
                return rec

            monkeypatch.setattr(logmod, "_now", now)
            logging.setLogRecordFactory(record)
            asyncio.run(requests())
            logging.setLogRecordFactory(factory)
            assert next(clock, None) is None  # one reading per line or record, on both paths
        finally:
            logging.setLogRecordFactory(factory)
            monkeypatch.undo()
            logmod.access_line.flush()
            logmod.access_line.configure(None, "openimds")
            for handler in root.handlers:
                handler.close()
            root.handlers[:], level = saved
            root.setLevel(level)
            for name, level in noisy.items():
                logging.getLogger(name).setLevel(level)
        return log_file.read_bytes()

    fast, slow = run(debug=False), run(debug=True)
    assert fast == slow
    lines = fast.decode().splitlines()
    assert len(lines) == len(times)
    assert "between requests n=2" in lines[3] and "between requests n=5" in lines[7]
    if fmt == "json":
        assert lines[0].startswith('{"time": "2025-12-02T04:33:20.123Z", "level": "INFO"')
    else:  # local time: only the milliseconds and what follows are fixed
        assert ",123 INFO agent openimds.access agent request_id=r0 " in lines[0]


def test_a_millisecond_head_covers_exactly_the_times_of_that_millisecond() -> None:
    """A line reuses the head when its time falls in [_lo, _hi): those ends are the exact
    ends of the floats whose LogRecord millisecond is the head's, even a few ulps from a
    boundary, where the arithmetic guess (second + ms / 1000) is off."""
    line = AccessLine()
    line.configure(io.StringIO(), "agent")
    base = 1764650000
    probes = []
    for ms in (0, 1, 123, 499, 998, 999):
        edge = base + ms / 1000
        t = edge
        for _ in range(4):
            t = math.nextafter(t, -math.inf)
        for _ in range(9):  # four ulps either side of the guessed boundary
            probes.append(t)
            t = math.nextafter(t, math.inf)
    for now in probes:
        line._head_for(now)
        key, lo, hi = logmod._milli(now), line._lo, line._hi
        assert lo <= now < hi
        assert logmod._milli(lo) == key == logmod._milli(math.nextafter(hi, -math.inf))
        assert logmod._milli(math.nextafter(lo, -math.inf)) < key < logmod._milli(hi)
        assert f",{key % 1000:03d} INFO agent openimds.access " in line._head
