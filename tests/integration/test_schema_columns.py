"""create_schema on a store created before columns were added to its tables (create_all skips tables that
exist): it adds them, with the rows already there given the column's default, builds the indexes that
went with them, and the router then routes on that store; several workers starting at once all succeed.
A column it cannot add is refused in one line, before anything is changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel
from structlog.testing import capture_logs
from typer.testing import CliRunner

from decision_router.cli import app
from decision_router.rules import RuleSet
from decision_router.service import running_service
from decision_router.settings import Settings
from decision_router.store import SchemaUpgradeError, _dialect_indexes, create_schema, make_engine, schema_is_current
from decision_router.tables import AlertRecord, AuditEvent, PredictionRecord
from decision_router.tracker import alert_id_for
from tests.integration.conftest import wait_until
from tests.integration.test_router_loop import count, prediction
from tests.integration.test_schema_upgrade import create_schema_twice_behind_a_writer
from tests.unit.test_stats import alert
from tests.unit.test_store_schema import create_schema_at_once

# Columns added to tables after stores were created with them (tables.py's history), of every kind:
# NOT NULL with a default (held_out, escalation_level, sla_revision), nullable, and nullable ones that
# indexes hold (ack_due_at: the SLA sweep's partial index; source_id: the audit entries' unique key).
ADDED_SINCE = {
    "alerts": ["held_out", "suppressed_by", "escalation_level", "sla_revision", "ack_due_at", "delegated_from"],
    "predictions": ["stream_id"],
    "audit_events": ["source_id"],
}


def columns(engine: Engine) -> dict[tuple[str, str], tuple[str, bool]]:
    """Each column of the tables: its type as the database names it, and whether it may be NULL."""
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            rows = connection.execute(text(
                "select m.name, c.name, c.type, not c.\"notnull\" from sqlite_master m"
                " join pragma_table_info(m.name) c where m.type = 'table'"))
        else:
            rows = connection.execute(text(
                "select table_name, column_name, data_type, is_nullable = 'YES' from information_schema.columns"
                " where table_schema = current_schema()"))
        return {(table, column): (kind, bool(nullable)) for table, column, kind, nullable in rows}


def index_names(engine: Engine) -> set[str]:
    query = ("select name from sqlite_master where type = 'index'" if engine.dialect.name == "sqlite"
             else "select indexname from pg_indexes where schemaname = current_schema()")
    with engine.connect() as connection:
        return set(connection.execute(text(query)).scalars())


def make_older(engine: Engine, added: dict[str, list[str]]) -> None:
    """The store as a version before these columns left it: without them, nor the indexes of their tables."""
    tables = SQLModel.metadata.tables
    with engine.begin() as connection:
        for name, index in _dialect_indexes(engine.dialect.name).items():
            if index.table is not None and index.table.name in added:
                connection.execute(text(f"drop index {name}"))
        for table, names in added.items():
            for name in names:
                assert name in tables[table].c
                # PostgreSQL: with the tallies' update trigger, whose condition reads some of them.
                cascade = " cascade" if engine.dialect.name == "postgresql" else ""
                connection.execute(text(f"alter table {table} drop column {name}{cascade}"))


def stored_before(engine: Engine) -> None:
    """Rows an older version wrote: an alert, its prediction and its audit event."""
    with Session(engine) as session:
        old = alert(1, rule="churn-high", owner="alice")
        old.delivered_at = old.created_at
        session.add(old)
        session.add(PredictionRecord(
            prediction_id=old.prediction_id, model="churn", model_version="1", entity_type="account",
            entity_id=old.entity_id, score=0.9, predicted_at=old.created_at, received_at=old.created_at,
            rules_version="v", document={"prediction_id": old.prediction_id}))
        session.add(AuditEvent(alert_id=old.alert_id, prediction_id=old.prediction_id, type="routed",
                               actor="decision-router", at=old.created_at))
        session.commit()


def test_create_schema_adds_the_columns_an_older_store_lacks(engine: Engine) -> None:
    as_created = columns(engine)
    stored_before(engine)
    make_older(engine, ADDED_SINCE)
    assert not schema_is_current(engine)  # so `stats` runs create_schema on it too

    with capture_logs() as logs:
        create_schema(engine)

    assert columns(engine) == as_created  # each column of the type and nullability a new store has
    assert set(_dialect_indexes(engine.dialect.name)) <= index_names(engine)  # those on the new columns too
    assert schema_is_current(engine)
    added = sorted((entry["table"], entry["column"]) for entry in logs if entry["event"] == "column added to the store")
    assert added == sorted((table, column) for table, names in ADDED_SINCE.items() for column in names)
    with Session(engine) as session:  # the rows there got the default, or NULL
        old = session.get(AlertRecord, "al-churn-high-1")
        assert (old.held_out, old.escalation_level, old.sla_revision) == (False, 0, 0)
        assert (old.suppressed_by, old.ack_due_at, old.delegated_from) == (None, None, None)
        assert old.effective_action == "alert"
        assert session.get(PredictionRecord, "p-churn-high-1").stream_id is None
    with engine.connect() as connection:
        assert connection.execute(text("select source_id from audit_events")).scalars().all() == [None]

    with capture_logs() as logs:
        create_schema(engine)  # again: nothing to add
    assert not [entry for entry in logs if entry["event"] == "column added to the store"]


def test_schema_is_current_sees_a_missing_column(engine: Engine) -> None:
    make_older(engine, {"alerts": []})  # its indexes gone: they are built again
    create_schema(engine)
    assert schema_is_current(engine)
    with engine.begin() as connection:  # a column no index holds
        connection.execute(text("alter table alerts drop column delegated_from"))
    assert not schema_is_current(engine)
    create_schema(engine)
    assert schema_is_current(engine)


@pytest.mark.redis
async def test_the_router_routes_on_an_upgraded_store(
        engine: Engine, settings: Settings, ruleset: RuleSet, r: redis.Redis) -> None:
    stored_before(engine)
    make_older(engine, ADDED_SINCE)
    create_schema(engine)  # as `serve` does first
    async with running_service(settings, ruleset, engine) as service:
        r.xadd(service.keys.predictions, {"data": json.dumps(prediction("p1"))})
        alert_id = alert_id_for("p1", "enterprise-churn-risk")
        await wait_until(lambda: count(engine, AlertRecord, AlertRecord.alert_id == alert_id,
                                       AlertRecord.delivered_at.is_not(None)) == 1, what="the alert stored and delivered")
    with Session(engine) as session:
        routed = session.get(AlertRecord, alert_id)
        assert routed.owner == "alice-moreau" and routed.held_out is False and routed.ack_due_at is not None
        assert session.get(PredictionRecord, "p1").stream_id is not None
    assert count(engine, AlertRecord) == 2


def test_a_column_that_cannot_be_added_is_refused_before_anything_changes(engine: Engine) -> None:
    # escalations.to_owner: NOT NULL without a default, as the table was created (no store lacks it).
    make_older(engine, {"alerts": ["sla_revision"], "escalations": ["to_owner"]})
    before = columns(engine)
    with pytest.raises(SchemaUpgradeError, match="^the store's table escalations has no column to_owner, which this"
                                                  " version needs and cannot add: it is NOT NULL with neither a"
                                                  " server_default nor a scalar default for the rows already there$"):
        create_schema(engine)
    assert columns(engine) == before  # alerts did not get its column either


def test_stats_refuses_such_a_store_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    engine = make_engine(url)
    create_schema(engine)
    make_older(engine, {"escalations": ["to_owner"]})
    engine.dispose()
    monkeypatch.setenv("DECISION_ROUTER_DATABASE_URL", url)
    monkeypatch.setenv("DECISION_ROUTER_RULES_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["stats"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot read the store at {url}: the store's table escalations has no column to_owner, which this"
        " version needs and cannot add: it is NOT NULL with neither a server_default nor a scalar default for the"
        " rows already there"]


@pytest.mark.postgres
def test_workers_starting_together_on_an_older_store_both_add_its_columns(pg_engine: Engine) -> None:
    stored_before(pg_engine)
    make_older(pg_engine, ADDED_SINCE)
    failures, _ = create_schema_twice_behind_a_writer(pg_engine)  # both find the columns missing
    assert not failures, failures
    assert schema_is_current(pg_engine)
    with Session(pg_engine) as session:
        assert session.get(AlertRecord, "al-churn-high-1").escalation_level == 0


def test_workers_starting_together_on_an_older_sqlite_store_all_add_its_columns(tmp_path: Path) -> None:
    # SQLite has no ADD COLUMN IF NOT EXISTS: one adds a column, the others' ALTER fails, and they look again.
    for round_ in range(5):
        url = f"sqlite:///{tmp_path / f'store-{round_}.db'}"
        engine = make_engine(url)
        create_schema(engine)
        stored_before(engine)
        make_older(engine, ADDED_SINCE)
        engine.dispose()
        errors = create_schema_at_once(url)
        assert errors == [], errors
        engine = make_engine(url)
        assert schema_is_current(engine)
        engine.dispose()
