"""`rules replay` logic: pairing, the four kinds of change, cooldown simulation, and the store loader (read-only)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlmodel import Session, SQLModel

from decision_router.replay import (
    Change,
    Outcome,
    StoredPrediction,
    load_history,
    load_window,
    pair,
    replay,
    replay_store,
    routing_order,
    stream_position,
)
from decision_router.router import in_holdout
from decision_router.rules import RuleSet, load_rules
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord, AuditEvent, PredictionRecord

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)

OWNERS = """
owners:
  - {id: alice, name: Alice}
  - {id: bob, name: Bob}
  - {id: desk, name: Desk}
  - {id: analytics, name: Analytics}
"""

ROUTING = """
rules:
  - name: copy
    when: {context.arr: {gte: 500000}}
    owner: bob
    continue: true
  - name: high
    when: {score: {gte: 0.8}}
    owner: {from: context.account_manager, fallback: desk}
    priority: high
    cooldown: 1d
  - name: watch
    when: {score: {gte: 0.5}}
    owner: alice
    holdout: 0.5
  - name: catch-all
    when: {}
    owner: analytics
    action: record
"""


def rules_dir(base: Path, name: str, routing: str = ROUTING) -> RuleSet:
    directory = base / name
    directory.mkdir()
    (directory / "routing.yaml").write_text(routing)
    (directory / "owners.yaml").write_text(OWNERS)
    return load_rules(directory)


@pytest.fixture
def current(tmp_path: Path) -> RuleSet:
    return rules_dir(tmp_path, "current")


def entity(holdout: bool, start: int = 0) -> str:
    """An entity id in (or out of) watch's 50% control group."""
    return next(f"e{n}" for n in range(start, 2000) if in_holdout("watch", "account", f"e{n}", 0.5) is holdout)


def stored(pid: str, score: float, *, entity_id: str | None = None, at: datetime = T0, **context: Any) -> StoredPrediction:
    entity_id = entity_id or entity(False)
    document = {
        "prediction_id": pid, "model": "churn", "model_version": "1", "entity_type": "account",
        "entity_id": entity_id, "score": score, "label": None, "predicted_at": at.isoformat(),
        "features": {}, "context": context,
    }
    return StoredPrediction(pid, "account", entity_id, at, "v-current", document)


def test_pair_by_rule_name_then_in_rule_order() -> None:
    a, b, c = Outcome("a", "x", "normal", "alert"), Outcome("b", "x", "normal", "alert"), Outcome("c", "x", "normal", "alert")
    order = {"a": 0, "b": 1, "c": 2}
    assert pair([a, b], [b, a], order) == [(a, a), (b, b)]
    assert pair([c, a], [b, a], order) == [(a, a), (c, b)]
    assert pair([a], [a, c, b], order) == [(a, a), (None, b), (None, c)]
    assert pair([b, a], [], order) == [(a, None), (b, None)]


def test_same_rules_change_nothing(current: RuleSet) -> None:
    p = stored("p1", 0.9, account_manager="alice")
    report = replay([p], {"p1": [Outcome("high", "alice", "high", "alert")]}, current)
    assert (report.replayed, report.unchanged, report.changed) == (1, 1, {"rule": 0, "owner": 0, "priority": 0, "action": 0})
    assert report.examples == {"rule": (), "owner": (), "priority": (), "action": ()}
    assert report.candidate_version == current.version and report.recorded_versions == {"v-current": 1}


def test_each_kind_of_change_is_counted_with_examples(tmp_path: Path) -> None:
    candidate = rules_dir(
        tmp_path, "candidate",
        ROUTING.replace("score: {gte: 0.8}", "score: {gte: 0.9}").replace("owner: analytics", "owner: desk"),
    )
    held = entity(True)
    treated = [entity(False, start) for start in (0, 100, 200, 300)]
    predictions = [
        stored("moved", 0.85, entity_id=treated[0], account_manager="alice"),  # high -> watch (treated): rule, priority
        stored("same", 0.95, entity_id=treated[1], account_manager="alice"),  # still high: unchanged
        stored("recorded", 0.1, entity_id=treated[2]),  # catch-all now owned by desk: owner
        stored("control", 0.6, entity_id=held),  # was delivered before holdout existed: action
        stored("copied", 0.95, entity_id=treated[3], account_manager="alice", arr=900000),  # no copy before: rule only
    ]
    actual = {
        "moved": [Outcome("high", "alice", "high", "alert")],
        "same": [Outcome("high", "alice", "high", "alert")],
        "recorded": [Outcome("catch-all", "analytics", "normal", "record")],
        "control": [Outcome("watch", "alice", "normal", "alert")],
        "copied": [Outcome("high", "alice", "high", "alert")],
    }
    report = replay(predictions, actual, candidate)
    assert report.as_dict() == {
        "candidate_rules_version": candidate.version,
        "recorded_rules_versions": {"v-current": 5},
        "replayed": 5,
        "unchanged": 1,
        "changed": {"rule": 2, "owner": 1, "priority": 1, "action": 1},
        "examples": {
            "rule": [  # in the order received, then by prediction id
                {"prediction_id": "copied", "entity": predictions[4].entity, "before": "high", "after": "copy, high"},
                {"prediction_id": "moved", "entity": predictions[0].entity, "before": "high", "after": "watch"},
            ],
            "owner": [{"prediction_id": "recorded", "entity": predictions[2].entity,
                       "before": "catch-all: analytics", "after": "catch-all: desk"}],
            "priority": [{"prediction_id": "moved", "entity": predictions[0].entity,
                          "before": "high: high", "after": "watch: normal"}],
            "action": [{"prediction_id": "control", "entity": f"account:{held}",
                        "before": "watch: alert", "after": "watch: control"}],
        },
        "missing_lookups": {},  # the rules read no looked-up context
    }


def test_examples_are_capped_but_counts_are_not(current: RuleSet) -> None:
    predictions = [stored(f"p{n}", 0.1, entity_id=f"x{n}") for n in range(4)]
    actual = {p.prediction_id: [Outcome("catch-all", "desk", "normal", "record")] for p in predictions}
    report = replay(predictions, actual, current, examples=2)
    assert report.changed["owner"] == 4 and report.changed["priority"] == 0
    assert report.examples["owner"] == (
        Change("p0", "account:x0", "catch-all: desk", "catch-all: analytics"),
        Change("p1", "account:x1", "catch-all: desk", "catch-all: analytics"),
    )


def test_a_prediction_with_no_stored_decision_is_a_rule_change(current: RuleSet) -> None:
    report = replay([stored("lost", 0.1)], {}, current)
    assert report.changed == {"rule": 1, "owner": 0, "priority": 0, "action": 0}
    assert report.examples["rule"][0].before == "-" and report.examples["rule"][0].after == "catch-all"


def test_cooldown_is_simulated_per_rule_and_entity(current: RuleSet) -> None:
    again = [
        stored("first", 0.9, entity_id="a", at=T0, account_manager="alice"),
        stored("within", 0.9, entity_id="a", at=T0 + timedelta(hours=23), account_manager="alice"),
        stored("other-entity", 0.9, entity_id="b", at=T0 + timedelta(hours=23), account_manager="alice"),
        stored("after", 0.9, entity_id="a", at=T0 + timedelta(hours=24), account_manager="alice"),
    ]
    alert, suppressed = Outcome("high", "alice", "high", "alert"), Outcome("high", "alice", "high", "suppressed")
    actual = {"first": [alert], "within": [suppressed], "other-entity": [alert], "after": [alert]}
    assert replay(list(reversed(again)), actual, current).unchanged == 4  # time order, not input order
    # An alert before the window still holds back the first one inside it.
    # An alert before the window still holds back the first one inside it, and so shifts the
    # next cooldown windows: "within" is now delivered and "after" suppressed.
    seeded = replay(again, actual, current, history={("high", "account", "a"): T0 - timedelta(hours=1)})
    assert seeded.changed == {"rule": 0, "owner": 0, "priority": 0, "action": 3}
    assert seeded.examples["action"] == (
        Change("first", "account:a", "high: alert", "high: suppressed"),
        Change("within", "account:a", "high: suppressed", "high: alert"),
        Change("after", "account:a", "high: alert", "high: suppressed"),
    )


def test_a_batch_is_replayed_in_stream_order(current: RuleSet) -> None:
    # One batch: one received_at. The router routed each entity's predictions in stream order, so the first
    # alerted and started the cooldown. Neither the prediction ids (pw-168 < pw-18, pw-1 < pw-2) nor the entry
    # ids as text (...-10 < ...-9, 1000-0 < 999-0) sort that way.
    def sent(pid: str, entity_id: str, stream_id: str) -> StoredPrediction:
        return replace(stored(pid, 0.9, entity_id=entity_id, account_manager="alice"), stream_id=stream_id)

    predictions = [
        sent("pw-18", "a", "1732612345678-9"), sent("pw-168", "a", "1732612345678-10"),
        sent("pw-2", "b", "999-0"), sent("pw-1", "b", "1000-0"),
    ]
    alert, suppressed = Outcome("high", "alice", "high", "alert"), Outcome("high", "alice", "high", "suppressed")
    actual = {"pw-18": [alert], "pw-168": [suppressed], "pw-2": [alert], "pw-1": [suppressed]}
    report = replay(predictions, actual, current)
    assert (report.unchanged, report.changed) == (4, {"rule": 0, "owner": 0, "priority": 0, "action": 0})


def test_routing_order_is_by_batch_then_stream_entry() -> None:
    assert stream_position("1732612345678-10") == (1732612345678, 10)
    assert stream_position(None) is None and stream_position("1-p1") is None and stream_position("7") is None
    later = T0 + timedelta(seconds=1)
    ordered = [
        replace(stored("z", 0.1, at=T0), stream_id="9-9"),
        replace(stored("y", 0.1, at=T0), stream_id="9-10"),
        replace(stored("x", 0.1, at=T0), stream_id="10-0"),
        stored("m", 0.1, at=T0),  # no stream id: after those with one, by prediction id
        stored("n", 0.1, at=T0),
        replace(stored("a", 0.1, at=later), stream_id="1-0"),  # a later batch
    ]
    assert sorted([ordered[i] for i in (5, 3, 0, 4, 2, 1)], key=routing_order) == ordered


# the store -----------------------------------------------------------------------------

HELD = entity(True)


def prediction_row(pid: str, entity_id: str, at: datetime, score: float = 0.9, **context: Any) -> PredictionRecord:
    document = stored(pid, score, entity_id=entity_id, at=at, **context).document
    return PredictionRecord(
        prediction_id=pid, stream_id=f"1-{pid}", model="churn", model_version="1", entity_type="account",
        entity_id=entity_id, score=score, predicted_at=at, received_at=at, rules_version="v-current", document=document,
    )


def alert_row(pid: str, rule: str, owner: str, at: datetime, *, entity_id: str, priority: str = "high",
              action: str = "alert", **extra: Any) -> AlertRecord:
    return AlertRecord(
        alert_id=f"al-{pid}-{rule}", prediction_id=pid, rule=rule, owner=extra.pop("owner_now", owner),
        original_owner=owner, owner_source="field", priority=priority, action=action, model="churn", model_version="1",
        entity_type="account", entity_id=entity_id, score=0.9, rules_version="v-current", predicted_at=at,
        created_at=at, ack_by=at + timedelta(hours=4), act_by=at + timedelta(days=2), **extra,
    )


@pytest.fixture
def session(tmp_path: Path):
    engine = make_engine(f"sqlite:///{tmp_path / 'store.db'}")
    create_schema(engine)
    with Session(engine) as s:
        before = T0 - timedelta(hours=2)
        s.add_all([
            # before the window: its alert starts a cooldown for entity "a"
            prediction_row("old", "a", before, account_manager="alice"),
            alert_row("old", "high", "alice", before, entity_id="a"),
            # an older one, outside the 1d cooldown, and a suppressed one: neither counts as history
            alert_row("older", "high", "alice", T0 - timedelta(days=2), entity_id="c"),
            alert_row("quiet", "high", "alice", before, entity_id="d", suppressed_by="al-x"),
            # in the window
            prediction_row("p1", "a", T0, account_manager="alice"),
            alert_row("p1", "high", "alice", T0, entity_id="a", suppressed_by="al-old-high", status="suppressed"),
            prediction_row("p2", "b", T0 + timedelta(hours=1), account_manager="alice"),
            # reassigned since: the comparison uses the owner it was routed to
            alert_row("p2", "high", "alice", T0 + timedelta(hours=1), entity_id="b", owner_now="bob"),
            # a control record; replayed, the entity is still in the control group
            prediction_row("p3", HELD, T0 + timedelta(hours=2), score=0.6),
            alert_row("p3", "watch", "alice", T0 + timedelta(hours=2), entity_id=HELD, priority="normal", held_out=True),
            AuditEvent(alert_id="al-p2-high", prediction_id="p2", type="routed", actor="decision-router", at=T0),
            # after the window
            prediction_row("late", "b", T0 + timedelta(days=3)),
        ])
        s.commit()
        yield s
    engine.dispose()


def snapshot(session: Session) -> dict[str, list[tuple]]:
    return {
        table.name: [tuple(row) for row in session.execute(select(table).order_by(*table.primary_key.columns))]
        for table in SQLModel.metadata.sorted_tables
    }


def test_load_window_reads_actual_decisions(session: Session) -> None:
    predictions, actual = load_window(session, since=T0, until=T0 + timedelta(days=1))
    assert [(p.prediction_id, p.entity, p.received_at) for p in predictions] == [
        ("p1", "account:a", T0), ("p2", "account:b", T0 + timedelta(hours=1)), ("p3", f"account:{HELD}", T0 + timedelta(hours=2)),
    ]
    assert predictions[0].document["context"] == {"account_manager": "alice"}
    assert actual == {
        "p1": [Outcome("high", "alice", "high", "suppressed")],
        "p2": [Outcome("high", "alice", "high", "alert")],
        "p3": [Outcome("watch", "alice", "normal", "control")],
    }


def test_history_is_unsuppressed_decisions_inside_the_cooldown_before_the_window(session: Session, current: RuleSet) -> None:
    assert load_history(session, current, before=T0) == {("high", "account", "a"): T0 - timedelta(hours=2)}
    assert load_history(session, current, before=None) == {}
    # `rules replay --since 0001-01-01`: the cooldown reaches back to the year 1, not past it.
    assert load_history(session, current, before=datetime(1, 1, 1, 1, tzinfo=UTC)) == {}


def test_replay_store_compares_and_writes_nothing(session: Session, current: RuleSet) -> None:
    before = snapshot(session)
    assert sum(len(rows) for rows in before.values()) == 12
    report = replay_store(session, current, since=T0, until=T0 + timedelta(days=1), examples=5)
    # p1 is still suppressed (by "old", before the window), p2 routed to alice, p3 still a control.
    assert (report.replayed, report.unchanged) == (3, 3)
    assert report.changed == {"rule": 0, "owner": 0, "priority": 0, "action": 0}
    session.flush()
    assert snapshot(session) == before
    assert not session.dirty and not session.new and not session.deleted


def test_empty_window(session: Session, current: RuleSet) -> None:
    report = replay_store(session, current, since=T0 + timedelta(days=10), until=None)
    assert (report.replayed, report.unchanged, report.changed["rule"]) == (0, 0, 0)


LOOKUP_ROUTING = """
context_sources:
  crm: {redis_hash: "context:{entity_type}:{entity_id}"}
  billing: {redis_hash: "billing:{entity_id}"}
rules:
  - name: gold
    when: {lookup.crm.tier: gold}
    owner: {from: lookup.billing.payer, fallback: desk}
  - name: copy
    when: {score: {gte: 0.8}}
    owner: bob
    context: [lookup.billing.overdue]
    continue: true
  - name: catch-all
    when: {}
    owner: analytics
    action: record
"""


@pytest.mark.parametrize(
    ("score", "lookup", "missing"),
    [
        (0.5, None, {"crm"}),  # gold's `when` reads crm; it does not match, so billing is never read
        (0.9, None, {"crm", "billing"}),  # copy matches and its context reads billing
        (0.5, {"crm": {"tier": "gold"}}, {"billing"}),  # gold matches: its owner reads billing
        (0.5, {"crm": {"tier": "silver"}}, set()),  # looked up (and stored), nothing else reached
        (0.9, {"crm": {}, "billing": {}}, set()),  # looked up and found nothing: stored as such
    ],
    ids=["when-only", "when-and-context", "owner", "stored", "stored-empty"],
)
def test_unstored_lookups_are_the_sources_the_candidate_reads_and_the_store_lacks(
    tmp_path: Path, score: float, lookup: dict | None, missing: set[str]
) -> None:
    from decision_router.replay import unstored_lookups

    candidate = rules_dir(tmp_path, "lookups", LOOKUP_ROUTING)
    p = stored("p1", score)
    document = {**p.document, "lookup": lookup} if lookup is not None else p.document
    assert unstored_lookups(document, candidate) == missing


@pytest.mark.parametrize(
    ("kept", "missing"),
    [
        ({"crm": ("tier",), "billing": ("payer",)}, {"crm"}),  # plan: read by no current rule, so never kept
        ({"crm": ("tier", "plan"), "billing": ("payer",)}, set()),  # plan read, not found by the source
        (None, set()),  # the current rules unknown: as before fields were kept by rule
    ],
    ids=["not-kept", "not-found", "unknown"],
)
def test_a_field_the_current_rules_do_not_read_was_not_kept_and_counts_as_missing(
    tmp_path: Path, kept: dict | None, missing: set[str]
) -> None:
    # The pipeline stores only the fields of a source some rule reads (enrich.py): a candidate that reads
    # another one finds it missing, and the report says so rather than replaying it silently without it.
    from decision_router.replay import unstored_lookups

    candidate = rules_dir(tmp_path, "lookups", LOOKUP_ROUTING.replace("lookup.billing.overdue", "lookup.crm.plan"))
    p = stored("p1", 0.9)
    document = {**p.document, "lookup": {"crm": {"tier": "silver"}, "billing": {"payer": "alice"}}}
    assert unstored_lookups(document, candidate, kept=kept) == missing


def test_replay_routes_with_the_stored_lookups_and_counts_the_missing_ones(tmp_path: Path) -> None:
    candidate = rules_dir(tmp_path, "lookups", LOOKUP_ROUTING)
    gold = stored("p1", 0.5)
    with_lookup = StoredPrediction(**{**gold.__dict__, "document": {
        **gold.document, "lookup": {"crm": {"tier": "gold"}, "billing": {"payer": "alice"}}}})
    bare = stored("p2", 0.5)
    actual = {"p1": [Outcome("gold", "alice", "normal", "alert")], "p2": [Outcome("catch-all", "analytics", "normal", "record")]}
    report = replay([with_lookup, bare], actual, candidate)
    assert (report.unchanged, report.missing_lookups) == (2, {"crm": 1})
    assert report.as_dict()["missing_lookups"] == {"crm": 1}
    # Rules that read no lookups count nothing, whatever the documents hold.
    assert replay([bare], actual, rules_dir(tmp_path, "plain")).missing_lookups == {}
