"""Database engine and schema set-up; the same code serves SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.schema import CreateIndex
from sqlmodel import SQLModel, create_engine

from decision_router import tables, tokens  # noqa: F401  (registers the tables on SQLModel.metadata)


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    if database_url.startswith("sqlite"):
        engine = create_engine(database_url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
    else:
        engine = create_engine(database_url, pool_pre_ping=True, **kwargs)
    return engine


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


def create_schema(engine: Engine) -> None:
    _concurrently(lambda: SQLModel.metadata.create_all(engine))
    # create_all skips tables that exist, and so indexes added to them later: the stats indexes
    # (tables.py, "Stats") are built here on a store created before them (once; seconds per 1M alerts).
    names = tables.STATS_INDEXES.get(engine.dialect.name, [])
    for index in tables.AlertRecord.__table__.indexes:
        if index.name in names:
            _concurrently(lambda index=index: _execute(engine, CreateIndex(index, if_not_exists=True)))
    for name in tables.RETIRED_STATS_INDEXES.get(engine.dialect.name, []):  # replaced: writes stop paying for it
        _execute(engine, text(f"drop index if exists {name}"))


def schema_is_current(engine: Engine) -> bool:
    """Whether create_schema would change nothing: every table and stats index there, no retired index.

    One query on the catalog, so a read-only command (`stats`) skips create_schema's checks and DDL
    (a dozen round trips) on a store that is up to date, and runs it only on a new or older one.
    """
    from sqlalchemy import bindparam

    dialect = engine.dialect.name
    wanted = set(SQLModel.metadata.tables) | set(tables.STATS_INDEXES.get(dialect, []))
    retired = set(tables.RETIRED_STATS_INDEXES.get(dialect, []))
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
