"""`compute_quality`: accepted and rejected predictions per model and reason, fallback owners,
missing context. Every figure below is counted by hand from `quality_records()`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import Session

from decision_router.stats import UNKNOWN_MODEL, RejectionCount, compute_quality
from decision_router.store import create_schema, make_engine
from decision_router.tables import PredictionRecord, RejectionRecord
from tests.unit.test_stats import alert

Q0 = datetime(2026, 11, 10, 12, 0, tzinfo=UTC)
OLD = Q0 - timedelta(days=30)


def prediction(n: int, model: str, received: datetime = Q0) -> PredictionRecord:
    return PredictionRecord(
        prediction_id=f"q-{model}-{n}", stream_id=f"1-{n}", model=model, model_version="1", entity_type="account",
        entity_id=f"e{n}", score=0.5, predicted_at=received, received_at=received, rules_version="v", document={},
    )


def rejection(n: int, model: str | None, reason: str, stream: str = "predictions",
              at: datetime = Q0) -> RejectionRecord:
    return RejectionRecord(source_stream=stream, source_id=f"9-{n}", model=model, reason=reason, detail="d", at=at)


def quality_records() -> list[Any]:
    """Models "upsell" and "credit" (other fixtures use other model names).

    In the window (Q0): upsell 5 accepted, rejected 2 stale + 1 duplicate; credit 2 accepted;
    1 rejection without a model (missing_id); 1 rejected outcome event (unknown_alert).
    upsell decisions: 4, one with a fallback owner, two with missing context
    (context.arr twice, context.region once); credit: 1 decision, owner from a field.
    30 days earlier: 1 upsell accepted, 1 rejected (schema).
    """
    return [
        *(prediction(n, "upsell") for n in range(5)),
        *(prediction(n, "credit") for n in range(2)),
        prediction(99, "upsell", received=OLD),
        rejection(1, "upsell", "stale"),
        rejection(2, "upsell", "stale"),
        rejection(3, "upsell", "duplicate"),
        rejection(4, None, "missing_id"),
        rejection(5, None, "unknown_alert", stream="outcomes"),
        rejection(6, "upsell", "schema", at=OLD),
        alert(0, rule="up", owner="desk", model="upsell", created=Q0, owner_source="fallback"),
        alert(1, rule="up", owner="ann", model="upsell", created=Q0, owner_source="field", missing=["context.arr"]),
        alert(2, rule="up", owner="ann", model="upsell", created=Q0, owner_source="field",
              missing=["context.region", "context.arr"]),
        alert(3, rule="up", owner="ann", model="upsell", created=Q0, owner_source="field", action="record"),
        alert(0, rule="cr", owner="bo", model="credit", created=Q0, owner_source="field"),
    ]


@pytest.fixture
def session():
    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    with Session(engine) as s:
        s.add_all(quality_records())
        s.commit()
        yield s
    engine.dispose()


def test_quality_per_model_in_a_window(session) -> None:
    report = compute_quality(session, since=Q0 - timedelta(days=1))
    assert [row.model for row in report.models] == ["upsell", "credit", UNKNOWN_MODEL]
    upsell, credit, unknown = report.models
    assert (upsell.accepted, upsell.rejected, upsell.decisions) == (5, 3, 4)
    assert upsell.rejection_rate == pytest.approx(3 / 8)
    assert (upsell.fallback_owner, upsell.fallback_owner_rate) == (1, pytest.approx(0.25))
    assert (upsell.missing_context, upsell.missing_context_rate) == (2, pytest.approx(0.5))
    assert upsell.missing_fields == (("context.arr", 2), ("context.region", 1))
    assert upsell.rejections == (("stale", 2), ("duplicate", 1))
    assert (credit.accepted, credit.rejected, credit.rejection_rate, credit.decisions) == (2, 0, 0.0, 1)
    assert (credit.fallback_owner_rate, credit.missing_context_rate, credit.missing_fields) == (0.0, 0.0, ())
    # a rejection whose model could not be read: listed, with null rates where nothing was routed
    assert (unknown.accepted, unknown.rejected, unknown.rejection_rate, unknown.decisions) == (0, 1, 1.0, 0)
    assert unknown.fallback_owner_rate is None and unknown.missing_context_rate is None
    assert report.rejections == [
        RejectionCount("upsell", "stale", 2), RejectionCount("upsell", "duplicate", 1),
        RejectionCount(UNKNOWN_MODEL, "missing_id", 1),
    ]
    # outcome events are rejected apart, never counted as a model's predictions
    assert report.outcome_rejections == [("unknown_alert", 1)]


def test_quality_without_a_window_counts_everything(session) -> None:
    upsell = compute_quality(session).models[0]
    assert (upsell.model, upsell.accepted, upsell.rejected) == ("upsell", 6, 4)
    assert upsell.rejections == (("stale", 2), ("duplicate", 1), ("schema", 1))
    until = compute_quality(session, until=Q0).models
    assert [(r.model, r.accepted, r.rejected, r.decisions) for r in until] == [("upsell", 1, 1, 0)]


def test_quality_for_one_model(session) -> None:
    report = compute_quality(session, model="credit")
    assert [(r.model, r.accepted, r.decisions) for r in report.models] == [("credit", 2, 1)]
    assert report.rejections == []
    assert report.outcome_rejections == [("unknown_alert", 1)]  # they carry no model: always shown


def test_quality_as_json_document(session) -> None:
    document = compute_quality(session, since=Q0 - timedelta(days=1)).as_dict()
    assert document["models"][0]["missing_fields"] == {"context.arr": 2, "context.region": 1}
    assert document["models"][0]["rejections"] == {"stale": 2, "duplicate": 1}
    assert document["rejections"][2] == {"model": UNKNOWN_MODEL, "reason": "missing_id", "count": 1}
    assert document["outcome_rejections"] == [{"reason": "unknown_alert", "count": 1}]


def test_empty_store_has_an_empty_report() -> None:
    engine = make_engine("sqlite:///:memory:")
    create_schema(engine)
    with Session(engine) as s:
        report = compute_quality(s)
    engine.dispose()
    assert (report.models, report.rejections, report.outcome_rejections) == ([], [], [])
