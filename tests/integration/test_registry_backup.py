"""`openimds registry backup FILE` / `restore FILE` against real registries (SQLite and
PostgreSQL): every row comes back, a corrupt or mismatched file is refused with a reason, a
registry with data is not overwritten by accident, and followers resync after a restore."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path
from typing import Any

import pytest

from openimds.config import load_settings
from openimds.registry.backup import FORMAT, _digest, dump
from openimds.registry.store import Store
from tests.integration.registry_support import BACKENDS, Registry, registry_process
from tests.support import run_cli

PUBKEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHb3QmVbRJQ3PBzA2u4WoJ0n2gO8Rj2HwPcQn1m3JcKq "
          "demo@example")


def fill(reg: Registry) -> dict[str, Any]:
    with reg.client() as c:
        net = c.create_network("net", project_id="tenant-a", mtu=1450)
        sub = c.create_subnet("sub", net["id"], "10.0.0.0/24", dns_nameservers=["10.0.0.53"])
        router = c.create_router("r", project_id="tenant-a")
        c.add_interface(router["id"], sub["id"])
        c.create("keypair", {"name": "k", "public_key": PUBKEY, "project_id": "tenant-a"})
        inst = c.create_instance(
            "vm", net["id"], key_name="k", project_id="tenant-a", fixed_ip="10.0.0.5",
            user_data=base64.b64encode(b"#cloud-config\n\x00\xffbinary").decode(),
            metadata={"role": "web"})
        return {"net": net, "router": router, "inst": inst}


def rows(config: Path) -> dict[str, Any]:
    store = Store(load_settings(str(config), environ={}).registry_connection)
    try:
        return dump(store)["tables"]
    finally:
        store.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backup_restore_round_trip_and_refusals(tmp_path: Path, backend: str) -> None:
    out = tmp_path / "reg.backup"
    with registry_process(tmp_path / "a", backend) as a:
        made = fill(a)
        done = run_cli(a.config, "registry", "backup", str(out), check=True)
        assert "rows at revision" in done.stdout
        assert out.stat().st_mode & 0o777 == 0o600
        before = rows(a.config)
        # a registry with data is not overwritten by accident
        refused = run_cli(a.config, "registry", "restore", str(out))
        assert refused.returncode != 0 and "not empty" in refused.stderr, refused.stderr
    data = json.loads(out.read_text())
    assert data["format"] == FORMAT and data["counts"]["ports"] >= 2

    # a corrupt file (one byte of content changed) and a mismatched one are refused
    bad = copy.deepcopy(data)
    bad["tables"]["instances"][0]["name"] = "evil"
    (tmp_path / "corrupt").write_text(json.dumps(bad))
    mismatched = copy.deepcopy(data)
    mismatched["tables"]["instances"][0]["from_the_future"] = 1
    mismatched["sha256"] = _digest(mismatched["tables"])
    (tmp_path / "mismatched").write_text(json.dumps(mismatched))
    dangling = copy.deepcopy(data)
    dangling["tables"]["ports"][0]["network_id"] = "00000000-0000-4000-8000-000000000000"
    dangling["sha256"] = _digest(dangling["tables"])
    (tmp_path / "dangling").write_text(json.dumps(dangling))
    (tmp_path / "garbage").write_text("not json {")
    with registry_process(tmp_path / "b", backend) as b:
        for name, reason in (("corrupt", "checksum"), ("mismatched", "from_the_future"),
                             ("dangling", "names no networks row"),
                             ("garbage", "not a registry backup")):
            ans = run_cli(b.config, "registry", "restore", str(tmp_path / name))
            assert ans.returncode != 0 and reason in ans.stderr, (name, ans.stderr)
        with b.client() as c:
            assert c.topology()["ports"] == []  # nothing was touched
            rev0 = c.health()["revision"]
        assert "consistent" in run_cli(b.config, "registry", "restore", "--check",
                                       str(out), check=True).stdout
        said = run_cli(b.config, "registry", "restore", str(out), check=True).stdout
        restored_at = int(said.split("the registry is at revision ")[1].split()[0])
        after = rows(b.config)
        # every row of every table is back (the history is not: followers resync)
        for table, want in before.items():
            if table in ("state", "changes", "agents", "releases"):  # agents: heartbeats
                continue
            assert after[table] == want, table
        assert after["state"][0]["revision"] > max(rev0, before["state"][0]["revision"])
        # the floor is the restore's revision (the registry's own heartbeat may have written
        # since: the restored agents rows include the backed-up registry's, on this host)
        assert after["state"][0]["floor"] == restored_at <= after["state"][0]["revision"]
        with b.client() as c:
            inst = c.get("instance", made["inst"]["id"])
            assert inst["name"] == "vm" and inst["metadata"] == {"role": "web"}
            lookup = c.lookup("10.0.0.5", router_id=made["router"]["id"])
            assert [p["device_id"] for p in lookup["ports"]] == [made["inst"]["id"]]
            # a follower from before the restore must reload: 410
            from openimds.registry.client import ResyncRequired
            with pytest.raises(ResyncRequired):
                c.changes(rev0)
            # and new writes continue from there
            net2 = c.create_network("after-restore", project_id="tenant-a")
            assert net2["revision"] > after["state"][0]["revision"]
