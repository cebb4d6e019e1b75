"""tracker.bulk_insert (the driver's executemany on SQLite, COPY on PostgreSQL) stores exactly
what SQLAlchemy's own INSERT stores, and a clash on a unique key raises SQLAlchemy's
IntegrityError, which the pipeline's concurrent-insert retry relies on."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import insert, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlmodel import Session

from decision_router import tracker
from decision_router.consumer import infrastructure_failure
from decision_router.tables import AlertRecord, AuditEvent, PredictionRecord

NOW = datetime(2026, 11, 25, 20, 0, 0, 123456, tzinfo=UTC)
# Not UTC: both paths must store the same instant.
PARIS = timezone(timedelta(hours=1))


def prediction_rows(tag: str) -> list[dict]:
    return [
        {
            "prediction_id": f"{tag}-{n}", "stream_id": None if n == 0 else f"{n}-0", "model": "churn",
            "model_version": "v1", "entity_type": "account", "entity_id": f"acct-{n}", "score": 0.25 * n,
            "predicted_at": datetime(2026, 11, 25, 19, 0, n, tzinfo=PARIS), "received_at": NOW,
            "rules_version": "abc",
            "document": {"features": {"é": [1, 2.5, None, True], "nested": {"deep": "ü\u2028"}}, "n": n},
        }
        for n in range(3)
    ]


def alert_rows(tag: str) -> list[dict]:
    rows = []
    for n in range(3):
        rows.append({
            "delivered_at": None, "acknowledged_at": None, "intervened_at": None, "intervention": None,
            "outcome": None, "outcome_at": None, "outcome_value": None, "escalation_level": 0, "escalated_to": None,
            "ack_breached_at": None, "act_breached_at": None, "sla_revision": 0,
            "alert_id": f"al-{tag}-{n}", "prediction_id": f"{tag}-{n}", "rule": "r", "owner": "o",
            "original_owner": "o", "owner_source": "static", "fallback_reason": "why" if n else None,
            "delegated_from": None, "priority": "high", "action": "alert", "model": "churn", "model_version": "v1",
            "entity_type": "account", "entity_id": f"acct-{n}", "score": 0.5, "context": {"context.arr": n},
            "missing_context": ["context.x"] if n else [], "rules_version": "abc",
            "predicted_at": NOW, "created_at": NOW, "ack_by": NOW + timedelta(hours=n), "act_by": NOW,
            "held_out": n == 1, "suppressed_by": None, "status": "open",
            "ack_due_at": NOW if n != 1 else None, "act_due_at": None,
        })
    return rows


def event_rows(tag: str) -> list[dict]:
    return [
        {"alert_id": None if n == 0 else f"al-{tag}-{n}", "prediction_id": f"{tag}-{n}", "type": "received",
         "actor": "decision-router", "at": NOW, "source_id": None,
         "detail": {"stream_id": None, "score": 0.1 * n, "text": "quote \" and backslash \\"}}
        for n in range(3)
    ]


def stored(session: Session, table: type, key: str, tag: str) -> list[dict]:
    columns = [c for c in table.__table__.columns if c.name != "id"]  # type: ignore[attr-defined]
    rows = session.execute(select(*columns).where(getattr(table, key).like(f"%{tag}-%")).order_by(key))
    return [{name: value for name, value in row._mapping.items() if name != key} for row in rows]


@pytest.mark.parametrize(
    ("table", "rows_of", "key"),
    [(PredictionRecord, prediction_rows, "prediction_id"), (AlertRecord, alert_rows, "alert_id"),
     (AuditEvent, event_rows, "prediction_id")],
    ids=["predictions", "alerts", "audit_events"],
)
def test_bulk_insert_stores_what_sqlalchemy_stores(engine: Engine, table: type, rows_of, key: str) -> None:
    with Session(engine) as session:
        session.execute(insert(table.__table__), rows_of("ref"))  # type: ignore[attr-defined]
        tracker.bulk_insert(session, table.__table__, rows_of("bulk"))  # type: ignore[attr-defined]
        session.commit()
    with Session(engine) as session:
        reference, bulk = stored(session, table, key, "ref"), stored(session, table, key, "bulk")
    assert len(bulk) == 3
    for ref_row, bulk_row in zip(reference, bulk, strict=True):
        # The same but for the tag in ids.
        assert {k: v.replace("bulk", "ref") if isinstance(v, str) else v for k, v in bulk_row.items()} == ref_row


def test_a_duplicate_key_raises_sqlalchemys_integrity_error(engine: Engine) -> None:
    with Session(engine) as session:
        tracker.bulk_insert(session, PredictionRecord.__table__, prediction_rows("dup"))  # type: ignore[attr-defined]
        session.commit()
    with Session(engine) as session, pytest.raises(IntegrityError):
        tracker.bulk_insert(session, PredictionRecord.__table__, prediction_rows("dup")[:1])  # type: ignore[attr-defined]


@pytest.mark.postgres
def test_a_connection_lost_mid_copy_is_the_store_unavailable_and_is_dropped(pg_engine: Engine) -> None:
    # As SQLAlchemy handles a lost connection on its own INSERT: the error says the store is
    # unreachable (the consumer retries, never dead-letters) and the connection is invalidated,
    # so the rollback that follows does not fail on it again and the pool does not hand it out.
    with Session(pg_engine) as session:
        pid = session.execute(text("select pg_backend_pid()")).scalar()
        with pg_engine.connect() as other:
            other.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(OperationalError) as lost:
            tracker.bulk_insert(session, PredictionRecord.__table__, prediction_rows("lost"))  # type: ignore[attr-defined]
        assert infrastructure_failure(lost.value) == "store"
        assert lost.value.connection_invalidated
        session.rollback()
        assert session.execute(text("select 1")).scalar() == 1


# What COPY's text format must escape (its NULL marker \N, its end marker \., tabs, newlines,
# backslashes), beyond the BMP, and a long value: each stored as SQLAlchemy's INSERT stores it.
AWKWARD_TEXT = ["\\N", "\\.", "a\tb\nc\rd\\e", "end\\", "", "\u2028\U0001f600\x01\x7f", "x" * 200_000]


def test_bulk_insert_stores_text_copy_must_escape_as_sqlalchemy_does(engine: Engine) -> None:
    def awkward_rows(tag: str) -> list[dict]:
        rows = []
        for n, value in enumerate(AWKWARD_TEXT):
            row = prediction_rows(tag)[0] | {"prediction_id": f"{tag}-{n}", "entity_id": value}
            row["document"] = {"text": value, "nul": "a\u0000b", "big": 10**30}
            rows.append(row)
        return rows

    with Session(engine) as session:
        session.execute(insert(PredictionRecord.__table__), awkward_rows("ref"))  # type: ignore[attr-defined]
        tracker.bulk_insert(session, PredictionRecord.__table__, awkward_rows("bulk"))  # type: ignore[attr-defined]
        session.commit()
    with Session(engine) as session:
        reference = stored(session, PredictionRecord, "prediction_id", "ref")
        bulk = stored(session, PredictionRecord, "prediction_id", "bulk")
    assert [row["entity_id"] for row in bulk] == AWKWARD_TEXT
    assert bulk == reference


def test_bulk_insert_writes_the_json_text_the_engine_writes(engine: Engine) -> None:
    # Not only the same values read back: the same text, the engine's serializer's (store.json_text),
    # also for a value it hands to json.dumps (an integer beyond 64 bits).
    def rows(tag: str) -> list[dict]:
        documents = [{"features": {"é": [1, 2.5, None, True]}, "text": "ü \" \\"}, {"big": 10**30, "n": None}]
        return [prediction_rows(tag)[0] | {"prediction_id": f"{tag}-{n}", "document": document}
                for n, document in enumerate(documents)]

    with Session(engine) as session:
        session.execute(insert(PredictionRecord.__table__), rows("ref"))  # type: ignore[attr-defined]
        tracker.bulk_insert(session, PredictionRecord.__table__, rows("bulk"))  # type: ignore[attr-defined]
        session.commit()
        texts = dict(session.execute(text("select prediction_id, cast(document as text) from predictions")).all())
    assert [texts["bulk-0"], texts["bulk-1"]] == [texts["ref-0"], texts["ref-1"]]
    assert texts["ref-0"] == '{"features":{"é":[1,2.5,null,true]},"text":"ü \\" \\\\"}'
    assert texts["ref-1"] == '{"big": 1000000000000000000000000000000, "n": null}'
