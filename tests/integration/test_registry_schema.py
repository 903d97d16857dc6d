"""A registry file made before a column existed gets it at start, with nothing lost."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa

from openimds.registry.scheduler import Policy
from openimds.registry.service import Registry
from openimds.registry.store import Store, agents


def test_older_registry_gains_the_ipv6_mode_columns(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
    store = Store(url)
    store.create_schema()
    reg = Registry(store)
    net = reg.create_network({"name": "n"})
    sub = reg.create_subnet({"network_id": net["id"], "cidr": "10.0.0.0/24"})
    with store.engine.begin() as conn:  # the schema as the first release made it
        conn.exec_driver_sql("ALTER TABLE subnets DROP COLUMN ipv6_address_mode")
        conn.exec_driver_sql("ALTER TABLE subnets DROP COLUMN ipv6_ra_mode")
    store.dispose()

    store = Store(url)
    store.create_schema()
    cols = {c["name"] for c in sa.inspect(store.engine).get_columns("subnets")}
    assert {"ipv6_address_mode", "ipv6_ra_mode"} <= cols
    reg = Registry(store)
    assert reg.get_subnet(sub["id"])["cidr"] == "10.0.0.0/24"
    assert reg.get_subnet(sub["id"])["ipv6_address_mode"] is None
    v6 = reg.create_subnet({"network_id": net["id"], "cidr": "fd00::/64",
                            "ipv6_address_mode": "slaac"})
    assert reg.get_subnet(v6["id"])["ipv6_address_mode"] == "slaac"
    store.dispose()


def test_older_registry_gains_agents_peers_and_unknown_peers_let_work_move(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
    policy = Policy(down_time_s=0.5, dhcp_per_network=1)
    store = Store(url)
    store.create_schema()
    reg = Registry(store, policy=policy)
    reg.heartbeat({"host": "a", "type": "l3"})
    reg.heartbeat({"host": "b", "type": "l3"})
    rid = reg.create_router({"name": "r"})["id"]
    assert reg.get_router(rid)["hosts"] == ["a"]
    with store.engine.begin() as conn:  # the schema before the column
        conn.exec_driver_sql("ALTER TABLE agents DROP COLUMN peers")
    store.dispose()

    store = Store(url)
    store.create_schema()
    with store.read() as conn:
        rows = list(conn.execute(sa.select(agents)))
    assert sorted((r.host, r.peers) for r in rows) == [("a", None), ("b", None)]
    reg = Registry(store, policy=policy)
    for _ in range(10):  # b reports, a is silent past agent_down_time
        reg.heartbeat({"host": "b", "type": "l3"})
        time.sleep(0.1)
    reg.reconcile()
    assert reg.get_router(rid)["hosts"] == ["b"]  # a's peers unknown: it fenced, move
    store.dispose()
