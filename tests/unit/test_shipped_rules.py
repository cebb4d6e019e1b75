"""The example rule set in rules/ loads cleanly and routes as docs/rules.md describes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from decision_router.contracts import Prediction
from decision_router.router import route
from decision_router.rules import RuleSet, check_rules, load_rules

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"


@pytest.fixture(scope="module")
def ruleset() -> RuleSet:
    return load_rules(RULES_DIR)


def test_shipped_rules_have_no_problems() -> None:
    assert [str(p) for p in check_rules(RULES_DIR)] == []


def churn(score: float, version: str = "2024.06", **context: Any) -> dict[str, Any]:
    return Prediction(
        prediction_id="p-1", model="churn", model_version=version, entity_type="account", entity_id="acct-17",
        score=score, predicted_at=datetime(2024, 6, 1, tzinfo=UTC),
        features={"top_drivers": ["support_tickets_up", "logins_down"]}, context=context,
    ).as_document()


def fraud(score: float, **context: Any) -> dict[str, Any]:
    return Prediction(
        prediction_id="p-2", model="payment-fraud", model_version="7", entity_type="invoice", entity_id="inv-9",
        score=score, predicted_at=datetime(2024, 6, 1, tzinfo=UTC), context=context,
    ).as_document()


REST = [("everything-else", "analytics-desk", "static")]
CASES = [
    ("enterprise-high-named-am", churn(0.91, segment="enterprise", account_manager="elena-petrova", arr=200000),
     [("enterprise-churn-risk", "elena-petrova", "field")]),
    ("key-account-director-copy", churn(0.85, segment="strategic", account_manager="alice-moreau", arr="750000"),
     [("key-account-churn-visibility", "dir-enterprise", "static"), ("enterprise-churn-risk", "alice-moreau", "field")]),
    ("enterprise-unknown-am", churn(0.9, segment="enterprise", account_manager="former-employee"),
     [("enterprise-churn-risk", "enterprise-desk", "fallback")]),
    ("enterprise-watch", churn(0.65, segment="enterprise", account_manager="jack-sullivan"),
     [("enterprise-churn-watch", "jack-sullivan", "field")]),
    ("mid-market-no-am", churn(0.75, segment="mid-market"), [("mid-market-churn-risk", "mid-market-desk", "fallback")]),
    ("mid-market-low", churn(0.5, segment="mid-market", account_manager="maya-patel"), REST),
    ("smb-high-pooled", churn(0.9, segment="smb"), [("smb-churn-risk", "smb-desk", "static")]),
    ("smb-medium-recorded", churn(0.7, segment="smb"), [("smb-churn-watch", "smb-desk", "static")]),
    ("shadow-version-first", churn(0.95, version="2024.06-shadow", segment="enterprise", account_manager="elena-petrova"),
     [("shadow-models", "analytics-desk", "static")]),
    ("fraud-block", fraud(0.95, amount=120.0), [("payment-fraud-block", "billing-risk-desk", "static")]),
    ("fraud-large-invoice", fraud(0.7, amount="25000", payment_method="card"),
     [("payment-fraud-large-invoice", "billing-risk-desk", "static")]),
    ("fraud-prepaid-wire", fraud(0.7, amount=25000, payment_method="wire-prepaid"), REST),
    ("fraud-small-invoice", fraud(0.7, amount=500, payment_method="card"), REST),
    ("other-model", {**churn(0.99, segment="enterprise"), "model": "expansion"}, REST),
]


@pytest.mark.parametrize(("document", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_shipped_routing(ruleset: RuleSet, document: dict[str, Any], expected: list[tuple[str, str, str]]) -> None:
    assert [(d.rule, d.owner, d.owner_source) for d in route(document, ruleset)] == expected


def test_actions_and_deadlines_as_documented(ruleset: RuleSet) -> None:
    (block,) = route(fraud(0.95), ruleset)
    assert (block.priority, block.action, block.ack_within, block.act_within) == (
        "critical", "alert", timedelta(minutes=15), timedelta(hours=1))
    (watch,) = route(churn(0.7, segment="smb"), ruleset)
    assert watch.action == "record"
    last = ruleset.rules[-1]
    assert (last.name, last.owner_static, last.action, last.conditions) == ("everything-else", "analytics-desk", "record", ())


def test_every_owner_escalates_to_an_executive(ruleset: RuleSet) -> None:
    executives = {"vp-customer-success", "vp-finance"}
    for owner in ruleset.owners.values():
        chain = [owner.id]
        while (manager := ruleset.owners[chain[-1]].manager) is not None:
            chain.append(manager)
        assert chain[-1] in executives, chain


def test_account_managers_for_demo_data(ruleset: RuleSet) -> None:
    # A demo picks context.account_manager values from this team; each must route to a person.
    managers = [o for o in ruleset.owners.values() if o.team == "account-management"]
    assert len(managers) >= 10
    assert all(o.email and o.email.endswith("@example.com") for o in managers)


D7, D1 = timedelta(days=7), timedelta(days=1)
# rule -> (cooldown, holdout). enterprise-churn-risk has no holdout on purpose: the riskiest
# enterprise accounts are always worked (and the integration tests expect every alert).
SHIPPED_LIMITS = {
    "shadow-models": (None, 0.0),
    "key-account-churn-visibility": (D7, 0.0),
    "enterprise-churn-risk": (D7, 0.0),
    "enterprise-churn-watch": (D7, 0.1),
    "mid-market-churn-risk": (D7, 0.1),
    "smb-churn-risk": (D7, 0.1),
    "smb-churn-watch": (None, 0.0),
    "payment-fraud-block": (D1, 0.0),
    "payment-fraud-large-invoice": (D1, 0.0),
    "everything-else": (None, 0.0),
}


def test_cooldowns_and_holdouts_as_documented(ruleset: RuleSet) -> None:
    assert {r.name: (r.cooldown, r.holdout) for r in ruleset.rules} == SHIPPED_LIMITS


def test_holdout_marks_decisions_of_the_shipped_rules(ruleset: RuleSet) -> None:
    held = []
    for n in range(300):
        document = {**churn(0.9, segment="smb"), "entity_id": f"acct-{n}"}
        (decision,) = route(document, ruleset)
        held.append(decision.held_out)
    assert 0.03 < sum(held) / len(held) < 0.2
    assert not any(route({**churn(0.95, segment="enterprise"), "entity_id": f"acct-{n}"}, ruleset)[0].held_out for n in range(300))


UTC = UTC
AWAY_CASES = [
    ("no-clock", None, ("hugo-lambert", "field", None)),
    ("on-leave", datetime(2026, 12, 1, tzinfo=UTC), ("felix-wagner", "delegate", "hugo-lambert")),
    ("last-day-of-leave", datetime(2027, 1, 15, 23, 59, tzinfo=UTC), ("felix-wagner", "delegate", "hugo-lambert")),
    ("back", datetime(2027, 1, 16, tzinfo=UTC), ("hugo-lambert", "field", None)),
]


@pytest.mark.parametrize(("now", "expected"), [c[1:] for c in AWAY_CASES], ids=[c[0] for c in AWAY_CASES])
def test_away_account_manager_is_covered_by_a_colleague(ruleset: RuleSet, now: datetime | None, expected: tuple) -> None:
    (decision,) = route(churn(0.9, segment="enterprise", account_manager="hugo-lambert"), ruleset, now=now)
    assert (decision.owner, decision.owner_source, decision.delegated_from) == expected


def test_delegates_are_colleagues_and_test_owners_are_not_away(ruleset: RuleSet) -> None:
    away = {o.id: o.delegate for o in ruleset.owners.values() if o.away_until is not None}
    assert away == {"hugo-lambert": "felix-wagner"}
    for oid, delegate in away.items():
        owner, stand_in = ruleset.owners[oid], ruleset.owners[delegate]  # type: ignore[index]
        assert (stand_in.team, stand_in.manager, stand_in.away_until) == (owner.team, owner.manager, None)
    # The integration and end-to-end tests route to these owners and expect them, not a delegate.
    assert all(ruleset.owners[oid].away_until is None for oid in ("alice-moreau", "elena-petrova", "benoit-garnier"))
