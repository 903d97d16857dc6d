"""The boot-storm benchmark in its small configuration (N=50, R=5, I=2) as a smoke test:
every request of every arm answered 200, each VM got its own instance, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support import PYTHON, REPO, clean_env

pytestmark = pytest.mark.netns


def test_boot_storm_small(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    arms = "ours,haproxy,floor" if shutil.which("haproxy") else "ours,floor"
    proc = subprocess.run(
        [PYTHON, str(REPO / "bench" / "boot_storm.py"), "--small", "--arms", arms,
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=clean_env(),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["n_vms"] == 50 and report["requests_per_vm"] == 28
    assert set(report["arms"]) == set(arms.split(","))
    for name, arm in report["arms"].items():
        assert arm["errors"] == 0, (name, arm["error_samples"])
        assert arm["wrong_instance"] == 0, name
        assert arm["requests"] == 50 * 28, name
    # the warm index knows every port: a cold storm needs no registry lookup
    assert report["arms"]["ours"]["registry_queries"] == 0
    assert "ours_over_floor_rps" in report["ratios"]
    leftovers = [ns for ns in report["namespaces"] if os.path.exists(f"/run/netns/{ns}")]
    assert leftovers == []
    assert len(report["namespaces"]) == 50 + 5 + 2 + 5  # VMs, routers, qdhcp for 7 networks
