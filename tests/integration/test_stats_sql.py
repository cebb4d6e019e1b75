"""compute_stats returns exactly compute_stats_reference's rows on SQLite and PostgreSQL.

The random stores of tests/unit/test_stats_sql.py (sub-millisecond edges, week boundaries,
clock skew, empty suppressed_by...), loaded the way the service writes them. On PostgreSQL
the session runs at UTC+14, so a database-side date function that used the session's time
zone would move late-Sunday alerts into the next week and fail this.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router.stats import GroupBy, compute_stats
from tests.unit.test_stats_sql import HOLDOUTS, assert_same_stats, load, random_alerts


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
