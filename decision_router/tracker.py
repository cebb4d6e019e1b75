"""Writes decisions, deliveries and lifecycle events to the store. The caller owns the transaction."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from functools import cache, lru_cache
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Integer,
    Table,
    and_,
    bindparam,
    case,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import flag_modified

from decision_router.audit import SYSTEM_ACTOR, iso
from decision_router.contracts import (
    Alert,
    Escalation,
    OutcomeEvent,
    OutcomeType,
    Prediction,
    Rejection,
)
from decision_router.durations import earlier
from decision_router.router import Decision, present_owner
from decision_router.rules import Owner
from decision_router.store import finite_json_text, json_text
from decision_router.tables import (
    DELIVERED_TO_OWNER,
    OUTBOX_PENDING,
    AlertRecord,
    AuditEvent,
    PredictionRecord,
    RejectionRecord,
    as_utc,
)


def alert_id_for(prediction_id: str, rule: str) -> str:
    """Deterministic, so a redelivered prediction maps to the alert it already made."""
    digest = hashlib.sha256(f"{prediction_id}\0{rule}".encode()).hexdigest()
    return f"al-{digest[:24]}"


# The statements every batch runs are built once, with their lists as expanding parameters: one
# built per batch cost ~0.3 ms of CPU at the router's small batches, and left SQLAlchemy objects in
# reference cycles (~300 a batch), which only the garbage collector frees: with `serve`'s young
# threshold, a 30-60 ms pause every ~150 batches (issue 8's latency).
_ALERTS = AlertRecord.__table__  # type: ignore[attr-defined]
_KNOWN_PREDICTIONS = select(PredictionRecord.prediction_id, PredictionRecord.stream_id).where(
    PredictionRecord.prediction_id.in_(bindparam("ids", expanding=True))
)


# PostgreSQL: each id looked up on its own, as cooldowns._OPEN_WINDOWS_POSTGRES does its keys.
_KNOWN_PREDICTIONS_POSTGRES = text(
    "select p.prediction_id, p.stream_id from unnest(cast(:ids as varchar[])) as wanted(prediction_id)"
    " cross join lateral (select predictions.prediction_id, predictions.stream_id from predictions"
    " where predictions.prediction_id = wanted.prediction_id offset 0) as p"
)


def known_predictions(session: Session, prediction_ids: Iterable[str]) -> dict[str, str | None]:
    """prediction_id -> the stream entry id it was first accepted from."""
    ids = list(set(prediction_ids))
    if not ids:
        return {}
    query = _KNOWN_PREDICTIONS_POSTGRES if session.get_bind().dialect.name == "postgresql" else _KNOWN_PREDICTIONS
    return {pid: sid for pid, sid in session.execute(query, {"ids": ids})}


# PostgreSQL: each entity of the batch looked up on its own (ix_alerts_entity: entity, rule, time). As one
# IN list, a planner without statistics (a new store, before its first ANALYZE; or autovacuum off)
# combined the rule and created_at indexes for more than ~20 entities, reading every alert of the
# rule in the window: 5-12 ms a batch at 20,000-40,000 alerts, against 0.3-1.7 ms for 100-500 entities
# here. OFFSET 0 keeps the subquery a per-entity lookup rather than a join the planner may reorder.
_COOLDOWN_HOLDERS_POSTGRES = text(
    "select a.alert_id, a.rule, a.entity_type, a.entity_id, a.created_at"
    " from unnest(cast(:entity_ids as varchar[])) as wanted(entity_id)"
    " cross join lateral (select alerts.alert_id, alerts.rule, alerts.entity_type, alerts.entity_id, alerts.created_at"
    " from alerts where alerts.entity_id = wanted.entity_id and alerts.rule = any(cast(:rules as varchar[]))"
    " and alerts.suppressed_by is null and alerts.created_at > :since offset 0) as a"
)


@cache
def _cooldown_holders_query(dialect: str) -> Any:
    if dialect == "postgresql":
        return _COOLDOWN_HOLDERS_POSTGRES
    rule_of, created_at = AlertRecord.rule, AlertRecord.created_at
    if dialect == "sqlite":
        # SQLite's planner, without statistics, reads every alert of the rule through an index led
        # by rule and checks each: a cost that grows with the store. As expressions no index serves,
        # rule and time leave it the batch's entities.
        rule_of, created_at = func.coalesce(rule_of, rule_of), func.coalesce(created_at, created_at)
    return select(
        AlertRecord.alert_id, AlertRecord.rule, AlertRecord.entity_type, AlertRecord.entity_id, AlertRecord.created_at
    ).where(
        rule_of.in_(bindparam("rules", expanding=True)),
        AlertRecord.entity_id.in_(bindparam("entity_ids", expanding=True)),
        AlertRecord.suppressed_by.is_(None),
        created_at > bindparam("since", type_=_ALERTS.c.created_at.type),
    )


def cooldown_holders(
    session: Session, wanted: Iterable[tuple[str, str, str]], *, since: Mapping[str, datetime]
) -> dict[tuple[str, str, str], str]:
    """(rule, entity_type, entity_id) -> the latest alert (or control record) of that rule and
    entity created after `since[rule]`: the cooldowns a whole batch runs into, in one query."""
    wanted = set(wanted)
    if not wanted:
        return {}
    rules = {rule for rule, _, _ in wanted}
    rows = session.execute(_cooldown_holders_query(session.get_bind().dialect.name), {
        "rules": sorted(rules), "entity_ids": sorted({entity_id for _, _, entity_id in wanted}),
        "since": min(since[rule] for rule in rules),
    })
    latest: dict[tuple[str, str, str], tuple[datetime, str]] = {}
    for alert_id, rule, entity_type, entity_id, created_at in rows:
        key = (rule, entity_type, entity_id)
        created = as_utc(created_at)
        if key in wanted and created > since[rule] and (key not in latest or created > latest[key][0]):
            latest[key] = (created, alert_id)
    return {key: alert_id for key, (_, alert_id) in latest.items()}


def _decision_event(decision: Decision, suppressed_by: str | None) -> str:
    if suppressed_by:
        return "suppressed"
    if decision.held_out:
        return "held_out"
    return "routed" if decision.action == "alert" else "recorded"


def decision_rows(
    *,
    prediction: Prediction,
    document: dict,
    stream_id: str | None,
    decisions: Sequence[Decision],
    rules_version: str,
    now: datetime,
    suppressed_by: Mapping[str, str],
) -> tuple[dict, list[dict], list[dict]]:
    """The rows one prediction adds to the store, as plain dicts for one bulk insert per table
    and batch: (prediction row, alert rows, audit event rows). No "received" event: the
    prediction row holds all it said, and the audit stories build it from that row."""
    prediction_row = {
        "prediction_id": prediction.prediction_id, "stream_id": stream_id, "model": prediction.model,
        "model_version": prediction.model_version, "entity_type": prediction.entity_type,
        "entity_id": prediction.entity_id, "score": prediction.score, "predicted_at": prediction.predicted_at,
        "received_at": now, "rules_version": rules_version, "document": document,
    }
    events: list[dict] = []
    alerts = []
    for decision in decisions:
        suppressor = suppressed_by.get(decision.rule)
        # Only delivered alerts have deadlines to meet.
        treated = decision.action == "alert" and not decision.held_out and not suppressor
        alert_id = alert_id_for(prediction.prediction_id, decision.rule)
        alerts.append({
            **_ALERT_DEFAULTS,
            "alert_id": alert_id, "prediction_id": prediction.prediction_id, "rule": decision.rule,
            "owner": decision.owner, "original_owner": decision.owner, "owner_source": decision.owner_source,
            "fallback_reason": decision.fallback_reason, "delegated_from": decision.delegated_from,
            "priority": decision.priority, "action": decision.action, "model": prediction.model,
            "model_version": prediction.model_version, "entity_type": prediction.entity_type,
            "entity_id": prediction.entity_id, "score": prediction.score, "context": decision.context,
            "missing_context": list(decision.missing_context), "rules_version": rules_version,
            "predicted_at": prediction.predicted_at, "created_at": now,
            "ack_by": now + decision.ack_within, "act_by": now + decision.act_within,
            "held_out": decision.held_out, "suppressed_by": suppressor,
            "status": "suppressed" if suppressor else "open",
            "ack_due_at": now + decision.ack_within if treated else None,
            "act_due_at": now + decision.act_within if treated else None,
        })
        events.append({
            "alert_id": alert_id, "prediction_id": prediction.prediction_id,
            "type": _decision_event(decision, suppressor), "actor": SYSTEM_ACTOR, "at": now, "source_id": None,
            "detail": {
                "rule": decision.rule, "rules_version": rules_version, "owner": decision.owner,
                "owner_source": decision.owner_source, "fallback_reason": decision.fallback_reason,
                "delegated_from": decision.delegated_from, "priority": decision.priority,
                "action": decision.action, "held_out": decision.held_out, "suppressed_by": suppressor,
                "cooldown_s": decision.cooldown.total_seconds() if decision.cooldown else None,
            },
        })
    return prediction_row, alerts, events


# Columns a new alert row starts with (the ORM model's defaults), so every row of one bulk
# insert has the same keys.
_ALERT_DEFAULTS: dict = {
    "delivered_at": None, "acknowledged_at": None, "intervened_at": None, "intervention": None, "outcome": None,
    "outcome_at": None, "outcome_value": None, "escalation_level": 0, "escalated_to": None,
    "ack_breached_at": None, "act_breached_at": None, "sla_revision": 0,
}


def insert_rows(
    session: Session, predictions: list[dict], alerts: list[dict], events: list[dict], *, finite: bool = False
) -> None:
    """One bulk INSERT per table, not an ORM object per row. Audit events are only ever
    inserted here and in `mark_delivered`; the append-only guard is about updates and deletes.
    `finite`: the caller knows that no JSON value holds a NaN or an infinity (see bulk_insert)."""
    for table, rows in ((PredictionRecord, predictions), (AlertRecord, alerts), (AuditEvent, events)):
        bulk_insert(session, table.__table__, rows, finite=finite)  # type: ignore[attr-defined]


def bulk_insert(session: Session, table: Table, rows: list[dict], *, finite: bool = False) -> None:
    """Insert row dicts (every row with the same keys) in the session's transaction. With `finite`
    (no JSON value holds a NaN or an infinity), the engine's json_text skips its check for them."""
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    if dialect not in ("sqlite", "postgresql"):
        # insertmanyvalues: a few multi-row INSERT statements per batch.
        session.execute(insert(table), rows)
        return
    # SQLAlchemy's per-value conversions cost about a third of an insert (on SQLite its
    # datetimes are formatted in Python); the driver's executemany (SQLite) or COPY
    # (PostgreSQL) with values converted here, in the same transaction, stores exactly what
    # SQLAlchemy would.
    connection = session.connection()
    # JSON columns as the engine's ORM writes them (store.make_engine's serializer, or SQLAlchemy's default).
    dumps = connection.dialect._json_serializer or json.dumps  # type: ignore[attr-defined]
    if finite and dumps is json_text:
        dumps = finite_json_text
    if dialect == "sqlite":
        sql, convert = _sqlite_insert(table)
        with driver_cursor(connection, sql) as cursor:
            cursor.executemany(sql, convert(rows, dumps))
    else:
        sql, values = _postgres_copy(table)
        with driver_cursor(connection, sql) as cursor, cursor.copy(sql) as copy:
            for row in values(rows, dumps):
                copy.write_row(row)


@contextlib.contextmanager
def driver_cursor(connection: Connection, sql: str) -> Iterator[Any]:
    """A cursor of the driver's own connection, in the connection's transaction, for `sql`: for the
    hot path's statements, where SQLAlchemy's per-statement and per-value work costs more than the
    database's. Errors are raised as SQLAlchemy raises them (IntegrityError, OperationalError...):
    callers tell a concurrent insert or a locked database from a bug by these classes. A lost
    connection is invalidated, as SQLAlchemy does: else the rollback that follows fails on it again
    and the pool keeps it."""
    cursor = connection.connection.cursor()
    try:
        yield cursor
    except connection.dialect.loaded_dbapi.Error as exc:
        lost = connection.dialect.is_disconnect(exc, connection.connection.dbapi_connection, cursor)
        if lost:
            connection.invalidate(exc)
        raise DBAPIError.instance(
            sql, None, exc, connection.dialect.loaded_dbapi.Error, connection_invalidated=lost
        ) from exc
    finally:
        cursor.close()


def _bulk_columns(table: Table) -> tuple[list[Column], Callable[[dict], tuple]]:
    """Every column but an integer id (the database assigns it), and a getter of a row dict's
    values in their order (one C call)."""
    columns = [c for c in table.columns if not (c.primary_key and isinstance(c.type, Integer))]
    return columns, operator.itemgetter(*(c.name for c in columns))


@cache
def _sqlite_insert(table: Table) -> tuple[str, Callable[[list[dict], Callable[[object], str]], list[tuple]]]:
    """The INSERT of a bulk insert, and a converter of row dicts to its parameters: datetimes
    as SQLAlchemy stores them on SQLite, JSON columns as JSON text."""
    columns, values_of = _bulk_columns(table)
    names, marks = ", ".join(c.name for c in columns), ", ".join("?" for _ in columns)
    sql = f"INSERT INTO {table.name} ({names}) VALUES ({marks})"
    date_at = [i for i, c in enumerate(columns) if isinstance(c.type, DateTime)]
    json_at = [i for i, c in enumerate(columns) if isinstance(c.type, JSON)]

    def convert(rows: list[dict], dumps: Callable[[object], str]) -> list[tuple]:
        formatted: dict[datetime, str] = {}  # most rows of a batch share `now` and its deadlines
        out = []
        for row in rows:
            values = list(values_of(row))
            for i in date_at:
                value = values[i]
                if value is not None:
                    text = formatted.get(value)
                    if text is None:
                        text = formatted[value] = sqlite_datetime(value)
                    values[i] = text
            for i in json_at:
                values[i] = dumps(values[i])
            out.append(tuple(values))
        return out

    return sql, convert


@cache
def _postgres_copy(table: Table) -> tuple[str, Callable[[list[dict], Callable[[object], str]], Iterator[tuple]]]:
    """The COPY of a bulk insert, and the rows' values for it: JSON columns as JSON text (as
    SQLAlchemy writes them, `null` for None), the others as psycopg adapts them."""
    columns, values_of = _bulk_columns(table)
    sql = f"COPY {table.name} ({', '.join(c.name for c in columns)}) FROM STDIN"
    json_at = [i for i, c in enumerate(columns) if isinstance(c.type, JSON)]

    def values(rows: list[dict], dumps: Callable[[object], str]) -> Iterator[tuple]:
        for row in rows:
            converted = list(values_of(row))
            for i in json_at:
                converted[i] = dumps(converted[i])
            yield tuple(converted)

    return sql, values


def sqlite_datetime(value: datetime) -> str:
    """SQLAlchemy's SQLite DATETIME storage format (the wall-clock fields, microseconds always)."""
    return (f"{value.year:04d}-{value.month:02d}-{value.day:02d} "
            f"{value.hour:02d}:{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}")


def alert_of(row: Mapping) -> Alert:
    """The wire form of a freshly stored alert row (as `to_alert` reads it back). Validated:
    pydantic-core checks these values faster than `model_construct` assigns them."""
    return Alert.model_validate({
        "alert_id": row["alert_id"], "prediction_id": row["prediction_id"], "owner": row["owner"],
        "owner_source": row["owner_source"], "rule": row["rule"], "priority": row["priority"], "model": row["model"],
        "model_version": row["model_version"], "entity_type": row["entity_type"], "entity_id": row["entity_id"],
        "score": row["score"], "context": row["context"], "missing_context": row["missing_context"],
        "ack_by": row["ack_by"], "act_by": row["act_by"], "rules_version": row["rules_version"],
        "predicted_at": row["predicted_at"], "created_at": row["created_at"], "delegated_from": row["delegated_from"],
    })


def record_rejections(session: Session, rejections: Sequence[Rejection], *, now: datetime) -> list[Rejection]:
    """Count each rejected entry once, even when its stream entry is redelivered; returns those
    recorded now (not already stored), for the metrics to count once too."""
    keyed = [r for r in rejections if r.source_id is not None]
    seen: set[tuple[str, str | None]] = set()
    for stream in {r.source_stream for r in keyed}:
        ids = [r.source_id for r in keyed if r.source_stream == stream]
        seen |= {(stream, sid) for sid in earlier_rejections(session, stream, ids)}  # type: ignore[arg-type]
    recorded = []
    for rejection in rejections:
        key = (rejection.source_stream, rejection.source_id)
        if rejection.source_id is not None and key in seen:
            continue
        seen.add(key)
        recorded.append(rejection)
        session.add(
            RejectionRecord(
                source_stream=rejection.source_stream,
                source_id=rejection.source_id,
                model=rejection.model,
                reason=rejection.reason.value,
                detail=rejection.detail,
                at=now,
            )
        )
    return recorded


# Built once, as the hot path's other statements (see _KNOWN_PREDICTIONS). By the unique index on (stream, id).
_EARLIER_REJECTIONS = select(
    RejectionRecord.source_id, RejectionRecord.reason, RejectionRecord.detail, RejectionRecord.model
).where(
    RejectionRecord.source_stream == bindparam("stream"),
    RejectionRecord.source_id.in_(bindparam("ids", expanding=True)),
)


def earlier_rejections(session: Session, stream: str, source_ids: Sequence[str]) -> dict[str, Rejection]:
    """The entries of `stream` among `source_ids` that were rejected already (entry id -> that rejection,
    its payload left empty): a verdict that time can change (from the future, an alert not there yet)
    is kept when the entry is handled again, so that no input is both rejected and accepted."""
    if not source_ids:
        return {}
    rows = session.execute(_EARLIER_REJECTIONS, {"stream": stream, "ids": sorted(set(source_ids))})
    return {
        source_id: Rejection(reason=reason, detail=detail, model=model, source_stream=stream, source_id=source_id,
                             payload="")
        for source_id, reason, detail, model in rows
    }


def undelivered_alerts(session: Session, *, prediction_ids: Iterable[str], limit: int = 1000) -> list[AlertRecord]:
    """These predictions' alerts stored but not yet written to an inbox: their outbox, drained after commit."""
    query = select(AlertRecord).where(DELIVERED_TO_OWNER, AlertRecord.delivered_at.is_(None),
                                      AlertRecord.prediction_id.in_(list(prediction_ids)))
    return list(session.scalars(query.order_by(AlertRecord.created_at).limit(limit)))


def outbox_alerts(
    session: Session, *, before: datetime, after: tuple[datetime, str] | None = None, limit: int = 500
) -> list[AlertRecord]:
    """Undelivered alerts created before `before`, in (created_at, alert_id) order from past `after`: the periodic
    drain's chunks. Read through the partial index of undelivered alerts (tables.OUTBOX_PENDING) alone."""
    query = select(AlertRecord).where(OUTBOX_PENDING, AlertRecord.created_at < before)
    if after is not None:
        query = query.where(tuple_(AlertRecord.created_at, AlertRecord.alert_id) > tuple_(*after))
    return list(session.scalars(query.order_by(AlertRecord.created_at, AlertRecord.alert_id).limit(limit)))


def handoffs(session: Session, records: Sequence[AlertRecord]) -> dict[str, int]:
    """Of these alerts, those handed back to an owner who had them before: which hand-off to that owner each
    now is (2 and up). The owners an alert had are its first and those it was reassigned to (a reassignment to
    the owner it already has is no hand-off). Stable until the next reassignment, so a redelivered drain keys
    the same; only alerts whose sla_revision moved are looked up (every reassignment moves it), so the fresh
    alerts of a prediction batch cost no query."""
    moved = {record.alert_id: record for record in records if record.sla_revision}
    if not moved:
        return {}
    held: dict[str, list[str]] = {alert_id: [record.original_owner] for alert_id, record in moved.items()}
    reassignments = session.execute(
        select(AuditEvent.alert_id, AuditEvent.detail)
        .where(AuditEvent.alert_id.in_(list(moved)), AuditEvent.type == OutcomeType.REASSIGNED.value)
        .order_by(AuditEvent.id)
    )
    for alert_id, detail in reassignments:
        owners = held[alert_id]
        if detail.get("to_owner") not in (None, owners[-1]):
            owners.append(detail["to_owner"])
    counted = {alert_id: owners.count(moved[alert_id].owner) for alert_id, owners in held.items()}
    return {alert_id: n for alert_id, n in counted.items() if n > 1}


_MARK_DELIVERED = (
    update(_ALERTS)
    .where(
        # The plain IN lets SQLite find the rows by primary key; the row-value IN alone scans the table.
        _ALERTS.c.alert_id.in_(bindparam("alert_ids", expanding=True)),
        tuple_(_ALERTS.c.alert_id, _ALERTS.c.owner).in_(bindparam("alerts_and_owners", expanding=True)),
        _ALERTS.c.delivered_at.is_(None),
    )
    .values(delivered_at=bindparam("now", type_=_ALERTS.c.delivered_at.type))
    .returning(_ALERTS.c.alert_id, _ALERTS.c.prediction_id)
)


def mark_delivered(session: Session, delivered: Mapping[str, str], *, channel: str, now: datetime) -> list[str]:
    """Mark inbox delivery of alert_id -> the owner it was written for; returns the alerts
    marked now. One conditional UPDATE for the lot, so a concurrent redelivery cannot mark an
    alert twice, and a delivery to an owner the alert was meanwhile reassigned away from
    marks nothing (the reassignment's own delivery will)."""
    if not delivered:
        return []
    session.flush()  # a Core statement does not autoflush the caller's pending ORM objects
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        changed = _mark_delivered_by_driver(session.connection(), dialect, delivered, now)
    else:
        changed = session.execute(
            _MARK_DELIVERED, {"alert_ids": list(delivered), "alerts_and_owners": list(delivered.items()), "now": now}
        ).all()
    bulk_insert(session, AuditEvent.__table__, [  # type: ignore[attr-defined]
        {"alert_id": alert_id, "prediction_id": prediction_id, "type": "delivered", "actor": SYSTEM_ACTOR,
         "at": now, "source_id": None, "detail": {"channel": channel, "owner": delivered[alert_id]}}
        for alert_id, prediction_id in changed
    ])
    marked = {alert_id for alert_id, _ in changed}
    return [alert_id for alert_id in delivered if alert_id in marked]


def _mark_delivered_by_driver(
    connection: Connection, dialect: str, delivered: Mapping[str, str], now: datetime
) -> list[tuple]:
    """_MARK_DELIVERED through the driver, in the SQL SQLAlchemy renders for it: SQLAlchemy's expansion
    of its lists cost ~7 µs per alert (3 parameters each), against ~2 µs of SQLite's own work."""
    sql = _mark_delivered_sql(dialect, len(delivered))
    parameters = [sqlite_datetime(now) if dialect == "sqlite" else now, *delivered,
                  *itertools.chain.from_iterable(delivered.items())]
    with driver_cursor(connection, sql) as cursor:
        cursor.execute(sql, parameters)
        return cursor.fetchall()


@lru_cache(maxsize=256)
def _mark_delivered_sql(dialect: str, count: int) -> str:
    """As SQLAlchemy renders _MARK_DELIVERED for `count` alerts, its placeholders the driver's own."""
    if dialect == "sqlite":
        mark, now, alert_id, returned = "?", "?", "?", "alert_id, prediction_id"
    else:
        mark, now, alert_id = "%s", "%s::TIMESTAMP WITH TIME ZONE", "%s::VARCHAR"
        returned = "alerts.alert_id, alerts.prediction_id"
    pairs = ", ".join([f"({mark}, {mark})"] * count)
    return (
        f"UPDATE alerts SET delivered_at={now} WHERE alerts.alert_id IN ({', '.join([alert_id] * count)})"
        f" AND (alerts.alert_id, alerts.owner) IN ({'VALUES ' if dialect == 'sqlite' else ''}{pairs})"
        f" AND alerts.delivered_at IS NULL RETURNING {returned}"
    )


def to_alert(record: AlertRecord, escalation: Escalation | None = None) -> Alert:
    """The wire form an owner (or, escalated, their manager) receives."""
    return Alert(
        alert_id=record.alert_id,
        prediction_id=record.prediction_id,
        owner=record.owner,
        owner_source=record.owner_source,
        rule=record.rule,
        priority=record.priority,
        model=record.model,
        model_version=record.model_version,
        entity_type=record.entity_type,
        entity_id=record.entity_id,
        score=record.score,
        context=record.context,
        missing_context=record.missing_context,
        ack_by=as_utc(record.ack_by),
        act_by=as_utc(record.act_by),
        rules_version=record.rules_version,
        predicted_at=as_utc(record.predicted_at),
        created_at=as_utc(record.created_at),
        reassigned_from=record.original_owner if record.owner != record.original_owner else None,
        delegated_from=record.delegated_from,
        escalation=escalation,
    )


def find_alerts(
    session: Session, event: OutcomeEvent, *, now: datetime, outcome_window: timedelta,
    max_clock_skew: timedelta = timedelta(0),
) -> list[AlertRecord]:
    """The alerts an outcome event addresses. By entity: the open ones (control records
    included) whose prediction was made within `outcome_window` before the event, give or take
    `max_clock_skew` (DECISION_ROUTER_MAX_CLOCK_SKEW), as an event naming its alert is checked."""
    query = select(AlertRecord)
    if event.alert_id is not None:
        query = query.where(AlertRecord.alert_id == event.alert_id)
    elif event.prediction_id is not None:
        query = query.where(AlertRecord.prediction_id == event.prediction_id)
    else:
        window = _entity_window(event, now=now, outcome_window=outcome_window, max_clock_skew=max_clock_skew)
        query = query.where(*window, AlertRecord.status == "open")
    return list(session.scalars(query.order_by(AlertRecord.created_at)))


def closed_in_window(
    session: Session, event: OutcomeEvent, *, now: datetime, outcome_window: timedelta,
    max_clock_skew: timedelta = timedelta(0),
) -> int:
    """How many of the decisions an event by entity would address are closed already (have an outcome): why
    it found none open, when it is sent again. Read only for a refused event."""
    query = select(func.count()).select_from(AlertRecord).where(
        *_entity_window(event, now=now, outcome_window=outcome_window, max_clock_skew=max_clock_skew),
        AlertRecord.status == "closed",
    )
    return session.scalar(query) or 0


def _entity_window(
    event: OutcomeEvent, *, now: datetime, outcome_window: timedelta, max_clock_skew: timedelta
) -> list[Any]:
    at = event.at or now
    since = earlier(at, outcome_window)  # a long DECISION_ROUTER_OUTCOME_WINDOW starts at the year 1
    return [
        AlertRecord.entity_type == event.entity_type,
        AlertRecord.entity_id == event.entity_id,
        AlertRecord.predicted_at >= since,
        # The sender's clock may be behind the model's: a prediction made up to the skew after the event's `at`
        # is still the one it is about, as it is when the event names its alert (Pipeline._dated_before).
        AlertRecord.predicted_at <= at + max_clock_skew,
    ]


def already_applied(session: Session, source_id: str | None) -> bool:
    if source_id is None:
        return False
    found = session.execute(select(AuditEvent.id).where(AuditEvent.source_id == source_id).limit(1)).first()
    return found is not None


def applied_to(session: Session, source_id: str) -> list[str]:
    """The prediction ids of the alerts an applied outcome event changed."""
    return list(session.scalars(
        select(AuditEvent.prediction_id).where(AuditEvent.source_id == source_id).distinct()
    ))


def reassigned_by(session: Session, source_id: str) -> tuple[list[str], list[str]]:
    """The alerts an applied reassignment handed to its receiver, and those it left as they were (its receiver
    held them already)."""
    rows = session.execute(select(AuditEvent.alert_id, AuditEvent.detail).where(
        AuditEvent.source_id == source_id, AuditEvent.type == OutcomeType.REASSIGNED.value
    ).order_by(AuditEvent.id))
    handed_over: list[str] = []
    unchanged: list[str] = []
    for alert_id, detail in rows:
        (unchanged if (detail or {}).get("unchanged") else handed_over).append(alert_id)
    return handed_over, unchanged


def seen_at(record: AlertRecord, at: datetime, now: datetime) -> datetime:
    """When an acknowledgement or intervention at `at`, received at `now`, happened for the stats: not before the
    alert was created, nor after it was received.

    The gate lets an `at` up to DECISION_ROUTER_MAX_CLOCK_SKEW before the creation through (the sender's clock
    and the router's differ), and a worker whose clock is behind another's stamps its `now` early too. Nobody
    sees an alert before it exists, so such a time is its creation: a time to ack or act is never negative. The
    gate lets an `at` up to that skew after `now` through too: nobody acts later than the router hears of it, so
    such a time is `now` (taken as sent, a time to ack grew by the sender's skew, past a deadline met).
    """
    return max(min(at, now), as_utc(record.created_at))


def apply_outcome(
    session: Session, *, event: OutcomeEvent, alerts: Sequence[AlertRecord], source_id: str | None, now: datetime,
    owners: Mapping[str, Owner] | None = None,
) -> list[str]:
    """Record the event on each alert: acknowledged -> intervened -> outcome, first time wins. Returns the alerts
    a reassignment left as they were: their receiver already held them.

    A reassignment to an owner away at `now` (in `owners`) goes to their present delegate, as routing
    and escalation do; without `owners`, nobody is away."""
    at = event.at or now
    unchanged: list[str] = []
    for record in alerts:
        detail: dict[str, object] = {k: v for k, v in (("action", event.action), ("note", event.note)) if v is not None}
        changed = True
        first_read = _first_as_read(record, event)
        # The first event wins in the row as it is written, not only as it was read: another process (a second
        # worker, the API) may have committed one since (_first_wins).
        # An ack or intervention after the alert's outcome is refused (Pipeline._dated_after_outcome), also when that
        # outcome was committed after this row was read: it cannot have caused it.
        before_outcome = or_(AlertRecord.outcome_at.is_(None), AlertRecord.outcome_at >= at)
        may_lose_to_outcome = event.type in (OutcomeType.ACKNOWLEDGED, OutcomeType.INTERVENED) and record.outcome is None
        if event.type is OutcomeType.ACKNOWLEDGED:
            if record.acknowledged_at is None:
                seen = seen_at(record, at, now)
                first = and_(AlertRecord.acknowledged_at.is_(None), before_outcome)
                record.acknowledged_at = _first_wins(first, AlertRecord.acknowledged_at, seen)
            record.ack_due_at = None
        elif event.type is OutcomeType.INTERVENED:
            if record.intervened_at is None:
                acted = seen_at(record, at, now)
                first = and_(AlertRecord.intervened_at.is_(None), before_outcome)
                record.intervened_at = _first_wins(first, AlertRecord.intervened_at, acted)
                record.intervention = _first_wins(first, AlertRecord.intervention, event.action)
                # Acting on an alert implies having seen it, by then at the latest: an acknowledgement
                # recorded before with a later `at` moves back (time to ack never exceeds time to act).
                later_or_none = or_(AlertRecord.acknowledged_at.is_(None), AlertRecord.acknowledged_at > acted)
                record.acknowledged_at = _first_wins(and_(first, later_or_none), AlertRecord.acknowledged_at, acted)
            record.ack_due_at = record.act_due_at = None
        elif event.type is OutcomeType.OUTCOME:
            assert event.result is not None
            detail.update(result=event.result.value, value=event.value)
            if record.outcome is None:
                first = AlertRecord.outcome.is_(None)
                record.outcome = _first_wins(first, AlertRecord.outcome, event.result.value)
                record.outcome_at = _first_wins(first, AlertRecord.outcome_at, at)
                record.outcome_value = _first_wins(first, AlertRecord.outcome_value, event.value)
                # A decision its cooldown suppressed (reached by its prediction or alert id) stays suppressed:
                # nobody's to-do, and not counted by the stats; only an open one closes.
                if record.status == "open":
                    record.status = "closed"
                # Closed: no deadline is pending any more (the API showed them still due).
                record.ack_due_at = record.act_due_at = None
        elif event.type is OutcomeType.REASSIGNED:
            changed = _reassign(record, event, detail, owners=owners, now=now)
            if not changed:
                unchanged.append(record.alert_id)
        if changed:
            # In SQL, not from the value read: a sweep that read the alert before this commits then fails its
            # compare-and-set, even one that read it after another sweep's step that this transaction overlaps.
            record.sla_revision = AlertRecord.sla_revision + 1
            session.add(record)
        detail.update(_not_recorded(session, record, event, first_read=first_read, may_lose=may_lose_to_outcome,
                                    at=at, now=now))
        session.add(
            AuditEvent(
                alert_id=record.alert_id,
                prediction_id=record.prediction_id,
                type=event.type.value,
                actor=event.actor,
                at=at,
                source_id=source_id,
                detail=detail,
            )
        )
    return unchanged


def _first_as_read(record: AlertRecord, event: OutcomeEvent) -> bool:
    """Whether `event` is the first of its type on `record` as read (apply_outcome may still lose a race)."""
    column = {OutcomeType.ACKNOWLEDGED: "acknowledged_at", OutcomeType.INTERVENED: "intervened_at",
              OutcomeType.OUTCOME: "outcome_at"}.get(event.type)
    return column is not None and getattr(record, column) is None


def _not_recorded(
    session: Session, record: AlertRecord, event: OutcomeEvent, *, first_read: bool, may_lose: bool, at: datetime,
    now: datetime,
) -> dict[str, Any]:
    """Why an acknowledgement, intervention or outcome is kept in the audit log only, so that the story does not
    read it as applied: `after_outcome` (an ack or intervention that an outcome dated earlier, committed since the
    row was read, left unchanged), or `already_at` (and for an outcome `already_result`) when it is not the first
    of its type (the first wins). Empty when the row took it, and for other types.

    One read of the row after the write (flushed by now) when it was first, or had no outcome, as read: another
    process may have committed one since."""
    if event.type not in (OutcomeType.ACKNOWLEDGED, OutcomeType.INTERVENED, OutcomeType.OUTCOME):
        return {}
    column = {OutcomeType.ACKNOWLEDGED: AlertRecord.acknowledged_at, OutcomeType.INTERVENED: AlertRecord.intervened_at,
              OutcomeType.OUTCOME: AlertRecord.outcome_at}[event.type]
    if first_read or may_lose:
        held_at, held_result, outcome_at = session.execute(
            select(column, AlertRecord.outcome, AlertRecord.outcome_at).where(AlertRecord.alert_id == record.alert_id)
        ).one()
        if may_lose and outcome_at is not None and as_utc(outcome_at) < at:
            return {"after_outcome": iso(outcome_at)}
    else:
        held_at, held_result = getattr(record, column.key), record.outcome
    if first_read:
        # Did the row take this event's values? (An intervention also sets acknowledged_at, but only where none
        # was recorded or a later one was: an ack losing to it finds the intervention's time.)
        mine = at if event.type is OutcomeType.OUTCOME else seen_at(record, at, now)
        if held_at is None or (as_utc(held_at) == as_utc(mine) and (
                event.type is not OutcomeType.OUTCOME or held_result == event.result.value)):  # type: ignore[union-attr]
            return {}
    already: dict[str, Any] = {"already_at": iso(held_at)}
    if event.type is OutcomeType.OUTCOME:
        already.update(already_result=held_result)
    return already


def _first_wins(first: Any, column: Any, value: object) -> Any:
    """`value` if `first` holds in the row as the UPDATE finds it, else what the column holds: in SQL, so an event
    applied by another process after this one read the row (and committed before this writes) is not overwritten.
    All the SET clauses of one UPDATE read the row as it was before it, so one event's columns stay together."""
    return case((first, literal(value, column.type)), else_=column)


def _reassign(
    record: AlertRecord, event: OutcomeEvent, detail: dict[str, object], *, owners: Mapping[str, Owner] | None,
    now: datetime,
) -> bool:
    """Hand `record` to the event's owner (or their present delegate), its audit `detail` saying so; False when
    that receiver holds it already."""
    assert event.owner is not None
    receiver = present_owner(event.owner, owners, now) if owners is not None else event.owner
    delegated_from = event.owner if receiver != event.owner else None
    # As routing records a delegation: who receives it (and is accountable now), and for whom.
    detail.update(from_owner=record.owner, to_owner=receiver)
    if delegated_from is not None:
        detail.update(delegated_from=delegated_from)
    if receiver == record.owner:
        # Theirs already: recorded (who asked), and nothing else. Fresh deadlines and a chain started again
        # would silence an escalation with nobody new accountable, and the inbox write is deduplicated.
        detail.update(unchanged=True)
        return False
    if record.outcome is not None:
        detail.update(closed=True)  # for the story: why no delivery follows
    record.owner = receiver
    # The alert the new owner receives says whether they have it for someone away; an earlier
    # owner's delegation is not theirs.
    record.delegated_from = delegated_from
    # The new owner must receive it (back into the outbox) and gets fresh deadlines; a closed alert (an
    # outcome) has nothing left to act on: its new owner is accountable for the record, it is not sent
    # again. In SQL, from the row as it is when written: an outcome committed since this row was read
    # closed it; and an inbox write to the old owner may have marked it delivered since.
    record.delivered_at = case((AlertRecord.outcome.is_(None), null()), else_=AlertRecord.delivered_at)
    # The new owner's chain starts at them. Written even if it looked unchanged here: a sweep may
    # have escalated the alert since this row was read (its old holder would stay).
    record.escalated_to = None
    flag_modified(record, "escalated_to")
    # Deadlines not met yet start again for the new owner, also one the old owner's chain breached
    # (the breach stays recorded); a closed alert has none, nor has a decision nobody receives (a
    # control, recorded or suppressed one), as when it was routed. In SQL, from the row as it is when
    # written, as delivered_at: an outcome (or the ack, the intervention) committed since this row was
    # read cleared the deadline, and a closed alert must not get one back.
    timed = record.status == "open" and record.action == "alert" and not record.held_out
    if timed and record.acknowledged_at is None:
        record.ack_due_at = _still_due(
            AlertRecord.ack_due_at, AlertRecord.acknowledged_at, now + (as_utc(record.ack_by) - as_utc(record.created_at))
        )
    if timed and record.intervened_at is None:
        record.act_due_at = _still_due(
            AlertRecord.act_due_at, AlertRecord.intervened_at, now + (as_utc(record.act_by) - as_utc(record.created_at))
        )
    return True


def reassign_note(receiver: str, *, unchanged: bool, closed: bool) -> str | None:
    """What a reassignment to `receiver` (the owner asked for, or their present delegate) does when it is no plain
    hand-over, in the words the API's answer and the CLI's note both use; None for a plain one."""
    if unchanged:
        return f"'{receiver}' already holds the alert; nothing changes"
    if closed:
        return f"the alert is closed; '{receiver}' becomes accountable for it, and does not receive it"
    return None


def _still_due(due: Any, met: Any, fresh: datetime) -> Any:
    """`fresh` for a deadline that is still to meet on the alert when the UPDATE writes it (open, not met); else
    the due time the row has then (None: the concurrent outcome or action cleared it)."""
    return case((and_(AlertRecord.status == "open", met.is_(None)), literal(fresh, due.type)), else_=due)
