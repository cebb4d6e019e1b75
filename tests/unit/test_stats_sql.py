"""compute_stats (counts and quantiles in SQL) returns exactly what compute_stats_reference
(the former load-every-row Python tally, kept as the definition) returns, on SQLite.

The stores are random but seeded, and lean on the edges: fractions of a second that round
up in SQLite's own date functions (.9996 s), Sunday 23:59:59.9999 against Monday 00:00,
empty-string `suppressed_by`, acks before creation (clock skew), even and odd counts for
medians, groups of one, outcomes other than success/failure, model names with spaces.
The same stores on both databases: tests/integration/test_stats_sql.py.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.stats import GroupBy, StatsRow, compute_stats, compute_stats_reference
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord

START = datetime(2026, 11, 16, 0, 0, tzinfo=UTC)  # a Monday; the stores span three ISO weeks
RULES = ("churn", "fraud", "upsell", "watch", "quiet")
OWNERS = ("alice", "bob", "carol")
# Spaces too. (Not both ("up sell", "v 2") and ("up", "sell v 2"): by model_version those share the
# key "up sell v 2", and the reference then names the row after whichever record it read last.)
MODELS = (("churn", "1"), ("churn", "2"), ("fraud", "1"), ("up sell", "v 2"))
HOLDOUTS = {"watch": 0.5, "upsell": 0.1, "fraud": 0.0}
# Microseconds that sit on SQLite's millisecond rounding: .9996 s rounds to the next second there.
AWKWARD_MICROS = (0, 1, 499, 500, 999_499, 999_500, 999_600, 999_999)


def _moment(rnd: random.Random) -> datetime:
    if rnd.random() < 0.15:  # the last instant of a Sunday, or midnight of a Monday
        sunday_end = START + timedelta(days=7 * rnd.randrange(3) + 6, hours=23, minutes=59, seconds=59)
        return sunday_end + timedelta(microseconds=rnd.choice(AWKWARD_MICROS) if rnd.random() < 0.5 else 1_000_000)
    return START + timedelta(seconds=rnd.randrange(21 * 86400), microseconds=rnd.choice(
        AWKWARD_MICROS + (rnd.randrange(1_000_000),)))


def _delay(rnd: random.Random) -> timedelta:
    if rnd.random() < 0.05:
        return -timedelta(seconds=rnd.randrange(1, 90), microseconds=rnd.choice(AWKWARD_MICROS))  # clock skew
    seconds = rnd.choice((0, 1, 59, 3600, 86_399, 86_400, 3 * 86_400, rnd.randrange(200_000)))
    return timedelta(seconds=seconds, microseconds=rnd.choice(AWKWARD_MICROS + (rnd.randrange(1_000_000),)))


def random_alerts(seed: int, n: int) -> list[AlertRecord]:
    """`n` decisions of every kind: routed (acked, acted, escalated, breached), recorded, held out, suppressed."""
    rnd = random.Random(seed)
    rows = []
    for i in range(n):
        created = _moment(rnd)
        rule = rnd.choice(RULES)
        model, version = rnd.choice(MODELS)
        kind = rnd.choices(("alert", "record", "held", "suppressed"), (6, 2, 2, 1))[0]
        acked = kind != "suppressed" and rnd.random() < (0.7 if kind == "alert" else 0.1)
        acted = acked and rnd.random() < 0.6
        ack_at = created + _delay(rnd) if acked else None
        act_at = (ack_at or created) + _delay(rnd) if acted else None
        rows.append(AlertRecord(
            alert_id=f"al-{seed}-{i}", prediction_id=f"p-{seed}-{i}", rule=rule, owner=rnd.choice(OWNERS),
            original_owner="alice", owner_source="static", priority=rnd.choice(("high", "normal", "low")),
            action="record" if kind == "record" or (kind == "held" and rnd.random() < 0.3) else "alert",
            model=model, model_version=version, entity_type="account", entity_id=f"a{i}", score=rnd.random(),
            rules_version="v", predicted_at=created, created_at=created, ack_by=created + timedelta(hours=4),
            act_by=created + timedelta(days=2), acknowledged_at=ack_at, intervened_at=act_at,
            outcome=rnd.choices((None, "success", "failure", "unknown"), (4, 3, 3, 1))[0],
            held_out=kind == "held",
            # A cooldown names the alert it repeats; "" is not a suppression (the reference's `if r.suppressed_by`).
            suppressed_by=f"al-{seed}-0" if kind == "suppressed" else ("" if rnd.random() < 0.05 else None),
            escalation_level=rnd.choice((0, 0, 0, 1, 2)),
            ack_breached_at=created + timedelta(hours=4) if rnd.random() < 0.1 else None,
            act_breached_at=created + timedelta(days=2) if rnd.random() < 0.1 else None,
        ))
    return rows


def queries(seed: int) -> list[dict]:
    """Every grouping, unfiltered and with each filter, the windows cutting through the data."""
    rnd = random.Random(seed)
    cut = START + timedelta(days=rnd.randrange(1, 20), microseconds=rnd.choice(AWKWARD_MICROS))
    variants: list[dict] = [
        {}, {"holdouts": HOLDOUTS}, {"since": cut}, {"until": cut}, {"since": START + timedelta(days=2), "until": cut},
        {"rule": "watch", "holdouts": HOLDOUTS}, {"owner": "bob"}, {"model": "churn"}, {"model": "up sell"},
        {"rule": "nothing-matches"}, {"min_n": 1, "planned_n": 50, "holdouts": HOLDOUTS},
    ]
    return [{"by": by, **variant} for by in GroupBy for variant in variants]


def as_rows(rows: list[StatsRow], by: GroupBy) -> list[tuple]:
    # as_dict carries the group columns, which StatsRow's own == leaves out.
    return [(row.key, row.group, row.as_dict(by)) for row in rows]


def assert_same_stats(session: Session, seed: int) -> None:
    for query in queries(seed):
        expected = compute_stats_reference(session, **query)
        got = compute_stats(session, **query)
        assert as_rows(got, query["by"]) == as_rows(expected, query["by"]), query


def load(engine: Engine, alerts: list[AlertRecord]) -> None:
    with Session(engine) as session:
        session.add_all(alerts)
        session.commit()


@pytest.fixture
def engine(tmp_path) -> Engine:
    store = make_engine(f"sqlite:///{tmp_path / 'stats.db'}")
    create_schema(store)
    yield store
    store.dispose()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sql_stats_equal_the_reference_tally(engine: Engine, seed: int) -> None:
    alerts = random_alerts(seed, 600)
    load(engine, alerts)
    with Session(engine) as session:
        assert_same_stats(session, seed)
        # The store is rich enough to mean something: every kind of decision and time shows up.
        (total,) = compute_stats(session, by=GroupBy.RULE, rule="watch", holdouts=HOLDOUTS)
        assert total.routed and total.held_out and total.suppressed and total.recorded
        assert total.p90_time_to_ack_s is not None and total.median_time_to_act_s is not None
        assert total.srm_expected_fraction == 0.5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), n=st.integers(0, 40))
def test_small_stores_equal_the_reference_tally(seed: int, n: int) -> None:
    # Small stores hit the edges of medians and ranks: no times, one time, two, odd and even counts.
    store = make_engine("sqlite://")
    create_schema(store)
    try:
        load(store, random_alerts(seed, n))
        with Session(store) as session:
            for by in GroupBy:
                for extra in ({}, {"holdouts": HOLDOUTS, "min_n": 1}):
                    expected = compute_stats_reference(session, by=by, **extra)
                    assert as_rows(compute_stats(session, by=by, **extra), by) == as_rows(expected, by)
    finally:
        store.dispose()


def test_times_are_exact_where_sqlite_would_round(engine: Engine) -> None:
    # 09:00:00.999600 -> 09:00:01.999500 is 0.9999 s; SQLite's date functions read both as the next
    # millisecond, and strftime('%s') of the first as 09:00:01. The stats must say 0.9999.
    created = datetime(2026, 11, 22, 23, 59, 59, 999_600, tzinfo=UTC)  # Sunday, ISO week 47
    alert = random_alerts(0, 1)[0]
    alert.rule, alert.action, alert.held_out, alert.suppressed_by = "exact", "alert", False, None
    alert.created_at = created
    alert.acknowledged_at = created + timedelta(microseconds=999_900)
    alert.intervened_at = created + timedelta(days=1, microseconds=-1)
    load(engine, [alert])
    with Session(engine) as session:
        (row,) = compute_stats(session, by=GroupBy.RULE)
        (week,) = compute_stats(session, by=GroupBy.WEEK)
    assert (row.median_time_to_ack_s, row.p90_time_to_ack_s) == (0.9999, 0.9999)
    assert row.median_time_to_act_s == 86_399.999999
    assert week.key == "2026-W47"


@pytest.mark.parametrize("window", [{}, {"since": START + timedelta(days=3)}], ids=["ranked", "window"])
def test_sqlite_reads_the_stats_index_not_the_table(engine: Engine, window: dict) -> None:
    # Speed is the benchmark's business (benchmarks/bench_stats.py); this only checks the plan it
    # relies on: the query is answered from ix_alerts_stats_kind, with how each alert counts and its
    # times read from the index, for the ranked path (by rule, everything) and the general one.
    load(engine, random_alerts(4, 50))
    plans: list[str] = []
    opcodes: list[str] = []

    def explain(conn, cursor, statement, parameters, context, executemany):
        if "FROM alerts" in statement and "GROUP BY" in statement:
            raw = conn.connection.driver_connection
            plans.extend(str(row[-1]) for row in raw.execute(f"EXPLAIN QUERY PLAN {statement}", parameters))
            opcodes.extend(row[1] for row in raw.execute(f"EXPLAIN {statement}", parameters))

    event.listen(engine, "before_cursor_execute", explain)
    with Session(engine) as session:
        compute_stats(session, by=GroupBy.RULE, **window)
    assert plans == ["SCAN alerts USING INDEX ix_alerts_stats_kind"], plans
    # No sorter (the index is in GROUP BY order) and no function run per row (the indexed values are read).
    assert "SorterOpen" not in opcodes and "Function" not in opcodes, opcodes


def test_sqlite_picks_medians_and_p90s_from_the_rank_indexes(engine: Engine) -> None:
    # By rule over everything, each rule's median and p90 are the rows at their ranks in
    # ix_alerts_stats_ack_rank / _act_rank: a walk in index order, no sort, no time computed per row.
    load(engine, random_alerts(6, 300))
    walks: list[str] = []
    used: set[str] = set()
    with Session(engine) as session:
        raw = session.connection().connection.driver_connection
        raw.set_trace_callback(lambda sql: walks.append(sql) if "LIMIT" in sql else None)
        compute_stats(session, by=GroupBy.RULE)
        raw.set_trace_callback(None)
        assert walks
        for sql in walks:
            (plan,) = [row[-1] for row in raw.execute(f"EXPLAIN QUERY PLAN {sql}")]
            assert plan in ("SEARCH alerts USING INDEX ix_alerts_stats_ack_rank (rule=?)",
                            "SEARCH alerts USING INDEX ix_alerts_stats_act_rank (rule=?)"), (plan, sql)
            opcodes = [row[1] for row in raw.execute(f"EXPLAIN {sql}")]
            assert "SorterOpen" not in opcodes and "Function" not in opcodes, (opcodes, sql)
            used.add(plan.split()[4])
    assert used == {"ix_alerts_stats_ack_rank", "ix_alerts_stats_act_rank"}


def test_sqlite_keeps_no_tallies(engine: Engine) -> None:
    # Its triggers would run per row in the router's process (tallies.py): the stats scan its index instead.
    from decision_router import tallies
    from decision_router.store import schema_is_current

    assert schema_is_current(engine)
    with engine.connect() as connection:
        assert not tallies.tallies_installed(connection)
        assert connection.execute(text("select count(*) from sqlite_master where type = 'trigger'")).scalar() == 0
    assert tallies.fold_tallies(engine, at_rows=0) == 0
