"""Alerts: list with filters and pages, one with its audit trail, and the actions on it.

Owner tokens see only alerts delivered to them: decisions they own whose effective action
is `alert` (not held-out control records, which must stay unseen for the uplift to mean
anything, nor cooldown-suppressed ones), and someone else's such alerts that were escalated
to them at any level: a manager acts on what reached them, as themselves (the alert's owner
stays accountable). Any other alert is a 404, not a 403, so alert ids do not leak; asking
the list for another owner is a 403 (the filter is the caller's own mistake, nothing leaks
by saying so).
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import and_, or_, select
from sqlmodel import Session

from decision_router.api.actions import Applied, apply_event, http_entry_id
from decision_router.api.auth import Principal, require
from decision_router.api.common import (
    BlankIsNone,
    body_error,
    idempotency_key,
    json_content,
    parse_entity,
    parse_since,
    query_error,
    read_store,
    ruleset_of,
)
from decision_router.audit import AlertSummary, alert_story, iso
from decision_router.contracts import OutcomeResult, not_a_boolean
from decision_router.echo import did_you_mean
from decision_router.insights import NEWEST_FIRST, alerts_seen_by
from decision_router.tables import DELIVERED_TO_OWNER, AlertRecord, EscalationRecord, as_utc
from decision_router.tracker import reassign_note

router = APIRouter(tags=["alerts"])

READERS = ("owner", "ops")  # ops admits admin
ACTING_ROLES = "role: its owner or an owner it was escalated to, ops, admin"


class State(StrEnum):
    OPEN = "open"  # not yet acknowledged
    ACKNOWLEDGED = "acknowledged"  # acknowledged, no intervention yet
    INTERVENED = "intervened"  # intervention recorded, no outcome yet
    CLOSED = "closed"  # has an outcome


class Action(StrEnum):
    ALERT = "alert"
    RECORD = "record"
    CONTROL = "control"
    SUPPRESSED = "suppressed"


def _state_clause(state: State) -> Any:
    a = AlertRecord
    if state is State.CLOSED:
        return a.status == "closed"
    open_ = a.status == "open"
    if state is State.OPEN:
        return and_(open_, a.acknowledged_at.is_(None))
    if state is State.ACKNOWLEDGED:
        return and_(open_, a.acknowledged_at.is_not(None), a.intervened_at.is_(None))
    return and_(open_, a.intervened_at.is_not(None))


def _action_clause(action: Action) -> Any:
    a = AlertRecord
    if action is Action.ALERT:
        return DELIVERED_TO_OWNER
    if action is Action.SUPPRESSED:
        return a.suppressed_by.is_not(None)
    not_suppressed = a.suppressed_by.is_(None)
    if action is Action.CONTROL:
        return and_(not_suppressed, a.held_out.is_(True))
    return and_(not_suppressed, a.held_out.is_(False), a.action == Action.RECORD.value)


def state_of(record: AlertRecord) -> str:
    """As the `state` filter finds it (_state_clause)."""
    if record.status == "closed":
        return State.CLOSED.value
    if record.status != "open":
        # Suppressed: no one's to-do, whatever an event by its prediction recorded on it.
        return record.status
    if record.intervened_at is not None:
        return State.INTERVENED.value
    if record.acknowledged_at is not None:
        return State.ACKNOWLEDGED.value
    return State.OPEN.value


def alert_view(record: AlertRecord) -> dict[str, Any]:
    """An alert as the API shows it: the stored decision, its state, deadlines and context."""
    view = AlertSummary.of(record).as_dict()
    view.update(
        state=state_of(record),
        context=record.context,
        missing_context=record.missing_context,
        # Only an open alert has deadlines pending (older stores kept them on closed alerts).
        ack_due_at=iso(record.ack_due_at) if record.status == "open" else None,
        act_due_at=iso(record.act_due_at) if record.status == "open" else None,
        predicted_at=iso(record.predicted_at),
    )
    return view


def visible_to(session: Session, principal: Principal, record: AlertRecord) -> bool:
    if principal.role != "owner":
        return True
    if record.effective_action != Action.ALERT.value:
        return False
    if record.owner == principal.owner:
        return True
    escalated = select(EscalationRecord.id).where(
        EscalationRecord.alert_id == record.alert_id, EscalationRecord.to_owner == principal.owner
    )
    return session.execute(escalated.limit(1)).first() is not None


def _encode_cursor(record: AlertRecord) -> str:
    raw = json.dumps([as_utc(record.created_at).isoformat(), record.alert_id])  # type: ignore[union-attr]
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    """[created_at, alert_id] as _encode_cursor wrote them; anything else (deep nesting, text no
    store can take, a date out of range) is a 422 naming the cursor."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        value = json.loads(base64.urlsafe_b64decode(padded.encode()))
        match value:
            # Alert ids are printable ASCII: a lone surrogate or NUL would reach the store's encoder.
            case [str(created), str(alert_id)] if alert_id.isascii() and alert_id.isprintable():
                return as_utc(datetime.fromisoformat(created)), alert_id  # type: ignore[return-value]
    except (ValueError, OverflowError, RecursionError, binascii.Error):
        pass
    raise query_error("cursor", "not a cursor this API returned (use next_cursor from the previous page)")


@router.get("/v1/alerts", summary="List alerts, newest first, with filters and cursor pages (role: owner, ops, admin)")
async def list_alerts(
    request: Request,
    principal: Annotated[Principal, Depends(require(*READERS))],
    owner: Annotated[
        str | None,
        Query(description="Only this owner's (owner tokens: their own, else also those escalated to them)."),
    ] = None,
    state: Annotated[
        State | None, BlankIsNone, Query(description="open | acknowledged | intervened | closed (blank: any)")
    ] = None,
    rule: Annotated[str | None, Query()] = None,
    entity: Annotated[str | None, Query(description="TYPE:ID, e.g. account:acct-17")] = None,
    model: Annotated[str | None, Query()] = None,
    action: Annotated[
        Action | None,
        BlankIsNone,
        Query(description="alert | record | control | suppressed (owner tokens: alert; blank: any)"),
    ] = None,
    since: Annotated[str | None, Query(description="Created since: a duration ago (7d, 24h) or an ISO date.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> dict[str, Any]:
    # A blank filter is no filter, as a blank since, entity or cursor is here and any blank one in the dashboard's
    # JSON: no owner, rule or model is named "", so matching "" would answer an empty list that looks like "none".
    # (A blank state or action is None already: BlankIsNone.)
    owner, rule, model = owner or None, rule or None, model or None
    # An owner token without an owner filter lists its own alerts and those escalated to it.
    seen_by: str | None = None
    if principal.role == "owner":
        if owner is not None and owner != principal.owner:
            raise HTTPException(status_code=403, detail="an owner token lists only its own alerts")
        if action is not None and action is not Action.ALERT:
            raise HTTPException(status_code=403, detail="an owner token lists only delivered alerts (action=alert)")
        if owner is None:
            seen_by = principal.owner
        action = Action.ALERT
    start = parse_since(since)
    entity_key = parse_entity(entity)
    after = _decode_cursor(cursor) if cursor else None

    def query(session: Session) -> tuple[list[dict[str, Any]], str | None]:
        a = AlertRecord
        conditions = []
        if owner is not None:
            conditions.append(a.owner == owner)
        if state is not None:
            conditions.append(_state_clause(state))
        if rule is not None:
            conditions.append(a.rule == rule)
        if entity_key is not None:
            conditions += [a.entity_type == entity_key[0], a.entity_id == entity_key[1]]
        if model is not None:
            conditions.append(a.model == model)
        if action is not None:
            conditions.append(_action_clause(action))
        if start is not None:
            conditions.append(a.created_at >= start)
        if after is not None:
            conditions.append(or_(a.created_at < after[0], and_(a.created_at == after[0], a.alert_id < after[1])))
        if seen_by is not None:
            q = alerts_seen_by(seen_by, *conditions, order=NEWEST_FIRST, limit=limit + 1)
        else:
            q = select(a).where(*conditions).order_by(a.created_at.desc(), a.alert_id.desc()).limit(limit + 1)
        rows = list(session.scalars(q))
        more = len(rows) > limit
        rows = rows[:limit]
        return [alert_view(r) for r in rows], (_encode_cursor(rows[-1]) if more and rows else None)

    items, next_cursor = await read_store(request, query)
    return {"items": items, "next_cursor": next_cursor}


async def _visible(request: Request, alert_id: str, principal: Principal) -> AlertRecord:
    def read(session: Session) -> AlertRecord | None:
        if "\x00" in alert_id:  # no alert id holds one, and PostgreSQL refuses to look it up
            return None
        record = session.get(AlertRecord, alert_id)
        return record if record is not None and visible_to(session, principal, record) else None

    record = await read_store(request, read)
    if record is None:
        raise HTTPException(status_code=404, detail=f"no alert {alert_id!r}")
    return record


async def _story(request: Request, alert_id: str, principal: Principal) -> dict[str, Any]:
    def read(session: Session) -> dict[str, Any] | None:
        story = alert_story(session, alert_id)
        record = session.get(AlertRecord, alert_id)
        if story is None or record is None:
            return None
        document = story.as_dict()
        document["alert"] = alert_view(record)
        return document

    document = await read_store(request, read)
    if document is None:
        raise HTTPException(status_code=404, detail=f"no alert {alert_id!r}")
    if principal.role == "owner":
        # Sibling decisions of the same prediction may belong to other owners or be control records.
        document.pop("siblings", None)
    return document


@router.get("/v1/alerts/{alert_id}", summary="One alert with its audit trail (role: owner, ops, admin)")
async def get_alert(
    request: Request, alert_id: str, principal: Annotated[Principal, Depends(require(*READERS))]
) -> dict[str, Any]:
    await _visible(request, alert_id, principal)
    return await _story(request, alert_id, principal)


# actions ---------------------------------------------------------------------------------


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(None, max_length=2000, description="Free text kept in the audit trail.")
    at: datetime | None = Field(None, description="When it happened (default: now).")
    actor: str | None = Field(
        None, min_length=1, max_length=200, description="Who did it; owner tokens always act as their owner."
    )


class AckBody(_Action):
    pass


class InterveneBody(_Action):
    action: str | None = Field(None, max_length=200, description="What was done, e.g. exec-call.")


class OutcomeBody(_Action):
    result: OutcomeResult
    value: float | None = Field(None, allow_inf_nan=False, description="A measured value, e.g. renewed ARR.")

    _number = field_validator("value", mode="before")(lambda cls, v: not_a_boolean(v))  # as OutcomeEvent's


class ReassignBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    owner: str = Field(min_length=1, max_length=200, description="The new owner's id (in the owner directory).")
    note: str | None = Field(None, max_length=2000, description="Why; kept in the audit trail.")
    actor: str | None = Field(None, min_length=1, max_length=200)


def actor_of(principal: Principal, requested: str | None) -> str:
    if principal.role == "owner":
        if requested is not None and requested != principal.owner:
            raise HTTPException(status_code=403, detail="an owner token acts as its own owner; omit actor")
        return principal.owner or "?"
    return requested or f"token:{principal.token_id}"


async def _act(
    request: Request, alert_id: str, principal: Principal, event_type: str, body: BaseModel, key: str | None
) -> dict[str, Any]:
    await _apply(request, alert_id, principal, event_type, body, key)
    return await _story(request, alert_id, principal)


async def _apply(
    request: Request, alert_id: str, principal: Principal, event_type: str, body: BaseModel, key: str | None
) -> Applied:
    """The action as an outcome event, applied; a refusal as the HTTP error that names its field."""
    await _visible(request, alert_id, principal)
    values = body.model_dump(exclude_none=True, mode="json")
    actor = actor_of(principal, values.pop("actor", None))
    document = {**values, "type": event_type, "alert_id": alert_id, "actor": actor}
    entry_id = http_entry_id(principal.token_id, key, document, "alerts", alert_id, event_type)
    applied = await apply_event(request, document, entry_id=entry_id)
    if not applied.applied:
        if applied.reason == "unknown_alert":
            raise HTTPException(status_code=404, detail=f"no alert {alert_id!r}")
        raise body_error(_rejected_field(applied, body), f"{applied.reason}: {applied.detail}")
    return applied


def _rejected_field(applied: Applied, body: BaseModel) -> str | None:
    """The body field the outcome path refused, the body being valid by itself: a new owner not in the
    directory, an `at` in the future or before the alert existed, or text no store can hold ("note: ...")."""
    detail = applied.detail or ""
    if applied.reason == "unknown_owner":
        return "owner"
    if applied.reason == "from_future" or detail.startswith("at "):
        return "at"
    named = detail.partition(":")[0]
    return named if named in type(body).model_fields else None


@router.post("/v1/alerts/{alert_id}/ack", summary=f"Acknowledge an alert ({ACTING_ROLES})")
async def ack(
    request: Request,
    alert_id: str,
    principal: Annotated[Principal, Depends(require(*READERS))],
    _json: Annotated[None, Depends(json_content)],
    body: Annotated[AckBody | None, Body()] = None,
    key: Annotated[str | None, Depends(idempotency_key)] = None,
) -> dict[str, Any]:
    return await _act(request, alert_id, principal, "acknowledged", body or AckBody(), key)


@router.post("/v1/alerts/{alert_id}/intervene", summary=f"Record the intervention ({ACTING_ROLES})")
async def intervene(
    request: Request,
    alert_id: str,
    principal: Annotated[Principal, Depends(require(*READERS))],
    _json: Annotated[None, Depends(json_content)],
    body: Annotated[InterveneBody | None, Body()] = None,
    key: Annotated[str | None, Depends(idempotency_key)] = None,
) -> dict[str, Any]:
    return await _act(request, alert_id, principal, "intervened", body or InterveneBody(), key)


@router.post("/v1/alerts/{alert_id}/outcome", summary=f"Record the outcome ({ACTING_ROLES})")
async def outcome(
    request: Request,
    alert_id: str,
    body: OutcomeBody,
    principal: Annotated[Principal, Depends(require(*READERS))],
    _json: Annotated[None, Depends(json_content)],
    key: Annotated[str | None, Depends(idempotency_key)] = None,
) -> dict[str, Any]:
    return await _act(request, alert_id, principal, "outcome", body, key)


@router.post("/v1/alerts/{alert_id}/reassign", summary="Hand an alert to another owner (role: ops, admin)")
async def reassign(
    request: Request,
    alert_id: str,
    body: ReassignBody,
    principal: Annotated[Principal, Depends(require("ops"))],
    _json: Annotated[None, Depends(json_content)],
    key: Annotated[str | None, Depends(idempotency_key)] = None,
) -> dict[str, Any]:
    owners = ruleset_of(request).owners
    if body.owner not in owners:
        raise body_error("owner", f"owner {body.owner!r} is not in the owner directory{did_you_mean(body.owner, owners)}")
    applied = await _apply(request, alert_id, principal, "reassigned", body, key)
    document = await _story(request, alert_id, principal)
    alert = document["alert"]
    # The alert's detail alone does not tell a request that had no effect from one that did.
    document["unchanged"] = applied.unchanged
    # Worded as `decision-router reassign` notes it.
    document["note"] = reassign_note(alert["owner"], unchanged=applied.unchanged, closed=alert["status"] == "closed")
    return document
