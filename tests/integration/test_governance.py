"""Ownership and accountability on real Redis and both stores: SLA escalation along the
manager chain (driven by a controllable clock), cooldown, control groups, delegation,
hot reload, and the append-only audit trail."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select
from sqlmodel import Session
from structlog.testing import capture_logs

from decision_router import metrics
from decision_router.escalation import EscalationSweeper
from decision_router.rules import load_rules
from decision_router.service import running_service
from decision_router.stats import GroupBy, compute_stats
from decision_router.tables import AlertRecord, AuditEvent, EscalationRecord
from decision_router.tracker import alert_id_for
from tests.integration.conftest import ManualClock, wait_until
from tests.integration.test_router_loop import count

pytestmark = pytest.mark.redis

ROUTING = """
defaults: {ack_within: 1h, act_within: 4h}
rules:
  - name: churn-high
    when: {model: churn, score: {gte: 0.8}}
    owner: {from: context.account_manager, fallback: desk}
    priority: high
    cooldown: 7d
  - name: upsell
    when: {model: upsell}
    owner: desk
    holdout: 0.5
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
  - {id: desk, name: Desk, manager: lead}
  - {id: away-am, name: On Leave, manager: lead, away_until: "2099-01-01", delegate: am}
"""
T0 = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


@pytest.fixture
async def gov(settings, rules_dir, engine, clock):
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "sweep_interval": timedelta(hours=1)})
    async with running_service(tuned, load_rules(rules_dir), engine, clock=clock, watch_rules=True) as service:
        yield service


def publish(r, keys, pid: str, **overrides) -> None:
    document = {
        "prediction_id": pid, "model": "churn", "model_version": "1", "entity_type": "account",
        "entity_id": f"acct-{pid}", "score": 0.9, "predicted_at": T0.isoformat(),
        "context": {"account_manager": "am"},
    }
    document.update(overrides)
    r.xadd(keys.predictions, {"data": json.dumps(document)})


def inbox(r, keys, owner: str) -> list[dict]:
    return [json.loads(fields["data"]) for _, fields in r.xrange(keys.inbox(owner))]


def events(engine, alert_id: str) -> list[tuple[str, dict]]:
    with Session(engine) as session:
        return [(e.type, e.detail) for e in session.scalars(select(AuditEvent).where(AuditEvent.alert_id == alert_id).order_by(AuditEvent.id))]


async def test_unacknowledged_alert_escalates_up_the_chain_then_breaches(gov, r, engine, clock) -> None:
    keys = gov.keys
    publish(r, keys, "e1")
    await wait_until(lambda: len(inbox(r, keys, "am")) == 1, what="alert for am")
    alert_id = alert_id_for("e1", "churn-high")

    # Before the deadline nothing happens.
    clock.now = T0 + timedelta(minutes=59)
    assert (await gov.sweeper.sweep_once()).escalated == 0

    clock.now = T0 + timedelta(hours=1, minutes=1)
    escalations, breaches = metrics.ESCALATIONS._value.get(), metrics.SLA_BREACHES._value.get()
    with capture_logs() as logs:
        first = await gov.sweeper.sweep_once()
    assert (first.escalated, first.breached, first.delivered) == (1, 0, 1)
    assert (metrics.ESCALATIONS._value.get(), metrics.SLA_BREACHES._value.get()) == (escalations + 1, breaches)
    # The sweep's log line counts in numbers (its conflicts were logged as null when there were none).
    (line,) = [e for e in logs if e["event"] == "escalations"]
    assert (line["escalated"], line["sla_breaches"], line["conflicts"]) == (1, 0, 0)
    (copy,) = inbox(r, keys, "lead")
    assert copy["alert_id"] == alert_id and copy["owner"] == "am"
    assert copy["escalation"] == {"level": 1, "kind": "ack", "reason": "not acknowledged within 1h",
                                  "original_owner": "am", "from_owner": "am", "to_owner": "lead"}
    # Swept again at once: nothing new is due, nothing is sent twice.
    assert (await gov.sweeper.sweep_once()).escalated == 0
    assert len(inbox(r, keys, "lead")) == 1

    clock.now += timedelta(hours=1, minutes=1)
    assert (await gov.sweeper.sweep_once()).escalated == 1
    assert inbox(r, keys, "vp")[0]["escalation"]["level"] == 2

    clock.now += timedelta(hours=1, minutes=1)
    top = await gov.sweeper.sweep_once()
    assert (top.escalated, top.breached) == (0, 1)
    clock.now += timedelta(minutes=30)
    assert (await gov.sweeper.sweep_once()).breached == 0  # the ack breach is counted once
    clock.now += timedelta(days=3)
    # The act deadline is a second SLA; the chain is exhausted, so it breaches at once.
    assert (await gov.sweeper.sweep_once()).breached == 1
    assert (await gov.sweeper.sweep_once()).breached == 0
    # GET /metrics: each step and breach once, however often swept.
    assert (metrics.ESCALATIONS._value.get(), metrics.SLA_BREACHES._value.get()) == (escalations + 2, breaches + 2)

    with Session(engine) as session:
        row = session.get(AlertRecord, alert_id)
        assert (row.escalation_level, row.escalated_to) == (2, "vp")
        assert row.ack_breached_at is not None and row.act_breached_at is not None
        steps = session.scalars(select(EscalationRecord.to_owner).where(EscalationRecord.alert_id == alert_id).order_by(EscalationRecord.level)).all()
    assert steps == ["lead", "vp"]
    kinds = [t for t, _ in events(engine, alert_id)]
    assert kinds.count("escalated") == 2 and kinds.count("sla_breached") == 2


async def test_acknowledged_alert_escalates_only_when_nobody_acts(gov, r, engine, clock) -> None:
    keys = gov.keys
    publish(r, keys, "e2")
    alert_id = alert_id_for("e2", "churn-high")
    await wait_until(lambda: len(inbox(r, keys, "am")) == 1, what="alert")
    r.xadd(keys.outcomes, {"alert_id": alert_id, "type": "acknowledged", "actor": "am"})
    await wait_until(lambda: count(engine, AlertRecord, AlertRecord.acknowledged_at.is_not(None)) == 1, what="ack")

    clock.now = T0 + timedelta(hours=3)
    assert (await gov.sweeper.sweep_once()).escalated == 0
    clock.now = T0 + timedelta(hours=4, minutes=1)
    result = await gov.sweeper.sweep_once()
    assert result.escalated == 1
    assert inbox(r, keys, "lead")[0]["escalation"]["kind"] == "act"
    assert inbox(r, keys, "lead")[0]["escalation"]["reason"] == "no intervention recorded within 4h"

    r.xadd(keys.outcomes, {"alert_id": alert_id, "type": "intervened", "actor": "lead", "action": "call"})
    await wait_until(lambda: count(engine, AlertRecord, AlertRecord.intervened_at.is_not(None)) == 1, what="intervention")
    clock.now += timedelta(days=2)
    assert (await gov.sweeper.sweep_once()).escalated == 0


async def test_deadlines_missed_while_down_fire_once_even_with_two_workers(settings, rules_dir, engine, clock, r) -> None:
    ruleset = load_rules(rules_dir)
    tuned = settings.model_copy(update={"rules_dir": rules_dir, "sweep_interval": timedelta(hours=1)})
    async with running_service(tuned, ruleset, engine, clock=clock) as service:
        for n in range(5):
            publish(r, service.keys, f"d{n}")
        await wait_until(lambda: len(inbox(r, service.keys, "am")) == 5, what="5 alerts")
    # The service is down while every deadline passes, both ack and act. On restart the
    # start-up sweep fires them, once; two workers sweeping at the same time send nothing twice.
    clock.now = T0 + timedelta(hours=5)
    other = tuned.model_copy(update={"consumer_name": "worker-2"})
    async with running_service(tuned, ruleset, engine, clock=clock) as one, running_service(other, ruleset, engine, clock=clock) as two:
        # Each worker's start-up sweep runs as a task of its own, racing the other's: waited for, not assumed
        # done by the time both have started (on a loaded machine the sweeps below could come first).
        await wait_until(lambda: len(inbox(r, one.keys, "lead")) == 5, what="5 escalations delivered at start-up")
        results = await asyncio.gather(*(EscalationSweeper(s.pipeline).sweep_once() for s in (one, two, one, two)))
        assert sum(res.escalated for res in results) == 0  # already done at start-up
        assert len(inbox(r, one.keys, "lead")) == 5
        # Racing sweepers on the next level.
        clock.now = T0 + timedelta(hours=9, minutes=1)
        results = await asyncio.gather(*(EscalationSweeper(s.pipeline).sweep_once() for s in (one, two, one, two)))
    assert sum(res.escalated for res in results) == 5
    assert len(inbox(r, one.keys, "lead")) == 5
    assert len(inbox(r, one.keys, "vp")) == 5
    copies = inbox(r, one.keys, "lead")
    assert {c["escalation"]["kind"] for c in copies} == {"act"}
    assert copies[0]["escalation"]["reason"] == "not acknowledged within 1h, and no intervention recorded within 4h"
    assert count(engine, EscalationRecord) == 10


async def test_reassignment_changes_the_accountable_owner_and_restarts_the_clock(gov, r, engine, clock) -> None:
    keys = gov.keys
    publish(r, keys, "e3")
    alert_id = alert_id_for("e3", "churn-high")
    await wait_until(lambda: len(inbox(r, keys, "am")) == 1, what="alert")
    clock.now = T0 + timedelta(minutes=50)
    r.xadd(keys.outcomes, {"alert_id": alert_id, "type": "reassigned", "actor": "lead", "owner": "desk", "note": "am on a call"})
    await wait_until(lambda: len(inbox(r, keys, "desk")) == 1, what="the new owner's inbox")
    clock.now = T0 + timedelta(hours=1, minutes=10)  # past the original deadline, not the new one
    assert (await gov.sweeper.sweep_once()).escalated == 0
    clock.now = T0 + timedelta(hours=1, minutes=51)
    assert (await gov.sweeper.sweep_once()).escalated == 1
    escalated = inbox(r, keys, "lead")[0]["escalation"]
    assert (escalated["original_owner"], escalated["from_owner"]) == ("desk", "desk")
    reassigned = [d for t, d in events(engine, alert_id) if t == "reassigned"]
    assert reassigned == [{"note": "am on a call", "from_owner": "am", "to_owner": "desk"}]



async def test_a_reassigned_decision_nobody_receives_gets_no_deadlines(gov, r, engine, clock) -> None:
    """A control or recorded decision has no deadlines when routed, and gets none when reassigned: the API
    showed deadlines on them (nothing escalates them, nothing meets them)."""
    from decision_router.router import in_holdout

    keys = gov.keys
    control = next(f"acct-c{n}" for n in range(100) if in_holdout("upsell", "account", f"acct-c{n}", 0.5))
    publish(r, keys, "c1", model="upsell", entity_id=control)
    publish(r, keys, "c2", model="other")  # the catch-all: recorded only
    await wait_until(lambda: count(engine, AlertRecord) == 2, what="2 decisions")
    for pid in ("c1", "c2"):
        r.xadd(keys.outcomes, {"prediction_id": pid, "type": "reassigned", "actor": "lead", "owner": "am"})
    await wait_until(lambda: count(engine, AuditEvent, AuditEvent.type == "reassigned") == 2, what="both reassignments")
    with Session(engine) as session:
        held_out = session.get(AlertRecord, alert_id_for("c1", "upsell"))
        recorded = session.get(AlertRecord, alert_id_for("c2", "rest"))
        assert held_out.held_out and recorded.action == "record"
        for decision in (held_out, recorded):
            assert (decision.owner, decision.ack_due_at, decision.act_due_at) == ("am", None, None)
    clock.now = T0 + timedelta(hours=5)
    assert (await gov.sweeper.sweep_once()).escalated == 0
    assert r.xlen(keys.inbox("am")) == 0

def sla_state(engine, alert_id: str) -> tuple:
    with Session(engine) as session:
        row = session.get(AlertRecord, alert_id)
        return (row.owner, row.delegated_from, row.delivered_at, row.ack_due_at, row.act_due_at,
                row.escalation_level, row.escalated_to, row.sla_revision)


async def reassign_entry(gov, entry_id: str, alert_id: str, owner: str):
    """A reassignment as the outcomes consumer applies a stream entry, its inbox writes done on return."""
    fields = {"alert_id": alert_id, "type": "reassigned", "actor": "lead", "owner": owner, "note": "back to you"}
    return await gov.pipeline.process_outcomes([(entry_id, fields)])


@pytest.mark.parametrize("to", ["am", "away-am"])  # the owner holding it, or an away owner whose delegate holds it
async def test_a_reassignment_to_the_owner_holding_the_alert_keeps_its_escalation(gov, r, engine, clock, to) -> None:
    """It restarted the deadlines and the chain (escalated_to reset) and audited a delivery deduplicated away:
    a way to silence an escalation with nobody new accountable."""
    keys = gov.keys
    publish(r, keys, "n1")
    alert_id = alert_id_for("n1", "churn-high")
    await wait_until(lambda: len(inbox(r, keys, "am")) == 1, what="alert")
    clock.now = T0 + timedelta(hours=1, minutes=1)
    assert (await gov.sweeper.sweep_once()).escalated == 1  # to lead, the ack deadline again in 1h
    before = sla_state(engine, alert_id)
    clock.now = T0 + timedelta(hours=1, minutes=30)
    for _ in range(2):  # the same entry redelivered changes nothing more
        result = await reassign_entry(gov, "1-1", alert_id, to)
        assert (result.accepted + result.redelivered, result.unchanged, result.delivered) == (1, [alert_id], 0)
        assert result.handed_over == []
        assert sla_state(engine, alert_id) == before
    assert len(inbox(r, keys, "am")) == 1
    detail = {"note": "back to you", "from_owner": "am", "to_owner": "am", "unchanged": True}
    if to != "am":
        detail["delegated_from"] = to
    assert events(engine, alert_id)[-1] == ("reassigned", detail)  # recorded, and no "delivered" after it
    # The chain goes on from where it was: lead's step is due an hour after it, not after the reassignment.
    clock.now = T0 + timedelta(hours=2, minutes=2)
    assert (await gov.sweeper.sweep_once()).escalated == 1
    assert inbox(r, keys, "vp")[0]["escalation"]["level"] == 2


async def test_a_closed_alert_reassigned_changes_owner_and_is_not_delivered_again(gov, r, engine, clock) -> None:
    """It went to the new owner's inbox, with nothing in it saying it was closed."""
    keys = gov.keys
    publish(r, keys, "n2")
    alert_id = alert_id_for("n2", "churn-high")
    await wait_until(lambda: len(inbox(r, keys, "am")) == 1, what="alert")
    clock.now = T0 + timedelta(minutes=20)
    closed = await gov.pipeline.process_outcomes(
        [("1-1", {"alert_id": alert_id, "type": "outcome", "actor": "crm", "result": "success"})]
    )
    assert closed.accepted == 1
    delivered_at = sla_state(engine, alert_id)[2]
    clock.now = T0 + timedelta(minutes=30)
    for _ in range(2):  # redelivered: still nothing sent
        result = await reassign_entry(gov, "1-2", alert_id, "desk")
        assert (result.accepted + result.redelivered, result.unchanged, result.delivered) == (1, [], 0)
        assert result.handed_over == [alert_id]  # accountable now, though not delivered
    assert await gov.outbox.drain_once(grace=timedelta(0)) == 0
    assert r.xlen(keys.inbox("desk")) == 0
    owner, _, still_delivered_at, ack_due, act_due, *_ = sla_state(engine, alert_id)
    assert (owner, still_delivered_at, ack_due, act_due) == ("desk", delivered_at, None, None)
    assert events(engine, alert_id)[-1] == (
        "reassigned", {"note": "back to you", "from_owner": "am", "to_owner": "desk", "closed": True}
    )
    clock.now = T0 + timedelta(hours=5)
    sweep = await gov.sweeper.sweep_once()
    assert (sweep.escalated, sweep.breached) == (0, 0)
    # Accountable for the record: the stats by owner count it (and its success) for desk now.
    with Session(engine) as session:
        rows = {row.key: row for row in compute_stats(session, by=GroupBy.OWNER)}
    assert set(rows) == {"desk"} and rows["desk"].successes == 1


async def test_cooldown_suppresses_repeat_alerts_per_entity_and_rule(gov, r, engine) -> None:
    keys = gov.keys
    publish(r, keys, "k1", entity_id="acct-same")
    await wait_until(lambda: len(inbox(r, keys, "am")) == 1, what="first alert")
    publish(r, keys, "k2", entity_id="acct-same")
    publish(r, keys, "k3", entity_id="acct-other")
    await wait_until(lambda: count(engine, AlertRecord) == 3, what="3 decisions")
    await wait_until(lambda: len(inbox(r, keys, "am")) == 2, what="the other entity's alert")
    with Session(engine) as session:
        suppressed = session.get(AlertRecord, alert_id_for("k2", "churn-high"))
        assert suppressed.suppressed_by == alert_id_for("k1", "churn-high")
        assert suppressed.status == "suppressed" and suppressed.delivered_at is None and suppressed.ack_due_at is None
    assert [t for t, _ in events(engine, alert_id_for("k2", "churn-high"))] == ["suppressed"]
    assert {a["prediction_id"] for a in inbox(r, keys, "am")} == {"k1", "k3"}


async def test_held_out_entities_are_recorded_not_delivered(gov, r, engine) -> None:
    from decision_router.router import in_holdout

    keys = gov.keys
    entities = [f"acct-u{n}" for n in range(40)]
    for n, entity in enumerate(entities):
        publish(r, keys, f"u{n}", model="upsell", entity_id=entity)
    await wait_until(lambda: count(engine, AlertRecord) == 40, what="40 decisions")
    expected_control = {e for e in entities if in_holdout("upsell", "account", e, 0.5)}
    assert 5 < len(expected_control) < 35
    await wait_until(lambda: len(inbox(r, keys, "desk")) == 40 - len(expected_control), what="treated alerts delivered")
    with Session(engine) as session:
        control = set(session.scalars(select(AlertRecord.entity_id).where(AlertRecord.held_out.is_(True))))
    assert control == expected_control
    assert not {a["entity_id"] for a in inbox(r, keys, "desk")} & control


async def test_away_owner_gets_their_delegate(gov, r, engine) -> None:
    keys = gov.keys
    publish(r, keys, "w1", context={"account_manager": "away-am"})
    await wait_until(lambda: len(inbox(r, keys, "am")) == 1, what="the delegate's inbox")
    alert = inbox(r, keys, "am")[0]
    assert (alert["owner"], alert["owner_source"], alert["delegated_from"]) == ("am", "delegate", "away-am")
    assert r.xlen(keys.inbox("away-am")) == 0


async def test_changed_rules_are_reloaded_and_a_bad_file_keeps_the_old_ones(gov, r, engine, rules_dir) -> None:
    keys = gov.keys
    first = gov.pipeline.ruleset.version
    (rules_dir / "routing.yaml").write_text(ROUTING.replace("owner: desk\n    holdout: 0.5", "owner: lead\n    holdout: 0.5").replace("score: {gte: 0.8}", "score: {gte: 0.95}"))
    await gov.check_rules()
    second = gov.pipeline.ruleset.version
    assert second != first
    (rules_dir / "routing.yaml").write_text(ROUTING.replace("owner: desk", "owner: nobody"))
    await gov.check_rules(force=True)
    assert gov.pipeline.ruleset.version == second  # the broken file was refused
    publish(r, keys, "h1")  # 0.9 < 0.95 now: recorded by the catch-all
    await wait_until(lambda: count(engine, AlertRecord) == 1, what="routed with the reloaded rules")
    with Session(engine) as session:
        row = session.scalars(select(AlertRecord)).one()
    assert (row.rule, row.rules_version) == ("rest", second)


async def test_audit_events_cannot_be_updated_or_deleted(gov, r, engine) -> None:
    publish(r, gov.keys, "a1")
    await wait_until(lambda: count(engine, AuditEvent) >= 2, what="audit events (routed, delivered)")
    with Session(engine) as session:
        event = session.scalars(select(AuditEvent)).first()
        event.actor = "someone-else"
        session.add(event)
        with pytest.raises(PermissionError, match="append-only"):
            session.commit()
        session.rollback()
        session.delete(session.scalars(select(AuditEvent)).first())
        with pytest.raises(PermissionError, match="append-only"):
            session.commit()
