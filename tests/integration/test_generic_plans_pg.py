"""The batch's reads by key on PostgreSQL (cooldowns.holders' open windows, tracker.known_predictions)
look each key up through the primary key, whatever plan PostgreSQL keeps for them. psycopg prepares
a statement run 5 times, and PostgreSQL may then keep one generic plan for it. Made while the table
was new and small, the former IN lists' plan read the whole table, and went on doing so as it grew:
no ANALYZE invalidates it with autovacuum off. The open windows' read went from 0.5 to 8 ms a batch
over 10,000 windows (issue 8)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import text
from sqlmodel import Session

from decision_router import cooldowns, tracker
from decision_router.tables import CooldownRecord, PredictionRecord
from tests.unit.test_cooldown_plan import NOW

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
    """Run `read` until psycopg has prepared it, under the generic plan PostgreSQL may settle on."""
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
        rows = [_window(f"other-{n}", ends_in=timedelta(minutes=n % 50 - 25), alert_id=f"al-{n}") for n in range(20_000)]
        rows += [_window("a", ends_in=timedelta(minutes=5), alert_id="al-a"),  # open: holds a's window
                 _window("b", ends_in=timedelta(minutes=-5), alert_id="al-b")]  # ended
        tracker.bulk_insert(session, CooldownRecord.__table__, rows)  # type: ignore[attr-defined]
        found: dict = {}
        seq, idx = _scans_of(session, "cooldowns",
                             lambda: found.update(cooldowns.holders(session, wanted, since=since, now=NOW)))
        session.rollback()
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
        session.rollback()
    assert found == {"p-5": "5-0", "p-19999": "19999-0"}
    assert seq == 0 and idx > 0, (seq, idx)
