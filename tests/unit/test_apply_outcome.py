"""tracker.apply_outcome: what the stats' times to ack and to act are measured from."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from decision_router.contracts import OutcomeEvent, OutcomeType
from decision_router.rules import Owner
from decision_router.stats import GroupBy, compute_stats, compute_stats_reference
from decision_router.store import create_schema, make_engine
from decision_router.tables import OUTBOX_PENDING, AlertRecord, AuditEvent, as_utc
from decision_router.tracker import apply_outcome, find_alerts
from tests.unit.test_stats import T0, alert


@pytest.fixture
def session():
    engine = make_engine("sqlite://", poolclass=StaticPool)
    create_schema(engine)
    with Session(engine) as s:
        yield s
    engine.dispose()


def apply(session: Session, record: AlertRecord, type_: OutcomeType, at_offset: timedelta) -> None:
    event = OutcomeEvent(alert_id=record.alert_id, type=type_, actor="alice", at=T0 + at_offset)
    apply_outcome(session, event=event, alerts=[record], source_id=None, now=T0 + timedelta(hours=1))
    session.commit()


@pytest.mark.parametrize("type_", [OutcomeType.ACKNOWLEDGED, OutcomeType.INTERVENED])
def test_an_event_dated_within_the_clock_skew_before_the_alert_counts_from_its_creation(session, type_) -> None:
    """The gate lets an `at` up to MAX_CLOCK_SKEW (5 min) before creation through: the times must not go negative."""
    record = alert(0, rule="r", owner="alice")
    session.add(record)
    session.commit()
    apply(session, record, type_, -timedelta(minutes=1))
    assert as_utc(record.acknowledged_at) == T0
    if type_ is OutcomeType.INTERVENED:
        assert as_utc(record.intervened_at) == T0
    for compute in (compute_stats, compute_stats_reference):
        (row,) = compute(session, by=GroupBy.RULE)
        assert row.median_time_to_ack_s == 0.0 and row.p90_time_to_ack_s == 0.0
        expected_act = 0.0 if type_ is OutcomeType.INTERVENED else None
        assert row.median_time_to_act_s == expected_act and row.p90_time_to_act_s == expected_act


@pytest.mark.parametrize("type_", [OutcomeType.ACKNOWLEDGED, OutcomeType.INTERVENED])
def test_an_event_dated_within_the_clock_skew_after_its_receipt_counts_from_its_receipt(session, type_) -> None:
    """The gate lets an `at` up to MAX_CLOCK_SKEW (5 min) ahead of the router's clock through (the sender's clock runs
    ahead): nobody acknowledges or acts later than the router hears of it, so the time to ack (to act) ends there, as
    one dated before the alert starts at its creation. Taken as sent, an ack received 10 s after the alert's creation
    counted 4 min 10 s, past an ack deadline it had met."""
    record = alert(0, rule="r", owner="alice")
    session.add(record)
    session.commit()
    received = T0 + timedelta(seconds=10)
    event = OutcomeEvent(alert_id=record.alert_id, type=type_, actor="alice", at=received + timedelta(minutes=4))
    apply_outcome(session, event=event, alerts=[record], source_id=None, now=received)
    session.commit()
    assert as_utc(record.acknowledged_at) == received
    for compute in (compute_stats, compute_stats_reference):
        (row,) = compute(session, by=GroupBy.RULE)
        assert row.median_time_to_ack_s == 10.0
        assert row.median_time_to_act_s == (10.0 if type_ is OutcomeType.INTERVENED else None)


def test_the_first_intervention_is_kept_and_a_later_ack_moves_back_to_it(session) -> None:
    record = alert(0, rule="r", owner="alice")
    session.add(record)
    session.commit()
    apply(session, record, OutcomeType.ACKNOWLEDGED, timedelta(minutes=30))
    apply(session, record, OutcomeType.INTERVENED, timedelta(minutes=10))
    apply(session, record, OutcomeType.INTERVENED, timedelta(minutes=5))  # later event: the audit log only
    assert as_utc(record.intervened_at) == T0 + timedelta(minutes=10)
    assert as_utc(record.acknowledged_at) == T0 + timedelta(minutes=10)
    (row,) = compute_stats(session, by=GroupBy.RULE)
    assert (row.median_time_to_ack_s, row.median_time_to_act_s) == (600.0, 600.0)


def test_an_entity_outcome_reaches_treated_and_control_of_every_rule_within_the_window(session) -> None:
    """By entity: every open decision (control included, any rule) predicted in [at - window, at]; none after."""
    window = timedelta(days=30)
    at = T0 + window
    records = [
        alert(1, rule="churn", owner="alice"),  # treated, predicted exactly `window` before: in
        alert(2, rule="upsell", owner="bob", held_out=True),  # control of another rule: in
        alert(3, rule="watch", owner="bob", created=at),  # predicted at the outcome's instant: in
        alert(4, rule="late", owner="bob", created=at + timedelta(microseconds=1)),  # after the outcome: out
        alert(5, rule="old", owner="bob", created=T0 - timedelta(microseconds=1)),  # before the window: out
        alert(6, rule="done", owner="bob", outcome="failure"),  # closed already: out
    ]
    for record in records:
        record.entity_id = "acct-17"
    session.add_all(records)
    session.commit()
    event = OutcomeEvent(entity_type="account", entity_id="acct-17", type=OutcomeType.OUTCOME, result="success",
                         actor="crm", at=at)
    found = find_alerts(session, event, now=at + timedelta(hours=1), outcome_window=window)
    assert sorted(record.rule for record in found) == ["churn", "upsell", "watch"]
    apply_outcome(session, event=event, alerts=found, source_id="crm-1", now=at)
    session.commit()
    rows = {row.key: row for row in compute_stats(session, by=GroupBy.RULE, holdouts={"upsell": 0.1})}
    assert (rows["churn"].successes, rows["upsell"].control_successes, rows["watch"].successes) == (1, 1, 1)
    assert rows["late"].successes == rows["old"].successes == 0 and rows["done"].failures == 1


# reassignments that change nothing, and those of closed alerts ----------------------------------------------------


def reassign(session: Session, record: AlertRecord, owner: str, *, owners=None, source_id: str | None = None) -> list[str]:
    event = OutcomeEvent(alert_id=record.alert_id, type=OutcomeType.REASSIGNED, actor="lead", owner=owner)
    left = apply_outcome(session, event=event, alerts=[record], source_id=source_id, now=T0 + timedelta(hours=3),
                         owners=owners)
    session.commit()
    return left


def reassigned_details(session: Session, alert_id: str) -> list[dict]:
    return [e.detail for e in session.scalars(
        select(AuditEvent).where(AuditEvent.alert_id == alert_id, AuditEvent.type == "reassigned").order_by(AuditEvent.id)
    )]


def escalated(record: AlertRecord) -> AlertRecord:
    """Delivered to alice, its ack deadline missed and escalated once to her manager."""
    record.delivered_at = T0 + timedelta(seconds=1)
    record.ack_due_at, record.act_due_at = T0 + timedelta(hours=6), T0 + timedelta(days=2)
    record.escalation_level, record.escalated_to, record.sla_revision = 1, "lead", 1
    return record


def state(record: AlertRecord) -> tuple:
    return (record.owner, record.delegated_from, record.delivered_at, record.ack_due_at, record.act_due_at,
            record.escalation_level, record.escalated_to, record.sla_revision)


@pytest.mark.parametrize(("to", "delegated_from"), [("alice", None), ("hugo", "hugo")])
def test_a_reassignment_to_the_owner_holding_the_alert_changes_nothing_but_is_recorded(session, to, delegated_from) -> None:
    """It restarted the deadlines and the escalation chain, and put the alert back into the outbox for an inbox
    write that is deduplicated: an escalation silenced with nobody new accountable. Also through an away owner
    whose delegate holds it."""
    record = escalated(alert(0, rule="r", owner="alice"))
    session.add(record)
    session.commit()
    before = state(record)
    hugo = Owner(id="hugo", name="Hugo", email=None, manager=None, team=None,
                 away_until=T0 + timedelta(days=30), delegate="alice")
    owners = {"alice": Owner(id="alice", name="Alice", email=None, manager="lead", team=None), "hugo": hugo}
    assert reassign(session, record, to, owners=owners) == [record.alert_id]
    session.refresh(record)
    assert state(record) == before
    expected = {"from_owner": "alice", "to_owner": "alice", "unchanged": True}
    if delegated_from:
        expected["delegated_from"] = delegated_from
    assert reassigned_details(session, record.alert_id) == [expected]


def test_a_closed_alert_reassigned_changes_owner_and_is_not_delivered_again(session) -> None:
    """It went back into the outbox, to the new owner's inbox, with nothing saying it was closed."""
    record = escalated(alert(0, rule="r", owner="alice", outcome="success"))
    record.ack_due_at = record.act_due_at = None  # as the outcome left them
    delivered = record.delivered_at
    session.add(record)
    session.commit()
    assert reassign(session, record, "bob") == []
    session.refresh(record)
    assert (record.owner, record.status, as_utc(record.delivered_at)) == ("bob", "closed", delivered)
    assert (record.ack_due_at, record.act_due_at) == (None, None)
    assert session.scalars(select(AlertRecord).where(OUTBOX_PENDING)).all() == []
    assert reassigned_details(session, record.alert_id) == [{"from_owner": "alice", "to_owner": "bob", "closed": True}]
    # Accountable for the record: the stats by owner count it for bob.
    (row,) = compute_stats(session, by=GroupBy.OWNER)
    assert (row.key, row.successes) == ("bob", 1)


def test_an_open_alert_reassigned_still_goes_back_into_the_outbox(session) -> None:
    record = escalated(alert(0, rule="r", owner="alice"))
    session.add(record)
    session.commit()
    assert reassign(session, record, "bob") == []
    session.refresh(record)
    assert (record.owner, record.delivered_at, record.escalated_to, record.sla_revision) == ("bob", None, None, 2)
    assert [r.alert_id for r in session.scalars(select(AlertRecord).where(OUTBOX_PENDING))] == [record.alert_id]
    assert as_utc(record.ack_due_at) == T0 + timedelta(hours=7)  # 3h + its 4h ack_within, fresh for bob


# decisions a cooldown suppressed ---------------------------------------------------------------------------------


def test_an_outcome_by_prediction_leaves_a_suppressed_decision_suppressed(session) -> None:
    """An outcome addressed by prediction (or alert) id reaches a decision its cooldown suppressed too. It turned it
    `closed`: the API showed it as `closed` and listed it under `state=closed`, where docs/api.md says a suppressed
    decision shows `suppressed` whatever was recorded on it (it is nobody's to-do, and the stats ignore it)."""
    from decision_router.api.routes_alerts import State, _state_clause, state_of

    record = alert(0, rule="r", owner="alice")
    record.suppressed_by, record.status = "al-r-holder", "suppressed"
    session.add(record)
    session.commit()
    event = OutcomeEvent(prediction_id=record.prediction_id, type=OutcomeType.OUTCOME, result="success", actor="crm",
                         at=T0 + timedelta(minutes=5))
    apply_outcome(session, event=event, alerts=[record], source_id="crm-1", now=T0 + timedelta(hours=1))
    session.commit()
    session.refresh(record)
    assert (record.outcome, as_utc(record.outcome_at)) == ("success", T0 + timedelta(minutes=5))  # kept for the story
    assert (record.status, state_of(record)) == ("suppressed", "suppressed")
    assert session.scalars(select(AlertRecord.alert_id).where(_state_clause(State.CLOSED))).all() == []
    (row,) = compute_stats(session, by=GroupBy.RULE)
    assert (row.suppressed, row.routed, row.successes) == (1, 0, 0)


def details(session: Session, alert_id: str) -> list[tuple[str, dict]]:
    return [(e.type, e.detail) for e in session.scalars(
        select(AuditEvent).where(AuditEvent.alert_id == alert_id).order_by(AuditEvent.id))]


def test_a_later_ack_intervention_or_outcome_says_in_its_audit_event_that_it_was_not_recorded(session) -> None:
    """The first of each wins; a later one is kept in the audit log only. Its event said so nowhere: the story read
    "outcome failure" after "outcome success", the alert's outcome staying success."""
    record = alert(0, rule="r", owner="alice")
    session.add(record)
    session.commit()
    first = {OutcomeType.ACKNOWLEDGED: 10, OutcomeType.INTERVENED: 20}
    for type_, minutes in first.items():
        apply(session, record, type_, timedelta(minutes=minutes))
        apply(session, record, type_, timedelta(minutes=minutes + 5))
    outcome = {"alert_id": record.alert_id, "type": OutcomeType.OUTCOME, "actor": "crm"}
    for result, minutes in (("success", 30), ("failure", 40)):
        apply_outcome(session, event=OutcomeEvent(**outcome, result=result, at=T0 + timedelta(minutes=minutes)),
                      alerts=[record], source_id=None, now=T0 + timedelta(hours=1))
        session.commit()
    at = {m: (T0 + timedelta(minutes=m)).isoformat().replace("+00:00", "Z") for m in (10, 20, 30)}
    assert [(kind, {k: v for k, v in d.items() if k.startswith("already")}) for kind, d in details(
        session, record.alert_id)] == [
        ("acknowledged", {}), ("acknowledged", {"already_at": at[10]}),
        ("intervened", {}), ("intervened", {"already_at": at[20]}),
        ("outcome", {}), ("outcome", {"already_at": at[30], "already_result": "success"}),
    ]


def test_an_ack_after_an_intervention_acknowledged_the_alert_is_not_recorded(session) -> None:
    """An intervention acknowledges too: a later acknowledgement (dated later) changes nothing."""
    record = alert(0, rule="r", owner="alice")
    session.add(record)
    session.commit()
    apply(session, record, OutcomeType.INTERVENED, timedelta(minutes=10))
    apply(session, record, OutcomeType.ACKNOWLEDGED, timedelta(minutes=20))
    assert as_utc(record.acknowledged_at) == T0 + timedelta(minutes=10)
    assert details(session, record.alert_id)[-1][1] == {
        "already_at": (T0 + timedelta(minutes=10)).isoformat().replace("+00:00", "Z")}


def test_an_outcome_that_lost_a_race_says_which_one_was_recorded(session) -> None:
    """Read with no outcome, written after another process committed one: first as read, not as written."""
    record = alert(0, rule="r", owner="alice")
    session.add(record)
    session.commit()
    assert record.outcome is None  # read now, before the other process writes
    session.execute(update(AlertRecord).where(AlertRecord.alert_id == record.alert_id)
                    .values(outcome="success", outcome_at=T0 + timedelta(minutes=5), status="closed")
                    .execution_options(synchronize_session=False))
    event = OutcomeEvent(alert_id=record.alert_id, type=OutcomeType.OUTCOME, actor="crm", result="failure",
                         at=T0 + timedelta(minutes=10))
    apply_outcome(session, event=event, alerts=[record], source_id=None, now=T0 + timedelta(hours=1))
    session.commit()
    session.refresh(record)
    assert record.outcome == "success"
    assert details(session, record.alert_id)[-1][1] == {
        "result": "failure", "value": None, "already_result": "success",
        "already_at": (T0 + timedelta(minutes=5)).isoformat().replace("+00:00", "Z")}
