"""The reaper's shortcut (`Registry.reconcile`): it plans again only when something the plan
reads changed since it last found nothing to do, and then it does. Real SQLite store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from openimds.registry import scheduler
from openimds.registry.scheduler import Policy
from openimds.registry.service import Registry
from openimds.registry.store import Store, bindings


def _registry(tmp_path: Path, down_time_s: float) -> tuple[Store, Registry]:
    store = Store(f"sqlite:///{tmp_path}/registry.sqlite")
    store.create_schema()
    return store, Registry(store, policy=Policy(down_time_s=down_time_s, dhcp_per_network=1))


def _count_plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = scheduler.plan

    def counted(*args: Any, **kwargs: Any) -> scheduler.Plan:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler, "plan", counted)
    return calls


def test_instances_do_not_replan_a_placement_change_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, reg = _registry(tmp_path, 30.0)
    try:
        reg.heartbeat({"host": "net-1", "type": "dhcp"})
        net = reg.create_network({"name": "n"})
        reg.create_subnet({"name": "s", "network_id": net["id"], "cidr": "10.0.0.0/24"})
        assert reg.get_network(net["id"])["hosts"] == ["net-1"]
        plans = _count_plans(monkeypatch)
        assert reg.reconcile() is False and len(plans) == 1  # nothing to do: remembered
        for i in range(3):
            reg.create_instance({"name": f"vm{i}", "network_id": net["id"]})
        reg.heartbeat({"host": "net-1", "type": "dhcp"})  # a known agent: no revision
        assert reg.reconcile() is False and len(plans) == 1  # nothing it reads changed
        # Another registry process on the same database drops the network's binding (a
        # network change row, as every placement write records one): planned and placed.
        with store.write() as tx:
            tx.conn.execute(bindings.delete().where(bindings.c.resource_id == net["id"]))
            tx.change("network", "update", net["id"], {"name": "n", "hosts": []})
        assert reg.reconcile() is True and len(plans) >= 2
        assert reg.get_network(net["id"])["hosts"] == ["net-1"]
        # A DHCP port (not an instance's) is a change the plan does not skip.
        done = len(plans)
        assert reg.reconcile() is False and len(plans) == done + 1
        reg.create_port({"network_id": net["id"], "device_owner": "network:dhcp",
                         "device_id": "dhcp-net-1"})
        assert reg.reconcile() is False and len(plans) == done + 2
    finally:
        store.dispose()


def test_a_silent_agent_expires_without_any_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    down = 1.0
    store, reg = _registry(tmp_path, down)
    try:
        for host in ("a", "b", "a", "b"):  # twice: each is told it has a peer
            reg.heartbeat({"host": host, "type": "l3"})
        router = reg.create_router({"name": "r"})
        [first] = reg.get_router(router["id"])["hosts"]
        other = "b" if first == "a" else "a"
        time.sleep(down + 0.1)  # past agent_down_time since start: agents may expire now
        reg.heartbeat({"host": other, "type": "l3"})
        reg.heartbeat({"host": first, "type": "l3"})  # told other is alive: it would fence
        assert reg.reconcile() is False  # both alive: settled
        plans = _count_plans(monkeypatch)
        assert reg.reconcile() is False and plans == []
        time.sleep(down + 0.2)  # `first` goes silent; heartbeats write no revision
        reg.heartbeat({"host": other, "type": "l3"})
        assert reg.reconcile() is True and len(plans) >= 1
        assert reg.get_router(router["id"])["hosts"] == [other]
    finally:
        store.dispose()
