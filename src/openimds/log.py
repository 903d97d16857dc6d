"""Named log streams. Only cli.py configures handlers; modules use getLogger(__name__)."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import math
import sys
import time
from typing import TextIO

access = logging.getLogger("openimds.access")
audit = logging.getLogger("openimds.audit")


_dumps = json.dumps
_now = time.time  # bound once: the hot call looks up one global, not time's attribute


def _milli(now: float) -> int:
    """`now`'s millisecond as logging.LogRecord computes it (its `msecs`, and the second)."""
    second = int(now)
    return second * 1000 + int((now - second) * 1000)


class AccessLine:
    """The per-request access line, cheap: the hot hops call `write(message)` once per request.

    Once `setup_logging` has configured a process (and debug is off), a line skips the
    logging machinery (a LogRecord, a Formatter, a lock and a write per line: ~20 µs): the
    hot call only reads the clock and buffers `(time, message)`; the lines are formatted at
    flush (a timestamp cached per second, a head per millisecond) and written with one
    write and flush at most FLUSH_S after the first line buffered (or at MAX_LINES lines):
    one write per event-loop iteration cost ~3.5 µs a request when an iteration carried one
    or two. The line is byte-for-byte what the handler would have written (each keeps the
    time of its own request), and the handler flushes this buffer before each of its own
    lines, so the log stays in order; exit flushes it too. Without that set-up (library
    use, tests), lines go to the `openimds.access` logger.
    """

    FLUSH_S = 0.01
    MAX_LINES = 512

    __slots__ = ("_buf", "_head", "_hi", "_json", "_lo", "_loop", "_prefix", "_second",
                 "_stamp", "_stream")

    def __init__(self) -> None:
        self._stream: TextIO | None = None
        self._prefix = ""
        self._buf: list[tuple[float, str]] = []  # (time.time(), message) per line, unformatted
        self._second = -1
        self._stamp = ""
        self._lo = self._hi = 0.0  # the times that _head is for: none yet
        self._head = ""  # _stamp, the millisecond and _prefix: the same for every line in it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._json = False

    def configure(self, stream: TextIO | None, component: str, *, as_json: bool = False) -> None:
        self.flush()
        self._stream = stream
        self._json = as_json
        self._prefix = (
            f'Z", "level": "INFO", "service": {json.dumps(component)}, '
            f'"logger": "{access.name}", "message": ' if as_json
            else f" INFO {component} {access.name} ")
        self._lo = self._hi = 0.0  # the head holds the prefix
        self._loop = None

    @property
    def enabled(self) -> bool:
        return access.isEnabledFor(logging.INFO)

    def write(self, message: str) -> None:
        if self._stream is None:
            access.info("%s", message)
            return
        buf = self._buf
        buf.append((_now(), message))
        if len(buf) == 1:
            loop = self._loop
            if loop is None or loop.is_closed():
                try:
                    loop = self._loop = asyncio.get_running_loop()
                except RuntimeError:
                    self.flush()
                    return
            loop.call_later(self.FLUSH_S, self.flush)
        elif len(buf) >= self.MAX_LINES:
            self.flush()  # the pending call_later then finds little or nothing to write

    def _head_for(self, now: float) -> None:
        """The head (time, level, component, logger) for `now`'s millisecond, and the floats
        [_lo, _hi) that it covers, so a line of that millisecond costs two comparisons."""
        second = int(now)
        msecs = int((now - second) * 1000)  # as logging.LogRecord computes it
        key = second * 1000 + msecs
        # The formula is monotone in `now`: its millisecond is an interval of floats; find
        # its exact ends from the arithmetic guess, a few ulps off at most.
        lo = second + msecs / 1000
        while _milli(lo) < key:
            lo = math.nextafter(lo, math.inf)
        while _milli(lo) > key or _milli(math.nextafter(lo, -math.inf)) == key:
            lo = math.nextafter(lo, -math.inf)
        hi = second + (msecs + 1) / 1000
        while _milli(hi) <= key:
            hi = math.nextafter(hi, math.inf)
        while _milli(math.nextafter(hi, -math.inf)) > key:
            hi = math.nextafter(hi, -math.inf)
        if second != self._second:
            self._second = second
            self._stamp = (
                '{"time": "' + time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
                if self._json else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second)))
        self._head = (f"{self._stamp}.{msecs:03d}{self._prefix}" if self._json
                      else f"{self._stamp},{msecs:03d}{self._prefix}")
        self._lo, self._hi = lo, hi

    def flush(self) -> None:
        buf = self._buf
        if not buf or self._stream is None:
            return
        self._buf = []
        lo, hi, head = self._lo, self._hi, self._head
        lines: list[str] = []
        add = lines.append
        if self._json:  # JsonFormatter's object, key for key
            for now, message in buf:
                if not lo <= now < hi:
                    self._head_for(now)
                    lo, hi, head = self._lo, self._hi, self._head
                add(f"{head}{_dumps(message, ensure_ascii=False)}}}")
        else:
            for now, message in buf:
                if not lo <= now < hi:
                    self._head_for(now)
                    lo, hi, head = self._lo, self._hi, self._head
                add(head + message)
        add("")  # the last line's newline
        try:
            self._stream.write("\n".join(lines))
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken log stream must not fail requests
            pass


access_line = AccessLine()
atexit.register(access_line.flush)


class _OrderedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes the buffered access lines before each record, so the log stays in order."""

    def emit(self, record: logging.LogRecord) -> None:
        access_line.flush()
        super().emit(record)


class _OrderedFileHandler(logging.FileHandler):
    def emit(self, record: logging.LogRecord) -> None:
        access_line.flush()
        super().emit(record)


JSON_KEYS = ("time", "level", "service", "logger", "message")


class JsonFormatter(logging.Formatter):
    """`[DEFAULT] log_format = json`: one object per line, always the keys in JSON_KEYS
    (plus `error` when an exception is logged). The message keeps its key=value text, so the
    same grep (`request_id=...`) finds a request in either format."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        obj: dict[str, str] = {
            "time": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.component,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            obj["error"] = self.formatException(record.exc_info)
        return json.dumps(obj, ensure_ascii=False)


def setup_logging(
    *, debug: bool, log_file: str = "", component: str = "openimds", fmt: str = "text",
) -> None:
    """Configure the root logger once: one line per event, key=value style messages
    (`fmt="json"`: one JSON object per line, see JsonFormatter)."""
    handler: logging.StreamHandler  # type: ignore[type-arg]
    if log_file:
        handler = _OrderedFileHandler(log_file)
    else:
        handler = _OrderedStreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(component) if fmt == "json" else
        logging.Formatter(f"%(asctime)s %(levelname)s {component} %(name)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    # Library chatter stays out of our logs unless debugging.
    for noisy in ("httpx", "httpcore", "aiohttp.access", "pyroute2", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    # Debug keeps every line on the logging path (request detail and access lines together).
    access_line.configure(None if debug else handler.stream, component, as_json=fmt == "json")
