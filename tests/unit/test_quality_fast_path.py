"""The gate's orjson path (`_proven_document`) against the json path it stands in for
(`decode_entry` + `_check_document`): on any `data` text, either it declines, or it returns
exactly the document json.loads gives (same types, same key order) and the walk accepts."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decision_router.quality import (
    PayloadLimits,
    _check_document,
    _checked_document,
    _proven_document,
    _Reject,
    decode_entry,
)

PROPERTY = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def exact(value: Any) -> Any:
    """The value with every type and key order spelled out: 1 != 1.0 and {a, b} != {b, a} here."""
    if isinstance(value, dict):
        return ("dict", [(k, exact(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [exact(v) for v in value])
    if isinstance(value, float) and value != value:
        return ("float", "nan")
    return (type(value).__name__, value)


def reference(entry: dict[Any, Any], max_depth: int) -> Any:
    """What the json path gives: the exact document, or the rejection's reason and detail."""
    try:
        document = decode_entry(entry)
        _check_document(document, max_depth)
    except _Reject as rejected:
        return ("rejected", rejected.reason, rejected.detail)
    return exact(document)


def checked(entry: dict[Any, Any], max_depth: int) -> Any:
    try:
        return exact(_checked_document(entry, PayloadLimits(max_depth=max_depth)))
    except _Reject as rejected:
        return ("rejected", rejected.reason, rejected.detail)


def agrees(entry: dict[Any, Any], max_depth: int) -> None:
    proven = _proven_document(entry, max_depth)
    expected = reference(entry, max_depth)
    if proven is not None:
        assert exact(proven) == expected
    assert checked(entry, max_depth) == expected


numbers = st.one_of(
    st.integers(), st.integers(min_value=2**62, max_value=2**66), st.integers(max_value=-(2**62), min_value=-(2**66)),
    st.floats(allow_nan=False, allow_infinity=False), st.floats(min_value=-1e-300, max_value=1e-300),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=20),
                    st.sampled_from(["\x00", "a\ud800b", "\udfff", "\ud83d\ude00", "é", "[{", "\\u0000"]))
values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=6), children, max_size=4), max_leaves=20)
documents = st.dictionaries(st.text(max_size=8), values, max_size=6)


@PROPERTY
@given(document=documents, ensure_ascii=st.booleans(), as_bytes=st.booleans(), max_depth=st.integers(1, 12))
def test_json_documents_give_what_the_json_path_gives(document, ensure_ascii, as_bytes, max_depth) -> None:
    text = json.dumps(document, ensure_ascii=ensure_ascii)  # NaN/Infinity never: floats are finite
    try:
        data: str | bytes = text.encode("utf-8") if as_bytes else text
    except UnicodeEncodeError:  # a lone surrogate and ensure_ascii=False: not bytes Redis could hold
        data = text
    agrees({b"data" if as_bytes else "data": data}, max_depth)


number_literals = st.one_of(
    st.from_regex(r"\A-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,25})?([eE][+-]?[0-9]{1,3})?\Z"),
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", "1e-400", "9223372036854775807",
                     "9223372036854775808", "-9223372036854775809", "18446744073709551616", "1" * 400]),
)


@PROPERTY
@given(literal=number_literals)
def test_number_literals_keep_their_type_and_value(literal) -> None:
    agrees({"data": f'{{"a": {literal}, "b": [{literal}]}}'}, 10)


@PROPERTY
@given(text=st.one_of(
    st.text(alphabet='{}[]":,0123456789.eE+-tfnrulasN \\\x00\ud800', max_size=40),
    st.text(max_size=40).map(lambda t: '{"k": "' + t + '"}'),
))
def test_arbitrary_texts_give_what_the_json_path_gives(text) -> None:
    agrees({"data": text}, 10)


@pytest.mark.parametrize("text", [
    '{"a": 18446744073709551616}',  # orjson: a float
    '{"a": -9223372036854775809}',
    '{"a": 1' + "0" * 300 + "}",
    '{"a": "\\u0000"}', '{"\\u0000": 1}',
    '{"a": "\\ud800"}', '{"a": NaN}', '{"a": 1e999}',
    '{"a": 1, "a": 2, "b": 3}', '{"b": 1, "a": 2, "b": 3}',
    '{"a": ' + "[" * 11 + "]" * 11 + "}",
    "[" * 3000,
    '{"a": 1} x', "\ufeff{}", "[1]", '"text"',
    '{"context": {"": 1}}', '{"a": {"b": {"" \n\t: 1}}}', '{"": 1}',  # an empty name: the walk refuses it
    '{"a": "", "b": [""], "c": {"d": ""}}', '{"a\\"": 1}',
])
def test_edge_texts_give_what_the_json_path_gives(text) -> None:
    agrees({"data": text}, 10)
    agrees({"data": text.encode("utf-8", "surrogatepass")}, 10)


def test_an_empty_name_is_not_taken_by_the_orjson_path_an_empty_text_is() -> None:
    assert _proven_document({b"data": b'{"context": {"" : 1}}'}, 10) is None
    with_empty_values = {"label": "", "context": {"a": ""}}
    assert _proven_document({b"data": b'{"label": "", "context": {"a": ""}}'}, 10) == with_empty_values


def test_a_plain_prediction_takes_the_orjson_path() -> None:
    text = json.dumps({"prediction_id": "p1", "score": 0.5, "features": {"top": ["a"]}, "context": {"arr": 12}})
    assert _proven_document({b"data": text.encode()}, 10) == json.loads(text)
