"""SQL tables (SQLModel). Wire messages live in contracts.py; tracker.py maps between them.

Timestamps are stored timezone-aware where the database can (PostgreSQL) and read back
as UTC everywhere (SQLite drops the offset), see `as_utc`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Index,
    Integer,
    UniqueConstraint,
    and_,
    cast,
    event,
    func,
    literal_column,
    not_,
    or_,
)
from sqlmodel import Field, SQLModel


def _when(*, index: bool = False, nullable: bool = False) -> Any:
    return Field(default=None if nullable else ..., sa_type=DateTime(timezone=True), index=index, nullable=nullable)


def as_utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class PredictionRecord(SQLModel, table=True):
    """Every accepted prediction, compactly, so rule changes can be replayed against it."""

    __tablename__ = "predictions"

    prediction_id: str = Field(primary_key=True)
    # The stream entry it came from: a redelivery of the same entry is not a duplicate.
    stream_id: str | None = None
    model: str = Field(index=True)
    model_version: str
    entity_type: str
    entity_id: str = Field(index=True)
    score: float
    predicted_at: datetime = _when()
    received_at: datetime = _when(index=True)
    rules_version: str
    document: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))


class AlertRecord(SQLModel, table=True):
    """One routing decision: delivered to its owner (action alert) or only tracked (record)."""

    __tablename__ = "alerts"

    alert_id: str = Field(primary_key=True)
    prediction_id: str = Field(index=True)
    rule: str  # indexed on PostgreSQL only: SQLite's stats index leads with it (see RETIRED_INDEXES)
    owner: str = Field(index=True)  # accountable now; changes on reassignment
    original_owner: str
    owner_source: str  # static | field | fallback | delegate
    fallback_reason: str | None = None
    delegated_from: str | None = None  # the away owner this went to a delegate for
    priority: str
    action: str  # alert | record
    model: str = Field(index=True)
    model_version: str
    entity_type: str
    entity_id: str  # indexed: ix_alerts_entity_id (SQLite), ix_alerts_entity (PostgreSQL), below
    score: float
    context: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    missing_context: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    rules_version: str
    predicted_at: datetime = _when()
    created_at: datetime = _when(index=True)
    ack_by: datetime = _when()
    act_by: datetime = _when()
    delivered_at: datetime | None = _when(nullable=True)
    acknowledged_at: datetime | None = _when(nullable=True)
    intervened_at: datetime | None = _when(nullable=True)
    intervention: str | None = None
    outcome: str | None = None  # success | failure
    outcome_at: datetime | None = _when(nullable=True)
    outcome_value: float | None = None
    status: str = "open"  # open | closed (has an outcome) | suppressed; indexed on PostgreSQL only
    # Control group: recorded with the prediction and rule, never delivered.
    held_out: bool = False
    # Cooldown: the alert for the same entity and rule that made this one redundant.
    suppressed_by: str | None = None
    # SLA state. A due time is cleared once met or breached; escalated_to holds the alert
    # now (None: its owner). sla_revision makes concurrent sweepers compare-and-set. Indexed
    # only while pending (SLA_PENDING, below).
    ack_due_at: datetime | None = _when(nullable=True)
    act_due_at: datetime | None = _when(nullable=True)
    escalation_level: int = 0
    escalated_to: str | None = None
    ack_breached_at: datetime | None = _when(nullable=True)
    act_breached_at: datetime | None = _when(nullable=True)
    sla_revision: int = 0

    @property
    def effective_action(self) -> str:
        """What happened to this decision: alert, record, control or suppressed."""
        if self.suppressed_by:
            return "suppressed"
        return "control" if self.held_out else self.action


# Decisions that go to an owner (inbox, channels, deadlines): alerts neither held out nor
# suppressed by a cooldown. Stats call them "routed".
DELIVERED_TO_OWNER = and_(
    AlertRecord.action == "alert", AlertRecord.held_out.is_(False), AlertRecord.suppressed_by.is_(None)
)


# --- SLA: what the escalation sweep reads (escalation.due_alerts) ---------------------------------------------------
# A deadline still to meet: set (only alerts delivered to an owner get one), not met yet, and the alert
# open. Only these have an entry in the due-time indexes, so a new record, control or suppressed decision
# (most of them) writes neither, and the sweep reads the deadlines still pending, not every alert. An
# outcome clears them as it closes an alert; `open` also keeps out those that alerts closed before it did
# kept (older stores). Literals, not bound parameters: SQLite uses a partial index only for a query that
# spells its predicate's terms alike.
SLA_OPEN = AlertRecord.status == literal_column("'open'")
SLA_PENDING = {
    "ack": and_(AlertRecord.ack_due_at.is_not(None), AlertRecord.acknowledged_at.is_(None), SLA_OPEN),
    "act": and_(AlertRecord.act_due_at.is_not(None), AlertRecord.intervened_at.is_(None), SLA_OPEN),
}
SLA_DUE_COLUMNS = {"ack": AlertRecord.ack_due_at, "act": AlertRecord.act_due_at}
for _kind, _pending in SLA_PENDING.items():
    Index(f"ix_alerts_{_kind}_pending", SLA_DUE_COLUMNS[_kind], sqlite_where=_pending, postgresql_where=_pending)


# --- Outbox: what the periodic drain reads (tracker.outbox_alerts) ---------------------------------------------------
# Alerts for an owner not written to their inbox yet (DELIVERED_TO_OWNER, undelivered). Only these have an entry,
# so the drain reads the few a failed inbox write left behind, not every alert: an alert's entry goes in with it
# and out with its "delivered" mark, moments later. In (created_at, alert_id) order, the drain's chunks. Literals,
# as SLA_PENDING's, for SQLite to match the query to the index.
OUTBOX_PENDING = and_(
    AlertRecord.action == literal_column("'alert'"), AlertRecord.held_out.is_(False),
    AlertRecord.suppressed_by.is_(None), AlertRecord.delivered_at.is_(None),
)
Index("ix_alerts_outbox", AlertRecord.created_at, AlertRecord.alert_id,
      sqlite_where=OUTBOX_PENDING, postgresql_where=OUTBOX_PENDING)


# --- Repair: cooldown-suppressed decisions an outcome closed (tracker.apply_outcome before it kept them suppressed) ---------
# Stores written before that fix hold such decisions as status 'closed': create_schema sets them back to 'suppressed'
# (store.repair_suppressed_closed) each time it runs. No decision is written so any more, so the index stays empty and
# the repair reads nothing once done (200k alerts: ~0.1 ms on SQLite, ~2 ms on PostgreSQL, against 60-200 ms for a
# scan of the table every start); built once on an older store, as every index it lacks (~90 ms per 200k). Literals,
# as SLA_PENDING's, for SQLite to match the repair's UPDATE to the index.
SUPPRESSED_CLOSED = and_(
    AlertRecord.status == literal_column("'closed'"), AlertRecord.suppressed_by.is_not(None),
    AlertRecord.suppressed_by != literal_column("''"),
)
Index("ix_alerts_suppressed_closed", AlertRecord.alert_id,
      sqlite_where=SUPPRESSED_CLOSED, postgresql_where=SUPPRESSED_CLOSED)


class CooldownRecord(SQLModel, table=True):
    """The decision that started the current cooldown window of a rule and entity, and when the
    window ends. Claimed in the transaction that stores that decision, so every worker sees one
    holder per window (see cooldowns.py)."""

    __tablename__ = "cooldowns"

    # Key columns in this order, the entity first: a batch looks up its entities (entity_id IN ...)
    # through the primary key; with the rule first, the few rules of a batch match most rows.
    entity_id: str = Field(primary_key=True)
    entity_type: str = Field(primary_key=True)
    rule: str = Field(primary_key=True)
    alert_id: str  # the decision (alert or control record) the window's later decisions are suppressed by
    started_at: datetime = _when()
    ends_at: datetime = _when()  # started_at + the rule's cooldown when the window started


class EscalationRecord(SQLModel, table=True):
    """One step up the manager chain; also the outbox of escalated deliveries."""

    __tablename__ = "escalations"
    __table_args__ = (UniqueConstraint("alert_id", "level", name="uq_escalation_level"),)

    id: int | None = Field(default=None, primary_key=True)
    alert_id: str = Field(index=True)
    level: int
    kind: str  # ack | act: which deadline was missed
    from_owner: str
    # Indexed: an owner token's listing and dashboard read the alerts escalated to it by this, on every
    # request; without it, each read the whole table, which only grows.
    to_owner: str = Field(index=True)
    reason: str
    at: datetime = _when()
    delivered_at: datetime | None = _when(nullable=True)


class AuditEvent(SQLModel, table=True):
    """Append-only history: rows are inserted, never updated or deleted."""

    __tablename__ = "audit_events"

    id: int | None = Field(default=None, primary_key=True)
    alert_id: str | None = Field(default=None, index=True)
    prediction_id: str | None = Field(default=None, index=True)
    # routed | recorded | held_out | suppressed | delivered | acknowledged | intervened |
    # outcome | reassigned | escalated | sla_breached; received in stores written before issue 8
    # (now built from the predictions row, audit.py)
    type: str
    actor: str
    at: datetime = _when()
    source_id: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class RejectionRecord(SQLModel, table=True):
    """A rejected input, counted per model and reason (its payload is in the DLQ stream)."""

    __tablename__ = "rejections"
    __table_args__ = (UniqueConstraint("source_stream", "source_id", name="uq_rejection_source"),)

    id: int | None = Field(default=None, primary_key=True)
    source_stream: str
    source_id: str | None = None
    model: str | None = Field(default=None, index=True)
    reason: str = Field(index=True)
    detail: str
    at: datetime = _when(index=True)


class DeliveryRecord(SQLModel, table=True):
    """One alert to one receiver (an owner's webhook or email): the channel outbox.

    The payload is the alert as sent (an escalated copy carries its escalation), so a
    redrive sends exactly what failed."""

    __tablename__ = "deliveries"

    id: int | None = Field(default=None, primary_key=True)
    delivery_key: str = Field(unique=True)  # alert, recipient, channel and copy: written once
    alert_id: str = Field(index=True)
    recipient: str  # owner id
    channel: str  # webhook | email
    payload: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    status: str = Field(default="pending", index=True)  # pending | delivered | failed
    attempts: int = 0
    status_code: int | None = None
    error: str | None = None
    latency_ms: float | None = None
    created_at: datetime = _when()
    finished_at: datetime | None = _when(nullable=True)


class DeliveryClaim(SQLModel, table=True):
    """A pending delivery being sent by one router process, until `until` unless renewed.

    Every process (`serve --workers N`, several hosts, `redrive deliveries`) pumps the same outbox:
    a row is sent only by the process whose claim row went in. The holder renews its claims while
    it sends; a claim left by a killed process lapses, and another process (or its restart) sends
    the row then. The claim goes with the delivery's result."""

    __tablename__ = "delivery_claims"

    delivery_id: int = Field(primary_key=True)
    holder: str
    until: datetime = _when()


class DeliveryAttemptRecord(SQLModel, table=True):
    """Each try of a delivery and how it went."""

    __tablename__ = "delivery_attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: int = Field(index=True)
    n: int
    ok: bool
    status_code: int | None = None
    error: str | None = None
    latency_ms: float
    at: datetime = _when()


# An input entry applied twice (redelivery) must not write its events twice. Only events with a
# source_id are in the index: NULLs never clash, so the events the pipeline writes itself (received,
# routed..., delivered; none has one) need no index entry for the same guarantee. It replaces the
# constraint uq_audit_source (on every event), which create_schema drops on PostgreSQL; SQLite cannot
# drop a table's constraint, so a SQLite store created before keeps it (and its cost) as well.
Index(
    "uq_audit_source_entry", AuditEvent.source_id, AuditEvent.alert_id, AuditEvent.type, unique=True,
    sqlite_where=AuditEvent.source_id.is_not(None), postgresql_where=AuditEvent.source_id.is_not(None),
)


@event.listens_for(AuditEvent, "before_update")
@event.listens_for(AuditEvent, "before_delete")
def _audit_is_append_only(_mapper: Any, _connection: Any, target: AuditEvent) -> None:
    raise PermissionError(f"audit events are append-only (event {target.id} of alert {target.alert_id})")


class DataQualityAlertRecord(SQLModel, table=True):
    """A data-quality alert (drift, rejection or missing-context jump), for the record and as
    the outbox of its inbox delivery. One per model, version, metric and day (alert_id)."""

    __tablename__ = "data_quality_alerts"

    alert_id: str = Field(primary_key=True)  # unique: several workers store it once
    day: str  # UTC date of the check, part of alert_id
    model: str = Field(index=True)
    model_version: str
    metric: str  # score | feature:<name> | rejection_rate | missing_context_rate
    value: float | None = None
    threshold: float | None = None
    reference_value: float | None = None
    p_value: float | None = None
    alpha: float | None = None
    n_reference: int
    n_recent: int
    window: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    owner: str | None = Field(default=None, index=True)  # None: the model has no owner in `models:`
    detail: str
    created_at: datetime = _when(index=True)
    delivered_at: datetime | None = _when(nullable=True)


# --- Stats: what `decision-router stats` reads (owned by the stats work; see stats.compute_stats) ---------------
# One GROUP BY reads every alert in a window. On SQLite the first index holds exactly what it reads, in
# its grouping order, so the scan reads the index instead of the row and needs no sort; it stores
# how each alert counts as one small integer (STATS_KIND) and its times to ack and to act, computed
# when the alert is written (or acknowledged...), which SQLite then reads instead of recomputing them.
# The expressions must stay token-for-token those stats.py queries (it imports them from here).


def _sqlite_epoch_s(column: Any) -> Any:
    # Whole seconds of "YYYY-MM-DD HH:MM:SS" only: SQLite rounds fractions to milliseconds, so
    # 59.9996 s would become the next minute. strftime, not unixepoch: SQLite < 3.38 has no unixepoch.
    return cast(func.strftime(literal_column("'%s'"), func.substr(column, literal_column("1"), literal_column("19"))),
                Integer)


def sqlite_elapsed_us(start: Any, end: Any) -> Any:
    """end - start in integer microseconds on SQLite, where DateTime is "YYYY-MM-DD HH:MM:SS.ffffff"."""
    micros = (cast(func.substr(end, literal_column("21"), literal_column("6")), Integer)
              - cast(func.substr(start, literal_column("21"), literal_column("6")), Integer))
    return (_sqlite_epoch_s(end) - _sqlite_epoch_s(start)) * literal_column("1000000") + micros


# Not suppressed by a cooldown (the reference tally's `not r.suppressed_by`: NULL or empty).
STATS_LIVE = or_(AlertRecord.suppressed_by.is_(None), AlertRecord.suppressed_by == literal_column("''"))
# Delivered to an owner: the alerts whose times to ack and to act the stats report. DELIVERED_TO_OWNER, as the
# reference reads it ('' is no suppression) and with literals, which an index predicate needs.
STATS_ROUTED = and_(STATS_LIVE, not_(AlertRecord.held_out), AlertRecord.action == literal_column("'alert'"))
SQLITE_ACK_US = sqlite_elapsed_us(AlertRecord.created_at, AlertRecord.acknowledged_at)
SQLITE_ACT_US = sqlite_elapsed_us(AlertRecord.created_at, AlertRecord.intervened_at)
# How a decision counts, in the reference tally's order (stats.compute_stats_reference): its class
# (STATS_KIND_CLASS) times 64, plus for held-out and routed ones the outcome (1 success, 2 failure, 0
# other or none), and for routed ones 4 if acknowledged, 8 if acted on, 16 / 32 if the ack / act
# deadline was breached. One integer key instead of five columns (and four counts) halves SQLite's
# work per alert in the GROUP BY. Plain SQL text, so the query and the index spell it alike.
STATS_KIND_CLASS = {"suppressed": 0, "held_out": 1, "recorded": 2, "routed": 3}
_OUTCOME_CODE = "((outcome IS 'success') + 2 * (outcome IS 'failure'))"  # IS: 0, not NULL, when NULL
STATS_KIND = literal_column(
    "CASE WHEN NOT (suppressed_by IS NULL OR suppressed_by = '') THEN 0"
    f" WHEN held_out THEN 64 + {_OUTCOME_CODE}"
    " WHEN action != 'alert' THEN 128"
    f" ELSE 192 + {_OUTCOME_CODE} + 4 * (acknowledged_at IS NOT NULL) + 8 * (intervened_at IS NOT NULL)"
    " + 16 * (ack_breached_at IS NOT NULL) + 32 * (act_breached_at IS NOT NULL) END"
)
Index(
    "ix_alerts_stats_kind", AlertRecord.rule, STATS_KIND, AlertRecord.escalation_level, SQLITE_ACK_US,
    SQLITE_ACT_US, AlertRecord.created_at, AlertRecord.owner, AlertRecord.model, AlertRecord.model_version,
    AlertRecord.priority,
).ddl_if(dialect="sqlite")
# The median and p90 of a rule's times, without sorting them: these hold each rule's times in order, so
# the value at a rank is a walk to it through one rule's entries (from the far end for the p90). Only
# acknowledged (acted-on) routed alerts have an entry, and a new alert is neither: inserts skip them; the
# entry is added when the ack (intervention) is recorded. PostgreSQL needs the two columns of the
# difference in the index to read it without visiting the table.
STATS_RANKED_TIMES = {"ack": AlertRecord.acknowledged_at, "act": AlertRecord.intervened_at}
for _name, _end in STATS_RANKED_TIMES.items():
    Index(
        f"ix_alerts_stats_{_name}_rank", AlertRecord.rule, sqlite_elapsed_us(AlertRecord.created_at, _end),
        sqlite_where=and_(STATS_ROUTED, _end.is_not(None)),
    ).ddl_if(dialect="sqlite")
    Index(
        f"ix_alerts_stats_{_name}_rank_pg", AlertRecord.rule, _end - AlertRecord.created_at,
        postgresql_include=[_end.name, "created_at"], postgresql_where=and_(STATS_ROUTED, _end.is_not(None)),
    ).ddl_if(dialect="postgresql")
# PostgreSQL sorts the times of routed alerts per group for the medians and p90s of the other groupings
# and of windows, read from this smaller index (only those rows, already in rule order) ...
Index(
    "ix_alerts_stats_times", AlertRecord.rule,
    postgresql_include=["created_at", "acknowledged_at", "intervened_at", "owner", "model", "model_version",
                        "priority"],
    postgresql_where=and_(STATS_ROUTED, or_(AlertRecord.acknowledged_at.is_not(None),
                                            AlertRecord.intervened_at.is_not(None))),
).ddl_if(dialect="postgresql")
# ... and counts from this one: an index-only scan in GROUP BY order, a third of the table's size. It
# carries whether an alert was acknowledged and acted on (how many times each rule's ranks are over);
# both are NULL when an alert is written, which costs a NULL bit, nothing more.
Index(
    "ix_alerts_stats_tally", AlertRecord.rule, AlertRecord.held_out, AlertRecord.action, AlertRecord.outcome,
    postgresql_include=["suppressed_by", "escalation_level", "ack_breached_at", "act_breached_at", "created_at",
                        "owner", "model", "model_version", "priority", "acknowledged_at", "intervened_at"],
).ddl_if(dialect="postgresql")
# The stats indexes (benchmarks time stores with and without them). create_schema builds them on a store
# created before them, as every index of the tables the store lacks, and drops those they replaced.
STATS_INDEXES = {
    "sqlite": ["ix_alerts_stats_kind", "ix_alerts_stats_ack_rank", "ix_alerts_stats_act_rank"],
    "postgresql": ["ix_alerts_stats_times", "ix_alerts_stats_tally", "ix_alerts_stats_ack_rank_pg",
                   "ix_alerts_stats_act_rank_pg"],
}
RETIRED_STATS_INDEXES = {"sqlite": ["ix_alerts_stats"], "postgresql": ["ix_alerts_stats_counts"]}
# Indexes no query needed, which every stored decision paid for (create_schema drops them from older
# stores). held_out: a value most alerts share; no plan chose it. Audit events' time: no query filters
# or orders on it alone. On SQLite also status (only the SLA sweep chose it, to read every open alert
# and sort them: slower than without) and rule (the leading column of ix_alerts_stats_kind, which
# serves its lookups and distinct values). PostgreSQL keeps those two (below): once most alerts are
# closed its planner reads the few open ones through status (the dashboard's SLA panel, 5-8x), and
# the dashboard's rule choices through rule (its wide stats index is not chosen for them).
# The due-time indexes on every alert (ix_alerts_ack_due_at, _act_due_at): replaced by the partial ones
# (ix_alerts_ack_pending, _act_pending).
_RETIRED_DUE_INDEXES = ["ix_alerts_ack_due_at", "ix_alerts_act_due_at"]
# On PostgreSQL ix_alerts_entity_id (the entity alone) is replaced by ix_alerts_entity (below).
RETIRED_INDEXES = {
    "sqlite": ["ix_alerts_rule", "ix_alerts_status", "ix_alerts_held_out", "ix_audit_events_at", *_RETIRED_DUE_INDEXES],
    "postgresql": ["ix_alerts_held_out", "ix_audit_events_at", *_RETIRED_DUE_INDEXES, "ix_alerts_entity_id"],
}
Index("ix_alerts_rule", AlertRecord.rule).ddl_if(dialect="postgresql")
Index("ix_alerts_status", AlertRecord.status).ddl_if(dialect="postgresql")
# An entity's alerts: outcomes, stories and listings find them through these. On PostgreSQL also by rule
# and time, for the cooldown read of every batch (tracker.cooldown_holders looks up each entity of the
# batch with its rules and window): it then reads only the batch's entities' alerts of those rules, with
# or without table statistics. SQLite keeps the entity alone: its planner, without statistics, would
# prefer the owner or model index to a wider one for an entity's listing filtered by either (50-250x).
Index("ix_alerts_entity_id", AlertRecord.entity_id).ddl_if(dialect="sqlite")
Index("ix_alerts_entity", AlertRecord.entity_id, AlertRecord.rule, AlertRecord.created_at).ddl_if(dialect="postgresql")
# PostgreSQL constraints replaced by an index added since (uq_audit_source_entry), which create_schema
# builds on older stores, as every index and column of the tables they lack; it drops these after.
RETIRED_CONSTRAINTS = [("audit_events", "uq_audit_source")]
