"""Router behaviour on one inline rule set: which rules match, and who owns each decision."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from decision_router.contracts import Prediction
from decision_router.router import route
from decision_router.rules import RuleSet, load_rules

OWNERS = """
owners:
  - {id: alice, name: Alice}
  - {id: bob, name: Bob, manager: carol}
  - {id: carol, name: Carol}
  - {id: desk, name: Desk}
  - {id: fraud-desk, name: Fraud Desk}
  - {id: analytics, name: Analytics}
"""

ROUTING = """
defaults: {ack_within: 4h, act_within: 48h, priority: normal}
rules:
  - name: shadow
    when: {model_version: {regex: "shadow"}}
    owner: analytics
    action: record
  - name: big-account-copy
    when:
      model: churn
      context.arr: {gt: 100000}
    owner: bob
    continue: true
  - name: churn-high
    when:
      model: churn
      score: {gte: 0.8}
      context.segment: {in: [enterprise, strategic]}
    owner: {from: context.account_manager, fallback: desk}
    priority: high
    ack_within: 2h
    context: [context.arr, context.renewal_date, features.top_drivers]
  - name: churn-mid
    when:
      model: {eq: churn}
      score: {between: [0.5, 0.8]}
      context.segment: {not_in: [smb]}
    owner: alice
  - name: labelled-low
    when:
      score: {lt: 0.1}
      label: {exists: true}
    owner: desk
  - name: unlabelled-low
    when:
      score: {lte: 0.2}
      label: {exists: false}
    owner: desk
    action: record
  - name: fraud
    when:
      model: {ne: churn}
      context.flagged: true
      context.risk_code: 3
      context.region: {ne: emea}
    owner: fraud-desk
  - name: catch-all
    when: {}
    owner: analytics
    action: record
"""


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    rules_dir: Path = tmp_path_factory.mktemp("case") / "rules"
    rules_dir.mkdir()
    (rules_dir / "routing.yaml").write_text(ROUTING)
    (rules_dir / "owners.yaml").write_text(OWNERS)
    return load_rules(rules_dir)


def doc(*, label: str | None = None, **fields: Any) -> dict[str, Any]:
    """A real `Prediction.as_document()`, so the router sees what the pipeline gives it."""
    base: dict[str, Any] = {
        "prediction_id": "p-1",
        "model": "churn",
        "model_version": "2024.06",
        "entity_type": "account",
        "entity_id": "acct-1",
        "score": 0.3,
        "predicted_at": datetime(2024, 6, 1, tzinfo=timezone.utc),
    }
    return Prediction(**{**base, "label": label, **fields}).as_document()


ENTERPRISE = {"segment": "enterprise", "account_manager": "alice"}
FRAUD = {"flagged": True, "risk_code": 3, "region": "na"}
CATCH_ALL = [("catch-all", "analytics", "static")]

CASES = [
    # regex: search semantics, anywhere in the string; no match falls through
    ("regex-search", doc(model_version="v3-shadow-2"), [("shadow", "analytics", "static")]),
    ("regex-no-match", doc(model_version="v3"), CATCH_ALL),
    # eq shorthand + gte + in, owner from the document
    ("owner-from-field", doc(score=0.9, context=ENTERPRISE), [("churn-high", "alice", "field")]),
    ("in-second-value", doc(score=0.8, context={**ENTERPRISE, "segment": "strategic"}), [("churn-high", "alice", "field")]),
    ("in-miss", doc(score=0.9, context={**ENTERPRISE, "segment": "smb"}), CATCH_ALL),
    ("gte-just-below", doc(score=0.79, context=ENTERPRISE), [("churn-mid", "alice", "static")]),
    ("eq-shorthand-miss", doc(model="upsell", score=0.9, context=ENTERPRISE), CATCH_ALL),
    # fallback: field missing, unknown owner, not a string
    ("fallback-field-missing", doc(score=0.9, context={"segment": "enterprise"}), [("churn-high", "desk", "fallback")]),
    ("fallback-owner-unknown", doc(score=0.9, context={**ENTERPRISE, "account_manager": "zed"}), [("churn-high", "desk", "fallback")]),
    ("fallback-null", doc(score=0.9, context={**ENTERPRISE, "account_manager": None}), [("churn-high", "desk", "fallback")]),
    ("fallback-not-a-string", doc(score=0.9, context={**ENTERPRISE, "account_manager": 42}), [("churn-high", "desk", "fallback")]),
    # continue: true adds a decision and keeps going; gt is strict; numeric strings count
    ("continue-then-match", doc(score=0.9, context={**ENTERPRISE, "arr": 250000}),
     [("big-account-copy", "bob", "static"), ("churn-high", "alice", "field")]),
    ("continue-numeric-string", doc(score=0.9, context={**ENTERPRISE, "arr": "120000"}),
     [("big-account-copy", "bob", "static"), ("churn-high", "alice", "field")]),
    ("continue-then-catch-all", doc(score=0.3, context={"arr": 100001}), [("big-account-copy", "bob", "static"), *CATCH_ALL]),
    ("gt-equal-is-false", doc(score=0.9, context={**ENTERPRISE, "arr": 100000}), [("churn-high", "alice", "field")]),
    ("gt-non-numeric-is-false", doc(score=0.9, context={**ENTERPRISE, "arr": "lots"}), [("churn-high", "alice", "field")]),
    ("gt-bool-is-false", doc(score=0.9, context={**ENTERPRISE, "arr": True}), [("churn-high", "alice", "field")]),
    # between is inclusive at both ends; not_in fails on a missing field
    ("between-low-end", doc(score=0.5, context={"segment": "mid-market"}), [("churn-mid", "alice", "static")]),
    ("between-high-end", doc(score=0.8, context={"segment": "mid-market"}), [("churn-mid", "alice", "static")]),
    ("between-below", doc(score=0.49, context={"segment": "mid-market"}), CATCH_ALL),
    ("not-in-excluded", doc(score=0.6, context={"segment": "smb"}), CATCH_ALL),
    ("not-in-missing-field", doc(score=0.6), CATCH_ALL),
    # lt/lte and exists true/false; a null label is missing
    ("lt-exists-true", doc(model="upsell", score=0.05, label="churned"), [("labelled-low", "desk", "static")]),
    ("lte-exists-false", doc(model="upsell", score=0.2), [("unlabelled-low", "desk", "static")]),
    ("exists-false-fails-when-present", doc(model="upsell", score=0.15, label="renewed"), CATCH_ALL),
    ("lt-boundary", doc(model="upsell", score=0.1, label="churned"), CATCH_ALL),
    # ne, boolean and number equality, tolerant of stringly typed producers
    ("ne-bool-number", doc(model="payment-fraud", context=FRAUD), [("fraud", "fraud-desk", "static")]),
    ("string-true-and-number", doc(model="payment-fraud", context={**FRAUD, "flagged": "True", "risk_code": "3"}),
     [("fraud", "fraud-desk", "static")]),
    ("ne-on-missing-field-fails", doc(model="payment-fraud", context={"flagged": True, "risk_code": 3}), CATCH_ALL),
    ("ne-equal-fails", doc(model="payment-fraud", context={**FRAUD, "region": "emea"}), CATCH_ALL),
    ("one-is-not-true", doc(model="payment-fraud", context={**FRAUD, "flagged": 1}), CATCH_ALL),
    ("number-string-must-be-exact", doc(model="payment-fraud", context={**FRAUD, "risk_code": "3.0"}), CATCH_ALL),
    ("eq-on-a-list-is-false", doc(model="payment-fraud", context={**FRAUD, "risk_code": [3]}), CATCH_ALL),
]


@pytest.mark.parametrize(("document", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_route(ruleset: RuleSet, document: dict[str, Any], expected: list[tuple[str, str, str]]) -> None:
    got = [(d.rule, d.owner, d.owner_source) for d in route(document, ruleset)]
    assert got == expected


FALLBACKS = [
    ("missing", {"segment": "enterprise"}, "context.account_manager missing"),
    ("unknown", {**ENTERPRISE, "account_manager": "zed"}, "owner 'zed' not in directory"),
    ("empty", {**ENTERPRISE, "account_manager": " "}, "context.account_manager is not an owner id: ' '"),
    ("field", ENTERPRISE, None),
]


@pytest.mark.parametrize(("context", "reason"), [f[1:] for f in FALLBACKS], ids=[f[0] for f in FALLBACKS])
def test_fallback_reason(ruleset: RuleSet, context: dict[str, Any], reason: str | None) -> None:
    (decision,) = route(doc(score=0.9, context=context), ruleset)
    assert decision.fallback_reason == reason


def test_decision_carries_rule_settings_and_selected_context(ruleset: RuleSet) -> None:
    document = doc(score=0.9, context={**ENTERPRISE, "arr": 90000}, features={"top_drivers": ["logins", "tickets"]})
    (decision,) = route(document, ruleset)
    assert decision.rule_index == 2
    assert (decision.priority, decision.action) == ("high", "alert")
    assert decision.context == {"context.arr": 90000, "features.top_drivers": ["logins", "tickets"]}
    assert decision.missing_context == ("context.renewal_date",)
    # ack_within from the rule, act_within from defaults
    assert (decision.ack_within, decision.act_within) == (timedelta(hours=2), timedelta(hours=48))


def test_defaults_fill_priority_and_action_is_kept(ruleset: RuleSet) -> None:
    (decision,) = route(doc(model_version="x-shadow"), ruleset)
    assert (decision.priority, decision.action, decision.ack_within) == ("normal", "record", timedelta(hours=4))


def test_route_never_raises_on_odd_documents(ruleset: RuleSet) -> None:
    # A hand-built document (as `rules test` may pass) with odd shapes: context not a mapping.
    odd = {"model": "churn", "score": "n/a", "context": ["enterprise"], "model_version": 7}
    assert [d.rule for d in route(odd, ruleset)] == ["catch-all"]
