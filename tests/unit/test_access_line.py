"""openimds.log.AccessLine: the fast access line is what the logging handler writes."""

from __future__ import annotations

import io
import json
import logging

import pytest

from openimds import log as logmod
from openimds.log import AccessLine, JsonFormatter


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
    monkeypatch.setattr(logmod.time, "time", lambda: next(clock))
    stream = io.StringIO()
    line = AccessLine()
    line.configure(stream, "agent", as_json=as_json)
    for n in range(len(times)):
        line.write(f"agent request_id=r{n} status=200")
    line.flush()
    monkeypatch.undo()  # the time module is shared with logging
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
