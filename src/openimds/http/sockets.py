"""Client connections served straight off their accepted sockets (the proxy's VM side).

With a new connection per request (cloud-init, curl), the event loop's own TCP transport
costs more than the request: per connection uvloop makes a handle, sets TCP_NODELAY, asks
the kernel for both addresses, registers the fd with epoll, schedules `connection_made`
for the next iteration and waits for epoll to report the request, then deregisters. Here
the listener accepts itself (the peer address comes with `accept`), reads the request at
once (it is usually there already) and registers the fd with the loop only if it has to
wait for more bytes: a one-request connection costs accept, recv, send and close.

`SocketTransport` has the part of asyncio's Transport API that `http.server.HttpProtocol`
and the proxy use (write, close, abort, pause/resume_reading, get_extra_info, the write
buffer's limits and size, pause/resume_writing calls to the protocol as asyncio's flow
control makes them); `cork()` makes the next write leave with the FIN (MSG_MORE, then
close), without a setsockopt.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["Acceptor", "Accepted", "SocketTransport"]

# An accepted connection's socket: the C type, not socket.socket, whose Python-level
# __init__ and close() wrappers were ~0.3 us of a one-request connection.
Accepted = _socket.socket

_READ_SIZE = 65536
_ACCEPT_BATCH = 128  # connections accepted per wake-up of the listening socket
# Out of fds or memory: stop accepting for a moment instead of spinning on the error.
_ACCEPT_PAUSE_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_PAUSE_S = 1.0
_MSG_MORE = getattr(socket, "MSG_MORE", 0)
_STREAM = int(socket.SOCK_STREAM)
_HIGH_WATER = 65536  # asyncio's defaults: pause_writing above, resume_writing at or below
_LOW_WATER = _HIGH_WATER // 4


class SocketTransport:
    """One accepted, non-blocking client socket driven by a protocol (`asyncio.Protocol`)."""

    __slots__ = ("_buffer", "_closing", "_data_received", "_fd", "_high", "_loop", "_low",
                 "_more", "_paused", "_peer", "_protocol", "_reading", "_recv", "_send",
                 "_sock", "_write_paused")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: Accepted, peer: Any,
                 protocol: asyncio.Protocol) -> None:
        self._loop = loop
        self._sock: Accepted | None = sock
        self._fd = sock.fileno()
        self._peer = peer
        self._protocol = protocol
        # Bound once: these run for every request of a keep-alive connection.
        self._recv = sock.recv
        self._send = sock.send
        self._data_received = protocol.data_received
        self._reading = False  # registered with the loop for reading
        self._paused = False
        self._closing = False
        self._more = 0  # send flags: MSG_MORE once corked
        self._buffer: bytearray | None = None  # bytes the socket did not take yet
        self._high = _HIGH_WATER
        self._low = _LOW_WATER
        self._write_paused = False  # the protocol was told to pause_writing

    def start(self, data: bytes | None = None) -> None:
        """connection_made, then the first read right away (or `data`, what the acceptor
        read already; b"" is an EOF): no wait for the loop."""
        self._protocol.connection_made(self)  # type: ignore[arg-type]
        if not self._closing:
            if data is None:
                self._on_readable()
            else:
                self._received(data)
            if not (self._closing or self._paused or self._reading):
                self._reading = True
                self._loop.add_reader(self._fd, self._on_readable)

    # -- the transport API the protocols use --------------------------------------------
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        if name == "socket":
            return self._sock
        if name == "sockname" and self._sock is not None:
            return self._sock.getsockname()
        return default

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self._paused = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        self._paused = False
        if not self._reading and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._on_readable)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """As asyncio's: the protocol's pause_writing above high bytes unsent, resume_writing
        once at or below low (default high // 4)."""
        high = _HIGH_WATER if high is None else high
        low = high // 4 if low is None else low
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high, self._low = high, low
        if self._buffer and len(self._buffer) > high and not self._write_paused:
            self._pause_protocol()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def get_write_buffer_size(self) -> int:
        return len(self._buffer) if self._buffer else 0

    def cork(self) -> None:
        """The next writes are held (MSG_MORE) until close() sends them with the FIN."""
        self._more = _MSG_MORE

    def write(self, data: bytes) -> None:
        if self._closing or self._sock is None:
            return
        buf = self._buffer
        if buf:
            buf += data
            if len(buf) > self._high and not self._write_paused:
                self._pause_protocol()
            return
        try:
            sent = self._send(data, self._more)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._finalize(exc)
            return
        if sent < len(data):
            buf = self._buffer = bytearray(memoryview(data)[sent:])
            self._loop.add_writer(self._fd, self._on_writable)
            if len(buf) > self._high and not self._write_paused:
                self._pause_protocol()

    def close(self) -> None:
        """Stop reading; close once the buffered bytes are sent."""
        if self._closing:
            return
        self._closing = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if not self._buffer:
            self._finalize(None)

    def abort(self) -> None:
        """Close now, dropping whatever was not sent."""
        self._closing = True
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        self._finalize(None)

    # -- loop callbacks -----------------------------------------------------------------
    def _on_readable(self) -> None:
        if self._sock is None:
            return
        try:
            data = self._recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._closing = True
            if self._reading:
                self._reading = False
                self._loop.remove_reader(self._fd)
            self._finalize(exc)
            return
        self._received(data)

    def _received(self, data: bytes) -> None:
        try:
            if data:
                self._data_received(data)
                return
            # EOF: the protocol keeps our half open (answers pending) or we close.
            if self._reading:
                self._reading = False
                self._loop.remove_reader(self._fd)
            self._paused = True
            if not self._protocol.eof_received():
                self.close()
        except Exception:  # a protocol bug must not reach the loop or leak the socket
            log.exception("http.protocol_failed fd=%d", self._fd)
            self.abort()

    def _on_writable(self) -> None:
        sock, buf = self._sock, self._buffer
        if sock is None or not buf:
            return
        try:
            sent = sock.send(buf, self._more)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._closing = True
            self._finalize(exc)
            return
        del buf[:sent]
        if not buf:
            self._loop.remove_writer(self._fd)
            if self._closing:
                self._finalize(None)
                return
        if self._write_paused and len(buf) <= self._low and not self._closing:
            # Last: the protocol writes again from here (the writer is settled already).
            self._write_paused = False
            try:
                self._protocol.resume_writing()
            except Exception:  # a protocol bug must not reach the loop or leak the socket
                log.exception("http.protocol_failed fd=%d", self._fd)
                self.abort()

    def _pause_protocol(self) -> None:
        self._write_paused = True
        try:
            self._protocol.pause_writing()
        except Exception:
            log.exception("http.protocol_failed fd=%d", self._fd)
            self.abort()

    def _finalize(self, exc: Exception | None) -> None:
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if self._buffer is not None:
            if self._buffer:
                self._loop.remove_writer(self._fd)
            self._buffer = None
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        self._closing = True
        sock.close()  # with MSG_MORE bytes held: they leave now, with the FIN
        self._loop.call_soon(self._protocol.connection_lost, exc)


class Acceptor:
    """Accepts connections on a listening socket; each gets `factory()` as its protocol."""

    __slots__ = ("_factory", "_family", "_loop", "_sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol]) -> None:
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._factory = factory
        self._family = int(sock.family)  # as a plain int: the enum costs a call per use
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        lsock = self._sock
        if lsock is None:
            return
        loop, family, serve = self._loop, self._family, self.serve
        for _ in range(_ACCEPT_BATCH):
            try:
                # socket.accept() without its wrapper, which converts family and type to
                # enums per connection (two Python calls) to make the same object
                fd, peer = lsock._accept()  # type: ignore[attr-defined]
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_PAUSE_ERRNOS:
                    log.warning("http.accept_paused error=%s seconds=%.0f", exc,
                                _ACCEPT_PAUSE_S)
                    loop.remove_reader(lsock.fileno())
                    loop.call_later(_ACCEPT_PAUSE_S, self._resume)
                else:
                    log.warning("http.accept_failed error=%s", exc)
                return
            serve(Accepted(family, _STREAM, 0, fd), peer)

    def serve(self, sock: Accepted, peer: Any, data: bytes | None = None) -> None:
        """One accepted connection (`sock` still blocking): made non-blocking and served by
        a new protocol. `data`: its first bytes, if a subclass read them already."""
        sock.setblocking(False)
        transport = SocketTransport(self._loop, sock, peer, self._factory())
        try:
            transport.start(data)
        except Exception:
            log.exception("http.connection_failed peer=%s", peer)
            transport.abort()

    def _resume(self) -> None:
        if self._sock is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_accept)

    def close(self) -> None:
        """Stop accepting and close the listening socket (connections are not touched)."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._loop.remove_reader(sock.fileno())
        sock.close()
