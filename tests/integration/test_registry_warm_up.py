"""Start-up warm-up: `Store.rehearsal` undoes everything done inside it, and
`Registry.warm_up` leaves the first real create nothing to compile. Real SQLite/PostgreSQL."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine.interfaces import CacheStats

from openimds.registry.app import settle_heap
from openimds.registry.service import Registry
from openimds.registry.store import (
    THREADS,
    Store,
    changes,
    instances,
    networks,
    retired_instances,
)
from tests.support import postgres_database


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    with contextlib.ExitStack() as stack:
        url = (stack.enter_context(postgres_database()) if request.param == "postgres"
               else f"sqlite:///{tmp_path / 'registry.sqlite'}")
        store = Store(url)
        store.create_schema()
        stack.callback(store.dispose)
        yield store


@pytest.fixture
def pg_store() -> Iterator[Store]:
    with postgres_database() as url:
        store = Store(url)
        store.create_schema()
        try:
            yield store
        finally:
            store.dispose()


def _counts(store: Store) -> dict[str, int]:
    with store.read() as conn:
        return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t))
                            .scalar_one())
                for t in (networks, instances, changes, retired_instances)}


def test_a_rehearsal_sees_its_own_writes_and_commits_none(store: Store) -> None:
    reg = Registry(store)
    net = reg.create_network({"name": "kept"})
    rev, before = int(reg.health()["revision"]), _counts(store)
    with store.rehearsal():
        gone = reg.create_network({"name": "rehearsed"})
        reg.create_subnet({"name": "s", "network_id": gone["id"], "cidr": "10.0.0.0/24"})
        iid = reg.create_instance({"name": "vm", "network_id": gone["id"]})["id"]
        assert reg.get_instance(iid)["name"] == "vm"  # reads inside see the writes
        assert int(reg.health()["revision"]) > rev
        reg.delete_instance(iid)
    assert int(reg.health()["revision"]) == rev
    assert _counts(store) == before
    assert reg.changes(rev)["changes"] == []
    assert [n["name"] for n in reg.list_networks({})["networks"]] == ["kept"]
    # the store writes normally afterwards, with the next revision
    reg.create_subnet({"name": "s", "network_id": net["id"], "cidr": "10.0.0.0/24"})
    vm = reg.create_instance({"name": "after", "network_id": net["id"]})
    assert [c["id"] for c in reg.changes(rev)["changes"]
            if c["kind"] == "instance"] == [vm["id"]]


def test_a_failed_write_inside_a_rehearsal_undoes_only_itself(store: Store) -> None:
    reg = Registry(store)
    with store.rehearsal():
        net = reg.create_network({"name": "n"})
        with pytest.raises(Exception, match="not found"):
            reg.create_instance({"name": "vm", "network_id": "no-such-network"})
        assert reg.get_network(net["id"])["name"] == "n"  # the savepoint, not the rehearsal
    assert reg.list_networks({})["networks"] == []


def test_after_warm_up_a_create_compiles_no_statement(store: Store) -> None:
    reg = Registry(store)
    net = reg.create_network({"name": "n"})
    reg.create_subnet({"name": "s", "network_id": net["id"], "cidr": "10.0.0.0/24"})
    router = reg.create_router({"name": "r"})
    reg.add_interface(router["id"], {"subnet_id": reg.get_network(net["id"])["subnets"][0]})
    rev, before = int(reg.health()["revision"]), _counts(store)
    # a fresh store on the same database: an empty statement cache, as at start-up
    fresh = Store(str(store.url.render_as_string(hide_password=False)))
    try:
        cold = Registry(fresh)
        cold.warm_up()
        assert int(cold.health()["revision"]) == rev and _counts(fresh) == before
        misses: list[str] = []

        @event.listens_for(fresh.engine, "after_cursor_execute")
        def _seen(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                  executemany: bool) -> None:
            if context.cache_hit is CacheStats.CACHE_MISS:
                misses.append(statement.split("\n")[0])

        iid = cold.create_instance({"name": "vm", "network_id": net["id"]})["id"]
        cold.changes(rev)
        cold.view(iid)
        cold.delete_instance(iid)
        assert misses == []
    finally:
        fresh.dispose()


def test_after_warm_up_taking_a_released_address_compiles_no_statement(store: Store) -> None:
    """A subnet whose ranges are used up hands out an address a port gave back (a look
    through the releases, and their DELETE): the first such create after start-up compiled
    both (seen in scale_bench's trace under load); the warm-up now rehearses it."""
    reg = Registry(store)
    net = reg.create_network({"name": "n"})
    reg.create_subnet({"name": "s", "network_id": net["id"], "cidr": "10.0.0.0/24",
                       "enable_dhcp": False,  # no DHCP port to take the one address
                       "allocation_pools": [{"start": "10.0.0.9", "end": "10.0.0.9"}]})
    fresh = Store(str(store.url.render_as_string(hide_password=False)))
    try:
        cold = Registry(fresh)
        cold.warm_up()
        misses: list[str] = []

        @event.listens_for(fresh.engine, "after_cursor_execute")
        def _seen(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                  executemany: bool) -> None:
            if context.cache_hit is CacheStats.CACHE_MISS:
                misses.append(statement.split("\n")[0])

        first = cold.create_instance({"name": "vm", "network_id": net["id"]})
        cold.delete_instance(first["id"])
        again = cold.create_instance({"name": "vm2", "network_id": net["id"]})
        # the released address, taken again
        assert again["ports"][0]["fixed_ips"] == first["ports"][0]["fixed_ips"]
        assert misses == []
    finally:
        fresh.dispose()


def test_after_warm_up_every_pooled_connection_is_warm(store: Store) -> None:
    """PostgreSQL: a new connection's first create paid ~6 ms more (connect, its backend's
    cold catalog caches and foreign-key check plans), and the warm-up used only one. Now a
    create through each connection the pool keeps (one per registry thread) opens none,
    compiles nothing and runs on a connection the warm-up rehearsed on."""
    reg = Registry(store)
    net = reg.create_network({"name": "n"})
    reg.create_subnet({"name": "s", "network_id": net["id"], "cidr": "10.0.0.0/24"})
    fresh = Store(str(store.url.render_as_string(hide_password=False)))
    connects: list[int] = []
    carried: set[int] = set()  # the DBAPI connections that ran a statement
    misses: list[str] = []

    @event.listens_for(fresh.engine, "connect")
    def _connected(dbapi_conn: Any, _record: Any) -> None:
        connects.append(id(dbapi_conn))

    @event.listens_for(fresh.engine, "after_cursor_execute")
    def _ran(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
             executemany: bool) -> None:
        carried.add(id(conn.connection.dbapi_connection))
        if context.cache_hit is CacheStats.CACHE_MISS:
            misses.append(statement.split("\n")[0])

    try:
        cold = Registry(fresh)
        cold.warm_up()
        n = fresh.warm_connections
        assert n == (THREADS if store.backend == "postgresql" else 1)
        rehearsed = set(carried)
        assert len(connects) == n and set(connects) == rehearsed
        assert fresh.engine.pool.checkedin() == n  # type: ignore[attr-defined]
        connects.clear()
        # Check out every pooled connection, then give back one at a time: the create
        # can only run on that one.
        held = [fresh.engine.connect() for _ in range(n)]
        for i in range(n):
            target = id(held[i].connection.dbapi_connection)
            held[i].close()
            carried.clear()
            misses.clear()
            iid = cold.create_instance({"name": f"vm{i}", "network_id": net["id"]})["id"]
            cold.changes(0)
            cold.view(iid)
            assert carried == {target} and misses == [] and connects == []
            held[i] = fresh.engine.connect()
        assert {id(h.connection.dbapi_connection) for h in held} == rehearsed
        if store.backend == "sqlite":
            # a connection beyond the warmed one is used as it is: SQLite's first-use cost
            # is the engine's compiles, and a rehearsal would hold the write lock ~20 ms
            carried.clear()
            ran: list[str] = []
            event.listen(fresh.engine, "before_cursor_execute",
                         lambda *a: ran.append(str(a[2]).split()[0]))
            cold.health()
            assert len(connects) == 1 and "INSERT" not in ran and len(ran) <= 3, ran
        for h in held:
            h.close()
    finally:
        fresh.dispose()


def _prepared(conn: Any) -> int:
    """Statements prepared server-side in this connection's session."""
    return int(conn.exec_driver_sql("SELECT count(*) FROM pg_prepared_statements").scalar())


@pytest.mark.postgres
def test_the_warm_up_leaves_what_a_create_runs_prepared(pg_store: Store) -> None:
    """psycopg prepares a statement on its 5th run on a connection (a round trip more, then
    ~1 ms less per create), and forgot every plan at each ROLLBACK, the rehearsal's
    included. After the warm-up every connection holds the create's statements prepared:
    repeated creates past the threshold prepare nothing more, and a failed request (a
    rollback) keeps them."""
    reg = Registry(pg_store)
    net = reg.create_network({"name": "n"})
    reg.create_subnet({"name": "s", "network_id": net["id"], "cidr": "10.0.0.0/24"})
    pg_store.dispose()
    fresh = Store(str(pg_store.url.render_as_string(hide_password=False)))
    try:
        cold = Registry(fresh)
        cold.warm_up()
        held = [fresh.engine.connect() for _ in range(fresh.warm_connections)]
        counts = [_prepared(h) for h in held]
        assert min(counts) >= 20, counts
        for h in held[1:]:
            h.close()
        only = held[0]
        only.commit()
        only.close()  # LIFO: the next checkouts get this one back
        for i in range(7):
            iid = cold.create_instance({"name": f"vm{i}", "network_id": net["id"]})["id"]
            cold.changes(0)
            cold.delete_instance(iid)
        with pytest.raises(Exception, match="not found"):
            cold.create_instance({"name": "vm", "network_id": "no-such-network"})
        with fresh.engine.connect() as again:
            assert _prepared(again) == counts[0]
            assert again.connection.dbapi_connection is not None
            names = again.connection.dbapi_connection._prepared._names  # type: ignore[attr-defined]
            assert len(names) == counts[0]  # psycopg still knows them all
    finally:
        fresh.dispose()


@pytest.mark.postgres
def test_a_connection_the_database_dropped_is_replaced_and_warmed(pg_store: Store) -> None:
    """No pre-ping: the store's BEGIN finds a dead connection, which is replaced and the
    BEGIN sent again, and the replacement is rehearsed on before its first request (cold,
    it paid the first-use cost, and the pool used to hand it out as it was)."""
    reg = Registry(pg_store)
    net = reg.create_network({"name": "n"})
    reg.create_subnet({"name": "s", "network_id": net["id"], "cidr": "10.0.0.0/24"})
    fresh = Store(str(pg_store.url.render_as_string(hide_password=False)))
    try:
        cold = Registry(fresh)
        cold.warm_up()
        with fresh.engine.connect() as c:
            pids = [int(c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())]
            c.commit()
        with pg_store.engine.connect() as admin:
            assert admin.exec_driver_sql(
                f"SELECT pg_terminate_backend({pids[0]})").scalar_one() is True
            admin.commit()
        misses: list[str] = []

        @event.listens_for(fresh.engine, "after_cursor_execute")
        def _ran(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                 executemany: bool) -> None:
            if context.cache_hit is CacheStats.CACHE_MISS:
                misses.append(statement.split("\n")[0])

        iid = cold.create_instance({"name": "vm", "network_id": net["id"]})["id"]
        assert cold.get_instance(iid)["name"] == "vm"
        with fresh.engine.connect() as c:
            now = int(c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
            assert now != pids[0]
            assert c.info.get("openimds_warm") is True and _prepared(c) >= 20
            c.commit()
        assert misses == []
    finally:
        fresh.dispose()


def test_settle_heap_freezes_what_start_up_made() -> None:
    made = [[i] for i in range(1000)]  # objects the collector tracks
    try:
        settle_heap()
        assert gc.get_freeze_count() >= len(made)
    finally:
        gc.unfreeze()
