"""Run only by test_harness_reaper.py, in a pytest of its own that it then kills: starts a
real registry, an "agent" whose own child runs in a named namespace in a session of its own
(as the L3 agent's proxy or the DHCP agent's dnsmasq), makes a named namespace, records them
all in $REAPER_CHILD_OUT and sleeps. Not collected by the suite (not test_*.py)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

from tests.integration.registry_support import registry_process
from tests.support import PYTHON, Service, unique_name

# the "agent": starts its child the way the product's agents do (a new session, no
# PDEATHSIG), writes the child's pid, then sleeps
AGENT = """
import subprocess, sys, time
ns, mark, out = sys.argv[1:4]
child = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                          "import time; time.sleep(600)", mark], start_new_session=True)
# and one in pytest's own namespace, its command line naming nothing of ours
orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                          start_new_session=True)
open(out + ".tmp", "w").write(f"{child.pid} {orphan.pid}")
import os; os.replace(out + ".tmp", out)
time.sleep(600)
"""


def test_serve_and_sleep(tmp_path: Path) -> None:
    out = Path(os.environ["REAPER_CHILD_OUT"])
    ours = unique_name("rpr")  # registered with the reaper by tests.support
    theirs = f"rpq-{uuid.uuid4().hex[:8]}"  # as an agent's qdhcp-: the tests never name it
    for ns in (ours, theirs):
        subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        with registry_process(tmp_path / "reg", "sqlite") as reg:
            grandchild = tmp_path / "grandchild.pid"
            agent = Service("agent", [PYTHON, "-c", AGENT, theirs, str(tmp_path / "mark"),
                                      str(grandchild)], tmp_path).start()
            agent.wait_until(grandchild.exists, 30)
            out.with_suffix(".tmp").write_text(json.dumps({
                "registry": reg.service.pid, "agent": agent.pid,
                "grandchild": int(grandchild.read_text().split()[0]),
                "orphan": int(grandchild.read_text().split()[1]), "namespaces": [ours, theirs],
                "teardown": str(tmp_path / "teardown")}))
            out.with_suffix(".tmp").replace(out)
            time.sleep(600)
    finally:
        # runs on SIGTERM (the reaper makes it an interrupt), never on SIGKILL
        (tmp_path / "teardown").write_text("ran")
        for ns in (ours, theirs):
            subprocess.run(["ip", "netns", "delete", ns], check=False)
