"""Compiled rules against a straightforward evaluator of docs/rules.md: on generated documents
(odd types, numeric text, absent and null fields, non-dict mappings) and generated conditions,
`CompiledRule.matches`, the index's `matches_past_model` and `route` give what evaluating each
condition in turn gives."""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from decision_router.router import _decide, route, route_without_lookups
from decision_router.rules import MISSING, RuleSet
from decision_router.rules.compile import Owner, _as_number, compile_rule, same
from decision_router.rules.spec import DefaultsSpec, RuleSpec, compile_regex

PROPERTY = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PATHS = ("model", "score", "label", "context.arr", "context.segment", "context.name", "context.deep.x")
PATTERNS = ("^churn$", "shadow", "(^|[-.])shadow\\b", "^[0-9]+$", "^0\\.5", "e")

texts = st.sampled_from(["churn", "upsell", "Churn", " churn", "", "5", "5.0", "0.5", " 0.5 ", "120000", "true",
                         " TRUE ", "false", "1e3", "nan", "inf", "v2-shadow", "x\ud800", "enterprise", "smb"])
scalars = st.one_of(texts, st.booleans(), st.integers(-3, 200_000), st.sampled_from([0, 1, 5, 120000, 10**30]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.5, 5.0, 0.85, -0.0, math.inf, -math.inf, math.nan]))
values = st.one_of(st.none(), scalars, st.lists(scalars, max_size=2), st.dictionaries(texts, scalars, max_size=2))
context_maps = st.dictionaries(st.sampled_from(["arr", "segment", "name", "deep"]),
                               st.one_of(values, st.dictionaries(st.just("x"), values)), min_size=1, max_size=4)
documents = st.fixed_dictionaries({"context": st.one_of(context_maps, context_maps, values)},
                                  optional={"model": values, "score": values, "label": values})
expected_scalars = st.one_of(texts.filter(lambda t: "\ud800" not in t), st.booleans(),
                             st.sampled_from([0, 5, 120000, 0.5, 5.0, 0.85]))
operators = st.one_of(
    st.tuples(st.sampled_from(["eq", "ne"]), expected_scalars),
    st.tuples(st.sampled_from(["in", "not_in"]), st.lists(expected_scalars, min_size=1, max_size=3)),
    st.tuples(st.sampled_from(["gt", "gte", "lt", "lte"]), st.sampled_from([0, 0.5, 0.8, 5, 100000])),
    st.tuples(st.just("between"), st.sampled_from([[0.6, 0.85], [0, 1], [5, 200000]])),
    st.tuples(st.just("regex"), st.sampled_from(PATTERNS)),
    st.tuples(st.just("exists"), st.booleans()),
)
conditions = st.dictionaries(st.sampled_from(PATHS), st.lists(operators, min_size=1, max_size=3).map(dict).map(
    lambda ops: {"exists": False} if ops.get("exists") is False else ops), min_size=1, max_size=4)  # the loader refuses more


def reference_lookup(document: Mapping[str, Any], path: str) -> Any:
    value: Any = document
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return MISSING if value is None else value


def reference_operator(op: str, expected: Any, value: Any) -> bool:
    if op == "eq":
        return same(value, expected)
    if op == "ne":
        return not same(value, expected)
    if op == "in":
        return any(same(value, e) for e in expected)
    if op == "not_in":
        return not any(same(value, e) for e in expected)
    if op == "regex":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            return False
        try:
            return compile_regex(expected).search(value) is not None
        except UnicodeEncodeError:
            return False
    number = _as_number(value)
    if number is None:
        return False
    low, high = expected if op == "between" else (None, None)
    return {"gt": lambda: number > expected, "gte": lambda: number >= expected, "lt": lambda: number < expected,
            "lte": lambda: number <= expected, "between": lambda: low <= number <= high}[op]()


def reference_matches(when: dict[str, dict[str, Any]], document: Mapping[str, Any]) -> bool:
    for path, ops in when.items():
        value = reference_lookup(document, path)
        if ops.get("exists") is False:
            held = value is MISSING
        else:
            held = value is not MISSING and all(
                reference_operator(op, expected, value) for op, expected in ops.items() if op != "exists")
        if not held:
            return False
    return True


def compiled(when: dict[str, dict[str, Any]], name: str = "r", index: int = 0, **extra: Any) -> Any:
    try:
        spec = RuleSpec.model_validate({"name": name, "when": when, "owner": "desk", **extra})
    except ValidationError:
        assume(False)  # what the loader refuses (e.g. model: "" or text no store can hold)
    return compile_rule(spec, index, DefaultsSpec())


def shapes(document: dict[str, Any]) -> list[Mapping[str, Any]]:
    """The document as routing sees it (a dict), and as other callers may pass it."""
    context = document.get("context")
    inner = [{**document, "context": MappingProxyType(context)}] if isinstance(context, dict) else []
    return [document, MappingProxyType(document), type("Doc", (dict,), {})(document), *inner]


@PROPERTY
@given(when=conditions, document=documents)
def test_a_rule_matches_exactly_when_every_condition_holds(when, document) -> None:
    rule = compiled(when)
    for shape in shapes(document):
        assert rule.matches(shape) is reference_matches(when, shape)


@PROPERTY
@given(when=conditions, models=st.lists(texts.filter(lambda t: t and "\ud800" not in t), min_size=1, max_size=3), use_in=st.booleans(), document=documents)
def test_past_the_model_index_the_other_conditions_decide(when, models, use_in, document) -> None:
    when = {**when, "model": {"in": models} if use_in else {"eq": models[0]}}
    rule = compiled(when)
    assert rule.models == frozenset(models if use_in else models[:1])
    for model in rule.models:
        placed = {**document, "model": model}
        assert rule.matches_past_model(placed) is reference_matches(when, placed)


@PROPERTY
@given(whens=st.lists(conditions, min_size=1, max_size=6), models=st.lists(st.one_of(st.none(), expected_scalars), min_size=6,
       max_size=6), continues=st.lists(st.booleans(), min_size=6, max_size=6), document=documents)
def test_route_takes_the_rules_in_file_order_as_the_reference_does(whens, models, continues, document) -> None:
    whens = [{**when, "model": {"eq": model}} if model is not None else when for when, model in zip(whens, models, strict=False)]
    rules = [compiled(when, f"r{i}", i, **{"continue": continues[i], "context": list(PATHS)})
             for i, when in enumerate(whens)]
    whens.append({})
    rules.append(compiled({}, "rest", len(rules)))
    owners = MappingProxyType({"desk": Owner("desk", "Desk", None, None, None)})
    ruleset = RuleSet(version="t", rules=tuple(rules), owners=owners, source_dir=None)  # type: ignore[arg-type]
    expected = []
    for rule, when in zip(rules, whens, strict=True):
        if reference_matches(when, document):
            expected.append(_decide(rule, document, owners, None))
            if not rule.continue_:
                break
    assert route(document, ruleset) == expected
    assert route_without_lookups(document, ruleset) == expected


def test_decision_context_reads_the_same_through_dicts_and_other_mappings() -> None:
    rule = compiled({}, context=["context.arr", "context.deep.x", "label", "context.name"], holdout=0.5)
    document = {"entity_type": "account", "entity_id": "a-1", "label": "smb",
                "context": {"arr": 5, "deep": {"x": 0.0}, "name": None}}
    owners = MappingProxyType({"desk": Owner("desk", "Desk", None, None, None)})
    decisions = [_decide(rule, shape, owners, None) for shape in shapes(document)]
    assert decisions[0].context == {"context.arr": 5, "context.deep.x": 0.0, "label": "smb"}
    assert decisions[0].missing_context == ("context.name",)
    assert decisions[1] == decisions[0] and decisions[2] == decisions[0]


def test_numbers_that_are_not_finite_match_no_numeric_condition() -> None:
    odd = [math.inf, -math.inf, math.nan, "inf", "-Infinity", "nan", 1e308 * 10, True]
    for op, bound in [("gt", 0.5), ("gte", 0.5), ("lt", 0.5), ("lte", 0.5), ("between", [0, 1e300])]:
        when = {"score": {op: bound}}
        rule = compiled(when)
        for value in odd:
            document = {"score": value}
            assert rule.matches(document) is reference_matches(when, document) is False, (op, value)
