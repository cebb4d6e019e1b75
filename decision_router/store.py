"""Database engine and schema set-up; the same code serves SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.schema import CreateIndex
from sqlmodel import SQLModel, create_engine

from decision_router import tables, tokens  # noqa: F401  (registers the tables on SQLModel.metadata)
from decision_router.tallies import install_tallies, tallies_installed


def make_engine(
    database_url: str, *, background_checkpoints: bool = False, mapped_reads: bool = False, **kwargs: Any
) -> Engine:
    """`background_checkpoints` (SQLite files; the router's engine): a thread of the engine, not
    its commits, copies the write-ahead log back into the database (see WalCheckpointer).

    `mapped_reads` (SQLite; a short-lived reader such as the `stats` command): pages are read
    through a memory map of the file instead of copied one by one, ~15% off the stats' scan of a
    million alerts. Not for the service: every page it ever read would then count in its RSS."""
    kwargs.setdefault("json_serializer", json_text)
    if database_url.startswith("sqlite"):
        engine = create_engine(database_url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        if mapped_reads:
            event.listen(engine, "connect", _sqlite_memory_map)
        if background_checkpoints and _is_file_database(engine.url):
            WalCheckpointer(engine).start()
    else:
        if make_url(database_url).get_driver_name() == "psycopg":
            # No server-side prepared statements (here and in enrich's SQL sources): psycopg prepares a
            # statement run 5 times, and PostgreSQL may then keep one generic plan for it, made while a
            # table was new and small and kept as it grows until an ANALYZE, a VACUUM or DDL replaces it
            # (with autovacuum off, never): the batch's reads went from an index lookup to reading the
            # whole table, 0.5 -> 8 ms a batch over 10,000 cooldown windows (issue 8). Each statement is
            # now planned as it runs, for a few hundredths of a millisecond. A caller's connect_args
            # still decide.
            kwargs["connect_args"] = {"prepare_threshold": None, **kwargs.get("connect_args", {})}
        engine = create_engine(database_url, pool_pre_ping=True, **kwargs)
    return engine


def _is_file_database(url: Any) -> bool:
    """Whether an SQLite URL names a file: not `:memory:`, nor a URI with `mode=memory` (which
    has no write-ahead log, and whose name alone would open a file of that name)."""
    return url.database not in (None, "", ":memory:") and url.query.get("mode") != "memory"


def _log() -> Any:
    import structlog  # here: the CLI's commands import this module, and start faster without it

    return structlog.get_logger("decision_router.store")


class WalCheckpointer:
    """Checkpoints an SQLite engine's write-ahead log from a thread, so that its commits need not.

    By default the commit that takes the log past 1,000 pages copies them back into the database
    and syncs it: on these machines 30-70 ms, one commit in ten at the router's small batches
    (median 1.3 ms), which set the p99 of the end-to-end latency. Here a thread runs PASSIVE
    checkpoints every `interval` seconds (they wait for no writer or reader) until the log is
    copied to its end (`catch_up`), and the engine's connections checkpoint only past
    `backstop_pages`: under writes that never pause, a passive checkpoint may never finish, and the
    log must not grow without end. Stops when the engine is disposed (SQLite checkpoints the rest
    when its last connection closes)."""

    def __init__(self, engine: Engine, *, interval: float = 0.1, backstop_pages: int = 8000) -> None:
        # Opened as the engine opens its own (a URI URL's `uri=True` and query, a relative path),
        # so that the thread checkpoints the engine's database and no other file.
        self.connect_args, self.connect_kwargs = engine.dialect.create_connect_args(engine.url)
        self.interval, self.backstop_pages = interval, backstop_pages
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="sqlite-wal-checkpoints", daemon=True)
        event.listen(engine, "connect", self._checkpoint_only_past_the_backstop)
        event.listen(engine, "engine_disposed", lambda _engine: self.stop())

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()

    def _run(self) -> None:
        try:
            connection = sqlite3.connect(*self.connect_args, **{**self.connect_kwargs, "timeout": 30,
                                                                "check_same_thread": False})
        except sqlite3.Error as exc:
            # No thread to checkpoint: connections made from now on checkpoint as SQLite does by
            # default, rather than only past the backstop, which would make each one 8x longer.
            self.stopping.set()
            _log().error("WAL checkpoint thread cannot open the database", error=str(exc))
            return
        try:
            while not self.stopping.wait(self.interval):
                try:
                    self.catch_up(connection)
                except sqlite3.Error as exc:  # busy for longer than the timeout: the next round tries again
                    _log().warning("WAL checkpoint failed", error=str(exc))
        finally:
            connection.close()

    @staticmethod
    def catch_up(connection: sqlite3.Connection, *, passes: int = 8) -> None:
        """PASSIVE checkpoints until one finds nothing new to copy. A pass copies the log as it was
        when the pass began; what commits add meanwhile waits for the next. Only a log copied to
        its end is written again from its start by the next commit: with one pass per round, the
        router's commits (every ~10 ms at 2,000 predictions/s) nearly always came in between, the
        log grew to the backstop, and the commit there checkpointed itself: 15-60 ms, 1-2% of them."""
        previous = None
        for _ in range(passes):
            _, logged, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if logged <= 0 or (logged, copied) == previous:  # no log (or empty), or nothing new since the last pass
                return
            previous = (logged, copied)

    def _checkpoint_only_past_the_backstop(self, dbapi_connection: Any, _record: Any) -> None:
        if self.stopping.is_set():  # a connection made after the thread stopped checkpoints as usual
            return
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA wal_autocheckpoint={int(self.backstop_pages)}")
        cursor.close()


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


def finite_json_text(value: Any) -> str:
    """json_text of a value known to hold no NaN or infinity (a prediction the quality gate passed,
    the router's own details): without the check for them, which reads back every text holding a
    null, as most stored predictions do (~5% of the router's time)."""
    try:
        return orjson.dumps(value, option=_ORJSON_AS_JSON_DUMPS).decode()
    except TypeError:
        return json.dumps(value)


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


MEMORY_MAP_BYTES = 1 << 30  # the first GiB of the file (SQLite's own cap is 2 GiB); the rest is read as usual


def _sqlite_memory_map(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA mmap_size={MEMORY_MAP_BYTES}")
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


def _added_indexes(dialect: str) -> set[str]:
    """The indexes added to tables after older stores were created: create_schema builds them there."""
    return (set(tables.STATS_INDEXES.get(dialect, [])) | set(tables.ADDED_INDEXES)
            | set(tables.ADDED_DIALECT_INDEXES.get(dialect, [])))


def create_schema(engine: Engine) -> None:
    _concurrently(lambda: SQLModel.metadata.create_all(engine))
    # create_all skips tables that exist, and so indexes added to them later: the stats indexes
    # (tables.py, "Stats") and the others added since are built here on a store created before them
    # (once; seconds per 1M alerts).
    # Only the missing ones: CREATE INDEX IF NOT EXISTS waits for running writers even when it exists.
    names = _added_indexes(engine.dialect.name) - _index_names(engine)
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
    install_tallies(engine)


def schema_is_current(engine: Engine) -> bool:
    """Whether create_schema would change nothing: every table and added index there, nothing retired,
    and on PostgreSQL the decisions' running counts kept (tallies.py).

    One query on the catalog, so a read-only command (`stats`) skips create_schema's checks and DDL
    (a dozen round trips) on a store that is up to date, and runs it only on a new or older one.
    """
    from sqlalchemy import bindparam

    dialect = engine.dialect.name
    wanted = set(SQLModel.metadata.tables) | _added_indexes(dialect)
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
        if dialect == "postgresql" and wanted <= present and not tallies_installed(connection, readable=False):
            return False
    return wanted <= present and not present & retired
