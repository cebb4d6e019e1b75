"""The columns create_schema adds to a store created before them: how each is written for SQLite and
PostgreSQL, which it refuses (and that tables.py has none of those beyond its tables' first columns)."""

from __future__ import annotations

import pytest
from sqlalchemy import JSON, Boolean, Column, DateTime, Integer, MetaData, String, Table, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import SQLModel

from decision_router.store import SchemaUpgradeError, add_column_ddl, cannot_add_column

DIALECTS = {"sqlite": sqlite.dialect(), "postgresql": postgresql.dialect()}

# The columns each table was created with (git history of tables.py and tokens.py) that no ALTER TABLE
# could add to rows already there: NOT NULL without a default, keys, unique. Every store has them, as
# its tables were created with them. Frozen: a column added to a table since is not listed here, and
# must be addable (nullable, or with a default), or stores created before it could not start.
CREATED_WITH_THEIR_TABLE = {
    "alerts": {"alert_id", "prediction_id", "rule", "owner", "original_owner", "owner_source", "priority", "action",
               "model", "model_version", "entity_type", "entity_id", "score", "context", "missing_context",
               "rules_version", "predicted_at", "created_at", "ack_by", "act_by"},
    "api_tokens": {"token_id", "token_hash", "role", "created_at"},
    "audit_events": {"id", "type", "actor", "at", "detail"},
    "cooldowns": {"entity_id", "entity_type", "rule", "alert_id", "started_at", "ends_at"},
    "data_quality_alerts": {"alert_id", "day", "model", "model_version", "metric", "n_reference", "n_recent",
                            "window", "detail", "created_at"},
    "deliveries": {"id", "delivery_key", "alert_id", "recipient", "channel", "payload", "created_at"},
    "delivery_attempts": {"id", "delivery_id", "n", "ok", "latency_ms", "at"},
    "delivery_claims": {"delivery_id", "holder", "until"},
    "escalations": {"id", "alert_id", "level", "kind", "from_owner", "to_owner", "reason", "at"},
    "predictions": {"prediction_id", "model", "model_version", "entity_type", "entity_id", "score", "predicted_at",
                    "received_at", "rules_version", "document"},
    "rejections": {"id", "source_stream", "source_id", "reason", "detail", "at"},
}


def test_every_column_added_to_a_table_since_it_was_created_can_be_added_to_an_older_store() -> None:
    refused = {f"{table.name}.{column.name}: {cannot_add_column(column)}"
               for table in SQLModel.metadata.sorted_tables for column in table.columns
               if cannot_add_column(column) and column.name not in CREATED_WITH_THEIR_TABLE.get(table.name, set())}
    assert refused == set(), "create_schema could not add these to a store created before them"
    for table in SQLModel.metadata.sorted_tables:
        for column in table.columns:
            if column.name not in CREATED_WITH_THEIR_TABLE.get(table.name, set()):
                for dialect in DIALECTS.values():
                    assert add_column_ddl(column, dialect).startswith(f"ALTER TABLE {table.name} ADD COLUMN")


@pytest.fixture
def table() -> Table:
    """A table with one column of each kind create_schema may have to add."""
    return Table(
        "things", MetaData(),
        Column("id", Integer, primary_key=True),
        Column("note", String, nullable=True, default="x"),  # nullable: NULL for the rows there, default or not
        Column("seen_at", DateTime(timezone=True), nullable=True),
        Column("state", String, nullable=False, server_default=text("'new'")),
        Column("flagged", Boolean, nullable=False, default=False),
        Column("level", Integer, nullable=False, default=0),
        Column("extra", JSON, nullable=False, default=dict),  # a callable default: not for the rows there
        Column("name", String, nullable=False),
        Column("code", String, nullable=True, unique=True),
    )


@pytest.mark.parametrize(("column", "dialect", "ddl"), [
    ("note", "sqlite", "ALTER TABLE things ADD COLUMN note VARCHAR"),
    ("note", "postgresql", "ALTER TABLE things ADD COLUMN IF NOT EXISTS note VARCHAR"),
    ("seen_at", "sqlite", "ALTER TABLE things ADD COLUMN seen_at DATETIME"),
    ("seen_at", "postgresql", "ALTER TABLE things ADD COLUMN IF NOT EXISTS seen_at TIMESTAMP WITH TIME ZONE"),
    ("state", "sqlite", "ALTER TABLE things ADD COLUMN state VARCHAR DEFAULT 'new' NOT NULL"),
    ("state", "postgresql", "ALTER TABLE things ADD COLUMN IF NOT EXISTS state VARCHAR DEFAULT 'new' NOT NULL"),
    ("flagged", "sqlite", "ALTER TABLE things ADD COLUMN flagged BOOLEAN DEFAULT 0 NOT NULL"),
    ("flagged", "postgresql", "ALTER TABLE things ADD COLUMN IF NOT EXISTS flagged BOOLEAN DEFAULT false NOT NULL"),
    ("level", "sqlite", "ALTER TABLE things ADD COLUMN level INTEGER DEFAULT 0 NOT NULL"),
])
def test_a_column_is_added_as_create_table_writes_it_with_a_default_for_the_rows_there(
        table: Table, column: str, dialect: str, ddl: str) -> None:
    assert add_column_ddl(table.c[column], DIALECTS[dialect]) == ddl


@pytest.mark.parametrize(("column", "reason"), [
    ("name", "it is NOT NULL with neither a server_default nor a scalar default for the rows already there"),
    ("extra", "it is NOT NULL with neither a server_default nor a scalar default for the rows already there"),
    ("code", "it is unique (SQLite cannot add such a column; a unique index can be built instead)"),
    ("id", "it is part of the primary key"),
])
def test_a_column_that_cannot_be_added_is_refused_in_one_line_naming_it(table: Table, column: str, reason: str) -> None:
    for dialect in DIALECTS.values():
        with pytest.raises(SchemaUpgradeError) as refused:
            add_column_ddl(table.c[column], dialect)
        assert str(refused.value) == (f"the store's table things has no column {column}, which this version needs"
                                      f" and cannot add: {reason}")
