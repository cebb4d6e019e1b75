"""Context enrichment: look up extra context per prediction at routing time.

`routing.yaml` declares context sources under `context_sources:`; rules address what they
return as `lookup.<source>.<field>`, in `when:` conditions, in a rule's `context:` list and in
`owner.from` (docs/rules.md#context-sources). The pipeline calls `ContextEnricher.lookup`
once per batch, before routing, and puts each prediction's result in its routing document
under `lookup`.

Two kinds of source:
- `redis_hash`: one HMGET per distinct key, pipelined per batch (one round trip). The key
  is the service's stream prefix followed by the pattern formatted with the prediction.
  Values are text, as stored.
- `sql`: one SELECT per distinct parameter set in the batch (usually: per entity), run in a
  worker thread inside a read-only transaction; the first row's columns are the fields. Its
  engine (database_url_env) gives up connecting after the source's timeout_s (see _engine_for).

Only the fields some rule reads are fetched (Redis) or kept (SQL), and they are bounded like a
prediction (`lookup_limits`): a value over the size limit, or nested too deep, is dropped, and
so is a source's whole result for a prediction still over the size limit without it; so is text
no store can hold (a NUL character, bytes that are not UTF-8), which the gate refuses in a
prediction. Dropped fields are missing, as if the source had not had them; one warning per batch
names the source and the sizes, never the values.

A lookup never fails routing. A source that errors or exceeds its `timeout_s` yields no
fields for that batch (so the fields a rule asks for are listed in the alert's
`missing_context`), logs one warning per batch and is counted in `failures`; a Redis key that
fails, or a SQL parameter set the database refuses as data (an entity id that is no integer for
an integer column), fails only its own predictions. Only sources
that some rule uses are looked up; the enricher reads the pipeline's current rule set on
every batch, so a hot reload that changes `context_sources` takes effect at once.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime
from datetime import time as clock_time
from decimal import Decimal
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DataError, DBAPIError

from decision_router import metrics
from decision_router.contracts import Prediction, storable_text
from decision_router.keys import Keys
from decision_router.rules import ContextSource, RuleSet
from decision_router.rules.spec import LOOKUP
from decision_router.settings import PayloadLimits, check_database_url, redact_url
from decision_router.store import json_text, make_engine
from decision_router.streams import as_text

log = structlog.get_logger("decision_router.enrich")

Fields = dict[str, Any]
# Threads for SQL lookups, apart from the event loop's default ones on which the pipeline writes the
# store: a source whose database hangs (each connect waiting out its connect_timeout, long after the
# source's timeout_s) ties up these, never those, and no more than this many connects at once.
SQL_THREADS = 4
# libpq's least connect_timeout (it takes whole seconds, and raises anything under 2 to 2).
MIN_CONNECT_TIMEOUT_S = 2
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


class SourceError(Exception):
    """A context source that cannot be used as configured (e.g. its URL variable is unset)."""


def parameters(prediction: Prediction) -> dict[str, str]:
    """What a key pattern ({name}) or a query (:name) can use of a prediction."""
    return {
        "entity_type": prediction.entity_type,
        "entity_id": prediction.entity_id,
        "prediction_id": prediction.prediction_id,
        "model": prediction.model,
    }


def hash_key(pattern: str, prediction: Prediction, *, prefix: str = "") -> str:
    """The Redis key of a `redis_hash` source for one prediction: the stream prefix, then the
    pattern with its placeholders filled in (values are inserted as they are)."""
    return prefix + pattern.format_map(parameters(prediction))


def referenced_fields(ruleset: RuleSet) -> dict[str, tuple[str, ...]]:
    """Declared source -> the fields some rule reads of it (lookup.<source>.<field> in when,
    context or owner.from; of lookup.<source>.<field>.<key>, the field), sources and fields in
    order of first use. Other sources are never queried, other fields never fetched nor kept."""
    fields: dict[str, dict[str, None]] = {}
    for rule in ruleset.rules:
        paths = [path for path, _ in rule.conditions] + [rule.owner_from or ""] + list(rule.context_fields)
        for path in paths:
            parts = path.split(".")
            if parts[0] == LOOKUP and len(parts) >= 3 and parts[1] in ruleset.context_sources:
                fields.setdefault(parts[1], {})[parts[2]] = None
    return {name: tuple(names) for name, names in fields.items()}


@dataclass(frozen=True)
class LookupLimits:
    """Bounds on what one source gives one prediction, derived from the prediction's own
    (DECISION_ROUTER_MAX_PAYLOAD_BYTES / _DEPTH): a looked-up value lands in the stored document
    (under lookup.<source>) and on the alert, and must not make either larger or deeper than a
    prediction may be."""

    max_bytes: int  # a value, and a source's kept fields together (names + values, UTF-8 bytes)
    max_depth: int  # nesting of one value (a SQL json column): objects and lists, the value being level 1


def lookup_limits(limits: PayloadLimits) -> LookupLimits:
    """A quarter of the payload size (16 KiB by default), so that a prediction with a few sources
    stays within a small multiple of its own limit; a value nested at most as deep as it can be
    inside a prediction's document (document -> lookup -> source -> value)."""
    return LookupLimits(max_bytes=limits.max_bytes // 4, max_depth=max(1, limits.max_depth - 3))


def _size(value: Any) -> int:
    """UTF-8 bytes of a looked-up value (Redis replies are bytes; others as their JSON text)."""
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if isinstance(value, (dict, list)):
        return _size(json_text(value))
    return len(str(value))


class NotUtf8(bytes):
    """A SQLite text value that is not UTF-8, as stored: sqlite3 fails the whole query on it (OperationalError
    "Could not decode to UTF-8 column"), so the lookup reads it as this, and `bounded` drops it."""


def _sqlite_text(data: bytes) -> str | bytes:
    """sqlite3's text_factory during a lookup: text as str, or NotUtf8 when it cannot be decoded."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return NotUtf8(data)


def _unstorable(value: Any) -> bool:
    """Whether a looked-up value holds text no store can hold, as the gate refuses it in a prediction
    (contracts.storable_text): a NUL character, or bytes that are not UTF-8 (a Redis reply as sent, NotUtf8),
    also in a name or an item of a SQL json column's value."""
    if isinstance(value, bytes):
        if b"\x00" in value:
            return True
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False
    if isinstance(value, str):
        return not storable_text(value)
    if isinstance(value, dict):
        return any(_unstorable(k) or _unstorable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_unstorable(item) for item in value)
    return False


def _too_deep(value: Any, levels: int) -> bool:
    """Whether objects and lists in `value` nest more than `levels` deep (the value itself is level 1)."""
    if not isinstance(value, (dict, list)):
        return False
    if levels <= 0:
        return True
    items = value.values() if isinstance(value, dict) else value
    return any(_too_deep(item, levels - 1) for item in items)


def bounded(fields: Mapping[str, Any], limits: LookupLimits) -> tuple[dict[str, Any], list[str]]:
    """`fields` without the values over `limits` or holding text no store can hold, or none of them if those left
    are still over the size limit together; and what was dropped, described by name and size (never by value)."""
    kept: dict[str, Any] = {}
    dropped: list[str] = []
    total = 0
    for name, value in fields.items():
        if _too_deep(value, limits.max_depth):  # first: it looks no deeper than the limit, the size's JSON text would
            dropped.append(f"{name}: nested more than {limits.max_depth} levels")
        elif _unstorable(value):  # routed on and stored, "4\x002" would fail the store's write (PostgreSQL)
            dropped.append(f"{name}: {_size(value)} bytes holding a NUL character or text that is not UTF-8")
        elif (size := _size(value)) > limits.max_bytes:
            dropped.append(f"{name}: {size} bytes")
        else:
            kept[name] = value
            total += len(name) + size
    if total > limits.max_bytes:
        dropped.append(f"{', '.join(kept)} together: {total} bytes")
        kept = {}
    return kept, dropped


def redact(message: str) -> str:
    """Mask passwords of any URL in an error message (settings.redact_url)."""
    return _URL.sub(lambda m: redact_url(m.group()), message)


def jsonable(value: Any) -> Any:
    """A SQL value as alerts and the store can hold it (JSON): numbers stay numbers, dates
    become ISO text, anything else unusual becomes text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, bool, int, float, NotUtf8)):
        return value  # NotUtf8 as read, for `bounded` to drop
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value)
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, (datetime, date, clock_time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return str(value)


def _first_line(text_: str) -> str:
    return text_.strip().splitlines()[0] if text_.strip() else ""


def _describe(exc: BaseException, source: ContextSource) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {source.timeout_s:g}s"
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        # Not str(exc): SQLAlchemy appends the statement, its parameters and a link.
        return f"{type(exc.orig).__name__}: {_first_line(str(exc.orig))}"
    return f"{type(exc).__name__}: {_first_line(str(exc))}" if str(exc) else type(exc).__name__


ParamSet = tuple[tuple[str, str], ...]


@contextmanager
def _read_only(connection: Connection, deadline: float) -> Iterator[Callable[[], None]]:
    """A read-only transaction bounded by `deadline` (time.monotonic()); yields a function to
    call before each query, which raises TimeoutError once the deadline has passed.

    PostgreSQL: SET TRANSACTION READ ONLY and a statement_timeout of the time left, so the
    server cancels a slow query. SQLite: PRAGMA query_only and a progress handler that
    interrupts the query at the deadline (both undone, the connection is the pool's).
    """

    def remaining_ms() -> int:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return max(1, math.ceil(left * 1000))

    if connection.dialect.name == "postgresql":

        def before_query() -> None:
            connection.exec_driver_sql(f"SET LOCAL statement_timeout = {remaining_ms()}")

        connection.exec_driver_sql("SET TRANSACTION READ ONLY")
        yield before_query
        return

    def check_deadline() -> None:
        remaining_ms()

    raw = connection.connection.driver_connection
    connection.exec_driver_sql("PRAGMA query_only = ON")
    raw.set_progress_handler(lambda: time.monotonic() > deadline, 1000)  # type: ignore[union-attr]
    # Text that is not UTF-8 fails only its value (NotUtf8), not the source's whole batch.
    text_factory, raw.text_factory = raw.text_factory, _sqlite_text  # type: ignore[union-attr]
    try:
        yield check_deadline
    finally:
        raw.text_factory = text_factory  # type: ignore[union-attr]
        raw.set_progress_handler(None, 0)  # type: ignore[union-attr]
        connection.exec_driver_sql("PRAGMA query_only = OFF")


def run_queries(
    engine: Engine,
    sql: str,
    param_sets: Sequence[ParamSet],
    deadline: float,
    fields: Collection[str] | None = None,
    errors: list[tuple[ParamSet, DataError]] | None = None,
) -> dict[ParamSet, Fields]:
    """The first row of `sql` per parameter set ({} when there is none), read-only, within
    `deadline` (time.monotonic()); of its columns, only `fields` if given. Blocking: the
    enricher runs it in a thread.

    With `errors`, a parameter set the database refuses as data (an entity id that is no integer
    for an integer column: SQLSTATE class 22) is added there and left out, and the others are
    still queried; without, or on any other error, the error is raised."""
    statement = text(sql)
    rows: dict[ParamSet, Fields] = {}
    pending = deque(param_sets)
    with engine.connect() as connection:
        while pending:
            try:
                with _read_only(connection, deadline) as before_query:
                    while pending:
                        params = pending[0]
                        before_query()
                        try:
                            row = connection.execute(statement, dict(params)).mappings().first()
                        except DBAPIError as exc:
                            if time.monotonic() >= deadline - 0.01:  # cancelled by the server / interrupted
                                raise TimeoutError from None
                            if errors is None or not isinstance(exc, DataError):
                                raise
                            # One odd entity id must not blind the source for the whole batch. PostgreSQL
                            # has aborted the transaction: the rest run in a new one.
                            errors.append((pending.popleft(), exc))
                            break
                        pending.popleft()
                        columns = {} if row is None else {str(k): v for k, v in row.items()}
                        rows[params] = {k: jsonable(v) for k, v in columns.items() if fields is None or k in fields}
            finally:
                connection.rollback()
    return rows


class ContextEnricher:
    """Looks up the context sources a rule set uses, for a batch of predictions.

    `ruleset` is a RuleSet or a function returning the current one (the service passes
    `lambda: pipeline.ruleset`, so a hot reload is followed). `engine` is the service's own
    database, used by SQL sources without `database_url_env`; `keys` gives the stream prefix
    put in front of every Redis hash key; `limits` are the predictions' (settings.payload_limits),
    from which the looked-up values' are derived (lookup_limits). `failures` counts failed batch
    lookups per source, `oversized` the batches in which a source gave values over the limits.
    """

    def __init__(
        self,
        ruleset: RuleSet | Callable[[], RuleSet],
        *,
        redis: Redis | None = None,
        engine: Engine | None = None,
        keys: Keys | None = None,
        environ: Mapping[str, str] | None = None,
        limits: PayloadLimits | None = None,
    ) -> None:
        self._ruleset: Callable[[], RuleSet] = ruleset if callable(ruleset) else (lambda: ruleset)
        self.redis = redis
        self.engine = engine
        self.prefix = keys.prefix if keys is not None else ""
        self.environ = os.environ if environ is None else environ
        self.limits = lookup_limits(limits or PayloadLimits())
        self.failures: Counter[str] = Counter()
        self.oversized: Counter[str] = Counter()
        self._engines: dict[tuple[str, int | None], Engine] = {}  # made from database_url_env, by URL and connect timeout
        self._engines_lock = threading.Lock()
        # The rule set last seen, the sources it uses and, by source, the fields it reads.
        self._active: tuple[RuleSet, tuple[ContextSource, ...], dict[str, tuple[str, ...]]] | None = None
        self._sql_threads = ThreadPoolExecutor(max_workers=SQL_THREADS, thread_name_prefix="context-sql")

    def sources(self) -> tuple[ContextSource, ...]:
        """The sources the current rule set uses (recomputed when the rule set changes)."""
        return self._current()[1]

    def _current(self) -> tuple[RuleSet, tuple[ContextSource, ...], dict[str, tuple[str, ...]]]:
        ruleset = self._ruleset()
        active = self._active
        if active is None or active[0] is not ruleset:
            fields = referenced_fields(ruleset)
            active = self._active = (ruleset, tuple(ruleset.context_sources[name] for name in fields), fields)
            self._dispose_unused(active[1])
        return active

    def _dispose_unused(self, sources: Sequence[ContextSource]) -> None:
        """Dispose of the engines no source of a new rule set uses: a reload that dropped a source, or
        changed its timeout_s (another engine), left the old pool's connections open for good. A
        lookup still running on one (past its timeout) keeps its connection until it returns it."""
        wanted = set()
        for source in sources:
            if source.kind == "sql" and source.database_url_env is not None:
                try:
                    wanted.add(self._engine_key(source))
                except SourceError:
                    pass  # the lookup says so, each batch
        with self._engines_lock:
            unused = [self._engines.pop(key) for key in list(self._engines) if key not in wanted]
        for engine in unused:
            engine.dispose()

    async def lookup(self, predictions: Sequence[Prediction]) -> dict[str, dict[str, Fields]]:
        """prediction_id -> {source name: {field: value}} of the fields rules read, within the
        limits; a failed source is left out."""
        _, sources, fields = self._current()
        if not sources or not predictions:
            return {}
        found = await asyncio.gather(
            *(self._lookup_source(source, fields[source.name], predictions) for source in sources)
        )
        result: dict[str, dict[str, Fields]] = {}
        for source, by_prediction in zip(sources, found, strict=True):
            for prediction_id, values in by_prediction.items():
                result.setdefault(prediction_id, {})[source.name] = values
        return result

    def close(self) -> None:
        """Dispose of the engines made for `database_url_env` (not the service's own), and drop
        queued SQL lookups (a query in progress ends at its deadline)."""
        self._sql_threads.shutdown(wait=False, cancel_futures=True)
        with self._engines_lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.dispose()

    # one source ---------------------------------------------------------------------

    async def _lookup_source(
        self, source: ContextSource, fields: tuple[str, ...], predictions: Sequence[Prediction]
    ) -> dict[str, Fields]:
        try:
            if source.kind == "redis_hash":
                found, problem = await asyncio.wait_for(self._redis_hash(source, fields, predictions), source.timeout_s)
            else:
                found, problem = await self._sql(source, fields, predictions)
        except Exception as exc:  # noqa: BLE001 - a lookup never fails routing
            self._failed(source, len(predictions), _describe(exc, source))
            return {}
        if problem is not None:
            self._failed(source, len(predictions), problem)
        return found

    def _failed(self, source: ContextSource, predictions: int, error: str) -> None:
        self.failures[source.name] += 1
        metrics.context_lookup_failed(source.name)  # in the logs alone, a source down for hours went unseen
        log.warning(
            "context lookup failed; its fields are missing for this batch",
            source=source.name,
            kind=source.kind,
            predictions=predictions,
            error=redact(error),
            failures=self.failures[source.name],
        )

    def _bounded(
        self, source: ContextSource, by_key: Mapping[Any, Fields], keys: Mapping[str, Any]
    ) -> dict[str, Fields]:
        """prediction_id -> its key's fields within the limits (`by_key`: the fields per distinct
        Redis key or parameter set; `keys`: prediction_id -> its key). Warns once for the batch."""
        kept: dict[Any, Fields] = {}
        dropped: dict[Any, list[str]] = {}
        for key, fields in by_key.items():
            kept[key], problems = bounded(fields, self.limits)
            if problems:
                dropped[key] = problems
        if dropped:
            self.oversized[source.name] += 1
            metrics.context_lookup_oversized(source.name)
            problems = [problem for key_problems in dropped.values() for problem in key_problems]
            log.warning(
                "looked-up context over the limits; those fields are missing for these predictions",
                source=source.name,
                kind=source.kind,
                predictions=sum(1 for key in keys.values() if key in dropped),
                dropped=problems[:5] + ([f"and {len(problems) - 5} more"] if len(problems) > 5 else []),
                max_bytes=self.limits.max_bytes,
                max_depth=self.limits.max_depth,
            )
        return {pid: dict(kept[key]) for pid, key in keys.items() if key in kept}

    async def _redis_hash(
        self, source: ContextSource, fields: tuple[str, ...], predictions: Sequence[Prediction]
    ) -> tuple[dict[str, Fields], str | None]:
        if self.redis is None:
            raise SourceError("no Redis client for redis_hash sources")
        assert source.key_pattern is not None
        keys = {p.prediction_id: hash_key(source.key_pattern, p, prefix=self.prefix) for p in predictions}
        distinct = list(dict.fromkeys(keys.values()))
        # HMGET of the fields rules read, not HGETALL: a CRM hash's other fields (a 70 KB note)
        # would cross the network each batch, to be stored with every prediction.
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in distinct:
                pipe.hmget(key, fields)
            replies = await pipe.execute(raise_on_error=False)
        hashes: dict[str, Fields] = {}
        errors: list[tuple[str, BaseException]] = []
        for key, reply in zip(distinct, replies, strict=True):
            if isinstance(reply, BaseException):
                errors.append((key, reply))  # e.g. WRONGTYPE: that key is not a hash
            else:
                hashes[key] = {name: value for name, value in zip(fields, reply, strict=True) if value is not None}
        found = {  # sized as sent (bytes), then decoded
            pid: {name: as_text(value) for name, value in hashed.items()}
            for pid, hashed in self._bounded(source, hashes, keys).items()
        }
        problem = None
        if errors:
            key, error = errors[0]
            problem = f"{len(errors)} of {len(distinct)} keys failed, first {key}: {_first_line(str(error))}"
        return found, problem

    async def _sql(
        self, source: ContextSource, fields: tuple[str, ...], predictions: Sequence[Prediction]
    ) -> tuple[dict[str, Fields], str | None]:
        assert source.sql is not None
        engine = self._engine_for(source)
        by_prediction: dict[str, ParamSet] = {}
        for p in predictions:
            values = parameters(p)
            by_prediction[p.prediction_id] = tuple((name, values[name]) for name in source.parameters)
        distinct = list(dict.fromkeys(by_prediction.values()))  # one query per entity, not per prediction
        deadline = time.monotonic() + source.timeout_s
        # The thread cannot be cancelled; the deadline inside stops its query (see _read_only). A lookup
        # still waiting for a thread at the timeout is dropped from the queue.
        errors: list[tuple[ParamSet, DataError]] = []
        call = functools.partial(run_queries, engine, source.sql, distinct, deadline, frozenset(fields), errors)
        rows = await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(self._sql_threads, call), source.timeout_s
        )
        problem = None
        if errors:  # those predictions have no fields from this source, as a Redis key that failed
            params, error = errors[0]
            problem = f"{len(errors)} of {len(distinct)} parameter sets failed, first {dict(params)}: {_describe(error, source)}"
        return self._bounded(source, rows, by_prediction), problem

    def _engine_for(self, source: ContextSource) -> Engine:
        if source.database_url_env is None:
            if self.engine is None:
                raise SourceError("no database: the service's store is not available to sql sources")
            return self.engine
        url, connect_timeout = key = self._engine_key(source)
        with self._engines_lock:
            if key not in self._engines:
                options = {} if connect_timeout is None else {"connect_args": {"connect_timeout": connect_timeout}}
                self._engines[key] = make_engine(url, **options)
            return self._engines[key]

    def _engine_key(self, source: ContextSource) -> tuple[str, int | None]:
        """(URL, connect timeout) of the engine of a source with `database_url_env`."""
        assert source.database_url_env is not None
        url = self.environ.get(source.database_url_env, "").strip()
        if not url:
            raise SourceError(f"environment variable {source.database_url_env} is not set")
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]  # as settings.database_url
        if not url.startswith(("sqlite", "postgresql")):
            raise SourceError(
                f"{source.database_url_env} is {redact_url(url)}: expected a sqlite:/// or postgresql+psycopg:// URL"
            )
        try:
            check_database_url(url)  # as the store's URL: an option SQLite would ignore, a bad port, ...
        except ValueError as exc:
            raise SourceError(f"{source.database_url_env}: {exc}") from None
        connect_timeout = None
        if url.startswith("postgresql") and "connect_timeout" not in make_url(url).query:
            # Not store.CONNECT_TIMEOUT_S (10 s): a connect to a database that hangs outlives the lookup
            # in its thread, and `serve` exits only once such threads have ended.
            connect_timeout = max(MIN_CONNECT_TIMEOUT_S, math.ceil(source.timeout_s))
        return url, connect_timeout


def build_enricher(
    ruleset: RuleSet | Callable[[], RuleSet],
    *,
    redis: Redis | None = None,
    engine: Engine | None = None,
    keys: Keys | None = None,
    limits: PayloadLimits | None = None,
) -> ContextEnricher:
    """The enricher the service installs as `pipeline.enricher`; see ContextEnricher."""
    return ContextEnricher(ruleset, redis=redis, engine=engine, keys=keys, limits=limits)
