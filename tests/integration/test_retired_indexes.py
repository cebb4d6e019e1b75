"""create_schema drops the indexes no query needs (tables.RETIRED_INDEXES) from a store created with
them, and a new store never has them: each one cost every stored decision an index write. The
unique key of audit events by input entry holds only events that have one, with the same guarantee."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from decision_router import tables, tracker
from decision_router.store import create_schema, make_engine, schema_is_current
from decision_router.tables import AuditEvent

# How the store created before them defined them (SQLModel's index=True).
OLD_INDEXES = {
    "ix_alerts_rule": "alerts (rule)", "ix_alerts_status": "alerts (status)",
    "ix_alerts_held_out": "alerts (held_out)", "ix_audit_events_at": "audit_events (at)",
    "ix_alerts_ack_due_at": "alerts (ack_due_at)", "ix_alerts_act_due_at": "alerts (act_due_at)",
    "ix_alerts_entity_id": "alerts (entity_id)",
}
# The partial indexes that replace the last two: only deadlines still to meet.
PENDING_DUE_INDEXES = {"ix_alerts_ack_pending", "ix_alerts_act_pending"}


def index_names(engine: Engine) -> set[str]:
    # From the catalogue: SQLAlchemy's inspector skips (and warns about) expression indexes.
    query = ("select name from sqlite_master where type = 'index'" if engine.dialect.name == "sqlite"
             else "select indexname from pg_indexes where schemaname = current_schema()")
    with engine.connect() as connection:
        return set(connection.execute(text(query)).scalars())


# PostgreSQL keeps these: its planner reads open alerts and the rules' names through them.
KEPT_ON_POSTGRES = {"ix_alerts_rule", "ix_alerts_status"}
# SQLite keeps the entity's index; PostgreSQL has ix_alerts_entity (entity, rule, time) instead.
KEPT_ON_SQLITE = {"ix_alerts_entity_id"}


def retired(engine: Engine) -> set[str]:
    return set(OLD_INDEXES) - (KEPT_ON_POSTGRES if engine.dialect.name == "postgresql" else KEPT_ON_SQLITE)


def test_a_new_store_has_none_of_the_retired_indexes(engine: Engine) -> None:
    assert set(tables.RETIRED_INDEXES[engine.dialect.name]) == retired(engine)
    assert not index_names(engine) & retired(engine)
    assert set(OLD_INDEXES) - retired(engine) <= index_names(engine)
    # What replaces them is there: each dialect's stats index leads with the rule; the due times' partial indexes.
    assert set(tables.STATS_INDEXES[engine.dialect.name]) | PENDING_DUE_INDEXES <= index_names(engine)


def test_create_schema_drops_them_from_an_older_store(engine: Engine) -> None:
    with engine.begin() as connection:
        for name, on in OLD_INDEXES.items():
            connection.execute(text(f"create index if not exists {name} on {on}"))
    assert set(OLD_INDEXES) <= index_names(engine)
    create_schema(engine)  # a worker of this version starting on it
    assert not index_names(engine) & retired(engine)
    assert set(OLD_INDEXES) - retired(engine) <= index_names(engine)
    create_schema(engine)  # and again: nothing left to drop is no error


def test_create_schema_replaces_the_due_indexes_of_an_older_store(engine: Engine) -> None:
    with engine.begin() as connection:  # the store as an older version left it
        for name in PENDING_DUE_INDEXES:
            connection.execute(text(f"drop index {name}"))
        for name in ("ix_alerts_ack_due_at", "ix_alerts_act_due_at"):
            connection.execute(text(f"create index {name} on {OLD_INDEXES[name]}"))
    assert not schema_is_current(engine)  # so `stats` runs create_schema on it too
    create_schema(engine)
    assert PENDING_DUE_INDEXES <= index_names(engine)
    assert not {"ix_alerts_ack_due_at", "ix_alerts_act_due_at"} & index_names(engine)
    assert schema_is_current(engine)


def test_create_schema_adds_the_index_of_escalations_by_manager_to_an_older_store(engine: Engine) -> None:
    with engine.begin() as connection:  # a store from before owner tokens saw the alerts escalated to them
        connection.execute(text("drop index ix_escalations_to_owner"))
    assert not schema_is_current(engine)
    create_schema(engine)
    assert "ix_escalations_to_owner" in index_names(engine)
    assert schema_is_current(engine)


@pytest.mark.postgres
def test_create_schema_replaces_the_entity_index_of_an_older_postgres_store(pg_engine: Engine) -> None:
    with pg_engine.begin() as connection:  # the store as an older version left it
        connection.execute(text("drop index ix_alerts_entity"))
        connection.execute(text(f"create index ix_alerts_entity_id on {OLD_INDEXES['ix_alerts_entity_id']}"))
    assert not schema_is_current(pg_engine)
    create_schema(pg_engine)
    assert "ix_alerts_entity" in index_names(pg_engine) and "ix_alerts_entity_id" not in index_names(pg_engine)
    assert schema_is_current(pg_engine)


def test_a_new_sqlite_store_indexes_alerts_by_entity_alone(tmp_path) -> None:  # noqa: ANN001
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    names = index_names(engine)
    engine.dispose()
    assert "ix_alerts_entity_id" in names and "ix_alerts_entity" not in names


def audit_event(source_id: str | None, alert_id: str | None = "al-1", type_: str = "acknowledged") -> dict:
    return {"alert_id": alert_id, "prediction_id": "p-1", "type": type_, "actor": "someone",
            "at": datetime(2026, 11, 25, tzinfo=UTC), "source_id": source_id, "detail": {}}


def insert_event(engine: Engine, row: dict) -> None:
    with engine.begin() as connection:
        connection.execute(insert(AuditEvent.__table__), [row])  # type: ignore[attr-defined]


def assert_an_entry_applies_once(engine: Engine) -> None:
    insert_event(engine, audit_event("1-0"))
    insert_event(engine, audit_event("1-0", type_="intervened"))  # another event of the same entry
    with pytest.raises(IntegrityError):
        insert_event(engine, audit_event("1-0"))  # the same entry applied again
    for _ in range(2):  # the pipeline's own events have no source and never clash
        insert_event(engine, audit_event(None, type_="received"))
    with Session(engine) as session:
        assert tracker.already_applied(session, "1-0")
        assert not tracker.already_applied(session, "2-0")


def test_an_input_entry_writes_its_events_once(engine: Engine) -> None:
    # The unique index holds only events with a source_id (uq_audit_source_entry), the guarantee is the same.
    assert "uq_audit_source_entry" in index_names(engine)
    assert_an_entry_applies_once(engine)


def test_the_applied_check_reads_the_partial_index(engine: Engine) -> None:
    query = select(AuditEvent.id).where(AuditEvent.source_id == "1-0").limit(1)
    sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
    explain = "explain query plan " if engine.dialect.name == "sqlite" else "explain "
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("set enable_seqscan = off"))  # an empty table: show the index can serve it
        plan = " | ".join(str(row[-1]) for row in connection.execute(text(explain + sql)))
    assert "uq_audit_source_entry" in plan, plan


@pytest.mark.postgres
def test_create_schema_replaces_the_constraint_of_an_older_postgres_store(pg_engine: Engine) -> None:
    with pg_engine.begin() as connection:
        connection.execute(text("drop index uq_audit_source_entry"))
        connection.execute(text("alter table audit_events add constraint uq_audit_source "
                                "unique (source_id, alert_id, type)"))
    create_schema(pg_engine)
    with pg_engine.connect() as connection:
        constraints = set(connection.execute(text(
            "select conname from pg_constraint where conrelid = 'audit_events'::regclass")).scalars())
    assert "uq_audit_source" not in constraints
    assert_an_entry_applies_once(pg_engine)


@pytest.mark.postgres
def test_a_worker_starting_on_an_up_to_date_store_does_not_wait_for_running_writers(pg_engine: Engine) -> None:
    # CREATE INDEX IF NOT EXISTS and ALTER TABLE ... IF EXISTS lock the table first (behind every running
    # insert, and every later insert behind them) even with nothing to do: create_schema looks first.
    writer = pg_engine.connect()
    writer.execute(text("lock table alerts, audit_events in row exclusive mode"))  # a batch being stored
    started = threading.Thread(target=create_schema, args=(pg_engine,), daemon=True)
    started.start()
    started.join(10)
    waited = started.is_alive()
    writer.rollback()
    writer.close()
    started.join(30)
    assert not waited
