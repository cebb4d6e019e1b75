"""(prediction document, RuleSet) -> decisions. Pure: no Redis, no SQL, no clock.

Every decision names an owner: a valid rule set ends with a catch-all and every
`owner.from` has a fallback that is in the directory (checked in rules/load.py), so the
fallback path here cannot fail. The caller passes `now` to hand away owners' decisions
to their delegates; without it, nobody is away.

The router knows no history: a rule's `cooldown` is carried on the decision for the
caller to enforce, and `held_out` is a pure function of (rule, entity), see `in_holdout`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from decision_router.rules import MISSING, CompiledRule, Owner, RuleSet
from decision_router.rules.compile import getter

_entity_type = getter("entity_type")
_entity_id = getter("entity_id")


@dataclass(frozen=True)
class Decision:
    rule: str
    rule_index: int
    owner: str
    owner_source: str  # "static" | "field" | "fallback" | "delegate"
    fallback_reason: str | None  # why the fallback owner was used (kept when it was then delegated); None otherwise
    priority: str
    action: str  # "alert" | "record"
    context: dict[str, Any]  # selected dotted field -> value, only those present
    missing_context: tuple[str, ...]  # selected fields absent (or null) in the prediction
    ack_within: timedelta
    act_within: timedelta
    cooldown: timedelta | None = None  # the rule's cooldown: at most one alert per entity and rule per window
    held_out: bool = False  # in the rule's control group: store as a control record, do not deliver
    delegated_from: str | None = None  # the away owner whose decision went to `owner`; None otherwise


def _decision(**fields: Any) -> Decision:
    """`Decision(**fields)` with every field given, without the frozen dataclass's `__init__`:
    its one `object.__setattr__` per field cost ~1.5 µs, a third of routing a prediction. The
    object is the same (fields in its `__dict__`, still frozen against assignment)."""
    decision = object.__new__(Decision)
    decision.__dict__.update(fields)
    return decision


def in_holdout(rule: str, entity_type: str, entity_id: str, fraction: float) -> bool:
    """Whether (rule, entity) is in the rule's control group of `fraction` (0 <= fraction < 1).

    A stable hash, not Python's salted `hash()`: the same entity gets the same answer in
    every process, on every machine and in every release, for as long as the rule keeps
    its name; raising the fraction only adds entities to the group.
    """
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{rule}\0{entity_type}\0{entity_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def route(document: Mapping[str, Any], ruleset: RuleSet, *, now: datetime | None = None) -> list[Decision]:
    """Rules in file order; the first match wins unless it has `continue: true`.

    With `now` (timezone-aware), an owner away at that instant is replaced by their
    delegate; without it nobody is away, so the result depends on the inputs only.
    """
    if now is not None and now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    decisions = []
    for rule, matches in ruleset.candidate_checks(document.get("model")):
        if matches(document):
            decisions.append(_decide(rule, document, ruleset.owners, now))
            if not rule.continue_:
                break
    return decisions


def route_without_lookups(document: Mapping[str, Any], ruleset: RuleSet, *, now: datetime | None = None
                          ) -> list[Decision] | None:
    """`route`, or None as soon as the outcome could depend on looked-up context (a rule
    reached whose `when` reads lookup.*, or a match whose owner or context does). When it
    returns decisions, they are exactly what `route` gives with any lookups added to the
    document, so the caller can skip the lookups of this prediction."""
    if now is not None and now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    decisions = []
    for rule, matches in ruleset.candidate_checks(document.get("model")):
        if rule.when_reads_lookup:
            return None
        if matches(document):
            if rule.decision_reads_lookup:
                return None
            decisions.append(_decide(rule, document, ruleset.owners, now))
            if not rule.continue_:
                break
    return decisions


def _owner(rule: CompiledRule, document: Mapping[str, Any], owners: Mapping[str, Owner]) -> tuple[str, str, str | None]:
    """(owner id, source, fallback reason)."""
    if rule.owner_static is not None:
        return rule.owner_static, "static", None
    assert rule.owner_getter is not None and rule.owner_fallback is not None  # guaranteed by load
    value = rule.owner_getter(document)
    if value is MISSING:
        reason = f"{rule.owner_from} missing"
    elif not isinstance(value, str) or not value.strip():
        reason = f"{rule.owner_from} is not an owner id: {value!r}"
    elif value not in owners:
        reason = f"owner '{value}' not in directory"
    else:
        return value, "field", None
    return rule.owner_fallback, "fallback", reason


def present_owner(owner: str, owners: Mapping[str, Owner], now: datetime) -> str:
    """The owner, or the first delegate along the chain who is not away at `now`.

    load.py guarantees away owners have a delegate in the directory and delegate chains
    do not loop; the step limit keeps this total even so.
    """
    for _ in range(len(owners)):
        current = owners.get(owner)
        if current is None or current.delegate is None or not current.is_away(now):
            break
        owner = current.delegate
    return owner


def _text(value: Any) -> str:
    return "" if value is MISSING else str(value)


def _decide(
    rule: CompiledRule, document: Mapping[str, Any], owners: Mapping[str, Owner], now: datetime | None
) -> Decision:
    owner, source, reason = _owner(rule, document, owners)
    delegated_from = None
    if now is not None and (present := present_owner(owner, owners, now)) != owner:
        owner, source, delegated_from = present, "delegate", owner
    held_out = rule.holdout > 0 and in_holdout(
        rule.name, _text(_entity_type(document)), _text(_entity_id(document)), rule.holdout
    )
    context: dict[str, Any] = {}
    missing: list[str] = []
    for path, get in rule.context_getters:
        value = get(document)
        if value is MISSING:
            missing.append(path)
        else:
            context[path] = value
    return _decision(
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
        cooldown=rule.cooldown,
        held_out=held_out,
        delegated_from=delegated_from,
    )
