"""Validated specs -> plain predicates, built once per load.

Nothing here parses YAML or reports problems: `load.py` only calls `build_ruleset` on a
rule set with no problems, so an operator or regex here is known to be good. Evaluation
never raises on odd document values (a string where a number was expected, a list
where a string was); such a condition is simply false.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Any

from decision_router.rules.spec import (
    LOOKUP,
    ConditionSpec,
    ContextSourceSpec,
    DefaultsSpec,
    ModelSpec,
    OwnerSpec,
    RoutingFile,
    RuleSpec,
    WebhookSpec,
    compile_regex,
    key_placeholders,
    sql_parameters,
)


class _Missing:
    """Sentinel for a field that is absent (or null) in the document."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()

Test = Callable[[Any], bool]


@lru_cache(maxsize=4096)
def _split(path: str) -> tuple[str, ...]:
    return tuple(path.split("."))


def lookup(document: Mapping[str, Any], path: str) -> Any:
    """Value at a dotted path, or MISSING. Null counts as missing: producers send
    `"label": null` for "no label", and `as_document()` does the same."""
    value: Any = document
    for part in _split(path):
        if not isinstance(value, Mapping) or part not in value:
            return MISSING
        value = value[part]
    return MISSING if value is None else value


def getter(path: str) -> Callable[[Mapping[str, Any]], Any]:
    """`lookup` of one path, specialised once per rule load: on plain dicts (what routing
    sees) a chain of `dict.get` instead of a walk with `Mapping` checks; anything else
    takes `lookup`."""
    parts = _split(path)
    if len(parts) == 1:
        (key,) = parts

        def top(document: Mapping[str, Any]) -> Any:
            if type(document) is dict:
                value = document.get(key)
                return MISSING if value is None else value
            return lookup(document, path)

        return top
    if len(parts) == 2:
        outer, inner = parts

        def nested(document: Mapping[str, Any]) -> Any:
            if type(document) is dict:
                parent = document.get(outer)
                if type(parent) is dict:
                    value = parent.get(inner)
                    return MISSING if value is None else value
                if parent is None or type(parent) in _SCALARS:
                    return MISSING
            return lookup(document, path)

        return nested
    return lambda document: lookup(document, path)


# Types that are never a Mapping: a path through one is MISSING without asking `lookup`.
_SCALARS = frozenset({str, int, float, bool, list})


def _as_number(value: Any) -> float | None:
    # Flat Redis producers send every field as a string ("120000"), so numeric strings
    # count as numbers; anything else makes a numeric comparison false.
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def same(actual: Any, expected: Any) -> bool:
    """eq/ne/in/not_in equality, tolerant of stringly typed producers.

    A string and a number are equal when the string is exactly `str(number)`
    ("120000" == 120000, "0.5" == 0.5); a string and a boolean when it is
    "true"/"false" in any case. Otherwise Python equality, except that booleans never
    equal numbers (True is not 1 for a rule author).
    """
    if isinstance(actual, bool) or isinstance(expected, bool):
        if isinstance(actual, bool) and isinstance(expected, bool):
            return actual == expected
        text, flag = (actual, expected) if isinstance(expected, bool) else (expected, actual)
        return isinstance(text, str) and text.strip().lower() == ("true" if flag else "false")
    if isinstance(actual, str) and isinstance(expected, (int, float)):
        return actual == str(expected)
    if isinstance(expected, str) and isinstance(actual, (int, float)):
        return str(actual) == expected
    if isinstance(actual, (Mapping, list)):
        return False  # rule values are scalars; a container never equals one
    return bool(actual == expected)


def _numeric(compare: Callable[[float, Any], bool], bound: Any) -> Test:
    """`compare(number, bound)` on a finite number (or numeric text); false otherwise."""

    def test(value: Any) -> bool:
        if type(value) is float and -math.inf < value < math.inf:  # scores: no conversion needed
            return compare(value, bound)
        number = _as_number(value)
        return number is not None and compare(number, bound)

    return test


def _between(low: Any, high: Any) -> Test:
    def test(value: Any) -> bool:
        number = value if type(value) is float and -math.inf < value < math.inf else _as_number(value)
        return number is not None and low <= number <= high

    return test


# Texts up to this long have their regex result cached: RE2 calls cost microseconds from
# Python, and the values rules test (model_version, segment, region) repeat a lot.
_REGEX_CACHED_CHARS = 256


def _regex(pattern: str) -> Test:
    # RE2 (see spec.compile_regex): linear-time matching, so a pattern such as (a+)+$ cannot
    # hang the router on a long input. Compiled once per load, not per prediction.
    search = compile_regex(pattern).search

    def found(text: str) -> bool:
        try:
            return search(text) is not None
        except UnicodeEncodeError:  # a lone surrogate from a context lookup: not text RE2 can read
            return False

    cached = lru_cache(maxsize=4096)(found)

    def test(value: Any) -> bool:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        elif not isinstance(value, str):
            return False
        return cached(value) if len(value) <= _REGEX_CACHED_CHARS else found(value)

    return test


_COMPARISONS = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}
# Operators whose test is false on MISSING by itself (MISSING equals nothing, is no number and
# no text); the others (ne, not_in) would be true on it, so the caller tests presence first.
_FALSE_ON_MISSING = frozenset({"eq", "in", "regex", "between", *_COMPARISONS})


def _operator(op: str, expected: Any) -> Test:
    """One operator on a value; MISSING is handled by the caller unless `op` is in
    `_FALSE_ON_MISSING`."""
    if op == "eq":
        if type(expected) is str:
            # The common case, tested for every prediction: text against text is plain
            # equality; anything else takes the tolerant path of `same`.
            return lambda v: v == expected if type(v) is str else same(v, expected)
        return lambda v: same(v, expected)
    if op == "ne":
        return lambda v: not same(v, expected)
    if op == "in":
        if all(type(e) is str for e in expected):
            texts = frozenset(expected)
            return lambda v: v in texts if type(v) is str else any(same(v, e) for e in expected)
        return lambda v: any(same(v, e) for e in expected)
    if op == "not_in":
        return lambda v: not any(same(v, e) for e in expected)
    if op in _COMPARISONS:
        return _numeric(_COMPARISONS[op], expected)
    if op == "between":
        return _between(*expected)
    if op == "regex":
        return _regex(expected)
    raise AssertionError(f"operator {op!r} passed validation but has no implementation")


def compile_condition(condition: ConditionSpec) -> Test:
    """All operators on one field, ANDed, as one test of the looked-up value (MISSING when
    absent). The common condition, one operator false on MISSING, is that operator's test."""
    operators = condition.operators()
    exists = operators.pop("exists", None)
    if exists is False:  # spec.py rejects it next to any other operator
        return lambda value: value is MISSING
    tests = tuple(_operator(op, expected) for op, expected in operators.items())
    if not tests:
        return lambda value: value is not MISSING
    test = tests[0] if len(tests) == 1 else _all_of(tests)
    if set(operators) <= _FALSE_ON_MISSING:
        return test
    return lambda value: value is not MISSING and test(value)


def _all_of(tests: tuple[Test, ...]) -> Test:
    def test(value: Any) -> bool:
        for one in tests:
            if not one(value):
                return False
        return True

    return test


Check = Callable[[Mapping[str, Any]], bool]


def all_conditions(conditions: tuple[tuple[str, Test], ...]) -> Check:
    """(path, test) pairs -> one function of the document, true when every test holds: the
    usual rule has two or three conditions, each one call of its getter and one of its test."""
    checks = tuple((getter(path), test) for path, test in conditions)
    if not checks:
        return lambda document: True
    if len(checks) == 1:
        ((get, test),) = checks
        return lambda document: test(get(document))
    if len(checks) == 2:
        (get1, test1), (get2, test2) = checks
        return lambda document: test1(get1(document)) and test2(get2(document))
    if len(checks) == 3:
        (get1, test1), (get2, test2), (get3, test3) = checks
        return lambda document: test1(get1(document)) and test2(get2(document)) and test3(get3(document))

    def every(document: Mapping[str, Any]) -> bool:
        for get, test in checks:
            if not test(get(document)):
                return False
        return True

    return every


@dataclass(frozen=True)
class Owner:
    id: str
    name: str
    email: str | None
    manager: str | None
    team: str | None
    channels: tuple[str, ...] = ("inbox",)
    away_until: datetime | None = None  # UTC; away while now < away_until (a date D in YAML -> D+1 00:00 UTC)
    delegate: str | None = None  # owner id who takes this owner's decisions while away
    webhook: WebhookSpec | None = None  # where the webhook channel posts (secret read at start)
    digest: timedelta | None = None  # webhook/email alerts grouped into one message per window

    def is_away(self, now: datetime) -> bool:
        return self.away_until is not None and now < self.away_until


@dataclass(frozen=True)
class CompiledRule:
    name: str
    index: int  # 0-based position in routing.yaml
    priority: str
    action: str  # "alert" | "record"
    continue_: bool
    owner_static: str | None
    owner_from: str | None
    owner_fallback: str | None
    context_fields: tuple[str, ...]
    ack_within: timedelta
    act_within: timedelta
    cooldown: timedelta | None = None  # at most one alert per entity and rule per window; alert rules only
    holdout: float = 0.0  # share of entities held out as a control group; alert rules only
    # (path, test) per field condition; all must hold.
    conditions: tuple[tuple[str, Test], ...] = field(default=(), repr=False, compare=False)
    # The models this rule can match (its `model` condition is eq/in on text), None: any model.
    # Only an index: `matches` still tests the condition.
    models: frozenset[str] | None = field(default=None, repr=False, compare=False)
    # Whether a `when` condition, or the owner/context of a match, reads lookup.<source>.<field>:
    # routing that never reaches such a rule does not need the batch's context lookups.
    when_reads_lookup: bool = field(default=False, repr=False, compare=False)
    decision_reads_lookup: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matches", all_conditions(self.conditions))
        # A document found through the model index has a model in `models`: its model
        # condition (eq/in on text) holds, and only the others are left to test.
        rest = self.conditions if self.models is None else tuple(c for c in self.conditions if c[0] != "model")
        object.__setattr__(self, "matches_past_model", all_conditions(rest))
        # What a decision reads of the document, looked up the fast way (see `getter`).
        object.__setattr__(self, "owner_getter", getter(self.owner_from) if self.owner_from else None)
        object.__setattr__(self, "context_getters", tuple((path, getter(path)) for path in self.context_fields))

    # Set per instance by __post_init__ (a plain function, one call less than a method).
    matches: Check = field(init=False, repr=False, compare=False)
    matches_past_model: Check = field(init=False, repr=False, compare=False)
    owner_getter: Callable[[Mapping[str, Any]], Any] | None = field(init=False, repr=False, compare=False)
    context_getters: tuple[tuple[str, Callable[[Mapping[str, Any]], Any]], ...] = field(
        init=False, repr=False, compare=False)


@dataclass(frozen=True)
class DriftConfig:
    """How decision_router.monitor watches one model; `models.<name>.drift` overrides these."""

    reference_days: int = 3  # the reference: the first days of a model version's predictions
    recent: timedelta = timedelta(days=1)  # compared with the reference: the last day
    alpha: float = 0.01  # false-alarm rate per model version and check (split over its metrics)
    min_samples: int = 200  # fewest values in each window before anything is judged
    baseline_version: str | None = None  # pinned reference: this version's first days instead


@dataclass(frozen=True)
class ModelConfig:
    owner: str  # receives the model's data-quality alerts
    drift: DriftConfig = DriftConfig()


@dataclass(frozen=True)
class ContextSource:
    """`context_sources.<name>`: looked up per prediction at routing time (decision_router.enrich)."""

    name: str
    kind: str  # "redis_hash" | "sql"
    key_pattern: str | None = None  # redis_hash: formatted with the prediction, after the stream prefix
    sql: str | None = None  # sql: one SELECT; the first row's columns are the fields
    parameters: tuple[str, ...] = ()  # what the key pattern / query uses of the prediction
    database_url_env: str | None = None  # sql: variable holding the database URL; None = the service's store
    timeout_s: float = 2.0  # bound on this source's lookups for one batch


@dataclass(frozen=True)
class RuleSet:
    version: str  # first 12 hex of sha256(routing.yaml + b"\0" + owners.yaml)
    rules: tuple[CompiledRule, ...]
    owners: Mapping[str, Owner]
    source_dir: Path
    # routing.yaml `models:` -> model name -> its owner (and its drift settings in `models`).
    model_owners: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    models: Mapping[str, ModelConfig] = field(default_factory=lambda: MappingProxyType({}))
    # routing.yaml `context_sources:` -> source name -> where lookup.<name>.<field> comes from.
    context_sources: Mapping[str, ContextSource] = field(default_factory=lambda: MappingProxyType({}))
    # model -> the rules a prediction of that model can match, in file order (see `candidates`).
    _by_model: Mapping[str, tuple[CompiledRule, ...]] = field(init=False, repr=False, compare=False)
    _any_model: tuple[CompiledRule, ...] = field(init=False, repr=False, compare=False)
    # The same, each rule with the test of its conditions left to make (see `candidate_checks`).
    _checks_by_model: Mapping[str, tuple[tuple[CompiledRule, Check], ...]] = field(
        init=False, repr=False, compare=False)
    _checks_any_model: tuple[tuple[CompiledRule, Check], ...] = field(init=False, repr=False, compare=False)
    _checks_all: tuple[tuple[CompiledRule, Check], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # With hundreds of rules, most name a model: a prediction is tested only against the
        # rules of its own model and those that name none, instead of every rule in turn.
        named = {model for rule in self.rules if rule.models for model in rule.models}
        by_model = {m: tuple(r for r in self.rules if r.models is None or m in r.models) for m in named}
        object.__setattr__(self, "_by_model", MappingProxyType(by_model))
        object.__setattr__(self, "_any_model", tuple(r for r in self.rules if r.models is None))
        # Found through the index, a rule that names models has the document's model among them.
        indexed = {m: tuple((r, r.matches if r.models is None else r.matches_past_model) for r in rules)
                   for m, rules in by_model.items()}
        object.__setattr__(self, "_checks_by_model", MappingProxyType(indexed))
        object.__setattr__(self, "_checks_any_model", tuple((r, r.matches) for r in self._any_model))
        object.__setattr__(self, "_checks_all", tuple((r, r.matches) for r in self.rules))

    def candidates(self, model: Any) -> tuple[CompiledRule, ...]:
        """The rules, in file order, that a document whose `model` is this value can match."""
        if isinstance(model, str):
            return self._by_model.get(model, self._any_model)
        return self.rules  # not text (no gate in front): no shortcut

    def candidate_checks(self, model: Any) -> tuple[tuple[CompiledRule, Check], ...]:
        """`candidates(model)`, each with a test of the document equal to `rule.matches` for a
        document whose `model` is this value, but without the model condition the index decided."""
        if isinstance(model, str):
            return self._checks_by_model.get(model, self._checks_any_model)
        return self._checks_all


def indexed_models(spec: RuleSpec) -> frozenset[str] | None:
    """The model names a rule's `model` condition accepts when it is plain eq/in on text
    (then `same` is string equality), else None (the rule is tried for every model)."""
    condition = spec.when.get("model")
    if condition is None:
        return None
    operators = condition.operators()
    if set(operators) == {"eq"} and isinstance(operators["eq"], str):
        return frozenset([operators["eq"]])
    if set(operators) == {"in"} and all(isinstance(v, str) for v in operators["in"]):
        return frozenset(operators["in"])
    return None


def compile_rule(spec: RuleSpec, index: int, defaults: DefaultsSpec) -> CompiledRule:
    static = spec.owner if isinstance(spec.owner, str) else None
    dynamic = None if isinstance(spec.owner, str) else spec.owner
    return CompiledRule(
        name=spec.name,
        index=index,
        priority=spec.priority or defaults.priority,
        action=spec.action,
        continue_=spec.continue_,
        owner_static=static,
        owner_from=dynamic.from_ if dynamic else None,
        owner_fallback=dynamic.fallback if dynamic else None,
        context_fields=tuple(dict.fromkeys(spec.context)),
        ack_within=spec.ack_within or defaults.ack_within,
        act_within=spec.act_within or defaults.act_within,
        cooldown=spec.cooldown,
        holdout=spec.holdout,
        conditions=tuple((path, compile_condition(cond)) for path, cond in spec.when.items()),
        models=indexed_models(spec),
        when_reads_lookup=any(_reads_lookup(path) for path in spec.when),
        decision_reads_lookup=any(_reads_lookup(path) for path in (dynamic.from_ if dynamic else "", *spec.context)),
    )


def _reads_lookup(path: str) -> bool:
    return path.split(".", 1)[0] == LOOKUP


def compile_owner(spec: OwnerSpec) -> Owner:
    return Owner(
        spec.id, spec.name, spec.email, spec.manager, spec.team, tuple(spec.channels),
        away_until=spec.away_until, delegate=spec.delegate, webhook=spec.webhook, digest=spec.digest,
    )


def compile_model(spec: ModelSpec) -> ModelConfig:
    overrides = spec.drift.model_dump(exclude_none=True)
    return ModelConfig(owner=spec.owner, drift=DriftConfig(**overrides))


def compile_source(name: str, spec: ContextSourceSpec) -> ContextSource:
    if spec.redis_hash is not None:
        return ContextSource(name, "redis_hash", key_pattern=spec.redis_hash,
                             parameters=key_placeholders(spec.redis_hash), timeout_s=spec.timeout_s)
    assert spec.sql is not None  # spec.py requires exactly one of the two
    return ContextSource(name, "sql", sql=spec.sql, parameters=sql_parameters(spec.sql),
                         database_url_env=spec.database_url_env, timeout_s=spec.timeout_s)


def build_ruleset(routing: RoutingFile, owners: list[OwnerSpec], *, version: str, source_dir: Path) -> RuleSet:
    models = {name: compile_model(spec) for name, spec in routing.models.items()}
    return RuleSet(
        version=version,
        rules=tuple(compile_rule(rule, i, routing.defaults) for i, rule in enumerate(routing.rules)),
        owners=MappingProxyType({o.id: compile_owner(o) for o in owners}),
        source_dir=source_dir,
        model_owners=MappingProxyType({name: model.owner for name, model in models.items()}),
        models=MappingProxyType(models),
        context_sources=MappingProxyType(
            {name: compile_source(name, spec) for name, spec in routing.context_sources.items()}
        ),
    )
