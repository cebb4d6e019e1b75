"""`rules replay` of the very rules that routed the stored predictions reports no change, on both stores:
predictions routed by the pipeline in batches, several per entity and batch, under a cooldown."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlmodel import Session

from decision_router.pipeline import Pipeline
from decision_router.replay import replay_store
from decision_router.rules import load_rules
from decision_router.tables import AlertRecord
from decision_router.tracker import alert_id_for
from tests.integration.conftest import ManualClock

pytestmark = pytest.mark.redis

ROUTING = """
rules:
  - name: churn-high
    when: {model: churn, score: {gte: 0.8}}
    owner: am
    cooldown: 1h
  - {name: rest, when: {}, owner: desk, action: record}
"""
OWNERS = "owners:\n  - {id: am, name: Account Manager}\n  - {id: desk, name: Desk}\n"
T0 = datetime.now(UTC).replace(microsecond=0)


def entry(milliseconds: int, n: int, entity: str, at: datetime) -> tuple[str, dict]:
    """Stream entry `<milliseconds>-<n>` holding prediction pw-<n>."""
    document = {"prediction_id": f"pw-{n}", "model": "churn", "model_version": "1", "entity_type": "account",
                "entity_id": entity, "score": 0.9, "predicted_at": at.isoformat()}
    return f"{milliseconds}-{n}", {"data": json.dumps(document)}


async def test_replaying_the_rules_that_routed_a_window_changes_nothing(settings, engine, rules_dir: Path):
    ruleset = load_rules(rules_dir)
    clock = ManualClock(T0)
    redis = Redis.from_url(settings.redis_url)
    pipeline = Pipeline(settings=settings, ruleset=ruleset, engine=engine, redis=redis, clock=clock)
    try:
        # Each batch in stream order, all of it received at one instant: entities a and b, four predictions each.
        # Neither the prediction ids (pw-10 < pw-8) nor the entry ids as text (...-10 < ...-8) sort that way.
        milliseconds = int(T0.timestamp() * 1000)
        result = await pipeline.process_predictions([entry(milliseconds, n, "ab"[n % 2], T0) for n in range(8, 16)])
        assert (result.alerts, result.suppressed) == (2, 6)
        clock.now = later = T0 + timedelta(minutes=90)  # the cooldowns have ended: new windows start
        result = await pipeline.process_predictions(
            [entry(milliseconds + 90 * 60_000, n, "ab"[n % 2], later) for n in range(98, 102)]
        )
        assert (result.alerts, result.suppressed) == (2, 2)
    finally:
        await redis.aclose()
    with Session(engine) as session:
        # The first of each entity in the stream alerted.
        firsts = {"pw-8", "pw-9", "pw-98", "pw-99"}
        unsuppressed = session.scalars(select(AlertRecord.prediction_id).where(AlertRecord.suppressed_by.is_(None)))
        assert set(unsuppressed) == firsts
        assert session.get(AlertRecord, alert_id_for("pw-10", "churn-high")).suppressed_by == alert_id_for(
            "pw-8", "churn-high"
        )
        report = replay_store(session, ruleset, since=T0 - timedelta(minutes=1), until=None)
    assert (report.replayed, report.unchanged) == (12, 12), report.examples
    assert report.changed == {"rule": 0, "owner": 0, "priority": 0, "action": 0}
