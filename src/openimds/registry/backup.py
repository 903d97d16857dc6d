"""`openimds registry backup FILE` / `restore FILE`: the whole registry as one checked file.

A backup is one JSON document written from one read transaction (a consistent snapshot on
both backends), mode 0600 (it holds user data and passwords):

    {"format": "openimds-registry-backup", "version": 1, "backend": "sqlite",
     "revision": 812, "schema": "0007", "counts": {"ports": 40, ...},
     "sha256": "<of the tables>", "tables": {"projects": [{"id": ..., ...}, ...], ...}}

`schema` is the registry's schema revision (registry/migrations/); backups written before it
was recorded have none and are placed by their tables and columns (`migrations.detect`). A
backup of an older schema is carried through the migrations first (`upgraded()`: loaded into
a scratch SQLite database at its revision, upgraded, dumped again), so restoring it gives
what upgrading that registry in place would have; one of a newer schema is refused.

Binary columns are base64 (`{"b64": "..."}`). `check()` refuses, with a reason naming what
is wrong, a file that is not a backup, of another format version, whose checksum or row
counts do not match (corrupt or edited), whose tables or columns do not match this release's
schema (mismatched), or that breaks an invariant (one state row, no row newer than the
revision, every foreign key pointing at a row that exists). `restore()` checks first, then in
one write transaction replaces every row; the change history is not restored: the revision
moves past both the backup's and the store's current one and the feed's floor with it, so
every follower (agents, API) resyncs from `/v1/topology` instead of trusting old changes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from openimds.errors import BadRequest, Conflict
from openimds.registry import migrations
from openimds.registry.store import Store, metadata

FORMAT = "openimds-registry-backup"
VERSION = 1
_NOT_RESTORED = ("changes", "releases")  # history (followers resync instead), IP reuse holds
_LIVENESS = ("agents",)  # heartbeats of running nodes: not data, refilled within seconds

Json = dict[str, Any]


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    return value


def _decode(column: sa.Column[Any], value: Any) -> Any:
    if isinstance(column.type, sa.LargeBinary) and isinstance(value, Mapping):
        return base64.b64decode(str(value.get("b64", "")))
    return value


def _digest(tables: Mapping[str, Any]) -> str:
    canonical = json.dumps(tables, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def dump(store: Store) -> Json:
    """Every row of every table, from one read transaction."""
    tables: dict[str, list[Json]] = {}
    with store.read() as conn:
        revision = store.revision(conn)
        schema = migrations.current(conn)
        for table in metadata.sorted_tables:
            pk = list(table.primary_key.columns) or list(table.columns)
            rows = conn.execute(sa.select(table).order_by(*pk))
            tables[table.name] = [{k: _encode(v) for k, v in r._mapping.items()} for r in rows]
    return {
        "format": FORMAT, "version": VERSION, "backend": store.backend, "revision": revision,
        "schema": schema, "counts": {name: len(rows) for name, rows in tables.items()},
        "sha256": _digest(tables), "tables": tables,
    }


def write_backup(store: Store, path: Path) -> Json:
    """Dump to path (temp file, fsync, rename; mode 0600). Returns the summary."""
    data = dump(store)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return summary(data)


def summary(data: Mapping[str, Any]) -> Json:
    out = {"revision": data["revision"], "sha256": data["sha256"], "schema": data.get("schema"),
           "rows": sum(data["counts"].values()), "counts": dict(data["counts"])}
    if data.get("upgraded_from"):
        out["upgraded_from"] = data["upgraded_from"]
    return out


def read_backup(path: Path) -> Json:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BadRequest(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"{path}: not a registry backup (not JSON: {exc})") from None
    return upgraded(data, str(path))


def schema_of(data: Json, name: str = "backup") -> str:
    """The backup's schema revision: recorded, or for a backup without one, the revision its
    tables and columns match. BadRequest if this release does not know it."""
    rev = data.get("schema")
    if rev is None:
        tables = data["tables"]
        shape = migrations.Shape({t: (set(rows[0]) if rows else None)
                                  for t, rows in tables.items() if isinstance(rows, list)})
        try:
            return migrations.detect(shape)
        except migrations.SchemaError as exc:
            raise BadRequest(f"{name}: mismatched: {exc}") from None
    if not isinstance(rev, str) or rev not in migrations.revisions():
        raise BadRequest(f"{name}: made by a newer release: schema revision {rev!r}, this "
                         f"release knows up to {migrations.head()}")
    return rev


def upgraded(data: Any, name: str = "backup") -> Json:
    """The backup at this release's schema, checked: as it is if it already is, else carried
    through the migrations from its own revision first. BadRequest naming the problem."""
    _check_file(data, name)
    rev = schema_of(data, name)
    if rev != migrations.head():
        data = _upgrade(data, rev, name)
    check(data, name)
    return data  # type: ignore[no-any-return]


def _upgrade(data: Json, rev: str, name: str) -> Json:
    """Load the rows into a scratch SQLite registry at `rev`, upgrade it, dump it again."""
    with tempfile.TemporaryDirectory(prefix="openimds-restore-") as tmp:
        scratch = Store(f"sqlite:///{Path(tmp) / 'upgrade.sqlite'}")
        try:
            scratch.create_schema(to=rev)
            old = sa.MetaData()
            with scratch.schema_lock() as conn:
                old.reflect(conn)
                conn.execute(old.tables["state"].delete())
                for table in old.sorted_tables:
                    rows = data["tables"].get(table.name) or []
                    for row in rows:
                        extra = {k for k in row if k not in table.c
                                 and (table.name, k) not in migrations.DROPPED}
                        if extra:
                            raise BadRequest(
                                f"{name}: mismatched: {table.name} has columns {sorted(extra)} "
                                f"schema revision {rev} does not have")
                    clean = [{k: _decode(table.c[k], v) for k, v in row.items() if k in table.c}
                             for row in rows]
                    if clean:
                        try:
                            conn.execute(table.insert(), clean)
                        except sa.exc.IntegrityError as exc:
                            first = str(exc.orig).splitlines()[0][:200]
                            raise BadRequest(f"{name}: inconsistent: {table.name}: {first}"
                                             ) from None
            scratch.create_schema()
            out = dump(scratch)
        finally:
            scratch.dispose()
    out["backend"] = data.get("backend")
    out["upgraded_from"] = rev
    return out


def _check_file(data: Any, name: str) -> None:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BadRequest(f"{name}: not an openimds registry backup")
    if data.get("version") != VERSION:
        raise BadRequest(f"{name}: backup format version {data.get('version')!r}; this "
                         f"release reads version {VERSION}")
    tables = data.get("tables")
    if not isinstance(tables, dict) or not isinstance(data.get("counts"), dict):
        raise BadRequest(f"{name}: corrupt: no tables")
    if _digest(tables) != data.get("sha256"):
        raise BadRequest(f"{name}: corrupt: the checksum does not match its contents")
    for table_name, rows in tables.items():
        if not isinstance(rows, list) or data["counts"].get(table_name) != len(rows):
            raise BadRequest(f"{name}: corrupt: table {table_name} has "
                             f"{len(rows) if isinstance(rows, list) else '?'} rows, its "
                             f"count says {data['counts'].get(table_name)}")


def check(data: Any, name: str = "backup") -> None:
    """Raise BadRequest naming the first problem (see the module docstring); the backup must
    be of this release's schema (`upgraded()` brings an older one to it)."""
    _check_file(data, name)
    rev = schema_of(data, name)
    if rev != migrations.head():
        raise BadRequest(f"{name}: schema revision {rev}, not this release's "
                         f"{migrations.head()}: upgrade it first")
    tables = data["tables"]
    known = {t.name: t for t in metadata.sorted_tables}
    for table_name, rows in tables.items():
        table = known.get(table_name)
        if table is None:
            raise BadRequest(f"{name}: mismatched: table {table_name!r} is not in this "
                             "release's registry schema")
        columns = set(table.columns.keys())
        required = {c.name for c in table.columns
                    if not c.nullable and c.default is None and c.server_default is None
                    and c.autoincrement is not True}
        for row in rows:
            extra = set(row) - columns
            if extra:
                raise BadRequest(f"{name}: mismatched: {table_name} has columns "
                                 f"{sorted(extra)} this release does not know")
            missing = required - set(row)
            if missing:
                raise BadRequest(f"{name}: mismatched: {table_name} rows lack "
                                 f"{sorted(missing)}")
    _check_invariants(tables, name)


def _check_invariants(tables: Mapping[str, list[Json]], name: str) -> None:
    state_rows = tables.get("state", [])
    if len(state_rows) != 1:
        raise BadRequest(f"{name}: inconsistent: {len(state_rows)} state rows, not 1")
    revision = int(state_rows[0].get("revision") or 0)
    for table_name, rows in tables.items():
        newest = max((int(r.get("revision") or 0) for r in rows if "revision" in r),
                     default=0)
        if table_name != "state" and newest > revision:
            raise BadRequest(f"{name}: inconsistent: {table_name} has a row at revision "
                             f"{newest}, newer than the registry's {revision}")
    for table in metadata.sorted_tables:
        for fk in table.foreign_keys:
            target = fk.column
            have = {r.get(target.name) for r in tables.get(target.table.name, [])}
            for row in tables.get(table.name, []):
                value = row.get(fk.parent.name)
                if value is not None and value not in have:
                    raise BadRequest(
                        f"{name}: inconsistent: {table.name}.{fk.parent.name} = {value!r} "
                        f"names no {target.table.name} row")


def restore(store: Store, data: Json, *, replace: bool = False) -> Json:
    """Replace the store's rows with the backup's (checked first). Unless replace, the store
    must be empty. A backup of an older schema is upgraded first. Returns the summary with
    the new revision."""
    data = upgraded(data)
    store.create_schema()
    tables = data["tables"]
    ordered = [t for t in metadata.sorted_tables if t.name != "state"]
    state_table = metadata.tables["state"]
    with store.write() as tx:
        conn = tx.conn
        current = tx.revision  # already bumped by write()
        if not replace:
            used = [t.name for t in ordered if t.name not in _NOT_RESTORED + _LIVENESS
                    and conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()]
            if used:
                raise Conflict(f"the registry is not empty ({', '.join(used)}); restore "
                               "--replace replaces everything in it")
        for table in reversed(ordered):
            conn.execute(table.delete())
        for table in ordered:
            if table.name in _NOT_RESTORED:
                continue
            rows = [{k: _decode(table.c[k], v) for k, v in row.items()}
                    for row in tables.get(table.name, [])]
            if rows:
                conn.execute(table.insert(), rows)
        saved = dict(tables["state"][0])
        revision = max(current, int(saved["revision"]) + 1)
        ec2_seq = max([int(saved.get("ec2_seq") or 0)]
                      + [int(r.get("ec2_id") or 0) for r in tables.get("instances", [])])
        # floor = revision: every follower's position is now outside the window (410), so
        # it reloads everything instead of trusting a history that no longer applies
        conn.execute(state_table.update().where(state_table.c.id == 1).values(
            revision=revision, floor=revision, ec2_seq=ec2_seq))
        tx.revision = revision
        tx.change("registry", "restore", "", {"sha256": data["sha256"]})
    # the commit's trimming may have lowered the floor again (revision - change_retention)
    with store.engine.connect().execution_options(openimds_write=True) as conn, conn.begin():
        conn.execute(state_table.update().where(state_table.c.id == 1)
                     .where(state_table.c.floor < revision).values(floor=revision))
    out = summary(data)
    out["revision"] = revision
    return out


__all__ = ["check", "dump", "read_backup", "restore", "schema_of", "upgraded",
           "write_backup"]
