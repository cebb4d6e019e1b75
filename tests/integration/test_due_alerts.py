"""The SLA sweep's query (escalation.due_alerts) reads only the deadlines still pending, through the
partial due-time indexes, and finds exactly what the single select it replaced found, in its order."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from benchmarks.bench_sla_sweep import former_due_alerts, sent_statements
from decision_router.escalation import due_alerts
from decision_router.tables import AlertRecord

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def alert_row(n: int, **values: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "alert_id": f"al-{n:05d}", "prediction_id": f"p-{n:05d}", "rule": "r", "owner": "o", "original_owner": "o",
        "owner_source": "static", "fallback_reason": None, "delegated_from": None, "priority": "high",
        "action": "alert", "model": "churn", "model_version": "v1", "entity_type": "account",
        "entity_id": f"acct-{n}", "score": 0.5, "context": {}, "missing_context": [], "rules_version": "abc",
        "predicted_at": T0, "created_at": T0, "ack_by": T0 + timedelta(hours=4), "act_by": T0 + timedelta(days=2),
        "delivered_at": None, "acknowledged_at": None, "intervened_at": None, "intervention": None,
        "outcome": None, "outcome_at": None, "outcome_value": None, "status": "open", "held_out": False,
        "suppressed_by": None, "ack_due_at": None, "act_due_at": None, "escalation_level": 0,
        "escalated_to": None, "ack_breached_at": None, "act_breached_at": None, "sla_revision": 0,
    }
    row.update(values)
    return row


def insert_alerts(engine: Engine, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as connection:
        connection.execute(insert(AlertRecord.__table__), rows)  # type: ignore[attr-defined]


def random_alert(rnd: random.Random, n: int) -> dict[str, Any]:
    """Any mix the store can hold, and some it should not (a due time on a record or a control row),
    so the query's own conditions are tested, not only what the writers keep true."""
    def moment() -> datetime:
        return T0 + timedelta(minutes=rnd.randrange(-600, 600))

    def maybe() -> datetime | None:
        return moment() if rnd.random() < 0.5 else None

    return alert_row(
        n,
        created_at=T0 + timedelta(minutes=rnd.randrange(40)),  # few distinct times: many ties
        action=rnd.choice(("alert", "alert", "alert", "record")),
        held_out=rnd.random() < 0.15,
        suppressed_by=rnd.choice((None, None, None, None, "al-00000", "")),
        status=rnd.choice(("open", "open", "open", "closed", "suppressed")),
        ack_due_at=maybe(), act_due_at=maybe(), acknowledged_at=maybe(), intervened_at=maybe(),
    )


def test_due_alerts_finds_what_the_former_query_found(engine: Engine) -> None:
    for seed in range(6):
        rnd = random.Random(seed)
        with engine.begin() as connection:
            connection.execute(text("delete from alerts"))
        insert_alerts(engine, [random_alert(rnd, n) for n in range(rnd.randrange(50, 400))])
        with Session(engine) as session:
            for _ in range(8):
                now = T0 + timedelta(minutes=rnd.randrange(-700, 700))
                limit = rnd.choice((1, 3, 10, 50, 500))
                found = due_alerts(session, now=now, limit=limit)
                expected = former_due_alerts(session, now=now, limit=limit, by_id=True)
                context = f"seed {seed}, now {now}, limit {limit}"
                assert [r.alert_id for r in found] == [r.alert_id for r in expected], context
                # And the same creation times, in the same order, as the former query verbatim.
                verbatim = former_due_alerts(session, now=now, limit=limit, by_id=False)
                assert [r.created_at for r in found] == [r.created_at for r in verbatim], context


def test_an_alert_with_both_deadlines_missed_is_found_once(engine: Engine) -> None:
    past = T0 - timedelta(hours=1)
    insert_alerts(engine, [
        alert_row(1, created_at=T0 + timedelta(seconds=1), ack_due_at=past, act_due_at=past),
        alert_row(2, created_at=T0, act_due_at=past, acknowledged_at=past),
        alert_row(3, created_at=T0 + timedelta(seconds=2), ack_due_at=T0 + timedelta(hours=1)),  # not yet
    ])
    with Session(engine) as session:
        assert [r.alert_id for r in due_alerts(session, now=T0)] == ["al-00002", "al-00001"]
        assert [r.alert_id for r in due_alerts(session, now=T0, limit=1)] == ["al-00002"]


def sent_statement(engine: Engine, now: datetime) -> tuple[str, Any]:
    sent = sent_statements(engine, lambda session: due_alerts(session, now=now))
    assert len(sent) == 1
    return sent[0]


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)
def test_on_sqlite_the_sweep_reads_only_due_entries_of_the_partial_indexes(engine: Engine) -> None:
    # A store where most alerts have no deadline or met it, analysed, as a store in service is.
    rnd = random.Random(8)
    rows = []
    for n in range(3000):
        routed = rnd.random() < 0.4
        acknowledged = routed and rnd.random() < 0.7
        rows.append(alert_row(
            n, created_at=T0 - timedelta(minutes=n), action="alert" if routed else "record",
            ack_due_at=T0 + timedelta(hours=1) if routed and not acknowledged else None,
            act_due_at=T0 + timedelta(days=1) if routed else None,
            acknowledged_at=T0 if acknowledged else None,
            status=rnd.choice(("open", "closed")),
        ))
    insert_alerts(engine, rows)
    with engine.begin() as connection:
        connection.execute(text("analyze"))
    statement, parameters = sent_statement(engine, T0)
    with engine.connect() as connection:
        plan = [row[-1] for row in connection.exec_driver_sql("explain query plan " + statement, parameters)]
    shown = "\n".join(plan)
    searches = [step for step in plan if step.startswith(("SCAN alerts", "SEARCH alerts"))]
    # Each deadline through its index, by due time; the rows they find by primary key; nothing else.
    assert any(step.startswith("SEARCH alerts USING INDEX ix_alerts_ack_pending (ack_due_at") for step in searches), shown
    assert any(step.startswith("SEARCH alerts USING INDEX ix_alerts_act_pending (act_due_at") for step in searches), shown
    assert all("_pending (" in step or "(alert_id=?)" in step for step in searches), shown
    assert "created_at" not in " ".join(searches), shown
