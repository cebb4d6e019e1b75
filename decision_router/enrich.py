"""Context enrichment: look up extra context per prediction at routing time.

`routing.yaml` declares context sources under `context_sources:`; rules address what they
return as `lookup.<source>.<field>`, in `when:` conditions, in a rule's `context:` list and in
`owner.from` (docs/rules.md#context-sources). The pipeline calls `ContextEnricher.lookup`
once per batch, before routing, and puts each prediction's result in its routing document
under `lookup`.

Two kinds of source:
- `redis_hash`: one HGETALL per distinct key, pipelined per batch (one round trip). The key
  is the service's stream prefix followed by the pattern formatted with the prediction.
  Values are text, as stored.
- `sql`: one SELECT per distinct parameter set in the batch (usually: per entity), run in a
  worker thread inside a read-only transaction; the first row's columns are the fields.

A lookup never fails routing. A source that errors or exceeds its `timeout_s` yields no
fields for that batch (so the fields a rule asks for are listed in the alert's
`missing_context`), logs one warning per batch and is counted in `failures`. Only sources
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
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import date, datetime
from datetime import time as clock_time
from decimal import Decimal
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from decision_router.contracts import Prediction
from decision_router.keys import Keys
from decision_router.rules import ContextSource, RuleSet
from decision_router.rules.spec import LOOKUP
from decision_router.settings import redact_url
from decision_router.store import make_engine
from decision_router.streams import as_text

log = structlog.get_logger("decision_router.enrich")

Fields = dict[str, Any]
# Threads for SQL lookups, apart from the event loop's default ones on which the pipeline writes the
# store: a source whose database hangs (each connect waiting out its connect_timeout, long after the
# source's timeout_s) ties up these, never those, and no more than this many connects at once.
SQL_THREADS = 4
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


def referenced_sources(ruleset: RuleSet) -> tuple[str, ...]:
    """Declared sources that some rule uses (lookup.<source>.<field> in when, context or
    owner.from), in order of first use; the others are never queried."""
    names: list[str] = []
    for rule in ruleset.rules:
        paths = [path for path, _ in rule.conditions] + [rule.owner_from or ""] + list(rule.context_fields)
        for path in paths:
            parts = path.split(".")
            if parts[0] == LOOKUP and len(parts) >= 3:
                names.append(parts[1])
    return tuple(name for name in dict.fromkeys(names) if name in ruleset.context_sources)


def redact(message: str) -> str:
    """Mask passwords of any URL in an error message (settings.redact_url)."""
    return _URL.sub(lambda m: redact_url(m.group()), message)


def jsonable(value: Any) -> Any:
    """A SQL value as alerts and the store can hold it (JSON): numbers stay numbers, dates
    become ISO text, anything else unusual becomes text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
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
    try:
        yield check_deadline
    finally:
        raw.set_progress_handler(None, 0)  # type: ignore[union-attr]
        connection.exec_driver_sql("PRAGMA query_only = OFF")


def run_queries(engine: Engine, sql: str, param_sets: Sequence[ParamSet], deadline: float) -> dict[ParamSet, Fields]:
    """The first row of `sql` per parameter set ({} when there is none), read-only, within
    `deadline` (time.monotonic()). Blocking: the enricher runs it in a thread."""
    statement = text(sql)
    rows: dict[ParamSet, Fields] = {}
    with engine.connect() as connection:
        try:
            with _read_only(connection, deadline) as before_query:
                for params in param_sets:
                    before_query()
                    try:
                        row = connection.execute(statement, dict(params)).mappings().first()
                    except DBAPIError:
                        if time.monotonic() >= deadline - 0.01:  # cancelled by the server / interrupted
                            raise TimeoutError from None
                        raise
                    rows[params] = {} if row is None else {str(k): jsonable(v) for k, v in row.items()}
        finally:
            connection.rollback()
    return rows


class ContextEnricher:
    """Looks up the context sources a rule set uses, for a batch of predictions.

    `ruleset` is a RuleSet or a function returning the current one (the service passes
    `lambda: pipeline.ruleset`, so a hot reload is followed). `engine` is the service's own
    database, used by SQL sources without `database_url_env`; `keys` gives the stream prefix
    put in front of every Redis hash key. `failures` counts failed batch lookups per source.
    """

    def __init__(
        self,
        ruleset: RuleSet | Callable[[], RuleSet],
        *,
        redis: Redis | None = None,
        engine: Engine | None = None,
        keys: Keys | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._ruleset: Callable[[], RuleSet] = ruleset if callable(ruleset) else (lambda: ruleset)
        self.redis = redis
        self.engine = engine
        self.prefix = keys.prefix if keys is not None else ""
        self.environ = os.environ if environ is None else environ
        self.failures: Counter[str] = Counter()
        self._engines: dict[str, Engine] = {}  # engines made from database_url_env, by URL
        self._engines_lock = threading.Lock()
        self._active: tuple[RuleSet, tuple[ContextSource, ...]] | None = None
        self._sql_threads = ThreadPoolExecutor(max_workers=SQL_THREADS, thread_name_prefix="context-sql")

    def sources(self) -> tuple[ContextSource, ...]:
        """The sources the current rule set uses (recomputed when the rule set changes)."""
        ruleset = self._ruleset()
        active = self._active
        if active is None or active[0] is not ruleset:
            names = referenced_sources(ruleset)
            active = self._active = (ruleset, tuple(ruleset.context_sources[name] for name in names))
        return active[1]

    async def lookup(self, predictions: Sequence[Prediction]) -> dict[str, dict[str, Fields]]:
        """prediction_id -> {source name: {field: value}}; a failed source is left out."""
        sources = self.sources()
        if not sources or not predictions:
            return {}
        found = await asyncio.gather(*(self._lookup_source(source, predictions) for source in sources))
        result: dict[str, dict[str, Fields]] = {}
        for source, by_prediction in zip(sources, found, strict=True):
            for prediction_id, fields in by_prediction.items():
                result.setdefault(prediction_id, {})[source.name] = fields
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

    async def _lookup_source(self, source: ContextSource, predictions: Sequence[Prediction]) -> dict[str, Fields]:
        try:
            if source.kind == "redis_hash":
                found, problem = await asyncio.wait_for(self._redis_hash(source, predictions), source.timeout_s)
            else:
                found, problem = await self._sql(source, predictions), None
        except Exception as exc:  # noqa: BLE001 - a lookup never fails routing
            self._failed(source, len(predictions), _describe(exc, source))
            return {}
        if problem is not None:
            self._failed(source, len(predictions), problem)
        return found

    def _failed(self, source: ContextSource, predictions: int, error: str) -> None:
        self.failures[source.name] += 1
        log.warning(
            "context lookup failed; its fields are missing for this batch",
            source=source.name,
            kind=source.kind,
            predictions=predictions,
            error=redact(error),
            failures=self.failures[source.name],
        )

    async def _redis_hash(
        self, source: ContextSource, predictions: Sequence[Prediction]
    ) -> tuple[dict[str, Fields], str | None]:
        if self.redis is None:
            raise SourceError("no Redis client for redis_hash sources")
        assert source.key_pattern is not None
        keys = {p.prediction_id: hash_key(source.key_pattern, p, prefix=self.prefix) for p in predictions}
        distinct = list(dict.fromkeys(keys.values()))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in distinct:
                pipe.hgetall(key)
            replies = await pipe.execute(raise_on_error=False)
        hashes: dict[str, Fields] = {}
        errors: list[tuple[str, BaseException]] = []
        for key, reply in zip(distinct, replies, strict=True):
            if isinstance(reply, BaseException):
                errors.append((key, reply))  # e.g. WRONGTYPE: that key is not a hash
            else:
                hashes[key] = {as_text(field): as_text(value) for field, value in reply.items()}
        found = {pid: dict(hashes[key]) for pid, key in keys.items() if key in hashes}
        problem = None
        if errors:
            key, error = errors[0]
            problem = f"{len(errors)} of {len(distinct)} keys failed, first {key}: {_first_line(str(error))}"
        return found, problem

    async def _sql(self, source: ContextSource, predictions: Sequence[Prediction]) -> dict[str, Fields]:
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
        call = functools.partial(run_queries, engine, source.sql, distinct, deadline)
        rows = await asyncio.wait_for(
            asyncio.get_running_loop().run_in_executor(self._sql_threads, call), source.timeout_s
        )
        return {pid: dict(rows[params]) for pid, params in by_prediction.items()}

    def _engine_for(self, source: ContextSource) -> Engine:
        if source.database_url_env is None:
            if self.engine is None:
                raise SourceError("no database: the service's store is not available to sql sources")
            return self.engine
        url = self.environ.get(source.database_url_env, "").strip()
        if not url:
            raise SourceError(f"environment variable {source.database_url_env} is not set")
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]  # as settings.database_url
        if not url.startswith(("sqlite", "postgresql")):
            raise SourceError(
                f"{source.database_url_env} is {redact_url(url)}: expected a sqlite:/// or postgresql+psycopg:// URL"
            )
        with self._engines_lock:
            if url not in self._engines:
                self._engines[url] = make_engine(url)
            return self._engines[url]


def build_enricher(
    ruleset: RuleSet | Callable[[], RuleSet],
    *,
    redis: Redis | None = None,
    engine: Engine | None = None,
    keys: Keys | None = None,
) -> ContextEnricher:
    """The enricher the service installs as `pipeline.enricher`; see ContextEnricher."""
    return ContextEnricher(ruleset, redis=redis, engine=engine, keys=keys)
