"""A registry file made before a column existed gets it at start, with nothing lost."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from openimds.registry.service import Registry
from openimds.registry.store import Store


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
