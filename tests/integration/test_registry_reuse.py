"""The IP reuse hold (registry/reuse.py): a port that takes an address, or a router scope,
released moments ago is acknowledged only after the agents' feed lease; nothing else waits."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from openimds.errors import Conflict
from openimds.registry.reuse import DEFAULT_HOLD_S, LEASE_S
from openimds.registry.service import Registry
from openimds.registry.store import ACK_HOLD, AckHold, Store, releases
from tests.support import postgres_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    with contextlib.ExitStack() as stack:
        if request.param == "postgres":
            url = stack.enter_context(postgres_database())
        else:
            url = f"sqlite:///{tmp_path / 'registry.sqlite'}"
        store = Store(url)
        store.create_schema()
        stack.callback(store.dispose)
        yield Registry(store)


def ports_on(reg: Registry, net: dict[str, Any], n: int) -> list[dict[str, Any]]:
    return [reg.create_port({"network_id": net["id"]}) for _ in range(n)]


def ip_of(port: dict[str, Any]) -> str:
    return str(port["fixed_ips"][0]["ip_address"])


def held(fn: Any, *args: Any) -> tuple[Any, float]:
    """fn's result and the acknowledgement hold it asked for (as the REST layer sees it)."""
    hold = AckHold()
    token = ACK_HOLD.set(hold)
    try:
        return fn(*args), hold.seconds
    finally:
        ACK_HOLD.reset(token)


def network(reg: Registry, name: str, cidr: str) -> tuple[dict[str, Any], dict[str, Any]]:
    net = reg.create_network({"name": name})
    sub = reg.create_subnet({"network_id": net["id"], "cidr": cidr, "enable_dhcp": False})
    return net, sub


def age_releases(reg: Registry, seconds: float) -> None:
    with reg.store.engine.begin() as conn:
        conn.execute(releases.update().values(at=releases.c.at - seconds))


def test_a_reused_address_is_held_others_are_not(reg: Registry) -> None:
    net, _ = network(reg, "n", "10.0.0.0/24")
    first, hold = held(reg.create_instance, {"name": "a", "network_id": net["id"],
                                              "fixed_ip": "10.0.0.5"})
    assert hold == 0  # nothing was released
    _, hold = held(reg.delete_instance, first["id"])
    assert hold == 0  # a release itself is never held
    _, hold = held(reg.create_instance, {"name": "b", "network_id": net["id"],
                                         "fixed_ip": "10.0.0.5"})
    assert hold == reg.reuse.hold_s
    _, hold = held(reg.create_instance, {"name": "c", "network_id": net["id"],
                                         "fixed_ip": "10.0.0.6"})
    assert hold == 0  # another address on the same network


def test_a_release_older_than_the_window_costs_nothing(reg: Registry) -> None:
    net, _ = network(reg, "n", "10.0.0.0/24")
    port = reg.create_port({"network_id": net["id"],
                            "fixed_ips": [{"ip_address": "10.0.0.7"}]})
    reg.delete_port(port["id"])
    age_releases(reg, reg.reuse.window_s + 0.5)
    _, hold = held(reg.create_port, {"network_id": net["id"],
                                     "fixed_ips": [{"ip_address": "10.0.0.7"}]})
    assert hold == 0
    other = reg.create_port({"network_id": net["id"]})
    reg.delete_port(other["id"])  # prunes the aged row
    with reg.store.engine.connect() as conn:
        keys = set(conn.execute(sa.select(releases.c.key)).scalars())
    assert not any(k.endswith(":10.0.0.7") for k in keys), keys


def test_a_reused_mac_is_held(reg: Registry) -> None:
    # link-local IPv6 callers are found by the MAC's EUI-64 address
    net, _ = network(reg, "n", "10.0.0.0/24")
    mac = "fa:16:3e:00:00:42"
    port = reg.create_port({"network_id": net["id"], "mac_address": mac})
    reg.delete_port(port["id"])
    _, hold = held(reg.create_port, {"network_id": net["id"], "mac_address": mac})
    assert hold == reg.reuse.hold_s


def test_a_router_scope_that_lost_an_interface_is_held(reg: Registry) -> None:
    # (router, ip) moves from network m to network n: the agent may still map it to m's port
    router = reg.create_router({"name": "r"})
    m, m_sub = network(reg, "m", "10.1.0.0/24")
    n, n_sub = network(reg, "n", "10.1.0.0/24")
    reg.add_interface(router["id"], {"subnet_id": m_sub["id"]})
    reg.create_instance({"name": "on-m", "network_id": m["id"], "fixed_ip": "10.1.0.5"})
    reg.create_instance({"name": "on-n", "network_id": n["id"], "fixed_ip": "10.1.0.5"})
    age_releases(reg, reg.reuse.window_s + 0.5)
    _, hold = held(reg.remove_interface, router["id"], {"subnet_id": m_sub["id"]})
    assert hold == 0
    _, hold = held(reg.add_interface, router["id"], {"subnet_id": n_sub["id"]})
    assert hold == reg.reuse.hold_s  # n's 10.1.0.5 is now what (r, 10.1.0.5) means
    _, hold = held(reg.create_instance, {"name": "late", "network_id": n["id"],
                                         "fixed_ip": "10.1.0.6"})
    assert hold == reg.reuse.hold_s  # reached through r too, whose scope changed moments ago
    age_releases(reg, reg.reuse.window_s + 0.5)
    _, hold = held(reg.create_instance, {"name": "later", "network_id": n["id"],
                                         "fixed_ip": "10.1.0.7"})
    assert hold == 0


def test_the_feed_announces_its_lease_and_head(reg: Registry) -> None:
    net, _ = network(reg, "n", "10.0.0.0/24")
    head = int(reg.health()["revision"])
    page = reg.changes(0, 1)
    assert page["head"] == head and page["lease_s"] == LEASE_S
    assert page["hold_s"] == reg.reuse.hold_s
    assert page["revision"] < head  # a page: not the whole story
    assert reg.changes(head, None) == {"revision": head, "changes": [], "head": head,
                                       "lease_s": LEASE_S, "hold_s": reg.reuse.hold_s}
    assert reg.health()["lease_s"] == LEASE_S and reg.health()["hold_s"] == reg.reuse.hold_s
    assert net


def test_a_deleted_instance_id_is_never_given_again(reg: Registry) -> None:
    # the metadata API caches documents by instance ID, so a new instance must never carry
    # the ID of a deleted one (the API may not have heard of the deletion yet)
    net, _ = network(reg, "n", "10.0.0.0/24")
    iid = "0b8f6a52-5c0e-4c43-9d7e-3f3f1f8a9d01"
    reg.create_instance({"name": "a", "network_id": net["id"], "id": iid})
    reg.delete_instance(iid)
    with pytest.raises(Conflict, match="never reused"):
        reg.create_instance({"name": "b", "network_id": net["id"], "id": iid})
    other = reg.create_instance({"name": "c", "network_id": net["id"]})
    assert other["id"] != iid


def test_the_hold_defaults_to_the_setting_and_is_announced(reg: Registry) -> None:
    assert reg.reuse.hold_s == DEFAULT_HOLD_S == 30.0
    assert reg.health()["hold_s"] == DEFAULT_HOLD_S
    short = Registry(reg.store, reuse_hold=4.0)
    assert short.reuse.hold_s == 4.0 and short.health()["hold_s"] == 4.0
    assert short.changes(0, 1)["hold_s"] == 4.0
    net, _ = network(short, "n", "10.0.0.0/24")
    port = short.create_port({"network_id": net["id"],
                              "fixed_ips": [{"ip_address": "10.0.0.9"}]})
    short.delete_port(port["id"])
    _, hold = held(short.create_port, {"network_id": net["id"],
                                       "fixed_ips": [{"ip_address": "10.0.0.9"}]})
    assert hold == 4.0
    assert Registry(reg.store, reuse_hold=1.0).reuse.hold_s == LEASE_S + 1  # never below


def test_automatic_allocation_skips_a_just_released_address(reg: Registry) -> None:
    net, sub = network(reg, "n", "10.0.0.0/24")
    a, b, c = ports_on(reg, net, 3)
    assert [ip_of(p) for p in (a, b, c)] == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    reg.delete_port(b["id"])
    reg.delete_instance(reg.create_instance({"name": "i", "network_id": net["id"]})["id"])
    # the lowest free address (10.0.0.3) and the instance's (10.0.0.5) were released
    # moments ago: a picked address is another one, and the create is not held
    d, hold = held(reg.create_port, {"network_id": net["id"]})
    assert hold == 0 and ip_of(d) == "10.0.0.6"
    e, hold = held(reg.create_instance, {"name": "j", "network_id": net["id"]})
    assert hold == 0 and ip_of(e["ports"][0]) == "10.0.0.7"
    f, hold = held(reg.create_port, {"network_id": net["id"],
                                     "fixed_ips": [{"subnet_id": sub["id"]}]})
    assert hold == 0 and ip_of(f) == "10.0.0.8"  # a subnet asked for, not an address
    # asked for by address, the released one is given, and the answer waits the hold
    g, hold = held(reg.create_port, {"network_id": net["id"],
                                     "fixed_ips": [{"ip_address": "10.0.0.3"}]})
    assert hold == reg.reuse.hold_s and ip_of(g) == "10.0.0.3"
    reg.delete_port(g["id"])
    age_releases(reg, reg.reuse.window_s + 0.5)  # out of quarantine: lowest first again
    h, hold = held(reg.create_port, {"network_id": net["id"]})
    assert hold == 0 and ip_of(h) == "10.0.0.3"


def test_a_full_pool_reuses_a_quarantined_address_and_waits(reg: Registry) -> None:
    net = reg.create_network({"name": "tiny"})
    reg.create_subnet({"network_id": net["id"], "cidr": "10.9.0.0/29", "enable_dhcp": False,
                       "allocation_pools": [{"start": "10.9.0.2", "end": "10.9.0.3"}]})
    a, b = ports_on(reg, net, 2)
    reg.delete_port(a["id"])
    c, hold = held(reg.create_port, {"network_id": net["id"]})
    assert ip_of(c) == ip_of(a) and hold == reg.reuse.hold_s  # the only free one
    assert ip_of(b) == "10.9.0.3"


def test_an_automatic_create_after_a_router_scope_change_is_held(reg: Registry) -> None:
    # an automatic create asks the hold's questions on the way (its network read, its
    # address take: Tx.released_seen); the router's scope is one of them
    router = reg.create_router({"name": "r"})
    m, m_sub = network(reg, "m", "10.2.0.0/24")
    n, n_sub = network(reg, "n", "10.3.0.0/24")
    reg.add_interface(router["id"], {"subnet_id": m_sub["id"]})
    _, hold = held(reg.create_instance, {"name": "before", "network_id": n["id"]})
    assert hold == 0  # n has no router: nothing of it was released
    reg.add_interface(router["id"], {"subnet_id": n_sub["id"]})
    reg.remove_interface(router["id"], {"subnet_id": m_sub["id"]})  # r's scope released
    vm, hold = held(reg.create_instance, {"name": "late", "network_id": n["id"]})
    assert hold == reg.reuse.hold_s  # reached through r, whose scope changed moments ago
    _, hold = held(reg.create_instance, {"name": "elsewhere", "network_id": m["id"]})
    assert hold == 0  # m has no router any more
    age_releases(reg, reg.reuse.window_s + 0.5)
    _, hold = held(reg.create_instance, {"name": "later", "network_id": n["id"]})
    assert hold == 0
    assert ip_of(vm["ports"][0]) != "10.3.0.1"


def test_an_automatic_create_drawing_a_mac_released_moments_ago_is_held(
        reg: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    # the drawn MAC's link-local address is asked by the network's read: a MAC released
    # moments ago (a port deleted, the draw then lands on its MAC) is held like any reuse
    from openimds.registry import allocation

    net, _ = network(reg, "n", "10.0.0.0/24")
    port = reg.create_port({"network_id": net["id"], "mac_address": "fa:16:3e:00:00:42"})
    reg.delete_port(port["id"])
    age_releases(reg, 0.0)
    with reg.store.engine.begin() as conn:  # only the MAC's key stays in the window
        conn.execute(releases.update().where(~releases.c.key.like("%fe80::%"))
                     .values(at=releases.c.at - reg.reuse.window_s - 0.5))
    draws = iter([b"\x00\x00\x42", b"\x00\x00\x43"])
    monkeypatch.setattr(allocation.secrets, "token_bytes", lambda n: next(draws))
    vm, hold = held(reg.create_instance, {"name": "same-mac", "network_id": net["id"]})
    assert vm["ports"][0]["mac_address"] == "fa:16:3e:00:00:42"
    assert hold == reg.reuse.hold_s
    vm, hold = held(reg.create_instance, {"name": "other-mac", "network_id": net["id"]})
    assert vm["ports"][0]["mac_address"] == "fa:16:3e:00:00:43" and hold == 0
