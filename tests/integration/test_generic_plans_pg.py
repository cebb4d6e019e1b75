"""The batch's reads and writes by key on PostgreSQL keep to their indexes however the tables grow.

psycopg prepares a statement it has run 5 times, and PostgreSQL may then keep one generic plan for
it, made while a table was new and small and kept as it grows: only an ANALYZE replaces it (never,
with autovacuum off). The open cooldown windows' read, as IN lists, then read the whole table: 0.5 ->
8 ms a batch over 10,000 windows (issue 8). So the store's engine prepares nothing (each statement is
planned as it runs), and the open windows and known prediction ids are read key by key: an index
lookup even under a generic plan made on a small table without statistics (not with the statistics of
a small table: there the engine's preparing nothing is what holds)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlmodel import Session

from decision_router import cooldowns, tracker
from decision_router.contracts import Rejection, RejectionReason
from decision_router.store import make_engine
from decision_router.tables import AlertRecord, CooldownRecord, PredictionRecord
from tests.unit.test_cooldown_plan import NOW, _alert

pytestmark = pytest.mark.postgres

RULE = "churn-high"
# Table sizes when the plan is made: with the IN lists, a generic plan read the whole table from
# some of them (PostgreSQL 15 here), not from all: which ones depends on its cost estimates.
FIRST_ROWS = [0, 50, 150, 300, 600, 1200]


def _window(entity: str, *, ends_in: timedelta, alert_id: str) -> dict:
    return {"entity_id": entity, "entity_type": "account", "rule": RULE, "alert_id": alert_id,
            "started_at": NOW - timedelta(hours=1), "ends_at": NOW + ends_in}


def _prediction(n: int) -> dict:
    return {"prediction_id": f"p-{n}", "stream_id": f"{n}-0", "model": "churn", "model_version": "1",
            "entity_type": "account", "entity_id": f"e-{n}", "score": 0.5, "predicted_at": NOW, "received_at": NOW,
            "rules_version": "v", "document": {"n": n}}


def _scans_of(session: Session, table: str, read: Callable[[], object]) -> tuple[int, int]:
    """(sequential scans, index scans) of `table` that `read` made, in this transaction."""
    scans = text("select seq_scan, idx_scan from pg_stat_xact_user_tables where relid = to_regclass(:table)")
    seq_before, idx_before = session.execute(scans, {"table": table}).one()
    read()
    seq_after, idx_after = session.execute(scans, {"table": table}).one()
    return seq_after - seq_before, idx_after - idx_before


def _with_a_plan_made_at(session: Session, name: str, read: Callable[[], object]) -> None:
    """Run `read` until psycopg has prepared it (as it would by default, after 5 runs), under the
    generic plan PostgreSQL may settle on."""
    session.connection().connection.dbapi_connection.prepare_threshold = 5  # the engine's is None
    session.execute(text("set local plan_cache_mode = force_generic_plan"))  # until the rollback
    for _ in range(6):
        read()
    prepared = session.execute(text("select name from pg_prepared_statements where statement ilike :like"),
                               {"like": f"%from {name}%"}).scalars().all()
    assert len(prepared) == 1, prepared  # prepared: its plan is the cached one from now on


@pytest.mark.parametrize("first_rows", FIRST_ROWS)
def test_the_open_windows_read_keeps_to_the_primary_key(pg_engine, first_rows: int) -> None:  # noqa: ANN001
    wanted = {(RULE, "account", entity) for entity in ["a", "b", *(f"new-{n}" for n in range(14))]}
    since = {RULE: NOW - timedelta(hours=1)}
    with Session(pg_engine) as session:
        tracker.bulk_insert(session, CooldownRecord.__table__, [  # type: ignore[attr-defined]
            _window(f"first-{n}", ends_in=timedelta(minutes=5), alert_id=f"al-first-{n}") for n in range(first_rows)])
        _with_a_plan_made_at(session, "cooldowns", lambda: cooldowns.holders(session, wanted, since=since, now=NOW))
        rows = [_window(f"other-{n}", ends_in=timedelta(minutes=n % 50 - 25), alert_id=f"al-{n}")
                for n in range(20_000)]
        rows += [_window("a", ends_in=timedelta(minutes=5), alert_id="al-a"),  # open: holds a's window
                 _window("b", ends_in=timedelta(minutes=-5), alert_id="al-b")]  # ended
        tracker.bulk_insert(session, CooldownRecord.__table__, rows)  # type: ignore[attr-defined]
        found: dict = {}
        seq, idx = _scans_of(session, "cooldowns",
                             lambda: found.update(cooldowns.holders(session, wanted, since=since, now=NOW)))
        session.rollback()  # psycopg deallocates what it prepared; the engine is this test's alone
    assert found == {(RULE, "account", "a"): "al-a"}
    assert seq == 0 and idx > 0, (seq, idx)  # never the whole table


@pytest.mark.parametrize("first_rows", FIRST_ROWS)
def test_the_known_predictions_read_keeps_to_the_primary_key(pg_engine, first_rows: int) -> None:  # noqa: ANN001
    ids = [f"p-new-{n}" for n in range(40)]
    with Session(pg_engine) as session:
        tracker.bulk_insert(session, PredictionRecord.__table__,  # type: ignore[attr-defined]
                            [_prediction(-1 - n) for n in range(first_rows)])
        _with_a_plan_made_at(session, "predictions", lambda: tracker.known_predictions(session, ids))
        tracker.bulk_insert(session, PredictionRecord.__table__,  # type: ignore[attr-defined]
                            [_prediction(n) for n in range(20_000)])
        found: dict = {}
        seq, idx = _scans_of(session, "predictions",
                             # As many ids as before: an IN list of another length was another statement.
                             lambda: found.update(tracker.known_predictions(session, [*ids[2:], "p-5", "p-19999"])))
        session.rollback()  # psycopg deallocates what it prepared; the engine is this test's alone
    assert found == {"p-5": "5-0", "p-19999": "19999-0"}
    assert seq == 0 and idx > 0, (seq, idx)


def _batch_statements(session: Session, n: int, *, redelivered: bool = True) -> None:
    """What a batch runs by key: the open windows and earlier alerts of its cooldowns, its known ids,
    marking its alerts delivered, and (entries redelivered) reading their undelivered alerts back."""
    wanted = {(RULE, "account", f"e-{n}-{k}") for k in range(40)}
    cooldowns.holders(session, wanted, since={RULE: NOW - timedelta(hours=1)}, now=NOW)
    tracker.known_predictions(session, [f"p-{n}-{k}" for k in range(40)])
    tracker.mark_delivered(session, {f"al-{n}-{k}": "am" for k in range(20)}, channel="inbox", now=NOW)
    if redelivered:
        tracker.undelivered_alerts(session, prediction_ids=[f"p-{n}-{k}" for k in range(20)])


def test_the_store_engine_prepares_nothing(pg_engine) -> None:  # noqa: ANN001
    with Session(pg_engine) as session:
        for n in range(8):
            _batch_statements(session, n)
        prepared = session.execute(text("select statement from pg_prepared_statements")).scalars().all()
    assert prepared == []


@pytest.mark.parametrize("analyzed", [False, True])
def test_as_the_tables_grow_a_batch_still_reads_them_by_key(pg_engine, analyzed: bool) -> None:  # noqa: ANN001
    """Each statement planned at its run, from the table's size then: without statistics, and with
    those of one ANALYZE of a new store (an operator's; autovacuum off), from which a generic plan
    read the tables once per key, or whole, once they had grown (found by review)."""
    with Session(pg_engine) as session:
        tracker.bulk_insert(session, CooldownRecord.__table__, [  # type: ignore[attr-defined]
            _window(f"first-{n}", ends_in=timedelta(minutes=5), alert_id=f"al-first-{n}") for n in range(50)])
        tracker.bulk_insert(session, PredictionRecord.__table__,  # type: ignore[attr-defined]
                            [_prediction(-1 - n) for n in range(50)])
        session.commit()
        if analyzed:
            session.execute(text("analyze cooldowns, predictions, alerts"))
            session.commit()
        for n in range(12):
            _batch_statements(session, n)
        tracker.bulk_insert(session, CooldownRecord.__table__, [  # type: ignore[attr-defined]
            _window(f"other-{n}", ends_in=timedelta(minutes=5), alert_id=f"al-{n}") for n in range(20_000)])
        tracker.bulk_insert(session, PredictionRecord.__table__,  # type: ignore[attr-defined]
                            [_prediction(n) for n in range(20_000)])
        tracker.bulk_insert(session, AlertRecord.__table__, [  # type: ignore[attr-defined]
            _alert(n, rule=RULE, entity=f"other-{n}", minutes_ago=n % 50) for n in range(20_000)])
        session.commit()
        scans = text("select relname, seq_scan from pg_stat_xact_user_tables"
                     " where relname in ('alerts', 'cooldowns', 'predictions')")
        before = dict(session.execute(scans).all())
        # Not the undelivered alerts of a redelivery (rare: entries redelivered, reassignments):
        # without statistics, or with an empty table's, PostgreSQL's own estimates make its plan a
        # scan of the alerts at any table size; statistics are autovacuum's to keep.
        _batch_statements(session, 99, redelivered=False)
        after = dict(session.execute(scans).all())
    assert {table: after[table] - before[table] for table in after} == {"alerts": 0, "cooldowns": 0, "predictions": 0}


@pytest.mark.parametrize("analyzed", [False, True])
def test_a_batch_with_rejections_reads_the_rejections_by_stream_and_id(
    pg_engine, analyzed: bool  # noqa: ANN001
) -> None:
    """Counting each rejected entry once reads the rejections it may repeat through the unique index
    (stream, id); by id alone no index served, and every batch with a rejection read them all."""
    stream = "p:predictions"
    with Session(pg_engine) as session:
        session.execute(text("insert into rejections (source_stream, source_id, model, reason, detail, at)"
                             " select :stream, g || '-0', 'churn', 'schema', 'x', now()"
                             " from generate_series(1, 20000) g"),
                        {"stream": stream})
        session.commit()
        if analyzed:
            session.execute(text("analyze rejections"))
            session.commit()
        again = [Rejection(reason=RejectionReason.SCHEMA, detail="x", source_stream=stream, source_id=f"{n}-0",
                           model="churn", payload="{}") for n in (5, 20001, 20002)]
        again.append(again[0].model_copy(update={"source_stream": "p:outcomes"}))  # another stream's entry 5-0
        seq, idx = _scans_of(session, "rejections", lambda: tracker.record_rejections(session, again, now=NOW))
        session.commit()
        stored = session.execute(text("select source_stream, source_id from rejections where source_id in"
                                      " ('5-0', '20001-0', '20002-0') order by 1, 2")).all()
    assert seq == 0 and idx > 0, (seq, idx)
    assert [tuple(row) for row in stored] == [
        ("p:outcomes", "5-0"), (stream, "20001-0"), (stream, "20002-0"), (stream, "5-0")]


def test_the_caller_may_still_choose_to_prepare(postgres_server: str) -> None:
    def threshold(engine) -> object:  # noqa: ANN001
        with engine.connect() as connection:
            value = connection.connection.dbapi_connection.prepare_threshold
        engine.dispose()
        return value

    assert threshold(make_engine(postgres_server)) is None
    assert threshold(make_engine(postgres_server, connect_args={"prepare_threshold": 3})) == 3
