"""What a create costs PostgreSQL, seen from the server: a PostgreSQL of the test's own whose
log has every statement any backend ran (with its pid), its pg_stat_activity (which backends
exist and which ran something) and each session's pg_prepared_statements (how often each
plan ran). A create's tail on PostgreSQL was round trips and cold backends
(docs/benchmarks.md, "Create p99"), so these fail if the warm-up, the warming of a replaced
connection, LIFO reuse of the hot backend, the missing pre-ping or the kept prepared
statements regress. Counts, never timings."""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import selectors
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from openimds.registry.service import Registry
from openimds.registry.store import THREADS, Store
from tests.support import wait_for

pytestmark = pytest.mark.postgres

# What the server runs for a create on a warm connection: BEGIN, 8 statements (the change
# rows' two-row executemany is two) and COMMIT; 17 at 4a9ce89, 13 since fa16537, 396121b
# and 2e25eb3, 12 with the network and its subnets one read, 11 with the reuse hold's
# check asked by the network read and the take, 10 with the pick read with the network.
CREATE_STATEMENTS = 10
# ... in round trips: 16 at 4a9ce89, 12 since 2e25eb3, 8 with the commit's pipeline, 7 with
# the network and its subnets one read, 6 with the hold's check folded into them, 5 with
# the pick read with the network, 3 with BEGIN, the bump and that read one pipeline, 2
# with the address's take in the commit's pipeline.
CREATE_ROUND_TRIPS = 2


class _StatPostgres:
    """initdb in a temp dir, Unix socket only, logging every statement (the shared test
    server's log is everyone's). fsync off: nothing here measures durability."""

    def __init__(self) -> None:
        self.bin = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="openimds-pgstat-"))
        user = pwd.getpwnam("postgres")
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        self.admin: sa.Engine | None = None

    def _run(self, *argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True,
                       capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U",
                  "postgres")
        # every statement a client sends is a line of the server's log, prefixed with its
        # backend's pid and database: simple queries (BEGIN, COMMIT, a pre-ping's ";") as
        # "statement:", prepared or parameterised ones as "execute"
        opts = (f"-k {self.dir} -p 5432 -c listen_addresses='' -c fsync=off "
                "-c log_statement=all -c log_line_prefix='%p %d ' "
                "-c log_parameter_max_length=0")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                  str(self.log), "-o", opts, "start")
        self._run(str(self.bin / "psql"), "-h", str(self.dir), "-d", "postgres", "-qc",
                  "CREATE ROLE root SUPERUSER LOGIN")
        self.admin = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT",
                                      poolclass=sa.pool.NullPool)

    def statements(self, db: str, since: int) -> list[tuple[int, str]]:
        """(backend pid, statement) for each statement run on database `db`, in order, from
        log offset `since` on (continuation lines of a statement are skipped)."""
        out: list[tuple[int, str]] = []
        ours = False  # whether the last prefixed line was one of ours (for continuations)
        with self.log.open("rb") as f:
            f.seek(since)
            for line in f.read().decode(errors="replace").splitlines():
                pid, _, rest = line.partition(" ")
                name, _, rest = rest.partition(" ")
                if not pid.isdigit() or not rest.startswith(("LOG:", "DETAIL:", "ERROR:",
                                                              "STATEMENT:", "WARNING:",
                                                              "FATAL:")):
                    if ours:  # the next line of a statement of several
                        out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
                    continue
                ours = name == db and rest.startswith(("LOG:  statement: ", "LOG:  execute "))
                if not ours:
                    continue
                if rest.startswith("LOG:  statement: "):
                    out.append((int(pid), rest[len("LOG:  statement: "):]))
                else:  # "execute <name>: <statement>"
                    out.append((int(pid), rest[len("LOG:  execute "):].partition(": ")[2]))
        return out

    def url(self, db: str) -> str:
        return f"postgresql+psycopg://root@/{db}?host={self.dir}"

    def sql(self, text: str, **params: Any) -> list[Any]:
        """Run on the admin database (its own statements are counted under its own dbid)."""
        assert self.admin is not None
        with self.admin.connect() as conn:
            res = conn.execute(sa.text(text), params)
            return list(res.all()) if res.returns_rows else []

    def stop(self) -> None:
        if self.admin is not None:
            self.admin.dispose()
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            # pg_ctl signals the postmaster named by the data dir's postmaster.pid
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                      "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def statpg() -> Iterator[_StatPostgres]:
    pg = _StatPostgres()
    try:
        pg.start()
        yield pg
    finally:
        pg.stop()


class _Db:
    """A database of its own with one network and subnet made, and a fresh store on it
    (an empty statement cache and pool, as at start-up) with the warm-up run."""

    def __init__(self, pg: _StatPostgres) -> None:
        self.pg = pg
        self.name = "t_" + uuid.uuid4().hex[:12]
        pg.sql(f"CREATE DATABASE {self.name}")
        self.oid = int(pg.sql("SELECT oid FROM pg_database WHERE datname = :d",
                              d=self.name)[0][0])
        setup = Store(pg.url(self.name))
        setup.create_schema()
        reg = Registry(setup)
        self.net = reg.create_network({"name": "n"})["id"]
        reg.create_subnet({"name": "s", "network_id": self.net, "cidr": "10.0.0.0/22"})
        setup.dispose()
        self.store = Store(pg.url(self.name))
        self.reg = Registry(self.store)
        # statements the store sent, as the server runs them: an executemany's rows are
        # one pipelined round trip but one execution each
        self.sent: list[str] = []
        self.mark = 0

        @event.listens_for(self.store.engine, "before_cursor_execute")
        def _sent(conn: Any, cursor: Any, statement: str, params: Any, context: Any,
                  executemany: bool) -> None:
            self.sent.extend([_as_server(_norm(statement))] * (len(params) if executemany
                                                               else 1))

        self.reg.warm_up()

    def create(self, i: int) -> str:
        return str(self.reg.create_instance({"name": f"vm{i}", "network_id": self.net})["id"])

    def backends(self) -> dict[int, tuple[Any, Any]]:
        """pid -> (backend_start, query_start) of every client backend on this database."""
        rows = self.pg.sql("SELECT pid, backend_start, query_start FROM pg_stat_activity "
                           "WHERE datid = :o AND backend_type = 'client backend'", o=self.oid)
        return {int(r[0]): (r[1], r[2]) for r in rows}

    def reset(self) -> None:
        """Count from here: the statements sent and those the server ran."""
        self.mark = self.pg.log.stat().st_size
        self.sent.clear()

    def ran(self) -> list[tuple[int, str]]:
        """(pid, statement) the server ran on this database since `reset`."""
        return [(pid, _norm(q)) for pid, q in self.pg.statements(self.name, self.mark)]

    def dispose(self) -> None:
        self.store.dispose()
        self.pg.sql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")


def _starts(backends: dict[int, tuple[Any, Any]]) -> dict[int, Any]:
    """pid -> backend_start: a backend replaced under the same pid still differs."""
    return {pid: start for pid, (start, _) in backends.items()}


def _norm(sql: str) -> str:
    return " ".join(sql.split())


def _as_server(sql: str) -> str:
    """A statement as SQLAlchemy handed it to psycopg (%(name)s placeholders) as the server
    holds it prepared: psycopg numbers the names $1, $2... in order of first use."""
    numbers: dict[str, int] = {}

    def number(m: re.Match[str]) -> str:
        return f"${numbers.setdefault(m.group(1), len(numbers) + 1)}"

    return re.sub(r"%\((\w+)\)s", number, sql).replace("%%", "%")


def _raw(conn: sa.Connection) -> Any:
    raw = conn.connection.dbapi_connection
    assert raw is not None
    return raw


def _session(conn: sa.Connection) -> tuple[int, dict[str, int]]:
    """A pooled connection's backend pid and, per statement it holds prepared, how many times
    the server ran it (generic + custom plans). Read straight through psycopg, unprepared
    and outside any transaction, so the reading adds nothing to what it reads."""
    raw = _raw(conn)
    pid = int(raw.execute("SELECT pg_backend_pid()", prepare=False).fetchone()[0])
    rows = raw.execute("SELECT statement, generic_plans + custom_plans "
                       "FROM pg_prepared_statements", prepare=False).fetchall()
    return pid, {_norm(s): int(n) for s, n in rows}


@pytest.fixture
def db(statpg: _StatPostgres) -> Iterator[_Db]:
    d = _Db(statpg)
    try:
        yield d
    finally:
        d.dispose()


def test_the_warm_up_opens_one_backend_per_thread_each_holding_a_create_prepared(
        db: _Db) -> None:
    """Before any request: one server backend per registry thread, every one of them the
    pool's, and every one already holding prepared each statement a create sends."""
    backends = db.backends()
    assert len(backends) == THREADS == db.store.warm_connections
    db.sent.clear()
    db.create(0)
    create = set(db.sent)
    held = [db.store.engine.connect() for _ in range(THREADS)]
    try:
        sessions = [_session(c) for c in held]
    finally:
        for c in held:
            c.close()
    assert {pid for pid, _ in sessions} == set(backends)
    for pid, prepared in sessions:
        assert create <= set(prepared), (pid, create - set(prepared))
    assert db.backends().keys() == backends.keys()  # the create opened none


def test_a_create_is_its_own_statements_prepared_on_the_hot_backend(db: _Db) -> None:
    """Creates one after another: every statement runs on the one backend used last (LIFO)
    and is the execution of a plan the warm-up prepared (none prepared on the way); the
    server runs what the store sent, COMMIT included, and nothing else (no pre-ping, no
    SET), and no more statements per create than today."""
    n = 6
    with db.store.engine.connect() as c:
        hot, before = _session(c)
    backends = db.backends()
    mark = db.pg.sql("SELECT now()")[0][0]
    db.reset()
    for i in range(n):
        db.create(i)
    sent, ran = list(db.sent), db.ran()
    with db.store.engine.connect() as c:
        pid, after = _session(c)
    assert pid == hot
    moved = {p for p, (_, q) in db.backends().items() if q is not None and q > mark}
    assert moved == {hot}, moved  # the other warm backends stayed idle
    assert _starts(db.backends()) == _starts(backends)  # no backend opened or replaced
    # every statement sent ran as a prepared plan, on the hot backend: no new preparations
    assert set(after) == set(before)
    assert sum(after[s] - before[s] for s in after) == len(sent)
    # the server ran exactly that (the COMMIT too is the store's, sent in the pipeline)
    assert {p for p, _ in ran} == {hot}
    assert [q for _, q in ran] == sent
    assert sum(q == "COMMIT" for q in sent) == n
    assert len(ran) <= CREATE_STATEMENTS * n, ran


def test_a_feed_read_is_one_statement(db: _Db) -> None:
    """`changes` is BEGIN, one SELECT (the window and the page together), COMMIT."""
    db.create(0)
    db.reset()
    for _ in range(4):
        db.reg.changes(0)
    ran = [q.split()[0] for _, q in db.ran()]
    assert ran == ["BEGIN", "SELECT", "COMMIT"] * 4, ran


def test_a_replaced_connection_is_rehearsed_on_before_its_first_request(db: _Db) -> None:
    """The hot backend dies (a database restart, an admin's pg_terminate_backend): the next
    request's BEGIN finds it dead, the pool opens a new backend, and the store rehearses on
    it before the request runs there (the server sees the rehearsal's writes rolled back);
    the request and the next ones then run only prepared plans, on that one new backend."""
    with db.store.engine.connect() as c:
        hot, _ = _session(c)
    before = db.backends()
    assert db.pg.sql("SELECT pg_terminate_backend(:p)", p=hot)[0][0] is True
    wait_for(lambda: hot not in db.backends(), 10, "the terminated backend to go")
    db.reset()
    db.create(0)
    sent, ran = list(db.sent), db.ran()
    now = db.backends()
    new = set(now) - set(before)
    assert len(new) == 1 and len(now) == THREADS
    assert {p for p, _ in ran} == new
    # on it, first the rehearsal (a network made and rolled back), then the create itself
    queries = [q for _, q in ran]
    assert any(q.startswith("INSERT INTO networks") for q in queries)
    rollback = max(i for i, q in enumerate(queries) if q == "ROLLBACK")
    begin = max(i for i, q in enumerate(sent) if q == "BEGIN")  # the create's own
    # (the rehearsal ends by preparing the reads' BEGIN, outside SQLAlchemy)
    assert queries[rollback + 1:] == ["BEGIN ISOLATION LEVEL REPEATABLE READ", "COMMIT",
                                      *sent[begin:]]
    for i in (1, 2):
        with db.store.engine.connect() as c:
            pid, before_create = _session(c)
        db.reset()
        db.create(i)
        sent, ran = list(db.sent), db.ran()
        with db.store.engine.connect() as c:
            pid_after, after_create = _session(c)
        assert pid == pid_after == next(iter(new))
        assert set(after_create) == set(before_create)
        assert sum(after_create[s] - before_create[s] for s in after_create) == len(sent)
        assert ran == [(pid, q) for q in sent] and sent[-1] == "COMMIT"


def test_concurrent_requests_open_no_backend_beyond_the_warm_ones(db: _Db) -> None:
    """As many requests at once as the registry has threads: each runs on a warm backend
    (the pool keeps one per thread), none opens a new one."""
    import concurrent.futures

    before = db.backends()

    def request(i: int) -> None:
        db.reg.changes(0)  # reads are not serialized: these overlap
        db.create(i)
        db.reg.changes(0)

    with concurrent.futures.ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(request, range(THREADS * 3)))
    assert _starts(db.backends()) == _starts(before)


class _RoundTrips:
    """A Unix-socket relay in front of the server that counts round trips: a client that
    sends after the server said ReadyForQuery (the end of a simple query or of a Sync:
    psycopg waits for it) starts one; what it sends before that (a pipeline, whose
    statements the server may start answering already) belongs to the same one."""

    def __init__(self, target: Path, where: Path) -> None:
        self.target = str(target)
        self.path = where / ".s.PGSQL.5432"
        self.count = 0
        self._listen = socket.socket(socket.AF_UNIX)
        self._listen.bind(str(self.path))
        self._listen.listen(64)
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listen, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        peer: dict[socket.socket, socket.socket] = {}
        ready: dict[socket.socket, bool] = {}  # client -> ReadyForQuery since it sent
        parse: dict[socket.socket, bytes] = {}  # server -> bytes of its unfinished message
        socks: list[socket.socket] = []
        try:
            while True:
                for key, _ in sel.select():
                    s = key.fileobj
                    assert isinstance(s, socket.socket)
                    if s is self._wake_r:
                        return
                    if s.fileno() < 0:  # closed with its peer earlier in this batch
                        continue
                    if s is self._listen:
                        client, _ = self._listen.accept()
                        server = socket.socket(socket.AF_UNIX)
                        server.connect(self.target)
                        peer[client], peer[server] = server, client
                        ready[client] = True
                        parse[server] = b""
                        socks += [client, server]
                        sel.register(client, selectors.EVENT_READ, "client")
                        sel.register(server, selectors.EVENT_READ, "server")
                        continue
                    data = s.recv(65536)
                    other = peer[s]
                    if not data:
                        sel.unregister(s)
                        with contextlib.suppress(KeyError, ValueError):
                            sel.unregister(other)
                        other.close()
                        s.close()
                        continue
                    if key.data == "client":
                        if ready[s]:
                            self.count += 1
                        ready[s] = False
                    else:  # messages: a type byte, then a length that counts itself
                        buf = parse[s] + data
                        while len(buf) >= 5:
                            size = 1 + int.from_bytes(buf[1:5], "big")
                            if len(buf) < size:
                                break
                            if buf[:1] == b"Z":
                                ready[other] = True
                            buf = buf[size:]
                        parse[s] = buf
                    other.sendall(data)
        finally:
            for s in socks:
                s.close()
            sel.close()

    def close(self) -> None:
        self._wake_w.send(b"x")
        self._thread.join(10)
        self._listen.close()
        self._wake_r.close()
        self._wake_w.close()


def test_a_create_is_two_round_trips_and_a_feed_read_three(db: _Db) -> None:
    """Counted on the socket between the store and the server: one pipeline with BEGIN,
    the revision bump and the network with its subnets, each subnet's pick, the MAC check
    and the reuse hold's questions about the MAC and the network's routers; and one
    pipeline with the address's take (with the hold's question about the address), the
    port, its address, the instance, the change rows and COMMIT (12 round trips before the
    commit's pipeline, 8 before the folds, 5 before the first pipeline, 3 before the take
    went into the commit's). A feed read: BEGIN, SELECT, COMMIT. A regression here is a
    wait on the server per round trip on a busy machine."""
    where = Path(tempfile.mkdtemp(prefix="openimds-relay-"))
    relay = _RoundTrips(db.pg.dir / ".s.PGSQL.5432", where)
    store = Store(f"postgresql+psycopg://root@/{db.name}?host={where}")
    try:
        reg = Registry(store)
        reg.warm_up()
        for op, want in ((lambda i: reg.create_instance(
                {"name": f"vm{i}", "network_id": db.net}), CREATE_ROUND_TRIPS),
                         # a port alone: the same two (its rows in the commit's pipeline too;
                         # 4 before, the port and its addresses a round trip each)
                         (lambda i: reg.create_port(
                             {"name": f"p{i}", "network_id": db.net}), CREATE_ROUND_TRIPS),
                         (lambda i: reg.changes(0), 3)):
            counts = []
            for i in range(4):
                before = relay.count
                op(i)
                counts.append(relay.count - before)
            assert counts == [want] * 4, counts
    finally:
        store.dispose()
        relay.close()
        shutil.rmtree(where, ignore_errors=True)


def test_a_conflict_in_the_commit_pipeline_is_a_conflict_and_undoes_the_write(db: _Db) -> None:
    """A statement that fails inside the commit's pipeline (here a port whose id is taken)
    surfaces at its Sync as the store's Conflict; nothing of that write is kept, and the
    connection serves the next request."""
    from openimds.errors import Conflict
    from openimds.registry.store import ports

    db.create(0)
    with db.store.read() as conn:
        row = conn.execute(sa.select(ports)).first()
    assert row is not None
    rev = int(db.reg.health()["revision"])
    with db.store.engine.connect() as c:
        hot, _ = _session(c)
    with pytest.raises(Conflict, match="conflicts with an existing object"):
        with db.store.write() as tx:
            tx.later(ports.insert().inline(), {**row._asdict(), "mac_address": "fa:16:3e:0:0:1"})
            tx.change("port", "create", row.id, {})
    assert int(db.reg.health()["revision"]) == rev
    iid = db.create(1)
    assert db.reg.get_instance(iid)["name"] == "vm1"
    with db.store.engine.connect() as c:
        assert _session(c)[0] == hot


def test_a_backend_lost_in_a_writes_first_pipeline_is_replaced_and_the_write_sent_again(
        db: _Db) -> None:
    """The backend dies while it answers a write's first pipeline (BEGIN, the bump, the
    first read): psycopg sees it only at the pipeline's end, SQLAlchemy not at all. The store
    keeps that connection out of the pool and sends the write once more on a new backend,
    where it commits, once (nothing had been committed on the dead one)."""
    with db.store.engine.connect() as c:
        c.exec_driver_sql("CREATE SEQUENCE die_once")
        c.commit()
        hot, _ = _session(c)
    # sequences are not transactional: only the first sending kills its backend
    die_once = sa.text("SELECT CASE WHEN nextval('die_once') = 1 "
                       "THEN pg_terminate_backend(pg_backend_pid()) END AS killed")
    rev = int(db.reg.health()["revision"])
    with db.store.write(first=(die_once, {})) as tx:
        assert tx.first is not None and tx.first[0].killed is None  # the second sending
        tx.change("network", "create", "n-once", {})
    assert int(db.reg.health()["revision"]) == rev + 1
    with db.store.read() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM changes WHERE obj_id = 'n-once'")
                            ).scalar_one() == 1
    assert hot not in db.backends()
    with db.store.engine.connect() as c:
        assert int(c.exec_driver_sql("SELECT last_value FROM die_once").scalar_one()) == 2
    db.create(0)  # and the pool serves on


def test_a_failed_first_read_undoes_the_write_and_keeps_the_connection(db: _Db) -> None:
    """A statement of the first pipeline that fails (not the connection: here 1/0) is raised
    at the pipeline's end; the write is rolled back (no revision taken) and the same hot
    backend, out of its failed transaction, serves the next request."""
    import psycopg

    with db.store.engine.connect() as c:
        hot, _ = _session(c)
    rev = int(db.reg.health()["revision"])
    with pytest.raises(psycopg.errors.DivisionByZero):
        with db.store.write(first=(sa.text("SELECT 1 / 0 AS x"), {})) as tx:
            tx.change("network", "create", "never", {})
    assert int(db.reg.health()["revision"]) == rev
    iid = db.create(1)
    assert db.reg.get_instance(iid)["name"] == "vm1"
    with db.store.engine.connect() as c:
        assert _session(c)[0] == hot
    assert db.backends().keys() >= {hot}


def test_a_statement_due_to_be_prepared_in_a_failed_pipeline_runs_after_it(db: _Db) -> None:
    """psycopg takes a statement as prepared when it queues its PREPARE; in a pipeline that
    fails before it, the server skips that PREPARE, and the ROLLBACK that would make psycopg
    forget is ignored (the kept plans). The store forgets it then, so the statement's next
    use prepares it again instead of failing on the hot backend for good (it does without:
    prepared statement "_pg3_N" does not exist)."""
    import psycopg

    fails = sa.text("UPDATE state SET ec2_seq = ec2_seq / 0 WHERE id = 1")
    due = sa.text("UPDATE state SET ec2_seq = ec2_seq + 0 WHERE id = 1")
    with db.store.engine.connect() as c:
        hot, _ = _session(c)
        threshold = _raw(c).prepare_threshold
    assert threshold is not None

    def write(*statements: Any) -> None:
        with db.store.write() as tx:
            for st in statements:
                tx.later(st, {})
            tx.change("network", "update", "n-due", {})

    for _ in range(threshold):  # `due` seen as often as psycopg waits before preparing
        write(due)
    # raised by psycopg at the pipeline's end, or wrapped by SQLAlchemy if it came sooner
    with pytest.raises((psycopg.errors.DivisionByZero, sa.exc.DataError)):
        write(fails, due)  # its PREPARE queued behind the failure
    write(due)  # forgotten, so counted afresh: prepared once due again
    with db.store.engine.connect() as c:
        assert _norm(str(due)) not in _session(c)[1]
    for _ in range(threshold):
        write(due)
    with db.store.engine.connect() as c:
        pid, prepared = _session(c)
    assert pid == hot
    assert prepared.get(_norm(str(due))) == 1
