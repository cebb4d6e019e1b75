"""The quality gate: a raw stream entry becomes a typed message or a Rejection with a reason.

Nothing here raises on bad input; every failure is a value the pipeline sends to a
dead-letter stream and counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ValidationError

from decision_router.contracts import OutcomeEvent, Prediction, Rejection, RejectionReason
from decision_router.streams import as_text

RawEntry = Mapping[bytes | str, bytes | str]
ID_FIELDS = ("prediction_id", "entity_type", "entity_id")
# Flat producers cannot nest, so these may arrive as JSON text or as dotted keys.
NESTED_FIELDS = ("features", "context")


class _Reject(Exception):
    def __init__(self, reason: RejectionReason, detail: str) -> None:
        self.reason, self.detail = reason, detail


def original_payload(entry: RawEntry) -> str:
    """The entry's fields as JSON text, kept verbatim in the dead-letter stream."""
    return json.dumps({as_text(k): as_text(v) for k, v in entry.items()}, ensure_ascii=False)


def decode_entry(entry: RawEntry) -> dict[str, Any]:
    """`XADD s * data '<json>'` or flat fields (`XADD s * prediction_id p1 score 0.9 ...`) -> dict."""
    fields = {as_text(k): as_text(v) for k, v in entry.items()}
    if set(fields) == {"data"}:
        try:
            document = json.loads(fields["data"])
        except ValueError as exc:
            raise _Reject(RejectionReason.INVALID_JSON, f"data is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise _Reject(RejectionReason.INVALID_JSON, "data must hold a JSON object")
        return document
    document: dict[str, Any] = {}
    for key, value in fields.items():
        head, dot, rest = key.partition(".")
        if dot and head in NESTED_FIELDS:
            document.setdefault(head, {})
            if not isinstance(document[head], dict):
                raise _Reject(RejectionReason.SCHEMA, f"{head}: given both as a value and as {key}")
            document[head][rest] = value
        elif key in NESTED_FIELDS:
            try:
                nested = json.loads(value)
            except ValueError:
                raise _Reject(RejectionReason.INVALID_JSON, f"{key} is not valid JSON") from None
            if not isinstance(nested, dict):
                raise _Reject(RejectionReason.INVALID_JSON, f"{key} must hold a JSON object")
            document[key] = {**nested, **document.get(key, {})}
        else:
            document[key] = value
    return document


def _schema_detail(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error["loc"]) or "message"
        parts.append(f"{where}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


def _validate(model: type[BaseModel], document: dict[str, Any]) -> Any:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise _Reject(RejectionReason.SCHEMA, _schema_detail(exc)) from None


def check_prediction(
    entry: RawEntry,
    *,
    now: datetime,
    max_age: timedelta,
    max_skew: timedelta,
    source_stream: str,
    source_id: str | None = None,
) -> Prediction | Rejection:
    """Everything but duplicates, which need the store; the pipeline checks those."""
    document: dict[str, Any] = {}
    try:
        document = decode_entry(entry)
        missing = [f for f in ID_FIELDS if not str(document.get(f) or "").strip()]
        if missing:
            raise _Reject(RejectionReason.MISSING_ID, f"missing or empty: {', '.join(missing)}")
        prediction: Prediction = _validate(Prediction, document)
        if not 0.0 <= prediction.score <= 1.0:
            raise _Reject(RejectionReason.SCORE_OUT_OF_RANGE, f"score {prediction.score} is outside 0..1")
        age = now - prediction.predicted_at
        if age > max_age:
            raise _Reject(RejectionReason.STALE, f"predicted_at is {age} old; the limit is {max_age}")
        if -age > max_skew:
            raise _Reject(RejectionReason.FROM_FUTURE, f"predicted_at is {-age} in the future")
        return prediction
    except _Reject as rejected:
        model = document.get("model")
        return Rejection(
            reason=rejected.reason,
            detail=rejected.detail,
            model=model if isinstance(model, str) and model else None,
            source_stream=source_stream,
            source_id=source_id,
            payload=original_payload(entry),
        )


def check_outcome(entry: RawEntry, *, source_stream: str, source_id: str | None = None) -> OutcomeEvent | Rejection:
    """Parse an outcome event; whether its alert exists is the tracker's question."""
    try:
        document = decode_entry(entry)
        # Flat producers send "" for fields they do not use.
        document = {k: v for k, v in document.items() if v != ""}
        return _validate(OutcomeEvent, document)
    except _Reject as rejected:
        return Rejection(
            reason=rejected.reason,
            detail=rejected.detail,
            source_stream=source_stream,
            source_id=source_id,
            payload=original_payload(entry),
        )
