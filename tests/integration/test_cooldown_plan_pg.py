"""The cooldown read of a batch (tracker.cooldown_holders) on PostgreSQL looks up each of the batch's
entities through ix_alerts_entity (entity, rule, time), even before the table has statistics (a new
store, before its first ANALYZE, or autovacuum off): as one IN list of entities, the planner combined the
rule and created_at indexes for more than ~20 entities and read every alert of the rule in the window
(5-12 ms a batch at 20,000-40,000 alerts; issue 8)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import event, text
from sqlmodel import Session

from decision_router import tracker
from decision_router.tables import AlertRecord
from tests.unit.test_cooldown_plan import NOW, _alert

pytestmark = pytest.mark.postgres


def test_the_cooldown_read_goes_through_the_entities_without_statistics(pg_engine) -> None:  # noqa: ANN001
    rows = [_alert(n, rule="churn-high", entity=f"other-{n}", minutes_ago=n % 50) for n in range(20_000)]
    rows += [_alert(9_000_001, rule="churn-high", entity="a", minutes_ago=30),
             _alert(9_000_002, rule="churn-high", entity="b", minutes_ago=120),  # before the window
             _alert(9_000_003, rule="other-rule", entity="c", minutes_ago=5),  # another rule
             _alert(9_000_004, rule="churn-high", entity="d", minutes_ago=20, suppressed_by="al-x")]  # not a holder
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ARG001
        if "from alerts" in statement.lower():
            statements.append((statement, parameters))

    with Session(pg_engine) as session:
        tracker.bulk_insert(session, AlertRecord.__table__, rows)  # type: ignore[attr-defined]
        session.commit()
        analyzed = session.execute(text(
            "select coalesce(last_analyze, last_autoanalyze) from pg_stat_user_tables "
            "where relid = to_regclass('alerts')")).scalar()
        assert analyzed is None  # what this is about: no statistics yet
        event.listen(pg_engine, "before_cursor_execute", capture)
        # A full batch's worth of entities (the IN list's plan changed past ~20); most have no alert.
        entities = ["a", "b", "c", "d", *(f"new-{n}" for n in range(300))]
        wanted = {("churn-high", "account", entity) for entity in entities}
        found = tracker.cooldown_holders(session, wanted, since={"churn-high": NOW - timedelta(hours=1)})
        event.remove(pg_engine, "before_cursor_execute", capture)
        assert found == {("churn-high", "account", "a"): "al-9000001"}
        [(statement, parameters)] = statements
        cursor = session.connection().connection.dbapi_connection.cursor()
        cursor.execute(f"EXPLAIN {statement}", parameters)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "ix_alerts_entity " in plan, plan
    assert "ix_alerts_rule" not in plan and "ix_alerts_created_at" not in plan, plan
    assert "Seq Scan on alerts" not in plan, plan
