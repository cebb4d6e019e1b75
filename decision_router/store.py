"""Database engine and schema set-up; the same code serves SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.schema import CreateIndex
from sqlmodel import SQLModel, create_engine

from decision_router import tables, tokens  # noqa: F401  (registers the tables on SQLModel.metadata)


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    kwargs.setdefault("json_serializer", json_text)
    if database_url.startswith("sqlite"):
        engine = create_engine(database_url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(database_url, pool_pre_ping=True, **kwargs)
    return engine


# Types json.dumps refuses, refused here too (orjson would write them): the same values serialise.
_ORJSON_AS_JSON_DUMPS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def json_text(value: Any) -> str:
    """The text of a JSON column (the engine's json_serializer, also used by tracker.bulk_insert):
    orjson's, a few times cheaper than json.dumps for the same value read back; json.dumps' for
    what orjson refuses (integers beyond 64 bits, keys that are not text, nesting deeper than 254)
    or would change (it writes NaN and Infinity as null)."""
    try:
        text = orjson.dumps(value, option=_ORJSON_AS_JSON_DUMPS)
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(value)
    # A non-finite float is written as null: read back, the text differs from the value. Only
    # text with a null can hide one, so the check costs nothing for the others.
    if b"null" in text and orjson.loads(text) != value:
        return json.dumps(value)
    return text.decode()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the CLI read stats while the service writes; with synchronous=NORMAL a commit
    # does not wait for fsync (a power cut may lose the last commits, never corrupt the file).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # 16 MiB of page cache per connection (the default is 2 MiB): more of the index pages each
    # batch of inserts touches stay in memory as the store grows. Per connection, and the pool
    # holds several: a larger cache shows up as RSS that grows with the store for a long time.
    cursor.execute("PRAGMA cache_size=-16384")
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.close()


def within(query: Any, column: Any, since: datetime | None, until: datetime | None) -> Any:
    """Restrict a query to since <= column < until (either bound optional)."""
    if since is not None:
        query = query.where(column >= since)
    if until is not None:
        query = query.where(column < until)
    return query


_SCHEMA_ATTEMPTS = 10  # one per table at worst, when several processes create a new store at once


def _concurrently(step: Callable[[], None]) -> None:
    """Run a schema step that another process (a worker starting at the same moment) may be
    running too: when it created the table or index between our check and our CREATE, check
    again, which skips what exists now. A step that fails for another reason fails every
    attempt and raises on the last."""
    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            step()
            return
        except (OperationalError, ProgrammingError, IntegrityError):
            if attempt == _SCHEMA_ATTEMPTS - 1:
                raise


def _execute(engine: Engine, statement: Any) -> None:
    with engine.begin() as connection:
        connection.execute(statement)


def _index_names(engine: Engine) -> set[str]:
    query = ("select name from sqlite_master where type = 'index'" if engine.dialect.name == "sqlite"
             else "select indexname from pg_indexes where schemaname = current_schema()")
    with engine.connect() as connection:
        return set(connection.execute(text(query)).scalars())


def _drop_constraint(engine: Engine, table_name: str, constraint: str) -> None:
    # ALTER TABLE locks the table out, running writers first, even with nothing to drop: look first,
    # so that a worker starting on an up-to-date store does not stall the others.
    with engine.begin() as connection:
        present = connection.execute(
            text("select 1 from pg_constraint where conname = :name and conrelid = to_regclass(:table)"),
            {"name": constraint, "table": table_name},
        ).first()
        if present:
            connection.execute(text(f"alter table {table_name} drop constraint if exists {constraint}"))


def create_schema(engine: Engine) -> None:
    _concurrently(lambda: SQLModel.metadata.create_all(engine))
    # create_all skips tables that exist, and so indexes added to them later: the stats indexes
    # (tables.py, "Stats") and the others added since are built here on a store created before them
    # (once; seconds per 1M alerts).
    names = set(tables.STATS_INDEXES.get(engine.dialect.name, [])) | set(tables.ADDED_INDEXES)
    names -= _index_names(engine)  # CREATE INDEX IF NOT EXISTS waits for running writers even when it exists
    for table in SQLModel.metadata.sorted_tables:
        for index in table.indexes:
            if index.name in names:
                _concurrently(lambda index=index: _execute(engine, CreateIndex(index, if_not_exists=True)))
    if engine.dialect.name == "postgresql":  # replaced by an added index, built above
        for table_name, constraint in tables.RETIRED_CONSTRAINTS:
            _drop_constraint(engine, table_name, constraint)
    retired = [*tables.RETIRED_STATS_INDEXES.get(engine.dialect.name, []),
               *tables.RETIRED_INDEXES.get(engine.dialect.name, [])]
    for name in retired:  # replaced or unused: writes stop paying for it
        _execute(engine, text(f"drop index if exists {name}"))


def schema_is_current(engine: Engine) -> bool:
    """Whether create_schema would change nothing: every table and added index there, nothing retired.

    One query on the catalog, so a read-only command (`stats`) skips create_schema's checks and DDL
    (a dozen round trips) on a store that is up to date, and runs it only on a new or older one.
    """
    from sqlalchemy import bindparam

    dialect = engine.dialect.name
    wanted = set(SQLModel.metadata.tables) | set(tables.STATS_INDEXES.get(dialect, [])) | set(tables.ADDED_INDEXES)
    retired = set(tables.RETIRED_STATS_INDEXES.get(dialect, [])) | set(tables.RETIRED_INDEXES.get(dialect, []))
    if dialect == "postgresql":  # a constraint's index has its name
        retired |= {constraint for _, constraint in tables.RETIRED_CONSTRAINTS}
    if dialect == "sqlite":
        query = "select name from sqlite_master where name in :names"
    elif dialect == "postgresql":  # the relations the search path resolves, as create_all's checks see them
        query = "select relname from pg_class where relname in :names and pg_table_is_visible(oid)"
    else:
        return False
    statement = text(query).bindparams(bindparam("names", expanding=True))
    with engine.connect() as connection:
        present = set(connection.execute(statement, {"names": sorted(wanted | retired)}).scalars())
    return wanted <= present and not present & retired
