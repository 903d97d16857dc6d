"""PID 1 of a lab node: `python -m openimds.lab.node_init [--watch FD RELEASE_FILE] ETC_NETNS
READY_FILE [LOG -- ARGV]`.

Started by `lab/cluster.py` under `unshare --pid --fork --kill-child --mount-proc --mount
--net`, so it is already in the node's own PID, mount and network namespaces, and dies with
its `unshare`. It gives the node what a container (or a machine) has of its own: a private
/run/netns (tmpfs, so the namespaces the node's agents create are invisible elsewhere and
vanish with the node), a private /etc/netns (bound from the node's directory), a /sys of its
network namespace and lo up. Then it writes READY_FILE, starts ARGV (the node's `openimds up`,
output to LOG) and reaps orphans forever, as an init does.

With --watch, FD is a pidfd of the command that boots the node (`lab cluster up`, `lab node
start`): if that command dies before it writes RELEASE_FILE (the node is ready and handed
over), this process exits and the kernel kills the whole node with it, so a build killed
half-way (even -9) leaves no process behind.

ARGV is supervised as systemd's Restart=always would: killed (even -9) it starts again after
1 s, doubling up to 30 s while it keeps dying young; the new `up` stops whatever the killed
one's children left (its up.children.json) before it starts anew. SIGKILL of this process
from outside makes the kernel kill every process of the node: that is `lab node kill`.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0
STABLE_S = 60.0  # an ARGV that lived this long starts again after BACKOFF_INITIAL_S


def say(msg: str) -> None:
    print(f"node_init: {msg}", flush=True)


def spawn(argv: list[str], log_path: str) -> int:
    with open(log_path, "ab") as out:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT).pid


class Watch:
    """The booting command's pidfd, until it hands the node over (RELEASE_FILE exists)."""

    def __init__(self, fd: int, release: str) -> None:
        self.fd: int | None = fd
        self.release = release
        self.poll = select.poll()
        self.poll.register(fd, select.POLLIN)

    def booter_died(self) -> bool:
        """True once the booting command is gone without having released the node."""
        if self.fd is None:
            return False
        exited = bool(self.poll.poll(0))
        if os.path.exists(self.release):  # written before it exits: checked after the poll
            os.close(self.fd)
            self.fd = None
            say("released by the booting command")
            return False
        return exited


def main(argv: list[str]) -> int:
    watch = None
    if argv[:1] == ["--watch"]:
        watch, argv = Watch(int(argv[1]), argv[2]), argv[3:]
    etc_netns, ready, *rest = argv
    log_path, command = "", []
    if rest:
        if len(rest) < 3 or rest[1] != "--":
            raise SystemExit("usage: node_init ETC_NETNS READY_FILE [LOG -- ARGV...]")
        log_path, command = rest[0], rest[2:]
    for target in ("/run/netns", "/etc/netns"):
        os.makedirs(target, exist_ok=True)
    # The mount namespace is private (unshare --propagation private): nothing leaks to the host.
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "openimds-lab", "/run/netns"],
                   check=True)
    subprocess.run(["mount", "--bind", etc_netns, "/etc/netns"], check=True)
    subprocess.run(["mount", "-t", "sysfs", "sysfs", "/sys"], check=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with open(ready, "w") as fh:
        fh.write(f"{os.getpid()}\n")
    child: int | None = None
    started = start_at = time.monotonic()
    backoff = BACKOFF_INITIAL_S
    while True:
        if watch is not None and watch.booter_died():
            say("the booting command died before the node was ready: stopping the node")
            return 1  # PID 1 exits: the kernel kills every process of the node
        if command and child is None and time.monotonic() >= start_at:
            child, started = spawn(command, log_path), time.monotonic()
            say(f"started {command[-3:]} pid {child}")
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:  # no child: orphans are reparented here later
            pid, status = 0, 0
        if pid == 0:
            time.sleep(0.2)
            continue
        if pid == child:
            uptime = time.monotonic() - started
            backoff = BACKOFF_INITIAL_S if uptime >= STABLE_S else backoff
            say(f"pid {pid} exited {os.waitstatus_to_exitcode(status)} after {uptime:.1f} s; "
                f"starting it again in {backoff:g} s")
            child, start_at = None, time.monotonic() + backoff
            backoff = min(backoff * 2, BACKOFF_MAX_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
