"""Registry schema migrations on real SQLite and PostgreSQL.

A registry made by an earlier release (its real DDL, tests/fixtures/registry_schema/, taken
from git by generate.py) upgrades in place with every row and value kept, new columns at
their defaults and constraints holding; every release's schema is recognised without an
alembic_version and upgraded; the migrations end at exactly the tables the code defines
(so a schema change without a migration fails here); a newer database is refused; two
registries upgrading one database at once do not race; backups of an older schema restore.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.exc import IntegrityError

from openimds.errors import BadRequest
from openimds.registry import migrations
from openimds.registry.backup import FORMAT, VERSION, _digest, dump, restore, upgraded
from openimds.registry.scheduler import Policy
from openimds.registry.service import Registry
from openimds.registry.store import Store, agents, metadata
from tests import reaper
from tests.support import (
    PYTHON,
    base_config,
    clean_env,
    postgres_database,
    run_cli,
    wait_for,
    write_config,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "registry_schema"
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
HEAD = migrations.head()


@contextlib.contextmanager
def database(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "postgres":
        with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{tmp_path / 'registry.sqlite'}"


def load_ddl(store: Store, name: str) -> None:
    """Run a past release's create_all statements (the fixture) on an empty database."""
    dialect = "postgresql" if store.backend == "postgresql" else "sqlite"
    text = (FIXTURES / f"{name}.{dialect}.sql").read_text()
    statements = [s for s in (chunk.strip() for chunk in text.split(";\n"))
                  if s and not all(line.startswith("--") for line in s.splitlines())]
    assert statements
    with store.engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


def reflect(store: Store) -> sa.MetaData:
    md = sa.MetaData()
    md.reflect(store.engine)
    return md


def snapshot(store: Store, md: sa.MetaData) -> dict[str, list[dict[str, Any]]]:
    out = {}
    with store.engine.connect() as conn:
        for table in md.sorted_tables:
            if table.name == "alembic_version":
                continue
            pk = list(table.primary_key.columns) or list(table.columns)
            out[table.name] = [dict(r._mapping) for r in
                               conn.execute(sa.select(table).order_by(*pk))]
    return out


def schema_diff(store: Store) -> list[Any]:
    with store.engine.connect() as conn:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))


P1, P2 = "11111111-0000-4000-8000-000000000001", "11111111-0000-4000-8000-000000000002"
N1, N2, N3 = (f"22222222-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))
S1, S2 = "33333333-0000-4000-8000-000000000001", "33333333-0000-4000-8000-000000000002"
R1 = "44444444-0000-4000-8000-000000000001"
PT1, PT2, PT3 = (f"55555555-0000-4000-8000-00000000000{i}" for i in (1, 2, 3))
K1 = "66666666-0000-4000-8000-000000000001"
I1, I2 = "77777777-0000-4000-8000-000000000001", "77777777-0000-4000-8000-000000000002"
PUBKEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHb3QmVbRJQ3PBzA2u4WoJ0n2gO8Rj2HwPcQn1m3JcKq "
          "demo@example")
USER_DATA = b"#cloud-config\n\x00\xff\xfe binary \xe2\x82\xac"


def first_release_rows() -> dict[str, list[dict[str, Any]]]:
    """A row in every first-release table, with every column filled (and NULLs where the
    column allows): the values an upgrade must keep."""
    t0 = "2026-11-23T16:00:0{}Z"
    return {
        "state": [{"id": 1, "revision": 42, "floor": 3, "ec2_seq": 2}],
        "projects": [{"id": P1, "name": "tenant-a", "created_at": t0.format(0), "revision": 1},
                     {"id": P2, "name": "tenant-b", "created_at": t0.format(1), "revision": 2}],
        # created out of ID order: segments are numbered by creation time
        "networks": [
            {"id": N1, "name": "net-b", "project_id": P1, "mtu": 1450,
             "created_at": t0.format(4), "revision": 5},
            {"id": N2, "name": "net-a", "project_id": P1, "mtu": 1500,
             "created_at": t0.format(3), "revision": 4},
            {"id": N3, "name": "net-c", "project_id": P2, "mtu": 9000,
             "created_at": t0.format(5), "revision": 6}],
        "subnets": [
            {"id": S1, "name": "sub-a", "network_id": N2, "project_id": P1, "ip_version": 4,
             "cidr": "10.0.0.0/24", "gateway_ip": "10.0.0.1", "enable_dhcp": True,
             "allocation_pools": [{"start": "10.0.0.2", "end": "10.0.0.254"}],
             "dns_nameservers": ["10.0.0.53", "9.9.9.9"],
             "host_routes": [{"destination": "192.168.0.0/16", "nexthop": "10.0.0.254"}],
             "created_at": t0.format(6), "revision": 7},
            {"id": S2, "name": "sub-v6", "network_id": N1, "project_id": P1, "ip_version": 6,
             "cidr": "fd00:1::/64", "gateway_ip": None, "enable_dhcp": False,
             "allocation_pools": [], "dns_nameservers": [], "host_routes": [],
             "created_at": t0.format(7), "revision": 8}],
        "routers": [{"id": R1, "name": "r1", "project_id": P1, "created_at": t0.format(8),
                     "revision": 9}],
        "ports": [
            {"id": PT1, "name": "", "network_id": N2, "project_id": P1,
             "mac_address": "fa:16:3e:00:00:01", "device_id": R1,
             "device_owner": "network:router_interface", "created_at": t0.format(8),
             "revision": 10},
            {"id": PT2, "name": "vm-1-port", "network_id": N2, "project_id": P1,
             "mac_address": "fa:16:3e:00:00:02", "device_id": I1,
             "device_owner": "compute:nova", "created_at": t0.format(9), "revision": 12},
            {"id": PT3, "name": "vm-2-port", "network_id": N1, "project_id": P1,
             "mac_address": "fa:16:3e:00:00:03", "device_id": I2,
             "device_owner": "compute:nova", "created_at": t0.format(9), "revision": 13}],
        "port_ips": [
            {"port_id": PT1, "subnet_id": S1, "network_id": N2, "ip_address": "10.0.0.1"},
            {"port_id": PT2, "subnet_id": S1, "network_id": N2, "ip_address": "10.0.0.5"},
            {"port_id": PT3, "subnet_id": S2, "network_id": N1, "ip_address": "fd00:1::5"}],
        "keypairs": [{"id": K1, "name": "k", "project_id": P1, "public_key": PUBKEY,
                      "fingerprint": "aa:bb:cc", "type": "ssh", "created_at": t0.format(2),
                      "revision": 3}],
        "instances": [
            {"id": I1, "name": "vm-1", "hostname": "vm-1", "project_id": P1,
             "availability_zone": "nova", "flavor": "m1.small", "launch_index": 0,
             "key_name": "k", "keypair_id": K1,
             "keypair": {"name": "k", "type": "ssh", "data": PUBKEY},
             "metadata": {"role": "web", "ünï": "çødé"}, "user_data": USER_DATA,
             "image_id": "img-1", "ec2_id": 1, "password": "encrypted==",
             "created_at": t0.format(9), "revision": 11},
            {"id": I2, "name": "vm-2", "hostname": "vm-2", "project_id": P1,
             "availability_zone": "az2", "flavor": "m1.tiny", "launch_index": 1,
             "key_name": None, "keypair_id": None, "keypair": None, "metadata": {},
             "user_data": None, "image_id": None, "ec2_id": 2, "password": None,
             "created_at": t0.format(9), "revision": 13}],
        "changes": [
            {"seq": 1, "revision": 40, "kind": "port", "op": "create", "obj_id": PT2,
             "attrs": {"network_id": N2}},
            {"seq": 2, "revision": 41, "kind": "instance", "op": "update", "obj_id": I1,
             "attrs": {"metadata": {"role": "web"}}},
            {"seq": 3, "revision": 42, "kind": "instance", "op": "create", "obj_id": I2,
             "attrs": {}}],
    }


def fill(store: Store, rows: dict[str, list[dict[str, Any]]]) -> None:
    md = reflect(store)
    with store.engine.begin() as conn:
        for table in md.sorted_tables:
            if rows.get(table.name):
                conn.execute(table.insert(), rows[table.name])
    if store.backend == "postgresql":  # rows with explicit serial keys: move the sequence on
        with store.engine.begin() as conn:
            conn.exec_driver_sql("SELECT setval('changes_seq_seq', 3)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_release_registry_upgrades_with_every_row_kept(tmp_path: Path,
                                                             backend: str) -> None:
    with database(backend, tmp_path) as url:
        store = Store(url)
        try:
            load_ddl(store, "r0_first_release")
            rows = first_release_rows()
            fill(store, rows)
            before = snapshot(store, reflect(store))
            assert {t: len(r) for t, r in before.items()} == {t: len(r) for t, r in rows.items()}

            assert store.create_schema() == ("0001", HEAD)
            after = snapshot(store, reflect(store))

            # every row and value survived, in every table the first release had
            for table, old in before.items():
                assert len(after[table]) == len(old), table
                for old_row, new_row in zip(old, after[table], strict=True):
                    assert {k: new_row[k] for k in old_row} == old_row, table
            assert after["instances"][0]["user_data"] == USER_DATA
            # new columns at their defaults, new tables empty or backfilled
            assert [(r["ipv6_address_mode"], r["ipv6_ra_mode"]) for r in after["subnets"]] \
                == [(None, None), (None, None)]
            assert after["agents"] == [] and after["bindings"] == []
            assert after["instance_hosts"] == []
            assert sorted((r["segmentation_id"], r["network_id"]) for r in after["segments"]) \
                == [(1, N2), (2, N1), (3, N3)]  # by creation time
            with store.engine.connect() as conn:
                assert migrations.current(conn) == HEAD
            assert schema_diff(store) == []

            # constraints hold on the upgraded tables
            md = reflect(store)
            for table, row in (
                ("port_ips", {"port_id": PT3, "subnet_id": S1, "network_id": N2,
                              "ip_address": "10.0.0.5"}),  # IP in use on the network
                ("ports", dict(rows["ports"][1], id=PT3[:-1] + "9")),  # MAC in use
                ("segments", {"network_id": N3, "segmentation_id": 1}),  # VNI in use
                ("port_ips", {"port_id": PT3, "subnet_id": "no-such-subnet",
                              "network_id": N1, "ip_address": "fd00:1::9"}),  # dangling FK
                ("subnets", dict(rows["subnets"][0], id=S1[:-1] + "9", name=None)),  # NOT NULL
            ):
                with pytest.raises(IntegrityError), store.engine.begin() as conn:
                    conn.execute(md.tables[table].insert(), row)

            # and the registry runs on it: reads the old rows, writes the new columns
            reg = Registry(store)
            assert reg.get_subnet(S1)["dns_nameservers"] == ["10.0.0.53", "9.9.9.9"]
            assert reg.get_subnet(S1)["ipv6_address_mode"] is None
            v6 = reg.create_subnet({"network_id": N3, "cidr": "fd00:3::/64",
                                    "ipv6_address_mode": "slaac", "ipv6_ra_mode": "slaac"})
            assert reg.get_subnet(v6["id"])["ipv6_address_mode"] == "slaac"
            net = reg.create_network({"name": "after-upgrade"})
            with store.read() as conn:
                vni = conn.execute(sa.text("SELECT segmentation_id FROM segments WHERE "
                                           "network_id = :n"), {"n": net["id"]}).scalar_one()
            assert vni == 4
            with store.read() as conn:
                assert store.revision(conn) == 44  # 42 + the two writes above
            reg.heartbeat({"host": "node-1", "type": "l3"})
            with store.read() as conn:
                assert [(r.host, r.peers) for r in conn.execute(sa.select(agents))] \
                    == [("node-1", 0)]
        finally:
            store.dispose()


# (fixture, the revision its tables match, how it was made)
RELEASE_SCHEMAS = [
    ("r0_first_release", "0001"),
    ("r1_segments", "0002"),
    ("r2_subnet_ipv6_modes", "0003"),
    ("r3_instance_hosts", "0004"),
    ("r4_agents_bindings", "0005"),
    ("r4b_agents_alive_since", "0005"),  # main at c539004: agents.alive_since, no peers
    ("r5_agents_peers", "0006"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("fixture", "matches"), RELEASE_SCHEMAS)
def test_a_registry_from_before_migrations_is_stamped_and_upgraded(
        tmp_path: Path, backend: str, fixture: str, matches: str) -> None:
    """Every table that schema had gets rows (every column it had filled); all of them
    survive the upgrade."""
    with database(backend, tmp_path) as url:
        store = Store(url)
        try:
            load_ddl(store, fixture)
            md = reflect(store)
            rows = {t.name: [{k: v for k, v in r.items() if k in t.c}
                             for r in first_release_rows().get(t.name, [])
                             + LATER_ROWS.get(t.name, [])] for t in md.sorted_tables}
            for row in rows["subnets"]:  # the modes, where the schema has them
                row.update({k: v for k, v in SUBNET_MODES.get(row["id"], {}).items()
                            if k in md.tables["subnets"].c})
            fill(store, rows)
            before = snapshot(store, md)
            assert all(before[t] for t in before), before  # every table has rows

            assert store.create_schema() == (matches, HEAD)
            assert schema_diff(store) == []
            after = snapshot(store, reflect(store))
            for table, old in before.items():
                assert len(after[table]) == len(old), table
                for old_row, new_row in zip(old, after[table], strict=True):
                    kept = {k: v for k, v in old_row.items()
                            if (table, k) not in migrations.DROPPED}
                    assert {k: new_row[k] for k in kept} == kept, table
            assert all("alive_since" not in r for r in after["agents"])
            if "peers" not in md.tables.get("agents", sa.Table("x", sa.MetaData())).c:
                assert all(r["peers"] is None for r in after["agents"])  # unknown
            assert store.create_schema() == (HEAD, HEAD)
        finally:
            store.dispose()


# rows for the tables added after the first release (every column any schema had)
LATER_ROWS: dict[str, list[dict[str, Any]]] = {
    "segments": [{"network_id": N1, "segmentation_id": 7},
                 {"network_id": N2, "segmentation_id": 8},
                 {"network_id": N3, "segmentation_id": 9}],
    "instance_hosts": [{"instance_id": I1, "host": "cmp-1"}],
    "agents": [{"host": "net-1", "type": "l3", "heartbeat_at": 1764600000.25, "alive": True,
                "created_at": "2026-12-01T22:40:00Z", "revision": 30, "peers": 1,
                "alive_since": 1764590000.5},
               {"host": "net-2", "type": "dhcp", "heartbeat_at": 1764600001.0,
                "alive": False, "created_at": "2026-12-01T22:41:00Z", "revision": 31,
                "peers": None, "alive_since": None}],
    "bindings": [{"kind": "router", "resource_id": R1, "host": "net-1",
                  "created_at": "2026-12-01T22:42:00Z"},
                 {"kind": "network", "resource_id": N2, "host": "net-2",
                  "created_at": "2026-12-01T22:42:00Z"}],
}
SUBNET_MODES = {S2: {"ipv6_address_mode": "dhcpv6-stateful", "ipv6_ra_mode": "dhcpv6-stateful"}}


def test_main_between_alive_since_and_peers_had_both_columns(tmp_path: Path) -> None:
    """A registry run from main at c539004, then at ab9a483 (which added peers but did not
    drop alive_since): placed at 0005 and the stale column dropped."""
    store = Store(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    try:
        load_ddl(store, "r4b_agents_alive_since")
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ALTER TABLE agents ADD COLUMN peers INTEGER")
        assert store.create_schema() == ("0005", HEAD)
        assert schema_diff(store) == []
    finally:
        store.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_migrations_from_empty_end_at_the_code_s_tables(tmp_path: Path, backend: str) -> None:
    """A new registry is made with create_all and stamped; the migrations, run from the
    first revision, must make exactly the same schema."""
    with database(backend, tmp_path) as url:
        store = Store(url)
        try:
            assert store.create_schema(to="0001") == ("", "0001")
            with store.engine.connect() as conn:
                assert migrations.current(conn) == "0001"
            assert schema_diff(store) != []
            assert store.create_schema() == ("0001", HEAD)
            assert schema_diff(store) == []
        finally:
            store.dispose()


def test_a_schema_change_without_a_migration_shows_in_the_compare(tmp_path: Path) -> None:
    """The compare the tests above rely on sees a column, an index and a table the
    migrations do not make."""
    store = Store(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    try:
        store.create_schema()
        changed = sa.MetaData()
        for table in metadata.sorted_tables:
            table.to_metadata(changed)
        changed.tables["ports"].append_column(sa.Column("node_port", sa.Integer, nullable=True))
        sa.Index("ix_instances_hostname", changed.tables["instances"].c.hostname)
        sa.Table("dhcp_ports", changed, sa.Column("id", sa.String(36), primary_key=True))
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), changed)
        kinds = sorted(d[0] if isinstance(d, tuple) else d[0][0] for d in diff)
        assert kinds == ["add_column", "add_index", "add_table"], diff
    finally:
        store.dispose()


def test_a_database_newer_than_the_code_is_refused_with_its_revision(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = write_config(tmp_path / "openimds.ini", base_config(state))
    store = Store(f"sqlite:///{state / 'registry.sqlite'}")
    try:
        store.create_schema()
        with store.engine.begin() as conn:
            conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
        with pytest.raises(migrations.SchemaTooNew, match="schema revision 0099"):
            store.create_schema()
    finally:
        store.dispose()
    for args in (("registry", "serve"), ("registry", "migrate")):
        ans = run_cli(config, *args, timeout=30)
        assert ans.returncode == 1, ans
        lines = ans.stderr.strip().splitlines()
        assert lines[-1].startswith("openimds: error: the registry database is at schema "
                                    "revision 0099, which this release does not know"), lines
    ans = run_cli(config, "registry", "db-version", "-f", "json")
    assert ans.returncode == 1 and json.loads(ans.stdout)["schema"] == "0099"


def test_tables_that_are_not_a_registry_are_refused(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    try:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE customers (id INTEGER PRIMARY KEY)")
        with pytest.raises(migrations.SchemaError, match="not an openimds registry"):
            store.create_schema()
        with store.engine.connect() as conn:  # nothing was changed
            assert sa.inspect(conn).get_table_names() == ["customers"]
    finally:
        store.dispose()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_registries_upgrading_one_database_at_once_do_not_race(
        tmp_path: Path, backend: str) -> None:
    with database(backend, tmp_path) as url:
        store = Store(url)
        try:
            load_ddl(store, "r0_first_release")
            fill(store, first_release_rows())
            before = snapshot(store, reflect(store))
        finally:
            store.dispose()
        configs = [write_config(tmp_path / f"{n}.ini", base_config(
            tmp_path / n, registry={"connection": url})) for n in ("a", "b")]
        # hold the schema lock until both processes wait for it, so they surely overlap
        holder = Store(url)
        procs: list[subprocess.Popen[str]] = []
        try:
            with holder.schema_lock():
                procs = [reaper.spawn(
                    [PYTHON, "-m", "openimds", "--config", str(c), "registry", "migrate"],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    env=clean_env()) for c in configs]
                if backend == "postgres":
                    with holder.engine.connect() as conn:
                        wait_for(lambda: conn.execute(sa.text(
                            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                            "AND NOT granted")).scalar_one() == 2, 60, "two waiters")
                else:
                    db = str(tmp_path / "registry.sqlite")
                    wait_for(lambda: all(_has_open(p.pid, db) for p in procs), 60,
                             "both processes opening the database")
                    time.sleep(0.5)  # and reaching BEGIN IMMEDIATE
                assert all(p.poll() is None for p in procs)  # both wait
            outs = [p.communicate(timeout=60) for p in procs]
        finally:
            holder.dispose()
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        assert [p.returncode for p in procs] == [0, 0], outs
        said = sorted(o[0].strip() for o in outs)
        assert said == [f"the registry schema is at revision {HEAD}: nothing to do",
                        f"upgraded the registry schema from revision 0001 to {HEAD}"], outs
        store = Store(url)
        try:
            assert schema_diff(store) == []
            after = snapshot(store, reflect(store))
            assert all(len(after[t]) == len(r) for t, r in before.items())
            assert len(after["segments"]) == 3  # backfilled once, not twice
        finally:
            store.dispose()


def _has_open(pid: int, path: str) -> bool:
    fds = Path(f"/proc/{pid}/fd")
    with contextlib.suppress(OSError):
        return any(os.readlink(fd) == path for fd in fds.iterdir())
    return False


def test_unknown_peers_after_the_upgrade_let_a_dead_agent_s_work_move(tmp_path: Path) -> None:
    """agents rows from before peers existed have peers NULL (unknown): the scheduler
    treats such an agent as one that fenced, so its routers move when it dies."""
    url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
    policy = Policy(down_time_s=0.5, dhcp_per_network=1)
    store = Store(url)
    store.create_schema(to="0005")
    with store.engine.begin() as conn:  # two agents and a router on a, as 0005 kept them
        for host in ("a", "b"):
            conn.execute(sa.text(
                "INSERT INTO agents (host, type, heartbeat_at, alive, created_at, revision) "
                "VALUES (:host, 'l3', :now, 1, 'x', 1)"), {"host": host, "now": time.time()})
    store.create_schema()
    reg = Registry(store, policy=policy)
    rid = reg.create_router({"name": "r"})["id"]
    host = reg.get_router(rid)["hosts"][0]
    other = "b" if host == "a" else "a"
    with store.read() as conn:
        assert sorted((r.host, r.peers) for r in conn.execute(sa.select(agents))) \
            == [("a", None), ("b", None)]
    for _ in range(10):  # the other reports; the router's host, peers unknown, is silent
        reg.heartbeat({"host": other, "type": "l3"})
        time.sleep(0.1)
    reg.reconcile()
    assert reg.get_router(rid)["hosts"] == [other]
    store.dispose()


# ---------------------------------------------------------------------- backups


def old_backup(rows: dict[str, list[dict[str, Any]]], schema: str | None) -> dict[str, Any]:
    """A backup file's contents as a release at `schema` wrote it (None: before backups
    recorded their schema)."""
    tables = {t: [{k: ({"b64": base64.b64encode(v).decode()} if isinstance(v, bytes) else v)
                   for k, v in r.items()} for r in rs] for t, rs in rows.items()}
    data: dict[str, Any] = {"format": FORMAT, "version": VERSION, "backend": "sqlite",
                            "revision": rows["state"][0]["revision"],
                            "counts": {t: len(r) for t, r in tables.items()},
                            "sha256": _digest(tables), "tables": tables}
    if schema is not None:
        data["schema"] = schema
    return data


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_first_release_backup_restores_upgraded(tmp_path: Path, backend: str) -> None:
    rows = first_release_rows()
    data = old_backup(rows, "0001")
    with database(backend, tmp_path) as url:
        store = Store(url)
        try:
            done = restore(store, data)
            assert done["upgraded_from"] == "0001" and done["schema"] == HEAD
            got = dump(store)
            assert got["schema"] == HEAD
            for table in rows:
                if table in ("changes", "state"):
                    continue  # history is not restored; state moves past the revision
                new = sorted(got["tables"][table], key=lambda r: json.dumps(r, default=str,
                                                                            sort_keys=True))
                want = sorted(old_backup(rows, None)["tables"][table],
                              key=lambda r: json.dumps(r, default=str, sort_keys=True))
                assert [{k: r[k] for k in w} for r, w in zip(new, want, strict=True)] == want
            assert [s["ipv6_address_mode"] for s in got["tables"]["subnets"]] == [None, None]
            assert sorted(s["segmentation_id"] for s in got["tables"]["segments"]) == [1, 2, 3]
            assert got["revision"] > 42
            assert schema_diff(store) == []
        finally:
            store.dispose()


def test_backups_record_their_schema_and_older_ones_are_placed_by_their_columns(
        tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    try:
        store.create_schema()
        reg = Registry(store)
        reg.create_network({"name": "n"})
        reg.heartbeat({"host": "node-1", "type": "l3"})
        data = dump(store)
    finally:
        store.dispose()
    assert data["schema"] == HEAD
    assert upgraded(copy.deepcopy(data)).get("upgraded_from") is None

    # written by a release before backups named their schema, before agents.peers
    older = copy.deepcopy(data)
    del older["schema"]
    for row in older["tables"]["agents"]:
        del row["peers"]
    older["sha256"] = _digest(older["tables"])
    done = upgraded(older)
    assert done["upgraded_from"] == "0005" and done["schema"] == HEAD
    assert [(r["host"], r["peers"]) for r in done["tables"]["agents"]] == [("node-1", None)]
    assert done["tables"]["networks"] == data["tables"]["networks"]

    newer = copy.deepcopy(data)
    newer["schema"] = "0099"
    with pytest.raises(BadRequest, match="newer release: schema revision '0099'"):
        upgraded(newer)

    # an older backup with a column its schema never had is mismatched, not guessed
    odd = old_backup(first_release_rows(), "0001")
    odd["tables"]["subnets"][0]["ipv6_address_mode"] = "slaac"
    odd["sha256"] = _digest(odd["tables"])
    with pytest.raises(BadRequest, match=r"subnets has columns \['ipv6_address_mode'\]"):
        upgraded(odd)


def test_restore_check_says_an_old_backup_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.backup"
    path.write_text(json.dumps(old_backup(first_release_rows(), "0001")))
    config = write_config(tmp_path / "openimds.ini", base_config(tmp_path / "state"))
    ans = run_cli(config, "registry", "restore", "--check", str(path), check=True)
    assert f"(upgraded from schema revision 0001 to {HEAD})" in ans.stdout, ans.stdout
    ans = run_cli(config, "registry", "restore", str(path), check=True)
    assert f"upgraded from schema revision 0001 to {HEAD}" in ans.stdout, ans.stdout
    ans = run_cli(config, "registry", "db-version", "-f", "json", check=True)
    assert json.loads(ans.stdout)["schema"] == HEAD


def test_migrate_sql_prints_the_statements_for_the_backend(tmp_path: Path) -> None:
    config = write_config(tmp_path / "openimds.ini", base_config(
        tmp_path / "state", registry={"connection": "postgresql://nobody@/nowhere"}))
    ans = run_cli(config, "registry", "migrate", "--sql", "--from", "0005", check=True)
    assert "ALTER TABLE agents ADD COLUMN peers INTEGER" in ans.stdout, ans.stdout
    assert "CREATE TABLE segments" not in ans.stdout
    ans = run_cli(config, "registry", "migrate", "--sql", check=True)
    assert "CREATE TABLE alembic_version" in ans.stdout
    assert "BIGSERIAL" in ans.stdout  # PostgreSQL's DDL, not SQLite's
    assert "INSERT INTO segments" in ans.stdout
    assert f"version_num='{HEAD}'" in ans.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_failed_upgrade_leaves_the_database_at_its_old_revision(tmp_path: Path,
                                                                  backend: str) -> None:
    with database(backend, tmp_path) as url:
        store = Store(url)
        try:
            store.create_schema(to="0001")
            with store.engine.begin() as conn:  # in the way of 0004, after 0002 and 0003 ran
                conn.exec_driver_sql("CREATE TABLE instance_hosts (x INTEGER)")
            with pytest.raises(sa.exc.DBAPIError):
                store.create_schema()
            with store.engine.connect() as conn:
                assert migrations.current(conn) == "0001"
                tables = set(sa.inspect(conn).get_table_names())
                columns = {c["name"] for c in sa.inspect(conn).get_columns("subnets")}
            assert "segments" not in tables and "ipv6_address_mode" not in columns
        finally:
            store.dispose()


def test_the_revision_files_are_one_chain_as_alembic_reads_them() -> None:
    scripts = list(reversed(list(migrations.script().walk_revisions())))
    assert [s.revision for s in scripts] == migrations.revisions()
    assert [s.down_revision for s in scripts] == [None, *migrations.revisions()[:-1]]
    assert migrations.script().get_current_head() == HEAD


def test_a_registry_at_head_starts_without_importing_alembic(tmp_path: Path) -> None:
    """Importing alembic costs 0.3-0.8 s on every registry restart; at head nothing needs it."""
    store = Store(f"sqlite:///{tmp_path / 'registry.sqlite'}")
    store.create_schema()
    store.dispose()
    code = ("import sys; from openimds.registry.store import Store; "
            f"s = Store({str('sqlite:///' + str(tmp_path / 'registry.sqlite'))!r}); "
            "print(s.create_schema()); print(sorted(m for m in sys.modules "
            "if m.split('.')[0] == 'alembic'))")
    out = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, check=True,
                         env=clean_env(), timeout=60).stdout.splitlines()
    assert out == [f"('{HEAD}', '{HEAD}')", "[]"], out
