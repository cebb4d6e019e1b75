"""Pipeline.process_outcomes (fakeredis, SQLite): which of the alerts an event addresses it applies to
when its `at` is before some of them were created."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import fakeredis.aioredis
import pytest
from sqlalchemy import func, select
from sqlalchemy.pool import StaticPool
from sqlmodel import Session

from decision_router import metrics
from decision_router.pipeline import Pipeline
from decision_router.rules import load_rules
from decision_router.settings import Settings
from decision_router.store import create_schema, make_engine
from decision_router.tables import AlertRecord, RejectionRecord, as_utc
from tests.unit.test_stats import T0, alert

RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
NOW = T0 + timedelta(hours=3)
SKEW = Settings().max_clock_skew


def entity_alert(n: int, rule: str, *, created: datetime) -> AlertRecord:
    """An open alert of account acct-17 predicted at T0 and created (routed) at `created`: a prediction that
    reaches the router late is routed well after it was made."""
    record = alert(n, rule=rule, owner="alice-moreau", created=T0)
    record.entity_id, record.created_at = "acct-17", created
    record.ack_due_at, record.act_due_at = created + timedelta(hours=4), created + timedelta(days=2)
    return record


@pytest.fixture
async def pipeline() -> AsyncIterator[Pipeline]:
    engine = make_engine("sqlite://", poolclass=StaticPool)
    create_schema(engine)
    redis = fakeredis.aioredis.FakeRedis(decode_responses=True)
    yield Pipeline(settings=Settings(stream_prefix="t:"), ruleset=load_rules(RULES_DIR), engine=engine, redis=redis,
                   clock=lambda: NOW)
    await redis.aclose()
    engine.dispose()


def store(pipeline: Pipeline, *records: AlertRecord) -> None:
    with Session(pipeline.engine, expire_on_commit=False) as session:  # the test reads their ids after
        session.add_all(records)
        session.commit()


def stored(pipeline: Pipeline, alert_id: str) -> AlertRecord:
    with Session(pipeline.engine) as session:
        record = session.get(AlertRecord, alert_id)
        assert record is not None
        session.expunge(record)
        return record


def rejected_total(reason: str) -> float:
    return metrics.REJECTED.labels("outcomes", reason)._value.get()


async def send(pipeline: Pipeline, event: dict, entry_id: str = "1-0"):
    return await pipeline.process_outcomes([(entry_id, {"data": json.dumps(event, default=str)})])


@pytest.mark.parametrize("type_", ["acknowledged", "intervened"])
async def test_an_entity_event_applies_to_the_alerts_there_at_its_time_and_leaves_later_ones_alone(
    pipeline, type_
) -> None:
    early = entity_alert(1, "churn", created=T0)
    # Created an hour after the event's `at`, far beyond the clock skew: not the alert it is about.
    later = entity_alert(2, "watch", created=T0 + timedelta(hours=1))
    store(pipeline, early, later)
    at = T0 + timedelta(minutes=10)
    result = await send(pipeline, {"entity_type": "account", "entity_id": "acct-17", "type": type_,
                                   "actor": "alice-moreau", "action": "call", "at": at.isoformat()})
    assert (result.accepted, result.rejected) == (1, {}), result.rejections
    assert await pipeline.redis.xlen(pipeline.keys.outcomes_dlq) == 0
    acted = stored(pipeline, early.alert_id)
    assert as_utc(acted.acknowledged_at) == at and acted.ack_due_at is None
    if type_ == "intervened":
        assert as_utc(acted.intervened_at) == at and acted.intervention == "call" and acted.act_due_at is None
    untouched = stored(pipeline, later.alert_id)
    assert untouched.acknowledged_at is None and untouched.intervened_at is None
    assert untouched.ack_due_at is not None and untouched.act_due_at is not None


async def test_an_alert_created_within_the_clock_skew_after_the_event_is_still_its_alert(pipeline) -> None:
    at = T0 + timedelta(minutes=10)
    skewed = entity_alert(1, "churn", created=at + SKEW)  # the sender's clock may be behind the router's
    store(pipeline, skewed)
    result = await send(pipeline, {"entity_type": "account", "entity_id": "acct-17", "type": "acknowledged",
                                   "actor": "alice-moreau", "at": at.isoformat()})
    assert result.accepted == 1
    assert as_utc(stored(pipeline, skewed.alert_id).acknowledged_at) == at + SKEW  # not before its creation


async def test_an_entity_event_before_all_its_alerts_is_rejected_once_naming_the_earliest(pipeline) -> None:
    first = entity_alert(1, "churn", created=T0 + timedelta(hours=1))
    second = entity_alert(2, "watch", created=T0 + timedelta(hours=2))
    store(pipeline, first, second)
    at = T0 + timedelta(minutes=10)
    event = {"entity_type": "account", "entity_id": "acct-17", "type": "acknowledged", "actor": "alice-moreau",
             "at": at.isoformat()}
    counted = rejected_total("schema")
    result = await send(pipeline, event)
    assert result.accepted == 0 and result.newly_rejected == {"schema": 1}
    [rejection] = result.rejections
    created = (T0 + timedelta(hours=1)).isoformat()
    assert rejection.detail == f"at {at.isoformat()} is before alert {first.alert_id} was created ({created})"
    # The same entry again (a crash before its ack): rejected again, but on the DLQ and counted once.
    again = await send(pipeline, event)
    assert again.rejected == {"schema": 1} and again.newly_rejected == {}
    assert rejected_total("schema") == counted + 1
    [(_, fields)] = await pipeline.redis.xrange(pipeline.keys.outcomes_dlq)
    assert (fields["reason"], fields["detail"]) == ("schema", rejection.detail)
    with Session(pipeline.engine) as session:
        assert session.scalar(select(func.count()).select_from(RejectionRecord)) == 1
    assert stored(pipeline, first.alert_id).acknowledged_at is None
    assert stored(pipeline, second.alert_id).acknowledged_at is None


@pytest.mark.parametrize("addressed", ["alert_id", "prediction_id"])
async def test_an_event_naming_its_alert_and_dated_before_it_is_rejected(pipeline, addressed) -> None:
    """Named, not looked up by entity: an `at` before the alert existed is a wrong clock, not another alert."""
    record = entity_alert(1, "churn", created=T0 + timedelta(hours=1))
    store(pipeline, record)
    result = await send(pipeline, {addressed: getattr(record, addressed), "type": "acknowledged",
                                   "actor": "alice-moreau", "at": (T0 + timedelta(minutes=10)).isoformat()})
    assert result.newly_rejected == {"schema": 1}
    assert stored(pipeline, record.alert_id).acknowledged_at is None
