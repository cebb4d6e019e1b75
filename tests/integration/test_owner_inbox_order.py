"""The owner view's alerts (insights.open_alerts) are chosen and ordered in SQL by their next deadline, alike on
SQLite and PostgreSQL: with more open alerts than the view holds, the ones it leaves out are the least urgent."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router import insights
from decision_router.tables import AlertRecord, EscalationRecord, as_utc
from tests.unit.test_stats import T0, alert


def at(hours: float) -> timedelta:
    return timedelta(hours=hours)


def records() -> list[AlertRecord | EscalationRecord]:
    """Lead's own open alerts and others' escalated to it, each with its next deadline (hours after T0) noted."""
    own_old_acted = alert(1, rule="r", owner="lead", ack=True, act_after_s=60)  # no deadline left: last
    own_old_acked = alert(2, rule="r", owner="lead", ack=True)  # act_by: 48
    own_new = alert(3, rule="r", owner="lead", created=T0 + at(30))  # ack_by: 34
    own_tie_a = alert(4, rule="r", owner="lead", created=T0 + at(10))  # ack_by: 14
    own_tie_b = alert(5, rule="r", owner="lead", created=T0 + at(10))  # ack_by: 14, same creation: by id
    escalated_new = alert(6, rule="r", owner="alice", created=T0 + at(40))  # escalated; ack_by moved to 12
    escalated_new.ack_by = T0 + at(12)
    escalated_old = alert(7, rule="r", owner="alice", ack=True)  # escalated; act_by: 48, as own_old_acked's ...
    escalated_old.created_at = T0 - at(1)  # ... but created an hour before it: first of the two
    not_acked_old = alert(8, rule="r", owner="lead", created=T0 - at(100))  # oldest, ack_by -96: overdue, first
    closed = alert(9, rule="r", owner="lead", outcome="success", created=T0 + at(50))
    control = alert(10, rule="r", owner="lead", held_out=True, created=T0 + at(50))
    others = alert(11, rule="r", owner="alice", created=T0 + at(50))  # not escalated to lead
    steps = [
        EscalationRecord(alert_id=a.alert_id, level=1, kind="ack", from_owner="alice", to_owner="lead", reason="late",
                         at=T0)
        for a in (escalated_new, escalated_old)
    ]
    return [own_old_acted, own_old_acked, own_new, own_tie_a, own_tie_b, escalated_new, escalated_old, not_acked_old,
            closed, control, others, *steps]


URGENCY = ["al-r-8", "al-r-6", "al-r-4", "al-r-5", "al-r-3", "al-r-7", "al-r-2", "al-r-1"]


def test_the_most_urgent_open_alerts_are_chosen_and_ordered_by_next_deadline(engine: Engine) -> None:
    with Session(engine) as session:
        session.add_all(records())
        session.commit()
    with Session(engine) as session:
        chosen = insights.open_alerts(session, owner="lead")
        every = [r.alert_id for r in chosen]
        # Each limit keeps the most urgent: the newest escalated alert (due at 12) is in the first two, where the
        # oldest two (8 and 7) were chosen before, and the acted-on alert 1, the third oldest, in the first three.
        first = {n: [r.alert_id for r in insights.open_alerts(session, owner="lead", limit=n)] for n in (2, 3, 7)}
    assert every == URGENCY
    # The SQL order is next_deadline's, the Python reading of the same deadlines.
    assert chosen == sorted(chosen, key=lambda r: (insights.next_deadline(r) or insights.NEVER, as_utc(r.created_at)))
    assert first == {n: URGENCY[:n] for n in (2, 3, 7)}
