"""JSON columns are written by store.json_text (orjson, json.dumps where orjson would refuse the value
or store another): every value reads back as json.dumps' text of it reads back."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import fakeredis.aioredis
import pytest
from sqlalchemy import text
from sqlmodel import Session

from decision_router import tracker
from decision_router.pipeline import Pipeline
from decision_router.settings import Settings
from decision_router.store import create_schema, finite_json_text, json_text, make_engine
from decision_router.tables import AuditEvent
from tests.unit.test_enrich import CRM, ruleset_with

ORDINARY = {"features": {"é": [1, 2.5, None, True, -0.0, 1e16, 2**63 - 1]}, "text": "quote \" \\ \u2028", "n": None}


def test_ordinary_values_are_written_by_orjson_and_read_back_the_same() -> None:
    written = json_text(ORDINARY)
    assert written == json.dumps(ORDINARY, ensure_ascii=False, separators=(",", ":"))  # orjson's compact text
    assert json.loads(written) == ORDINARY


@pytest.mark.parametrize(
    "value",
    [{"score": math.nan}, {"features": [1.0, math.inf]}, {"x": -math.inf, "y": None}],
    ids=["nan", "infinity", "minus-infinity-beside-null"],
)
def test_non_finite_floats_are_written_as_json_dumps_writes_them_not_as_null(value: dict) -> None:
    # orjson writes NaN and Infinity as null: stored that way, they would read back as None.
    assert json_text(value) == json.dumps(value)


def test_a_nan_reads_back_as_nan() -> None:
    assert math.isnan(json.loads(json_text({"score": math.nan}))["score"])


@pytest.mark.parametrize(
    "value",
    [{"big": 10**30}, {"small": -(2**64)}, {1: "int key", None: "none key", 2.5: "float key"}],
    ids=["int-beyond-64-bits", "negative-int-beyond-64-bits", "keys-not-text"],
)
def test_values_orjson_refuses_are_written_by_json_dumps(value: dict) -> None:
    # The gate lets integers of up to 1,000 bits into documents (quality.MAX_INT_BITS).
    assert json_text(value) == json.dumps(value)


def test_nesting_deeper_than_orjson_takes_is_written_by_json_dumps() -> None:
    deep: list = []
    for _ in range(300):  # orjson stops at 254 levels; the gate allows deeper documents when configured so
        deep = [deep]
    assert json_text(deep) == json.dumps(deep)


def test_types_json_dumps_refuses_are_still_refused() -> None:
    # orjson would write a datetime; SQLAlchemy's json.dumps never stored one, so neither does this.
    with pytest.raises(TypeError):
        json_text({"at": datetime(2026, 11, 25, tzinfo=UTC)})


def test_the_engine_and_the_bulk_insert_write_the_same_text(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    details = [ORDINARY, {"score": math.nan}, {"big": 10**30}, {"é": "ü"}]
    rows = [{"alert_id": None, "prediction_id": f"p{n}", "type": "received", "actor": "a",
             "at": datetime(2026, 11, 25, tzinfo=UTC), "source_id": None, "detail": detail}
            for n, detail in enumerate(details)]
    with Session(engine) as session:
        tracker.bulk_insert(session, AuditEvent.__table__, rows)  # type: ignore[attr-defined]
        session.add_all(AuditEvent(**{**row, "prediction_id": "orm-" + row["prediction_id"]}) for row in rows)
        session.commit()
        stored = dict(session.execute(text("select prediction_id, detail from audit_events")).all())
    engine.dispose()
    assert [stored[f"p{n}"] for n in range(len(details))] == [json_text(d) for d in details]
    assert [stored[f"orm-p{n}"] for n in range(len(details))] == [json_text(d) for d in details]
    assert stored["p1"] == '{"score": NaN}'


@pytest.mark.parametrize(
    "value",
    [ORDINARY, {"big": 10**30}, {1: "int key", None: "none key"}, None, [None, {"a": None}], {"é": "ü", "n": -0.0}],
    ids=["ordinary", "int-beyond-64-bits", "keys-not-text", "null", "nulls", "text-and-minus-zero"],
)
def test_the_text_of_a_finite_value_is_json_texts_without_its_check(value: object) -> None:
    assert finite_json_text(value) == json_text(value)


def test_the_finite_variant_still_refuses_what_json_dumps_refuses() -> None:
    with pytest.raises(TypeError):
        finite_json_text({"at": datetime(2026, 11, 25, tzinfo=UTC)})


def test_only_rows_said_to_be_finite_skip_the_check(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    row = {"alert_id": None, "type": "received", "actor": "a", "at": datetime(2026, 11, 25, tzinfo=UTC),
           "source_id": None, "detail": {"score": math.nan}}
    table = AuditEvent.__table__  # type: ignore[attr-defined]
    with Session(engine) as session:
        tracker.bulk_insert(session, table, [{**row, "prediction_id": "checked"}])
        tracker.bulk_insert(session, table, [{**row, "prediction_id": "trusted"}], finite=True)
        session.commit()
        stored = dict(session.execute(text("select prediction_id, detail from audit_events")).all())
    engine.dispose()
    # The check is what keeps a NaN: a caller that says finite wrongly stores null.
    assert stored == {"checked": '{"score": NaN}', "trusted": '{"score":null}'}


async def test_a_batch_with_looked_up_context_keeps_the_check(tmp_path: Path) -> None:
    """The gate refuses NaN and infinity in predictions, not in context an enricher looks up:
    a batch with lookups is stored with the check, so such a value is not stored as null."""
    ruleset = ruleset_with(tmp_path, CRM)
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    redis = fakeredis.aioredis.FakeRedis()
    pipeline = Pipeline(settings=Settings(stream_prefix="t:"), ruleset=ruleset, engine=engine, redis=redis)

    class NaNLookup:
        async def lookup(self, predictions: object) -> dict:
            return {p.prediction_id: {"crm": {"tier": math.nan}} for p in predictions}  # type: ignore[attr-defined]

    pipeline.enricher = NaNLookup()
    document = {"prediction_id": "p1", "model": "churn", "model_version": "1", "entity_type": "account",
                "entity_id": "a1", "score": 0.9, "predicted_at": datetime.now(UTC).isoformat()}
    result = await pipeline.process_predictions([("1-0", {"data": json.dumps(document)})])
    await redis.aclose()
    assert result.accepted == 1
    with Session(engine) as session:
        [stored] = session.execute(text("select document from predictions")).scalars().all()
        contexts = session.execute(text("select context from alerts where rule = 'a'")).scalars().all()
    engine.dispose()
    assert math.isnan(json.loads(stored)["lookup"]["crm"]["tier"])
    assert [math.isnan(json.loads(c)["lookup.crm.tier"]) for c in contexts] == [True]
