"""create_schema repairs the cooldown-suppressed decisions that an older version closed on their outcome (status
'closed'; they stay 'suppressed' since), once, and reads only its partial index to find them: on both stores."""

from __future__ import annotations

import re

from sqlalchemy import select, text, update
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router import store, tables
from decision_router.store import create_schema, schema_is_current
from decision_router.tables import AlertRecord
from tests.unit.test_stats import alert


def statuses(engine: Engine) -> dict[str, tuple[str, str | None]]:
    with Session(engine) as session:
        return {r.alert_id: (r.status, r.outcome) for r in session.scalars(select(AlertRecord))}


def test_create_schema_sets_suppressed_decisions_an_older_version_closed_back_to_suppressed(engine: Engine) -> None:
    closed_by_old = alert(1, rule="churn", owner="alice", outcome="success")  # status 'closed' (the old version's)
    closed_by_old.suppressed_by = "al-churn-0"
    still_suppressed = alert(2, rule="churn", owner="alice")
    still_suppressed.suppressed_by, still_suppressed.status = "al-churn-0", "suppressed"
    plain_closed = alert(3, rule="churn", owner="alice", outcome="failure")
    with Session(engine) as session:
        session.add_all([closed_by_old, still_suppressed, plain_closed])
        session.commit()
    with engine.begin() as connection:  # a store from before the repair's index
        connection.execute(text("drop index if exists ix_alerts_suppressed_closed"))
    create_schema(engine)
    assert statuses(engine) == {
        "al-churn-1": ("suppressed", "success"),  # the outcome stays recorded
        "al-churn-2": ("suppressed", None),
        "al-churn-3": ("closed", "failure"),
    }
    assert schema_is_current(engine)  # and a read-only command (`stats`) runs it on an older store
    # Idempotent: nothing left to repair, the next start changes nothing.
    assert store.repair_suppressed_closed(engine) == 0
    create_schema(engine)
    assert statuses(engine)["al-churn-1"] == ("suppressed", "success")


def test_the_repair_reads_only_its_partial_index(engine: Engine) -> None:
    """Run at every start: a scan of the alerts would cost 60-200 ms per 200,000 of them, each time."""
    alerts = AlertRecord.__table__
    for statement in (select(alerts.c.alert_id).where(tables.SUPPRESSED_CLOSED).limit(1),
                      update(alerts).where(tables.SUPPRESSED_CLOSED).values(status="suppressed")):
        sql = str(statement.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
        explain = "explain query plan " if engine.dialect.name == "sqlite" else "explain "
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                connection.execute(text("set enable_seqscan = off"))  # an empty table: show the index can serve it
            plan = "\n".join(str(row[-1]) for row in connection.exec_driver_sql(explain + sql))
        assert re.findall(r"\bix_\w+", plan) == ["ix_alerts_suppressed_closed"], plan
        # The whole (partial) index, which holds only the decisions to repair: never the table.
        assert "Seq Scan" not in plan and not re.search(r"SCAN alerts$", plan, re.MULTILINE), plan
