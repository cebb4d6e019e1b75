"""(prediction document, RuleSet) -> decisions. Pure: no Redis, no SQL, no clock.

Every decision names an owner: a valid rule set ends with a catch-all and every
`owner.from` has a fallback that is in the directory (checked in rules/load.py), so the
fallback path here cannot fail.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from decision_router.rules import MISSING, CompiledRule, Owner, RuleSet, lookup


@dataclass(frozen=True)
class Decision:
    rule: str
    rule_index: int
    owner: str
    owner_source: str  # "static" | "field" | "fallback"
    fallback_reason: str | None  # why the fallback owner was used; None otherwise
    priority: str
    action: str  # "alert" | "record"
    context: dict[str, Any]  # selected dotted field -> value, only those present
    missing_context: tuple[str, ...]  # selected fields absent (or null) in the prediction
    ack_within: timedelta
    act_within: timedelta


def route(document: Mapping[str, Any], ruleset: RuleSet) -> list[Decision]:
    """Rules in file order; the first match wins unless it has `continue: true`."""
    decisions = []
    for rule in ruleset.rules:
        if rule.matches(document):
            decisions.append(_decide(rule, document, ruleset.owners))
            if not rule.continue_:
                break
    return decisions


def _owner(rule: CompiledRule, document: Mapping[str, Any], owners: Mapping[str, Owner]) -> tuple[str, str, str | None]:
    """(owner id, source, fallback reason)."""
    if rule.owner_static is not None:
        return rule.owner_static, "static", None
    assert rule.owner_from is not None and rule.owner_fallback is not None  # guaranteed by load
    value = lookup(document, rule.owner_from)
    if value is MISSING:
        reason = f"{rule.owner_from} missing"
    elif not isinstance(value, str) or not value.strip():
        reason = f"{rule.owner_from} is not an owner id: {value!r}"
    elif value not in owners:
        reason = f"owner '{value}' not in directory"
    else:
        return value, "field", None
    return rule.owner_fallback, "fallback", reason


def _decide(rule: CompiledRule, document: Mapping[str, Any], owners: Mapping[str, Owner]) -> Decision:
    owner, source, reason = _owner(rule, document, owners)
    context: dict[str, Any] = {}
    missing: list[str] = []
    for path in rule.context_fields:
        value = lookup(document, path)
        if value is MISSING:
            missing.append(path)
        else:
            context[path] = value
    return Decision(
        rule=rule.name,
        rule_index=rule.index,
        owner=owner,
        owner_source=source,
        fallback_reason=reason,
        priority=rule.priority,
        action=rule.action,
        context=context,
        missing_context=tuple(missing),
        ack_within=rule.ack_within,
        act_within=rule.act_within,
    )
