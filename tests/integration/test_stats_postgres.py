"""The stats give the same numbers on PostgreSQL as on SQLite.

Week keys and medians/p90 are computed in Python from rows, so neither the database's
date functions nor its session time zone can move an alert to another week. The PostgreSQL
session here runs at UTC+14 to prove it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.stats import GroupBy, compute_model_precision, compute_quality, compute_stats
from decision_router.store import create_schema, make_engine
from tests.unit.test_stats import HOLDOUTS, alert, known_records
from tests.unit.test_stats_model import control_records, precision_after_interventions
from tests.unit.test_stats_quality import quality_records

pytestmark = pytest.mark.postgres

# Sunday 23:30 UTC is still ISO week 48; at UTC+14 it is Monday of week 49.
LATE_SUNDAY = datetime(2026, 11, 29, 23, 30, tzinfo=UTC)


def records() -> list:
    late = alert(900, rule="late", owner="dave", model="retention", created=LATE_SUNDAY, priority="normal",
                 ack_after_s=45, act_after_s=7200, outcome="success")
    return [*known_records(), *quality_records(), *control_records(), late]


def load(engine: Engine) -> None:
    with Session(engine) as session:
        session.add_all(records())
        session.commit()


@pytest.fixture
def sqlite_engine(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'stats.db'}")
    create_schema(engine)
    load(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_loaded(pg_engine: Engine) -> Engine:
    load(pg_engine)
    return pg_engine


def far_east(session: Session) -> Session:
    session.execute(text("set time zone 'Pacific/Kiritimati'"))
    assert session.execute(text("show timezone")).scalar() == "Pacific/Kiritimati"
    return session


def test_stats_are_identical_on_both_databases(sqlite_engine: Engine, pg_loaded: Engine) -> None:
    with Session(sqlite_engine) as lite, Session(pg_loaded) as pg:
        far_east(pg)
        for by in GroupBy:
            expected = compute_stats(lite, by=by, holdouts=HOLDOUTS)
            got = compute_stats(pg, by=by, holdouts=HOLDOUTS)
            assert len(got) > 1, by
            assert [row.as_dict(by) for row in got] == [row.as_dict(by) for row in expected], by


def test_known_numbers_on_postgres(pg_loaded: Engine) -> None:
    with Session(pg_loaded) as pg:
        far_east(pg)
        (watch,) = compute_stats(pg, by=GroupBy.RULE, rule="watch", holdouts=HOLDOUTS)
        weeks = compute_stats(pg, by=GroupBy.WEEK, model="retention")
        (late,) = compute_stats(pg, by=GroupBy.RULE, rule="late")
        (skewed,) = compute_stats(pg, by=GroupBy.RULE, rule="skewed", holdouts=HOLDOUTS)
    assert watch.uplift == pytest.approx(0.10)
    assert (watch.uplift_ci_low, watch.uplift_ci_high) == pytest.approx((-0.0775, 0.2714), abs=5e-5)
    assert (watch.median_time_to_ack_s, watch.p90_time_to_ack_s) == (630.0, 1080.0)
    assert (watch.median_time_to_act_s, watch.p90_time_to_act_s) == (3300.0, 5400.0)
    # the late-Sunday alert is counted in week 48 (UTC), whatever the session's time zone
    assert [(w.key, w.routed) for w in weeks] == [("2026-W48", 20 + 40 + 1160 + 1), ("2026-W49", 20)]
    assert (late.median_time_to_ack_s, late.p90_time_to_act_s) == (45.0, 7200.0)
    assert skewed.srm_mismatch is True and skewed.srm_observed_fraction == pytest.approx(0.4)


def test_quality_and_model_reports_are_identical(sqlite_engine: Engine, pg_loaded: Engine) -> None:
    with Session(sqlite_engine) as lite, Session(pg_loaded) as pg:
        far_east(pg)
        assert compute_quality(pg) == compute_quality(lite)
        assert compute_quality(pg).models[0].model == "upsell"
        precision = compute_model_precision(pg, model="attrition")
        assert precision == compute_model_precision(lite, model="attrition")
    top = [r for r in precision if r.model_version == "1" and r.band_low == 0.8]
    assert [(r.held_out, r.n, r.positives) for r in top] == [(12, 11, 8)]  # none of those intervened on
    acknowledged = [r for r in precision if r.model_version == "2" and r.band_low == 0.9]
    assert [(r.held_out, r.n, r.positives) for r in acknowledged] == [(1, 1, 1)]


def test_controls_intervened_on_through_the_tracker_are_left_out(tmp_path: Path, pg_engine: Engine) -> None:
    lite = make_engine(f"sqlite:///{tmp_path / 'tracked.db'}")
    create_schema(lite)
    try:
        on_sqlite = precision_after_interventions(lite)
    finally:
        lite.dispose()
    on_postgres = precision_after_interventions(pg_engine)
    assert on_postgres == on_sqlite
    assert on_postgres[(0.8, 0.9)] == (2, 2, 2, 1.0)  # intervened on by entity and by prediction_id: out
