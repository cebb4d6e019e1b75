"""create_schema drops the indexes no query needs (tables.RETIRED_INDEXES) from a store created with
them, and a new store never has them: each one cost every stored decision an index write."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Engine

from decision_router import tables
from decision_router.store import create_schema

# How the store created before them defined them (SQLModel's index=True).
OLD_INDEXES = {
    "ix_alerts_rule": "alerts (rule)", "ix_alerts_status": "alerts (status)",
    "ix_alerts_held_out": "alerts (held_out)", "ix_audit_events_at": "audit_events (at)",
}


def index_names(engine: Engine) -> set[str]:
    # From the catalogue: SQLAlchemy's inspector skips (and warns about) expression indexes.
    query = ("select name from sqlite_master where type = 'index'" if engine.dialect.name == "sqlite"
             else "select indexname from pg_indexes where schemaname = current_schema()")
    with engine.connect() as connection:
        return set(connection.execute(text(query)).scalars())


def test_a_new_store_has_none_of_the_retired_indexes(engine: Engine) -> None:
    assert set(OLD_INDEXES) == set(tables.RETIRED_INDEXES)
    assert not index_names(engine) & set(tables.RETIRED_INDEXES)
    # What replaces them is there: each dialect's stats index leads with the rule.
    assert set(tables.STATS_INDEXES[engine.dialect.name]) <= index_names(engine)


def test_create_schema_drops_them_from_an_older_store(engine: Engine) -> None:
    with engine.begin() as connection:
        for name, on in OLD_INDEXES.items():
            connection.execute(text(f"create index {name} on {on}"))
    assert set(OLD_INDEXES) <= index_names(engine)
    create_schema(engine)  # a worker of this version starting on it
    assert not index_names(engine) & set(OLD_INDEXES)
    create_schema(engine)  # and again: nothing left to drop is no error
