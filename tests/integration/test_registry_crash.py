"""kill -9 of the registry during a storm of writes loses no acknowledged write and leaves a
consistent store: unique IPs per network, every instance with its port, revision == the
newest change, and the registry starts again and keeps counting."""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from openimds.registry import store as st
from tests import reaper
from tests.integration.registry_support import BACKENDS, Registry, registry_process
from tests.support import clean_env, http_ready

WRITER = textwrap.dedent("""
    import sys, threading
    from openimds.registry.client import RegistryClient
    url, token, net, journal = sys.argv[1:5]
    lock = threading.Lock()
    out = open(journal, "a", buffering=1)

    def work(n):
        c = RegistryClient(url, token, timeout_s=5)
        mine = []
        i = 0
        try:
            while True:
                i += 1
                inst = c.create("instance", {"name": f"w{n}-{i}", "network_id": net,
                                             "metadata": {"n": str(i)}})
                ip = inst["ports"][0]["fixed_ips"][0]["ip_address"]
                with lock:
                    out.write(f"create {inst['id']} {ip}\\n")
                mine.append(inst["id"])
                if i % 3 == 0:
                    victim = mine.pop(0)
                    with lock:
                        out.write(f"deleting {victim}\\n")
                    c.delete("instance", victim)
                    with lock:
                        out.write(f"delete {victim}\\n")
                if i % 4 == 0:
                    c.set_password(inst["id"], "pw")
        except Exception as exc:  # the registry died under us
            with lock:
                out.write(f"stopped {type(exc).__name__}\\n")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads: t.start()
    for t in threads: t.join()
""")


def _db_url(reg: Registry) -> str:
    for line in reg.config.read_text().splitlines():
        if line.startswith("connection"):
            return line.split("=", 1)[1].strip()
    state = next(line.split("=", 1)[1].strip() for line in reg.config.read_text().splitlines()
                 if line.startswith("state_path"))
    return f"sqlite:///{state}/registry.sqlite"


def check_invariants(url: str) -> dict[str, int]:
    """Inspect the store directly; returns a few counts."""
    engine = sa.create_engine(st.normalize_url(url))
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                assert conn.exec_driver_sql("PRAGMA integrity_check").scalar() == "ok"
                assert conn.exec_driver_sql("PRAGMA foreign_key_check").all() == []
            revision = conn.execute(sa.select(st.state.c.revision)).scalar_one()
            newest = conn.execute(sa.select(sa.func.max(st.changes.c.revision))).scalar()
            assert revision == newest, (revision, newest)
            # Every object's revision is a revision that happened.
            for table in (st.networks, st.subnets, st.ports, st.instances):
                assert conn.execute(sa.select(sa.func.max(table.c.revision))).scalar() \
                    <= revision
            dup = conn.execute(
                sa.select(st.port_ips.c.network_id, st.port_ips.c.ip_address,
                          sa.func.count()).group_by(st.port_ips.c.network_id,
                                                     st.port_ips.c.ip_address)
                .having(sa.func.count() > 1)).all()
            assert dup == []
            cidrs = {r.id: ipaddress.ip_network(r.cidr)
                     for r in conn.execute(sa.select(st.subnets))}
            gateways = {r.gateway_ip for r in conn.execute(sa.select(st.subnets))}
            for r in conn.execute(sa.select(st.port_ips, st.ports.c.device_owner).join(
                    st.ports, st.ports.c.id == st.port_ips.c.port_id)):
                assert ipaddress.ip_address(r.ip_address) in cidrs[r.subnet_id]
                if r.device_owner != "network:router_interface":
                    assert r.ip_address not in gateways
            instances = conn.execute(sa.select(st.instances.c.id)).scalars().all()
            for iid in instances:
                ports = conn.execute(sa.select(st.ports.c.id).where(
                    st.ports.c.device_id == iid)).scalars().all()
                assert len(ports) == 1, iid
                assert conn.execute(sa.select(st.port_ips).where(
                    st.port_ips.c.port_id == ports[0])).first() is not None
            orphans = conn.execute(sa.select(st.ports.c.id).where(
                st.ports.c.device_owner == "compute:nova",
                st.ports.c.device_id.not_in(sa.select(st.instances.c.id)))).all()
            assert orphans == []
            ec2 = conn.execute(sa.select(st.instances.c.ec2_id)).scalars().all()
            assert len(ec2) == len(set(ec2))
            return {"revision": int(revision), "instances": len(instances)}
    finally:
        engine.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kill_9_during_writes_loses_nothing_committed(tmp_path: Path, backend: str) -> None:
    with registry_process(tmp_path, backend) as reg:
        with reg.client() as c:
            net = c.create("network", {"name": "crash"})
            c.create("subnet", {"network_id": net["id"], "cidr": "10.128.0.0/20"})
        journal = tmp_path / "journal"
        script = tmp_path / "writer.py"
        script.write_text(WRITER)
        writer = reaper.spawn(
            [sys.executable, str(script), reg.url, reg.admin_token, net["id"], str(journal)],
            env=clean_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if journal.exists() and journal.read_text().count("create") >= 120:
                    break
                time.sleep(0.05)
            reg.service.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            reg.service.proc.wait(5)  # type: ignore[union-attr]
            writer.wait(30)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait(5)
        lines = journal.read_text().splitlines()
        created = {ln.split()[1]: ln.split()[2] for ln in lines if ln.startswith("create")}
        deleted = {ln.split()[1] for ln in lines if ln.startswith("delete ")}
        # A delete in flight at the kill may or may not have committed.
        in_flight = {ln.split()[1] for ln in lines if ln.startswith("deleting ")} - deleted
        assert len(in_flight) <= 6
        assert len(created) >= 100, lines[-5:]
        assert sum(ln.startswith("stopped") for ln in lines) == 6

        counts = check_invariants(_db_url(reg))
        reg.service.start().wait_until(http_ready(reg.url + "/v1/health"))
        with reg.client() as c:
            assert c.health()["revision"] == counts["revision"]
            present = {i["id"]: i["ports"][0]["fixed_ips"][0]["ip_address"]
                       for i in c.list("instance")}
            for iid, ip in created.items():
                if iid not in deleted | in_flight:
                    assert present.get(iid) == ip, f"acknowledged instance {iid} lost"
            assert not deleted & set(present), "an acknowledged delete came back"
            # The registry carries on where it stopped.
            more = c.create("instance", {"name": "after", "network_id": net["id"]})
            assert more["revision"] == counts["revision"] + 1
            since = c.changes(counts["revision"])
            assert [ch["kind"] for ch in since["changes"]] == ["port", "instance"]
        check_invariants(_db_url(reg))
