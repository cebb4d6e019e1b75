"""JSON columns are written by store.json_text (orjson, json.dumps where orjson would refuse the value
or store another): every value reads back as json.dumps' text of it reads back."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlmodel import Session

from decision_router import tracker
from decision_router.store import create_schema, json_text, make_engine
from decision_router.tables import AuditEvent

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
