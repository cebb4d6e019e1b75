"""tracker.apply_outcome: what the stats' times to ack and to act are measured from."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from decision_router.contracts import OutcomeEvent, OutcomeType
from decision_router.stats import GroupBy, compute_stats, compute_stats_reference
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord, as_utc
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
