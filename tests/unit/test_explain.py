"""`rules test` logic: what each matching rule decides and why, input parsing, expectations."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from decision_router.contracts import Prediction
from decision_router.explain import (
    COOLDOWN_NOTE,
    as_document,
    exit_code,
    explain,
    mismatches,
    parse_inputs,
    run_cases,
    split_expectations,
)
from decision_router.publisher import validate_entry
from decision_router.router import in_holdout
from decision_router.rules import RuleSet, load_rules

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

OWNERS = """
owners:
  - {id: alice, name: Alice}
  - {id: bob, name: Bob, away_until: 2026-12-31, delegate: carol}
  - {id: carol, name: Carol}
  - {id: desk, name: Desk}
  - {id: analytics, name: Analytics}
"""

ROUTING = """
defaults: {ack_within: 4h, act_within: 48h, priority: normal}
rules:
  - name: big-account-copy
    when: {context.arr: {gte: 500000}}
    owner: bob
    continue: true
    cooldown: 7d
    ack_within: 1d
    act_within: 5d
  - name: churn-high
    when:
      score: {gte: 0.8}
    owner: {from: context.account_manager, fallback: desk}
    priority: high
    ack_within: 2h
    act_within: 24h
    context: [context.arr, context.renewal_date]
  - name: churn-watch
    when:
      score: {gte: 0.5}
    owner: alice
    holdout: 0.5
  - name: catch-all
    when: {}
    owner: analytics
    action: record
"""


def rules_in(tmp_path_factory: pytest.TempPathFactory, name: str, routing: str) -> RuleSet:
    rules_dir: Path = tmp_path_factory.mktemp(name) / "rules"
    rules_dir.mkdir()
    (rules_dir / "routing.yaml").write_text(routing)
    (rules_dir / "owners.yaml").write_text(OWNERS)
    return load_rules(rules_dir)


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    return rules_in(tmp_path_factory, "explain", ROUTING)


def prediction(score: float = 0.9, entity_id: str = "acct-1", **context: Any) -> Prediction:
    return Prediction(
        prediction_id="p-1", model="churn", model_version="1", entity_type="account", entity_id=entity_id,
        score=score, predicted_at=NOW - timedelta(hours=1), context=context,
    )


def entity_with(holdout: bool) -> str:
    """An entity id that is (or is not) in churn-watch's 50% control group."""
    return next(f"acct-{n}" for n in range(1000) if in_holdout("churn-watch", "account", f"acct-{n}", 0.5) is holdout)


def test_every_field_of_a_match(ruleset: RuleSet) -> None:
    result = explain(prediction(arr=900000, account_manager="alice"), ruleset, now=NOW)
    assert result.prediction_id == "p-1" and result.rules_version == ruleset.version
    assert result.rules == ["big-account-copy", "churn-high"]
    assert result.owners == ["carol", "alice"]
    assert result.matches[0].as_dict() == {
        "rule": "big-account-copy",
        "rule_index": 0,
        "owner": "carol",
        "owner_source": "delegate",
        "owner_why": "delegate for away owner bob (static)",
        "owner_field": None,
        "fallback_reason": None,
        "delegated_from": "bob",
        "priority": "normal",
        "action": "alert",
        "held_out": False,
        "treatment": "treated",
        "cooldown": "1w",
        "cooldown_note": COOLDOWN_NOTE,
        "ack_within": "1d",
        "act_within": "5d",
        "ack_by": "2026-11-26T12:00:00Z",
        "act_by": "2026-11-30T12:00:00Z",
        "context": {},
        "missing_context": [],
    }
    high = result.matches[1]
    assert (high.owner, high.owner_source, high.owner_why, high.owner_field) == (
        "alice", "field", "from field context.account_manager", "context.account_manager"
    )
    assert (high.priority, high.cooldown, high.ack_by, high.act_by) == ("high", None, NOW + timedelta(hours=2), NOW + timedelta(days=1))
    assert high.context == {"context.arr": 900000} and high.missing_context == ("context.renewal_date",)
    assert high.as_dict()["cooldown_note"] is None


def test_owner_back_from_leave_is_not_delegated(ruleset: RuleSet) -> None:
    back = datetime(2027, 1, 1, tzinfo=UTC)
    match = explain(prediction(arr=900000, account_manager="alice"), ruleset, now=back).matches[0]
    assert (match.owner, match.owner_source, match.owner_why, match.delegated_from) == ("bob", "static", "static", None)


@pytest.mark.parametrize(
    ("context", "owner", "why"),
    [
        ({}, "desk", "fallback: context.account_manager missing"),
        ({"account_manager": "zed"}, "desk", "fallback: owner 'zed' not in directory"),
        ({"account_manager": "bob"}, "carol", "delegate for away owner bob (from field context.account_manager)"),
    ],
    ids=["missing", "unknown", "field-owner-away"],
)
def test_owner_reasons(ruleset: RuleSet, context: dict[str, Any], owner: str, why: str) -> None:
    (match,) = explain(prediction(**context), ruleset, now=NOW).matches
    assert (match.owner, match.owner_why) == (owner, why)


def test_treated_control_and_record(ruleset: RuleSet) -> None:
    (control,) = explain(prediction(0.6, entity_with(holdout=True)), ruleset, now=NOW).matches
    (treated,) = explain(prediction(0.6, entity_with(holdout=False)), ruleset, now=NOW).matches
    (record,) = explain(prediction(0.1), ruleset, now=NOW).matches
    assert (control.rule, control.held_out, control.treatment) == ("churn-watch", True, "control")
    assert (treated.rule, treated.held_out, treated.treatment) == ("churn-watch", False, "treated")
    assert (record.rule, record.action, record.treatment) == ("catch-all", "record", "record")


def test_expectations_compare_sets(ruleset: RuleSet) -> None:
    result = explain(prediction(arr=900000, account_manager="alice"), ruleset, now=NOW)
    assert mismatches(result, rules=["churn-high", "big-account-copy"], owners=["alice", "carol"]) == []
    assert mismatches(result, rules=[], owners=[]) == []
    assert mismatches(result, rules=["churn-high"], owners=["bob"]) == [
        "p-1: expected rules churn-high; got big-account-copy, churn-high",
        "p-1: expected owners bob; got carol, alice",
    ]
    assert split_expectations(["a,b", " c ", "", "d,"]) == ["a", "b", "c", "d"]
    assert split_expectations(None) == []


def line(pid: str, **extra: Any) -> str:
    return json.dumps({
        "prediction_id": pid, "model": "churn", "model_version": "1", "entity_type": "account",
        "entity_id": f"acct-{pid}", "score": 0.9, "predicted_at": "2020-01-01T00:00:00Z", **extra,
    })


def test_parse_inputs_object_lines_and_array() -> None:
    pretty = json.dumps(json.loads(line("a")), indent=2)  # one object over several lines
    assert [(c.source, c.prediction.prediction_id) for c in parse_inputs(pretty, "f.json")] == [("f.json", "a")]
    lines = line("a") + "\n\n" + line("b", score=7) + "\n{oops\n"
    cases = parse_inputs(lines, "f.jsonl")
    assert [c.source for c in cases] == ["f.jsonl:1", "f.jsonl:3", "f.jsonl:4"]
    assert cases[0].prediction is not None and cases[0].rejection is None
    assert [c.rejection.reason.value for c in cases[1:]] == ["score_out_of_range", "invalid_json"]
    array = "[" + line("a") + "," + line("b") + "]"
    assert [(c.source, c.prediction.prediction_id) for c in parse_inputs(array, "stdin")] == [("stdin[1]", "a"), ("stdin[2]", "b")]


def test_parse_inputs_applies_the_publish_gate_but_not_age() -> None:
    # 2020 is years old: the gate's age check does not apply, as for `publish`.
    (old,) = parse_inputs(line("a"), "argument")
    assert old.prediction is not None and old.prediction.prediction_id == "a"
    (unknown,) = parse_inputs(line("a", colour="red"), "argument")
    assert unknown.rejection is not None and unknown.rejection.reason.value == "schema"
    assert "colour" in unknown.rejection.detail
    (empty,) = parse_inputs("", "stdin")
    assert empty.rejection is not None and empty.rejection.reason.value == "invalid_json"


def as_read(raw: bytes) -> str:
    """`raw` as the CLI reads --file and stdin: a byte that is not UTF-8 kept, as a surrogate."""
    return raw.decode("utf-8-sig", "surrogateescape")


def test_a_byte_that_is_not_utf8_is_invalid_encoding_naming_it_as_publish_does() -> None:
    # As text, the byte was a lone surrogate in a value ("text holds a NUL character or a lone surrogate")
    # or made the line no JSON at all (invalid_json); `publish` names it as the gate does for bytes.
    bad = line("b", context={"segment": "cafe"}).encode().replace(b"cafe", b"caf\xe9")  # 0xe9 alone: never UTF-8
    at = bad.index(b"\xe9")
    expected = ("invalid_encoding", f"field data is not valid UTF-8 (byte {at})")
    cases = parse_inputs(as_read(line("a").encode() + b"\n" + bad + b"\n\xff" + line("c").encode()), "f.jsonl")
    assert [(c.source, c.rejection and (c.rejection.reason.value, c.rejection.detail)) for c in cases] == [
        ("f.jsonl:1", None), ("f.jsonl:2", expected),
        ("f.jsonl:3", ("invalid_encoding", "field data is not valid UTF-8 (byte 0)")),
    ]
    # One object (its offset is in the object), also with a lookup, and the items of an array.
    (whole,) = parse_inputs(as_read(b"\xef\xbb\xbf" + bad), "f.json")
    assert (whole.rejection.reason.value, whole.rejection.detail) == expected
    looked_up = bad[:-1] + b', "lookup": {"crm": {"tier": "gold"}}}'
    (with_lookup,) = parse_inputs(as_read(looked_up), "f.json")
    assert (with_lookup.rejection.reason.value, with_lookup.rejection.detail) == expected
    array = parse_inputs(as_read(b"[ " + line("a").encode() + b" ,\n  " + bad + b"\n]"), "f.json")
    assert [(c.source, c.rejection and (c.rejection.reason.value, c.rejection.detail)) for c in array] == [
        ("f.json[1]", None), ("f.json[2]", expected),
    ]
    # A lone surrogate written as a JSON escape is valid UTF-8: still the gate's value check.
    (escaped,) = parse_inputs(as_read(line("e", context={"segment": "\udcff"}).encode()), "f.json")
    assert escaped.rejection.detail == "context.segment: text holds a NUL character or a lone surrogate"


def test_run_cases_document_and_exit_codes(ruleset: RuleSet) -> None:
    good = parse_inputs(line("a", context={"account_manager": "alice"}), "argument")
    results = run_cases(good, ruleset, now=NOW, rules=["churn-high"], owners=["alice"])
    assert exit_code(results) == 0
    document = as_document(results, ruleset, now=NOW, rules=["churn-high"], owners=["alice"])
    assert document["rules_version"] == ruleset.version and document["now"] == "2026-11-25T12:00:00Z"
    assert document["expect"] == {"rules": ["churn-high"], "owners": ["alice"]}
    (entry,) = document["predictions"]
    assert {k: v for k, v in entry.items() if k != "matches"} == {
        "source": "argument", "valid": True, "prediction_id": "a", "expectations_met": True, "mismatches": [],
    }
    assert [m["rule"] for m in entry["matches"]] == ["churn-high"]
    json.dumps(document)  # serialisable as is

    wrong = run_cases(good, ruleset, now=NOW, owners=["desk"])
    assert exit_code(wrong) == 1 and wrong[0].mismatches == ("a: expected owners desk; got alice",)
    bad = run_cases(parse_inputs(line("a") + "\n" + line("b", score=-1), "f"), ruleset, now=NOW, owners=["desk"])
    assert exit_code(bad) == 2
    assert bad[1].as_dict() == {
        "source": "f:2", "valid": False,
        "rejection": {"reason": "score_out_of_range", "detail": "score -1.0 is outside 0..1"},
    }


LOOKUP_ROUTING = """
context_sources:
  crm: {redis_hash: "context:{entity_type}:{entity_id}"}
rules:
  - name: gold
    when: {lookup.crm.tier: gold}
    owner: {from: lookup.crm.manager, fallback: desk}
    context: [lookup.crm.health]
  - name: catch-all
    when: {}
    owner: analytics
    action: record
"""


@pytest.fixture(scope="module")
def lookup_rules(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    return rules_in(tmp_path_factory, "explain-lookups", LOOKUP_ROUTING)


def test_a_lookup_given_with_the_prediction_is_its_looked_up_context(lookup_rules: RuleSet) -> None:
    crm = {"crm": {"tier": "gold", "manager": "alice", "health": "42"}}
    (case,) = parse_inputs(line("a", lookup=crm), "argument")
    assert case.prediction is not None and case.prediction.prediction_id == "a" and case.lookup == crm
    (result,) = run_cases([case], lookup_rules, now=NOW, rules=["gold"], owners=["alice"])
    (match,) = result.explanation.matches
    assert (match.owner_why, match.context, match.missing_context) == (
        "from field lookup.crm.manager", {"lookup.crm.health": "42"}, ())
    assert exit_code([result]) == 0 and result.as_dict()["lookup"] == crm

    (without,) = run_cases(parse_inputs(line("b"), "argument"), lookup_rules, now=NOW)
    assert without.explanation.rules == ["catch-all"] and "lookup" not in without.as_dict()
    partial = explain(prediction(), lookup_rules, now=NOW, lookup={"crm": {"tier": "gold"}})
    assert (partial.matches[0].owner_why, partial.matches[0].missing_context) == (
        "fallback: lookup.crm.manager missing", ("lookup.crm.health",))


def test_a_lookup_is_bounded_as_the_router_bounds_a_sources_values(lookup_rules: RuleSet) -> None:
    """`rules test` routed on a 20 KB field and one nested 9 deep, which the router drops (16 KiB, depth 7):
    it said the rule matched where the router says it does not."""
    big, deep = "n" * 20000, json.loads("[" * 9 + "]" * 9)
    crm = {"crm": {"tier": "gold", "manager": "alice", "health": big, "unread": big}}
    (result,) = run_cases(parse_inputs(line("a", lookup=crm), "argument"), lookup_rules, now=NOW)
    (match,) = result.explanation.matches
    assert (match.rule, match.owner, match.missing_context) == ("gold", "alice", ("lookup.crm.health",))
    assert result.lookup_dropped == ("lookup.crm.health: 20000 bytes",)  # `unread`: no rule reads it
    assert result.as_dict()["lookup"] == crm and result.as_dict()["lookup_dropped"] == ["lookup.crm.health: 20000 bytes"]

    (result,) = run_cases(parse_inputs(line("b", lookup={"crm": {"tier": deep}}), "argument"), lookup_rules, now=NOW)
    assert result.explanation.rules == ["catch-all"]
    assert result.lookup_dropped == ("lookup.crm.tier: nested more than 7 levels",)

    together = {"crm": {"tier": "gold", "manager": "m" * 9000, "health": "h" * 9000}}
    (result,) = run_cases(parse_inputs(line("c", lookup=together), "argument"), lookup_rules, now=NOW)
    assert result.explanation.rules == ["catch-all"]  # no field of the source left, as the router keeps none
    assert result.lookup_dropped == ("lookup.crm: tier, manager, health together: 18021 bytes",)

    (within,) = run_cases(parse_inputs(line("d", lookup={"crm": {"tier": "gold", "health": "h" * 9000}}), "argument"),
                          lookup_rules, now=NOW)
    assert within.explanation.rules == ["gold"] and within.lookup_dropped == ()
    assert within.as_dict()["lookup_dropped"] == []


@pytest.mark.parametrize("lookup", [None, "gold", {"crm": "gold"}, ["crm"]], ids=["null", "text", "flat", "list"])
def test_a_lookup_that_is_not_sources_of_fields_is_rejected(lookup: Any, lookup_rules: RuleSet) -> None:
    (case,) = parse_inputs(line("a", lookup=lookup), "argument")
    assert case.prediction is None and case.rejection is not None
    assert case.rejection.reason.value == "schema" and case.rejection.detail.startswith("lookup: expected an object")
    assert exit_code(run_cases([case], lookup_rules, now=NOW)) == 2


@pytest.mark.parametrize("depth", [30000, 2000, 1000, 999, 990, 900, 200])
def test_json_nested_beyond_what_json_can_parse_is_the_gates_too_deep(depth: int) -> None:
    """As `publish` answers the same line: a rejection, never a RecursionError."""
    for text in ("[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth):
        cases = parse_inputs(text, "argument")
        assert cases and all(c.prediction is None and c.rejection is not None for c in cases)
        if depth >= 2000:  # beyond json.loads: one line, answered as publish answers it
            assert [c.rejection.reason for c in cases] == [validate_entry({"data": text}).reason]
    (inside,) = parse_inputs(line("a", lookup={"crm": {"x": json.loads("[" * 900 + "]" * 900)}}), "argument")
    assert inside.prediction is not None  # the lookup is the caller's; only its values are checked


@pytest.mark.parametrize(
    ("text", "reason", "detail"),
    [
        ('"lookup": {"crm": {"tier": NaN}}', "schema", "lookup.crm.tier: nan is not a finite number"),
        ('"lookup": {"crm": {"arr": [1, -Infinity]}}', "schema", "lookup.crm.arr[1]: -inf is not a finite number"),
        ('"lookup": {"crm": {"tier": "\\ud800"}}', "invalid_encoding",
         "lookup.crm.tier: text holds a NUL character or a lone surrogate"),
        ('"lookup": {"crm": {"\\udfff": 1}}', "invalid_encoding",
         "lookup.crm: a name holds a NUL character or a lone surrogate"),
        ('"lookup": {"crm": {"n": ' + "9" * 400 + "}}", "schema", "lookup.crm.n: an integer of 1329 bits is too large"),
        ('"lookup": {"crm": {"' + "9" * 400 + '": NaN}}', "schema",
         "lookup.crm.99999999999999999999… (400 digits): nan is not a finite number"),
        # An empty name, which the gate refuses in context: no lookup.<source>.<field> path can name it.
        ('"lookup": {"": {"tier": "gold"}}', "schema", "lookup.: an empty source name, which no rule path can address"),
        ('"lookup": {"crm": {"": 1}}', "schema", "lookup.crm.: an empty field name, which no rule path can address"),
        ('"lookup": {"crm": {"tier": {"": 1}}}', "schema",
         "lookup.crm.tier.: an empty name, which no rule path can address"),
    ],
)
def test_lookup_values_get_the_gates_value_checks(text: str, reason: str, detail: str, lookup_rules: RuleSet) -> None:
    """NaN would print as NaN in --format json (not JSON), a lone surrogate cannot be printed at all."""
    (case,) = parse_inputs(line("a")[:-1] + ", " + text + "}", "argument")
    assert case.prediction is None and case.rejection is not None
    assert (case.rejection.reason.value, case.rejection.detail) == (reason, detail)
    assert exit_code(run_cases([case], lookup_rules, now=NOW)) == 2
    json.dumps(run_cases([case], lookup_rules, now=NOW)[0].as_dict(), allow_nan=False).encode()
