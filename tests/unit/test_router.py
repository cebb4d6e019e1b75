"""Router behaviour on one inline rule set: which rules match, and who owns each decision."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from decision_router.contracts import Prediction
from decision_router.router import in_holdout, route
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
        "predicted_at": datetime(2024, 6, 1, tzinfo=UTC),
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


# holdout ---------------------------------------------------------------------------------

# (rule, entity_type, entity_id) -> bucket (sha256 of "rule\0type\0id", first 8 bytes / 2**64):
# 0.471119, 0.092484, 0.111810, 0.919597, 0.350734, 0.996596. Changing the hash would move
# every entity between the groups of a running experiment, so these values are fixed.
HOLDOUT_CASES = [
    ("below-fraction", ("mid-market-churn-risk", "account", "acct-2", 0.1), True),
    ("just-above-bucket", ("mid-market-churn-risk", "account", "acct-2", 0.092485), True),
    ("just-below-bucket", ("mid-market-churn-risk", "account", "acct-2", 0.092483), False),
    ("above-fraction", ("mid-market-churn-risk", "account", "acct-1", 0.1), False),
    ("larger-fraction-adds", ("mid-market-churn-risk", "account", "acct-1", 0.5), True),
    ("acct-5-at-10pct", ("mid-market-churn-risk", "account", "acct-5", 0.1), False),
    ("acct-5-at-30pct", ("mid-market-churn-risk", "account", "acct-5", 0.3), True),
    ("rule-name-matters", ("smb-churn-risk", "account", "acct-1", 0.9), False),
    ("other-rule-at-30pct", ("enterprise-churn-watch", "account", "acct-1", 0.3), False),
    ("other-rule-at-40pct", ("enterprise-churn-watch", "account", "acct-1", 0.4), True),
    ("entity-type-matters", ("mid-market-churn-risk", "invoice", "acct-1", 0.99), False),
    ("zero-holds-out-nobody", ("mid-market-churn-risk", "account", "acct-2", 0.0), False),
]


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in HOLDOUT_CASES], ids=[c[0] for c in HOLDOUT_CASES])
def test_in_holdout_is_a_fixed_function_of_rule_and_entity(args: tuple[str, str, str, float], expected: bool) -> None:
    assert in_holdout(*args) is expected


def test_in_holdout_is_the_same_in_another_process() -> None:
    # Python's hash() is salted per process; the assignment must not be.
    entities = [f"acct-{n}" for n in range(200)]
    here = [in_holdout("mid-market-churn-risk", "account", e, 0.3) for e in entities]
    script = (
        "import json, sys; from decision_router.router import in_holdout; "
        "print(json.dumps([in_holdout('mid-market-churn-risk', 'account', e, 0.3) for e in json.load(sys.stdin)]))"
    )
    there = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(entities), capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert json.loads(there.stdout) == here


@pytest.mark.parametrize("fraction", [0.1, 0.3], ids=["10pct", "30pct"])
def test_holdout_share_matches_the_fraction(fraction: float) -> None:
    entities = 20_000
    held = sum(in_holdout("smb-churn-risk", "account", f"acct-{n:05d}", fraction) for n in range(entities))
    assert abs(held / entities - fraction) <= 0.015


FEATURE_OWNERS = """
owners:
  - {id: alice, name: Alice, away_until: 2027-01-15, delegate: bob}
  - {id: bob, name: Bob, away_until: 2027-01-10T12:00:00Z, delegate: carol}
  - {id: carol, name: Carol}
  - {id: dora, name: Dora, delegate: carol}
  - {id: desk, name: Desk, away_until: 2027-01-05, delegate: carol}
  - {id: analytics, name: Analytics}
"""

FEATURE_ROUTING = """
rules:
  - name: fraud-copy
    when: {model: payment-fraud}
    owner: bob
    continue: true
    cooldown: 1d
  - name: high-risk
    when: {score: {gte: 0.8}}
    owner: {from: context.account_manager, fallback: desk}
    cooldown: 7d
    holdout: 0.5
  - name: catch-all
    when: {}
    owner: analytics
    action: record
"""


@pytest.fixture(scope="module")
def features(tmp_path_factory: pytest.TempPathFactory) -> RuleSet:
    rules_dir: Path = tmp_path_factory.mktemp("features") / "rules"
    rules_dir.mkdir()
    (rules_dir / "routing.yaml").write_text(FEATURE_ROUTING)
    (rules_dir / "owners.yaml").write_text(FEATURE_OWNERS)
    return load_rules(rules_dir)


def test_held_out_follows_in_holdout_and_record_rules_are_never_held_out(features: RuleSet) -> None:
    held = []
    for n in range(40):
        decisions = route(doc(entity_id=f"acct-{n}", score=0.9, context={"account_manager": "carol"}), features)
        (decision,) = decisions
        assert decision.held_out is in_holdout("high-risk", "account", f"acct-{n}", 0.5)
        held.append(decision.held_out)
    assert any(held) and not all(held)
    assert all(not route(doc(entity_id=f"acct-{n}", score=0.1), features)[0].held_out for n in range(40))


def test_decisions_carry_the_rule_cooldown(features: RuleSet) -> None:
    copy, high = route(doc(model="payment-fraud", score=0.9, context={"account_manager": "carol"}), features)
    assert (copy.rule, copy.cooldown, high.rule, high.cooldown) == ("fraud-copy", timedelta(days=1), "high-risk", timedelta(days=7))
    (rest,) = route(doc(score=0.1), features)
    assert (rest.rule, rest.cooldown, rest.held_out) == ("catch-all", None, False)


# away owners and delegates ---------------------------------------------------------------


def at(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


DELEGATION_CASES = [
    # (now, context.account_manager) -> (owner, owner_source, delegated_from, fallback_reason)
    ("no-clock-no-delegation", None, "alice", ("alice", "field", None, None)),
    ("away-delegate-present", at(2027, 1, 12), "alice", ("bob", "delegate", "alice", None)),
    ("chain-while-delegate-away", at(2026, 12, 1), "alice", ("carol", "delegate", "alice", None)),
    ("delegate-back-at-exact-instant", at(2027, 1, 10, 12), "alice", ("bob", "delegate", "alice", None)),
    ("date-covers-the-whole-day", datetime(2027, 1, 15, 23, 59, 59, 999999, tzinfo=UTC), "alice",
     ("bob", "delegate", "alice", None)),
    ("back-the-next-midnight-utc", at(2027, 1, 16), "alice", ("alice", "field", None, None)),
    ("offset-clock-is-compared-in-utc", datetime(2027, 1, 16, 0, 30, tzinfo=timezone(timedelta(hours=1))), "alice",
     ("bob", "delegate", "alice", None)),
    ("delegate-set-but-not-away", at(2027, 1, 1), "dora", ("dora", "field", None, None)),
    ("fallback-owner-away-keeps-reason", at(2027, 1, 3), None,
     ("carol", "delegate", "desk", "context.account_manager missing")),
    ("fallback-owner-back", at(2027, 1, 6), None, ("desk", "fallback", None, "context.account_manager missing")),
]


@pytest.mark.parametrize(("now", "manager", "expected"), [c[1:] for c in DELEGATION_CASES], ids=[c[0] for c in DELEGATION_CASES])
def test_away_owner_is_replaced_by_delegate(
    features: RuleSet, now: datetime | None, manager: str | None, expected: tuple[str, str, str | None, str | None]
) -> None:
    (decision,) = route(doc(score=0.9, context={"account_manager": manager}), features, now=now)
    assert (decision.owner, decision.owner_source, decision.delegated_from, decision.fallback_reason) == expected


def test_static_owner_is_delegated_too(features: RuleSet) -> None:
    copy, high = route(doc(model="payment-fraud", score=0.9, context={"account_manager": "dora"}), features, now=at(2027, 1, 1))
    assert (copy.owner, copy.owner_source, copy.delegated_from) == ("carol", "delegate", "bob")
    assert (high.owner, high.owner_source, high.delegated_from) == ("dora", "field", None)


def test_naive_clock_is_refused(features: RuleSet) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        route(doc(), features, now=datetime(2027, 1, 1))


def test_delegation_stops_even_on_a_loop_load_would_reject(features: RuleSet) -> None:
    # load.py rejects delegate loops; the router still must not spin on a hand-built set.
    owners = dict(features.owners)
    owners["carol"] = dataclasses.replace(owners["carol"], away_until=at(2030, 1, 1), delegate="alice")
    looped = dataclasses.replace(features, owners=MappingProxyType(owners))
    (decision,) = route(doc(score=0.9, context={"account_manager": "alice"}), looped, now=at(2026, 12, 1))
    assert decision.owner in {"alice", "bob", "carol"} and decision.delegated_from in {None, "alice"}


def test_decisions_are_the_frozen_dataclass_the_constructor_makes(ruleset: RuleSet) -> None:
    # route builds Decisions without the dataclass __init__ (see router._decision): same object.
    decisions = route(doc(), ruleset) + route(doc(model="fraud", score=0.99), ruleset)
    assert decisions
    for decision in decisions:
        fields = {f.name: getattr(decision, f.name) for f in dataclasses.fields(decision)}
        assert vars(decision) == fields  # every field set, nothing else
        rebuilt = type(decision)(**fields)
        assert rebuilt == decision and repr(rebuilt) == repr(decision)
        with pytest.raises(dataclasses.FrozenInstanceError):
            decision.owner = "someone"  # type: ignore[misc]


def _two_holdout_rules(tmp_path: Path, name: str, first: tuple[str, float], second: tuple[str, float]) -> RuleSet:
    rules_dir = tmp_path / name
    rules_dir.mkdir()
    body = "".join(
        f"  - name: {rule}\n    when: {{}}\n    owner: alice\n    continue: true\n    holdout: {fraction}\n"
        for rule, fraction in (first, second)
    )
    (rules_dir / "routing.yaml").write_text(f"rules:\n{body}  - name: catch-all\n    when: {{}}\n    owner: desk\n"
                                            "    action: record\n")
    (rules_dir / "owners.yaml").write_text(OWNERS)
    return load_rules(rules_dir)


def test_holdout_ignores_rule_order_and_the_other_rules_fractions(tmp_path: Path) -> None:
    """Reordering the rules, or changing one rule's holdout, reshuffles no entity of another rule."""
    before = _two_holdout_rules(tmp_path, "before", ("retain", 0.3), ("upsell", 0.2))
    after = _two_holdout_rules(tmp_path, "after", ("upsell", 0.6), ("retain", 0.3))

    def held(ruleset: RuleSet, n: int) -> dict[str, bool]:
        return {d.rule: d.held_out for d in route(doc(entity_id=f"acct-{n}"), ruleset) if d.rule != "catch-all"}

    then, now = [held(before, n) for n in range(2000)], [held(after, n) for n in range(2000)]
    assert [h["retain"] for h in then] == [h["retain"] for h in now]
    # Raising upsell's fraction only adds entities to its control group.
    assert all(h_now["upsell"] for h_then, h_now in zip(then, now, strict=False) if h_then["upsell"])
    assert sum(h["upsell"] for h in now) > sum(h["upsell"] for h in then)


def test_holdout_share_on_100000_entities_is_within_binomial_noise() -> None:
    entities, fraction = 100_000, 0.1
    held = sum(in_holdout("retain", "account", f"acct-{n}", fraction) for n in range(entities))
    sd = (entities * fraction * (1 - fraction)) ** 0.5  # 94.9
    assert abs(held - entities * fraction) <= 4 * sd
