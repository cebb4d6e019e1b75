"""The cooldown read of a batch (tracker.cooldown_holders) on SQLite goes through the batch's
entities, not through every alert of the rule: the latter's cost grows with the store (51 ms a
batch at 60,000 predictions against 2 ms, issue 8)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import event
from sqlmodel import Session

from decision_router import tracker
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)


def _alert(n: int, *, rule: str, entity: str, minutes_ago: int, suppressed_by: str | None = None) -> dict:
    created = NOW - timedelta(minutes=minutes_ago)
    return {
        **tracker._ALERT_DEFAULTS,
        "alert_id": f"al-{n}", "prediction_id": f"p-{n}", "rule": rule, "owner": "am", "original_owner": "am",
        "owner_source": "static", "fallback_reason": None, "delegated_from": None, "priority": "high",
        "action": "alert", "model": "churn", "model_version": "1", "entity_type": "account", "entity_id": entity,
        "score": 0.9, "context": {}, "missing_context": [], "rules_version": "v", "predicted_at": created,
        "created_at": created, "ack_by": created, "act_by": created, "held_out": False,
        "suppressed_by": suppressed_by, "status": "suppressed" if suppressed_by else "open",
        "ack_due_at": None, "act_due_at": None,
    }


def test_the_cooldown_read_goes_through_the_batch_entities_and_finds_the_same_holders(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    # Many alerts of the cooldown rule for other entities: what an index led by rule would read.
    rows = [_alert(n, rule="churn-high", entity=f"other-{n}", minutes_ago=n % 50) for n in range(2000)]
    rows += [
        _alert(9001, rule="churn-high", entity="a", minutes_ago=30),  # holds a's window
        _alert(9002, rule="churn-high", entity="a", minutes_ago=10, suppressed_by="al-9001"),  # suppressed: not a holder
        _alert(9003, rule="churn-high", entity="b", minutes_ago=120),  # before the window
        _alert(9004, rule="other-rule", entity="b", minutes_ago=5),  # another rule
    ]
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ARG001
        if "FROM alerts" in statement:
            statements.append((statement, parameters))

    with Session(engine) as session:
        tracker.bulk_insert(session, AlertRecord.__table__, rows)  # type: ignore[attr-defined]
        session.commit()
        event.listen(engine, "before_cursor_execute", capture)
        wanted = {("churn-high", "account", "a"), ("churn-high", "account", "b")}
        found = tracker.cooldown_holders(session, wanted, since={"churn-high": NOW - timedelta(hours=1)})
        event.remove(engine, "before_cursor_execute", capture)
        assert found == {("churn-high", "account", "a"): "al-9001"}
        [(statement, parameters)] = statements
        plan = " ".join(row[3] for row in session.connection().exec_driver_sql(
            f"EXPLAIN QUERY PLAN {statement}", parameters))
    engine.dispose()
    assert "USING INDEX ix_alerts_entity_id (entity_id=?)" in plan, plan
    assert "stats" not in plan and "created_at" not in plan.replace("coalesce", ""), plan
