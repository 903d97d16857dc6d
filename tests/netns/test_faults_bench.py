"""The fault-injection benchmark in a tiny configuration as a smoke test: the proxy killed -9
and every dnsmasq killed -9 under a looping storm on the real datapath (REDIRECT, qdhcp,
a DHCP lease with option 121) — every VM finishes with its own documents, nothing lost,
dnsmasq respawned, nothing left behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.support import PYTHON, REPO, clean_env

pytestmark = pytest.mark.netns


def test_faults_small_proxy_and_dnsmasq(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    proc = subprocess.run(
        [PYTHON, str(REPO / "bench" / "faults.py"), "-n", "8", "-r", "1", "-i", "1",
         "--duration", "5", "--faults", "proxy,dnsmasq", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=clean_env(),
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    by_fault = {f["fault"]: f for f in report["faults"]}
    assert set(by_fault) == {"proxy", "dnsmasq"}
    for name, f in by_fault.items():
        assert f["vms"] == 7 and f["finished"] == 7, (name, f)  # one VM is the DHCP probe
        assert f["wrong_answers"] == 0 and f["writes_lost"] == 0, (name, f)
        assert f["writes_acked"] > 0, (name, f)
    # the proxy's restart is seen (refused or reset connections) and then over
    assert by_fault["proxy"]["error_total"] > 0 and by_fault["proxy"]["restarted"] != \
        "NOT restarted"
    assert by_fault["dnsmasq"]["restarted"] == "2 killed, 2 running after"
    assert by_fault["dnsmasq"]["dhcp_recover_s"] is not None
    assert report["namespaces_left"] == []
