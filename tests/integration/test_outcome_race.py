"""The first acknowledgement, intervention and outcome of an alert win, also when two processes apply events
to it at once (two `serve` workers on the outcomes stream, or the API and a worker), on both stores."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import Session, select

from decision_router.audit import describe
from decision_router.contracts import OutcomeEvent, OutcomeType
from decision_router.stats import GroupBy, compute_stats
from decision_router.tables import AlertRecord, AuditEvent, as_utc
from decision_router.tracker import apply_outcome, find_alerts
from tests.unit.test_stats import T0, alert

NOW = T0 + timedelta(hours=2)


def _event(alert_id: str, type_: OutcomeType, minutes: int, **fields) -> OutcomeEvent:
    return OutcomeEvent(alert_id=alert_id, type=type_, actor="crm", at=T0 + timedelta(minutes=minutes), **fields)


def _interleaved(engine, first: OutcomeEvent, second: OutcomeEvent) -> AlertRecord:
    """Both read the alert, then `first` commits, then `second`: as two workers' batches overlap."""
    with Session(engine) as one, Session(engine) as two:
        found_one = find_alerts(one, first, now=NOW, outcome_window=timedelta(days=30))
        found_two = find_alerts(two, second, now=NOW, outcome_window=timedelta(days=30))
        apply_outcome(one, event=first, alerts=found_one, source_id="s-1", now=NOW)
        one.commit()
        apply_outcome(two, event=second, alerts=found_two, source_id="s-2", now=NOW)
        two.commit()
    with Session(engine) as session:
        record = session.get(AlertRecord, first.alert_id)
        assert record is not None
        session.expunge(record)
        return record


def test_the_first_outcome_committed_wins_over_a_concurrent_one(engine) -> None:
    """The later commit overwrote it: a CRM's success then its correction (or the owner's failure from the
    dashboard) applied side by side counted the last one, and the uplift with it."""
    with Session(engine) as session:
        session.add(alert(0, rule="r", owner="alice"))
        session.commit()
    record = _interleaved(
        engine,
        _event("al-r-0", OutcomeType.OUTCOME, 10, result="success", value=120000),
        _event("al-r-0", OutcomeType.OUTCOME, 20, result="failure", value=1),
    )
    assert (record.status, record.outcome, record.outcome_value) == ("closed", "success", 120000)
    assert as_utc(record.outcome_at) == T0 + timedelta(minutes=10)
    with Session(engine) as session:
        (row,) = compute_stats(session, by=GroupBy.RULE)
    assert (row.successes, row.failures) == (1, 0)


def test_the_first_acknowledgement_and_intervention_committed_win_over_concurrent_ones(engine) -> None:
    with Session(engine) as session:
        session.add_all([alert(0, rule="r", owner="alice"), alert(1, rule="r", owner="alice")])
        session.commit()
    acked = _interleaved(engine, _event("al-r-0", OutcomeType.ACKNOWLEDGED, 30),
                         _event("al-r-0", OutcomeType.ACKNOWLEDGED, 50))
    assert as_utc(acked.acknowledged_at) == T0 + timedelta(minutes=30)
    acted = _interleaved(engine, _event("al-r-1", OutcomeType.INTERVENED, 30, action="exec-call"),
                         _event("al-r-1", OutcomeType.INTERVENED, 20, action="discount"))
    assert (as_utc(acted.intervened_at), acted.intervention) == (T0 + timedelta(minutes=30), "exec-call")
    assert as_utc(acted.acknowledged_at) == T0 + timedelta(minutes=30)  # not moved back by the losing event


def test_an_ack_or_intervention_after_an_outcome_committed_first_is_not_recorded(engine) -> None:
    """Refused when the outcome was read first, the ack dated after it was written when the outcome (dated
    earlier) committed between its read and its write: the alert counted as acknowledged and acted on after its
    outcome, its times to ack and act past it."""
    with Session(engine) as session:
        session.add_all([alert(n, rule="r", owner="alice") for n in range(3)])
        session.commit()
    acked = _interleaved(engine, _event("al-r-0", OutcomeType.OUTCOME, 20, result="success"),
                         _event("al-r-0", OutcomeType.ACKNOWLEDGED, 30))
    assert (acked.outcome, acked.acknowledged_at) == ("success", None)
    acted = _interleaved(engine, _event("al-r-1", OutcomeType.OUTCOME, 20, result="success"),
                         _event("al-r-1", OutcomeType.INTERVENED, 30, action="exec-call"))
    assert (acted.intervened_at, acted.intervention, acted.acknowledged_at) == (None, None, None)
    # One dated before the outcome (reported late) is recorded, as when the outcome was read first.
    late = _interleaved(engine, _event("al-r-2", OutcomeType.OUTCOME, 20, result="success"),
                        _event("al-r-2", OutcomeType.INTERVENED, 20, action="exec-call"))
    assert (as_utc(late.intervened_at), late.intervention) == (T0 + timedelta(minutes=20), "exec-call")
    with Session(engine) as session:
        events = session.exec(select(AuditEvent).where(AuditEvent.source_id == "s-2").order_by(AuditEvent.id)).all()
    outcome_at = (T0 + timedelta(minutes=20)).isoformat().replace("+00:00", "Z")
    assert [describe(e.type, e.prediction_id, e.detail) for e in events] == [
        f"acknowledged after the outcome ({outcome_at}): not recorded",
        f"intervened: exec-call after the outcome ({outcome_at}): not recorded",
        "intervened: exec-call",
    ]
