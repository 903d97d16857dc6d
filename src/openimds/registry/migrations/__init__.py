"""Registry schema migrations (Alembic), shipped in the package and run by the registry.

No alembic.ini: `_config()` points Alembic at this folder (env.py, versions/). Revisions,
one per schema change since the first release (docs/operations.md "Registry schema"):

    0001  first release (commit 2515642): the baseline
    0002  segments (VXLAN VNI per network; existing networks numbered 1, 2, ...)
    0003  subnets.ipv6_address_mode, subnets.ipv6_ra_mode
    0004  instance_hosts
    0005  agents, bindings
    0006  agents.peers (drops agents.alive_since where a registry from main had it)
    0007  releases (the IP reuse hold, registry/reuse.py)
    0008  retired_instances (deleted instance IDs, never reused)
    0009  index ix_ports_network_owner (a network's routers without reading its ports)
    0010  ip_alloc, ip_ranges, ip_released (free-IP state per subnet, built on first pick)
    0011  drops ix_port_ips_port_id, ix_ports_network_id (other indexes lead with them)

`upgrade(conn)` runs inside the caller's write transaction that holds the schema lock
(`Store.schema_lock`), so two registries starting on one database migrate one after the
other and the second finds nothing to do. It tells four databases apart:

- no tables: a new registry; `create_all` at head, stamped head (what the migrations make,
  checked by tests/integration/test_registry_schema.py);
- tables but no ``alembic_version``: made by a release before migrations; stamped with the
  revision its tables and columns match (`MARKERS`), then upgraded;
- a known revision: upgraded to the target;
- a revision this release does not know: made by a newer release; `SchemaTooNew`.
"""

from __future__ import annotations

import functools
import io
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.engine import URL, Connection

from openimds.errors import OpenImdsError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

# Alembic is imported only when there is something to migrate (or print): a registry already
# at head starts without it (importing it cost 0.75 s on a loaded 2-core machine, on every
# registry restart). It says "Context impl SQLiteImpl" and more at INFO on import and on
# every run; our own lines say what ran.
if logging.getLogger("alembic").level == logging.NOTSET:
    logging.getLogger("alembic").setLevel(logging.WARNING)


class SchemaError(OpenImdsError):
    """The database's schema is not one this release can bring to its own."""


class SchemaTooNew(SchemaError):
    """The database was migrated by a newer release."""


@functools.cache
def script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(HERE))


@functools.cache
def revisions() -> list[str]:
    """Every revision, oldest first: versions/rNNNN_*.py, each revising the one before it
    (tests check that Alembic's own chain says the same)."""
    return sorted(p.name[1:5] for p in (HERE / "versions").glob("r[0-9][0-9][0-9][0-9]_*.py"))


def head() -> str:
    return revisions()[-1]


def _config(*, connection: Connection | None = None, url: str = "",
            output: io.StringIO | None = None) -> Config:
    from alembic.config import Config

    cfg = Config(output_buffer=output)
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    cfg.attributes["url"] = url
    return cfg


class Shape:
    """The tables and columns a database (or a backup) has; None: columns unknown (a backup's
    empty table, which has no row to show them)."""

    def __init__(self, columns: Mapping[str, set[str] | None]) -> None:
        self.columns = columns

    @classmethod
    def of(cls, conn: Connection) -> Shape:
        inspector = sa.inspect(conn)
        return cls({t: {c["name"] for c in inspector.get_columns(t)}
                    for t in inspector.get_table_names() if t != "alembic_version"})

    def has(self, table: str, column: str | None = None, *, unknown: bool = True) -> bool:
        if table not in self.columns:
            return False
        cols = self.columns[table]
        if column is None:
            return True
        return unknown if cols is None else column in cols


FIRST_RELEASE_TABLES = ("state", "projects", "networks", "subnets", "routers", "ports",
                        "port_ips", "keypairs", "instances", "changes")

# What a database at each revision has that the one before had not (releases before
# migrations made their schema with create_all + added columns, so each has all of its
# revision's markers and those of every earlier one).
MARKERS: tuple[tuple[str, Callable[[Shape], bool]], ...] = (
    ("0001", lambda s: all(s.has(t) for t in FIRST_RELEASE_TABLES)),
    ("0002", lambda s: s.has("segments")),
    ("0003", lambda s: s.has("subnets", "ipv6_address_mode")
     and s.has("subnets", "ipv6_ra_mode")),
    ("0004", lambda s: s.has("instance_hosts")),
    ("0005", lambda s: s.has("agents") and s.has("bindings")),
    ("0006", lambda s: s.has("agents", "peers")
     and not s.has("agents", "alive_since", unknown=False)),
)
# Columns a later revision drops (so a backup's rows may carry them at an earlier one).
DROPPED = {("agents", "alive_since")}


def detect(shape: Shape) -> str:
    """The revision a database (or backup) made before migrations is at; SchemaError if its
    tables match no release."""
    found = ""
    for i, (rev, marker) in enumerate(MARKERS):
        if marker(shape):
            found = rev
            continue
        if i == 0:
            missing = [t for t in FIRST_RELEASE_TABLES if not shape.has(t)]
            raise SchemaError("the database has tables but not the registry's (no "
                              f"{', '.join(missing)}): not an openimds registry")
        later = [r for r, m in MARKERS[i + 1:] if m(shape)]
        if later:
            raise SchemaError(f"the registry's tables match no release: they have what "
                              f"revision {later[0]} added but not what {rev} added")
        break
    return found


def current(conn: Connection) -> str | None:
    """The revision stamped in the database, or None (no alembic_version)."""
    if not sa.inspect(conn).has_table("alembic_version"):
        return None
    found = list(conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
    if len(found) > 1:
        raise SchemaError(f"the registry database is at several schema revisions at once "
                          f"({', '.join(sorted(found))}): not made by openimds")
    return str(found[0]) if found else None


def _too_new(rev: str) -> SchemaTooNew:
    return SchemaTooNew(f"the registry database is at schema revision {rev}, which this "
                        f"release does not know (it knows up to {head()}): it was migrated "
                        "by a newer openimds; run that release or restore a backup")


def check_target(to: str) -> str:
    """The revision `to` names (head or one of ours); SchemaError otherwise."""
    rev = head() if to == "head" else to
    if rev not in revisions():
        raise SchemaError(f"no registry schema revision {to!r} (known: "
                          f"{', '.join(revisions())})")
    return rev


def status(conn: Connection) -> dict[str, str | None]:
    """Where the database is: stamped revision, detected revision (unstamped), head."""
    rev = current(conn)
    shape = Shape.of(conn)
    detected = None
    if rev is None and shape.columns:
        detected = detect(shape)
    return {"current": rev, "detected": detected, "head": head()}


def upgrade(conn: Connection, metadata: sa.MetaData, to: str = "head") -> tuple[str, str]:
    """Bring the schema to `to` inside the caller's locked transaction. Returns (from, to);
    from is "" for an empty database."""
    target = check_target(to)
    order = revisions()
    rev = current(conn)
    if rev == target:
        return rev, target
    from alembic import command

    cfg = _config(connection=conn)
    if rev is None:
        shape = Shape.of(conn)
        if not shape.columns:
            if target == head():
                metadata.create_all(conn)
                command.stamp(cfg, target)
                log.info("registry.schema created at revision %s", target)
            else:
                command.upgrade(cfg, target)
                log.info("registry.schema created at revision %s (from the migrations)",
                         target)
            return "", target
        rev = detect(shape)
        command.stamp(cfg, rev)
        log.info("registry.schema made before migrations: its tables match revision %s", rev)
    if rev not in order:
        raise _too_new(rev)
    if order.index(rev) > order.index(target):
        raise SchemaError(f"the registry database is at schema revision {rev}, past {target}: "
                          "migrations go forward only (restore a backup to go back)")
    if rev != target:
        command.upgrade(cfg, target)
        log.info("registry.schema upgraded from revision %s to %s", rev, target)
    return rev, target


def offline_sql(url: URL, start: str | None, to: str = "head") -> str:
    """The SQL that upgrading from `start` (None: an empty database) to `to` runs, for the
    URL's dialect, without connecting (`registry migrate --sql`)."""
    target = check_target(to)
    if start is not None:
        check_target(start)
    from alembic import command

    out = io.StringIO()
    cfg = _config(url=url.render_as_string(hide_password=True), output=out)
    command.upgrade(cfg, f"{start}:{target}" if start else target, sql=True)
    return out.getvalue()


__all__ = ["DROPPED", "MARKERS", "SchemaError", "SchemaTooNew", "Shape", "current", "detect",
           "head", "offline_sql", "revisions", "status", "upgrade"]
