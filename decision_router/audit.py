"""`audit`: the story of an alert or an entity, from the append-only audit events.

Who did what, when: the prediction received, the rule and rules version that matched,
the owner and how they were found, deliveries, acknowledgements, escalations,
reassignments, interventions and the outcome. Read-only; the CLI only formats.

The "received" event is not stored (since issue 8): the predictions row holds what it said,
so the stories build it from that row. Older stores hold one per prediction; that one is shown
instead, never both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from decision_router.tables import AlertRecord, AuditEvent, PredictionRecord, as_utc

DECISION_EVENTS = ("routed", "recorded", "held_out", "suppressed")
SYSTEM_ACTOR = "decision-router"  # the actor of the events the service writes itself


def iso(value: datetime | None) -> str | None:
    """UTC with a Z, as the streams, the webhooks and every documented example write it: one alert's
    created_at reads the same in its inbox entry, from the API and from `audit --format json`."""
    return as_utc(value).isoformat().replace("+00:00", "Z") if value is not None else None  # type: ignore[union-attr]


@dataclass(frozen=True)
class StoryEvent:
    id: int | None
    at: datetime
    type: str
    actor: str
    alert_id: str | None
    prediction_id: str | None
    detail: Mapping[str, Any]

    @property
    def summary(self) -> str:
        return describe(self.type, self.prediction_id, self.detail)

    def as_dict(self) -> dict[str, Any]:
        return {
            "at": iso(self.at),
            "type": self.type,
            "actor": self.actor,
            "alert_id": self.alert_id,
            "prediction_id": self.prediction_id,
            "summary": self.summary,
            "detail": dict(self.detail),
        }


@dataclass(frozen=True)
class PredictionSummary:
    prediction_id: str
    model: str
    model_version: str
    entity_type: str
    entity_id: str
    score: float
    predicted_at: datetime
    received_at: datetime
    rules_version: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "prediction_id": self.prediction_id, "model": self.model, "model_version": self.model_version,
            "entity_type": self.entity_type, "entity_id": self.entity_id, "score": self.score,
            "predicted_at": iso(self.predicted_at), "received_at": iso(self.received_at),
            "rules_version": self.rules_version,
        }


_ALERT_FIELDS = (
    "alert_id", "prediction_id", "rule", "rules_version", "owner", "original_owner", "owner_source",
    "fallback_reason", "delegated_from", "priority", "action", "status", "held_out", "suppressed_by",
    "model", "model_version", "entity_type", "entity_id", "score", "created_at", "ack_by", "act_by",
    "delivered_at", "acknowledged_at", "intervened_at", "intervention", "outcome", "outcome_value", "outcome_at",
    "escalation_level", "escalated_to",
)


@dataclass(frozen=True)
class AlertSummary:
    """One decision as stored, with `effective_action`: alert | record | control | suppressed."""

    alert_id: str
    prediction_id: str
    rule: str
    rules_version: str
    owner: str  # now, after any reassignment
    original_owner: str
    owner_source: str
    fallback_reason: str | None
    delegated_from: str | None
    priority: str
    action: str
    status: str
    held_out: bool
    suppressed_by: str | None
    model: str
    model_version: str
    entity_type: str
    entity_id: str
    score: float
    created_at: datetime
    ack_by: datetime
    act_by: datetime
    delivered_at: datetime | None
    acknowledged_at: datetime | None
    intervened_at: datetime | None
    intervention: str | None
    outcome: str | None
    outcome_value: float | None
    outcome_at: datetime | None
    escalation_level: int
    escalated_to: str | None
    effective_action: str

    @classmethod
    def of(cls, record: AlertRecord) -> AlertSummary:
        return cls(**{name: getattr(record, name) for name in _ALERT_FIELDS}, effective_action=record.effective_action)

    def as_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in (*_ALERT_FIELDS, "effective_action")}
        return {k: iso(v) if isinstance(v, datetime) else v for k, v in values.items()}

    def brief(self) -> dict[str, Any]:
        return {"alert_id": self.alert_id, "rule": self.rule, "owner": self.owner, "priority": self.priority,
                "effective_action": self.effective_action}


@dataclass(frozen=True)
class AlertStory:
    """One alert, its prediction's `received` event and its own events in time order."""

    alert: AlertSummary
    prediction: PredictionSummary | None
    events: tuple[StoryEvent, ...]
    siblings: tuple[AlertSummary, ...] = ()  # the other decisions for the same prediction

    def as_dict(self) -> dict[str, Any]:
        return {
            "alert": self.alert.as_dict(),
            "prediction": self.prediction.as_dict() if self.prediction else None,
            "siblings": [s.brief() for s in self.siblings],
            "events": [e.as_dict() for e in self.events],
        }


@dataclass(frozen=True)
class EntityStory:
    entity_type: str
    entity_id: str
    predictions: tuple[PredictionSummary, ...]
    alerts: tuple[AlertStory, ...]  # every decision, including control and suppressed ones, with its events
    events: tuple[StoryEvent, ...]  # the whole story in time order, each event once

    def as_dict(self) -> dict[str, Any]:
        return {
            "entity": {"type": self.entity_type, "id": self.entity_id},
            "predictions": [p.as_dict() for p in self.predictions],
            "alerts": [{"alert": s.alert.as_dict(), "events": [e.as_dict() for e in s.events]} for s in self.alerts],
            "events": [e.as_dict() for e in self.events],
        }


def _owner_how(detail: Mapping[str, Any]) -> str:
    """field / static / fallback: reason / delegate for away owner X[; fallback: reason]."""
    how = detail.get("owner_source") or "?"
    if detail.get("fallback_reason"):
        how = f"fallback: {detail['fallback_reason']}"
    if detail.get("delegated_from"):
        how = f"delegate for away owner {detail['delegated_from']}" + (f"; {how}" if how != "delegate" else "")
    return how


def describe(kind: str, prediction_id: str | None, detail: Mapping[str, Any]) -> str:
    """One line per event type; unknown types list their detail."""
    d = detail
    if kind == "received":
        text = f"prediction {prediction_id} received (model {d.get('model')}, score {d.get('score')})"
    elif kind in DECISION_EVENTS:
        text = (f"rule {d.get('rule')} matched (rules {d.get('rules_version')}): owner {d.get('owner')} "
                f"({_owner_how(d)}), priority {d.get('priority')}")
        text += {
            "routed": "",
            "recorded": "; recorded only (action: record)",
            "held_out": "; held out as control, not delivered",
            "suppressed": f"; suppressed by cooldown (alert {d.get('suppressed_by')}), not delivered",
        }[kind]
    elif kind in ("delivered", "delivery_failed"):
        level = f" (escalation level {d['escalation_level']})" if d.get("escalation_level") else ""
        digest = f" in a digest of {d['digest']}" if d.get("digest") else ""
        if kind == "delivered":
            text = f"delivered to {d.get('owner')} via {d.get('channel')}{digest}{level}"
        else:
            tries = d.get("attempts")
            text = (f"delivery to {d.get('owner')} via {d.get('channel')}{digest}{level} failed"
                    + (f" after {tries} attempt{'s' if tries != 1 else ''}" if tries else "")
                    + (f" (status {d['status_code']})" if d.get("status_code") else "")
                    + (f": {d['error']}" if d.get("error") else ""))
    elif kind == "acknowledged":
        text = "acknowledged"
    elif kind == "intervened":
        text = f"intervened: {d.get('action') or 'no action named'}"
    elif kind == "outcome":
        value = f", value {d['value']:g}" if isinstance(d.get("value"), (int, float)) else ""
        text = f"outcome {d.get('result')}{value}"
    elif kind == "reassigned":
        # Unchanged: its receiver held it already, an arrow from them to themselves would read as a hand-off.
        unchanged = d.get("unchanged")
        text = f"reassigned to {d.get('to_owner')}" if unchanged else f"reassigned {d.get('from_owner')} -> {d.get('to_owner')}"
        if d.get("delegated_from"):
            text += f" (delegate for away owner {d['delegated_from']})"
        if unchanged:
            text += ", who already held it: nothing changed"
        elif d.get("closed"):
            text += " (closed: not delivered again)"
    elif kind == "escalated":
        text = (f"escalated ({d.get('kind')} deadline missed, level {d.get('level')}) "
                f"{d.get('from_owner')} -> {d.get('to_owner')}: {d.get('reason')}")
    elif kind == "sla_breached":
        again = " again" if d.get("again") else ""
        text = (f"SLA breached{again} ({d.get('kind')}): {d.get('reason')}; "
                f"no manager above {d.get('top_of_chain') or d.get('from_owner')}")
    else:
        return " ".join([kind, *(f"{k}={v}" for k, v in d.items() if v is not None)])
    if kind in ("acknowledged", "intervened") and d.get("after_outcome"):
        # Its alert's outcome, dated earlier, was committed first (tracker.apply_outcome): not recorded on it.
        text += f" after the outcome ({d['after_outcome']}): not recorded"
    if kind in ("acknowledged", "intervened", "outcome") and d.get("already_at"):
        # Not the first of its type: the first wins (tracker.apply_outcome), this one is in the audit log only.
        first = f"outcome {d.get('already_result')} already recorded" if kind == "outcome" else f"already {kind}"
        text += f"; {first} at {d['already_at']}: not recorded"
    if d.get("note") and kind not in DECISION_EVENTS:
        text += f" (note: {d['note']})"
    return text


def _events(
    session: Session, condition: Any, predictions: Iterable[PredictionRecord], prediction_of: Mapping[str, str]
) -> list[StoryEvent]:
    """The stored events matching `condition` and the `received` event of each of `predictions`,
    once, in time order. `prediction_of` maps alert ids to their prediction's: the delivery events
    of the channels and of escalated copies are stored without it."""
    rows = session.scalars(select(AuditEvent).where(condition).order_by(AuditEvent.id))  # type: ignore[arg-type]
    stored: list[StoryEvent] = []
    received: set[str | None] = set()
    for row in rows:
        if _is_received(row):
            if row.prediction_id in received:
                continue
            received.add(row.prediction_id)
        prediction_id = row.prediction_id or prediction_of.get(row.alert_id or "")
        stored.append(StoryEvent(row.id, as_utc(row.at), row.type, row.actor, row.alert_id, prediction_id,  # type: ignore[arg-type]
                                 dict(row.detail or {})))
    built = [_received_event(p) for p in predictions if p.prediction_id not in received]
    # Time order; events written together (same instant) keep their insertion order. A received
    # event goes just before the first other event stored with its prediction at that instant:
    # its decisions, written right after it when it was stored (a built one with nothing to
    # follow goes first of its instant).
    first_id: dict[tuple[str | None, datetime], int] = {}
    for event in stored:  # in id order
        if not _is_received(event):
            first_id.setdefault((event.prediction_id, event.at), event.id or 0)
    ordered = [
        ((e.at, first_id.get((e.prediction_id, e.at), e.id or 0), 0) if _is_received(e) else (e.at, e.id or 0, 1), e)
        for e in stored + built
    ]
    ordered.sort(key=lambda pair: pair[0])  # stable: built events of one instant stay in prediction order
    return [event for _, event in ordered]


def _is_received(row: AuditEvent | StoryEvent) -> bool:
    return row.type == "received" and row.alert_id is None


def _received_event(row: PredictionRecord) -> StoryEvent:
    """The prediction's `received` event, as the store used to hold it."""
    return StoryEvent(
        None, as_utc(row.received_at), "received", SYSTEM_ACTOR, None, row.prediction_id,  # type: ignore[arg-type]
        {"stream_id": row.stream_id, "model": row.model, "score": row.score},
    )


def _prediction(row: PredictionRecord) -> PredictionSummary:
    return PredictionSummary(
        row.prediction_id, row.model, row.model_version, row.entity_type, row.entity_id, row.score,
        as_utc(row.predicted_at), as_utc(row.received_at), row.rules_version,  # type: ignore[arg-type]
    )


def _received(prediction_ids: Iterable[str]) -> Any:
    """The stored `received` events of an older store."""
    return (AuditEvent.type == "received") & AuditEvent.prediction_id.in_(list(prediction_ids)) & AuditEvent.alert_id.is_(None)


def alert_story(session: Session, alert_id: str) -> AlertStory | None:
    """None when the store has no such alert."""
    record = session.get(AlertRecord, alert_id)
    if record is None:
        return None
    prediction = session.get(PredictionRecord, record.prediction_id)
    siblings = session.scalars(
        select(AlertRecord)
        .where(AlertRecord.prediction_id == record.prediction_id, AlertRecord.alert_id != alert_id)
        .order_by(AlertRecord.created_at, AlertRecord.alert_id)
    )
    events = _events(session, or_(AuditEvent.alert_id == alert_id, _received([record.prediction_id])),
                     [prediction] if prediction else [], {alert_id: record.prediction_id})
    return AlertStory(
        alert=AlertSummary.of(record),
        prediction=_prediction(prediction) if prediction else None,
        events=tuple(events),
        siblings=tuple(AlertSummary.of(s) for s in siblings),
    )


def entity_story(session: Session, entity_type: str, entity_id: str) -> EntityStory | None:
    """Every prediction and decision for the entity, grouped per alert; None when there is nothing."""
    predictions = list(session.scalars(
        select(PredictionRecord)
        .where(PredictionRecord.entity_type == entity_type, PredictionRecord.entity_id == entity_id)
        .order_by(PredictionRecord.received_at, PredictionRecord.prediction_id)
    ))
    records = list(session.scalars(
        select(AlertRecord)
        .where(AlertRecord.entity_type == entity_type, AlertRecord.entity_id == entity_id)
        .order_by(AlertRecord.created_at, AlertRecord.prediction_id, AlertRecord.alert_id)
    ))
    if not predictions and not records:
        return None
    prediction_ids = {p.prediction_id for p in predictions} | {r.prediction_id for r in records}
    alert_ids = [r.alert_id for r in records]
    everything = _events(session, or_(AuditEvent.alert_id.in_(alert_ids), _received(prediction_ids)), predictions,
                         {r.alert_id: r.prediction_id for r in records})
    summaries = {p.prediction_id: _prediction(p) for p in predictions}
    # `everything` is in time order, so each alert's part of it is too: its own events and its
    # prediction's received event.
    alerts_of: dict[str, list[str]] = {}
    for record in records:
        alerts_of.setdefault(record.prediction_id, []).append(record.alert_id)
    by_alert: dict[str | None, list[StoryEvent]] = {}
    for event in everything:
        belongs_to = alerts_of.get(event.prediction_id or "", []) if _is_received(event) else [event.alert_id]
        for alert_id in belongs_to:
            by_alert.setdefault(alert_id, []).append(event)
    stories = [
        AlertStory(AlertSummary.of(record), summaries.get(record.prediction_id), tuple(by_alert.get(record.alert_id, [])))
        for record in records
    ]
    return EntityStory(entity_type, entity_id, tuple(summaries.values()), tuple(stories), tuple(everything))
