"""The cooldown read of a batch (tracker.cooldown_holders) on PostgreSQL goes through the batch's
entities even before the table has statistics (a new store, before autovacuum's first ANALYZE):
with an index on entity_id alone, the planner combined the rule and created_at indexes and read
every alert of the rule in the window (9 ms a batch at 40,000 alerts against 0.1 ms; issue 8)."""

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
             _alert(9_000_002, rule="churn-high", entity="b", minutes_ago=120)]
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ARG001
        if "FROM alerts" in statement:
            statements.append((statement, parameters))

    with Session(pg_engine) as session:
        tracker.bulk_insert(session, AlertRecord.__table__, rows)  # type: ignore[attr-defined]
        session.commit()
        analyzed = session.execute(text(
            "select coalesce(last_analyze, last_autoanalyze) from pg_stat_user_tables "
            "where relid = to_regclass('alerts')")).scalar()
        assert analyzed is None  # what this is about: no statistics yet
        event.listen(pg_engine, "before_cursor_execute", capture)
        wanted = {("churn-high", "account", "a"), ("churn-high", "account", "b")}
        found = tracker.cooldown_holders(session, wanted, since={"churn-high": NOW - timedelta(hours=1)})
        event.remove(pg_engine, "before_cursor_execute", capture)
        assert found == {("churn-high", "account", "a"): "al-9000001"}
        [(statement, parameters)] = statements
        cursor = session.connection().connection.dbapi_connection.cursor()
        cursor.execute(f"EXPLAIN {statement}", parameters)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "ix_alerts_entity " in plan, plan
    assert "ix_alerts_rule" not in plan and "ix_alerts_created_at" not in plan, plan
