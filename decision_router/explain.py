"""`rules test`: what the rules would decide for one prediction, and why. Pure: no store, no Redis.

Like `amtool config routes test`, the result can be checked against expectations
(`--expect-rule`, `--expect-owner`), so a rules change can be guarded in CI.

Nothing is looked up here (no context sources are queried): a `lookup` object given with the
prediction, {source: {field: value}} as the store keeps it with a routed prediction, is the
looked-up context the rules see as lookup.<source>.<field>; without it those fields are missing.
The fields the rules read are bounded as the router bounds what a source gives (enrich.bounded):
one over the limits is missing here too.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from decision_router.audit import iso
from decision_router.contracts import Prediction, Rejection, RejectionReason, storable_text
from decision_router.durations import format_duration
from decision_router.echo import cap_digits
from decision_router.enrich import bounded, lookup_limits, referenced_fields
from decision_router.publisher import read_entries, undecoded, validate_entry
from decision_router.quality import DEFAULT_LIMITS, MAX_INT_BITS, original_payload
from decision_router.router import Decision, route
from decision_router.rules import RuleSet
from decision_router.rules.spec import LOOKUP

COOLDOWN_NOTE = "cooldown depends on earlier alerts for the entity and is not evaluated here"


@dataclass(frozen=True)
class RuleMatch:
    """One decision the rules would make, with the reasons an author needs."""

    rule: str
    rule_index: int
    owner: str
    owner_source: str  # static | field | fallback | delegate
    owner_why: str  # human: "static", "from field context.account_manager", ...
    owner_field: str | None  # the `owner.from` path, for field / fallback owners
    fallback_reason: str | None
    delegated_from: str | None
    priority: str
    action: str  # alert | record
    held_out: bool
    cooldown: timedelta | None
    ack_within: timedelta
    act_within: timedelta
    ack_by: datetime
    act_by: datetime
    context: dict[str, Any]
    missing_context: tuple[str, ...]

    @property
    def treatment(self) -> str:
        """treated (delivered), control (held out, not delivered) or record (tracked only)."""
        if self.action != "alert":
            return "record"
        return "control" if self.held_out else "treated"

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "rule_index": self.rule_index,
            "owner": self.owner,
            "owner_source": self.owner_source,
            "owner_why": self.owner_why,
            "owner_field": self.owner_field,
            "fallback_reason": self.fallback_reason,
            "delegated_from": self.delegated_from,
            "priority": self.priority,
            "action": self.action,
            "held_out": self.held_out,
            "treatment": self.treatment,
            "cooldown": format_duration(self.cooldown) if self.cooldown else None,
            "cooldown_note": COOLDOWN_NOTE if self.cooldown else None,
            "ack_within": format_duration(self.ack_within),
            "act_within": format_duration(self.act_within),
            "ack_by": iso(self.ack_by),
            "act_by": iso(self.act_by),
            "context": self.context,
            "missing_context": list(self.missing_context),
        }


@dataclass(frozen=True)
class Explanation:
    prediction_id: str
    rules_version: str
    now: datetime
    matches: tuple[RuleMatch, ...]

    @property
    def rules(self) -> list[str]:
        return [m.rule for m in self.matches]

    @property
    def owners(self) -> list[str]:
        return list(dict.fromkeys(m.owner for m in self.matches))


@dataclass(frozen=True)
class Case:
    """One input of `rules test`: a prediction that passed the gate, or its rejection."""

    source: str  # "argument", "stdin", "FILE", "FILE:3" (JSON lines), "FILE[2]" (JSON array)
    prediction: Prediction | None
    rejection: Rejection | None
    lookup: dict[str, dict[str, Any]] | None = None  # looked-up context given with the prediction


def owner_why(decision: Decision, owner_field: str | None) -> str:
    """static / from field X / fallback: reason / delegate for away owner Y (how Y was found)."""
    if decision.fallback_reason is not None:
        how = f"fallback: {decision.fallback_reason}"
    elif owner_field is not None:
        how = f"from field {owner_field}"
    else:
        how = "static"
    if decision.owner_source == "delegate":
        return f"delegate for away owner {decision.delegated_from} ({how})"
    return how


def explain(
    prediction: Prediction, ruleset: RuleSet, *, now: datetime, lookup: Mapping[str, Any] | None = None
) -> Explanation:
    """Route the prediction as the service would at `now` with `lookup` as its looked-up
    context, and say why each owner was chosen."""
    document = prediction.as_document()
    if lookup is not None:
        document[LOOKUP] = lookup
    matches = []
    for decision in route(document, ruleset, now=now):
        rule = ruleset.rules[decision.rule_index]
        matches.append(
            RuleMatch(
                rule=decision.rule,
                rule_index=decision.rule_index,
                owner=decision.owner,
                owner_source=decision.owner_source,
                owner_why=owner_why(decision, rule.owner_from),
                owner_field=rule.owner_from,
                fallback_reason=decision.fallback_reason,
                delegated_from=decision.delegated_from,
                priority=decision.priority,
                action=decision.action,
                held_out=decision.held_out,
                cooldown=decision.cooldown,
                ack_within=decision.ack_within,
                act_within=decision.act_within,
                ack_by=now + decision.ack_within,
                act_by=now + decision.act_within,
                context=dict(decision.context),
                missing_context=tuple(decision.missing_context),
            )
        )
    return Explanation(prediction.prediction_id, ruleset.version, now, tuple(matches))


def split_expectations(values: Iterable[str] | None) -> list[str]:
    """`--expect-rule a --expect-rule b,c` -> [a, b, c]."""
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def mismatches(explanation: Explanation, *, rules: Sequence[str], owners: Sequence[str]) -> list[str]:
    """Expected sets compared with the matching rules and their owners (order does not matter)."""
    problems = []
    for what, expected, actual in (("rules", rules, explanation.rules), ("owners", owners, explanation.owners)):
        if expected and set(expected) != set(actual):
            problems.append(
                f"{explanation.prediction_id}: expected {what} {', '.join(sorted(set(expected)))}; "
                f"got {', '.join(actual) or 'none'}"
            )
    return problems


def _decoded(text: str) -> Any:
    """The JSON value of `text`, or None when it is not JSON or nests deeper than json.loads can
    recurse: the publish gate, given the text, then says which (invalid_json or too_deep)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def parse_inputs(text: str, source: str) -> list[Case]:
    """A JSON object, a JSON array of objects, or JSON lines; each checked by the publish gate.
    `text` may hold bytes that are not UTF-8 (decoded with surrogateescape): a prediction holding
    one is checked as written, so the gate sees the bytes (json.dumps would make them lone surrogates)."""
    whole = _decoded(text)
    not_utf8 = isinstance(undecoded(text), bytes)
    if isinstance(whole, dict):
        return [check(text if not_utf8 else json.dumps(whole), source)]
    if isinstance(whole, list):
        items = _array_items(text) if not_utf8 else [json.dumps(item) for item in whole]
        return [check(item, f"{source}[{n}]") for n, item in enumerate(items, start=1)]
    lines = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if len(lines) <= 1:
        return [check(lines[0][1] if lines else text, source)]
    return [check(line, f"{source}:{n}") for n, line in lines]


def csv_cases(path: Path) -> list[Case]:
    """A CSV file's rows read as `publish` reads them (a header row, dotted columns such as
    context.account_manager), each checked by the gate; named FILE:LINE. Raises FileFormatError
    for a file `publish` refuses as a whole (no header)."""
    cases = []
    for number, entry in read_entries(path, "csv"):
        checked = validate_entry(entry)
        source = f"{path}:{number}"
        cases.append(Case(source, checked, None) if isinstance(checked, Prediction) else Case(source, None, checked))
    return cases


_SEPARATOR = re.compile(r"[ \t\n\r]*,?[ \t\n\r]*")  # JSON's whitespace, around a comma or not


def _array_items(text: str) -> list[str]:
    """The text of each item of `text`, a JSON array json.loads accepts, as written."""
    decoder, items = json.JSONDecoder(), []
    at = _SEPARATOR.match(text, text.index("[") + 1).end()
    while text[at] != "]":
        _, end = decoder.raw_decode(text, at)
        items.append(text[at:end])
        at = _SEPARATOR.match(text, end).end()
    return items


LOOKUP_SHAPE = 'lookup: expected an object of sources, each an object of fields, like {"crm": {"tier": "gold"}}'


def check(line: str, source: str) -> Case:
    """The gate's checks except age and duplicates, exactly as `publish` runs them, on the
    prediction without its `lookup` object (the gate knows no such field)."""
    data = undecoded(line)
    if isinstance(data, bytes):
        # Not UTF-8: given the bytes, as `publish` gives a line, the gate says so and where, before any
        # lookup is split off (as text the byte would be a lone surrogate, or no JSON at all).
        rejected = validate_entry({"data": data})
        assert isinstance(rejected, Rejection)  # undecodable data never passes
        return Case(source, None, rejected)
    line, looked_up, problem = split_lookup(line)
    if problem is not None:
        reason, detail = problem
        rejection = Rejection(reason=reason, detail=detail, source_stream="file",
                              payload=original_payload({"data": line}))
        return Case(source, None, rejection)
    checked = validate_entry({"data": line})
    if isinstance(checked, Prediction):
        return Case(source, checked, None, looked_up)
    return Case(source, None, checked)


Problem = tuple[RejectionReason, str]


def split_lookup(line: str) -> tuple[str, dict[str, dict[str, Any]] | None, Problem | None]:
    """(the prediction's JSON without `lookup`, the lookup object or None, what is wrong with it)."""
    document = _decoded(line)
    if not isinstance(document, dict) or LOOKUP not in document:
        return line, None, None  # the gate says what is wrong with anything but a lookup
    looked_up = document.pop(LOOKUP)
    if not isinstance(looked_up, dict) or not all(isinstance(fields, dict) for fields in looked_up.values()):
        return line, None, (RejectionReason.SCHEMA, LOOKUP_SHAPE)
    return json.dumps(document), looked_up, _lookup_problem(looked_up)


# What an empty name in the lookup object is, by how deep it lies: lookup.<source>.<field>.
_EMPTY_NAMES = {0: "an empty source name", 1: "an empty field name"}


def _lookup_problem(looked_up: dict[str, Any]) -> Problem | None:
    """The gate's value checks on the lookup, which the gate never sees: no NaN or infinity (not
    JSON, so not printable as JSON), no text with a NUL or a lone surrogate, no integer too large
    to compare with a float; and no empty name, which the gate refuses in context (no rule path
    can address it)."""
    todo: list[tuple[str, int, Any]] = [(LOOKUP, 0, looked_up)]  # (path, depth below lookup, value)
    while todo:
        path, depth, value = todo.pop()
        if isinstance(value, str) and not storable_text(value):
            return RejectionReason.INVALID_ENCODING, f"{path}: text holds a NUL character or a lone surrogate"
        if isinstance(value, float) and not math.isfinite(value):
            return RejectionReason.SCHEMA, f"{path}: {value} is not a finite number"
        if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
            return RejectionReason.SCHEMA, f"{path}: an integer of {value.bit_length()} bits is too large"
        if isinstance(value, dict):
            for key, item in value.items():
                if not storable_text(key):
                    return RejectionReason.INVALID_ENCODING, f"{path}: a name holds a NUL character or a lone surrogate"
                if not key:
                    what = _EMPTY_NAMES.get(depth, "an empty name")
                    return RejectionReason.SCHEMA, f"{path}.: {what}, which no rule path can address"
                todo.append((f"{path}.{cap_digits(key)[:60]}", depth + 1, item))
        elif isinstance(value, list):
            todo.extend((f"{path}[{n}]", depth + 1, item) for n, item in enumerate(value))
    return None


def as_routed(looked_up: Mapping[str, Mapping[str, Any]], ruleset: RuleSet) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The lookup as the router would route with it: of each source, the fields the rules read within the
    limits a source's values get (16 KiB, nesting 7 by default: enrich.lookup_limits of the gate's limits, which
    `rules test` applies to the prediction), the others as given (no rule reads them); and what was dropped,
    by lookup path and size."""
    limits = lookup_limits(DEFAULT_LIMITS)
    read = referenced_fields(ruleset)
    routed: dict[str, dict[str, Any]] = {}
    dropped: list[str] = []
    for source, fields in looked_up.items():
        names = read.get(source, ())
        kept, problems = bounded({name: value for name, value in fields.items() if name in names}, limits)
        routed[source] = {name: value for name, value in fields.items() if name not in names or name in kept}
        # "note: 20000 bytes" names its field; "a, b together: 1203 bytes" its source's.
        dropped.extend(f"{LOOKUP}.{source}{': ' if ' together: ' in problem else '.'}{problem}" for problem in problems)
    return routed, dropped


@dataclass(frozen=True)
class CaseResult:
    case: Case
    explanation: Explanation | None  # None when the prediction was rejected
    mismatches: tuple[str, ...]
    lookup_dropped: tuple[str, ...] = ()  # lookup fields over the router's limits: missing, as when routed

    def as_dict(self) -> dict[str, Any]:
        if self.case.rejection is not None:
            rejection = self.case.rejection
            return {"source": self.case.source, "valid": False,
                    "rejection": {"reason": rejection.reason.value, "detail": rejection.detail}}
        assert self.explanation is not None
        given = {"lookup": self.case.lookup, "lookup_dropped": list(self.lookup_dropped)} \
            if self.case.lookup is not None else {}
        return {
            "source": self.case.source,
            "valid": True,
            "prediction_id": self.explanation.prediction_id,
            **given,
            "matches": [m.as_dict() for m in self.explanation.matches],
            "expectations_met": not self.mismatches,
            "mismatches": list(self.mismatches),
        }


def run_cases(
    cases: Sequence[Case], ruleset: RuleSet, *, now: datetime, rules: Sequence[str] = (), owners: Sequence[str] = ()
) -> list[CaseResult]:
    results = []
    for case in cases:
        if case.prediction is None:
            results.append(CaseResult(case, None, ()))
            continue
        looked_up, dropped = as_routed(case.lookup, ruleset) if case.lookup is not None else (None, [])
        explanation = explain(case.prediction, ruleset, now=now, lookup=looked_up)
        results.append(CaseResult(case, explanation, tuple(mismatches(explanation, rules=rules, owners=owners)),
                                  tuple(dropped)))
    return results


def as_document(
    results: Sequence[CaseResult], ruleset: RuleSet, *, now: datetime, rules: Sequence[str] = (), owners: Sequence[str] = ()
) -> dict[str, Any]:
    """The JSON form of a whole `rules test` run."""
    return {
        "rules_dir": str(ruleset.source_dir),
        "rules_version": ruleset.version,
        "now": iso(now),
        "expect": {"rules": list(rules), "owners": list(owners)},
        "predictions": [result.as_dict() for result in results],
    }


def exit_code(results: Sequence[CaseResult]) -> int:
    """2 when a prediction was rejected (a usage error), 1 when an expectation failed, else 0."""
    if any(result.case.rejection is not None for result in results):
        return 2
    return 1 if any(result.mismatches for result in results) else 0


def context_text(context: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in context.items()) or "-"
