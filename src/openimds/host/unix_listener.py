"""A listening Unix socket at a configured path: the agent's `metadata_proxy_socket` and the
API's `[api] unix_socket`.

Rules:
- The directory is created (0755) when missing; the socket file gets the mode asked for and
  belongs to the process's user and group.
- A socket file nobody listens on (a server killed before it could remove it: connect is
  refused) is stale and replaced. One a live process listens on is not, even if it does not
  accept in time (a full backlog, a stopped process): two servers would split the traffic.
  Anything else at the path (a file, a directory) is refused.
- Every error names the option and the path, so the operator knows which value to fix.
- The file is removed on exit only if it is still the one bound (`file_id`,
  `remove_if_ours`): a successor may already have replaced it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from openimds.errors import ConfigError, OpenImdsError

__all__ = ["SOCKET_MODES", "file_id", "listen_unix", "remove_if_ours", "remove_if_stale"]

# Connecting needs write permission on the socket file: user lets only its owner connect.
SOCKET_MODES = {"user": 0o644, "group": 0o664, "all": 0o666}


def listen_unix(path: str, *, mode: int, backlog: int, option: str) -> socket.socket:
    """Bind and listen at `path` (non-blocking); see the module docstring."""
    try:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create its directory: "
                          f"{exc.strerror}") from exc
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:  # e.g. a parent is a regular file
        raise ConfigError(f"{option} {path}: {exc.strerror}") from exc
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{option} {path} exists and is not a socket")
        try:
            stale = _stale(path)
        except OSError as exc:  # a full backlog or a stopped server: alive, only slow
            raise OpenImdsError(f"{option} {path}: a process listens on it but did not "
                                f"accept in 1 s ({exc.strerror or exc}); not replacing "
                                "it") from exc
        if not stale:
            raise OpenImdsError(f"{option} {path}: another process is serving on it; "
                                "not replacing it")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OpenImdsError(f"{option} {path}: cannot listen: {exc.strerror or exc}") from exc
    return sock


def file_id(path: str) -> int:
    """One int naming the file at `path`: its inode number and change time. The number
    alone is not enough: a filesystem hands a freed inode number to the next file at once
    (a socket file replaced after an unlink came back with the same one)."""
    st = os.stat(path)
    return st.st_ino << 64 | st.st_ctime_ns


def remove_if_ours(path: str, ident: int) -> None:
    """Remove the socket file if it is still the one `file_id` named `ident` (ours)."""
    with contextlib.suppress(OSError):
        if file_id(path) == ident:
            os.unlink(path)


def remove_if_stale(path: str) -> None:
    """Remove the socket file at `path` if nobody listens on it (its server was killed)."""
    with contextlib.suppress(OSError):  # gone, not a socket, or alive but slow: left
        if stat.S_ISSOCK(os.lstat(path).st_mode) and _stale(path):
            os.unlink(path)


def _stale(path: str) -> bool:
    """Whether nobody listens on the socket file at `path`: a connect is refused, or the
    file went. A listener that does not accept within 1 s (a full backlog, a stopped
    server) is alive, only slow: its OSError is raised."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    finally:
        probe.close()
    return False
