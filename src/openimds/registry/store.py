"""The registry's storage: SQLAlchemy Core tables and one transaction discipline.

- SQLite (default, ``sqlite:///$state_path/registry.sqlite``): WAL journal, foreign keys on,
  ``BEGIN IMMEDIATE`` for writes so a writer holds the lock from its first statement.
  ``[registry] sqlite_synchronous`` (default ``full``): FULL fsyncs every commit, so neither a
  kill -9 nor a power cut loses an acknowledged write; NORMAL fsyncs only at WAL checkpoints:
  a kill -9 of the registry still loses nothing (the commit is in the WAL file, in the OS's
  page cache), a power cut or kernel crash may lose the last commits (never corrupts).
- PostgreSQL (``postgresql+psycopg://`` or ``postgresql://``): every write first bumps the one
  ``state`` row, which row-locks it, so writers from any number of processes are serialized;
  ``UNIQUE (network_id, ip_address)`` on fixed IPs is the backstop against duplicate IPs.
  One pooled connection per registry thread (`THREADS`), each warmed at start-up and again
  whenever it is replaced. Round trips are what a request waits for on a busy machine, so
  none is spent on bookkeeping: the store sends BEGIN itself (autocommit connections, as on
  SQLite), and that BEGIN is the liveness check (no pre-ping; a dead connection is replaced
  and the BEGIN retried once); the change notification rides on the revision bump.

Every write is one transaction: `Store.write()` yields a `Tx` whose revision is already bumped;
``tx.change(kind, op, id, attrs)`` appends change rows with that revision, and the changes
table is trimmed to the retention window on commit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError

try:  # a declared dependency, but a SQLite-only install opens no PostgreSQL URL anyway
    import psycopg
    from psycopg.rows import namedtuple_row
except ImportError:  # pragma: no cover
    HAVE_PSYCOPG = False
else:
    HAVE_PSYCOPG = True

from openimds.errors import ConfigError, Conflict
from openimds.log import audit

log = logging.getLogger(__name__)

metadata = sa.MetaData()

ID = sa.String(36)

state = sa.Table(
    "state", metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.BigInteger, nullable=False),
    # Changes with revision <= floor have been trimmed.
    sa.Column("floor", sa.BigInteger, nullable=False),
    sa.Column("ec2_seq", sa.BigInteger, nullable=False),
)

projects = sa.Table(
    "projects", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, unique=True),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

networks = sa.Table(
    "networks", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, index=True),
    sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("mtu", sa.Integer, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

# One VXLAN segment (VNI) per network, allocated at create (networks made before the table
# are numbered by its migration, registry/migrations/versions/r0002_segments.py).
segments = sa.Table(
    "segments", metadata,
    sa.Column("network_id", ID, sa.ForeignKey("networks.id"), primary_key=True),
    sa.Column("segmentation_id", sa.Integer, nullable=False, unique=True),
)

subnets = sa.Table(
    "subnets", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, index=True),
    sa.Column("network_id", ID, sa.ForeignKey("networks.id"), nullable=False, index=True),
    sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("ip_version", sa.Integer, nullable=False),
    sa.Column("cidr", sa.String(64), nullable=False),
    sa.Column("gateway_ip", sa.String(64), nullable=True),
    sa.Column("enable_dhcp", sa.Boolean, nullable=False),
    sa.Column("allocation_pools", sa.JSON, nullable=False),
    sa.Column("dns_nameservers", sa.JSON, nullable=False),
    sa.Column("host_routes", sa.JSON, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    # Neutron's IPv6 modes (None on IPv4 and static IPv6 subnets); see core.ipam.
    sa.Column("ipv6_address_mode", sa.String(32), nullable=True),
    sa.Column("ipv6_ra_mode", sa.String(32), nullable=True),
)

routers = sa.Table(
    "routers", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, index=True),
    sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

ports = sa.Table(
    "ports", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    # no index of its own: ix_ports_network_owner below leads with it (migration 0011)
    sa.Column("network_id", ID, sa.ForeignKey("networks.id"), nullable=False),
    sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("mac_address", sa.String(17), nullable=False, unique=True),
    sa.Column("device_id", sa.String(255), nullable=False, index=True),
    sa.Column("device_owner", sa.String(255), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    # the routers (and DHCP ports) of a network without reading all of its ports
    sa.Index("ix_ports_network_owner", "network_id", "device_owner"),
)

port_ips = sa.Table(
    "port_ips", metadata,
    # no index of its own: it leads the primary key (migration 0011)
    sa.Column("port_id", ID, sa.ForeignKey("ports.id", ondelete="CASCADE"), nullable=False),
    sa.Column("subnet_id", ID, sa.ForeignKey("subnets.id"), nullable=False, index=True),
    sa.Column("network_id", ID, sa.ForeignKey("networks.id"), nullable=False),
    sa.Column("ip_address", sa.String(64), nullable=False),
    sa.PrimaryKeyConstraint("port_id", "ip_address"),
    sa.UniqueConstraint("network_id", "ip_address", name="uq_port_ips_network_ip"),
)

# A subnet's free pool addresses (registry/ipalloc.py, core/ipranges.py), so a pick reads
# two index entries instead of every used address of the subnet. Derived from port_ips and
# the pools, kept in step by every write that takes or gives back an address, in the same
# transaction; a subnet without its ip_alloc row (made before migration 0010) has it built
# from port_ips by its next pick. Keys: the address as 4/16 big-endian
# bytes (sorted by value on both backends).
ip_alloc = sa.Table(
    "ip_alloc", metadata,
    sa.Column("subnet_id", ID, sa.ForeignKey("subnets.id"), primary_key=True),
    sa.Column("built_at", sa.String(32), nullable=False),
)

ip_ranges = sa.Table(
    "ip_ranges", metadata,
    sa.Column("subnet_id", ID, sa.ForeignKey("subnets.id"), nullable=False),
    sa.Column("first_key", sa.LargeBinary(16), nullable=False),
    sa.Column("last_key", sa.LargeBinary(16), nullable=False),
    sa.PrimaryKeyConstraint("subnet_id", "first_key"),
)

# free addresses a port gave back; quarantined while `releases` holds them (registry/reuse.py)
ip_released = sa.Table(
    "ip_released", metadata,
    sa.Column("subnet_id", ID, sa.ForeignKey("subnets.id"), nullable=False),
    sa.Column("key", sa.LargeBinary(16), nullable=False),
    sa.Column("ip_address", sa.String(64), nullable=False),
    sa.PrimaryKeyConstraint("subnet_id", "key"),
)

keypairs = sa.Table(
    "keypairs", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False),
    sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("public_key", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    sa.UniqueConstraint("project_id", "name", name="uq_keypairs_project_name"),
)

instances = sa.Table(
    "instances", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("name", sa.String(255), nullable=False, index=True),
    sa.Column("hostname", sa.String(255), nullable=False),
    sa.Column("project_id", ID, sa.ForeignKey("projects.id"), nullable=False),
    sa.Column("availability_zone", sa.String(255), nullable=False),
    sa.Column("flavor", sa.String(255), nullable=False),
    sa.Column("launch_index", sa.Integer, nullable=False),
    sa.Column("key_name", sa.String(255), nullable=True),
    sa.Column("keypair_id", ID, nullable=True),
    # A copy of the key pair at boot, as Nova keeps it: deleting the key pair later does not
    # change what the instance's metadata shows.
    sa.Column("keypair", sa.JSON, nullable=True),
    sa.Column("metadata", sa.JSON, nullable=False),
    sa.Column("user_data", sa.LargeBinary, nullable=True),
    sa.Column("image_id", sa.String(255), nullable=True),
    sa.Column("ec2_id", sa.BigInteger, nullable=False, unique=True),
    sa.Column("password", sa.Text, nullable=True),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
)

# The compute node an instance runs on (Nova's instance.host), for lab VMs and operators.
instance_hosts = sa.Table(
    "instance_hosts", metadata,
    sa.Column("instance_id", ID, sa.ForeignKey("instances.id"), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
)

# One row per (node, agent type): the heartbeat the agent last sent (registry clock, epoch
# seconds) and whether the registry last judged it alive. Heartbeats update heartbeat_at
# without a revision; only a change of `alive` (or a new agent) is a change-feed event.
agents = sa.Table(
    "agents", metadata,
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
    sa.Column("alive", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.Column("revision", sa.BigInteger, nullable=False),
    # The `peers` its last heartbeat answer told it (other alive agents of its type; NULL on
    # rows made before the column: unknown). Told 0, it does not fence, so its work does not
    # move while it is dead (registry/scheduler.py).
    sa.Column("peers", sa.Integer, nullable=True),
    sa.PrimaryKeyConstraint("host", "type"),
)

# Where each router (kind "router", one host) and each network's DHCP (kind "network",
# [DEFAULT] dhcp_agents_per_network hosts) is served. Written only by registry/scheduler.py.
bindings = sa.Table(
    "bindings", metadata,
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("resource_id", ID, nullable=False),
    sa.Column("host", sa.String(255), nullable=False, index=True),
    sa.Column("created_at", sa.String(32), nullable=False),
    sa.PrimaryKeyConstraint("kind", "resource_id", "host"),
)

changes = sa.Table(
    "changes", metadata,
    sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
              autoincrement=True),
    sa.Column("revision", sa.BigInteger, nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("op", sa.String(8), nullable=False),
    sa.Column("obj_id", sa.String(64), nullable=False),
    sa.Column("attrs", sa.JSON, nullable=False),
)


# IP reuse hold (`registry/reuse.py`): when an address or a router's scope last lost its port,
# in the database's clock (epoch seconds). Rows older than the hold window are pruned.
releases = sa.Table(
    "releases", metadata,
    sa.Column("key", sa.String(160), primary_key=True),
    sa.Column("at", sa.Float, nullable=False, index=True),
)

# The IDs of deleted instances: never given to a new one (as Nova never reuses a UUID), so
# documents a metadata API still holds for a deleted instance can never reach a new VM.
retired_instances = sa.Table(
    "retired_instances", metadata,
    sa.Column("id", ID, primary_key=True),
    sa.Column("deleted_at", sa.String(32), nullable=False),
)


SQLITE_SYNCHRONOUS = ("FULL", "NORMAL")
# SQLite WAL checkpoints. Left to SQLite, the write that crosses wal_autocheckpoint (1,000
# pages, every ~50 creates here) copies the WAL into the database and fsyncs both inside
# its own commit: a few ms on one write in fifty, which is the p99 of a create. Instead a
# background thread runs a PASSIVE checkpoint (it neither waits for nor blocks readers and
# writers) once CHECKPOINT_EVERY writes are pending and no write came for CHECKPOINT_QUIET_S,
# or at the latest once CHECKPOINT_MAX are: a checkpoint's page copies and database fsync
# share the disk with the next commit's fdatasync, and one run right after the 32nd write
# made the next create 9-13 ms instead of 2 (1 create in 32: the p99; docs/benchmarks.md,
# "Create CPU at 10,000 (createp99)"). The connections keep a far larger automatic
# threshold only as a backstop should that thread fall behind.
CHECKPOINT_EVERY = 32
CHECKPOINT_QUIET_S = 0.05
CHECKPOINT_MAX = 512
WAL_BACKSTOP_PAGES = 16000

# The write path's statements, built once: building a Core statement per call costs more
# than running it (a create is a dozen statements; profile in bench/registry_bench.py).
_BUMP = (state.update().where(state.c.id == 1).values(revision=state.c.revision + 1)
         .returning(state.c.revision, state.c.floor))
# An instance create takes its EC2 ID in the same statement that bumps the revision.
_BUMP_WITH_EC2 = (state.update().where(state.c.id == 1)
                  .values(revision=state.c.revision + 1, ec2_seq=state.c.ec2_seq + 1)
                  .returning(state.c.revision, state.c.floor, state.c.ec2_seq))
# PostgreSQL: the same, also queueing the commit's notification to every registry process
# (registry/notify.py). NOTIFY is transactional: delivered at commit, dropped by a rollback
# (a rehearsal, an empty write), so it can be sent first instead of by a statement of its own.
_NOTIFIED = sa.func.pg_notify("openimds_changes", sa.cast(state.c.revision, sa.Text))
_BUMP_PG = _BUMP.returning(_NOTIFIED)
_BUMP_WITH_EC2_PG = _BUMP_WITH_EC2.returning(_NOTIFIED)
# inline: a one-row insert would otherwise return its seq (implicit RETURNING), which
# nothing reads and which cannot be read inside the commit's pipeline (`Store._pipelined`)
_INSERT_CHANGES = changes.insert().inline()
_TRIM = changes.delete().where(changes.c.revision <= sa.bindparam("keep_from"))
_SET_FLOOR = state.update().where(state.c.id == 1).values(floor=sa.bindparam("keep_from"))
_REVISION = sa.select(state.c.revision).where(state.c.id == 1)
_FLOOR = sa.select(state.c.floor).where(state.c.id == 1)
_WINDOW = sa.select(state.c.revision, state.c.floor).where(state.c.id == 1)
# Held while the schema is created or migrated (Store.schema_lock); the key is "oimdsch".
_SCHEMA_LOCK = sa.text("SELECT pg_advisory_xact_lock(31359640972518248)")
# A read's BEGIN on PostgreSQL: its statements share one snapshot.
_BEGIN_SNAPSHOT = "BEGIN ISOLATION LEVEL REPEATABLE READ"
# Connection.info key: the connection has been rehearsed on (`Store._warm`); the pool
# clears a connection's info when it replaces it.
_WARM = "openimds_warm"


def _keep_plans(dbapi_conn: Any) -> None:
    """Keep a psycopg connection's prepared statements across rollbacks. psycopg forgets them
    all (and sends DEALLOCATE ALL) on every ROLLBACK, in case the transaction dropped or
    re-created what they refer to; the server keeps them (a prepared statement is not
    transactional). Outside `Store.schema_lock` the store runs no DDL, so they stay valid:
    the warm-up's rehearsal, which always rolls back, leaves its statements prepared, and
    a request that fails (a 404 lookup, a 409) no longer costs the next ones their plans.
    Uses psycopg's private prepared-statement manager; without one, nothing changes."""
    manager = getattr(dbapi_conn, "_prepared", None)
    clear = getattr(manager, "clear", None)
    if manager is None or clear is None:
        return

    def kept_clear() -> bool:
        return False if manager.openimds_keep else bool(clear())

    manager.openimds_keep = True
    manager.clear = kept_clear


@contextlib.contextmanager
def _pipeline(raw: Any) -> Iterator[None]:
    """A psycopg pipeline that, if it fails, forgets the statements psycopg took as prepared
    inside it: their PREPARE went into the pipeline, and a pipeline skips what follows a
    failed statement, so the server may not hold them; psycopg would forget them at the
    ROLLBACK that follows, which the kept plans (`_keep_plans`) ignore. Those prepared
    before the failure are prepared again under a new name when next due. Uses psycopg's
    private prepared-statement manager, as `_keep_plans` does."""
    manager = getattr(raw, "_prepared", None)
    start = getattr(manager, "_prepared_idx", None)
    try:
        with raw.pipeline():
            yield
    except BaseException:
        names = getattr(manager, "_names", None)
        if start is not None and names is not None:
            for key, name in list(names.items()):  # named _pg3_<its index>
                if int(bytes(name).rpartition(b"_")[2]) >= start:
                    del names[key]
        raise


@contextlib.contextmanager
def _plans_kept(conn: Connection, keep: bool) -> Iterator[None]:
    """Whether the connection keeps its prepared statements across a rollback, for a while."""
    manager = getattr(conn.connection.dbapi_connection, "_prepared", None)
    if manager is None or not hasattr(manager, "openimds_keep"):
        yield
        return
    before = manager.openimds_keep
    manager.openimds_keep = keep
    try:
        yield
    finally:
        manager.openimds_keep = before


def normalize_url(url: str) -> URL:
    """Map postgresql:// (and postgres://) to the psycopg 3 driver."""
    try:
        parsed = make_url(url)
    except Exception as exc:
        raise ConfigError(f"[registry] connection: cannot parse the URL: {exc}") from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(
            f"[registry] connection: backend {parsed.get_backend_name()!r} is not supported "
            "(sqlite or postgresql)"
        )
    return parsed


@dataclass
class Tx:
    """One write transaction: its connection, its revision, and the changes it records."""

    conn: Connection
    revision: int
    changes: list[dict[str, Any]] = field(default_factory=list)
    # the EC2 ID this write took (`Store.write(ec2_id=True)`), else 0
    ec2_id: int = 0
    # seconds the REST answer to this write must wait after commit (`registry/reuse.py`)
    hold_s: float = 0.0
    # the IP quarantine's window: an address released more recently is picked only when no
    # other is free (`Store.reuse_window_s`; registry/ipalloc.py)
    reuse_window_s: float = 0.0
    # release keys (registry/reuse.py) a statement of this write already asked about, on
    # the way, after the revision bump: key -> released within reuse_window_s. The hold
    # reads these instead of asking again when they cover all it would ask.
    released_seen: dict[str, bool] = field(default_factory=dict)
    # statements run with the change rows just before the commit (`later`), each with
    # what takes its row once the commit is back (None: it returns nothing)
    deferred: list[tuple[Any, Any, Callable[[Any], None] | None]] = field(
        default_factory=list)
    # the rows of `Store.write(first=...)`, read with the bump; None when none was given
    first: list[Any] | None = None
    # release keys a `later` statement asks about (an address taken at commit): their
    # answers reach `released_seen` once the commit is back, not before
    asked_at_commit: set[str] = field(default_factory=set)
    # called once the commit is back (before the answer), after the `later` rows' takers
    on_commit: list[Callable[[], None]] = field(default_factory=list)
    # an address was taken at commit trusting the subnet's free state, unchecked against
    # port_ips: UNIQUE (network_id, ip_address) checks it there (`StaleTake`)
    unchecked_takes: bool = False

    def later(self, statement: Any, params: Any,
              then: Callable[[Any], None] | None = None) -> None:
        """Run `statement`, which nothing later in this transaction reads back, with the
        change rows at commit: on PostgreSQL they and the COMMIT are one round trip
        (`Store._pipelined`) instead of one each. then: the statement returns at most one
        row, given to then(row or None) once the commit is back (never if it failed)."""
        self.deferred.append((statement, params, then))

    def change(self, kind: str, op: str, obj_id: str, attrs: dict[str, Any]) -> None:
        self.changes.append(
            {"revision": self.revision, "kind": kind, "op": op, "obj_id": obj_id, "attrs": attrs}
        )


class StaleTake(Conflict):
    """The commit of a write that took an address trusting the subnet's free state
    (`Tx.unchecked_takes`) found a port holding it: the state is out of step with port_ips
    (some write went around it). Nothing of the write was kept; the caller writes again,
    once, with its takes checked (which repair the state)."""


class AckHold:
    """Filled by `Store.write` with how long the caller must wait before it acknowledges
    the write (the REST layer sets one in `ACK_HOLD` per request; see registry/reuse.py),
    and with the write's revision: `revision` while it is bumped and not yet rolled back
    (the REST layer then wakes the long-polls itself, after its answer, instead of at the
    LISTEN echo of this commit), `committed` once a write of the request committed, and
    `fed`: its change rows, so the long-polls it wakes need not read them back."""

    __slots__ = ("committed", "fed", "revision", "seconds")

    def __init__(self) -> None:
        self.seconds = 0.0
        self.revision = 0
        self.committed = 0
        # the committed write's change rows as the feed reads them back: (revision, rows
        # of kind, op, id and attrs as stored JSON text)
        self.fed: tuple[int, list[tuple[str, str, str, str]]] | None = None


# Per request; asyncio.to_thread copies the context, so the worker thread fills the same one.
ACK_HOLD: ContextVar[AckHold | None] = ContextVar("openimds_ack_hold", default=None)
# SQLite's pool (and overflow beyond it, closed again on check-in).
POOL_SIZE = 8
# The registry's worker threads (`registry serve` runs every store call on an executor of
# this size: asyncio's default size, fixed here so the pool can match it). Each holds at
# most one connection at a time, so the PostgreSQL pool keeps one per thread and never has
# to open a cold overflow connection under load.
THREADS = min(32, (os.cpu_count() or 1) + 4)
# The connection of the rehearsal the calling thread runs (`Store.rehearsal`), if any.
_REHEARSAL: ContextVar[Connection | None] = ContextVar("openimds_rehearsal", default=None)


class _Checkpointer:
    """Runs SQLite's WAL checkpoints off the write path, on a thread and connection of its
    own, in a pause between writes (see CHECKPOINT_EVERY)."""

    def __init__(self, path: str, *, every: int = CHECKPOINT_EVERY,
                 quiet_s: float = CHECKPOINT_QUIET_S, most: int = CHECKPOINT_MAX) -> None:
        self._path = path
        self._every, self._quiet_s, self._most = every, quiet_s, max(every, most)
        self._writes = 0  # writes committed, ever
        self._covered = 0  # of them, those before the last checkpoint began
        self._last = 0.0  # time.monotonic() of the last write
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.done = 0  # checkpoints run (tests and benches read it)

    def wrote(self) -> None:
        """One write committed (called under the store's write lock)."""
        self._writes += 1
        self._last = time.monotonic()
        pending = self._writes - self._covered
        # wake the thread to wait for a pause, or to stop waiting: not at every write
        if (pending != self._every and pending < self._most) or self._closed:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint",
                                            daemon=True)
            self._thread.start()
        self._wake.set()

    def _due_in(self) -> float:
        """Seconds until a checkpoint is due (<= 0: now): once no write came for quiet_s, or
        at once when `most` writes are pending."""
        if self._writes - self._covered >= self._most:
            return 0.0
        return self._last + self._quiet_s - time.monotonic()

    def _run(self) -> None:
        db = sqlite3.connect(self._path, timeout=30, isolation_level=None,
                             check_same_thread=False)
        try:
            while True:
                self._wake.wait()
                while True:  # until a pause, `most` pending writes or close()
                    self._wake.clear()
                    if self._closed:
                        return
                    wait = self._due_in()
                    if wait <= 0:
                        break
                    self._wake.wait(wait)
                self._covered = self._writes
                try:
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.done += 1
                except sqlite3.Error:  # the next write asks again; the backstop stays
                    log.exception("registry.checkpoint_failed")
        finally:
            db.close()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(30)


class Store:
    """The one store interface: `read()` and `write()` transactions over an Engine."""

    def __init__(self, url: str, *, change_retention: int = 10000,
                 sqlite_synchronous: str = "full") -> None:
        self.url = normalize_url(url)
        self.change_retention = change_retention
        # The feed keeps at least change_retention revisions and trims in steps of about 1 %
        # of it, so most writes skip the DELETE and the floor UPDATE.
        self._trim_step = max(1, change_retention // 100)
        if sqlite_synchronous.upper() not in SQLITE_SYNCHRONOUS:
            raise ConfigError(f"[registry] sqlite_synchronous: {sqlite_synchronous!r} is not "
                              f"one of {', '.join(s.lower() for s in SQLITE_SYNCHRONOUS)}")
        self.sqlite_synchronous = sqlite_synchronous.upper()
        self.backend = self.url.get_backend_name()
        self._write_lock = threading.Lock()
        self.checkpointer: _Checkpointer | None = None
        db = self.url.database
        if self.backend == "sqlite" and db and db != ":memory:" and "mode=memory" not in db:
            self.checkpointer = _Checkpointer(db)
        self.engine = self._make_engine()
        # called with each write's Tx as the last step before its commit (the Registry
        # installs the IP reuse hold, registry/reuse.py)
        self.before_commit: Callable[[Tx], None] | None = None
        # set with it: the window automatic IP allocation keeps released addresses aside
        self.reuse_window_s = 0.0
        # what `rehearse` ran: run again on each connection the pool opens later (`_warm`)
        self._warm_run: Callable[[], None] | None = None
        # PostgreSQL: statements `_send` runs, compiled once
        self._compiled: dict[Any, Any] = {}

    def _make_engine(self) -> Engine:
        if self.backend == "sqlite":
            db = self.url.database
            if db and db != ":memory:":
                Path(db).parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(
                self.url, connect_args={"check_same_thread": False, "timeout": 30},
                pool_size=POOL_SIZE, max_overflow=POOL_SIZE,
            )

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_conn: Any, _record: Any) -> None:
                # Let SQLAlchemy's begin event (below) issue BEGIN itself.
                dbapi_conn.isolation_level = None
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute(f"PRAGMA synchronous={self.sqlite_synchronous}")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA busy_timeout=30000")
                if self.checkpointer is not None:
                    cur.execute(f"PRAGMA wal_autocheckpoint={WAL_BACKSTOP_PAGES}")
                cur.close()

            @event.listens_for(engine, "begin")
            def _on_begin(conn: Connection) -> None:
                write = conn.get_execution_options().get("openimds_write", False)
                conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

            return engine
        # One connection per registry thread, kept for good (no pool_recycle), last used first
        # (LIFO): one at a time, requests keep reusing the connection whose backend is hot.
        # No pre-ping (a round trip per checkout): the BEGIN the store sends is the check
        # (`_begun`). Overflow is a safety margin only: `registry serve` cannot check out
        # more than THREADS at once.
        engine = sa.create_engine(self.url, pool_size=THREADS, max_overflow=THREADS,
                                  pool_use_lifo=True)

        @event.listens_for(engine, "connect")
        def _on_connect_pg(dbapi_conn: Any, _record: Any) -> None:
            # BEGIN goes out as the store's own statement (the begin event below), as on
            # SQLite; COMMIT and ROLLBACK stay psycopg's, which send them whenever a
            # transaction is open.
            dbapi_conn.autocommit = True
            _keep_plans(dbapi_conn)

        @event.listens_for(engine, "begin")
        def _on_begin_pg(conn: Connection) -> None:
            snapshot = conn.get_execution_options().get("openimds_snapshot", False)
            conn.exec_driver_sql(_BEGIN_SNAPSHOT if snapshot else "BEGIN")

        return engine

    @property
    def warm_connections(self) -> int:
        """How many connections `rehearse` warms: every one the pool keeps on PostgreSQL (each
        is its own server backend, cold until used), one on SQLite (its first-use cost is the
        engine's statement compiles; a new connection adds only the schema parse)."""
        return THREADS if self.backend == "postgresql" else 1

    def create_schema(self, to: str = "head") -> tuple[str, str]:
        """Bring the schema to revision `to` (default: this release's) with the migrations
        (registry/migrations/), and make the state row. Idempotent; under the schema lock.
        Returns (from, to) revisions, from "" for a new database. A new SQLite file is made
        readable by its owner only: it holds passwords and user data."""
        from openimds.registry import migrations

        if self.backend == "sqlite" and self.url.database not in (None, "", ":memory:"):
            db = Path(str(self.url.database))
            if not db.exists():
                db.touch(mode=0o600)
        with self.schema_lock() as conn:
            done = migrations.upgrade(conn, metadata, to)
            if conn.execute(sa.select(state.c.id)).first() is None:
                conn.execute(state.insert().values(id=1, revision=0, floor=0, ec2_seq=0))
        return done

    @contextlib.contextmanager
    def schema_lock(self) -> Iterator[Connection]:
        """A write transaction holding the schema lock: SQLite's write lock (BEGIN IMMEDIATE,
        which another process waits for) or, on PostgreSQL, a transaction-scoped advisory
        lock, so registries starting together on one database migrate one after the other
        (READ COMMITTED: the second sees what the first committed). Its DDL may be rolled
        back, so a rollback here drops the connection's prepared statements (`_keep_plans`)."""
        with self._write_lock, self.engine.connect().execution_options(
            openimds_write=True
        ) as conn, _plans_kept(conn, False), conn.begin():
            if self.backend == "postgresql":
                conn.execute(_SCHEMA_LOCK)
            yield conn

    @contextlib.contextmanager
    def _begun(self, *, locked: bool, then: Callable[[Connection], Any] | None = None,
               **opts: Any) -> Iterator[tuple[Connection, Any, Any]]:
        """A pooled connection (warmed first if it is new: `_warm`) in a transaction that is
        committed on exit (rolled back on an exception), and what `then(conn)` returned:
        called right after the BEGIN, on PostgreSQL in the BEGIN's round trip (`_batch`). A
        connection found dead by its BEGIN (the database restarted since it was last used)
        is replaced and the BEGIN (and `then`) sent again, once: nothing had been committed
        on it. locked: the caller holds the write lock."""
        for attempt in (1, 2):
            conn = self.engine.connect().execution_options(**opts)
            try:
                self._warm(conn, locked=locked)
                with self._batch(conn, then is not None):
                    trans = conn.begin()
                    sent = then(conn) if then is not None else None
            except Exception as exc:
                dead = self._dead(conn, exc)
                conn.close()
                if attempt == 2 or not dead:
                    raise
                reason = exc.orig if isinstance(exc, sa.exc.DBAPIError) else exc
                log.warning("registry.reconnect reason=%s", (str(reason).splitlines() or [""])[0])
                continue
            with conn, trans:
                yield conn, trans, sent
            return

    @contextlib.contextmanager
    def _batch(self, conn: Connection, batch: bool) -> Iterator[None]:
        """PostgreSQL, batch: the statements sent inside go out in one psycopg pipeline,
        whose end (its one Sync) is the only wait; what they return is read after it (a
        read inside would be a wait of its own). Else nothing."""
        raw = conn.connection.dbapi_connection if self.backend == "postgresql" else None
        if not batch or raw is None:
            yield
            return
        with _pipeline(raw):
            yield

    @staticmethod
    def _dead(conn: Connection, exc: BaseException) -> bool:
        """Whether exc says the connection is gone (then it is kept out of the pool): as
        SQLAlchemy saw it, or psycopg's at a pipeline's end, which SQLAlchemy never sees."""
        if isinstance(exc, sa.exc.DBAPIError):
            return bool(exc.connection_invalidated)
        raw = None if conn.invalidated else conn.connection.dbapi_connection
        if raw is None or not getattr(raw, "broken", False):
            return False
        conn.invalidate()
        return True

    def _send(self, conn: Connection, statement: Any, params: dict[str, Any]) -> Any:
        """PostgreSQL: send `statement` on the raw psycopg cursor (inside `_batch`, whose
        end brings its rows; SQLAlchemy's own execute would find no result there yet and
        close it), compiled once, through SQLAlchemy's cursor event like every statement.
        Its rows are named tuples (`_received`)."""
        compiled = self._compiled.get(statement)
        if compiled is None:
            compiled = self._compiled[statement] = statement.compile(dialect=conn.dialect)
        sql = compiled.string
        args = compiled.construct_params(params)
        raw = conn.connection.dbapi_connection
        assert raw is not None
        cursor = raw.cursor(row_factory=namedtuple_row)
        conn.dispatch.before_cursor_execute(conn, cursor, sql, args, None, False)
        cursor.execute(sql, args)
        return cursor

    def _warm(self, conn: Connection, *, locked: bool) -> None:
        """Rehearse on a connection the warm-up has not seen (a replacement for one that died,
        an overflow one) before its first request: cold, its first create paid 2.4-6 ms more
        (docs/benchmarks.md, "Create p99"). PostgreSQL only; nothing to do before `rehearse`
        has run."""
        run = self._warm_run
        # SQLite: a new connection costs only a schema parse, not a rehearsal (~20 ms under
        # the write lock, which a create would wait for)
        if run is None or self.backend != "postgresql" or conn.info.get(_WARM):
            return
        with contextlib.nullcontext() if locked else self._write_lock:
            try:
                with self._rehearsing(conn):
                    run()
            except sa.exc.DBAPIError as exc:
                if exc.connection_invalidated:
                    raise
                log.exception("registry.warm_connection_failed")
            except Exception:  # a cold connection is slower, not wrong
                log.exception("registry.warm_connection_failed")
        conn.info[_WARM] = True

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (a consistent snapshot on PostgreSQL REPEATABLE READ)."""
        rehearsal = _REHEARSAL.get()
        if rehearsal is not None:
            yield rehearsal
            return
        with self._begun(locked=False, openimds_snapshot=True) as (conn, _trans, _):
            yield conn

    @contextlib.contextmanager
    def quiet_write(self) -> Iterator[Connection]:
        """A write transaction that bumps no revision and records no change (heartbeats)."""
        with self._writer() as (conn, _trans, _rehearsed, _):
            yield conn

    @contextlib.contextmanager
    def _writer(self, then: Callable[[Connection], Any] | None = None
                ) -> Iterator[tuple[Connection, Any, bool, Any]]:
        """A write's connection under the write lock, its transaction, whether it is a
        rehearsal's (the lock is then already held and the transaction is a savepoint of
        the rehearsal), and what `then(conn)` returned, sent with the BEGIN (`_begun`).
        Committed on exit unless the caller ended it."""
        rehearsal = _REHEARSAL.get()
        if rehearsal is not None:
            with self._batch(rehearsal, then is not None):
                savepoint = rehearsal.begin_nested()
                sent = then(rehearsal) if then is not None else None
            with savepoint:
                yield rehearsal, savepoint, True, sent
            return
        with self._write_lock, self._begun(locked=True, then=then,
                                           openimds_write=True) as (conn, trans, sent):
            yield conn, trans, False, sent

    @contextlib.contextmanager
    def rehearsal(self) -> Iterator[None]:
        """Run reads and writes for real, then undo them all: inside, every `read()` and
        `write()` of the calling thread runs in one write transaction (each write a
        savepoint of it) that is rolled back at the end, so nothing is committed, audited
        or fed. The registry rehearses its hot paths at start-up (`Registry.warm_up`)."""
        with self._write_lock, self.engine.connect().execution_options(
            openimds_write=True
        ) as conn, self._rehearsing(conn):
            yield

    def rehearse(self, run: Callable[[], None]) -> int:
        """Call `run` inside a rehearsal once on each of `warm_connections` pooled connections
        (all checked out at once, so each is a different one), then give them all back to the
        pool; from then on a connection the pool opens is rehearsed on before its first use
        (`_warm`). On PostgreSQL a connection's first use pays for the connect and for its
        new backend's cold catalog caches and foreign-key check plans: a create took 2.4-3.4
        ms more at load 1-3, ~6 at load 6 (docs/benchmarks.md, "Create p99"); and every
        statement the rehearsal runs is prepared server-side on the way (`_rehearsing`).
        Returns how many connections it warmed."""
        n = self.warm_connections
        with self._write_lock, contextlib.ExitStack() as held:
            conns = [held.enter_context(self.engine.connect().execution_options(
                openimds_write=True)) for _ in range(n)]
            for conn in conns:
                with self._rehearsing(conn):
                    run()
                conn.info[_WARM] = True
            self._warm_run = run
        return n

    @contextlib.contextmanager
    def _rehearsing(self, conn: Connection) -> Iterator[None]:
        # PostgreSQL: prepare each statement on its first run here instead of its 5th real
        # one (psycopg's default threshold; preparing costs a round trip, and a create on
        # unprepared statements ~1 ms more). The plans outlive the rollback (`_keep_plans`).
        raw: Any = conn.connection.dbapi_connection if self.backend == "postgresql" else None
        threshold = getattr(raw, "prepare_threshold", None)
        if threshold is not None:
            raw.prepare_threshold = 0
        trans = conn.begin()
        token = _REHEARSAL.set(conn)
        try:
            yield
        finally:
            _REHEARSAL.reset(token)
            trans.rollback()
            if threshold is not None:
                # the reads' BEGIN, which a rehearsal (one write transaction) never sends
                raw.execute(_BEGIN_SNAPSHOT)
                raw.execute("COMMIT")
                raw.prepare_threshold = threshold

    @contextlib.contextmanager
    def write(self, *, allow_empty: bool = False, ec2_id: bool = False,
              first: tuple[Any, dict[str, Any]] | None = None) -> Iterator[Tx]:
        """One write transaction with the revision already bumped; changes appended on exit.
        allow_empty: a transaction that recorded no change is rolled back quietly (the
        scheduler re-checks inside the transaction and may find nothing left to do).
        ec2_id: also take the next EC2 ID (`tx.ec2_id`) in the same statement.
        first: a read (statement, params) run right after the bump, its rows in `tx.first`.

        PostgreSQL: BEGIN, the bump and `first` are one round trip (`_begun`). Still three
        statements, so READ COMMITTED gives `first` a snapshot taken after the bump got the
        state row's lock: it sees every write committed before this one (in one statement,
        a CTE, it would read the snapshot from before the wait)."""
        pg = self.backend == "postgresql"
        bump = ((_BUMP_WITH_EC2_PG if pg else _BUMP_WITH_EC2) if ec2_id
                else (_BUMP_PG if pg else _BUMP))
        statements: list[tuple[Any, dict[str, Any]]] = [(bump, {})]
        if first is not None:
            statements.append(first)

        def send(conn: Connection) -> list[Any]:
            return [self._send(conn, st, params) for st, params in statements]

        hold = ACK_HOLD.get()
        made: Tx | None = None  # for the error: whether it took addresses unchecked
        try:
            with self._writer(send if pg else None) as (conn, trans, rehearsed, sent):
                results: list[list[Any]]
                if pg:
                    results = [cursor.fetchall() for cursor in sent]
                else:
                    results = [list(conn.execute(st, params)) for st, params in statements]
                rev = results[0][0]
                tx = Tx(conn, int(rev[0]), ec2_id=int(rev[2]) if ec2_id else 0,
                        reuse_window_s=self.reuse_window_s,
                        first=results[1] if first is not None else None)
                made = tx
                if hold is not None and not rehearsed:
                    hold.revision = tx.revision  # before the commit, so before its NOTIFY
                yield tx
                if not tx.changes:
                    if not allow_empty:
                        raise RuntimeError("a write transaction recorded no change")
                    if hold is not None:
                        hold.revision = 0  # before the lock goes: another may take it
                    trans.rollback()
                    return
                if self.before_commit is not None:
                    # before the rows below: it reads only tx.changes and the database, and
                    # what it reads back must come first (nothing can be read in a pipeline)
                    self.before_commit(tx)
                keep_from = tx.revision - self.change_retention
                if rehearsed:  # trims nothing, but its statements get compiled too
                    keep_from = int(rev[1])
                # the rows of the `later` statements that return one, for their takers
                answers: list[tuple[Any, Callable[[Any], None]]] = []
                with self._pipelined(conn) as pipelined:
                    for statement, params, then in tx.deferred:
                        if then is None:
                            conn.execute(statement, params)
                        elif pipelined:  # a raw cursor, read after the Sync (`_send`)
                            answers.append((self._send(conn, statement, params), then))
                        else:
                            answers.append((conn.execute(statement, params).first(), then))
                    if pipelined:  # an executemany would end with a Sync of its own: a wait
                        for row in tx.changes:
                            conn.execute(_INSERT_CHANGES, row)
                    else:
                        conn.execute(_INSERT_CHANGES, tx.changes)
                    if rehearsed or keep_from >= int(rev[1]) + self._trim_step:
                        conn.execute(_TRIM, {"keep_from": keep_from})
                        conn.execute(_SET_FLOOR, {"keep_from": keep_from})
                    if pipelined and not rehearsed:
                        # queued too: the pipeline's one Sync, on leaving it, is the wait for
                        # the commit (psycopg's commit() would add a Sync of its own)
                        conn.exec_driver_sql("COMMIT")
                rows = [(r.fetchone() if pipelined else r, then) for r, then in answers]
                # SQLite, a rehearsal's savepoint: commit now; PostgreSQL: the transaction is
                # over (psycopg sees it idle and sends nothing), SQLAlchemy's is closed
                trans.commit()
                for row, then in rows:
                    then(row)
                for call in tx.on_commit:
                    call()
                if rehearsed:
                    return
                if self.checkpointer is not None:
                    self.checkpointer.wrote()
        except IntegrityError as exc:
            reason = _integrity_reason(exc)
            if made is not None and made.unchecked_takes and reason == _IP_IN_USE:
                raise StaleTake(reason) from None
            raise Conflict(reason) from None
        if hold is not None:
            hold.committed = tx.revision
            # attrs encoded as the column stored them (SQLAlchemy's JSON type: json.dumps):
            # what a read gives back, and safe from whatever the caller does with its dicts
            hold.fed = (tx.revision, [(c["kind"], c["op"], c["obj_id"], json.dumps(c["attrs"]))
                                      for c in tx.changes])
            if tx.hold_s > hold.seconds:
                hold.seconds = tx.hold_s
        audit.info("registry.write revision=%d changes=%s", tx.revision,
                   ",".join(f"{c['kind']}:{c['op']}:{c['obj_id']}" for c in tx.changes))

    @contextlib.contextmanager
    def _pipelined(self, conn: Connection) -> Iterator[bool]:
        """PostgreSQL (yields True): the statements inside (none of which returns rows) and
        the COMMIT go out in one psycopg pipeline, one round trip instead of one each. A
        statement's error surfaces at the commit (or the pipeline's end), raised as
        SQLAlchemy's. SQLite (False): as they come (no round trips)."""
        raw = conn.connection.dbapi_connection if self.backend == "postgresql" else None
        if raw is None:
            yield False
            return
        try:
            with _pipeline(raw):
                yield True
        except psycopg.errors.IntegrityError as exc:
            raise IntegrityError("pipeline", None, exc) from None
        except psycopg.Error:
            if raw.broken:  # SQLAlchemy did not see it fail: keep it out of the pool
                conn.invalidate()
            raise

    def revision(self, conn: Connection) -> int:
        return int(conn.execute(_REVISION).scalar_one())

    def floor(self, conn: Connection) -> int:
        return int(conn.execute(_FLOOR).scalar_one())

    def window(self, conn: Connection) -> tuple[int, int]:
        """(revision, floor) in one read: the feed's retained window is floor..revision."""
        rev, floor = conn.execute(_WINDOW).one()
        return int(rev), int(floor)

    def dispose(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.engine.dispose()


_IP_IN_USE = "IP address already in use on this network"


def _integrity_reason(exc: IntegrityError) -> str:
    text = str(exc.orig) if exc.orig is not None else str(exc)
    if "uq_port_ips_network_ip" in text or "port_ips.network_id" in text:
        return _IP_IN_USE
    if "mac_address" in text:
        return "MAC address already in use"
    if "uq_keypairs_project_name" in text or "keypairs.project_id" in text:
        return "key pair name already exists in this project"
    if "projects.name" in text or "projects_name" in text:
        return "project name already exists"
    return "conflicts with an existing object: " + text.splitlines()[0][:200]


MAX_VNI = 2**24 - 1


def allocate_segment(conn: Connection, network_id: str) -> int:
    """The next free VNI for a network (inside a write transaction, so it is atomic)."""
    top = conn.execute(sa.select(sa.func.max(segments.c.segmentation_id))).scalar()
    vni = int(top or 0) + 1
    if vni > MAX_VNI:  # wrapped: the lowest free one
        used = set(conn.execute(sa.select(segments.c.segmentation_id)).scalars())
        vni = next((v for v in range(1, MAX_VNI + 1) if v not in used), 0)
        if not vni:
            raise Conflict("no free VXLAN segment (VNI) left")
    conn.execute(segments.insert().values(network_id=network_id, segmentation_id=vni))
    return vni
