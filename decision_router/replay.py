"""`rules replay`: what a candidate rule set would have decided for stored predictions,
compared with what actually happened. Read-only: nothing is delivered or written.

`replay` is pure over (stored predictions, actual decisions, candidate rule set);
`load_window` and `replay_store` read them from a Session.

Comparison, per prediction: the actual decisions (its alert rows: rule, original owner,
priority, effective action) and the candidate's are paired by rule name first, then the
leftovers in rule order. A pair whose rule, owner, priority or action differ counts for
that aspect; a decision without a partner (one side matched more rules) counts as a rule
change. A prediction counts at most once per aspect, and may count for several aspects.

Cooldown is simulated: a candidate decision is "suppressed" when an earlier
unsuppressed decision of the same rule and entity falls inside the rule's cooldown,
counting the replayed decisions and the actual decisions stored before the window.
Predictions are replayed in the order the router routed them (`routing_order`): of two in
one batch for the same entity, the cooldown lets the first through, so that order decides
which of them is suppressed.

Looked-up context (lookup.<source>.<field>) is replayed from what was stored with each
prediction: the pipeline stores what it looked up under the document's `lookup` key. It
looks up only for predictions whose routing read it, so a candidate that reads a source for
other predictions (or for predictions stored before lookups were kept) routes them as if
those fields were missing; the report counts them per source (`missing_lookups`). A source
whose lookup failed for a prediction (its Redis key or SQL parameters, or the whole source)
is absent from its `lookup` too: the store cannot tell it from one not looked up, and it is
counted alike. Of a
source, only the fields the rules then read were kept (enrich.py): a candidate reading
another field of it finds that field missing. Given the fields the current rules read
(`kept`; the CLI passes them), a field neither stored nor among those counts as not kept;
one the current rules read and the store lacks was not found by the source, as when routed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from decision_router.durations import earlier
from decision_router.router import Decision, route
from decision_router.rules import RuleSet
from decision_router.rules.spec import LOOKUP
from decision_router.store import within
from decision_router.tables import AlertRecord, PredictionRecord, as_utc

ASPECTS: tuple[str, ...] = ("rule", "owner", "priority", "action")
CooldownKey = tuple[str, str, str]  # (rule, entity_type, entity_id)


@dataclass(frozen=True)
class StoredPrediction:
    prediction_id: str
    entity_type: str
    entity_id: str
    received_at: datetime  # UTC
    rules_version: str
    document: Mapping[str, Any]
    stream_id: str | None = None  # the predictions stream entry it came from

    @property
    def entity(self) -> str:
        return f"{self.entity_type}:{self.entity_id}"


@dataclass(frozen=True)
class Outcome:
    """One decision as compared: action is alert | record | control | suppressed."""

    rule: str
    owner: str
    priority: str
    action: str


@dataclass(frozen=True)
class Change:
    prediction_id: str
    entity: str
    before: str
    after: str

    def as_dict(self) -> dict[str, str]:
        return {"prediction_id": self.prediction_id, "entity": self.entity, "before": self.before, "after": self.after}


@dataclass(frozen=True)
class ReplayReport:
    candidate_version: str
    replayed: int
    unchanged: int
    changed: dict[str, int]  # aspect -> predictions with that kind of change
    examples: dict[str, tuple[Change, ...]]  # aspect -> up to N examples
    recorded_versions: dict[str, int] = field(default_factory=dict)  # rules versions that routed the window
    # context source -> replayed predictions whose candidate routing read it, though it was not stored with them
    missing_lookups: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate_rules_version": self.candidate_version,
            "recorded_rules_versions": dict(self.recorded_versions),
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "changed": dict(self.changed),
            "examples": {aspect: [c.as_dict() for c in changes] for aspect, changes in self.examples.items()},
            "missing_lookups": dict(self.missing_lookups),
        }


def stream_position(stream_id: str | None) -> tuple[int, int] | None:
    """A Redis stream entry id (`<milliseconds>-<sequence>`) as numbers, so that `5-10` follows `5-9` and
    `999-0` precedes `1000-0` (as text they do not); None without one, or for an id of another shape."""
    milliseconds, dash, sequence = (stream_id or "").partition("-")
    if not dash:
        return None
    try:
        return int(milliseconds), int(sequence)
    except ValueError:
        return None


def routing_order(prediction: StoredPrediction) -> tuple[datetime, bool, tuple[int, int], str]:
    """The order the router decided in: by batch (a batch's predictions share their received_at),
    then in stream order, as the pipeline routes a batch in the order its entries were read.
    Every prediction the router stores came from a stream entry (the HTTP API appends to the
    stream too); one without a stream id was handed to the pipeline directly (tests, embedding
    code), in an order nothing stored, so those come after, by prediction id, only to be stable."""
    position = stream_position(prediction.stream_id)
    return prediction.received_at, position is None, position or (0, 0), prediction.prediction_id


def actual_outcome(record: AlertRecord) -> Outcome:
    """What happened: the rule, the owner it was routed to (before any reassignment), the
    priority, and suppressed / control / alert / record."""
    return Outcome(record.rule, record.original_owner, record.priority, record.effective_action)


def pair(before: Sequence[Outcome], after: Sequence[Outcome], order: Mapping[str, int]) -> list[tuple[Outcome | None, Outcome | None]]:
    """Pairs by rule name, then the leftovers of each side in rule order, then the unpaired."""
    pairs: list[tuple[Outcome | None, Outcome | None]] = []
    rest_after = list(after)
    rest_before = []
    for b in before:
        same = next((a for a in rest_after if a.rule == b.rule), None)
        if same is None:
            rest_before.append(b)
        else:
            rest_after.remove(same)
            pairs.append((b, same))

    def rank(outcome: Outcome) -> tuple[int, str]:
        return order.get(outcome.rule, len(order)), outcome.rule

    rest_before.sort(key=rank)
    rest_after.sort(key=rank)
    for i in range(max(len(rest_before), len(rest_after))):
        pairs.append((rest_before[i] if i < len(rest_before) else None, rest_after[i] if i < len(rest_after) else None))
    return pairs


def compare(
    prediction: StoredPrediction, before: Sequence[Outcome], after: Sequence[Outcome], order: Mapping[str, int]
) -> dict[str, Change]:
    """aspect -> the change for this prediction, only for the aspects that changed."""
    found: dict[str, list[tuple[str, str]]] = {}
    for b, a in pair(before, after, order):
        if b is None or a is None or b.rule != a.rule:
            found.setdefault("rule", [])
        if b is None or a is None:
            continue
        for aspect in ("owner", "priority", "action"):
            old, new = getattr(b, aspect), getattr(a, aspect)
            if old != new:
                found.setdefault(aspect, []).append((f"{b.rule}: {old}", f"{a.rule}: {new}"))
    changes = {}
    for aspect in ASPECTS:
        if aspect not in found:
            continue
        if aspect == "rule":
            text = (", ".join(o.rule for o in before) or "-", ", ".join(o.rule for o in after) or "-")
        else:
            text = ("; ".join(old for old, _ in found[aspect]), "; ".join(new for _, new in found[aspect]))
        changes[aspect] = Change(prediction.prediction_id, prediction.entity, *text)
    return changes


def candidate_outcomes(
    prediction: StoredPrediction, decisions: Sequence[Decision], last: dict[CooldownKey, datetime]
) -> list[Outcome]:
    """The candidate's decisions with cooldown applied; updates `last` (the cooldown history)."""
    outcomes = []
    at = prediction.received_at
    for decision in decisions:
        key = (decision.rule, prediction.entity_type, prediction.entity_id)
        previous = last.get(key)
        suppressed = decision.cooldown is not None and previous is not None and previous > at - decision.cooldown
        if not suppressed:
            last[key] = at
        action = "suppressed" if suppressed else "control" if decision.held_out else decision.action
        outcomes.append(Outcome(decision.rule, decision.owner, decision.priority, action))
    return outcomes


def _fields(paths: Iterable[str]) -> set[tuple[str, str]]:
    """The (source, field) of the lookup.<source>.<field>[...] paths among `paths`."""
    return {(parts[1], parts[2]) for path in paths if len(parts := path.split(".")) >= 3 and parts[0] == LOOKUP}


def unstored_lookups(
    document: Mapping[str, Any], candidate: RuleSet, *, kept: Mapping[str, Collection[str]] | None = None
) -> set[str]:
    """The context sources that routing `document` through `candidate` reads (in the `when` of
    a rule it reaches, the owner or context of a rule it matches) but that were not stored
    with it (not looked up for it, or the lookup failed: the store keeps no trace of which):
    replay can only take their fields as missing. `kept`: source -> the fields the
    current rules read (enrich.referenced_fields), the only ones the pipeline fetches and stores:
    a source is counted too when the candidate reads a field of it that is not stored and that
    the current rules do not read (it was not kept, rather than not found)."""
    stored = document.get(LOOKUP)
    stored = stored if isinstance(stored, Mapping) else {}
    read: set[tuple[str, str]] = set()
    for rule in candidate.candidates(document.get("model")):
        if rule.when_reads_lookup:
            read |= _fields(path for path, _ in rule.conditions)
        if rule.matches(document):
            if rule.decision_reads_lookup:
                read |= _fields((rule.owner_from or "", *rule.context_fields))
            if not rule.continue_:
                break
    missing = set()
    for source, name in read:
        fields = stored.get(source)
        if not isinstance(fields, Mapping):
            missing.add(source)
        elif kept is not None and name not in fields and name not in kept.get(source, ()):
            missing.add(source)
    return missing


def replay(
    predictions: Sequence[StoredPrediction],
    actual: Mapping[str, Sequence[Outcome]],
    candidate: RuleSet,
    *,
    examples: int = 5,
    history: Mapping[CooldownKey, datetime] | None = None,
    kept: Mapping[str, Collection[str]] | None = None,
) -> ReplayReport:
    """Route each prediction through `candidate` as of its receipt, in `routing_order`, and compare with `actual`.

    `history`: (rule, entity_type, entity_id) -> the latest unsuppressed decision before the
    window, so a cooldown that started before the window still applies. `kept`: see unstored_lookups.
    """
    order = {rule.name: rule.index for rule in candidate.rules}
    last = dict(history or {})
    changed: Counter[str] = Counter()
    shown: dict[str, list[Change]] = {aspect: [] for aspect in ASPECTS}
    unchanged = 0
    missing_lookups: Counter[str] = Counter()
    reads_lookups = any(rule.when_reads_lookup or rule.decision_reads_lookup for rule in candidate.rules)
    for prediction in sorted(predictions, key=routing_order):
        if reads_lookups:
            missing_lookups.update(unstored_lookups(prediction.document, candidate, kept=kept))
        decisions = route(prediction.document, candidate, now=prediction.received_at)
        after = candidate_outcomes(prediction, decisions, last)
        changes = compare(prediction, actual.get(prediction.prediction_id, ()), after, order)
        unchanged += not changes
        for aspect, change in changes.items():
            changed[aspect] += 1
            if len(shown[aspect]) < examples:
                shown[aspect].append(change)
    return ReplayReport(
        candidate_version=candidate.version,
        replayed=len(predictions),
        unchanged=unchanged,
        changed={aspect: changed[aspect] for aspect in ASPECTS},
        examples={aspect: tuple(changes) for aspect, changes in shown.items()},
        recorded_versions=dict(Counter(p.rules_version for p in predictions)),
        missing_lookups=dict(sorted(missing_lookups.items())),
    )


# reading the store ---------------------------------------------------------------------


def load_window(
    session: Session, *, since: datetime | None, until: datetime | None
) -> tuple[list[StoredPrediction], dict[str, list[Outcome]]]:
    """Predictions received in [since, until), in `routing_order`, and what actually happened to each."""
    rows = session.scalars(within(select(PredictionRecord), PredictionRecord.received_at, since, until))
    loaded = [
        StoredPrediction(
            prediction_id=row.prediction_id,
            entity_type=row.entity_type,
            entity_id=row.entity_id,
            received_at=as_utc(row.received_at),  # type: ignore[arg-type]
            rules_version=row.rules_version,
            document=row.document,
            stream_id=row.stream_id,
        )
        for row in rows
    ]
    # Sorted here, not in SQL: stream ids compare as numbers, alike on SQLite and PostgreSQL.
    predictions = sorted(loaded, key=routing_order)
    actual: dict[str, list[Outcome]] = {}
    ids = [p.prediction_id for p in predictions]
    for start in range(0, len(ids), 500):  # bounded IN lists
        chunk = ids[start : start + 500]
        for record in session.scalars(select(AlertRecord).where(AlertRecord.prediction_id.in_(chunk))):
            actual.setdefault(record.prediction_id, []).append(actual_outcome(record))
    return predictions, actual


def load_history(session: Session, candidate: RuleSet, *, before: datetime | None) -> dict[CooldownKey, datetime]:
    """Latest unsuppressed actual decision per (rule, entity) inside each candidate cooldown before the window."""
    history: dict[CooldownKey, datetime] = {}
    if before is None:
        return history
    for rule in candidate.rules:
        if rule.cooldown is None:
            continue
        query = (
            select(AlertRecord.entity_type, AlertRecord.entity_id, func.max(AlertRecord.created_at))
            .where(
                AlertRecord.rule == rule.name,
                AlertRecord.suppressed_by.is_(None),
                # A window starting within a cooldown of the year 1 looks back to the year 1.
                AlertRecord.created_at > earlier(as_utc(before), rule.cooldown),
                AlertRecord.created_at < before,
            )
            .group_by(AlertRecord.entity_type, AlertRecord.entity_id)
        )
        for entity_type, entity_id, latest in session.execute(query):
            history[(rule.name, entity_type, entity_id)] = as_utc(latest)  # type: ignore[assignment]
    return history


def replay_store(
    session: Session,
    candidate: RuleSet,
    *,
    since: datetime | None,
    until: datetime | None,
    examples: int = 5,
    kept: Mapping[str, Collection[str]] | None = None,
) -> ReplayReport:
    """Load the window and replay it. Only SELECTs: the caller may open a read-only session."""
    predictions, actual = load_window(session, since=since, until=until)
    history = load_history(session, candidate, before=since)
    return replay(predictions, actual, candidate, examples=examples, history=history, kept=kept)

