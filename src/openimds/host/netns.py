"""Network namespaces: the one module that calls setns(2).

A socket belongs to the network namespace of the thread that created it, for its whole life;
bind, listen, accept and connect then act in that namespace from any thread. So one process
can serve listeners in many namespaces: switch the calling thread into the namespace, create
the socket, switch back. Nothing else runs in between (no await, no callbacks), so the event
loop never sees the thread in a foreign namespace.

    sock = socket_in_netns("qrouter-<id>", socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("0.0.0.0", 9697))            # acts in qrouter-<id>

Named namespaces are the bind mounts `ip netns add` makes under /run/netns. An open socket
keeps its namespace alive after `ip netns del`: close it when the namespace goes away.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
# ioctl on a socket: returns a new fd referring to the socket's network namespace (Linux >= 4.9).
SIOCGSKNS = 0x894C
_THREAD_NETNS = "/proc/thread-self/ns/net"

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(name: str) -> str:
    """The bind-mount path of a named namespace. Raises ValueError for names `ip` rejects."""
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"invalid network namespace name {name!r}")
    return f"{NETNS_RUN_DIR}/{name}"


def netns_exists(name: str) -> bool:
    return os.path.exists(netns_path(name))


def netns_inode(name: str) -> int:
    """The inode identifying a named namespace. Raises FileNotFoundError if it does not exist."""
    return os.stat(netns_path(name)).st_ino


def socket_netns_inode(sock: socket.socket) -> int:
    """The inode of the namespace a socket lives in (compare with `netns_inode`)."""
    fd = fcntl.ioctl(sock.fileno(), SIOCGSKNS)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET) failed: {os.strerror(err)}")


def socket_in_netns(
    name: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0,
) -> socket.socket:
    """A new socket living in namespace `name`; the calling thread ends where it started.

    Raises FileNotFoundError if the namespace does not exist, OSError if it cannot be entered
    (e.g. without CAP_SYS_ADMIN). If switching back fails, the thread would be stranded in the
    foreign namespace: that raises RuntimeError, which callers should treat as fatal.
    """
    return socket_in_netns_file(netns_path(name), family, type, proto)


def socket_in_netns_file(
    path: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0,
) -> socket.socket:
    """`socket_in_netns` for a namespace given by its file: /proc/PID/ns/net, or a named
    namespace of another mount namespace seen through /proc/PID/root/run/netns/NAME (a lab
    node's VMs, from the host)."""
    target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        home = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                return socket.socket(family, type, proto)
            finally:
                try:
                    _setns(home)
                except OSError as exc:  # pragma: no cover - kernel refused to switch back
                    raise RuntimeError(
                        f"cannot return to the original network namespace: {exc}"
                    ) from exc
        finally:
            os.close(home)
    finally:
        os.close(target)
