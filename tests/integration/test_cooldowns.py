"""Cooldown windows held in the store (cooldowns.py), on real Redis and both stores: the claim
only takes an ended window or its own, the same entry routed by two workers at once (handed to
a second one while the first still works on it) neither alerts twice nor suppresses itself,
alerts stored before the cooldowns table still count, and a reload that changes a cooldown."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import inspect, select
from sqlalchemy.engine import Engine
from sqlmodel import Session

from decision_router import cooldowns
from decision_router.pipeline import Pipeline
from decision_router.rules import RuleSet, load_rules
from decision_router.store import create_schema
from decision_router.tables import AlertRecord, CooldownRecord, PredictionRecord, as_utc
from decision_router.tracker import alert_id_for
from tests.integration.conftest import ManualClock
from tests.integration.test_router_loop import count

pytestmark = pytest.mark.redis

ROUTING = """
rules:
  - name: churn-high
    when: {model: churn, score: {gte: 0.8}}
    owner: am
    cooldown: COOLDOWN
  - {name: rest, when: {}, owner: desk, action: record}
"""
OWNERS = "owners:\n  - {id: am, name: Account Manager}\n  - {id: desk, name: Desk}\n"
T0 = datetime.now(UTC).replace(microsecond=0)
KEY = ("churn-high", "account", "a")


def rules(tmp_path: Path, cooldown: str = "1h") -> RuleSet:
    directory = tmp_path / f"rules-{cooldown}"
    directory.mkdir(exist_ok=True)
    (directory / "routing.yaml").write_text(ROUTING.replace("COOLDOWN", cooldown))
    (directory / "owners.yaml").write_text(OWNERS)
    return load_rules(directory)


@pytest.fixture
async def redis(settings):
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def make_pipeline(settings, engine, redis, tmp_path):
    clock = ManualClock(T0)

    def make(cooldown: str = "1h") -> Pipeline:
        return Pipeline(settings=settings, ruleset=rules(tmp_path, cooldown), engine=engine, redis=redis, clock=clock)

    return make


def entry(n: int, pid: str, entity: str = "a", *, at: datetime = T0) -> tuple[str, dict]:
    document = {"prediction_id": pid, "model": "churn", "model_version": "1", "entity_type": "account",
                "entity_id": entity, "score": 0.9, "predicted_at": at.isoformat()}
    return f"{n}-0", {"data": json.dumps(document)}


def suppressed_by(engine: Engine, pid: str) -> str | None:
    with Session(engine) as session:
        return session.get(AlertRecord, alert_id_for(pid, "churn-high")).suppressed_by


def window(engine: Engine) -> tuple[str, datetime, datetime]:
    with Session(engine) as session:
        row = session.get(CooldownRecord, dict(zip(("rule", "entity_type", "entity_id"), KEY, strict=True)))
        return row.alert_id, as_utc(row.started_at), as_utc(row.ends_at)


def test_a_claim_takes_an_ended_window_or_its_own_and_nothing_else(engine, tmp_path):
    ruleset = rules(tmp_path)
    first, second = alert_id_for("p1", "churn-high"), alert_id_for("p2", "churn-high")
    with Session(engine) as session:
        cooldowns.claim(session, {KEY: first}, ruleset=ruleset, now=T0)
        session.commit()
    assert window(engine) == (first, T0, T0 + timedelta(hours=1))
    with Session(engine) as session:
        with pytest.raises(cooldowns.ClaimLost, match="churn-high account:a"):
            cooldowns.claim(session, {KEY: second}, ruleset=ruleset, now=T0 + timedelta(minutes=59))
        session.rollback()
        # The same decision again (its entry routed a second time) keeps its window.
        cooldowns.claim(session, {KEY: first}, ruleset=ruleset, now=T0 + timedelta(minutes=1))
        session.rollback()
        cooldowns.claim(session, {KEY: second}, ruleset=ruleset, now=T0 + timedelta(hours=1))
        session.commit()
    assert window(engine) == (second, T0 + timedelta(hours=1), T0 + timedelta(hours=2))
    with Session(engine) as session:
        since = {"churn-high": T0}
        assert cooldowns.holders(session, [KEY], since=since, now=T0 + timedelta(hours=1, minutes=30)) == {KEY: second}


async def test_the_same_entry_routed_by_two_workers_at_once_alerts_once_and_suppresses_nothing(
    make_pipeline, engine, r
):
    # XAUTOCLAIM hands a pending entry to a second worker while the first is still storing it.
    first, second = make_pipeline(), make_pipeline()
    batch = [entry(1, "p1"), entry(2, "p2", "b")]
    results = await asyncio.gather(first.process_predictions(batch), second.process_predictions(batch))
    assert sorted((res.alerts, res.redelivered) for res in results) == [(0, 2), (2, 0)]
    assert suppressed_by(engine, "p1") is None and suppressed_by(engine, "p2") is None
    assert window(engine)[0] == alert_id_for("p1", "churn-high")
    assert r.xlen(first.keys.inbox("am")) == 2

    again = await first.process_predictions(batch)  # and once more after a crash before the ack
    assert (again.redelivered, again.alerts, again.suppressed) == (2, 0, 0)
    assert suppressed_by(engine, "p1") is None


async def test_alerts_stored_before_the_cooldowns_table_still_hold_their_windows(make_pipeline, engine):
    pipeline = make_pipeline()
    await pipeline.process_predictions([entry(1, "old")])
    # A store from before the table: its alerts have no window rows; create_schema adds the table.
    CooldownRecord.__table__.drop(engine)
    create_schema(engine)
    assert "cooldowns" in inspect(engine).get_table_names()
    pipeline.clock.now = at = T0 + timedelta(minutes=30)
    result = await pipeline.process_predictions([entry(2, "new", at=at)])
    assert (result.alerts, result.suppressed) == (0, 1)
    assert suppressed_by(engine, "new") == alert_id_for("old", "churn-high")
    pipeline.clock.now = at = T0 + timedelta(hours=1, seconds=1)
    result = await pipeline.process_predictions([entry(3, "later", at=at)])
    assert result.alerts == 1 and window(engine)[0] == alert_id_for("later", "churn-high")


async def test_a_window_keeps_its_end_when_a_reload_shortens_the_cooldown_and_grows_when_it_lengthens(
    make_pipeline, engine
):
    pipeline = make_pipeline("1h")
    await pipeline.process_predictions([entry(1, "s1")])
    pipeline.ruleset = make_pipeline("10m").ruleset
    pipeline.clock.now = at = T0 + timedelta(minutes=30)
    assert (await pipeline.process_predictions([entry(2, "s2", at=at)])).suppressed == 1
    # Lengthened: the alert that started the window still covers the entity for the new cooldown.
    pipeline.ruleset = make_pipeline("2h").ruleset
    pipeline.clock.now = at = T0 + timedelta(minutes=90)
    assert (await pipeline.process_predictions([entry(3, "s3", at=at)])).suppressed == 1
    assert suppressed_by(engine, "s3") == alert_id_for("s1", "churn-high")
    pipeline.clock.now = at = T0 + timedelta(hours=2, seconds=1)
    assert (await pipeline.process_predictions([entry(4, "s4", at=at)])).alerts == 1
    with Session(engine) as session:
        unsuppressed = session.scalars(select(AlertRecord.prediction_id).where(AlertRecord.suppressed_by.is_(None)))
        assert sorted(unsuppressed) == ["s1", "s4"]


async def test_a_claim_lost_between_read_and_commit_rolls_back_and_the_next_pass_is_suppressed(
    make_pipeline, engine, r, monkeypatch
):
    pipeline = make_pipeline()
    claim, passes = cooldowns.claim, []

    def another_worker_commits_first(session, started, **kwargs):
        # Exactly between this batch's read of the holders and its claim: another worker's
        # transaction starts the same window and commits.
        if not passes:
            with Session(engine) as other:
                claim(other, {KEY: "al-other-worker"}, ruleset=pipeline.ruleset, now=T0)
                other.commit()
        passes.append(dict(started))
        claim(session, started, **kwargs)

    monkeypatch.setattr(cooldowns, "claim", another_worker_commits_first)
    result = await pipeline.process_predictions([entry(1, "p1"), entry(2, "p2", "b")])
    assert passes == [
        {KEY: alert_id_for("p1", "churn-high"), ("churn-high", "account", "b"): alert_id_for("p2", "churn-high")},
        {("churn-high", "account", "b"): alert_id_for("p2", "churn-high")},
    ]
    assert (result.accepted, result.alerts, result.suppressed) == (2, 1, 1)
    assert suppressed_by(engine, "p1") == "al-other-worker" and suppressed_by(engine, "p2") is None
    assert count(engine, PredictionRecord) == 2 and count(engine, AlertRecord) == 2
    assert [json.loads(f["data"])["prediction_id"] for _, f in r.xrange(pipeline.keys.inbox("am"))] == ["p2"]
