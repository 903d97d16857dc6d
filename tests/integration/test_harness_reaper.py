"""The test harness's own promise (tests/reaper.py): when pytest dies, the services its
tests started die too, SIGKILL included, and so do the processes those services started in
sessions and namespaces of their own; the namespaces go as well."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests import reaper
from tests.support import PYTHON, REPO, clean_env, wait_for


def _alive(pid: int) -> bool:
    return reaper._start_time(pid) is not None


def _gone(pids: list[int], namespaces: list[str]) -> bool:
    return not any(_alive(p) for p in pids) and not any(
        Path("/var/run/netns", ns).exists() for ns in namespaces)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_services_die_with_a_killed_pytest(tmp_path: Path, sig: int) -> None:
    out = tmp_path / "child.json"
    log = tmp_path / "pytest-child.log"
    with log.open("wb") as sink:
        child = reaper.spawn(
            [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "--basetemp", str(tmp_path / "basetemp"), "tests/integration/reaper_child.py"],
            cwd=REPO, env=clean_env({"REAPER_CHILD_OUT": str(out)}), stdout=sink,
            stderr=subprocess.STDOUT)
    info: dict[str, Any] = {}
    try:
        info = wait_for(lambda: out.exists() and json.loads(out.read_text()), 120,
                        "the child pytest's services")
        pids = [info["registry"], info["agent"], info["grandchild"], info["orphan"]]
        assert all(_alive(p) for p in pids), log.read_text()
        assert all(Path("/var/run/netns", ns).exists() for ns in info["namespaces"])
        os.kill(child.pid, sig)
        child.wait(60)
        deadline = time.monotonic() + 10
        while not _gone(pids, info["namespaces"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in pids if _alive(p)]
        assert not left, f"outlived their pytest: {left}\n{log.read_text()}"
        assert not [ns for ns in info["namespaces"] if Path("/var/run/netns", ns).exists()]
        # SIGTERM is an interrupt: the child's fixtures and finally blocks ran; -9 is not
        assert Path(info["teardown"]).exists() == (sig == signal.SIGTERM), log.read_text()
        if sig == signal.SIGTERM:
            assert child.returncode == 2, log.read_text()  # pytest's "interrupted"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        for pid in (info.get(k) for k in ("registry", "agent", "grandchild", "orphan")):
            if pid and _alive(pid):  # by PID: the same process (the check just made)
                os.kill(pid, signal.SIGKILL)
        for ns in info.get("namespaces", []):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, check=False)
