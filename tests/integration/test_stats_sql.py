"""compute_stats returns exactly compute_stats_reference's rows on SQLite and PostgreSQL.

The random stores of tests/unit/test_stats_sql.py (sub-millisecond edges, week boundaries,
clock skew, empty suppressed_by...), loaded the way the service writes them. On PostgreSQL
the session runs at UTC+14, so a database-side date function that used the session's time
zone would move late-Sunday alerts into the next week and fail this.
"""

from __future__ import annotations

import time

import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.stats import GroupBy, compute_stats, compute_stats_reference
from tests.unit.test_stats_sql import HOLDOUTS, as_rows, assert_same_stats, load, random_alerts


@pytest.mark.parametrize("seed", [11, 12])
def test_sql_stats_equal_the_reference_tally(engine: Engine, seed: int) -> None:
    load(engine, random_alerts(seed, 500))
    with Session(engine) as session:
        if engine.dialect.name == "postgresql":
            session.execute(text("set time zone 'Pacific/Kiritimati'"))
        assert_same_stats(session, seed)
        weeks = compute_stats(session, by=GroupBy.WEEK, holdouts=HOLDOUTS)
    assert [w.key for w in weeks] == ["2026-W47", "2026-W48", "2026-W49", "2026-W50"][: len(weeks)]
    assert sum(w.routed for w in weeks) > 200


@pytest.mark.postgres
def test_postgres_counts_read_the_stats_index_and_leave_the_session_as_it_was(pg_engine: Engine) -> None:
    # The counts query turns sequential scans off for itself (an index-only scan in GROUP BY order is
    # about twice as fast; the planner rates them the same): the plan must use the index, and the
    # caller's transaction must get its own setting back.
    load(pg_engine, random_alerts(5, 200))
    # What autovacuum does: index-only scans need the pages marked all-visible, which a VACUUM cannot do
    # while another session of the database (another test run) holds an older snapshot: try again.
    with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        for _ in range(100):
            connection.execute(text("vacuum analyze alerts"))
            if connection.execute(text("select relallvisible = relpages from pg_class where oid = 'alerts'::regclass"
                                       )).scalar():
                break
            time.sleep(0.1)
    plans: list[str] = []

    def explain(conn, cursor, statement, parameters, context, executemany):
        if statement.startswith("SELECT alerts.owner") and "GROUP BY" in statement:
            raw = conn.connection.driver_connection
            plans.extend(row[0] for row in raw.execute(f"EXPLAIN {statement}", parameters))

    event.listen(pg_engine, "before_cursor_execute", explain)
    with Session(pg_engine) as session:
        session.execute(text("set local enable_seqscan = on"))
        # Not by rule: by rule over every alert, the counts are PostgreSQL's tallies (test_tallies.py).
        compute_stats(session, by=GroupBy.OWNER)
        assert session.execute(text("select current_setting('enable_seqscan')")).scalar() == "on"
    assert any("Index Only Scan using ix_alerts_stats_tally" in line for line in plans), plans


@pytest.mark.postgres
def test_postgres_walks_to_the_ranks_match_the_rank_indexes(pg_engine: Engine) -> None:
    # By rule over everything, medians and p90s are read at their ranks from ix_alerts_stats_{ack,act}_rank_pg.
    # On a table this small the planner may rightly prefer a scan and a sort; with scans off, what this checks
    # is that the walk's expression and predicate match the indexes: ordered index-only scans, no sort.
    load(pg_engine, random_alerts(8, 200))
    with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("vacuum analyze alerts"))
    plans: list[str] = []

    def explain(conn, cursor, statement, parameters, context, executemany):
        if "unnest(" in statement:
            raw = conn.connection.driver_connection
            raw.execute("set local enable_seqscan = off")
            raw.execute("set local enable_bitmapscan = off")
            plans.append("\n".join(row[0] for row in raw.execute(f"EXPLAIN {statement}", parameters)))

    event.listen(pg_engine, "before_cursor_execute", explain)
    with Session(pg_engine) as session:
        compute_stats(session, by=GroupBy.RULE)
    assert len(plans) == 2, plans
    for plan, name in zip(plans, ("ack", "act"), strict=False):
        assert f"Index Only Scan using ix_alerts_stats_{name}_rank_pg" in plan, plan
        assert f"Index Only Scan Backward using ix_alerts_stats_{name}_rank_pg" in plan, plan
        assert "Sort" not in plan, plan


def test_ranked_stats_read_one_snapshot_while_the_store_changes(engine: Engine) -> None:
    # By rule over everything, the counts and the walks to the ranks are two statements. Another
    # connection clearing some acks in between must not shift the ranks: the rows are the store's as
    # it was at the first read, exactly (PostgreSQL: the reads share a REPEATABLE READ transaction).
    load(engine, random_alerts(9, 300))
    with Session(engine) as session:
        before = compute_stats_reference(session, by=GroupBy.RULE, holdouts=HOLDOUTS)

    fired = []

    def clear_acks(conn, cursor, statement, parameters, context, executemany):
        if "group by" in statement.lower():  # the counts (PostgreSQL: the tallies)
            fired.append(statement)
            with engine.connect() as other:  # another connection of the pool: another session
                other.execute(text("UPDATE alerts SET acknowledged_at = NULL WHERE alert_id LIKE '%0' "
                                   "OR alert_id LIKE '%3' OR alert_id LIKE '%6'"))
                other.commit()

    event.listen(engine, "after_cursor_execute", clear_acks)
    try:
        with Session(engine) as session:
            got = compute_stats(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
    finally:
        event.remove(engine, "after_cursor_execute", clear_acks)
    assert fired
    assert as_rows(got, GroupBy.RULE) == as_rows(before, GroupBy.RULE)
    with Session(engine) as session:  # and the change did happen
        after = compute_stats_reference(session, by=GroupBy.RULE, holdouts=HOLDOUTS)
    assert as_rows(after, GroupBy.RULE) != as_rows(before, GroupBy.RULE)
