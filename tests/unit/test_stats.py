"""Stats from fixtures with known answers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from sqlmodel import Session

from decision_router.stats import GroupBy, compute_stats
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord

T0 = datetime(2026, 11, 1, 9, 0, tzinfo=timezone.utc)


def alert(n: int, *, rule: str, owner: str, action: str = "alert", ack: bool = False, act_after_s: int | None = None,
          outcome: str | None = None, created: datetime = T0) -> AlertRecord:
    return AlertRecord(
        alert_id=f"al-{rule}-{n}", prediction_id=f"p-{rule}-{n}", rule=rule, owner=owner, original_owner=owner,
        owner_source="static", priority="high", action=action, model="churn" if rule != "fraud" else "fraud",
        model_version="1", entity_type="account", entity_id=f"a{n}", score=0.9, rules_version="v",
        predicted_at=created, created_at=created, ack_by=created + timedelta(hours=4), act_by=created + timedelta(days=2),
        acknowledged_at=created + timedelta(seconds=30) if ack else None,
        intervened_at=created + timedelta(seconds=act_after_s) if act_after_s is not None else None,
        outcome=outcome, status="closed" if outcome else "open",
    )


@pytest.fixture
def session():
    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    with Session(engine) as s:
        rows = []
        # churn-high: 10 routed to alice/bob; 8 acked; 5 intervened after 60..300 s; 3 successes, 2 failures
        for n in range(10):
            rows.append(alert(
                n, rule="churn-high", owner="alice" if n < 6 else "bob", ack=n < 8,
                act_after_s=60 * (n + 1) if n < 5 else None,
                outcome={0: "success", 1: "success", 2: "failure", 5: "success", 9: "failure"}.get(n),
            ))
        # catch-all: tracked only
        rows += [alert(n, rule="catch-all", owner="desk", action="record", outcome="success") for n in range(2)]
        # churn-high control group and cooldown suppressions: counted apart, never as routed
        control = [alert(n, rule="churn-high", owner="alice", outcome="failure") for n in range(20, 23)]
        for row in control:
            row.held_out = True
        suppressed = alert(30, rule="churn-high", owner="alice")
        suppressed.suppressed_by, suppressed.status = "al-churn-high-0", "suppressed"
        rows += [*control, suppressed]
        # escalated twice, then breached its ack deadline at the top
        rows[3].escalation_level = 2
        rows[3].ack_breached_at = T0 + timedelta(hours=9)
        rows[4].escalation_level = 1
        # fraud: routed, nothing happened yet
        rows.append(alert(0, rule="fraud", owner="bob", created=T0 + timedelta(days=10)))
        s.add_all(rows)
        s.commit()
        yield s
    engine.dispose()


def test_stats_by_rule_have_exact_numbers(session) -> None:
    rows = {r.key: r for r in compute_stats(session, by=GroupBy.RULE)}
    high = rows["churn-high"]
    assert (high.routed, high.recorded, high.acknowledged, high.intervened) == (10, 0, 8, 5)
    assert (high.successes, high.failures) == (3, 2)
    assert high.intervention_rate == pytest.approx(0.5)
    assert high.success_rate == pytest.approx(0.6)
    assert high.median_time_to_act_s == pytest.approx(180.0)
    assert (high.held_out, high.suppressed, high.escalations, high.sla_breaches) == (3, 1, 3, 1)


def test_rates_without_a_denominator_are_null_not_zero(session) -> None:
    rows = {r.key: r for r in compute_stats(session, by=GroupBy.RULE)}
    tracked = rows["catch-all"]
    assert (tracked.routed, tracked.recorded) == (0, 2)
    assert tracked.intervention_rate is None and tracked.success_rate is None
    fraud = rows["fraud"]
    assert fraud.routed == 1 and fraud.success_rate is None and fraud.median_time_to_act_s is None


def test_stats_by_owner_and_order(session) -> None:
    rows = compute_stats(session, by=GroupBy.OWNER)
    assert [r.key for r in rows] == ["alice", "bob", "desk"]
    alice, bob = rows[0], rows[1]
    assert (alice.routed, alice.intervened, alice.successes, alice.failures) == (6, 5, 3, 1)
    assert (bob.routed, bob.successes, bob.failures) == (5, 0, 1)
    assert rows[0].as_dict(GroupBy.OWNER)["owner"] == "alice"


def test_stats_window(session) -> None:
    rows = compute_stats(session, by=GroupBy.MODEL, since=T0 + timedelta(days=1))
    assert [(r.key, r.routed) for r in rows] == [("fraud", 1)]
    rows = compute_stats(session, by=GroupBy.MODEL, until=T0 + timedelta(days=1))
    assert [(r.key, r.routed, r.recorded) for r in rows] == [("churn", 10, 2)]
