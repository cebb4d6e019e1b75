"""Counting each rejected entry once (tracker.record_rejections) reads the rejections it may repeat
through the unique index (stream, id) on SQLite: by id alone no index served, and every batch with a
rejection read the whole table. (PostgreSQL: tests/integration/test_generic_plans_pg.py.)"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import event, text
from sqlmodel import Session

from decision_router import tracker
from decision_router.contracts import Rejection, RejectionReason
from decision_router.store import create_schema, make_engine

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)


def test_the_rejections_are_read_by_stream_and_id(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    stream = "p:predictions"
    statements: list[tuple[str, object]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001, ARG001
        if statement.lstrip().upper().startswith("SELECT") and "FROM rejections" in statement:
            statements.append((statement, parameters))

    with Session(engine) as session:
        session.execute(text("with recursive g(n) as (select 1 union all select n + 1 from g where n < 2000)"
                             " insert into rejections (source_stream, source_id, model, reason, detail, at)"
                             " select :stream, n || '-0', 'churn', 'schema', 'x', '2026-11-26' from g"),
                        {"stream": stream})
        session.commit()
        again = [Rejection(reason=RejectionReason.SCHEMA, detail="x", source_stream=stream, source_id=f"{n}-0",
                           model="churn", payload="{}") for n in (5, 2001)]
        event.listen(engine, "before_cursor_execute", capture)
        tracker.record_rejections(session, again, now=NOW)
        event.remove(engine, "before_cursor_execute", capture)
        session.commit()
        assert session.execute(text("select count(*) from rejections")).scalar() == 2001  # 5-0 was counted already
        [(statement, parameters)] = statements
        plan = " ".join(row[3] for row in session.connection().exec_driver_sql(
            f"EXPLAIN QUERY PLAN {statement}", parameters))
    engine.dispose()
    assert "INDEX sqlite_autoindex_rejections_1 (source_stream=? AND source_id=?)" in plan, plan
