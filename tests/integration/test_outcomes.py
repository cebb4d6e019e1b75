"""Outcome events on real Redis: lifecycle, addressing, dead letters, idempotency, stats."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlmodel import Session

from decision_router.quality import MAX_DETAIL_CHARS
from decision_router.service import running_service
from decision_router.stats import GroupBy, compute_stats
from decision_router.tables import AlertRecord, AuditEvent, RejectionRecord, as_utc
from decision_router.tracker import alert_id_for
from tests.integration.conftest import wait_until
from tests.integration.test_router_loop import count, prediction

pytestmark = pytest.mark.redis


def alert_row(engine, alert_id: str) -> AlertRecord:
    with Session(engine) as session:
        row = session.get(AlertRecord, alert_id)
        assert row is not None
        session.expunge(row)
        return row


def age_alerts(engine, by: timedelta) -> None:
    """Date every alert (and its prediction time) `by` earlier, as if routed then: events can be dated
    after them without being in the future, which the gate refuses. Deadlines stay as they are."""
    with Session(engine) as session:
        for row in session.scalars(select(AlertRecord)):
            row.created_at, row.predicted_at = row.created_at - by, row.predicted_at - by
        session.commit()


def applied_sources(engine) -> list[str]:
    with Session(engine) as session:
        return list(session.scalars(select(AuditEvent.source_id).where(AuditEvent.source_id.is_not(None))))


async def route_three(service, r, engine) -> list[str]:
    keys = service.keys
    for pid, manager in (("o1", "alice-moreau"), ("o2", "alice-moreau"), ("o3", "elena-petrova")):
        r.xadd(keys.predictions, {"data": json.dumps(prediction(pid, context={"segment": "enterprise", "account_manager": manager}))})
    await wait_until(lambda: count(engine, AlertRecord, AlertRecord.delivered_at.is_not(None)) == 3, what="3 alerts delivered")
    return [alert_id_for(pid, "enterprise-churn-risk") for pid in ("o1", "o2", "o3")]


async def test_lifecycle_events_update_alerts_and_stats(service, r, engine) -> None:
    keys = service.keys
    a1, a2, a3 = await route_three(service, r, engine)
    age_alerts(engine, timedelta(hours=2))
    created = alert_row(engine, a1).created_at.replace(tzinfo=UTC)
    acted = created + timedelta(minutes=90)
    # by alert id, flat fields as a CRM or a shell script would send them
    r.xadd(keys.outcomes, {"alert_id": a1, "type": "acknowledged", "actor": "alice-moreau"})
    r.xadd(keys.outcomes, {"alert_id": a1, "type": "intervened", "actor": "alice-moreau", "action": "exec-call", "at": acted.isoformat()})
    # by prediction id
    r.xadd(keys.outcomes, {"data": json.dumps({"prediction_id": "o2", "type": "intervened", "actor": "alice-moreau", "action": "discount"})})
    # by entity: the CRM reports renewals and churn
    r.xadd(keys.outcomes, {"entity_type": "account", "entity_id": "acct-o1", "type": "outcome", "result": "success", "actor": "crm", "value": "120000"})
    r.xadd(keys.outcomes, {"entity_type": "account", "entity_id": "acct-o2", "type": "outcome", "result": "failure", "actor": "crm"})
    r.xadd(keys.outcomes, {"entity_type": "account", "entity_id": "acct-o3", "type": "outcome", "result": "success", "actor": "crm"})

    await wait_until(lambda: count(engine, AlertRecord, AlertRecord.status == "closed") == 3, what="3 outcomes applied")
    first = alert_row(engine, a1)
    assert first.acknowledged_at is not None
    assert first.intervention == "exec-call" and first.outcome == "success" and first.outcome_value == 120000
    second = alert_row(engine, a2)
    assert second.acknowledged_at is not None  # intervening implies having seen it
    assert second.outcome == "failure"
    third = alert_row(engine, a3)  # closed by its outcome, never acknowledged: no deadline left pending
    assert third.acknowledged_at is None and third.ack_due_at is None and third.act_due_at is None

    with Session(engine) as session:
        by_owner = {row.key: row for row in compute_stats(session, by=GroupBy.OWNER)}
        audit = session.execute(
            select(AuditEvent.type, AuditEvent.actor).where(AuditEvent.alert_id == a1).order_by(AuditEvent.id)
        ).all()
    alice = by_owner["alice-moreau"]
    assert (alice.routed, alice.acknowledged, alice.intervened, alice.successes, alice.failures) == (2, 2, 2, 1, 1)
    assert alice.intervention_rate == 1.0 and alice.success_rate == 0.5
    elena = by_owner["elena-petrova"]
    assert (elena.routed, elena.intervened, elena.successes, elena.intervention_rate) == (1, 0, 1, 0.0)
    assert elena.median_time_to_act_s is None
    assert [t for t, _ in audit] == ["routed", "delivered", "acknowledged", "intervened", "outcome"]
    assert audit[-1] == ("outcome", "crm")
    await wait_until(lambda: r.xpending(keys.outcomes, service.group)["pending"] == 0, what="outcomes acked")
    assert r.xlen(keys.outcomes_dlq) == 0


async def test_median_time_to_act_comes_from_the_intervened_event(service, r, engine) -> None:
    keys = service.keys
    a1, a2, _ = await route_three(service, r, engine)
    age_alerts(engine, timedelta(hours=2))
    for alert_id, minutes in ((a1, 30), (a2, 90)):
        created = alert_row(engine, alert_id).created_at.replace(tzinfo=UTC)
        r.xadd(keys.outcomes, {"alert_id": alert_id, "type": "intervened", "actor": "alice-moreau",
                               "at": (created + timedelta(minutes=minutes)).isoformat()})
    await wait_until(lambda: count(engine, AlertRecord, AlertRecord.intervened_at.is_not(None)) == 2, what="interventions")
    with Session(engine) as session:
        (row,) = [r_ for r_ in compute_stats(session, by=GroupBy.RULE) if r_.key == "enterprise-churn-risk"]
    assert row.median_time_to_act_s == pytest.approx(3600.0)


async def test_bad_and_unknown_outcomes_go_to_the_dlq(service, r, engine) -> None:
    keys = service.keys
    await route_three(service, r, engine)
    r.xadd(keys.outcomes, {"alert_id": "al-nope", "type": "acknowledged", "actor": "x"})
    r.xadd(keys.outcomes, {"entity_type": "account", "entity_id": "acct-none", "type": "outcome", "result": "success", "actor": "crm"})
    r.xadd(keys.outcomes, {"alert_id": alert_id_for("o1", "enterprise-churn-risk"), "type": "outcome", "actor": "crm"})
    r.xadd(keys.outcomes, {"data": "not json"})
    r.xadd(keys.outcomes, {"alert_id": alert_id_for("o1", "enterprise-churn-risk"), "type": "reassigned", "actor": "ops", "owner": "nobody"})
    await wait_until(lambda: r.xlen(keys.outcomes_dlq) == 5, what="5 dead letters")
    reasons = [fields["reason"] for _, fields in r.xrange(keys.outcomes_dlq)]
    assert reasons == ["unknown_alert", "unknown_alert", "schema", "invalid_json", "unknown_owner"]
    details = [fields["detail"] for _, fields in r.xrange(keys.outcomes_dlq)]
    assert "no alert al-nope" in details[0]
    assert "account:acct-none" in details[1]
    assert "needs result" in details[2]
    assert alert_row(engine, alert_id_for("o1", "enterprise-churn-risk")).owner == "alice-moreau"


async def test_a_redelivered_outcome_entry_is_applied_once(service, r, engine) -> None:
    keys = service.keys
    a1, _, _ = await route_three(service, r, engine)
    entry_id = r.xadd(keys.outcomes, {"alert_id": a1, "type": "acknowledged", "actor": "alice-moreau"})
    await wait_until(lambda: count(engine, AuditEvent, AuditEvent.type == "acknowledged") == 1, what="ack applied")
    result = await service.pipeline.process_outcomes([(entry_id, {b"alert_id": a1.encode(), b"type": b"acknowledged", b"actor": b"alice-moreau"})])
    assert (result.accepted, result.redelivered) == (0, 1)
    assert count(engine, AuditEvent, AuditEvent.type == "acknowledged") == 1


async def test_reassigned_alert_reaches_the_new_owner(service, r, engine) -> None:
    keys = service.keys
    a1, _, _ = await route_three(service, r, engine)
    r.xadd(keys.outcomes, {"alert_id": a1, "type": "reassigned", "actor": "lead-strategic", "owner": "benoit-garnier", "note": "holiday"})
    await wait_until(lambda: r.xlen(keys.inbox("benoit-garnier")) == 1, what="the new owner's inbox")
    (_, fields), = r.xrange(keys.inbox("benoit-garnier"))
    alert = json.loads(fields["data"])
    assert alert["alert_id"] == a1 and alert["owner"] == "benoit-garnier" and alert["reassigned_from"] == "alice-moreau"
    row = alert_row(engine, a1)
    assert (row.owner, row.original_owner) == ("benoit-garnier", "alice-moreau")
    with Session(engine) as session:
        detail = session.scalar(select(AuditEvent.detail).where(AuditEvent.type == "reassigned"))
    assert detail["from_owner"] == "alice-moreau" and detail["to_owner"] == "benoit-garnier" and detail["note"] == "holiday"
    assert r.xlen(keys.inbox("alice-moreau")) == 2  # o1 and o2; nothing new for alice


async def test_a_closed_alert_reassigned_gets_no_deadlines(service, r, engine) -> None:
    """Nor is it delivered again: its new owner is accountable for the record, with nothing to act on."""
    keys = service.keys
    _, _, a3 = await route_three(service, r, engine)
    delivered_at = alert_row(engine, a3).delivered_at
    r.xadd(keys.outcomes, {"alert_id": a3, "type": "outcome", "result": "success", "actor": "crm"})
    r.xadd(keys.outcomes, {"alert_id": a3, "type": "reassigned", "actor": "lead-strategic", "owner": "benoit-garnier"})
    await wait_until(lambda: alert_row(engine, a3).owner == "benoit-garnier", what="the reassignment")
    row = alert_row(engine, a3)
    assert (row.status, row.owner) == ("closed", "benoit-garnier")
    assert row.ack_due_at is None and row.act_due_at is None
    # Still marked delivered (to elena): out of the outbox, so no drain sends it to benoit.
    assert row.delivered_at == delivered_at
    assert r.xlen(keys.inbox("benoit-garnier")) == 0


async def test_entity_outcomes_apply_within_the_outcome_window_only(settings, ruleset, engine, r) -> None:
    # The predictions are made 5 minutes before now (see `prediction`): a 2-minute window has passed.
    short = settings.model_copy(update={"outcome_window": timedelta(minutes=2)})
    async with running_service(short, ruleset, engine) as service:
        keys = service.keys
        await route_three(service, r, engine)
        now = datetime.now(UTC)
        r.xadd(keys.outcomes, {"entity_type": "account", "entity_id": "acct-o1", "type": "outcome", "result": "success",
                               "actor": "crm", "at": now.isoformat()})
        r.xadd(keys.outcomes, {"entity_type": "account", "entity_id": "acct-o2", "type": "outcome", "result": "failure",
                               "actor": "crm", "at": (now - timedelta(days=1)).isoformat()})
        r.xadd(keys.outcomes, {"entity_type": "account", "entity_id": "acct-o3", "type": "outcome", "result": "success",
                               "actor": "crm", "at": (now - timedelta(minutes=4)).isoformat()})
        await wait_until(lambda: r.xlen(keys.outcomes_dlq) == 2, what="two outcomes outside the window")
        details = [fields["detail"] for _, fields in r.xrange(keys.outcomes_dlq)]
        assert "acct-o1" in details[0] and "outcome window (2m)" in details[0]
        assert "acct-o2" in details[1]  # reported as before the prediction was made
        await wait_until(lambda: count(engine, AlertRecord, AlertRecord.status == "closed") == 1, what="the one in the window")
        assert alert_row(engine, alert_id_for("o3", "enterprise-churn-risk")).outcome == "success"


async def test_events_dated_before_their_alert_or_in_the_future_are_refused(service, r, engine) -> None:
    """A wrong clock or a typo'd year would give negative (or 8,000-year) times to act in the stats."""
    keys = service.keys
    a1, a2, a3 = await route_three(service, r, engine)
    created = alert_row(engine, a2).created_at.replace(tzinfo=UTC)
    sent = [
        {"alert_id": a1, "type": "acknowledged", "actor": "alice-moreau", "at": "2001-01-01T00:00:00Z"},
        {"alert_id": a1, "type": "intervened", "actor": "alice-moreau", "action": "call", "at": "9999-12-31T23:59:59Z"},
        {"alert_id": a1, "type": "outcome", "result": "success", "actor": "crm", "at": "0001-01-01T00:00:00+23:59"},
        # By entity, at the start of the calendar: no alert is that old (the window no longer overflows).
        {"entity_type": "account", "entity_id": "acct-o3", "type": "outcome", "result": "success", "actor": "crm",
         "at": "0001-01-01T00:00:00Z"},
        # A minute before the alert was created: inside the allowed clock skew, applied.
        {"alert_id": a2, "type": "acknowledged", "actor": "alice-moreau", "at": (created - timedelta(minutes=1)).isoformat()},
    ]
    for event in sent:
        r.xadd(keys.outcomes, {"data": json.dumps(event)})
    await wait_until(lambda: r.xlen(keys.outcomes_dlq) == 4, what="four refused")
    await wait_until(lambda: r.xpending(keys.outcomes, service.group)["pending"] == 0, what="outcomes acked")
    refused = [(fields["reason"], fields["detail"]) for _, fields in r.xrange(keys.outcomes_dlq)]
    assert [reason for reason, _ in refused] == ["schema", "from_future", "schema", "unknown_alert"], refused
    assert refused[0][1].startswith(f"at 2001-01-01T00:00:00+00:00 is before alert {a1} was created (")
    assert refused[2][1].startswith("at: out of range"), refused[2][1]  # after astimezone: before the year 1
    first = alert_row(engine, a1)
    assert first.acknowledged_at is None and first.intervened_at is None and first.outcome is None
    assert alert_row(engine, a2).acknowledged_at is not None
    assert alert_row(engine, a3).outcome is None


async def test_an_entity_ack_applies_to_the_alerts_there_at_its_time_not_to_later_ones(service, r, engine) -> None:
    """An acknowledgement by entity dated before one of the entity's alerts was created (a prediction that arrived
    late, routed afterwards) acknowledges the alerts that existed then and leaves the later one alone; one dated
    before all of them is refused, once."""
    keys = service.keys
    first = {"segment": "enterprise", "account_manager": "alice-moreau"}
    r.xadd(keys.predictions, {"data": json.dumps(prediction("e1", entity_id="acct-e1", context=first))})
    await wait_until(lambda: count(engine, AlertRecord) == 1, what="the first alert")
    age_alerts(engine, timedelta(hours=2))
    early = alert_row(engine, alert_id_for("e1", "enterprise-churn-risk"))
    created = as_utc(early.created_at)
    # Made as long ago as the first, but routed only now; of another rule (the first rule's cooldown would
    # suppress it).
    late = prediction("e2", entity_id="acct-e1", score=0.65, context=first, predicted_at=created.isoformat())
    r.xadd(keys.predictions, {"data": json.dumps(late)})
    # Alone for its entity, as late: no alert of acct-e3 existed at the event's time.
    alone = prediction("e3", entity_id="acct-e3", context=first, predicted_at=created.isoformat())
    r.xadd(keys.predictions, {"data": json.dumps(alone)})
    await wait_until(lambda: count(engine, AlertRecord) == 3, what="the later alerts")
    later = alert_row(engine, alert_id_for("e2", "enterprise-churn-watch"))
    at = created + timedelta(minutes=10)
    for entity_id in ("acct-e1", "acct-e3"):
        r.xadd(keys.outcomes, {"entity_type": "account", "entity_id": entity_id, "type": "acknowledged",
                               "actor": "alice-moreau", "at": at.isoformat()})
    # Each event either applied (its audit events) or refused (its DLQ entry).
    await wait_until(lambda: len(set(applied_sources(engine))) + r.xlen(keys.outcomes_dlq) == 2,
                     what="both events applied or refused")
    await wait_until(lambda: r.xpending(keys.outcomes, service.group)["pending"] == 0, what="outcomes acked")
    acknowledged = alert_row(engine, early.alert_id).acknowledged_at
    assert acknowledged is not None and as_utc(acknowledged) == at
    assert alert_row(engine, later.alert_id).acknowledged_at is None
    [(_, refused)] = r.xrange(keys.outcomes_dlq)
    assert refused["reason"] == "schema"
    alone_alert = alert_id_for("e3", "enterprise-churn-risk")
    assert refused["detail"].startswith(f"at {at.isoformat()} is before alert {alone_alert} was created (")
    assert alert_row(engine, alone_alert).acknowledged_at is None
    assert count(engine, RejectionRecord) == 1


async def test_an_entity_outcome_sent_again_says_its_decisions_already_have_one(service, r, engine) -> None:
    """A CRM resending "acct-o1 renewed" (or correcting it) is refused as unknown_alert, as documented; the detail said
    only that no open alert was predicted in the window, which reads as an entity the router never saw."""
    keys = service.keys
    a1, _, _ = await route_three(service, r, engine)
    event = {"entity_type": "account", "entity_id": "acct-o1", "type": "outcome", "actor": "crm"}
    r.xadd(keys.outcomes, {**event, "result": "success"})
    await wait_until(lambda: alert_row(engine, a1).outcome == "success", what="the first outcome")
    r.xadd(keys.outcomes, {**event, "result": "failure"})
    r.xadd(keys.outcomes, {**event, "entity_id": "acct-never-seen", "result": "failure"})
    await wait_until(lambda: r.xlen(keys.outcomes_dlq) == 2, what="both refused")
    (_, again), (_, unknown) = r.xrange(keys.outcomes_dlq)
    assert again["reason"] == unknown["reason"] == "unknown_alert"
    assert again["detail"] == (
        "no open alert for account:acct-o1 predicted within the outcome window (30d) before the event: "
        "its 1 decision there already has an outcome (the first one wins)"
    )
    assert unknown["detail"].endswith("(30d) before the event")
    assert alert_row(engine, a1).outcome == "success"


async def test_the_details_of_outcomes_refused_after_the_gate_are_bounded_like_the_gates(service, r, engine) -> None:
    """unknown_alert and unknown_owner details quote what was sent: a 3,000-character entity id or owner gave a
    3,000-character detail on outcomes:dlq and in the rejections table, past the documented 500."""
    keys = service.keys
    a1, _, _ = await route_three(service, r, engine)
    long = "x" * 3000
    r.xadd(keys.outcomes, {"entity_type": "account", "entity_id": long, "type": "outcome", "result": "success",
                           "actor": "crm"})
    r.xadd(keys.outcomes, {"alert_id": a1, "type": "reassigned", "actor": "ops", "owner": long})
    await wait_until(lambda: r.xlen(keys.outcomes_dlq) == 2, what="both refused")
    refused = [(fields["reason"], fields["detail"]) for _, fields in r.xrange(keys.outcomes_dlq)]
    assert [reason for reason, _ in refused] == ["unknown_alert", "unknown_owner"]
    with Session(engine) as session:
        stored = list(session.scalars(select(RejectionRecord.detail).order_by(RejectionRecord.id)))
    assert stored == [detail for _, detail in refused]
    for detail in stored:
        assert len(detail) <= MAX_DETAIL_CHARS + len("...") and detail.endswith("..."), len(detail)
