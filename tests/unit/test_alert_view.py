"""The API's view of an alert shows deadlines only while they are pending: an open alert's. Stores
written before stop 15 kept the due times of alerts an outcome had closed."""

from __future__ import annotations

from datetime import timedelta

from decision_router.api.routes_alerts import alert_view
from decision_router.tables import AlertRecord
from tests.unit.test_cooldown_plan import NOW, _alert


def _record(status: str) -> AlertRecord:
    row = {**_alert(1, rule="churn-high", entity="a", minutes_ago=10), "status": status,
           "ack_due_at": NOW + timedelta(hours=2), "act_due_at": NOW + timedelta(days=2)}
    return AlertRecord(**row)


def test_an_open_alert_shows_its_deadlines() -> None:
    view = alert_view(_record("open"))
    assert view["ack_due_at"] == (NOW + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    assert view["act_due_at"] == (NOW + timedelta(days=2)).isoformat().replace("+00:00", "Z")


def test_a_closed_alert_shows_none_even_if_an_older_store_kept_them() -> None:
    view = alert_view(_record("closed"))
    assert view["ack_due_at"] is None and view["act_due_at"] is None


def test_each_decision_shows_the_state_that_the_state_filter_finds_it_by() -> None:
    """An event recorded on a suppressed decision (by its prediction id, say) showed it as `intervened`, which
    `state=intervened` did not list; a suppressed decision is `suppressed` (filtered by `action=suppressed`)."""
    from sqlalchemy.pool import StaticPool
    from sqlmodel import Session, select

    from decision_router.api.routes_alerts import State, _state_clause, state_of
    from decision_router.store import create_schema, make_engine

    seen = {"acknowledged_at": NOW}
    acted = {**seen, "intervened_at": NOW}
    variants = [
        {}, seen, acted, {**acted, "status": "closed", "outcome": "success"},
        {"held_out": True}, {"held_out": True, **seen},
        {"suppressed_by": "al-0", "status": "suppressed"}, {"suppressed_by": "al-0", "status": "suppressed", **seen},
        {"suppressed_by": "al-0", "status": "suppressed", **acted},
    ]
    engine = make_engine("sqlite://", poolclass=StaticPool)
    create_schema(engine)
    with Session(engine) as session:
        for n, variant in enumerate(variants):
            session.add(AlertRecord(**{**_alert(n, rule="r", entity=f"e{n}", minutes_ago=5), **variant}))
        session.commit()
        records = session.scalars(select(AlertRecord)).all()
        for state in State:
            listed = set(session.scalars(select(AlertRecord.alert_id).where(_state_clause(state))))
            shown = {record.alert_id for record in records if state_of(record) == state.value}
            assert listed == shown, state
        suppressed = [state_of(record) for record in records if record.suppressed_by]
    engine.dispose()
    assert suppressed == ["suppressed"] * 3
