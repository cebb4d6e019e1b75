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


def test_the_order_reads_the_owners_own_deadlines_as_overdue_does(engine: Engine) -> None:
    """The order read ack_by / act_by, the alert's first deadlines, where `overdue` reads the owner's own due times:
    a reassigned alert, its fresh deadline hours away and not overdue, came before one due sooner."""
    reassigned = alert(1, rule="r", owner="lead")  # ack_by 4; reassigned to lead at 3: due at 7
    reassigned.original_owner, reassigned.ack_due_at, reassigned.act_due_at = "alice", T0 + at(7), T0 + at(51)
    sooner = alert(2, rule="r", owner="lead", created=T0 + at(1))  # ack_by and due at 5
    sooner.ack_due_at, sooner.act_due_at = T0 + at(5), T0 + at(49)
    # Acknowledged, escalated for the act: due at the manager's time now (60); the owner's passed (act_by 30).
    escalated_act = alert(3, rule="r", owner="lead", ack=True)
    escalated_act.act_by, escalated_act.act_due_at, escalated_act.escalated_to = T0 + at(30), T0 + at(60), "boss"
    # Acknowledged, not escalated: due at 35.
    pending_act = alert(4, rule="r", owner="lead", ack=True)
    pending_act.act_by = pending_act.act_due_at = T0 + at(35)
    # Reassigned (act due at 40, act_by 20), escalated for the ack, then acknowledged: its act deadline is the owner's.
    escalated_ack = alert(5, rule="r", owner="lead", ack=True)
    escalated_ack.original_owner, escalated_ack.escalated_to = "alice", "boss"
    escalated_ack.act_by, escalated_ack.act_due_at = T0 + at(20), T0 + at(40)
    steps = [EscalationRecord(alert_id=a.alert_id, level=1, kind=kind, from_owner="lead", to_owner="boss",
                              reason="late", at=T0) for a, kind in ((escalated_act, "act"), (escalated_ack, "ack"))]
    with Session(engine) as session:
        session.add_all([reassigned, sooner, escalated_act, pending_act, escalated_ack, *steps])
        session.commit()
    with Session(engine) as session:
        chosen = insights.open_alerts(session, owner="lead")
        last = insights.last_steps(session, chosen)
    assert [r.alert_id for r in chosen] == ["al-r-2", "al-r-1", "al-r-3", "al-r-4", "al-r-5"]
    deadlines = [insights.next_deadline(r, last.get(r.alert_id)) for r in chosen]
    assert deadlines == [T0 + at(h) for h in (5, 7, 30, 35, 40)]


def test_an_act_step_followed_by_an_ack_step_in_the_chain_still_counts(engine: Engine) -> None:
    """An act step leaves an ack deadline not missed yet pending, so an ack step can follow it in the same chain. The
    latest step's kind (ack) read as if the act was never escalated: the owner's passed act deadline as the manager's,
    hours ahead, and not overdue."""
    # lead -> boss for the ack, boss -> big for the act (its due time pushed to 60), big -> top for the ack; acked.
    both = alert(1, rule="r", owner="lead", ack=True)
    both.act_by, both.act_due_at, both.escalated_to, both.escalation_level = T0 + at(30), T0 + at(60), "top", 3
    # An act step of an earlier owner's chain, then reassigned to lead (act due at 40), whose chain has an ack step.
    earlier = alert(2, rule="r", owner="lead", ack=True)
    earlier.original_owner, earlier.escalated_to, earlier.escalation_level = "alice", "boss", 2
    earlier.act_by, earlier.act_due_at = T0 + at(20), T0 + at(40)
    steps = [
        EscalationRecord(alert_id=alert_id, level=level, kind=kind, from_owner=start, to_owner=end, reason="late",
                         at=T0)
        for alert_id, level, kind, start, end in (
            (both.alert_id, 1, "ack", "lead", "boss"), (both.alert_id, 2, "act", "boss", "big"),
            (both.alert_id, 3, "ack", "big", "top"),
            (earlier.alert_id, 1, "act", "alice", "bob"), (earlier.alert_id, 2, "ack", "lead", "boss"),
        )
    ]
    with Session(engine) as session:
        session.add_all([both, earlier, *steps])
        session.commit()
    with Session(engine) as session:
        chosen = insights.open_alerts(session, owner="lead")
        last = insights.last_steps(session, chosen)
        sla = insights.owner_sla(session, now=T0 + at(35))
    assert [r.alert_id for r in chosen] == ["al-r-1", "al-r-2"]
    assert [insights.next_deadline(r, last.get(r.alert_id)) for r in chosen] == [T0 + at(30), T0 + at(40)]
    assert [insights.overdue(r, T0 + at(35), last.get(r.alert_id)) for r in chosen] == [(False, True), (False, False)]
    assert [(row.owner, row.open, row.overdue) for row in sla] == [("lead", 2, 1)]
