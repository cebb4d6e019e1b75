"""The quality gate: every kind of bad input gets its own reason, good input parses both ways."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from decision_router import quality
from decision_router.contracts import OutcomeEvent, OutcomeType, Prediction, Rejection, RejectionReason
from decision_router.quality import check_outcome, check_prediction
from decision_router.rules.compile import lookup

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
GOOD = {
    "prediction_id": "p1",
    "model": "churn",
    "model_version": "2026.11",
    "entity_type": "account",
    "entity_id": "acct-1",
    "score": 0.91,
    "predicted_at": "2026-11-25T11:00:00Z",
    "features": {"top_drivers": ["usage_drop"]},
    "context": {"segment": "enterprise", "account_manager": "alice"},
}


def gate(entry: dict, **kw) -> Prediction | Rejection:
    return check_prediction(
        entry,
        now=NOW,
        max_age=kw.get("max_age", timedelta(hours=24)),
        max_skew=timedelta(minutes=5),
        source_stream="predictions",
        source_id="1-0",
    )


def as_data(document: dict) -> dict[bytes, bytes]:
    return {b"data": json.dumps(document).encode()}


def flat(document: dict) -> dict[bytes, bytes]:
    fields = {}
    for key, value in document.items():
        if isinstance(value, dict):
            for sub, subvalue in value.items():
                fields[f"{key}.{sub}".encode()] = str(subvalue).encode()
        else:
            fields[key.encode()] = str(value).encode()
    return fields


@pytest.mark.parametrize("encode", [as_data, flat], ids=["data-json", "flat-fields"])
def test_good_prediction_parses_from_both_producer_forms(encode) -> None:
    result = gate(encode(GOOD))
    assert isinstance(result, Prediction), result
    assert result.prediction_id == "p1"
    assert result.score == pytest.approx(0.91)
    assert result.context["account_manager"] == "alice"
    assert result.predicted_at == datetime(2026, 11, 25, 11, 0, tzinfo=UTC)


def test_flat_nested_field_may_be_json_text() -> None:
    fields = flat({k: v for k, v in GOOD.items() if k != "context"})
    fields[b"context"] = json.dumps({"segment": "smb", "arr": 1200}).encode()
    result = gate(fields)
    assert isinstance(result, Prediction)
    assert result.context == {"segment": "smb", "arr": 1200}


def test_a_flat_dotted_key_nests_at_each_dot_as_rule_paths_read_it() -> None:
    """`context.crm.tier` was stored as the one name "crm.tier", which no rule path can address
    (paths split on dots): it is {"crm": {"tier": ...}}, merged with the other keys and the JSON text."""
    fields = {**flat(GOOD), b"context.crm.tier": b"gold", b"context.crm.plan.name": b"pro", b"features.x.y": b"1"}
    result = gate(fields)
    assert isinstance(result, Prediction), result
    assert result.context == {**GOOD["context"], "crm": {"tier": "gold", "plan": {"name": "pro"}}}
    assert result.features["x"] == {"y": "1"}
    document = result.as_document()
    assert (lookup(document, "context.crm.tier"), lookup(document, "context.crm.plan.name")) == ("gold", "pro")
    # With JSON text for the same field: objects merged, and where both give a value the dotted key wins.
    text = flat({k: v for k, v in GOOD.items() if k != "context"})
    text[b"context"] = json.dumps({"crm": {"tier": "silver", "owner": "ann"}, "segment": "smb"}).encode()
    merged = gate({**text, b"context.crm.tier": b"gold", b"context.region": b"emea"})
    assert isinstance(merged, Prediction), merged
    assert merged.context == {"crm": {"tier": "gold", "owner": "ann"}, "segment": "smb", "region": "emea"}


def test_naive_timestamp_is_read_as_utc() -> None:
    result = gate(as_data({**GOOD, "predicted_at": "2026-11-25T11:30:00"}))
    assert isinstance(result, Prediction)
    assert result.predicted_at.tzinfo is not None
    assert result.predicted_at.hour == 11


def _without(key: str) -> dict:
    return {k: v for k, v in GOOD.items() if k != key}


BAD = [
    ("not-json", {b"data": b"{nope"}, RejectionReason.INVALID_JSON, "not valid JSON"),
    ("json-array", {b"data": b"[1, 2]"}, RejectionReason.INVALID_JSON, "JSON object"),
    ("no-prediction-id", as_data(_without("prediction_id")), RejectionReason.MISSING_ID, "prediction_id"),
    ("empty-entity-id", as_data({**GOOD, "entity_id": ""}), RejectionReason.MISSING_ID, "entity_id"),
    ("no-entity-type", flat(_without("entity_type")), RejectionReason.MISSING_ID, "entity_type"),
    ("score-not-number", as_data({**GOOD, "score": "high"}), RejectionReason.SCHEMA, "score"),
    ("no-model", as_data(_without("model")), RejectionReason.SCHEMA, "model"),
    # Whitespace alone is refused as an empty value is, in every required text field: for an id as missing_id
    # (the gate checks ids first), for the others as schema, as "" is.
    ("blank-prediction-id", as_data({**GOOD, "prediction_id": " "}), RejectionReason.MISSING_ID,
     "missing or empty: prediction_id"),
    ("blank-model", as_data({**GOOD, "model": " "}), RejectionReason.SCHEMA, "model: blank (only whitespace)"),
    ("blank-model-version", as_data({**GOOD, "model_version": " \t"}), RejectionReason.SCHEMA,
     "model_version: blank (only whitespace)"),
    ("flat-blank-model-version", flat({**GOOD, "model_version": "\u00a0"}), RejectionReason.SCHEMA,
     "model_version: blank (only whitespace)"),
    ("unknown-field", as_data({**GOOD, "colour": "red"}), RejectionReason.SCHEMA, "colour"),
    ("bad-timestamp", as_data({**GOOD, "predicted_at": "yesterday"}), RejectionReason.SCHEMA, "predicted_at"),
    ("score-above-1", as_data({**GOOD, "score": 1.2}), RejectionReason.SCORE_OUT_OF_RANGE, "1.2"),
    ("score-negative", flat({**GOOD, "score": -0.1}), RejectionReason.SCORE_OUT_OF_RANGE, "-0.1"),
    ("score-nan", flat({**GOOD, "score": "nan"}), RejectionReason.SCHEMA, "score"),
    ("stale", as_data({**GOOD, "predicted_at": "2026-11-23T11:00:00Z"}), RejectionReason.STALE,
     "predicted_at is 2d1h old; the limit is 1d"),
    ("future", as_data({**GOOD, "predicted_at": "2026-11-25T13:00:00Z"}), RejectionReason.FROM_FUTURE,
     "predicted_at is 1h in the future"),
    ("context-not-object", flat({**_without("context"), "context": "[1]"}), RejectionReason.INVALID_JSON, "context"),
    # An empty name in a dotted key: no rule can address it (rule paths refuse empty segments).
    ("flat-empty-name", {**flat(GOOD), b"context.": b"x"}, RejectionReason.SCHEMA,
     "context.: empty name in a dotted key"),
    ("flat-empty-segment", {**flat(GOOD), b"context..a": b"x"}, RejectionReason.SCHEMA,
     "context..a: empty name in a dotted key"),
    ("flat-trailing-dot", {**flat(GOOD), b"features.a.": b"x"}, RejectionReason.SCHEMA,
     "features.a.: empty name in a dotted key"),
    # ... and in the JSON form, or a flat field's JSON text.
    ("json-empty-name", as_data({**GOOD, "context": {"": 1}}), RejectionReason.SCHEMA,
     "context.: an empty name, which no rule path can address"),
    ("json-empty-name-deeper", as_data({**GOOD, "features": {"x": {"": 1}}}), RejectionReason.SCHEMA,
     "features.x.: an empty name, which no rule path can address"),
    ("flat-json-text-empty-name", {**flat(_without("context")), b"context": b'{"": 1}'}, RejectionReason.SCHEMA,
     "context.: an empty name, which no rule path can address"),
    # A name given both as a value and as an object: either would hide the other.
    ("flat-value-then-object", {**flat(GOOD), b"context.crm": b"x", b"context.crm.tier": b"gold"},
     RejectionReason.SCHEMA, "context.crm: given both as a value (context.crm) and as an object (context.crm.tier)"),
    ("flat-object-then-value", {**flat(GOOD), b"context.crm.tier.id": b"7", b"context.crm": b"x"},
     RejectionReason.SCHEMA, "context.crm: given both as a value (context.crm) and as an object (context.crm.tier.id)"),
    ("json-value-dotted-object", {**flat(_without("context")), b"context": b'{"crm": "x"}', b"context.crm.tier": b"1"},
     RejectionReason.SCHEMA,
     "context.crm: given both as a value (in the context JSON text) and as an object (context.crm.tier)"),
    ("json-object-dotted-value", {**flat(_without("context")), b"context.crm": b"x", b"context": b'{"crm": {"t": 1}}'},
     RejectionReason.SCHEMA,
     "context.crm: given both as a value (context.crm) and as an object (in the context JSON text)"),
]


@pytest.mark.parametrize(("entry", "reason", "detail_part"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_rejected_with_reason(entry: dict, reason: RejectionReason, detail_part: str) -> None:
    result = gate(entry)
    assert isinstance(result, Rejection)
    assert result.reason is reason
    assert detail_part in result.detail
    assert result.source_id == "1-0"
    # The original entry is kept verbatim so the producer can see what it sent.
    assert json.loads(result.payload) == {k.decode(): v.decode() for k, v in entry.items()}


@pytest.mark.parametrize("field", ["prediction_id", "entity_type", "entity_id", "model", "model_version"])
@pytest.mark.parametrize("value", ["", " ", "\t\n"], ids=["empty", "space", "tab-newline"])
def test_a_blank_required_text_field_is_refused_alike_on_both_paths(
    field: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `data` entry of a plain prediction takes the orjson path (`_proven_document`); with that path
    declined it takes the json path: both give the same rejection, and a blank is refused as an empty value."""
    entry = as_data({**GOOD, field: value})
    fast = gate(entry)
    monkeypatch.setattr(quality, "_proven_document", lambda entry, max_depth: None)
    slow = gate(entry)
    assert isinstance(fast, Rejection) and isinstance(slow, Rejection), (fast, slow)
    assert (fast.reason, fast.detail, fast.model) == (slow.reason, slow.detail, slow.model)
    empty = gate(as_data({**GOOD, field: ""}))
    assert isinstance(empty, Rejection) and fast.reason is empty.reason
    assert field in fast.detail


def test_a_blank_model_is_not_named_as_the_rejections_model() -> None:
    # Per-model rejection counts (stats quality, the drift monitor) would list a model called "  ".
    result = gate(as_data({**GOOD, "model": "  ", "score": 3}))
    assert isinstance(result, Rejection) and result.model is None


def test_rejection_names_the_model_when_known() -> None:
    result = gate(as_data({**GOOD, "score": 3}))
    assert isinstance(result, Rejection) and result.model == "churn"
    result = gate({b"data": b"garbage"})
    assert isinstance(result, Rejection) and result.model is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('"score": NaN', RejectionReason.SCHEMA), ('"score": Infinity', RejectionReason.SCHEMA),
        ('"score": 1e999', RejectionReason.SCHEMA), ('"note": "a\\u0000b"', RejectionReason.INVALID_ENCODING),
        ('"note": "\\ud800"', RejectionReason.INVALID_ENCODING),
        ('"note": ' + "[" * 20 + "]" * 20, RejectionReason.TOO_DEEP),
    ],
    ids=["nan", "infinity", "overflow", "nul", "lone-surrogate", "too-deep"],
)
def test_a_value_rejected_by_the_walk_still_names_the_model(text: str, reason: RejectionReason) -> None:
    # The per-model rejection counts (and the data-quality alert on them) need the model of a
    # prediction whose score is NaN as much as of any other.
    body = json.dumps({k: v for k, v in GOOD.items() if k != "score"})
    entry = {b"data": (body[:-1] + ", " + text + ("" if "score" in text else ', "score": 0.5') + "}").encode()}
    result = gate(entry)
    assert isinstance(result, Rejection), result
    assert result.reason is reason
    assert result.model == "churn"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({b"context.": b"1"}, RejectionReason.SCHEMA),
        ({b"context.crm": b"gold", b"context.crm.tier": b"x"}, RejectionReason.SCHEMA),
        ({b"context.crm.tier": b"x", b"context": b'{"crm": "gold"}'}, RejectionReason.SCHEMA),
        ({b"context": b"{not json"}, RejectionReason.INVALID_JSON),
        ({b"features": b"[1, 2]"}, RejectionReason.INVALID_JSON),
    ],
    ids=["empty-name", "value-and-object", "dotted-over-json-text", "bad-json-text", "not-an-object"],
)
def test_a_flat_entry_rejected_while_nesting_still_names_the_model(fields: dict, reason: RejectionReason) -> None:
    # README "Dead-letter entries": `model` is the prediction's model if it could be read. A flat entry
    # names it in its own field, so its rejection counts under churn (stats quality), not "(unknown)".
    entry = {**flat({k: v for k, v in GOOD.items() if k not in ("context", "features")}), **fields}
    result = gate(entry)
    assert isinstance(result, Rejection), result
    assert result.reason is reason
    assert result.model == "churn"


def test_max_age_is_configurable() -> None:
    old = as_data({**GOOD, "predicted_at": "2026-11-23T11:00:00Z"})
    assert isinstance(gate(old, max_age=timedelta(days=7)), Prediction)


def test_a_stale_age_of_days_reads_in_the_duration_style_to_the_second() -> None:
    """Not Python's "1 day, 5:41:06.130401" (nor "3 days, 0:00:00" for the limit)."""
    at = NOW - timedelta(days=9, hours=5, minutes=41, seconds=6, microseconds=130401)
    result = gate(as_data({**GOOD, "predicted_at": at.isoformat()}), max_age=timedelta(days=3))
    assert isinstance(result, Rejection) and result.reason is RejectionReason.STALE
    assert result.detail == "predicted_at is 9d5h41m6s old; the limit is 3d"


OUTCOMES_OK = [
    ("by-alert", {"alert_id": "al-1", "type": "acknowledged", "actor": "alice"}, OutcomeType.ACKNOWLEDGED),
    ("by-prediction", {"prediction_id": "p1", "type": "intervened", "actor": "alice", "action": "call"}, OutcomeType.INTERVENED),
    ("by-entity", {"entity_type": "account", "entity_id": "a1", "type": "outcome", "result": "success", "actor": "crm", "value": "1200"}, OutcomeType.OUTCOME),
    ("reassigned", {"alert_id": "al-1", "type": "reassigned", "actor": "ops", "owner": "bob"}, OutcomeType.REASSIGNED),
    ("empty-flat-fields-ignored", {"alert_id": "al-1", "prediction_id": "", "type": "acknowledged", "actor": "a"}, OutcomeType.ACKNOWLEDGED),
]


@pytest.mark.parametrize(("fields", "kind"), [o[1:] for o in OUTCOMES_OK], ids=[o[0] for o in OUTCOMES_OK])
def test_outcome_events_parse(fields: dict, kind: OutcomeType) -> None:
    result = check_outcome({k.encode(): v.encode() for k, v in fields.items()}, source_stream="outcomes")
    assert isinstance(result, OutcomeEvent), result
    assert result.type is kind


OUTCOMES_BAD = [
    ("no-address", {"type": "acknowledged", "actor": "a"}, "exactly one of"),
    ("two-addresses", {"alert_id": "x", "prediction_id": "p", "type": "acknowledged", "actor": "a"}, "exactly one of"),
    ("half-entity", {"entity_type": "account", "type": "acknowledged", "actor": "a"}, "both entity_type and entity_id"),
    ("outcome-without-result", {"alert_id": "x", "type": "outcome", "actor": "a"}, "needs result"),
    ("result-on-ack", {"alert_id": "x", "type": "acknowledged", "result": "success", "actor": "a"}, "only allowed"),
    ("bad-type", {"alert_id": "x", "type": "liked", "actor": "a"}, "type"),
    ("bad-result", {"alert_id": "x", "type": "outcome", "result": "meh", "actor": "a"}, "result"),
    ("no-actor", {"alert_id": "x", "type": "acknowledged"}, "actor"),
    ("blank-actor", {"alert_id": "x", "type": "acknowledged", "actor": "  "}, "actor: blank (only whitespace)"),
    ("reassign-without-owner", {"alert_id": "x", "type": "reassigned", "actor": "ops"}, "new owner"),
    # Whitespace alone addresses no alert and names no owner: refused as blank, not looked up as unknown_alert or
    # unknown_owner.
    ("blank-alert-id", {"alert_id": " ", "type": "acknowledged", "actor": "a"}, "alert_id: blank (only whitespace)"),
    ("blank-prediction-id", {"prediction_id": "\t", "type": "acknowledged", "actor": "a"},
     "prediction_id: blank (only whitespace)"),
    ("blank-entity-type", {"entity_type": " ", "entity_id": "a1", "type": "acknowledged", "actor": "a"},
     "entity_type: blank (only whitespace)"),
    ("blank-entity-id", {"entity_type": "account", "entity_id": "\n ", "type": "acknowledged", "actor": "a"},
     "entity_id: blank (only whitespace)"),
    ("blank-owner", {"alert_id": "x", "type": "reassigned", "actor": "ops", "owner": " "},
     "owner: blank (only whitespace)"),
    ("owner-on-ack", {"alert_id": "x", "type": "acknowledged", "actor": "a", "owner": "bob"}, "only allowed on type: reassigned"),
]


@pytest.mark.parametrize(("fields", "detail_part"), [o[1:] for o in OUTCOMES_BAD], ids=[o[0] for o in OUTCOMES_BAD])
def test_bad_outcome_events_are_rejected(fields: dict, detail_part: str) -> None:
    result = check_outcome({"data": json.dumps(fields)}, source_stream="outcomes", source_id="9-0")
    assert isinstance(result, Rejection)
    assert result.reason is RejectionReason.SCHEMA
    assert detail_part in result.detail
    flat_result = check_outcome(fields, source_stream="outcomes", source_id="9-0")  # a flat producer's entry
    assert isinstance(flat_result, Rejection)
    assert (flat_result.reason, flat_result.detail) == (result.reason, result.detail)


@pytest.mark.parametrize("stamp", ["9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_a_time_past_the_calendar_in_utc_is_a_schema_rejection_not_a_crash(stamp: str) -> None:
    # Valid ISO text whose UTC time is after 9999 or before the year 1: astimezone raises OverflowError.
    result = gate(as_data({**GOOD, "predicted_at": stamp}))
    assert isinstance(result, Rejection) and result.reason is RejectionReason.SCHEMA, result
    assert result.detail.startswith("predicted_at: out of range"), result.detail
    outcome = check_outcome({"data": json.dumps({"alert_id": "al-1", "type": "acknowledged", "actor": "a", "at": stamp})},
                            source_stream="outcomes", now=NOW, max_skew=timedelta(minutes=5))
    assert isinstance(outcome, Rejection) and outcome.reason is RejectionReason.SCHEMA
    assert outcome.detail.startswith("at: out of range"), outcome.detail


def test_an_outcome_dated_in_the_future_is_refused_like_a_prediction() -> None:
    def check(at: datetime) -> OutcomeEvent | Rejection:
        event = {"alert_id": "al-1", "type": "intervened", "actor": "a", "action": "call", "at": at.isoformat()}
        return check_outcome({"data": json.dumps(event)}, source_stream="outcomes", now=NOW,
                             max_skew=timedelta(minutes=5))

    assert isinstance(check(NOW + timedelta(minutes=4)), OutcomeEvent)  # within the clock skew
    far = check(datetime(9999, 12, 31, tzinfo=UTC))
    assert isinstance(far, Rejection) and far.reason is RejectionReason.FROM_FUTURE
    assert far.detail == "at is 2912113d12h in the future"
    assert check(NOW + timedelta(minutes=5, seconds=30.2)).detail == "at is 5m30s in the future"


def test_a_boolean_score_or_value_is_a_schema_rejection_not_one_or_zero() -> None:
    result = gate(as_data({**GOOD, "score": True}))
    assert isinstance(result, Rejection) and result.reason is RejectionReason.SCHEMA
    assert result.detail == "score: a boolean is not a number here"
    event = {"alert_id": "al-1", "type": "outcome", "result": "success", "actor": "crm", "value": False}
    outcome = check_outcome({"data": json.dumps(event)}, source_stream="outcomes")
    assert isinstance(outcome, Rejection) and outcome.detail == "value: a boolean is not a number here"
    # Numbers as text (the flat form) are still numbers.
    assert isinstance(gate({k.encode(): str(v).encode() for k, v in GOOD.items()
                            if not isinstance(v, (dict, list))}), Prediction)
