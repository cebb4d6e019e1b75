"""Database engine and schema set-up; the same code serves SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, NamedTuple

import orjson
from sqlalchemy import Column, Index, UniqueConstraint, event, literal, select, text, update
from sqlalchemy.engine import Connection, Dialect, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError, SQLAlchemyError
from sqlalchemy.schema import CreateIndex
from sqlmodel import SQLModel, create_engine

from decision_router import tables, tokens  # noqa: F401  (registers the tables on SQLModel.metadata)
from decision_router.tallies import install_tallies, installed_check, installed_params


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
        # The engine's connections are used from several threads; a lock is waited for 30 s unless the
        # URL's ?timeout=N says otherwise (connect_args would win over it).
        connect_args: dict[str, Any] = {"check_same_thread": False}
        if "timeout" not in make_url(database_url).query:
            connect_args["timeout"] = 30
        engine = create_engine(database_url, connect_args=connect_args, **kwargs)
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
        url = make_url(database_url)
        if "connect_timeout" not in url.query and not os.environ.get("PGCONNECT_TIMEOUT"):
            # libpq waits for a server that accepted the connection but does not answer with no limit:
            # `health` (the compose healthcheck) hung, and an outage took that long to be seen as one.
            kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S, **kwargs.get("connect_args", {})}
        engine = create_engine(database_url, pool_pre_ping=True, **kwargs)
    return engine


# PostgreSQL: seconds to connect, unless the URL (`?connect_timeout=N`) or PGCONNECT_TIMEOUT says otherwise.
CONNECT_TIMEOUT_S = 10


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
    attempt and raises on the last; one refused for want of a right (a reader role's `stats` on a
    store not yet upgraded) raises at once: no other process's work gives it that right."""
    for attempt in range(_SCHEMA_ATTEMPTS):
        try:
            step()
            return
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            if attempt == _SCHEMA_ATTEMPTS - 1 or getattr(exc.orig, "sqlstate", None) == _INSUFFICIENT_PRIVILEGE:
                raise


_INSUFFICIENT_PRIVILEGE = "42501"  # PostgreSQL's SQLSTATE: not the owner, no grant


def _execute(engine: Engine, statement: Any) -> None:
    with engine.begin() as connection:
        connection.execute(statement)


class SchemaUpgradeError(SQLAlchemyError):
    """An older store lacks a column that create_schema cannot add (one line, like the driver's errors:
    the commands report it as they report a store they cannot open)."""


class Catalog(NamedTuple):
    """What one catalog query found of the relations asked about."""

    relations: set[str]  # tables and indexes
    columns: set[tuple[str, str]]  # (table, column) of the tables among them
    tallies: bool  # PostgreSQL: the decisions' running counts are kept (tallies.py); asked only if wanted
    # PostgreSQL: indexes among them that no query uses (pg_index.indisvalid): a concurrent build still
    # running, or one interrupted (its worker killed), which stays so and must be built again.
    invalid: set[str]

    @property
    def usable(self) -> set[str]:
        return self.relations - self.invalid


def _read_catalog(connection: Connection, names: set[str], *, tallies: bool = False) -> Catalog:
    """The relations among `names` the store has (on SQLite: all it has), with their columns, in one query."""
    if connection.dialect.name == "sqlite":
        # Every relation, then a table-valued pragma per table: its columns. The few relations of a store
        # cost less to read than a list of names to compare them with costs to bind (2x).
        return _catalog_of(connection.execute(text(
            "select name, null, null, null from sqlite_master union all select m.name, c.name, null, null"
            " from sqlite_master m join pragma_table_info(m.name) c where m.type = 'table'")))
    # Each name as the search path resolves it (to_regclass), as create_all's checks see it: a lookup of
    # that name in that schema, where matching names in pg_class would also visit every other schema's
    # relations of that name, live or dead (9 of 10 ms in the tests' database, which makes and drops
    # schemas all day). The tallies' check rides along as a scalar subquery (run once, not per row)
    # instead of a second round trip.
    check, params = (installed_check(), installed_params(False)) if tallies else ("null", {})
    statement = text(
        f"select n.name, a.attname, ({check}), not i.indisvalid from unnest(cast(:names as text[])) n(name)"
        " join pg_class c on c.oid = to_regclass(quote_ident(n.name)) left join pg_attribute a"
        " on a.attrelid = c.oid and c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped"
        " left join pg_index i on i.indexrelid = c.oid")
    return _catalog_of(connection.execute(statement, {"names": sorted(names), **params}))


def _catalog_of(rows: Any) -> Catalog:
    rows = rows.all()
    return Catalog(relations={relation for relation, _, _, _ in rows},
                   columns={(relation, column) for relation, column, _, _ in rows if column is not None},
                   tallies=any(installed for _, _, installed, _ in rows),
                   invalid={relation for relation, _, _, invalid in rows if invalid})


def _dialect_indexes(dialect: str) -> dict[str, Index]:
    """Every index of the tables that create_all builds on this dialect (an index's ddl_if names the
    dialect it is for): create_schema builds those missing from tables that existed before them."""
    indexes = {}
    for table in SQLModel.metadata.tables.values():
        for index in table.indexes:
            only_on = index._ddl_if.dialect if index._ddl_if is not None else None
            if only_on is None or only_on == dialect or (not isinstance(only_on, str) and dialect in only_on):
                indexes[str(index.name)] = index
    return indexes


def _retired_relations(dialect: str) -> set[str]:
    """The indexes create_schema drops (replaced or unused) and, on PostgreSQL, the retired constraints' indexes."""
    retired = set(tables.RETIRED_STATS_INDEXES.get(dialect, [])) | set(tables.RETIRED_INDEXES.get(dialect, []))
    if dialect == "postgresql":  # a constraint's index has its name
        retired |= {constraint for _, constraint in tables.RETIRED_CONSTRAINTS}
    return retired


def _schema_columns() -> set[tuple[str, str]]:
    return {(table.name, column.name) for table in SQLModel.metadata.tables.values() for column in table.columns}


def cannot_add_column(column: Column[Any]) -> str | None:
    """Why ALTER TABLE ADD COLUMN cannot add `column` to a table that has rows (None: it can). A column
    added to a table in tables.py must be addable: stores created before it get it from create_schema."""
    if column.primary_key:
        return "it is part of the primary key"
    if column.unique or any(isinstance(constraint, UniqueConstraint) and constraint.columns.contains_column(column)
                            for constraint in column.table.constraints):
        return "it is unique (SQLite cannot add such a column; a unique index can be built instead)"
    if not column.nullable and column.server_default is None and not (column.default is not None
                                                                       and column.default.is_scalar):
        return "it is NOT NULL with neither a server_default nor a scalar default for the rows already there"
    return None


def add_column_ddl(column: Column[Any], dialect: Dialect) -> str:
    """The ALTER TABLE that adds `column` to its table: its type as CREATE TABLE writes it for `dialect`,
    NULL for the rows there if it is nullable, else its server_default, else its scalar Python default as a
    literal. PostgreSQL's IF NOT EXISTS makes a second process's ALTER (a worker starting too) a no-op."""
    table = column.table
    reason = cannot_add_column(column)
    if reason:
        raise SchemaUpgradeError(f"the store's table {table.name} has no column {column.name}, which this"
                                 f" version needs and cannot add: {reason}")
    compiler = dialect.ddl_compiler(dialect, None)
    column_type = compiler.type_compiler.process(column.type, type_expression=column)
    spec = f"{compiler.preparer.format_column(column)} {column_type}"
    default = compiler.get_column_default_string(column)
    if default is None and not column.nullable:
        assert column.default is not None  # cannot_add_column refused a NOT NULL column without one
        default = str(literal(column.default.arg, column.type).compile(
            dialect=dialect, compile_kwargs={"literal_binds": True}))
    if default is not None:
        spec += f" DEFAULT {default}"
    if not column.nullable:
        spec += " NOT NULL"
    if_not_exists = " IF NOT EXISTS" if dialect.name == "postgresql" else ""
    return f"ALTER TABLE {compiler.preparer.format_table(table)} ADD COLUMN{if_not_exists} {spec}"


def _column_names(connection: Connection, table: str) -> set[str]:
    query = ("select name from pragma_table_info(:table)" if connection.dialect.name == "sqlite"
             else "select attname from pg_attribute where attrelid = to_regclass(quote_ident(:table))"
                  " and attnum > 0 and not attisdropped")
    return set(connection.execute(text(query), {"table": table}).scalars())


def _add_column(engine: Engine, column: Column[Any], ddl: str) -> None:
    with engine.begin() as connection:
        # Another process may have added it since the catalog was read: then nothing to do. PostgreSQL's
        # ALTER would be a no-op too, but only once it had the table to itself, after its running writes.
        if column.name in _column_names(connection, column.table.name):
            return
        connection.exec_driver_sql(ddl)
    _log().info("column added to the store", table=column.table.name, column=column.name, ddl=ddl)


def _add_missing_columns(engine: Engine, catalog: Catalog) -> None:
    """Add the columns tables.py has and the store's tables (created by an older version) lack; create_all
    skips existing tables. Every one is checked before any is added: a column that cannot be added stops
    the upgrade before it changes anything."""
    missing = [column for table in SQLModel.metadata.sorted_tables if table.name in catalog.relations
               for column in table.columns if (table.name, column.name) not in catalog.columns]
    statements = [(column, add_column_ddl(column, engine.dialect)) for column in missing]
    for column, ddl in statements:
        _concurrently(lambda column=column, ddl=ddl: _add_column(engine, column, ddl))


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


def check_writable(engine: Engine) -> None:
    """Raise the store's error if an SQLite store cannot be written (a read-only file or directory, mode=ro).
    It opens and reads, and a run that writes to it (`simulate`, `demo`) would wait out the failing writes
    like an outage, forever. Rewriting user_version to its value is a write that changes nothing."""
    if engine.dialect.name != "sqlite":
        return
    with engine.begin() as connection:
        version = connection.exec_driver_sql("PRAGMA user_version").scalar()
        connection.exec_driver_sql(f"PRAGMA user_version = {int(version or 0)}")


def create_schema(engine: Engine) -> None:
    _concurrently(lambda: SQLModel.metadata.create_all(engine))
    dialect = engine.dialect.name
    indexes = _dialect_indexes(dialect)
    retired = [*tables.RETIRED_STATS_INDEXES.get(dialect, []), *tables.RETIRED_INDEXES.get(dialect, [])]
    with engine.connect() as connection:
        catalog = _read_catalog(connection, set(SQLModel.metadata.tables) | set(indexes) | set(retired))
    # create_all skips tables that exist: the columns added to them since are added here, and then the
    # indexes added to them since (the stats indexes, tables.py "Stats", those on an added column...),
    # once; seconds per 1M alerts for an index. Only the missing ones: CREATE INDEX IF NOT EXISTS waits
    # for running writers even when the index exists.
    _add_missing_columns(engine, catalog)
    missing = [indexes[name] for name in sorted(set(indexes) - catalog.usable)]
    if dialect == "postgresql":
        # create_all built the indexes of the tables it created: those missing are on tables an older version
        # created, which may hold millions of alerts that the running workers (older ones too) keep writing to.
        _build_indexes_concurrently(engine, missing)
        for table_name, constraint in tables.RETIRED_CONSTRAINTS:  # replaced by an added index, built above
            _drop_constraint(engine, table_name, constraint)
        _drop_indexes_concurrently(engine, [name for name in retired if name in catalog.relations])
    else:
        for index in missing:
            _concurrently(lambda index=index: _execute(engine, CreateIndex(index, if_not_exists=True)))
        for name in retired:  # replaced or unused: writes stop paying for it
            _execute(engine, text(f"drop index if exists {name}"))
    repair_suppressed_closed(engine)
    install_tallies(engine)


def repair_suppressed_closed(engine: Engine) -> int:
    """Set the cooldown-suppressed decisions an older version closed on their outcome back to 'suppressed' (the
    outcome stays): nobody's to-do, shown and filtered as suppressed, not as closed alerts. Read through
    ix_alerts_suppressed_closed, which holds only those: nothing to read on a store repaired or written since.
    Returns how many it repaired."""
    alerts = tables.AlertRecord.__table__
    with engine.begin() as connection:
        # Looked for first: an UPDATE is a write even when it changes nothing, and a store opened read-only (or
        # by a role that may not write the alerts) is not to be refused for a repair it does not need.
        if connection.execute(select(alerts.c.alert_id).where(tables.SUPPRESSED_CLOSED).limit(1)).first() is None:
            return 0
        repaired = connection.execute(update(alerts).where(tables.SUPPRESSED_CLOSED).values(status="suppressed")).rowcount
    if repaired:
        _log().info("suppressed decisions closed by an older version set back to suppressed", alerts=repaired)
    return repaired


# One PostgreSQL session at a time builds or drops the indexes of a store (its schema): the others wait.
_INDEX_LOCK_KEYS = "hashtext('decision_router index builds'), hashtext(coalesce(current_schema(), ''))"
_TRY_INDEX_LOCK = text(f"select pg_try_advisory_lock({_INDEX_LOCK_KEYS})")
_INDEX_UNLOCK = text(f"select pg_advisory_unlock({_INDEX_LOCK_KEYS})")
_INDEX_LOCK_POLL = 0.1  # seconds between two tries of a worker waiting for another's index builds


@contextmanager
def _index_lock(engine: Engine) -> Iterator[Connection]:
    """An autocommit connection (CONCURRENTLY refuses a transaction block) holding the store's index lock:
    of several workers starting on an older store, one builds each index, the others wait and find it built.

    The others poll for the lock rather than wait in pg_advisory_lock. A session waiting for any lock holds a
    snapshot, and a concurrent build waits for every snapshot older than its own before it ends: it would wait
    for the worker that waits for it, PostgreSQL would cancel one of them (deadlock detected), the build as
    often as not, which leaves its index invalid. A try takes its snapshot for a moment only. Between tries,
    this process holds no transaction open either, so the build does not wait for its own process."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        waiting = False
        while not connection.execute(_TRY_INDEX_LOCK).scalar():
            if not waiting:
                _log().info("waiting for another worker's index builds")
                waiting = True
            time.sleep(_INDEX_LOCK_POLL)
        try:
            yield connection
        finally:
            try:
                connection.execute(_INDEX_UNLOCK)
            except SQLAlchemyError:
                connection.invalidate()  # closed: the lock goes with its session, not back to the pool


def _build_indexes_concurrently(engine: Engine, indexes: list[Index]) -> None:
    """Build each index with CREATE INDEX CONCURRENTLY: the table's writes go on meanwhile (a plain CREATE
    INDEX holds them for the whole build, seconds per million alerts), and the build waits for the writes
    running when it starts. Also rebuilds one left invalid (a build interrupted: its worker killed)."""
    if not indexes:
        return
    with _index_lock(engine) as connection:
        for index in indexes:
            _concurrently(lambda index=index: _build_concurrently(connection, index))


def _build_concurrently(connection: Connection, index: Index) -> None:
    name, table = str(index.name), index.table.name if index.table is not None else None
    valid = connection.execute(_INDEX_VALID, {"name": name}).scalar()
    if valid:  # built by another worker while this one waited for it
        return
    if valid is not None:
        # Invalid, and no build running (this session holds the lock): what an interrupted concurrent build
        # leaves. Writes keep it up to date, no query reads it, and IF NOT EXISTS would keep it as it is.
        _log().warning("dropping an invalid index left by an unfinished build", index=name, table=table)
        connection.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {_quoted(connection, name)}")
    _log().info("building index", index=name, table=table, concurrently=True)
    started = time.monotonic()
    connection.exec_driver_sql(concurrent_index_ddl(index, connection.dialect))
    seconds = round(time.monotonic() - started, 3)
    _log().info("index built", index=name, table=table, concurrently=True, seconds=seconds)


_INDEX_VALID = text("select indisvalid from pg_index where indexrelid = to_regclass(quote_ident(:name))")
_CREATE_INDEX = re.compile(r"^CREATE (UNIQUE )?INDEX ")


def concurrent_index_ddl(index: Index, dialect: Dialect) -> str:
    """CREATE INDEX CONCURRENTLY IF NOT EXISTS for `index` (the metadata's indexes are not marked concurrent:
    create_all builds them in the transaction that creates their table, where CONCURRENTLY is refused)."""
    ddl = str(CreateIndex(index, if_not_exists=True).compile(dialect=dialect))
    concurrent, count = _CREATE_INDEX.subn(lambda created: f"{created.group(0)}CONCURRENTLY ", ddl)
    if count != 1:
        raise ValueError(f"not a CREATE INDEX statement: {ddl}")
    return concurrent


def _drop_indexes_concurrently(engine: Engine, names: list[str]) -> None:
    """Drop the retired indexes a store has with DROP INDEX CONCURRENTLY: a plain DROP INDEX locks the
    table out, so its writes wait behind every running query of the table, and every later one behind it."""
    if not names:
        return
    with _index_lock(engine) as connection:
        for name in names:  # gone already if another worker dropped it while this one waited: no error
            connection.exec_driver_sql(f"DROP INDEX CONCURRENTLY IF EXISTS {_quoted(connection, name)}")
            _log().info("retired index dropped", index=name)


def _quoted(connection: Connection, name: str) -> str:
    return connection.dialect.identifier_preparer.quote(name)


def schema_is_current(engine: Engine) -> bool:
    """Whether create_schema would change nothing: every table, column and index there, nothing retired,
    and on PostgreSQL the decisions' running counts kept (tallies.py).

    One query on the catalog, so a read-only command (`stats`) skips create_schema's checks and DDL
    (a dozen round trips) on a store that is up to date, and runs it only on a new or older one.
    """
    dialect = engine.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        return False
    wanted = set(SQLModel.metadata.tables) | set(_dialect_indexes(dialect))
    retired = _retired_relations(dialect)
    with engine.connect() as connection:
        catalog = _read_catalog(connection, wanted | retired, tallies=dialect == "postgresql")
    return (wanted <= catalog.usable and not catalog.relations & retired and _schema_columns() <= catalog.columns
            and (dialect != "postgresql" or catalog.tallies))
