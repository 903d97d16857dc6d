"""PID 1 of a lab node: `python -m openimds.lab.node_init ETC_NETNS READY_FILE`.

Started by `lab/cluster.py` under `unshare --pid --fork --mount-proc --mount --net`, so it is
already in the node's own PID, mount and network namespaces. It gives the node what a
container (or a machine) has of its own: a private /run/netns (tmpfs, so the namespaces the
node's agents create are invisible elsewhere and vanish with the node), a private /etc/netns
(bound from the node's directory), a /sys of its network namespace and lo up. Then it writes
READY_FILE and reaps orphans forever, as an init does. SIGKILL of this process from outside
makes the kernel kill every process of the node: that is `lab node kill`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    etc_netns, ready = argv
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
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(0.5)  # no child yet: orphans are reparented here later

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
