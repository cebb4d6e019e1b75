"""Hostile prediction and outcome payloads, as they arrive from Redis: the gate never raises,
every bad entry becomes a Rejection with a reason and a detail that can be stored, and
whatever it accepts can be stored and routed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decision_router.contracts import OutcomeEvent, Prediction, Rejection, RejectionReason
from decision_router.quality import PayloadLimits, check_outcome, check_prediction
from decision_router.settings import SettingsError, load_settings

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
GOOD: dict[str, Any] = {
    "prediction_id": "p1",
    "model": "churn",
    "model_version": "2026.11",
    "entity_type": "account",
    "entity_id": "acct-1",
    "score": 0.91,
    "predicted_at": "2026-11-25T11:00:00Z",
    "features": {"top_drivers": ["usage_drop"]},
    "context": {"segment": "enterprise", "arr": 120000},
}
GOOD_OUTCOME: dict[str, Any] = {"type": "outcome", "alert_id": "al-1", "actor": "crm", "result": "success", "value": 5.0}
SMALL = PayloadLimits(max_bytes=4096, max_depth=6)
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def gate(entry: Any, limits: PayloadLimits = SMALL) -> Prediction | Rejection:
    return check_prediction(
        entry, now=NOW, max_age=timedelta(days=1), max_skew=timedelta(minutes=5),
        source_stream="predictions", source_id="1-0", limits=limits,
    )


def outcome_gate(entry: Any, limits: PayloadLimits = SMALL) -> OutcomeEvent | Rejection:
    return check_outcome(entry, source_stream="outcomes", source_id="1-0", limits=limits)


def storable(text: str) -> bool:
    """What PostgreSQL text and Redis take: UTF-8 without NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (*strings_in(k), *strings_in(v))]
    if isinstance(value, list):
        return [s for item in value for s in strings_in(item)]
    return []


def assert_well_formed(result: Any, limits: PayloadLimits = SMALL) -> None:
    """A Rejection any store and the DLQ stream can take, or an input that can be stored."""
    if isinstance(result, Rejection):
        assert isinstance(result.reason, RejectionReason)
        assert result.detail.strip()
        assert len(result.detail) <= 600
        for text in (result.detail, result.model or "", result.payload):
            assert storable(text), text[:200]
        assert result.model is None or len(result.model) <= 200
        # The DLQ keeps a bounded copy of what arrived.
        assert len(result.payload.encode()) <= 8 * limits.max_bytes
        json.loads(result.payload)
        return
    document = result.model_dump(mode="json")
    # Stored as JSON (PostgreSQL json refuses NaN) and as text columns.
    json.dumps(document, allow_nan=False)
    assert all(storable(s) for s in strings_in(document))
    if isinstance(result, Prediction):
        assert 0.0 <= result.score <= 1.0


# Values JSON can carry, including the ones Python's json module lets through although no
# store can hold them: NaN, infinities, 1e999, 400-digit integers, lone surrogates, NUL.
json_scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(), st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=50), st.sampled_from(["\x00", "a\ud800b", "\udfff", "\u202e", "x" * 300, ""]),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
raw_texts = st.one_of(
    st.binary(max_size=80),  # includes bytes that are not UTF-8
    st.text(max_size=80),
    st.sampled_from([b"\xff\xfe", b"\xc3", "\x00", b"\x00", "9" * 5000, "1e999", "NaN", "-Infinity", "[" * 3000]),
)


def encode(document: dict[str, Any], form: str) -> dict[bytes, bytes]:
    if form == "data":
        # ensure_ascii escapes lone surrogates as \\udXXX, the way a producer smuggles them in.
        return {b"data": json.dumps(document).encode()}
    fields: dict[bytes, bytes] = {}
    for key, value in document.items():
        text = value if isinstance(value, str) else json.dumps(value)
        fields[key.encode("utf-8", "surrogatepass")] = text.encode("utf-8", "surrogatepass")
    return fields


@st.composite
def mutated(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """A good message with fields dropped, replaced by hostile values, or added."""
    document = dict(base)
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True)):
        del document[key]
    for key in draw(st.lists(st.sampled_from(sorted(base)), max_size=3, unique=True)):
        document[key] = draw(json_values)
    for key, value in draw(st.dictionaries(st.text(max_size=12), json_values, max_size=2)).items():
        document[key] = value
    return document


@PROPERTY
@given(document=mutated(GOOD), form=st.sampled_from(["data", "flat"]))
def test_mutated_predictions_never_raise_and_reject_with_a_storable_reason(document, form) -> None:
    assert_well_formed(gate(encode(document, form)))


@PROPERTY
@given(document=mutated(GOOD_OUTCOME), form=st.sampled_from(["data", "flat"]))
def test_mutated_outcomes_never_raise_and_reject_with_a_storable_reason(document, form) -> None:
    assert_well_formed(outcome_gate(encode(document, form)))


@PROPERTY
@given(entry=st.dictionaries(raw_texts, raw_texts, max_size=6))
def test_arbitrary_stream_entries_never_raise(entry) -> None:
    for result in (gate(entry), outcome_gate(entry)):
        assert_well_formed(result)
        # Nothing here is a complete, valid message: an accidental pass would mean the gate is too lax.
        assert isinstance(result, Rejection)


@PROPERTY
@given(data=st.one_of(json_values.map(lambda v: json.dumps(v)), raw_texts))
def test_any_data_field_never_raises(data) -> None:
    result = gate({b"data": data})
    assert_well_formed(result)
    assert isinstance(result, Rejection)


@PROPERTY
@given(key=st.sampled_from(["context", "features"]), value=json_values)
def test_hostile_nested_field_values_are_rejected_or_stored_safely(key, value) -> None:
    entry = encode({**GOOD, key: value}, "data")
    result = gate(entry)
    assert_well_formed(result)
    if not isinstance(value, dict):  # context and features must be objects
        assert isinstance(result, Rejection)
        if result.reason is RejectionReason.TOO_LARGE:  # huge integers can make the entry itself too big
            assert sum(len(k) + len(v) for k, v in entry.items()) > SMALL.max_bytes
        else:
            assert result.reason in (RejectionReason.SCHEMA, RejectionReason.INVALID_ENCODING, RejectionReason.TOO_DEEP)


# -- the limits, one by one -----------------------------------------------------------------


def test_size_is_checked_before_parsing_and_the_dlq_keeps_a_bounded_copy() -> None:
    huge = b"{" + b"x" * 1_000_000  # not even JSON: too_large wins because nothing is parsed
    result = gate({b"data": huge})
    assert isinstance(result, Rejection) and result.reason is RejectionReason.TOO_LARGE
    assert result.detail == f"{len(huge) + 4} bytes; the limit is 4096"
    assert len(result.payload) < 2 * 4096
    assert json.loads(result.payload)["data"].endswith(f"... [{len(huge)} in all]")


def test_many_small_fields_count_towards_the_size_limit() -> None:
    entry = {f"context.k{i}".encode(): b"v" * 10 for i in range(500)}
    result = gate({**encode(GOOD, "flat"), **entry})
    assert isinstance(result, Rejection) and result.reason is RejectionReason.TOO_LARGE
    json.loads(result.payload)


def test_just_under_the_size_limit_is_accepted() -> None:
    entry = encode({**GOOD, "context": {"note": ""}}, "data")
    room = SMALL.max_bytes - len(entry[b"data"]) - len(b"data")
    accepted = gate(encode({**GOOD, "context": {"note": "n" * room}}, "data"))
    assert isinstance(accepted, Prediction), accepted
    rejected = gate(encode({**GOOD, "context": {"note": "n" * (room + 1)}}, "data"))
    assert isinstance(rejected, Rejection) and rejected.reason is RejectionReason.TOO_LARGE


def nest(levels: int) -> Any:
    value: Any = "leaf"
    for _ in range(levels):
        value = {"n": value}
    return value


def test_nesting_deeper_than_the_limit_is_rejected_with_the_path() -> None:
    # The message is level 1 and context level 2: 4 more levels fit a depth limit of 6.
    assert isinstance(gate(encode({**GOOD, "context": nest(5)}, "data")), Prediction)
    result = gate(encode({**GOOD, "context": nest(6)}, "data"))
    assert isinstance(result, Rejection) and result.reason is RejectionReason.TOO_DEEP
    assert result.detail == "context.n.n.n.n.n: nested more than 6 levels deep"


@pytest.mark.parametrize("field", [b"data", b"context"])
def test_nesting_too_deep_for_the_json_parser_is_too_deep_not_a_crash(field) -> None:
    entry = {field: b"[" * 60_000}  # Python's json raises RecursionError on this
    result = gate(entry, PayloadLimits(max_bytes=1 << 20, max_depth=10))
    assert isinstance(result, Rejection) and result.reason is RejectionReason.TOO_DEEP
    assert "nested too deeply" in result.detail


def test_bytes_that_are_not_utf8_are_rejected_not_replaced() -> None:
    entry = encode(GOOD, "flat")
    entry[b"entity_id"] = b"acct-\xff\xfe"
    result = gate(entry)
    assert isinstance(result, Rejection) and result.reason is RejectionReason.INVALID_ENCODING
    assert result.detail == "field entity_id is not valid UTF-8 (byte 5)"
    bad_name = gate({**encode(GOOD, "flat"), b"context.\xff": b"x"})
    assert isinstance(bad_name, Rejection) and bad_name.detail.startswith("a field name is not valid UTF-8")


@pytest.mark.parametrize(
    ("document", "reason", "detail"),
    [
        ({**GOOD, "entity_id": "a\x00b"}, RejectionReason.INVALID_ENCODING, "entity_id: text holds a NUL"),
        ({**GOOD, "context": {"note": "x\ud800"}}, RejectionReason.INVALID_ENCODING, "context.note: text holds"),
        ({**GOOD, "context": {"a\x00": 1}}, RejectionReason.INVALID_ENCODING, "context.a\\x00: field name holds"),
        ({**GOOD, "context": {"arr": float("nan")}}, RejectionReason.SCHEMA, "context.arr: nan is not a finite"),
        ({**GOOD, "features": {"x": [1, float("-inf")]}}, RejectionReason.SCHEMA, "features.x[1]: -inf is not"),
        ({**GOOD, "score": float("inf")}, RejectionReason.SCHEMA, "score: inf is not a finite number"),
        ({**GOOD, "context": {"arr": 10**400}}, RejectionReason.SCHEMA, "context.arr: an integer of 1329 bits"),
    ],
    ids=["nul", "surrogate", "nul-in-key", "nan", "infinity", "inf-score", "huge-int"],
)
def test_values_no_store_can_hold_are_rejected_with_their_path(document, reason, detail) -> None:
    result = gate(encode(document, "data"))
    assert isinstance(result, Rejection), result
    assert result.reason is reason
    assert result.detail.startswith(detail), result.detail
    assert storable(result.detail)


def test_json_constants_nan_and_1e999_in_the_raw_text_are_rejected() -> None:
    text = json.dumps(GOOD).replace('"arr": 120000', '"arr": NaN, "big": 1e999')
    result = gate({b"data": text.encode()})
    assert isinstance(result, Rejection) and result.reason is RejectionReason.SCHEMA
    assert result.detail == "context.arr: nan is not a finite number"


def test_hostile_model_name_and_long_field_names_keep_the_rejection_small() -> None:
    result = gate(encode({**GOOD, "model": "m\x00", "k" * 3000: 1}, "data"), PayloadLimits(1 << 20, 10))
    assert isinstance(result, Rejection)
    assert result.model is None  # not storable, so not counted under it
    assert len(result.detail) <= 600


def test_a_field_named_by_hundreds_of_digits_is_quoted_by_its_start_and_length() -> None:
    digits = "1234567890" * 40
    flat = gate({**encode(GOOD, "flat"), f"context.{digits}.".encode(): b"x"})
    assert isinstance(flat, Rejection) and flat.reason is RejectionReason.SCHEMA
    assert flat.detail == "context.12345678901234567890… (400 digits).: empty name in a dotted key"
    data = gate(encode({**GOOD, "context": {digits: float("nan")}}, "data"))
    assert isinstance(data, Rejection) and data.reason is RejectionReason.SCHEMA
    assert data.detail == "context.12345678901234567890… (400 digits): nan is not a finite number"


def test_dotted_keys_of_thousands_of_dots_are_too_deep_not_a_crash() -> None:
    """A flat key nests at each dot: 30,000 dots, or a dotted key merged into JSON text 900 levels deep,
    is answered quickly and without a RecursionError."""
    fields = encode(GOOD, "flat")
    deep = "context" + ".a" * 30_000
    for extra in ({deep: "x"}, {deep: "x", deep[:-2]: "y"},
                  {"context": '{"a":' * 900 + "{}" + "}" * 900, "context" + ".a" * 901: "x"},
                  {"context": '{"a":' * 900 + "1" + "}" * 900, "context" + ".a" * 901: "x"}):
        result = gate({**fields, **{k.encode(): v.encode() for k, v in extra.items()}}, PayloadLimits(1 << 20, 10))
        assert isinstance(result, Rejection) and result.reason in (RejectionReason.TOO_DEEP, RejectionReason.SCHEMA)
        assert len(result.detail) <= 600 and storable(result.detail)


def test_outcome_limits_apply_too() -> None:
    big = outcome_gate({b"data": b"x" * 5000})
    assert isinstance(big, Rejection) and big.reason is RejectionReason.TOO_LARGE
    bad = outcome_gate(encode({**GOOD_OUTCOME, "note": "a\x00"}, "flat"))
    assert isinstance(bad, Rejection) and bad.reason is RejectionReason.INVALID_ENCODING
    assert isinstance(outcome_gate(encode(GOOD_OUTCOME, "flat")), OutcomeEvent)


def test_limits_come_from_settings(monkeypatch) -> None:
    monkeypatch.setenv("DECISION_ROUTER_MAX_PAYLOAD_BYTES", "2048")
    monkeypatch.setenv("DECISION_ROUTER_MAX_PAYLOAD_DEPTH", "4")
    assert load_settings().payload_limits == PayloadLimits(max_bytes=2048, max_depth=4)
    monkeypatch.setenv("DECISION_ROUTER_MAX_PAYLOAD_BYTES", "10")
    with pytest.raises(SettingsError, match="DECISION_ROUTER_MAX_PAYLOAD_BYTES"):
        load_settings()


def test_default_limits_are_documented_values() -> None:
    limits = load_settings().payload_limits
    assert (limits.max_bytes, limits.max_depth) == (65536, 10)
