"""Free-IP allocation from each subnet's availability ranges (registry/ipalloc.py) on real
SQLite and PostgreSQL: sequential picks, asked-for addresses, reuse after the quarantine,
a full subnet, concurrent registries on one database, a database migrated from 0009 with
ports on it, and a state that some write went around."""

from __future__ import annotations

import contextlib
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from openimds.core import ipam
from openimds.errors import Conflict
from openimds.registry import dhcp_ports, ipalloc, migrations
from openimds.registry.service import Registry
from openimds.registry.store import (
    ACK_HOLD,
    AckHold,
    Store,
    instances,
    ip_alloc,
    ip_ranges,
    ip_released,
    networks,
    port_ips,
    ports,
    releases,
    subnets,
)
from tests.support import postgres_database

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "postgres":
        with postgres_database() as u:
            yield u
    else:
        yield f"sqlite:///{tmp_path / 'registry.sqlite'}"


@contextlib.contextmanager
def registry(url: str) -> Iterator[Registry]:
    store = Store(url)
    try:
        store.create_schema()
        yield Registry(store)
    finally:
        store.dispose()


@pytest.fixture
def reg(url: str) -> Iterator[Registry]:
    with registry(url) as r:
        yield r


def network(reg: Registry, cidr: str, **subnet: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    net = reg.create_network({"name": "n"})
    sub = reg.create_subnet({"network_id": net["id"], "cidr": cidr, "enable_dhcp": False,
                             **subnet})
    return net, sub


def ip_of(port: dict[str, Any]) -> str:
    return str(port["fixed_ips"][0]["ip_address"])


def instance_ip(reg: Registry, net: dict[str, Any], **body: Any) -> str:
    return ip_of(reg.create_instance({"name": "vm", "network_id": net["id"], **body})["ports"][0])


def state_problems(reg: Registry, sub: dict[str, Any]) -> list[str] | None:
    with reg.store.read() as conn:
        row = conn.execute(sa.select(subnets).where(subnets.c.id == sub["id"])).one()
        return ipalloc.problems(conn, row)


def age_releases(reg: Registry, seconds: float) -> None:
    with reg.store.engine.begin() as conn:
        conn.execute(releases.update().values(at=releases.c.at - seconds))


def count(reg: Registry, table: sa.Table) -> int:
    with reg.store.read() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one())


def test_sequential_picks_on_a_16_read_a_range_not_the_ports(reg: Registry) -> None:
    net, sub = network(reg, "10.20.0.0/16")
    router = reg.create_router({"name": "r"})
    reg.add_interface(router["id"], {"subnet_id": sub["id"]})  # the gateway, outside the pool
    got = [instance_ip(reg, net) for _ in range(300)]
    want = [str(ipaddress.ip_address("10.20.0.2") + i) for i in range(300)]
    assert got == want
    assert state_problems(reg, sub) == []
    assert count(reg, ip_ranges) == 1  # one span left: 10.20.1.46-10.20.255.254
    reg.remove_interface(router["id"], {"subnet_id": sub["id"]})
    assert state_problems(reg, sub) == [] and count(reg, ip_released) == 0


def test_an_asked_for_address_then_automatic_ones(reg: Registry) -> None:
    net, sub = network(reg, "10.1.0.0/24",
                       allocation_pools=[{"start": "10.1.0.10", "end": "10.1.0.20"}])
    assert instance_ip(reg, net, fixed_ip="10.1.0.12") == "10.1.0.12"  # the middle of the pool
    assert instance_ip(reg, net, fixed_ip="10.1.0.10") == "10.1.0.10"  # its first address
    assert instance_ip(reg, net, fixed_ip="10.1.0.20") == "10.1.0.20"  # its last
    assert instance_ip(reg, net, fixed_ip="10.1.0.200") == "10.1.0.200"  # outside the pool
    assert state_problems(reg, sub) == []
    assert [instance_ip(reg, net) for _ in range(3)] == ["10.1.0.11", "10.1.0.13", "10.1.0.14"]
    with pytest.raises(Conflict, match="10.1.0.13 is already in use"):
        reg.create_port({"network_id": net["id"], "fixed_ips": [{"ip_address": "10.1.0.13"}]})
    assert state_problems(reg, sub) == []


def test_a_released_address_is_reused_after_the_quarantine_lowest_first(reg: Registry) -> None:
    net, sub = network(reg, "10.2.0.0/24")
    vms = [reg.create_instance({"name": f"vm{i}", "network_id": net["id"]}) for i in range(4)]
    assert [ip_of(v["ports"][0]) for v in vms] == [f"10.2.0.{i}" for i in (2, 3, 4, 5)]
    reg.delete_instance(vms[1]["id"])  # 10.2.0.3
    assert count(reg, ip_released) == 1 and state_problems(reg, sub) == []
    assert instance_ip(reg, net) == "10.2.0.6"  # 10.2.0.3 is held aside
    age_releases(reg, reg.reuse.window_s + 0.5)
    assert instance_ip(reg, net) == "10.2.0.3"  # out of quarantine: the lowest again
    assert count(reg, ip_released) == 0 and state_problems(reg, sub) == []
    # an asked-for released address is given at once (its answer waits: registry/reuse.py)
    reg.delete_instance(vms[2]["id"])  # 10.2.0.4
    assert instance_ip(reg, net, fixed_ip="10.2.0.4") == "10.2.0.4"
    assert count(reg, ip_released) == 0 and state_problems(reg, sub) == []


def test_a_dhcp_port_avoids_a_just_released_address(reg: Registry) -> None:
    net = reg.create_network({"name": "d"})
    sub = reg.create_subnet({"network_id": net["id"], "cidr": "10.3.0.0/24"})
    dhcp = reg.list_ports({"network_id": net["id"], "device_owner": "network:dhcp"})["ports"]
    assert [ip_of(p) for p in dhcp] == ["10.3.0.2"]  # the reserved DHCP port
    vm = reg.create_instance({"name": "vm", "network_id": net["id"]})
    assert ip_of(vm["ports"][0]) == "10.3.0.3"
    reg.delete_instance(vm["id"])
    with reg.store.write() as tx:  # a DHCP node's new port, as the scheduler makes it
        row = tx.conn.execute(sa.select(networks).where(networks.c.id == net["id"])).one()
        subs = list(tx.conn.execute(sa.select(subnets).where(subnets.c.id == sub["id"])))
        port = dhcp_ports.create(tx, row, subs, "dhcp-test")
    assert port is not None and ip_of(port) == "10.3.0.4"
    assert state_problems(reg, sub) == []


def test_past_the_lookahead_a_full_range_still_finds_a_released_address_out_of_quarantine(
        reg: Registry) -> None:
    n = ipalloc.RELEASED_LOOKAHEAD + 10
    last = ipaddress.ip_address("10.9.0.1") + n + 1
    net, sub = network(reg, "10.9.0.0/24",
                       allocation_pools=[{"start": "10.9.0.2", "end": str(last)}])
    made = [reg.create_port({"network_id": net["id"]}) for _ in range(n + 1)]
    assert ip_of(made[-1]) == str(last)  # the range is used up
    reg.delete_port(made[-1]["id"])
    age_releases(reg, reg.reuse.window_s + 0.5)  # the highest is out of quarantine
    for port in made[:n]:  # more than the lookahead, all below it, all quarantined
        reg.delete_port(port["id"])
    hold = AckHold()
    token = ACK_HOLD.set(hold)
    try:
        got = reg.create_port({"network_id": net["id"]})
    finally:
        ACK_HOLD.reset(token)
    assert ip_of(got) == str(last) and hold.seconds == 0  # not a held reuse
    assert state_problems(reg, sub) == []


def test_a_full_subnet_is_a_409_naming_it(reg: Registry) -> None:
    net, sub = network(reg, "10.4.0.0/29",
                       allocation_pools=[{"start": "10.4.0.2", "end": "10.4.0.3"}])
    assert [instance_ip(reg, net) for _ in range(2)] == ["10.4.0.2", "10.4.0.3"]
    with pytest.raises(Conflict) as exc:
        reg.create_instance({"name": "vm", "network_id": net["id"]})
    assert exc.value.status == 409
    assert sub["id"] in exc.value.reason and "10.4.0.0/29" in exc.value.reason
    with pytest.raises(Conflict, match=f"subnet {sub['id']} \\(10.4.0.0/29\\)"):
        reg.create_port({"network_id": net["id"], "fixed_ips": [{"subnet_id": sub["id"]}]})
    assert state_problems(reg, sub) == []


def test_ipv6_static_subnet_and_subnet_and_network_deletes_drop_the_state(
        reg: Registry) -> None:
    net, sub = network(reg, "fd00:9::/64")
    assert [instance_ip(reg, net) for _ in range(2)] == ["fd00:9::2", "fd00:9::3"]
    assert instance_ip(reg, net, fixed_ip="fd00:9::ffff:1") == "fd00:9::ffff:1"
    assert state_problems(reg, sub) == []
    assert count(reg, ip_ranges) == 2
    for vm in reg.list_instances({})["instances"]:
        reg.delete_instance(vm["id"])
    assert count(reg, ip_released) == 3
    reg.delete_subnet(sub["id"])
    net2, _ = network(reg, "10.5.0.0/24")
    instance_ip(reg, net2)
    for vm in reg.list_instances({})["instances"]:
        reg.delete_instance(vm["id"])
    reg.delete_network(net2["id"])
    assert [count(reg, t) for t in (ip_alloc, ip_ranges, ip_released)] == [0, 0, 0]
    reg.delete_network(net["id"])


def test_concurrent_registries_on_one_database_give_distinct_addresses(url: str) -> None:
    with registry(url) as first:
        net, sub = network(first, "10.6.0.0/16")
        errors: list[BaseException] = []
        got: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(4)

        def creates(reg: Registry) -> None:
            try:
                start.wait(60)
                for _ in range(15):
                    ip = instance_ip(reg, net)
                    with lock:
                        got.append(ip)
            except BaseException as exc:
                errors.append(exc)

        with contextlib.ExitStack() as stack:  # four registries, each with its own engine
            regs = [first] + [stack.enter_context(registry(url)) for _ in range(3)]
            threads = [threading.Thread(target=creates, args=(r,)) for r in regs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        assert not errors, errors
        assert len(got) == 60 and len(set(got)) == 60
        assert sorted(got, key=ipaddress.ip_address) == [
            str(ipaddress.ip_address("10.6.0.2") + i) for i in range(60)]
        assert state_problems(first, sub) == []


def test_a_database_migrated_from_0009_allocates_only_free_addresses(url: str) -> None:
    with registry(url) as reg:
        net, sub = network(reg, "10.7.0.0/16")
        vms = [reg.create_instance({"name": f"vm{i}", "network_id": net["id"]})
               for i in range(40)]
        for ip in ("10.7.0.60", "10.7.0.61", "10.7.3.9"):
            reg.create_instance({"name": "asked", "network_id": net["id"], "fixed_ip": ip})
        for vm in vms[5:12]:
            reg.delete_instance(vm["id"])
        age_releases(reg, reg.reuse.window_s + 0.5)
        with reg.store.engine.begin() as conn:  # the schema and rows a 0009 registry had
            for table in (ip_released, ip_ranges, ip_alloc):
                conn.execute(sa.text(f"DROP TABLE {table.name}"))
            conn.execute(sa.text("UPDATE alembic_version SET version_num = '0009'"))
            used = list(conn.execute(sa.select(port_ips.c.ip_address)).scalars())
    store = Store(url)
    try:
        assert store.create_schema() == ("0009", migrations.head())
        reg = Registry(store)
        assert state_problems(reg, sub) is None  # built by the first pick
        got = [instance_ip(reg, net) for _ in range(30)]
        pool = [ipam.Pool(ipaddress.ip_address("10.7.0.2"), ipaddress.ip_address("10.7.255.254"))]
        want: list[str] = []
        for _ in range(30):
            want.append(str(ipam.first_free_of(pool, [*used, *want, "10.7.0.1"])))
        assert got == want
        assert not set(got) & set(used)
        assert state_problems(reg, sub) == []
    finally:
        store.dispose()


def test_an_address_taken_behind_the_state_s_back_is_never_handed_out(
        reg: Registry, caplog: pytest.LogCaptureFixture) -> None:
    net, sub = network(reg, "10.8.0.0/24")
    first = reg.create_port({"network_id": net["id"]})
    assert ip_of(first) == "10.8.0.2"
    with reg.store.engine.begin() as conn:  # a write that went around ipalloc
        conn.execute(port_ips.insert().values(port_id=first["id"], subnet_id=sub["id"],
                                              network_id=net["id"], ip_address="10.8.0.3"))
    assert state_problems(reg, sub) != []
    assert ip_of(reg.create_port({"network_id": net["id"]})) == "10.8.0.4"
    assert "registry.ip_state_repaired" in caplog.text
    assert state_problems(reg, sub) == []
    with reg.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ports)).scalar_one() == 2


def test_a_take_at_commit_that_finds_its_address_held_is_made_again_checked(
        reg: Registry, caplog: pytest.LogCaptureFixture) -> None:
    # PostgreSQL takes a create's automatic address with its commit, trusting the state it
    # read after its revision bump; a write that went around the state makes that commit
    # fail on UNIQUE (network_id, ip_address): the create is made again, once, its take
    # checked (which repairs the state), and only that second write is kept
    caplog.set_level("WARNING", logger="openimds.registry")
    net, sub = network(reg, "10.8.1.0/24")
    first = reg.create_instance({"name": "a", "network_id": net["id"]})
    assert ip_of(first["ports"][0]) == "10.8.1.2"
    with reg.store.engine.begin() as conn:  # two writes that went around ipalloc
        for ip in ("10.8.1.3", "10.8.1.5"):
            conn.execute(port_ips.insert().values(
                port_id=first["ports"][0]["id"], subnet_id=sub["id"], network_id=net["id"],
                ip_address=ip))
    rev = int(reg.health()["revision"])
    vm = reg.create_instance({"name": "b", "network_id": net["id"]})
    assert ip_of(vm["ports"][0]) == "10.8.1.4"
    port = reg.create_port({"network_id": net["id"]})
    assert ip_of(port) == "10.8.1.6"
    assert int(reg.health()["revision"]) == rev + 2  # each create committed once
    retried = caplog.text.count("registry.ip_take_retried")
    assert retried == (2 if reg.store.backend == "postgresql" else 0)
    assert caplog.text.count("registry.ip_state_repaired") == 2
    assert state_problems(reg, sub) == []
    with reg.store.read() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ports)).scalar_one() == 3
        names = [r.name for r in conn.execute(sa.select(instances.c.name))]
    assert sorted(names) == ["a", "b"]


def test_a_network_of_several_subnets_picks_from_each_as_its_read_found_them(
        reg: Registry) -> None:
    # PostgreSQL reads every subnet's pick with the network (one round trip): each pick
    # must still be its own subnet's, a full subnet must give way to the next, and a second
    # port must not be handed what the first one's read saw
    net = reg.create_network({"name": "multi"})
    small = reg.create_subnet({"network_id": net["id"], "cidr": "10.11.0.0/29",
                               "enable_dhcp": False,
                               "allocation_pools": [{"start": "10.11.0.2",
                                                     "end": "10.11.0.2"}]})
    big = reg.create_subnet({"network_id": net["id"], "cidr": "10.12.0.0/24",
                             "enable_dhcp": False})
    v6 = reg.create_subnet({"network_id": net["id"], "cidr": "fd00:11::/64",
                            "enable_dhcp": False})
    # the subnets' order (created_at, then id: these may share a created_at)
    with reg.store.read() as conn:
        order = list(conn.execute(sa.select(subnets.c.id).where(
            subnets.c.network_id == net["id"], subnets.c.ip_version == 4)
            .order_by(subnets.c.created_at, subnets.c.id)).scalars())
    free = {small["id"]: ["10.11.0.2"], big["id"]: [f"10.12.0.{i}" for i in range(2, 6)]}

    def ips(port: dict[str, Any]) -> list[tuple[str, str]]:
        return [(f["subnet_id"], f["ip_address"]) for f in port["fixed_ips"]]

    def want(n6: int) -> list[tuple[str, str]]:
        sid = next(s for s in order if free[s])
        return [(sid, free[sid].pop(0)), (v6["id"], f"fd00:11::{n6}")]

    a = reg.create_instance({"name": "a", "network_id": net["id"]})["ports"][0]
    assert ips(a) == want(2)
    b = reg.create_port({"network_id": net["id"]})
    assert ips(b) == want(3)
    c = reg.create_instance({"name": "c", "network_id": net["id"]})["ports"][0]
    assert ips(c) == want(4)
    reg.delete_port(b["id"])
    age_releases(reg, reg.reuse.window_s + 0.5)
    d = reg.create_port({"network_id": net["id"]})  # the released ones, lowest first
    assert ips(d) == ips(b)
    for sub in (small, big, v6):
        assert state_problems(reg, sub) == []


def test_concurrent_creates_and_deletes_never_share_an_address(
        url: str, caplog: pytest.LogCaptureFixture) -> None:
    # four registries (engines) with two threads each: automatic instance and port creates,
    # every other one deleted again (its address released, then quarantined), all on one
    # subnet. A pick read before the state row's lock (PostgreSQL reads it with the network)
    # sees another write's address as free: its take then finds it gone and repairs, so
    # not one repair may happen here
    caplog.set_level("WARNING", logger="openimds.registry.ipalloc")
    with registry(url) as first:
        net, sub = network(first, "10.13.0.0/22")
        errors: list[BaseException] = []
        live: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(8)

        def work(reg: Registry, me: int) -> None:
            try:
                start.wait(60)
                for i in range(10):
                    if (me + i) % 2:
                        made = reg.create_instance({"name": f"vm{me}-{i}",
                                                    "network_id": net["id"]})
                        ip, gone = ip_of(made["ports"][0]), (
                            lambda m=made: reg.delete_instance(m["id"]))
                    else:
                        port = reg.create_port({"network_id": net["id"]})
                        ip, gone = ip_of(port), (lambda p=port: reg.delete_port(p["id"]))
                    if i % 2:
                        gone()
                    else:
                        with lock:
                            live.append(ip)
            except BaseException as exc:
                errors.append(exc)

        with contextlib.ExitStack() as stack:
            regs = [first] + [stack.enter_context(registry(url)) for _ in range(3)]
            threads = [threading.Thread(target=work, args=(regs[i % 4], i)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)
        assert not errors, errors
        assert len(live) == 40 and len(set(live)) == 40
        with first.store.read() as conn:
            held = list(conn.execute(sa.select(port_ips.c.ip_address)).scalars())
        assert sorted(held) == sorted(live)
        assert state_problems(first, sub) == []
        assert "registry.ip_state_repaired" not in caplog.text
