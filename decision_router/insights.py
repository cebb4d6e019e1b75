"""Read-side views for the dashboard, on top of stats.py.

stats.compute_stats already gives the per-rule funnel and uplift; this module shapes them
for charts and adds what the dashboard needs and stats lacks:
- `funnel` / `uplift`: per rule, routed -> acknowledged -> intervened -> success, and the
  uplift with its fixed 95% interval (straight from compute_stats, so the two never disagree);
- `time_to_act_histogram`: how long routed alerts waited for their first intervention;
- `owner_sla`: per accountable owner, open, overdue and escalated alerts right now;
- `rejections_per_day`: data-quality rejections per UTC day and reason;
- `open_alerts`: an owner's inbox, its own open alerts and those escalated to it.

Every function is a pure read of the store; windows are [since, until) on the same column
as stats (alert creation, rejection time), and every bucket is computed in Python so SQLite
and PostgreSQL give the same numbers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, literal, literal_column, null, select, union_all
from sqlalchemy.orm import Session, aliased

from decision_router.durations import EARLIEST, format_duration
from decision_router.stats import UNKNOWN_MODEL, GroupBy, StatsRow, compute_stats
from decision_router.store import within
from decision_router.tables import DELIVERED_TO_OWNER, AlertRecord, EscalationRecord, RejectionRecord, as_utc

# Upper edges of the time-to-act buckets, in seconds; the last bucket is open-ended.
DEFAULT_ACT_EDGES: tuple[int, ...] = (15 * 60, 3600, 4 * 3600, 24 * 3600, 48 * 3600, 7 * 86400)
MAX_DAYS = 366  # rejections_per_day fills at most this many days (a chart, not an export)


# --- funnel and uplift, from compute_stats ------------------------------------------------


@dataclass(frozen=True)
class FunnelRow:
    rule: str
    routed: int
    acknowledged: int
    intervened: int
    successes: int
    failures: int
    acknowledged_rate: float | None
    intervention_rate: float | None
    success_rate: float | None


@dataclass(frozen=True)
class UpliftRow:
    rule: str
    treated_n: int
    control_n: int
    treated_success_rate: float | None
    control_success_rate: float | None
    uplift: float | None  # None: "not enough data" (a group below uplift.MIN_N with an outcome)
    ci_low: float | None
    ci_high: float | None
    has_control: bool  # the rule has a control group at all (else uplift cannot exist)


def rule_stats(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, rule: str | None = None,
    model: str | None = None, holdouts: Mapping[str, float] | None = None,
) -> list[StatsRow]:
    """compute_stats by rule; the funnel and uplift views are two projections of these rows."""
    return compute_stats(session, by=GroupBy.RULE, since=since, until=until, rule=rule, model=model, holdouts=holdouts)


def funnel(rows: Sequence[StatsRow]) -> list[FunnelRow]:
    """Rules that alert someone (routed > 0); record-only rules have no funnel."""
    return [
        FunnelRow(
            rule=r.key, routed=r.routed, acknowledged=r.acknowledged, intervened=r.intervened,
            successes=r.successes, failures=r.failures, acknowledged_rate=r.acknowledged_rate,
            intervention_rate=r.intervention_rate, success_rate=r.success_rate,
        )
        for r in rows
        if r.routed
    ]


def uplift(rows: Sequence[StatsRow], holdouts: Mapping[str, float] | None = None) -> list[UpliftRow]:
    """Rules that alert someone, with the fixed 95% (Newcombe) interval of compute_stats."""
    holdouts = holdouts or {}
    return [
        UpliftRow(
            rule=r.key, treated_n=r.treated_n, control_n=r.control_n,
            treated_success_rate=r.treated_success_rate, control_success_rate=r.control_success_rate,
            uplift=r.uplift, ci_low=r.uplift_ci_low, ci_high=r.uplift_ci_high,
            has_control=r.held_out > 0 or holdouts.get(r.key, 0.0) > 0,
        )
        for r in rows
        if r.routed
    ]


# --- time to act ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    label: str
    low_s: float  # inclusive
    high_s: float | None  # exclusive; None: open-ended
    count: int


@dataclass(frozen=True)
class TimeToAct:
    buckets: list[Bucket]
    acted: int  # routed alerts with an intervention (the sum of the buckets)
    not_acted: int  # routed alerts without one yet


def _routed(query: Any) -> Any:
    """Alerts delivered to an owner: the `routed` of compute_stats."""
    return query.where(DELIVERED_TO_OWNER)


def _filtered(query: Any, rule: str | None, model: str | None) -> Any:
    if rule is not None:
        query = query.where(AlertRecord.rule == rule)
    if model is not None:
        query = query.where(AlertRecord.model == model)
    return query


def time_to_act_histogram(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, rule: str | None = None,
    model: str | None = None, edges: Sequence[int] = DEFAULT_ACT_EDGES,
) -> TimeToAct:
    """Routed alerts by time from creation to the first intervention, in buckets ending at `edges`."""
    if list(edges) != sorted(set(edges)) or not edges or edges[0] <= 0:
        raise ValueError(f"edges must be strictly increasing positive seconds, got {list(edges)}")
    query = _routed(within(select(AlertRecord.created_at, AlertRecord.intervened_at), AlertRecord.created_at, since, until))
    counts = [0] * (len(edges) + 1)
    not_acted = 0
    for created, intervened in session.execute(_filtered(query, rule, model)):
        if intervened is None:
            not_acted += 1
            continue
        seconds = (as_utc(intervened) - as_utc(created)).total_seconds()
        counts[sum(seconds >= edge for edge in edges)] += 1
    lows = [0, *edges]
    highs: list[int | None] = [*edges, None]
    buckets = []
    for low, high, n in zip(lows, highs, counts, strict=True):
        if high is None:
            label = f"≥ {format_duration(timedelta(seconds=low))}"
        elif low == 0:
            label = f"< {format_duration(timedelta(seconds=high))}"
        else:
            label = f"{format_duration(timedelta(seconds=low))}–{format_duration(timedelta(seconds=high))}"
        buckets.append(Bucket(label=label, low_s=low, high_s=high, count=n))
    return TimeToAct(buckets=buckets, acted=sum(counts), not_acted=not_acted)


# --- owners' SLA ----------------------------------------------------------------------------


def overdue(alert: Any, now: datetime, last_step: str | None) -> tuple[bool, bool]:
    """(ack, act): whether the accountable owner let the deadline to acknowledge, to act on, `alert` pass unmet.

    Their deadline, not the alert's first one (ack_by, act_by): a reassignment gives the new owner fresh ones,
    in ack_due_at / act_due_at, where the escalation sweep reads them. So a deadline is overdue when it is not
    met and is no longer pending ahead: passed (the sweep takes it up on its next run), cleared by a breach at
    the top of the chain (or, for the ack, by an escalation for the act: both missed), or moved on by an
    escalation of the current chain (escalated_to: a reassignment starts a new chain), which pushes the due time
    to the manager's. An escalation while unacknowledged was for the ack or also the act; whether the act's was
    is `last_step`: "act" if a step of the current chain was for the act (see last_steps). `alert`: an
    AlertRecord or a row of its columns."""
    def ahead(due: datetime | None) -> bool:
        return due is not None and as_utc(due) > now

    escalated = alert.escalated_to is not None
    ack = alert.acknowledged_at is None and (escalated or not ahead(alert.ack_due_at))
    act = alert.intervened_at is None and ((escalated and last_step == "act") or not ahead(alert.act_due_at))
    return ack, act


def last_steps(session: Session, alerts: Sequence[AlertRecord]) -> dict[str, str]:
    """For each of these alerts escalated in their current chain, "act" if a step of that chain was for the act,
    else "ack". Not just the latest step's kind: an act step leaves an ack deadline not missed yet pending, so an
    ack step may follow it in the same chain.

    The current chain is the steps from the latest one up from the owner (its first: a reassignment starts a new
    chain at the new owner), as escalation._chain_so_far reads it."""
    owners = {alert.alert_id: alert.owner for alert in alerts if alert.escalated_to is not None}
    if not owners:
        return {}
    query = (
        select(EscalationRecord.alert_id, EscalationRecord.kind, EscalationRecord.from_owner)
        .where(EscalationRecord.alert_id.in_(list(owners)))
        .order_by(EscalationRecord.level.desc())
    )
    kinds: dict[str, str] = {}
    done: set[str] = set()
    for alert_id, kind, from_owner in session.execute(query):  # the latest step first
        if alert_id in done:
            continue
        if kind == "act" or alert_id not in kinds:
            kinds[alert_id] = kind
        if from_owner == owners[alert_id]:
            done.add(alert_id)
    return kinds


# LAST_STEP for a row of the alerts: last_steps in SQL, for an escalated alert. The chain starts at the owner's
# latest step (none: every step counts, as last_steps).
_STEP, _START = aliased(EscalationRecord), aliased(EscalationRecord)
_CHAIN_START = (
    select(func.max(_START.level))
    .where(_START.alert_id == AlertRecord.alert_id, _START.from_owner == AlertRecord.owner)
    .correlate(AlertRecord)
    .scalar_subquery()
)
LAST_STEP = case(
    (AlertRecord.escalated_to.is_(None), null()),
    (
        select(_STEP.id)
        .where(_STEP.alert_id == AlertRecord.alert_id, _STEP.kind == "act",
               _STEP.level >= func.coalesce(_CHAIN_START, 0))
        .correlate(AlertRecord)
        .exists(),
        literal("act"),
    ),
    else_=literal("ack"),
)


@dataclass(frozen=True)
class OwnerSla:
    owner: str
    open: int  # routed alerts without an outcome
    overdue: int  # of which past a deadline of their owner's they have not met (see `overdue`)
    escalated: int  # of which escalated up the manager chain at least once
    breached: int  # of which missed a deadline at the top of the chain (an SLA breach)


def owner_sla(
    session: Session, *, now: datetime, since: datetime | None = None, until: datetime | None = None,
    rule: str | None = None, model: str | None = None,
) -> list[OwnerSla]:
    """Per accountable owner, their open alerts right now; most overdue first, then most open."""
    columns = (
        AlertRecord.owner, AlertRecord.ack_due_at, AlertRecord.act_due_at, AlertRecord.acknowledged_at,
        AlertRecord.intervened_at, AlertRecord.escalated_to, LAST_STEP.label("last_step"),
        AlertRecord.escalation_level, AlertRecord.ack_breached_at, AlertRecord.act_breached_at,
    )
    query = _routed(within(select(*columns), AlertRecord.created_at, since, until)).where(AlertRecord.status == "open")
    tallies: dict[str, Counter[str]] = defaultdict(Counter)
    for r in session.execute(_filtered(query, rule, model)):
        tally = tallies[r.owner]
        tally["open"] += 1
        tally["overdue"] += any(overdue(r, now, r.last_step))
        tally["escalated"] += r.escalation_level > 0
        tally["breached"] += r.ack_breached_at is not None or r.act_breached_at is not None
    rows = [
        OwnerSla(owner=owner, open=t["open"], overdue=t["overdue"], escalated=t["escalated"], breached=t["breached"])
        for owner, t in tallies.items()
    ]
    return sorted(rows, key=lambda r: (-r.overdue, -r.escalated, -r.open, r.owner))


# --- data quality over time -----------------------------------------------------------------


@dataclass(frozen=True)
class RejectionDays:
    days: list[str]  # every UTC day of the window, oldest first ("2026-11-25")
    reasons: list[str]  # every reason seen, most frequent first
    counts: dict[str, list[int]]  # reason -> count per day, aligned with `days`
    total: int


def _day_range(first: date, last: date) -> list[date]:
    span = min((last - first).days, MAX_DAYS - 1)
    return [last - timedelta(days=span - i) for i in range(span + 1)]


def rejections_per_day(
    session: Session, *, since: datetime | None = None, until: datetime | None = None, model: str | None = None,
) -> RejectionDays:
    """Rejected predictions and outcome events per UTC day and reason.

    With `model`, only that model's rejected predictions (outcome events carry no model),
    as compute_quality counts them. The days run from `since` (or the first rejection) to
    `until` (or the last), empty days included, at most MAX_DAYS (the latest ones).
    """
    columns = (RejectionRecord.source_stream, RejectionRecord.model, RejectionRecord.reason, RejectionRecord.at)
    per_day: dict[date, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for stream, name, reason, at in session.execute(within(select(*columns), RejectionRecord.at, since, until)):
        # Same test as stats.compute_quality: Keys(prefix).outcomes ends in "outcomes".
        if model is not None and (stream.endswith("outcomes") or (name or UNKNOWN_MODEL) != model):
            continue
        day = as_utc(at).date()
        per_day[day][reason] += 1
        totals[reason] += 1
    seen = sorted(per_day)
    first = as_utc(since).date() if since is not None else (seen[0] if seen else None)
    last: date | None
    if until is None:
        last = seen[-1] if seen else first
    else:
        # until is exclusive: a window ending at midnight does not include that day (one ending at
        # the first moment of the year 1 holds no day, and has none before it).
        end = as_utc(until)
        last = (end - timedelta(microseconds=1)).date() if end > EARLIEST else None
    days = _day_range(first, last) if first is not None and last is not None and first <= last else []
    reasons = [reason for reason, _ in sorted(totals.items(), key=lambda item: (-item[1], item[0]))]
    counts = {reason: [per_day[day][reason] if day in per_day else 0 for day in days] for reason in reasons}
    return RejectionDays(
        days=[day.isoformat() for day in days], reasons=reasons, counts=counts,
        total=sum(sum(c) for c in counts.values()),
    )


# --- owner inbox --------------------------------------------------------------------------


def next_deadline(record: AlertRecord, last_step: str | None = None) -> datetime | None:
    """The deadline the owner has still to meet: acknowledge, then act; None once acted on. NEXT_DEADLINE (below)
    is the same in SQL, for open_alerts to choose and order by; `last_step` as for `overdue`.

    The owner's own deadline, as `overdue` reads it: its due time while pending (after a reassignment, the new
    owner's fresh one, later than ack_by / act_by). One `overdue` counts as passed (escalated past the owner,
    or cleared by a breach) is the alert's first, ack_by / act_by: passed too, and never later than the owner's."""
    escalated = record.escalated_to is not None
    if record.acknowledged_at is None:
        pending = record.ack_due_at is not None and not escalated
        return as_utc(record.ack_due_at if pending else record.ack_by)
    if record.intervened_at is None:
        pending = record.act_due_at is not None and not (escalated and last_step == "act")
        return as_utc(record.act_due_at if pending else record.act_by)
    return None


def others_escalated_to(owner: str) -> Any:
    """Other owners' alerts escalated to `owner` at any level (an escalations row names it)."""
    escalated = select(EscalationRecord.alert_id).where(EscalationRecord.to_owner == owner)
    return and_(AlertRecord.owner != owner, AlertRecord.alert_id.in_(escalated))


@dataclass(frozen=True)
class SortKey:
    """A column or expression of the alerts that alerts_seen_by orders by, under a name: the order of a UNION
    can only name its selected columns."""

    name: str
    expression: Any
    descending: bool = False

    def of(self, column: Any) -> Any:
        return column.desc() if self.descending else column.asc()


# A stand-in for "no deadline" that sorts after every real one, on both stores: SQLite has NULLS LAST only
# from 3.30 on, and PostgreSQL sorts NULL last but SQLite first.
NEVER = datetime.max.replace(tzinfo=UTC)
# next_deadline in SQL: acknowledge by the owner's ack due time (ack_by once passed), then act by their act due time
# (act_by once passed); none (NEVER) once acted on. LAST_STEP is looked up only for an alert escalated in its chain.
NEXT_DEADLINE = case(
    (and_(AlertRecord.acknowledged_at.is_(None), AlertRecord.ack_due_at.is_not(None),
          AlertRecord.escalated_to.is_(None)), AlertRecord.ack_due_at),
    (AlertRecord.acknowledged_at.is_(None), AlertRecord.ack_by),
    (AlertRecord.intervened_at.is_not(None), literal(NEVER, AlertRecord.ack_by.type)),
    (and_(AlertRecord.act_due_at.is_not(None), AlertRecord.escalated_to.is_(None)), AlertRecord.act_due_at),
    (and_(AlertRecord.act_due_at.is_not(None), func.coalesce(LAST_STEP, "") != "act"), AlertRecord.act_due_at),
    else_=AlertRecord.act_by,
)
NEWEST_FIRST = (SortKey("created_at", AlertRecord.created_at, True), SortKey("alert_id", AlertRecord.alert_id, True))
NEAREST_DEADLINE_FIRST = (
    SortKey("next_deadline", NEXT_DEADLINE), SortKey("created_at", AlertRecord.created_at),
    SortKey("alert_id", AlertRecord.alert_id),
)


def alerts_seen_by(owner: str, *conditions: Any, order: Sequence[SortKey], limit: int) -> Any:
    """A select of the alerts meeting `conditions` that an owner sees: its own and those escalated to
    it, the first `limit` in `order` (whose last key must be unique: the alert id).

    Two selects joined by UNION ALL, each read through its own index (the alerts' owner; escalations by
    to_owner, then the alerts by id): with `owner = ... OR alert_id IN (...)` PostgreSQL used neither
    and read every alert, or every open one, to find a few (100k alerts: 30-50 ms, where this takes 1.5-5)."""
    keys = [key.expression.label(key.name) for key in order]
    picked = (
        union_all(
            select(*keys).where(*conditions, AlertRecord.owner == owner),
            select(*keys).where(*conditions, others_escalated_to(owner)),
        )
        .order_by(*(key.of(literal_column(key.name)) for key in order))
        .limit(limit)
        .subquery()
    )
    return (
        select(AlertRecord)
        .join(picked, AlertRecord.alert_id == picked.c.alert_id)
        .order_by(*(key.of(picked.c[key.name]) for key in order))
    )


def open_alerts(session: Session, *, owner: str, limit: int = 500) -> list[AlertRecord]:
    """An owner's open routed alerts and those escalated to it: the `limit` most urgent, the nearest unmet
    deadline first (then the oldest); alerts already acted on (waiting for their outcome) last.

    Chosen and ordered in SQL: reading the `limit` oldest and sorting those left out a newer alert due
    sooner once an owner had more than `limit` open."""
    query = alerts_seen_by(owner, DELIVERED_TO_OWNER, AlertRecord.status == "open", order=NEAREST_DEADLINE_FIRST,
                           limit=limit)
    return list(session.scalars(query))


def escalations_to(session: Session, *, to_owner: str, alert_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
    """The level at which each alert was escalated to `to_owner` (the highest, if more than once), and
    from whom: the owner then, or the manager below (the alert's owner may have changed since)."""
    if not alert_ids:
        return {}
    query = (
        select(EscalationRecord.alert_id, EscalationRecord.level, EscalationRecord.from_owner)
        .where(EscalationRecord.to_owner == to_owner, EscalationRecord.alert_id.in_(list(alert_ids)))
        .order_by(EscalationRecord.level)
    )
    return {alert_id: (level, from_owner) for alert_id, level, from_owner in session.execute(query)}  # highest last


def as_json(value: Any) -> Any:
    """Dataclasses (and lists of them) as JSON-ready dicts."""
    if isinstance(value, list):
        return [as_json(v) for v in value]
    return asdict(value)
