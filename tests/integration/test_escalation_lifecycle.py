"""Ownership over time on real Redis and both stores, driven by a controllable clock: an
intervention reported before the acknowledgement, a reassignment after a breach, racing a
sweep or to an owner who is away, an escalation to a manager who is away, one to a
manager a hot reload removed, and an act step taken while the ack deadline is still ahead."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlmodel import Session

from decision_router import metrics
from decision_router.contracts import OutcomeEvent
from decision_router.escalation import escalate
from decision_router.rules import load_rules
from decision_router.service import running_service
from decision_router.stats import compute_stats
from decision_router.tables import AlertRecord, AuditEvent, EscalationRecord, as_utc
from decision_router.tracker import alert_id_for, apply_outcome
from tests.integration.conftest import ManualClock, wait_until

pytestmark = pytest.mark.redis

ROUTING = """
defaults: {ack_within: 1h, act_within: 4h}
rules:
  - name: churn-high
    when: {model: churn, score: {gte: 0.8}}
    owner: {from: context.account_manager, fallback: desk}
  - name: rest
    when: {}
    owner: desk
    action: record
"""
OWNERS = """
owners:
  - {id: vp, name: VP}
  - {id: lead, name: Lead, manager: vp}
  - {id: am, name: Account Manager, manager: lead}
  - {id: desk-lead, name: Desk Lead}
  - {id: desk, name: Desk, manager: desk-lead}
  - {id: director, name: Director, manager: vp, away_until: "2099-01-01", delegate: deputy}
  - {id: deputy, name: Deputy Director, manager: director}
  - {id: am-2, name: Account Manager 2, manager: director}
  - {id: chief, name: Chief, away_until: "2099-01-01", delegate: aide}
  - {id: aide, name: Aide, manager: chief}
"""
T0 = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def svc(settings, rules_dir, engine, clock):
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "sweep_interval": timedelta(hours=1)})
    async with running_service(tuned, load_rules(rules_dir), engine, clock=clock) as service:
        yield service


def inbox(r, keys, owner: str) -> list[dict]:
    return [json.loads(fields["data"]) for _, fields in r.xrange(keys.inbox(owner))]


def alert_row(engine, alert_id: str) -> AlertRecord:
    with Session(engine) as session:
        row = session.get(AlertRecord, alert_id)
        session.expunge(row)
        return row


def breach_events(engine, alert_id: str) -> list[dict]:
    with Session(engine) as session:
        return list(session.scalars(select(AuditEvent.detail).where(AuditEvent.alert_id == alert_id,
                                                                    AuditEvent.type == "sla_breached")
                                    .order_by(AuditEvent.id)))


async def routed_alert(svc, r, pid: str, owner: str = "am") -> str:
    document = {
        "prediction_id": pid, "model": "churn", "model_version": "1", "entity_type": "account",
        "entity_id": f"acct-{pid}", "score": 0.9, "predicted_at": T0.isoformat(), "context": {"account_manager": owner},
    }
    r.xadd(svc.keys.predictions, {"data": json.dumps(document)})
    await wait_until(lambda: len(inbox(r, svc.keys, owner)) == 1, what=f"the alert in {owner}'s inbox")
    return alert_id_for(pid, "churn-high")


async def test_an_intervention_reported_before_the_acknowledgement_moves_the_ack_back(svc, r, engine, clock) -> None:
    alert_id = await routed_alert(svc, r, "i1")
    clock.now = T0 + timedelta(hours=2)
    # The CRM reports the call made at 0:30 after the owner's acknowledgement of 1:30 was recorded.
    r.xadd(svc.keys.outcomes, {"alert_id": alert_id, "type": "acknowledged", "actor": "am",
                               "at": (T0 + timedelta(minutes=90)).isoformat()})
    await wait_until(lambda: alert_row(engine, alert_id).acknowledged_at is not None, what="the ack")
    r.xadd(svc.keys.outcomes, {"alert_id": alert_id, "type": "intervened", "actor": "crm", "action": "call",
                               "at": (T0 + timedelta(minutes=30)).isoformat()})
    await wait_until(lambda: alert_row(engine, alert_id).intervened_at is not None, what="the intervention")
    with Session(engine) as session:
        (row,) = compute_stats(session, by="rule")
    # Acting implies having seen it: the first acknowledging event was the intervention.
    assert (row.median_time_to_ack_s, row.median_time_to_act_s) == (1800.0, 1800.0)
    # A second intervention (kept in the audit log only) changes nothing.
    r.xadd(svc.keys.outcomes, {"alert_id": alert_id, "type": "intervened", "actor": "crm", "action": "email",
                               "at": (T0 + timedelta(minutes=10)).isoformat()})
    await wait_until(lambda: _audit_count(engine, alert_id, "intervened") == 2, what="the second intervention")
    assert alert_row(engine, alert_id).intervention == "call"
    with Session(engine) as session:
        assert compute_stats(session, by="rule")[0].median_time_to_ack_s == 1800.0


def _audit_count(engine, alert_id: str, kind: str) -> int:
    with Session(engine) as session:
        return len(session.scalars(select(AuditEvent.id).where(AuditEvent.alert_id == alert_id,
                                                                AuditEvent.type == kind)).all())


async def test_a_breached_alert_reassigned_gets_fresh_deadlines_for_the_new_owner(svc, r, engine, clock) -> None:
    alert_id = await routed_alert(svc, r, "b1")
    # am -> lead -> vp, then the ack deadline breaches at the top of the chain.
    for hours in (1, 2, 3):
        clock.now = T0 + timedelta(hours=hours, minutes=1)
        await svc.sweeper.sweep_once()
    first_breach = alert_row(engine, alert_id).ack_breached_at
    assert first_breach is not None
    r.xadd(svc.keys.outcomes, {"alert_id": alert_id, "type": "reassigned", "actor": "vp", "owner": "desk"})
    await wait_until(lambda: len(inbox(r, svc.keys, "desk")) == 1, what="the new owner's inbox")
    row = alert_row(engine, alert_id)
    assert row.ack_due_at is not None and row.escalated_to is None

    # The new owner misses their own hour: their manager hears of it.
    clock.now += timedelta(hours=1, minutes=1)
    assert (await svc.sweeper.sweep_once()).escalated == 1
    (copy,) = inbox(r, svc.keys, "desk-lead")
    assert (copy["owner"], copy["escalation"]["from_owner"], copy["escalation"]["kind"]) == ("desk", "desk", "ack")
    clock.now += timedelta(hours=1, minutes=1)
    assert (await svc.sweeper.sweep_once()).breached == 1
    # A breach per deadline and alert in the stats; the first breach's time stays.
    assert as_naive(alert_row(engine, alert_id).ack_breached_at) == as_naive(first_breach)
    with Session(engine) as session:
        (stats,) = compute_stats(session, by="rule")
    assert (stats.escalations, stats.sla_breaches) == (3, 1)


async def test_a_deadline_breached_again_after_a_reassignment_counts_once_in_the_metrics(svc, r, engine, clock) -> None:
    """The stats count a breach once per alert and deadline (the first one's time stays); so must
    decision_router_sla_breaches_total, or the two disagree after every reassignment of a breached alert."""
    alert_id = await routed_alert(svc, r, "b2")
    breaches = metrics.SLA_BREACHES._value.get()
    for hours in (1, 2, 3):  # am -> lead -> vp, then the ack deadline breaches at vp
        clock.now = T0 + timedelta(hours=hours, minutes=1)
        await svc.sweeper.sweep_once()
    assert metrics.SLA_BREACHES._value.get() == breaches + 1
    r.xadd(svc.keys.outcomes, {"alert_id": alert_id, "type": "reassigned", "actor": "vp", "owner": "desk-lead"})
    await wait_until(lambda: len(inbox(r, svc.keys, "desk-lead")) == 1, what="the new owner's inbox")
    # desk-lead is the top of their own chain: their missed hour breaches the same ack deadline again.
    clock.now += timedelta(hours=1, minutes=1)
    again = await svc.sweeper.sweep_once()
    assert (again.breached, again.repeated_breaches) == (1, 1)
    # The audit says which breach is the repeat.
    assert [(b["top_of_chain"], b.get("again")) for b in breach_events(engine, alert_id)] == [("vp", None),
                                                                                         ("desk-lead", True)]
    with Session(engine) as session:
        (stats,) = compute_stats(session, by="rule")
    assert stats.sla_breaches == 1
    assert metrics.SLA_BREACHES._value.get() == breaches + 1


def as_naive(value: datetime) -> datetime:
    return value.replace(tzinfo=None)


async def test_a_reassignment_racing_an_escalation_starts_from_the_new_owner(svc, r, engine, clock) -> None:
    alert_id = await routed_alert(svc, r, "race1")
    now = T0 + timedelta(hours=1, minutes=1)
    with Session(engine) as reassigning:
        (record,) = reassigning.scalars(select(AlertRecord).where(AlertRecord.alert_id == alert_id)).all()
        # Between the reassignment's read and its write, a sweep escalates the alert to am's manager.
        with Session(engine) as sweeping:
            stale = sweeping.get(AlertRecord, alert_id)
            assert escalate(sweeping, stale, owners=svc.pipeline.ruleset.owners, now=now) == "escalated"
            sweeping.commit()
        event = OutcomeEvent(type="reassigned", alert_id=alert_id, actor="ops", owner="desk")
        apply_outcome(reassigning, event=event, alerts=[record], source_id=None, now=now)
        reassigning.commit()
    row = alert_row(engine, alert_id)
    assert (row.owner, row.escalated_to) == ("desk", None)
    clock.now = now + timedelta(hours=1, minutes=1)
    await svc.sweeper.sweep_once()
    with Session(engine) as session:
        steps = session.execute(select(EscalationRecord.level, EscalationRecord.from_owner, EscalationRecord.to_owner)
                                .where(EscalationRecord.alert_id == alert_id)
                                .order_by(EscalationRecord.level)).all()
    assert [tuple(s) for s in steps] == [(1, "am", "lead"), (2, "desk", "desk-lead")]


async def test_a_sweep_that_read_the_alert_before_a_reassignment_committed_does_not_escalate_it(svc, r, engine) -> None:
    alert_id = await routed_alert(svc, r, "race2")
    owners = svc.pipeline.ruleset.owners
    now = T0 + timedelta(hours=1, minutes=1)
    with Session(engine) as reassigning:
        (record,) = reassigning.scalars(select(AlertRecord).where(AlertRecord.alert_id == alert_id)).all()
        # A first sweep escalates between the reassignment's read and its write...
        with Session(engine) as first:
            assert escalate(first, first.get(AlertRecord, alert_id), owners=owners, now=now) == "escalated"
            first.commit()
        # ...and a second sweep reads the alert as that left it, before the reassignment commits.
        with Session(engine) as second:
            stale = second.get(AlertRecord, alert_id)
            event = OutcomeEvent(type="reassigned", alert_id=alert_id, actor="ops", owner="desk")
            apply_outcome(reassigning, event=event, alerts=[record], source_id=None, now=now)
            reassigning.commit()
            later = now + timedelta(hours=1, minutes=1)
            # Its compare-and-set must fail: it would take am's chain (lead -> vp) for desk's alert.
            assert escalate(second, stale, owners=owners, now=later) == "conflict"
            second.commit()
    with Session(engine) as session:
        assert session.scalars(select(EscalationRecord.to_owner).where(EscalationRecord.alert_id == alert_id)).all() == [
            "lead"
        ]


async def test_an_alert_closed_after_a_reassignment_read_it_is_not_delivered_again(svc, r, engine) -> None:
    """Another worker's outcome commits between the reassignment's read (the alert open) and its write: the alert
    is closed when the reassignment lands, so it stays out of the outbox (the new owner has nothing to act on)."""
    alert_id = await routed_alert(svc, r, "race3")
    # Marked delivered just after the inbox write routed_alert waits for: read before, it was None (a flaky test).
    await wait_until(lambda: alert_row(engine, alert_id).delivered_at is not None, what="the delivery mark")
    delivered_at = alert_row(engine, alert_id).delivered_at
    now = T0 + timedelta(minutes=30)
    with Session(engine) as reassigning:
        (record,) = reassigning.scalars(select(AlertRecord).where(AlertRecord.alert_id == alert_id)).all()
        assert record.status == "open"
        with Session(engine) as closing:
            outcome = OutcomeEvent(type="outcome", alert_id=alert_id, actor="crm", result="success")
            apply_outcome(closing, event=outcome, alerts=[closing.get(AlertRecord, alert_id)], source_id=None, now=now)
            closing.commit()
        event = OutcomeEvent(type="reassigned", alert_id=alert_id, actor="ops", owner="desk")
        apply_outcome(reassigning, event=event, alerts=[record], source_id=None, now=now)
        reassigning.commit()
    row = alert_row(engine, alert_id)
    assert (row.owner, row.status, row.delivered_at) == ("desk", "closed", delivered_at)
    assert await svc.outbox.drain_once(grace=timedelta(0)) == 0
    assert inbox(r, svc.keys, "desk") == []


@pytest.mark.parametrize("meanwhile", ["outcome", "acknowledged"])
async def test_a_reassignment_racing_an_outcome_or_ack_gives_no_deadline_back(svc, r, engine, meanwhile) -> None:
    """The reassignment read the alert open and unacknowledged; another worker's outcome (or ack) commits before it
    writes. Its fresh due times were written from what it read: a closed alert got both deadlines back (an
    acknowledged one its ack deadline), as pending as a new alert's."""
    alert_id = await routed_alert(svc, r, f"race-due-{meanwhile}")
    now = T0 + timedelta(minutes=30)
    with Session(engine) as reassigning:
        (record,) = reassigning.scalars(select(AlertRecord).where(AlertRecord.alert_id == alert_id)).all()
        assert (record.status, record.acknowledged_at) == ("open", None)
        with Session(engine) as other:
            event = OutcomeEvent(type=meanwhile, alert_id=alert_id, actor="crm",
                                 **({"result": "success"} if meanwhile == "outcome" else {}))
            apply_outcome(other, event=event, alerts=[other.get(AlertRecord, alert_id)], source_id=None, now=now)
            other.commit()
        event = OutcomeEvent(type="reassigned", alert_id=alert_id, actor="ops", owner="desk")
        apply_outcome(reassigning, event=event, alerts=[record], source_id=None, now=now)
        reassigning.commit()
    row = alert_row(engine, alert_id)
    assert (row.owner, row.ack_due_at) == ("desk", None)
    if meanwhile == "outcome":
        assert (row.status, row.act_due_at) == ("closed", None)
    else:  # still open and not acted on: the act deadline starts again for desk (act_within 4h)
        assert (row.status, as_utc(row.act_due_at)) == ("open", now + timedelta(hours=4))


async def test_an_escalation_to_an_away_manager_goes_to_their_delegate(svc, r, engine, clock) -> None:
    alert_id = await routed_alert(svc, r, "w1", owner="am-2")
    clock.now = T0 + timedelta(hours=1, minutes=1)
    assert (await svc.sweeper.sweep_once()).escalated == 1
    assert inbox(r, svc.keys, "director") == []
    (copy,) = inbox(r, svc.keys, "deputy")
    assert copy["escalation"] == {
        "level": 1, "kind": "ack", "reason": "not acknowledged within 1h (director is away; to their delegate)",
        "original_owner": "am-2", "from_owner": "am-2", "to_owner": "deputy",
    }
    # The chain goes on from the away manager: their manager is next, not back to them.
    clock.now += timedelta(hours=1, minutes=1)
    assert (await svc.sweeper.sweep_once()).escalated == 1
    (top,) = inbox(r, svc.keys, "vp")
    assert (top["escalation"]["level"], top["escalation"]["from_owner"]) == (2, "director")
    with Session(engine) as session:
        escalated = session.scalars(select(AuditEvent).where(AuditEvent.alert_id == alert_id,
                                                             AuditEvent.type == "escalated").order_by(AuditEvent.id)).all()
    assert (escalated[0].detail["to_owner"], escalated[0].detail["delegated_from"]) == ("deputy", "director")


async def test_an_escalation_whose_delegate_already_holds_the_alert_goes_on_up(svc, r, engine, clock) -> None:
    """deputy's manager, director, is away with deputy as delegate: deputy's missed alert went back to deputy."""
    alert_id = await routed_alert(svc, r, "w2", owner="deputy")
    clock.now = T0 + timedelta(hours=1, minutes=1)
    assert (await svc.sweeper.sweep_once()).escalated == 1
    assert len(inbox(r, svc.keys, "deputy")) == 1  # the alert itself, no copy of it
    (copy,) = inbox(r, svc.keys, "vp")
    assert copy["escalation"] == {
        "level": 1, "kind": "ack",
        "reason": "not acknowledged within 1h (director is away and their delegate deputy already holds it: up to vp)",
        "original_owner": "deputy", "from_owner": "deputy", "to_owner": "vp",
    }
    row = alert_row(engine, alert_id)
    assert (row.escalated_to, row.escalation_level) == ("vp", 1)
    with Session(engine) as session:
        (event,) = session.scalars(select(AuditEvent.detail).where(AuditEvent.alert_id == alert_id,
                                                                   AuditEvent.type == "escalated")).all()
    assert (event["to_owner"], event["skipped"]) == ("vp", ["director"])
    # vp is the top of the chain: the next missed deadline is a breach, not a step back down.
    clock.now += timedelta(hours=1, minutes=1)
    assert (await svc.sweeper.sweep_once()).breached == 1
    assert len(inbox(r, svc.keys, "deputy")) == 1


async def test_an_escalation_whose_delegate_already_holds_the_alert_at_the_top_is_a_breach(
    svc, r, engine, clock
) -> None:
    alert_id = await routed_alert(svc, r, "w3", owner="aide")
    clock.now = T0 + timedelta(hours=1, minutes=1)
    assert (await svc.sweeper.sweep_once()).breached == 1
    assert len(inbox(r, svc.keys, "aide")) == 1
    row = alert_row(engine, alert_id)
    assert (row.escalated_to, row.escalation_level, row.ack_breached_at is not None) == (None, 0, True)
    with Session(engine) as session:
        (event,) = session.scalars(select(AuditEvent.detail).where(AuditEvent.alert_id == alert_id,
                                                                   AuditEvent.type == "sla_breached")).all()
    assert event["reason"] == ("not acknowledged within 1h (chief is away and their delegate aide already holds it: "
                               "chief is the top of the chain)")
    assert (event["top_of_chain"], event["skipped"]) == ("chief", ["chief"])


async def test_a_reassignment_to_an_away_owner_goes_to_their_delegate(svc, r, engine, clock) -> None:
    alert_id = await routed_alert(svc, r, "d1")
    r.xadd(svc.keys.outcomes, {"alert_id": alert_id, "type": "reassigned", "actor": "lead", "owner": "director"})
    await wait_until(lambda: len(inbox(r, svc.keys, "deputy")) == 1, what="the delegate's inbox")
    assert inbox(r, svc.keys, "director") == []
    (copy,) = inbox(r, svc.keys, "deputy")
    assert (copy["owner"], copy["reassigned_from"], copy["delegated_from"]) == ("deputy", "am", "director")
    with Session(engine) as session:
        (event,) = session.scalars(select(AuditEvent.detail).where(AuditEvent.alert_id == alert_id,
                                                                   AuditEvent.type == "reassigned")).all()
    assert event == {"from_owner": "am", "to_owner": "deputy", "delegated_from": "director"}
    # The delegate is accountable now: escalation starts from them. (The store marks the delivery just
    # after the inbox write.)
    await wait_until(lambda: alert_row(engine, alert_id).delivered_at is not None, what="the delivery marked")
    row = alert_row(engine, alert_id)
    assert (row.owner, row.escalated_to) == ("deputy", None)


async def test_a_manager_removed_by_a_hot_reload_does_not_end_the_chain(settings, rules_dir, engine, r, clock) -> None:
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "sweep_interval": timedelta(hours=1)})
    async with running_service(tuned, load_rules(rules_dir), engine, clock=clock, watch_rules=True) as service:
        alert_id = await routed_alert(service, r, "gone1")
        clock.now = T0 + timedelta(hours=1, minutes=1)
        assert (await service.sweeper.sweep_once()).escalated == 1
        # lead leaves: am reports to new-lead now.
        (rules_dir / "owners.yaml").write_text(OWNERS.replace(
            "  - {id: lead, name: Lead, manager: vp}", "  - {id: new-lead, name: New Lead, manager: vp}"
        ).replace("{id: am, name: Account Manager, manager: lead}", "{id: am, name: Account Manager, manager: new-lead}"))
        await service.check_rules(force=True)
        assert "lead" not in service.pipeline.ruleset.owners
        clock.now += timedelta(hours=1, minutes=1)
        assert (await service.sweeper.sweep_once()).escalated == 1
        (copy,) = inbox(r, service.keys, "new-lead")
        assert (copy["escalation"]["level"], copy["escalation"]["from_owner"]) == (2, "lead")
        assert copy["escalation"]["reason"] == "not acknowledged within 1h (lead no longer in the owner directory; up from am)"
        # And on up the chain as it is now, to the breach at its top.
        clock.now += timedelta(hours=1, minutes=1)
        assert (await service.sweeper.sweep_once()).escalated == 1
        assert len(inbox(r, service.keys, "vp")) == 1
        # 4:04: the act deadline (4h) has passed too, so this miss is recorded for it, at vp.
        clock.now += timedelta(hours=1, minutes=1)
        assert (await service.sweeper.sweep_once()).breached == 1
    row = alert_row(engine, alert_id)
    assert (row.escalation_level, row.escalated_to, row.act_breached_at is not None) == (3, "vp", True)
    with Session(engine) as session:
        (breach,) = session.scalars(select(AuditEvent.detail).where(AuditEvent.alert_id == alert_id,
                                                                    AuditEvent.type == "sla_breached")).all()
    assert breach["top_of_chain"] == "vp"


async def test_an_act_breach_leaves_an_ack_deadline_not_missed_yet_pending(svc, r, engine, clock) -> None:
    """The ack chain reached vp at 3:30 (next due 4:30); the act deadline (4h) breaches at vp at 4:01. That act
    step cleared the pending ack deadline: it never breached, and only the act's breach was recorded."""
    alert_id = await routed_alert(svc, r, "ad1")
    clock.now = T0 + timedelta(hours=1, minutes=1)  # ack: am -> lead, next due 2:01
    assert (await svc.sweeper.sweep_once()).escalated == 1
    clock.now = T0 + timedelta(hours=3, minutes=30)  # a late sweep: ack: lead -> vp, next due 4:30
    assert (await svc.sweeper.sweep_once()).escalated == 1
    clock.now = T0 + timedelta(hours=4, minutes=1)  # act missed at vp, the top; the ack is due at 4:30
    assert (await svc.sweeper.sweep_once()).breached == 1
    row = alert_row(engine, alert_id)
    assert row.act_breached_at is not None and row.ack_breached_at is None
    assert as_utc(row.ack_due_at) == T0 + timedelta(hours=4, minutes=30)
    clock.now = T0 + timedelta(hours=4, minutes=31)
    assert (await svc.sweeper.sweep_once()).breached == 1
    row = alert_row(engine, alert_id)
    assert (as_utc(row.ack_breached_at), row.ack_due_at) == (clock.now, None)
    assert [(b["kind"], b["reason"], b["top_of_chain"]) for b in breach_events(engine, alert_id)] == [
        ("act", "no intervention recorded within 4h", "vp"), ("ack", "not acknowledged within 1h", "vp"),
    ]


async def test_an_act_escalation_leaves_an_ack_deadline_not_missed_yet_pending(svc, r, engine, clock) -> None:
    alert_id = await routed_alert(svc, r, "ad2")
    clock.now = T0 + timedelta(hours=3, minutes=30)  # a late first sweep: ack: am -> lead, next due 4:30
    assert (await svc.sweeper.sweep_once()).escalated == 1
    clock.now = T0 + timedelta(hours=4, minutes=1)  # act: lead -> vp, next due 8:01
    assert (await svc.sweeper.sweep_once()).escalated == 1
    row = alert_row(engine, alert_id)
    assert (row.escalated_to, as_utc(row.act_due_at)) == ("vp", clock.now + timedelta(hours=4))
    assert as_utc(row.ack_due_at) == T0 + timedelta(hours=4, minutes=30)
    clock.now = T0 + timedelta(hours=4, minutes=31)  # the ack chain goes on from vp, the top: its breach
    assert (await svc.sweeper.sweep_once()).breached == 1
    row = alert_row(engine, alert_id)
    assert (row.ack_breached_at is not None, row.ack_due_at, row.act_breached_at) == (True, None, None)
    assert as_utc(row.act_due_at) == T0 + timedelta(hours=8, minutes=1)


async def test_two_sweeps_racing_an_act_step_with_the_ack_pending_take_it_once(svc, r, engine, clock) -> None:
    alert_id = await routed_alert(svc, r, "ad3")
    clock.now = T0 + timedelta(hours=3, minutes=30)
    await svc.sweeper.sweep_once()  # ack: am -> lead, next due 4:30
    owners = svc.pipeline.ruleset.owners
    now = T0 + timedelta(hours=4, minutes=1)
    with Session(engine) as first, Session(engine) as second:
        # Both workers read the alert before either writes.
        mine, theirs = first.get(AlertRecord, alert_id), second.get(AlertRecord, alert_id)
        assert escalate(first, mine, owners=owners, now=now) == "escalated"
        first.commit()
        assert escalate(second, theirs, owners=owners, now=now) == "conflict"
        second.commit()
    with Session(engine) as session:
        steps = session.execute(select(EscalationRecord.level, EscalationRecord.kind, EscalationRecord.to_owner)
                                .where(EscalationRecord.alert_id == alert_id)
                                .order_by(EscalationRecord.level)).all()
    assert [tuple(s) for s in steps] == [(1, "ack", "lead"), (2, "act", "vp")]
    row = alert_row(engine, alert_id)
    assert (row.sla_revision, as_utc(row.ack_due_at)) == (2, T0 + timedelta(hours=4, minutes=30))
