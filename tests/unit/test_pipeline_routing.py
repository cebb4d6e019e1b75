"""The router's shortcuts on the hot path give the same decisions as trying every rule in
file order: the index of rules by model, and routing without looked-up context."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import pytest

from decision_router.router import Decision, _decide, route, route_without_lookups
from decision_router.rules import RuleSet, load_rules

NOW = datetime(2026, 11, 25, 12, tzinfo=UTC)
ROUTING = """
context_sources:
  crm: {redis_hash: "context:{entity_type}:{entity_id}"}
rules:
  - {name: shadow, when: {model_version: {regex: "shadow"}}, owner: desk, action: record}
  - {name: churn-top, when: {model: churn, score: {gte: 0.9}}, owner: am, continue: true}
  - {name: churn-or-fraud, when: {model: {in: [churn, fraud]}, score: {gte: 0.7}}, owner: am}
  - {name: not-churn, when: {model: {ne: churn}, score: {gte: 0.95}}, owner: desk}
  - {name: model-regex, when: {model: {regex: "^up"}, score: {gte: 0.5}}, owner: am}
  - {name: numeric-model, when: {model: 5}, owner: desk}
  - {name: upsell-gold, when: {model: upsell, lookup.crm.tier: gold}, owner: am}
  - {name: upsell, when: {model: upsell}, owner: {from: lookup.crm.owner, fallback: desk}}
  - {name: fraud-context, when: {model: fraud}, owner: desk, context: [lookup.crm.tier, context.amount]}
  - {name: missing-lookup, when: {model: other, lookup.crm.flag: {exists: false}}, owner: desk}
  - {name: rest, when: {}, owner: desk, action: record}
"""
OWNERS = "owners:\n  - {id: am, name: AM}\n  - {id: desk, name: Desk}\n"


@pytest.fixture(scope="module")
def ruleset(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    directory: Path = tmp_path_factory.mktemp("rules")
    (directory / "routing.yaml").write_text(ROUTING)
    (directory / "owners.yaml").write_text(OWNERS)
    return load_rules(directory)


def every_rule_in_order(document: dict, ruleset: RuleSet) -> list[Decision]:
    """The router without its index: every rule tried in file order."""
    decisions = []
    for rule in ruleset.rules:
        if rule.matches(document):
            decisions.append(_decide(rule, document, ruleset.owners, NOW))
            if not rule.continue_:
                break
    return decisions


def documents() -> list[dict]:
    models = ["churn", "fraud", "upsell", "update", "other", "5", "Churn", " churn"]
    versions = ["1", "2-shadow"]
    scores = [0.3, 0.75, 0.92, 0.97]
    lookups = [None, {"crm": {"tier": "gold", "owner": "am"}}, {"crm": {"flag": "x"}}]
    out = []
    for model, version, score, looked_up in itertools.product(models, versions, scores, lookups):
        document = {"prediction_id": "p", "model": model, "model_version": version, "entity_type": "account",
                    "entity_id": "a1", "score": score, "context": {"amount": 10}}
        if looked_up is not None:
            document["lookup"] = looked_up
        out.append(document)
    return out


def test_the_model_index_gives_the_decisions_of_trying_every_rule(ruleset: RuleSet) -> None:
    for document in documents():
        assert route(document, ruleset, now=NOW) == every_rule_in_order(document, ruleset), document


def test_only_plain_text_model_conditions_are_indexed(ruleset: RuleSet) -> None:
    indexed = {rule.name: rule.models for rule in ruleset.rules}
    assert indexed["churn-top"] == frozenset({"churn"})
    assert indexed["churn-or-fraud"] == frozenset({"churn", "fraud"})
    # ne, regex, a number, or no model condition: tried for every model.
    assert indexed["not-churn"] is None and indexed["model-regex"] is None
    assert indexed["numeric-model"] is None and indexed["rest"] is None
    churn = [rule.name for rule in ruleset.candidates("churn")]
    assert churn == ["shadow", "churn-top", "churn-or-fraud", "not-churn", "model-regex", "numeric-model", "rest"]
    assert [rule.name for rule in ruleset.candidates("never-named")] == [
        "shadow", "not-churn", "model-regex", "numeric-model", "rest"]
    assert ruleset.candidates(None) == ruleset.rules


def test_routing_without_lookups_agrees_with_routing_or_asks_for_them(ruleset: RuleSet) -> None:
    asked = set()
    for document in documents():
        plain = {k: v for k, v in document.items() if k != "lookup"}
        early = route_without_lookups(plain, ruleset, now=NOW)
        if early is None:
            asked.add(document["model"])
            continue
        # Whatever the lookups would have returned, routing comes out the same.
        assert early == route(document, ruleset, now=NOW), document
    # upsell reaches a `when` on lookup; fraud matches a rule whose context reads it; other
    # reaches `exists: false` on a lookup field (true when the lookup is missing).
    assert asked == {"upsell", "fraud", "other"}
    high_churn = {"model": "churn", "model_version": "1", "entity_type": "account", "entity_id": "a", "score": 0.8}
    assert [d.rule for d in route_without_lookups(high_churn, ruleset, now=NOW)] == ["churn-or-fraud"]
